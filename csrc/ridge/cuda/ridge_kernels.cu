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
#include "ridge/ridge_gram_block.h"
#include "ridge/ridge_math.h"

namespace reggan_ext {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridYZ = 65535;

// The constant rows' source (ridge_gram_block.h): 0 for padding, 1 for the bias.
template <typename in_t>
__device__ const in_t kZeroOne[2] = {in_t(0), in_t(1)};

// CUDA block (blockIdx.x, blockIdx.y, blockIdx.z = group): kThreads pixels, each adding block
// gram_block<Diagonal>(blockIdx.y) of its augmented Gram.
template <int Tile, bool Diagonal, typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const in_t* __restrict__ x, const in_t* __restrict__ y,
                      acc_t* __restrict__ gram, acc_t* __restrict__ cross,
                      acc_t* __restrict__ target_sq, RidgeGeometry rg) {
  const int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (p >= rg.pixels()) return;
  accumulate_gram_block<Tile, Diagonal>(x, y, kZeroOne<in_t>, gram, cross, target_sq, rg,
                                        blockIdx.z, gram_block<Diagonal>(blockIdx.y), p);
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

template <int Tile, bool Diagonal, typename in_t, typename acc_t>
cudaError_t launch_gram_blocks(const in_t* input, const in_t* target, acc_t* gram, acc_t* cross,
                               acc_t* target_sq, const RidgeGeometry& rg, cudaStream_t stream) {
  const int64_t blocks = gram_block_count<Tile, Diagonal>(rg);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(pixel_blocks(rg.pixels()), static_cast<unsigned int>(blocks),
                  static_cast<unsigned int>(rg.layer.groups));
  accumulate_kernel<Tile, Diagonal, in_t, acc_t>
      <<<grid, kThreads, 0, stream>>>(input, target, gram, cross, target_sq, rg);
  return cudaGetLastError();
}

}  // namespace

bool ridge_factors_in_global_memory(int64_t unknowns, size_t entry_bytes) {
  return team_systems(unknowns, entry_bytes) == 0;
}

template <typename in_t, typename acc_t>
cudaError_t launch_ridge_accumulate(const in_t* input, const in_t* target, acc_t* gram,
                                    acc_t* cross, acc_t* target_sq, const RidgeGeometry& rg,
                                    cudaStream_t stream) {
  const LocalGeometry& g = rg.layer;
  if (g.batch == 0 || g.out_plane() == 0) return cudaSuccess;
  if (g.groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  // A design row of up to 11 entries fits one diagonal block: each value loaded feeds up to 11
  // multiply-adds. Longer rows take 8 x 8 blocks, 16 loads per 64 multiply-adds (8 per 36 on
  // the diagonal); larger blocks would spill the float64 accumulators.
  const int64_t rows = rg.unknowns() + g.out_per_group();
  if (rows <= 4) {
    return launch_gram_blocks<4, true>(input, target, gram, cross, target_sq, rg, stream);
  }
  if (rows <= 11) {
    return launch_gram_blocks<11, true>(input, target, gram, cross, target_sq, rg, stream);
  }
  if (gram_block_count<8, false>(rg) > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const cudaError_t error =
      launch_gram_blocks<8, true>(input, target, gram, cross, target_sq, rg, stream);
  if (error != cudaSuccess) return error;
  return launch_gram_blocks<8, false>(input, target, gram, cross, target_sq, rg, stream);
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
