// Math of the per-pixel ridge problems of a LocalRegression layer, shared by the CPU kernels
// (vectorized across pixels), the CUDA kernels (a thread per pixel) and the C++ unit test.
// Plain C++ with no torch headers, so that .cu files can include it.
//
// For output pixel p of group g the design row is z = [the taps the layer reads for p, 1 if the
// layer has a bias]: D = C_in/groups * kH * kW (+1) unknowns; tap a = (c * kH + u) * kW + v
// follows the weight layout. Statistics keep the pixel index last (P = H_out * W_out):
//   gram      (groups, D(D+1)/2, P): lower triangle of sum_n z z^T packed row by row
//                                    (packed_index), i.e. the upper one column by column;
//   cross     (C_out, D, P):         sum_n z y[n, o, p];
//   target_sq (C_out, P):            sum_n y[n, o, p]^2.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "local_regression/local_regression_math.h"

// The solver templates below also run on vectors of pixels on the CPU, inside functions compiled
// for a wider instruction set than the default; forcing them inline there lets them take on that
// instruction set.
#if defined(__CUDACC__) || !defined(__GNUC__)
#define REGGAN_RIDGE_HD REGGAN_HD
#else
#define REGGAN_RIDGE_HD inline __attribute__((always_inline))
#endif

namespace reggan_ext {

struct RidgeGeometry {
  LocalGeometry layer;  // batch = samples of the current update
  bool bias;

  REGGAN_HD int64_t taps() const {
    return layer.in_per_group() * layer.kernel_h * layer.kernel_w;
  }
  REGGAN_HD int64_t unknowns() const { return taps() + (bias ? 1 : 0); }
  REGGAN_HD int64_t packed_size() const { return unknowns() * (unknowns() + 1) / 2; }
  REGGAN_HD int64_t pixels() const { return layer.out_plane(); }
};

// Index of entry (i, j), j <= i, of a lower triangle packed row by row. Row i is contiguous,
// which keeps every inner loop of the solver below contiguous.
REGGAN_HD int64_t packed_index(int64_t i, int64_t j) { return i * (i + 1) / 2 + j; }

// Kernel position (c, u, v) of tap a.
struct Tap {
  int64_t channel, u, v;
};

REGGAN_HD Tap tap_of(int64_t a, const LocalGeometry& g) {
  return Tap{a / (g.kernel_h * g.kernel_w), (a / g.kernel_w) % g.kernel_h, a % g.kernel_w};
}

// Offset within a sample of the input that tap a reads for output pixel (i, j) of the group
// whose first input channel is c0, or -1 where it reads zero padding.
REGGAN_HD int64_t tap_offset(const LocalGeometry& g, int64_t c0, int64_t a, int64_t i,
                             int64_t j) {
  const Tap t = tap_of(a, g);
  const int64_t row = g.input_row(i, t.u);
  const int64_t col = j * g.stride_w + g.col_offset(t.v);
  if (row < 0 || row >= g.in_height || col < 0 || col >= g.in_width) return -1;
  return ((c0 + t.channel) * g.in_height + row) * g.in_width + col;
}

// Lane operations of one system at a time (a CUDA thread, the C++ test). The CPU kernels supply
// the same interface for a vector of systems, one per lane.
template <typename T>
struct ScalarLanes {
  using value = T;
  using mask = bool;
  using flag = int32_t;
  static constexpr int kChains = 4;
  REGGAN_HD static value splat(double s) { return value(s); }
  REGGAN_HD static mask not_above(const value& d, const value& tol) { return !(d > tol); }
  REGGAN_HD static value select(const mask& m, const value& a, const value& b) {
    return m ? a : b;
  }
  REGGAN_HD static value max(const value& a, const value& b) { return a > b ? a : b; }
  REGGAN_HD static void mark(flag& info, const mask& m, int32_t k) {
    if (m && info == 0) info = k;
  }
};

// sum_{m < count} x[m * stride] * y[m * stride] in Lanes::kChains interleaved partial sums:
// independent chains keep the multiply-add units busy where a single chain would wait on each
// one's latency (the CPU lanes are wide enough to need only one).
template <class Lanes>
REGGAN_RIDGE_HD typename Lanes::value dot(const typename Lanes::value* x,
                                          const typename Lanes::value* y, int64_t count,
                                          int64_t stride) {
  using V = typename Lanes::value;
  constexpr int kChains = Lanes::kChains;
  V part[kChains];
  for (int t = 0; t < kChains; ++t) part[t] = Lanes::splat(0);
  int64_t m = 0;
  for (; m + kChains <= count; m += kChains) {
    for (int t = 0; t < kChains; ++t) part[t] += x[(m + t) * stride] * y[(m + t) * stride];
  }
  for (; m < count; ++m) part[0] += x[m * stride] * y[m * stride];
  for (int t = 1; t < kChains; ++t) part[0] += part[t];
  return part[0];
}

// Root-free Cholesky (LDL^T) of A + lam * P in place, P = I, or I without its last entry when
// !penalize_last (an unpenalized bias). A is the packed lower triangle (packed_index), entry k at
// a[k * stride]. Afterwards a holds L's strict lower part and 1 / d_j on the diagonal.
// A pivot d_j <= n * eps * max diag(A + lam * P), or not a number, means the leading minor of
// order j + 1 is not (numerically) positive definite: info gets the first such j + 1 (0 when all
// pass) and the pivot is replaced by 1 so that the remaining lanes and steps stay finite.
// Row by row: row j reads the finished rows above it and is written once.
template <class Lanes>
REGGAN_RIDGE_HD void ldlt_factor(typename Lanes::value* a, int64_t n, int64_t stride,
                                 const typename Lanes::value& lam, bool penalize_last,
                                 double eps, typename Lanes::flag& info) {
  using V = typename Lanes::value;
  V largest = Lanes::splat(0);
  for (int64_t j = 0; j < n; ++j) {
    V& d = a[packed_index(j, j) * stride];
    if (penalize_last || j + 1 < n) d += lam;
    largest = Lanes::max(largest, d);
  }
  const V tol = largest * Lanes::splat(eps * double(n));
  for (int64_t j = 0; j < n; ++j) {
    V* row = a + packed_index(j, 0) * stride;
    // v_k = L[j][k] d_k = A[j][k] - sum_{m<k} L[k][m] v_m, kept in row j for now.
    for (int64_t k = 0; k < j; ++k) {
      row[k * stride] -= dot<Lanes>(a + packed_index(k, 0) * stride, row, k, stride);
    }
    // d_j = A[j][j] - sum_k v_k^2 / d_k, and v_k becomes L[j][k].
    for (int64_t k = 0; k < j; ++k) {
      V& v = row[k * stride];
      const V l = v * a[packed_index(k, k) * stride];
      row[j * stride] -= l * v;
      v = l;
    }
    const V d = row[j * stride];
    const typename Lanes::mask bad = Lanes::not_above(d, tol);
    Lanes::mark(info, bad, int32_t(j + 1));
    row[j * stride] = Lanes::splat(1) / Lanes::select(bad, Lanes::splat(1), d);
  }
}

// Solves L D L^T x = b in place with the factor of ldlt_factor; entry k of b at b[k * stride]
// (the stride of a).
template <class Lanes>
REGGAN_RIDGE_HD void ldlt_solve(const typename Lanes::value* a, int64_t n, int64_t stride,
                                typename Lanes::value* b) {
  for (int64_t j = 0; j < n; ++j) {  // L z = b, row by row
    b[j * stride] -= dot<Lanes>(a + packed_index(j, 0) * stride, b, j, stride);
  }
  for (int64_t j = 0; j < n; ++j) b[j * stride] *= a[packed_index(j, j) * stride];
  for (int64_t k = n - 1; k > 0; --k) {  // L^T x = z, subtracting row k once x_k is final
    const typename Lanes::value* row = a + packed_index(k, 0) * stride;
    for (int64_t j = 0; j < k; ++j) b[j * stride] -= row[j * stride] * b[k * stride];
  }
}

// sum_{j < count} [(A + lam P)^-1]_jj from the factor of ldlt_factor: with c = L^-1 e_j (unit
// lower triangular, so c_i = 0 for i < j and c_j = 1), [(L D L^T)^-1]_jj = sum_i c_i^2 / d_i.
// c is scratch for n entries with the stride of a. (GCV's hat-matrix trace is
// D - lam * this sum over the penalized entries.)
template <class Lanes>
REGGAN_RIDGE_HD typename Lanes::value ldlt_inverse_diagonal_sum(const typename Lanes::value* a,
                                                                int64_t n, int64_t stride,
                                                                int64_t count,
                                                                typename Lanes::value* c) {
  using V = typename Lanes::value;
  V total = Lanes::splat(0);
  for (int64_t j = 0; j < count; ++j) {
    c[j * stride] = Lanes::splat(1);
    total += a[packed_index(j, j) * stride];
    for (int64_t i = j + 1; i < n; ++i) {  // row i of L c = e_j
      const V ci = Lanes::splat(0) - dot<Lanes>(a + packed_index(i, j) * stride,
                                                c + j * stride, i - j, stride);
      c[i * stride] = ci;
      total += ci * ci * a[packed_index(i, i) * stride];
    }
  }
  return total;
}

}  // namespace reggan_ext
