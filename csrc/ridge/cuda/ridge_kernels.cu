// CUDA kernels of the ridge ops: a thread per output pixel, so that consecutive threads read
// consecutive input columns and write consecutive statistics (pixel index last): every access
// is coalesced. Each statistic is written by one thread that sums the batch in order, without
// atomics: the result is deterministic. The larger systems are solved by a warp each instead
// (solve_team_kernel, inverse_trace_team_kernel). The per-system math is ridge_math.h's, shared
// with the CPU kernels.
#include <cuda_runtime.h>

#include <algorithm>
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

// The thread kernels factor in place: copies system (group, p) of gram to work and returns
// it there, entry k at [k * pixels].
template <typename acc_t>
__device__ acc_t* copy_system(const acc_t* __restrict__ gram, acc_t* __restrict__ work,
                              int64_t d, int64_t pixels, int64_t group, int64_t p) {
  const int64_t packed = d * (d + 1) / 2, first = group * packed * pixels + p;
  for (int64_t k = 0; k < packed; ++k) work[first + k * pixels] = gram[first + k * pixels];
  return work + first;
}

// Thread per system (blockIdx.y = group): the factor stays in `work` with the pixel index
// last, so that the warp's accesses to any one entry are coalesced.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    solve_kernel(const acc_t* __restrict__ gram, acc_t* __restrict__ work,
                 acc_t* __restrict__ solution, const acc_t* __restrict__ lam,
                 int32_t* __restrict__ info, int64_t d, int64_t out_per_group, int64_t pixels,
                 bool penalize_last, double eps) {
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (p >= pixels) return;
  const int64_t group = blockIdx.y;
  acc_t* a = copy_system(gram, work, d, pixels, group, p);
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
    inverse_trace_kernel(const acc_t* __restrict__ gram, acc_t* __restrict__ work,
                         acc_t* __restrict__ scratch, const acc_t* __restrict__ lam,
                         acc_t* __restrict__ trace, int32_t* __restrict__ info, int64_t d,
                         int64_t pixels, bool penalize_last, double eps) {
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (p >= pixels) return;
  const int64_t group = blockIdx.y;
  acc_t* a = copy_system(gram, work, d, pixels, group, p);
  const acc_t shift = lam[group * pixels + p];
  int32_t failed = 0;
  ldlt_factor<ScalarLanes<acc_t>>(a, d, pixels, shift, penalize_last, eps, failed);
  trace[group * pixels + p] = ldlt_inverse_diagonal_sum<ScalarLanes<acc_t>>(
      a, d, pixels, penalize_last ? d : d - 1, scratch + group * d * pixels + p);
  info[group * pixels + p] = failed;
}

// A warp per system for the larger systems, whose factor a thread would stream through global
// memory: the block's systems are consecutive pixels, staged whole in shared memory, then each
// warp factors and solves its own with ridge_math.h's team functions.
constexpr int kWarp = 32;
constexpr int kTeamMinUnknowns = 17;
constexpr int kSectorBytes = 32;
constexpr size_t kTeamSharedBytes = 48 * 1024;  // the default limit of a block

struct WarpTeam {
  int lane;
  template <class Phase>
  __device__ void phase(const Phase& f) const {
    f(lane, kWarp);
    __syncwarp();
  }
};

// Shared memory of one system: the packed matrix, then scratch of 4 n entries.
size_t team_bytes_per_system(int64_t d, size_t entry_bytes) {
  return size_t(d * (d + 1) / 2 + 4 * d) * entry_bytes;
}

// This warp's system in shared memory, pixel blockIdx.x * blockDim.y + threadIdx.y of group
// blockIdx.y (a block holds blockDim.y systems of consecutive pixels).
template <typename acc_t>
struct TeamSystem {
  int64_t group, pixel;
  acc_t *a, *scratch;
};

// Stages the block's systems in shared memory, the whole block taking part.
template <typename acc_t>
__device__ TeamSystem<acc_t> stage_team_systems(const acc_t* __restrict__ gram, int d,
                                                int64_t pixels) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int systems = blockDim.y, packed = d * (d + 1) / 2;
  const int64_t first = blockIdx.x * int64_t(systems), group = blockIdx.y;
  // Consecutive threads read one entry of consecutive pixels: a sector holds the block's entry.
  for (int k = threadIdx.y * kWarp + threadIdx.x; k < packed * systems; k += systems * kWarp) {
    const int entry = k / systems, s = k % systems;
    if (first + s < pixels) {
      shared[s * packed + entry] = gram[(group * packed + entry) * pixels + first + s];
    }
  }
  __syncthreads();
  return {group, first + threadIdx.y, shared + threadIdx.y * packed,
          shared + systems * packed + threadIdx.y * 4 * d};
}

template <typename acc_t>
__global__ void solve_team_kernel(const acc_t* __restrict__ gram, acc_t* __restrict__ solution,
                                  const acc_t* __restrict__ lam, int32_t* __restrict__ info,
                                  int d, int64_t out_per_group, int64_t pixels,
                                  bool penalize_last, double eps) {
  const TeamSystem<acc_t> s = stage_team_systems(gram, d, pixels);
  if (s.pixel >= pixels) return;
  WarpTeam team{int(threadIdx.x)};
  const int32_t failed = ldlt_factor_team(team, s.a, d, lam[s.group * pixels + s.pixel],
                                          penalize_last, eps, s.scratch);
  acc_t* b = s.scratch;
  for (int64_t o = 0; o < out_per_group; ++o) {
    acc_t* x = solution + (s.group * out_per_group + o) * d * pixels + s.pixel;
    team.phase([&](int lane, int lanes) {
      for (int i = lane; i < d; i += lanes) b[i] = x[i * pixels];
    });
    ldlt_solve_team(team, s.a, d, b);
    // Each lane stores the entries it loads for the next right-hand side: no race on b.
    for (int i = threadIdx.x; i < d; i += kWarp) x[i * pixels] = b[i];
  }
  if (threadIdx.x == 0) info[s.group * pixels + s.pixel] = failed;
}

template <typename acc_t>
__global__ void inverse_trace_team_kernel(const acc_t* __restrict__ gram,
                                          const acc_t* __restrict__ lam,
                                          acc_t* __restrict__ trace, int32_t* __restrict__ info,
                                          int d, int64_t pixels, bool penalize_last,
                                          double eps) {
  const TeamSystem<acc_t> s = stage_team_systems(gram, d, pixels);
  if (s.pixel >= pixels) return;
  WarpTeam team{int(threadIdx.x)};
  const int64_t at = s.group * pixels + s.pixel;
  const int32_t failed = ldlt_factor_team(team, s.a, d, lam[at], penalize_last, eps, s.scratch);
  const acc_t sum = ldlt_inverse_diagonal_sum_team(team, s.a, d, penalize_last ? d : d - 1,
                                                   s.scratch, s.scratch + d);
  if (threadIdx.x == 0) {
    trace[at] = sum;
    info[at] = failed;
  }
}

// Systems per block of the team kernels, or 0 where a thread per system serves better: as many
// as fill a sector with one entry of each, if they fit.
int64_t team_systems(int64_t unknowns, size_t entry_bytes) {
  if (unknowns < kTeamMinUnknowns) return 0;
  return std::min<int64_t>(kSectorBytes / entry_bytes,
                           kTeamSharedBytes / team_bytes_per_system(unknowns, entry_bytes));
}

dim3 team_grid(int64_t pixels, int64_t systems, int64_t groups) {
  return dim3(static_cast<unsigned int>((pixels + systems - 1) / systems),
              static_cast<unsigned int>(groups));
}

dim3 team_block(int64_t systems) { return dim3(kWarp, static_cast<unsigned int>(systems)); }

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
cudaError_t launch_ridge_solve(const acc_t* gram, acc_t* work, acc_t* solution,
                               const acc_t* lam, int32_t* info, int64_t groups,
                               int64_t unknowns, int64_t out_per_group, int64_t pixels,
                               bool penalize_last, cudaStream_t stream) {
  if (pixels == 0) return cudaSuccess;
  if (groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const int64_t systems = team_systems(unknowns, sizeof(acc_t));
  if (systems > 0) {
    solve_team_kernel<acc_t><<<team_grid(pixels, systems, groups), team_block(systems),
                               systems * team_bytes_per_system(unknowns, sizeof(acc_t)),
                               stream>>>(gram, solution, lam, info, static_cast<int>(unknowns),
                                         out_per_group, pixels, penalize_last,
                                         std::numeric_limits<acc_t>::epsilon());
    return cudaGetLastError();
  }
  const dim3 grid(pixel_blocks(pixels), static_cast<unsigned int>(groups));
  solve_kernel<acc_t><<<grid, kThreads, 0, stream>>>(gram, work, solution, lam, info, unknowns,
                                                     out_per_group, pixels, penalize_last,
                                                     std::numeric_limits<acc_t>::epsilon());
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_ridge_inverse_trace(const acc_t* gram, acc_t* work, acc_t* scratch,
                                       const acc_t* lam, acc_t* trace, int32_t* info,
                                       int64_t groups, int64_t unknowns, int64_t pixels,
                                       bool penalize_last, cudaStream_t stream) {
  if (pixels == 0) return cudaSuccess;
  if (groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const int64_t systems = team_systems(unknowns, sizeof(acc_t));
  if (systems > 0) {
    inverse_trace_team_kernel<acc_t><<<team_grid(pixels, systems, groups), team_block(systems),
                                       systems * team_bytes_per_system(unknowns, sizeof(acc_t)),
                                       stream>>>(gram, lam, trace, info,
                                                 static_cast<int>(unknowns), pixels,
                                                 penalize_last,
                                                 std::numeric_limits<acc_t>::epsilon());
    return cudaGetLastError();
  }
  const dim3 grid(pixel_blocks(pixels), static_cast<unsigned int>(groups));
  inverse_trace_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
      gram, work, scratch, lam, trace, info, unknowns, pixels, penalize_last,
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
template cudaError_t launch_ridge_solve<float>(const float*, float*, float*, const float*,
                                               int32_t*, int64_t, int64_t, int64_t, int64_t, bool,
                                               cudaStream_t);
template cudaError_t launch_ridge_solve<double>(const double*, double*, double*, const double*,
                                                int32_t*, int64_t, int64_t, int64_t, int64_t, bool,
                                                cudaStream_t);

template cudaError_t launch_ridge_inverse_trace<float>(const float*, float*, float*,
                                                       const float*, float*, int32_t*, int64_t,
                                                       int64_t, int64_t, bool, cudaStream_t);
template cudaError_t launch_ridge_inverse_trace<double>(const double*, double*, double*,
                                                        const double*, double*, int32_t*,
                                                        int64_t, int64_t, int64_t, bool,
                                                        cudaStream_t);

}  // namespace reggan_ext
