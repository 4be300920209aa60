// CUDA kernels of the ridge ops: a thread per output pixel, so that consecutive threads read
// consecutive input columns and write consecutive statistics (pixel index last): every access
// is coalesced. Each statistic is written by one thread that sums the batch in order, without
// atomics: the result is deterministic. The per-system math is ridge_math.h's, shared with the
// CPU kernels.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "ridge/cuda/ridge_kernels.cuh"
#include "ridge/ridge_math.h"

namespace reggan_ext {
namespace {

constexpr int kThreads = 128;
// Side of the block of the augmented Gram a thread keeps in registers across the batch.
constexpr int kTile = 4;
constexpr int64_t kMaxGridYZ = 65535;

// Where row `row` of pixel (i, j)'s augmented design row [z, y of the group's outputs] comes
// from: base[n * sample_stride] for sample n, or `constant` when base is null (1 for the bias,
// 0 for zero padding and for the rows that pad the last tile).
template <typename in_t>
struct RowSource {
  const in_t* base;
  int64_t sample_stride;
  float constant;
};

template <typename in_t>
__device__ RowSource<in_t> row_source(const in_t* x, const in_t* y, const RidgeGeometry& rg,
                                      int64_t group, int64_t row, int64_t i, int64_t j) {
  const LocalGeometry& g = rg.layer;
  const int64_t taps = rg.taps(), d = rg.unknowns();
  if (row < taps) {
    const int64_t offset = tap_offset(g, group * g.in_per_group(), row, i, j);
    if (offset < 0) return {nullptr, 0, 0.f};
    return {x + offset, g.in_channels * g.in_plane(), 0.f};
  }
  if (row < d) return {nullptr, 0, 1.f};
  if (row < d + g.out_per_group()) {
    const int64_t o = group * g.out_per_group() + (row - d);
    return {y + (o * g.out_height + i) * g.out_width + j, g.out_channels * g.out_plane(), 0.f};
  }
  return {nullptr, 0, 0.f};
}

template <typename in_t, typename acc_t>
__device__ acc_t read(const RowSource<in_t>& s, int64_t n) {
  return s.base != nullptr ? acc_t(s.base[n * s.sample_stride]) : acc_t(s.constant);
}

// Block (blockIdx.x, blockIdx.y = packed_index(tb, ta), blockIdx.z = group): kThreads pixels
// times the kTile x kTile block (ta, tb), ta <= tb, of the augmented Gram.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const in_t* __restrict__ x, const in_t* __restrict__ y,
                      acc_t* __restrict__ gram, acc_t* __restrict__ cross,
                      acc_t* __restrict__ target_sq, RidgeGeometry rg) {
  const LocalGeometry& g = rg.layer;
  const int64_t pixels = g.out_plane();
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (p >= pixels) return;
  const int64_t group = blockIdx.z;
  int64_t tb = 0;
  while (packed_index(tb + 1, 0) <= int64_t(blockIdx.y)) ++tb;
  const int64_t ta = blockIdx.y - packed_index(tb, 0);
  const int64_t i = p / g.out_width, j = p % g.out_width;
  RowSource<in_t> a_source[kTile], b_source[kTile];
  for (int r = 0; r < kTile; ++r) {
    a_source[r] = row_source(x, y, rg, group, ta * kTile + r, i, j);
    b_source[r] = row_source(x, y, rg, group, tb * kTile + r, i, j);
  }
  acc_t acc[kTile][kTile] = {};
  for (int64_t n = 0; n < g.batch; ++n) {
    acc_t a[kTile], b[kTile];
    for (int r = 0; r < kTile; ++r) {
      a[r] = read<in_t, acc_t>(a_source[r], n);
      b[r] = read<in_t, acc_t>(b_source[r], n);
    }
    for (int r = 0; r < kTile; ++r) {
      for (int q = 0; q < kTile; ++q) acc[r][q] += a[r] * b[q];
    }
  }
  // Entry (a, b) of the augmented Gram: G for b < d, R for a < d <= b, y^2 for a = b >= d.
  const int64_t d = rg.unknowns(), out_per_group = g.out_per_group();
  const int64_t rows = d + out_per_group, packed = rg.packed_size();
  for (int r = 0; r < kTile; ++r) {
    for (int q = 0; q < kTile; ++q) {
      const int64_t a = ta * kTile + r, b = tb * kTile + q;
      if (a > b || b >= rows) continue;
      if (b < d) {
        gram[(group * packed + packed_index(b, a)) * pixels + p] += acc[r][q];
      } else if (a < d) {
        cross[((group * out_per_group + b - d) * d + a) * pixels + p] += acc[r][q];
      } else if (a == b) {
        target_sq[(group * out_per_group + a - d) * pixels + p] += acc[r][q];
      }
    }
  }
}

// Thread per system (blockIdx.y = group): the factor stays in `work` with the pixel index
// last, so that the warp's accesses to any one entry are coalesced.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    solve_kernel(acc_t* __restrict__ work, acc_t* __restrict__ solution,
                 const acc_t* __restrict__ lam, int32_t* __restrict__ info, int64_t d,
                 int64_t out_per_group, int64_t pixels, bool penalize_last, double eps) {
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (p >= pixels) return;
  const int64_t group = blockIdx.y;
  acc_t* a = work + group * (d * (d + 1) / 2) * pixels + p;
  const acc_t shift = lam[group * pixels + p];
  int32_t failed = 0;
  ldlt_factor<ScalarLanes<acc_t>>(a, d, pixels, shift, penalize_last, eps, failed);
  for (int64_t o = 0; o < out_per_group; ++o) {
    ldlt_solve<ScalarLanes<acc_t>>(a, d, pixels,
                                   solution + (group * out_per_group + o) * d * pixels + p);
  }
  info[group * pixels + p] = failed;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    inverse_trace_kernel(acc_t* __restrict__ work, acc_t* __restrict__ scratch,
                         const acc_t* __restrict__ lam, acc_t* __restrict__ trace,
                         int32_t* __restrict__ info, int64_t d, int64_t pixels,
                         bool penalize_last, double eps) {
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (p >= pixels) return;
  const int64_t group = blockIdx.y;
  acc_t* a = work + group * (d * (d + 1) / 2) * pixels + p;
  const acc_t shift = lam[group * pixels + p];
  int32_t failed = 0;
  ldlt_factor<ScalarLanes<acc_t>>(a, d, pixels, shift, penalize_last, eps, failed);
  trace[group * pixels + p] = ldlt_inverse_diagonal_sum<ScalarLanes<acc_t>>(
      a, d, pixels, penalize_last ? d : d - 1, scratch + group * d * pixels + p);
  info[group * pixels + p] = failed;
}

unsigned int pixel_blocks(int64_t pixels) {
  return static_cast<unsigned int>((pixels + kThreads - 1) / kThreads);
}

}  // namespace

template <typename in_t, typename acc_t>
cudaError_t launch_ridge_accumulate(const in_t* input, const in_t* target, acc_t* gram,
                                    acc_t* cross, acc_t* target_sq, const RidgeGeometry& rg,
                                    cudaStream_t stream) {
  const LocalGeometry& g = rg.layer;
  if (g.batch == 0 || g.out_plane() == 0) return cudaSuccess;
  const int64_t blocks = (rg.unknowns() + g.out_per_group() + kTile - 1) / kTile;
  const int64_t tiles = blocks * (blocks + 1) / 2;
  if (tiles > kMaxGridYZ || g.groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(pixel_blocks(g.out_plane()), static_cast<unsigned int>(tiles),
                  static_cast<unsigned int>(g.groups));
  accumulate_kernel<in_t, acc_t><<<grid, kThreads, 0, stream>>>(input, target, gram, cross,
                                                                 target_sq, rg);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_ridge_solve(acc_t* work, acc_t* solution, const acc_t* lam, int32_t* info,
                               int64_t groups, int64_t unknowns, int64_t out_per_group,
                               int64_t pixels, bool penalize_last, cudaStream_t stream) {
  if (pixels == 0) return cudaSuccess;
  if (groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(pixel_blocks(pixels), static_cast<unsigned int>(groups));
  solve_kernel<acc_t><<<grid, kThreads, 0, stream>>>(work, solution, lam, info, unknowns,
                                                     out_per_group, pixels, penalize_last,
                                                     std::numeric_limits<acc_t>::epsilon());
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_ridge_inverse_trace(acc_t* work, acc_t* scratch, const acc_t* lam,
                                       acc_t* trace, int32_t* info, int64_t groups,
                                       int64_t unknowns, int64_t pixels, bool penalize_last,
                                       cudaStream_t stream) {
  if (pixels == 0) return cudaSuccess;
  if (groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(pixel_blocks(pixels), static_cast<unsigned int>(groups));
  inverse_trace_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
      work, scratch, lam, trace, info, unknowns, pixels, penalize_last,
      std::numeric_limits<acc_t>::epsilon());
  return cudaGetLastError();
}

template cudaError_t launch_ridge_accumulate<float, double>(const float*, const float*, double*,
                                                            double*, double*,
                                                            const RidgeGeometry&, cudaStream_t);
template cudaError_t launch_ridge_accumulate<double, double>(const double*, const double*,
                                                             double*, double*, double*,
                                                             const RidgeGeometry&, cudaStream_t);
template cudaError_t launch_ridge_accumulate<float, float>(const float*, const float*, float*,
                                                           float*, float*, const RidgeGeometry&,
                                                           cudaStream_t);
template cudaError_t launch_ridge_solve<float>(float*, float*, const float*, int32_t*, int64_t,
                                               int64_t, int64_t, int64_t, bool, cudaStream_t);
template cudaError_t launch_ridge_solve<double>(double*, double*, const double*, int32_t*,
                                                int64_t, int64_t, int64_t, int64_t, bool,
                                                cudaStream_t);

template cudaError_t launch_ridge_inverse_trace<float>(float*, float*, const float*, float*,
                                                       int32_t*, int64_t, int64_t, int64_t, bool,
                                                       cudaStream_t);
template cudaError_t launch_ridge_inverse_trace<double>(double*, double*, const double*, double*,
                                                        int32_t*, int64_t, int64_t, int64_t,
                                                        bool, cudaStream_t);

}  // namespace reggan_ext
