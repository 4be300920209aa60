// CUDA kernels of local_regression: thin grid-stride loops over the per-thread functions of
// local_regression_elementwise.h, which document how threads map to work and which a C++ test
// runs on the host. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "local_regression/cuda/local_regression_kernels.cuh"
#include "local_regression/local_regression_elementwise.h"

namespace reggan_ext {
namespace {

constexpr int kBlock = 256;
// Grid-stride loops cover any size; this cap keeps the grid within CUDA's limit and the stride
// of the 32-bit path far from overflow.
constexpr int64_t kMaxBlocks = 1 << 20;
// Resident blocks per SM the kernels are compiled for: two (at most 128 registers a thread) on
// the common path, 32-bit indices and unit column steps, whose register tiles fit in that; one
// elsewhere, where a cap of 128 registers would spill.
template <bool kUnitColumns, typename index_t>
constexpr int kMinBlocks = kUnitColumns && sizeof(index_t) == 4 ? 2 : 1;

template <int kCols, bool kUnitColumns, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                   const LocalGeometry g, index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    forward_thread<kCols, kUnitColumns>(x, w, bias, y, g, e);
  }
}

template <int kCols, bool kUnitColumns, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    backward_input_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ w,
                          scalar_t* __restrict__ grad_x, const LocalGeometry g, index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    backward_input_thread<kCols, kUnitColumns>(grad_y, w, grad_x, g, e);
  }
}

template <int kCols, bool kUnitColumns, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    backward_weight_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ grad_w, const LocalGeometry g,
                           index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    backward_weight_thread<kCols, kUnitColumns>(grad_y, x, grad_w, g, e);
  }
}

// Each kernel's thread count and instances, for launch.
template <typename scalar_t>
struct Forward {
  template <int kCols>
  static int64_t threads(const LocalGeometry& g) {
    return forward_threads<kCols, scalar_t>(g);
  }
  template <int kCols, bool kUnitColumns, typename index_t>
  static auto kernel() {
    return forward_kernel<kCols, kUnitColumns, scalar_t, index_t>;
  }
};
template <typename scalar_t>
struct BackwardInput {
  template <int kCols>
  static int64_t threads(const LocalGeometry& g) {
    return backward_input_threads<kCols, scalar_t>(g);
  }
  template <int kCols, bool kUnitColumns, typename index_t>
  static auto kernel() {
    return backward_input_kernel<kCols, kUnitColumns, scalar_t, index_t>;
  }
};
template <typename scalar_t>
struct BackwardWeight {
  template <int kCols>
  static int64_t threads(const LocalGeometry& g) {
    return backward_weight_threads<kCols>(g);
  }
  template <int kCols, bool kUnitColumns, typename index_t>
  static auto kernel() {
    return backward_weight_kernel<kCols, kUnitColumns, scalar_t, index_t>;
  }
};

int64_t grid_blocks(int64_t threads) {
  const int64_t blocks = (threads + kBlock - 1) / kBlock;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

// Fewest threads a register-blocked grid (kCols = kColumns) needs: SMs * 1024, two waves of its
// at most two resident 256-thread blocks per SM (the kCols = 1 grid, 4x that, would fill every
// SM's 2048 thread slots twice). Smaller grids leave SMs idle or short of warps to hide latency,
// which costs more than blocking saves; they take kCols = 1. Set for H100/H200-class GPUs (132
// SMs: 135,168 threads); one H200 run so far (README), not a sweep of the threshold.
cudaError_t min_blocked_threads(int64_t* threads) {
  int device = 0, sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  *threads = static_cast<int64_t>(sms) * 1024;
  return status;
}

// Launches Kernel's instance for the geometry: unit column steps (unit_columns(g)) or general;
// int32_t indices when every index fits in 32 bits (cheaper address and index math), else
// int64_t; kCols = 1 for grids below min_blocked_threads, else kColumns. Only the 32-bit path
// has kCols = 1: 64-bit indices come with tensors of over 2^30 elements, whose grids are large.
template <typename Kernel, typename... Args>
cudaError_t launch(const LocalGeometry& g, cudaStream_t stream, Args... args) {
  const int64_t threads = Kernel::template threads<kColumns>(g);
  if (threads <= 0) return cudaSuccess;
  const bool unit = unit_columns(g);
  const int64_t blocks = grid_blocks(threads);
  if (fits_int32(g) && threads + blocks * kBlock <= INT32_MAX) {
    int64_t min_threads = 0;
    const cudaError_t status = min_blocked_threads(&min_threads);
    if (status != cudaSuccess) return status;
    if (threads < min_threads) {
      // At most 4x min_threads: far within int32_t.
      const int64_t narrow = Kernel::template threads<1>(g);
      (unit ? Kernel::template kernel<1, true, int32_t>()
            : Kernel::template kernel<1, false, int32_t>())<<<
          static_cast<unsigned>(grid_blocks(narrow)), kBlock, 0, stream>>>(
          args..., g, static_cast<int32_t>(narrow));
    } else {
      (unit ? Kernel::template kernel<kColumns, true, int32_t>()
            : Kernel::template kernel<kColumns, false, int32_t>())<<<
          static_cast<unsigned>(blocks), kBlock, 0, stream>>>(args..., g,
                                                              static_cast<int32_t>(threads));
    }
  } else {
    (unit ? Kernel::template kernel<kColumns, true, int64_t>()
          : Kernel::template kernel<kColumns, false, int64_t>())<<<
        static_cast<unsigned>(blocks), kBlock, 0, stream>>>(args..., g, threads);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_local_regression_forward(const scalar_t* input, const scalar_t* weight,
                                            const scalar_t* bias, scalar_t* output,
                                            const LocalGeometry& g, cudaStream_t stream) {
  return launch<Forward<scalar_t>>(g, stream, input, weight, bias, output);
}

template <typename scalar_t>
cudaError_t launch_local_regression_backward_input(const scalar_t* grad_output,
                                                   const scalar_t* weight, scalar_t* grad_input,
                                                   const LocalGeometry& g, cudaStream_t stream) {
  return launch<BackwardInput<scalar_t>>(g, stream, grad_output, weight, grad_input);
}

template <typename scalar_t>
cudaError_t launch_local_regression_backward_weight(const scalar_t* grad_output,
                                                    const scalar_t* input, scalar_t* grad_weight,
                                                    const LocalGeometry& g, cudaStream_t stream) {
  return launch<BackwardWeight<scalar_t>>(g, stream, grad_output, input, grad_weight);
}

#define REGGAN_INSTANTIATE(scalar_t)                                                         \
  template cudaError_t launch_local_regression_forward<scalar_t>(                            \
      const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, const LocalGeometry&,    \
      cudaStream_t);                                                                         \
  template cudaError_t launch_local_regression_backward_input<scalar_t>(                     \
      const scalar_t*, const scalar_t*, scalar_t*, const LocalGeometry&, cudaStream_t);      \
  template cudaError_t launch_local_regression_backward_weight<scalar_t>(                    \
      const scalar_t*, const scalar_t*, scalar_t*, const LocalGeometry&, cudaStream_t);

REGGAN_INSTANTIATE(float)
REGGAN_INSTANTIATE(double)
REGGAN_INSTANTIATE(__half)
REGGAN_INSTANTIATE(__nv_bfloat16)
#undef REGGAN_INSTANTIATE

}  // namespace reggan_ext
