// Host test of the per-system ridge math that each CUDA thread runs (ridge/ridge_math.h with
// ScalarLanes, strided storage as on the GPU): LDL^T factor and solve against a dense Gaussian
// elimination, the positive-definiteness report, and the tap offsets of the design rows; and of
// the team versions a CUDA warp runs, lane by lane, against them; and every CUDA thread's block
// of the augmented Gram (ridge/ridge_gram_block.h) against a plain loop over the design rows.
// Returns nonzero on failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "ridge/ridge_gram_block.h"
#include "ridge/ridge_math.h"

using reggan_ext::LocalGeometry;
using reggan_ext::RidgeGeometry;
using reggan_ext::packed_index;
using reggan_ext::ScalarLanes;

namespace {

int failures = 0;

void expect(bool ok, const char* what, double detail = 0) {
  if (!ok) {
    std::printf("FAILED: %s (%g)\n", what, detail);
    ++failures;
  }
}

// x = A^-1 b by Gaussian elimination with partial pivoting on a dense copy.
std::vector<double> dense_solve(std::vector<double> a, std::vector<double> b, int n) {
  for (int c = 0; c < n; ++c) {
    int pivot = c;
    for (int r = c + 1; r < n; ++r) {
      if (std::fabs(a[r * n + c]) > std::fabs(a[pivot * n + c])) pivot = r;
    }
    for (int k = 0; k < n; ++k) std::swap(a[c * n + k], a[pivot * n + k]);
    std::swap(b[c], b[pivot]);
    for (int r = c + 1; r < n; ++r) {
      const double f = a[r * n + c] / a[c * n + c];
      for (int k = c; k < n; ++k) a[r * n + k] -= f * a[c * n + k];
      b[r] -= f * b[c];
    }
  }
  for (int r = n - 1; r >= 0; --r) {
    for (int k = r + 1; k < n; ++k) b[r] -= a[r * n + k] * b[k];
    b[r] /= a[r * n + r];
  }
  return b;
}

// A random SPD matrix Z^T Z / rows (dense, n x n).
std::vector<double> random_spd(int n, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  const int rows = 2 * n + 3;
  std::vector<double> z(rows * n), a(n * n, 0.0);
  for (double& v : z) v = normal(rng);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      for (int r = 0; r < rows; ++r) a[i * n + j] += z[r * n + i] * z[r * n + j];
      a[i * n + j] /= rows;
    }
  }
  return a;
}

// Solves (A + lam P) x = b through the packed, strided storage a CUDA thread uses.
template <typename T>
int32_t packed_solve(const std::vector<double>& dense, const std::vector<double>& b, int n,
                     double lam, bool penalize_last, int64_t stride, std::vector<T>* x) {
  std::vector<T> a(n * (n + 1) / 2 * stride, T(-777)), rhs(n * stride, T(-777));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) a[packed_index(i, j) * stride] = T(dense[i * n + j]);
    rhs[i * stride] = T(b[i]);
  }
  int32_t info = 0;
  reggan_ext::ldlt_factor<ScalarLanes<T>>(a.data(), n, stride, T(lam), penalize_last,
                                          std::numeric_limits<T>::epsilon(), info);
  reggan_ext::ldlt_solve<ScalarLanes<T>>(a.data(), n, stride, rhs.data());
  x->assign(n, T(0));
  for (int i = 0; i < n; ++i) (*x)[i] = rhs[i * stride];
  return info;
}

// Runs each phase of the team functions lane after lane, in `order`. On the GPU the lanes of a
// phase run in any order: a phase that read what another of its lanes writes would give
// results that depend on the order.
struct SerialTeam {
  std::vector<int> order;
  template <class Phase>
  void phase(const Phase& f) const {
    for (const int lane : order) f(lane, int(order.size()));
  }
};

SerialTeam team_of(int lanes, bool reversed) {
  SerialTeam team;
  for (int lane = 0; lane < lanes; ++lane) team.order.push_back(lane);
  if (reversed) std::reverse(team.order.begin(), team.order.end());
  return team;
}

// Factor (packed) and solution of (A + lam P) x = b by the team functions.
template <typename T>
struct TeamResult {
  int32_t info;
  std::vector<T> factor, x;
};

template <typename T>
TeamResult<T> team_solve(SerialTeam team, const std::vector<double>& dense,
                         const std::vector<double>& b, int n, double lam, bool penalize_last) {
  TeamResult<T> r;
  r.factor.assign(n * (n + 1) / 2, T(-777));
  r.x.assign(n, T(-777));
  std::vector<T> scratch(4 * n, T(-777));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) r.factor[packed_index(i, j)] = T(dense[i * n + j]);
    r.x[i] = T(b[i]);
  }
  r.info = reggan_ext::ldlt_factor_team(team, r.factor.data(), n, T(lam), penalize_last,
                                        std::numeric_limits<T>::epsilon(), scratch.data());
  reggan_ext::ldlt_solve_team(team, r.factor.data(), n, r.x.data());
  return r;
}

template <typename T>
bool same_bits(const std::vector<T>& x, const std::vector<T>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0;
}

// max |x - y| / max |y|, or NaN where an x is NaN (std::fmax would pass over it).
template <typename T, typename U>
double relative_error(const std::vector<T>& x, const std::vector<U>& y) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double difference = std::fabs(double(x[i]) - double(y[i]));
    if (std::isnan(difference)) return difference;
    err = std::max(err, difference);
    scale = std::max(scale, std::fabs(double(y[i])));
  }
  return err / scale;
}

// The team's inverse diagonal sum on a copy of its factor.
template <typename T>
T team_inverse_diagonal_sum(SerialTeam team, std::vector<T> factor, int n, int count) {
  std::vector<T> column(n, T(-777)), row_sums(n, T(-777));
  return reggan_ext::ldlt_inverse_diagonal_sum_team(team, factor.data(), n, count,
                                                    column.data(), row_sums.data());
}

// The team factor, solve and inverse diagonal sum against ldlt_factor, ldlt_solve and
// ldlt_inverse_diagonal_sum: the same info, factor, solution and sum to rounding, and bit for
// bit the same whatever the order of the lanes in a phase.
template <typename T>
void check_team_matches_scalar(const std::vector<double>& dense, const std::vector<double>& b,
                               int n, double lam, bool penalize_last, double tol) {
  std::vector<T> factor(n * (n + 1) / 2), expected;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) factor[packed_index(i, j)] = T(dense[i * n + j]);
  }
  int32_t expected_info = 0;
  reggan_ext::ldlt_factor<ScalarLanes<T>>(factor.data(), n, 1, T(lam), penalize_last,
                                          std::numeric_limits<T>::epsilon(), expected_info);
  packed_solve(dense, b, n, lam, penalize_last, 1, &expected);
  const int count = penalize_last ? n : n - 1;
  std::vector<T> scratch(n);
  const double expected_sum = reggan_ext::ldlt_inverse_diagonal_sum<ScalarLanes<T>>(
      factor.data(), n, 1, count, scratch.data());
  for (const int lanes : {1, 3, 32}) {
    const TeamResult<T> r = team_solve<T>(team_of(lanes, false), dense, b, n, lam, penalize_last);
    const TeamResult<T> back = team_solve<T>(team_of(lanes, true), dense, b, n, lam,
                                             penalize_last);
    expect(r.info == expected_info, "team info", r.info);
    expect(relative_error(r.factor, factor) <= tol, "team factor",
           relative_error(r.factor, factor));
    expect(relative_error(r.x, expected) <= tol, "team solution", relative_error(r.x, expected));
    for (const T v : r.x) expect(std::isfinite(double(v)), "finite team solution");
    expect(back.info == r.info && same_bits(back.factor, r.factor) && same_bits(back.x, r.x),
           "team result independent of the lane order", lanes);
    const T sum = team_inverse_diagonal_sum(team_of(lanes, false), r.factor, n, count);
    const T back_sum = team_inverse_diagonal_sum(team_of(lanes, true), back.factor, n, count);
    expect(std::fabs(sum - expected_sum) <= tol * std::fabs(expected_sum),
           "team inverse diagonal sum", (sum - expected_sum) / expected_sum);
    expect(std::memcmp(&sum, &back_sum, sizeof(T)) == 0,
           "team inverse diagonal sum independent of the lane order", lanes);
  }
}

void test_team_matches_scalar() {
  std::mt19937 rng(4);
  std::normal_distribution<double> normal;
  for (const int n : {1, 2, 3, 5, 17, 26, 33, 50, 65}) {
    for (const bool penalize_last : {true, false}) {
      const std::vector<double> a = random_spd(n, rng);
      std::vector<double> b(n);
      for (double& v : b) v = normal(rng);
      check_team_matches_scalar<double>(a, b, n, 0.3, penalize_last, 1e-12);
      check_team_matches_scalar<float>(a, b, n, 0.3, penalize_last, 1e-4);
    }
  }
}

// Systems that fail: info and the finite replacement pivots as in ldlt_factor.
void test_team_info_matches_scalar() {
  std::mt19937 rng(5);
  const int n = 20;
  const std::vector<double> b(n, 1.0);
  for (const int k : {0, 1, 7, 19}) {
    std::vector<double> a = random_spd(n, rng);
    a[k * n + k] = -5;
    check_team_matches_scalar<double>(a, b, n, 0.0, true, 1e-12);
    check_team_matches_scalar<float>(a, b, n, 0.0, true, 1e-4);
  }
  std::vector<double> a = random_spd(n, rng);
  for (int i = 0; i < n; ++i) a[4 * n + i] = a[i * n + 4] = 0;  // a tap reading only padding
  check_team_matches_scalar<double>(a, b, n, 0.0, true, 1e-12);
  check_team_matches_scalar<double>(a, b, n, 1e-3, true, 1e-12);
  a[n * n - 1] = 0;  // and an unpenalized bias column of zeros
  for (int i = 0; i < n; ++i) a[(n - 1) * n + i] = a[i * n + n - 1] = 0;
  check_team_matches_scalar<double>(a, b, n, 1.0, false, 1e-12);
  a[0] = NAN;
  check_team_matches_scalar<double>(a, b, n, 1.0, true, 1e-12);
  const double eps = std::numeric_limits<double>::epsilon();
  for (const double pivot : {0.5 * 3 * eps, 3 * eps, 4 * eps}) {
    const std::vector<double> diagonal = {1, 0, 0, 0, pivot, 0, 0, 0, 1};
    check_team_matches_scalar<double>(diagonal, {1, 1, 1}, 3, 0.0, true, 0);
  }
}

void test_solve_matches_dense() {
  std::mt19937 rng(1);
  std::normal_distribution<double> normal;
  for (const int n : {1, 2, 3, 5, 8, 26, 50}) {
    for (const bool penalize_last : {true, false}) {
      const double lam = 0.3;
      std::vector<double> a = random_spd(n, rng), b(n);
      for (double& v : b) v = normal(rng);
      std::vector<double> shifted = a;
      for (int i = 0; i < n; ++i) {
        if (penalize_last || i + 1 < n) shifted[i * n + i] += lam;
      }
      const std::vector<double> expected = dense_solve(shifted, b, n);
      for (const int64_t stride : {1, 7}) {
        std::vector<double> x;
        expect(packed_solve(a, b, n, lam, penalize_last, stride, &x) == 0, "double info");
        expect(relative_error(x, expected) <= 1e-11, "double solution",
               relative_error(x, expected));
        std::vector<float> xf;
        expect(packed_solve(a, b, n, lam, penalize_last, stride, &xf) == 0, "float info");
        expect(relative_error(xf, expected) <= 1e-3, "float solution",
               relative_error(xf, expected));
      }
    }
  }
}

// sum_{j < count} [(A + lam P)^-1]_jj against the dense solve of each unit vector.
void test_inverse_diagonal_sum() {
  std::mt19937 rng(3);
  for (const int n : {1, 4, 26}) {
    for (const bool penalize_last : {true, false}) {
      const double lam = 0.7;
      const std::vector<double> a = random_spd(n, rng);
      std::vector<double> shifted = a;
      for (int i = 0; i < n; ++i) {
        if (penalize_last || i + 1 < n) shifted[i * n + i] += lam;
      }
      const int count = penalize_last ? n : n - 1;
      double expected = 0;
      for (int j = 0; j < count; ++j) {
        std::vector<double> e(n, 0.0);
        e[j] = 1;
        expected += dense_solve(shifted, e, n)[j];
      }
      const int64_t stride = 5;
      std::vector<double> packed(n * (n + 1) / 2 * stride), scratch(n * stride);
      for (int i = 0; i < n; ++i) {
        for (int j = 0; j <= i; ++j) packed[packed_index(i, j) * stride] = a[i * n + j];
      }
      int32_t info = 0;
      reggan_ext::ldlt_factor<ScalarLanes<double>>(packed.data(), n, stride, lam, penalize_last,
                                                   std::numeric_limits<double>::epsilon(), info);
      const double got = reggan_ext::ldlt_inverse_diagonal_sum<ScalarLanes<double>>(
          packed.data(), n, stride, count, scratch.data());
      expect(info == 0 && std::fabs(got - expected) <= 1e-12 * std::fabs(expected),
             "inverse diagonal sum", got - expected);
    }
  }
}

void test_info_reports_first_failing_minor() {
  std::mt19937 rng(2);
  const int n = 6;
  for (int k = 0; k < n; ++k) {
    std::vector<double> a = random_spd(n, rng), b(n, 1.0);
    a[k * n + k] = -5;  // leading minors of order <= k stay positive definite
    std::vector<double> x;
    expect(packed_solve(a, b, n, 0.0, true, 3, &x) == k + 1, "info of a negative pivot", k);
    for (double v : x) expect(std::isfinite(v), "finite despite the failure");
  }
  // A zero row (a tap that only reads padding) fails at lam = 0 and passes at lam > 0.
  std::vector<double> a = random_spd(n, rng), b(n, 1.0);
  for (int i = 0; i < n; ++i) a[2 * n + i] = a[i * n + 2] = 0;
  std::vector<double> x;
  expect(packed_solve(a, b, n, 0.0, true, 1, &x) == 3, "info of a zero row");
  expect(packed_solve(a, b, n, 1e-3, true, 1, &x) == 0, "zero row with lam > 0");
  a[0] = NAN;
  expect(packed_solve(a, b, n, 1.0, true, 1, &x) == 1, "info of NaN");
  // The threshold: a pivot at or below n * eps * (largest diagonal entry) fails, one above passes.
  const double eps = std::numeric_limits<double>::epsilon();
  for (const double pivot : {0.5 * 3 * eps, 3 * eps, 4 * eps, 1e-12}) {
    const std::vector<double> diagonal = {1, 0, 0, 0, pivot, 0, 0, 0, 1};
    const std::vector<double> ones(3, 1.0);
    const int32_t expected = pivot <= 3 * eps ? 2 : 0;
    expect(packed_solve(diagonal, ones, 3, 0.0, true, 1, &x) == expected, "pivot threshold",
           pivot);
  }
}

void test_tap_offsets() {
  LocalGeometry g{};
  g.batch = 1;
  g.in_channels = 4;
  g.in_height = 5;
  g.in_width = 7;
  g.out_channels = 2;
  g.groups = 2;
  g.kernel_h = 2;
  g.kernel_w = 3;
  g.stride_h = 2;
  g.stride_w = 1;
  g.pad_h = 1;
  g.pad_w = 2;
  g.dilation_h = 2;
  g.dilation_w = 1;
  g.out_height = (g.in_height + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_width = (g.in_width + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  const int64_t c0 = 2;  // second group
  for (int64_t i = 0; i < g.out_height; ++i) {
    for (int64_t j = 0; j < g.out_width; ++j) {
      int64_t a = 0;
      for (int64_t c = 0; c < g.in_channels / g.groups; ++c) {
        for (int64_t u = 0; u < g.kernel_h; ++u) {
          for (int64_t v = 0; v < g.kernel_w; ++v, ++a) {
            const int64_t row = i * g.stride_h - g.pad_h + u * g.dilation_h;
            const int64_t col = j * g.stride_w - g.pad_w + v * g.dilation_w;
            const bool inside = row >= 0 && row < g.in_height && col >= 0 && col < g.in_width;
            const int64_t expected =
                inside ? ((c0 + c) * g.in_height + row) * g.in_width + col : -1;
            expect(reggan_ext::tap_offset(g, c0, a, i, j) == expected, "tap offset",
                   double(a));
          }
        }
      }
    }
  }
}

void test_packed_index() {
  int64_t k = 0;
  for (int64_t i = 0; i < 9; ++i) {
    for (int64_t j = 0; j <= i; ++j, ++k) expect(packed_index(i, j) == k, "packed index");
  }
}

LocalGeometry small_layer(int64_t batch, int64_t in_channels, int64_t out_channels, int64_t groups,
                          int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  LocalGeometry g{};
  g.batch = batch;
  g.in_channels = in_channels;
  g.in_height = 6;
  g.in_width = 5;
  g.out_channels = out_channels;
  g.groups = groups;
  g.kernel_h = kernel;
  g.kernel_w = kernel == 1 ? 1 : kernel - 1;
  g.stride_h = stride;
  g.stride_w = 1;
  g.pad_h = pad;
  g.pad_w = pad + 1;
  g.dilation_h = dilation;
  g.dilation_w = 1;
  g.out_height = (g.in_height + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_width = (g.in_width + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  return g;
}

// Runs every thread of the CUDA grid (pixel, block, group) on the host and compares the
// statistics with sums over the design rows built straight from the geometry. Small integer
// inputs keep every sum exact, whatever its order: they must agree to the bit, each statistic
// added once onto its starting value.
template <int Tile, typename in_t, typename acc_t>
void check_gram_blocks(const RidgeGeometry& rg, std::mt19937& rng) {
  const LocalGeometry& g = rg.layer;
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<in_t> x(g.batch * g.in_channels * g.in_plane()),
      y(g.batch * g.out_channels * g.out_plane());
  for (in_t& v : x) v = in_t(small(rng));
  for (in_t& v : y) v = in_t(small(rng));
  const int64_t d = rg.unknowns(), opg = g.out_per_group(), pixels = g.out_plane();
  const acc_t start = 100;
  std::vector<acc_t> gram(g.groups * rg.packed_size() * pixels, start),
      cross(g.out_channels * d * pixels, start), target_sq(g.out_channels * pixels, start);
  const in_t zero_one[2] = {0, 1};
  const auto launch = [&](auto diagonal) {
    constexpr bool kDiagonal = decltype(diagonal)::value;
    for (int64_t group = 0; group < g.groups; ++group) {
      for (int64_t index = 0; index < reggan_ext::gram_block_count<Tile, kDiagonal>(rg);
           ++index) {
        for (int64_t p = 0; p < pixels; ++p) {
          reggan_ext::accumulate_gram_block<Tile, kDiagonal>(
              x.data(), y.data(), zero_one, gram.data(), cross.data(), target_sq.data(), rg,
              group, reggan_ext::gram_block<kDiagonal>(index), p);
        }
      }
    }
  };
  launch(std::true_type{});
  launch(std::false_type{});
  bool ok = true;
  std::vector<double> row(d + opg);
  std::vector<double> expected_gram(gram.size(), start), expected_cross(cross.size(), start),
      expected_target_sq(target_sq.size(), start);
  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t group = 0; group < g.groups; ++group) {
      for (int64_t i = 0; i < g.out_height; ++i) {
        for (int64_t j = 0; j < g.out_width; ++j) {
          const int64_t p = i * g.out_width + j;
          int64_t a = 0;
          for (int64_t c = 0; c < g.in_per_group(); ++c) {
            for (int64_t u = 0; u < g.kernel_h; ++u) {
              for (int64_t v = 0; v < g.kernel_w; ++v, ++a) {
                const int64_t r = i * g.stride_h - g.pad_h + u * g.dilation_h;
                const int64_t s = j * g.stride_w - g.pad_w + v * g.dilation_w;
                const int64_t channel = group * g.in_per_group() + c;
                const bool inside = r >= 0 && r < g.in_height && s >= 0 && s < g.in_width;
                row[a] = inside ? double(x[((n * g.in_channels + channel) * g.in_height + r) *
                                               g.in_width + s])
                                : 0.0;
              }
            }
          }
          if (rg.bias) row[a] = 1;
          for (int64_t o = 0; o < opg; ++o) {
            row[d + o] = double(y[(n * g.out_channels + group * opg + o) * pixels + p]);
          }
          for (int64_t b = 0; b < d; ++b) {
            for (int64_t a2 = 0; a2 <= b; ++a2) {
              expected_gram[(group * rg.packed_size() + packed_index(b, a2)) * pixels + p] +=
                  row[a2] * row[b];
            }
          }
          for (int64_t o = 0; o < opg; ++o) {
            const int64_t out = group * opg + o;
            for (int64_t a2 = 0; a2 < d; ++a2) {
              expected_cross[(out * d + a2) * pixels + p] += row[a2] * row[d + o];
            }
            expected_target_sq[out * pixels + p] += row[d + o] * row[d + o];
          }
        }
      }
    }
  }
  for (size_t k = 0; k < gram.size(); ++k) ok = ok && double(gram[k]) == expected_gram[k];
  for (size_t k = 0; k < cross.size(); ++k) ok = ok && double(cross[k]) == expected_cross[k];
  for (size_t k = 0; k < target_sq.size(); ++k) {
    ok = ok && double(target_sq[k]) == expected_target_sq[k];
  }
  expect(ok, "Gram blocks against the design rows", double(Tile));
}

void test_gram_blocks() {
  std::mt19937 rng(5);
  // (batch, C_in, C_out, groups, kernel, stride, padding, dilation), bias: grouped, strided,
  // dilated and padded; design rows (with the outputs) of 4, 8, 11, 15, 16 and 41 entries.
  const RidgeGeometry geometries[] = {
      {small_layer(3, 4, 6, 2, 3, 2, 1, 2), true},  {small_layer(2, 3, 3, 3, 3, 1, 1, 1), true},
      {small_layer(4, 2, 1, 1, 5, 1, 2, 1), false}, {small_layer(3, 1, 3, 1, 1, 1, 0, 1), false},
      {small_layer(1, 2, 4, 2, 4, 3, 0, 1), true},  {small_layer(2, 2, 6, 1, 2, 1, 1, 1), true}};
  for (const RidgeGeometry& rg : geometries) {
    check_gram_blocks<4, float, double>(rg, rng);
    check_gram_blocks<8, float, double>(rg, rng);
    check_gram_blocks<11, float, double>(rg, rng);
    check_gram_blocks<4, double, double>(rg, rng);
    check_gram_blocks<8, double, double>(rg, rng);
    check_gram_blocks<11, double, double>(rg, rng);
    check_gram_blocks<4, float, float>(rg, rng);
    check_gram_blocks<8, float, float>(rg, rng);
    check_gram_blocks<11, float, float>(rg, rng);
  }
}

}  // namespace

int main() {
  test_packed_index();
  test_tap_offsets();
  test_gram_blocks();
  test_solve_matches_dense();
  test_inverse_diagonal_sum();
  test_info_reports_first_failing_minor();
  test_team_matches_scalar();
  test_team_info_matches_scalar();
  if (failures == 0) std::printf("test_ridge_math: all passed\n");
  return failures == 0 ? 0 : 1;
}
