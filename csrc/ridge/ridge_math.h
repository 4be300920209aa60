// Math of the per-pixel ridge problems of a LocalRegression layer, shared by the CPU kernels
// (vectorized across pixels), the CUDA kernels (a thread or a warp per pixel) and the C++ unit
// test.
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
// Row by row: row j reads the finished rows above it and is written once. kRows rows at a time
// share each read of a finished row above them (the CPU's systems, in L2, are bound by its
// bandwidth); each sums in the order a row alone does, so the factor is the same.
template <class Lanes, int kRows = 1>
REGGAN_RIDGE_HD void ldlt_factor(typename Lanes::value* a, int64_t n, int64_t stride,
                                 const typename Lanes::value& lam, bool penalize_last,
                                 double eps, typename Lanes::flag& info) {
  static_assert(kRows == 1 || Lanes::kChains == 1, "rows together sum in one chain each");
  using V = typename Lanes::value;
  V largest = Lanes::splat(0);
  for (int64_t j = 0; j < n; ++j) {
    V& d = a[packed_index(j, j) * stride];
    if (penalize_last || j + 1 < n) d += lam;
    largest = Lanes::max(largest, d);
  }
  const V tol = largest * Lanes::splat(eps * double(n));
  for (int64_t j0 = 0; j0 < n; j0 += kRows) {
    // v_k = L[j][k] d_k = A[j][k] - sum_{m<k} L[k][m] v_m, kept in row j for now: for the k
    // of the rows above the step, the step's rows together, ...
    bool together = false;
    if constexpr (kRows > 1) together = j0 + kRows <= n;
    if (together) {
      V* rows[kRows];
      for (int r = 0; r < kRows; ++r) rows[r] = a + packed_index(j0 + r, 0) * stride;
      for (int64_t k = 0; k < j0; ++k) {
        const V* finished = a + packed_index(k, 0) * stride;
        V part[kRows];
        for (int r = 0; r < kRows; ++r) part[r] = Lanes::splat(0);
        for (int64_t m = 0; m < k; ++m) {
          const V l = finished[m * stride];
          for (int r = 0; r < kRows; ++r) part[r] += l * rows[r][m * stride];
        }
        for (int r = 0; r < kRows; ++r) rows[r][k * stride] -= part[r];
      }
    }
    for (int64_t j = j0; j < j0 + kRows && j < n; ++j) {
      V* row = a + packed_index(j, 0) * stride;
      // ... then, row by row, for the k within the step.
      for (int64_t k = together ? j0 : 0; k < j; ++k) {
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

// The same factor, solve and inverse trace for one system shared by a team of threads (a CUDA
// warp), on a packed lower triangle at stride 1 (shared memory). Team::phase(f) runs
// f(lane, lanes) on every lane and then synchronizes the team: within a phase no lane reads
// what another lane writes, so the phases below are all the synchronization there is. Code
// outside the phases runs on every lane alike (on the GPU each lane keeps its own copy of the
// pivots and of info).

// Right-looking, two columns per step, so that each pass over the trailing triangle (the bulk
// of the work, shared-memory bound on the GPU) applies two columns. The team copies column j of
// the updated matrix (v_i = L[i][j] d_j) and its scaled copy (l_i = L[i][j]) into scratch, then
// column j + 1 the same way after applying column j to it, then updates the trailing triangle
// A[i][k] -= l_i v_k + l'_i v'_k, j + 1 < k <= i, spread evenly over the lanes in packed order.
// The pivot test, the stored 1 / d_j and info are those of ldlt_factor; the sums come in a
// different order, so results agree to rounding. scratch holds 4 n entries.
template <typename T, class Team>
REGGAN_HD int32_t ldlt_factor_team(Team& team, T* a, int n, T lam, bool penalize_last,
                                   double eps, T* scratch) {
  using Lanes = ScalarLanes<T>;
  T* column0 = scratch;
  T* scaled0 = scratch + n;
  T* column1 = scratch + 2 * n;
  T* scaled1 = scratch + 3 * n;
  team.phase([&](int lane, int lanes) {
    for (int j = lane; j < n; j += lanes) {
      if (penalize_last || j + 1 < n) a[packed_index(j, j)] += lam;
    }
  });
  T largest = 0;
  for (int j = 0; j < n; ++j) largest = Lanes::max(largest, a[packed_index(j, j)]);
  const T tol = largest * T(eps * double(n));
  int32_t info = 0;
  // 1 / d_j as ldlt_factor stores it, marking info where d_j fails.
  const auto inverse_pivot = [&](T d, int j) {
    const bool bad = Lanes::not_above(d, tol);
    Lanes::mark(info, bad, j + 1);
    return T(1) / Lanes::select(bad, T(1), d);
  };
  for (int j = 0; j < n; j += 2) {
    // Each pivot is read by every lane before the phase after it ends, and written (1 / d) by
    // lane 0 in the last phase of the step.
    const T inverse0 = inverse_pivot(a[packed_index(j, j)], j);
    if (j + 1 == n) {  // the last column alone
      team.phase([&](int lane, int) {
        if (lane == 0) a[packed_index(j, j)] = inverse0;
      });
      break;
    }
    team.phase([&](int lane, int lanes) {
      for (int i = j + 1 + lane; i < n; i += lanes) {
        T& entry = a[packed_index(i, j)];
        column0[i] = entry;
        entry *= inverse0;
        scaled0[i] = entry;
      }
    });
    const T inverse1 =
        inverse_pivot(a[packed_index(j + 1, j + 1)] - scaled0[j + 1] * column0[j + 1], j + 1);
    team.phase([&](int lane, int lanes) {
      for (int i = j + 2 + lane; i < n; i += lanes) {
        T& entry = a[packed_index(i, j + 1)];
        entry -= scaled0[i] * column0[j + 1];
        column1[i] = entry;
        entry *= inverse1;
        scaled1[i] = entry;
      }
    });
    team.phase([&](int lane, int lanes) {
      if (lane == 0) {
        a[packed_index(j, j)] = inverse0;
        a[packed_index(j + 1, j + 1)] = inverse1;
      }
      // The lane's entries of the trailing triangle, lanes apart in packed order: (i, j + 2 +
      // offset), row i holding i - j - 1 of them.
      int i = j + 2, offset = lane;
      while (i < n && offset >= i - j - 1) offset -= i - j - 1, ++i;
      while (i < n) {
        const int k = j + 2 + offset;
        T& entry = a[packed_index(i, k)];
        entry -= scaled0[i] * column0[k];
        entry -= scaled1[i] * column1[k];
        offset += lanes;
        while (i < n && offset >= i - j - 1) offset -= i - j - 1, ++i;
      }
    });
  }
  return info;
}

// Solves L D L^T x = b in place with the factor of ldlt_factor_team; b has stride 1 too.
// Forward and back substitution a column of L per phase.
template <typename T, class Team>
REGGAN_HD void ldlt_solve_team(Team& team, const T* a, int n, T* b) {
  for (int j = 0; j + 1 < n; ++j) {  // L z = b
    team.phase([&](int lane, int lanes) {
      for (int i = j + 1 + lane; i < n; i += lanes) b[i] -= a[packed_index(i, j)] * b[j];
    });
  }
  team.phase([&](int lane, int lanes) {
    for (int j = lane; j < n; j += lanes) b[j] *= a[packed_index(j, j)];
  });
  for (int k = n - 1; k > 0; --k) {  // L^T x = z, subtracting row k once x_k is final
    team.phase([&](int lane, int lanes) {
      for (int j = lane; j < k; j += lanes) b[j] -= a[packed_index(k, j)] * b[k];
    });
  }
}

// sum_{j < count} [(A + lam P)^-1]_jj from the factor of ldlt_factor_team, as
// ldlt_inverse_diagonal_sum but by inverting L in place: a becomes X = L^-1 below the diagonal
// (its unit diagonal implied; the 1 / d_i stay), and [(L D L^T)^-1]_jj = sum_i X[i][j]^2 / d_i.
// column and row_sums hold n entries each.
template <typename T, class Team>
REGGAN_HD T ldlt_inverse_diagonal_sum_team(Team& team, T* a, int n, int count, T* column,
                                           T* row_sums) {
  // A column of X per step from the right, from the finished columns to its right:
  // X[i][j] = -(L[i][j] + sum_{j<m<i} X[i][m] L[m][j]). Column j of L is copied out first, as
  // the lane that owns row m overwrites L[m][j] while others still read it.
  for (int j = n - 2; j >= 0; --j) {
    team.phase([&](int lane, int lanes) {
      for (int m = j + 1 + lane; m < n; m += lanes) column[m] = a[packed_index(m, j)];
    });
    team.phase([&](int lane, int lanes) {
      for (int i = j + 1 + lane; i < n; i += lanes) {
        T* row = a + packed_index(i, 0);
        T sum = column[i];
        for (int m = j + 1; m < i; ++m) sum += row[m] * column[m];
        row[j] = -sum;
      }
    });
  }
  team.phase([&](int lane, int lanes) {
    for (int i = lane; i < n; i += lanes) {
      const T* row = a + packed_index(i, 0);
      T sum = i < count ? T(1) : T(0);
      for (int j = 0; j < i && j < count; ++j) sum += row[j] * row[j];
      row_sums[i] = sum * row[i];
    }
  });
  T total = 0;  // in a fixed order, whatever the number of lanes
  for (int i = 0; i < n; ++i) total += row_sums[i];
  return total;
}

}  // namespace reggan_ext
