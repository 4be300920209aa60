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

template <bool kUnitColumns, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                   const LocalGeometry g, index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    forward_thread<kUnitColumns>(x, w, bias, y, g, e);
  }
}

template <bool kUnitColumns, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    backward_input_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ w,
                          scalar_t* __restrict__ grad_x, const LocalGeometry g, index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    backward_input_thread<kUnitColumns>(grad_y, w, grad_x, g, e);
  }
}

template <bool kUnitColumns, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    backward_weight_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ grad_w, const LocalGeometry g,
                           index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    backward_weight_thread<kUnitColumns>(grad_y, x, grad_w, g, e);
  }
}

// Launches the kernel specialised for unit column steps (unit_columns(g)) or the general one,
// each with int32_t indices when every index fits in 32 bits (cheaper address and index math)
// and int64_t otherwise, over `threads` flat thread indices.
template <typename Kernel32, typename Kernel64, typename... Args>
cudaError_t launch(Kernel32 unit32, Kernel64 unit64, Kernel32 general32, Kernel64 general64,
                   int64_t threads, const LocalGeometry& g, cudaStream_t stream, Args... args) {
  if (threads <= 0) return cudaSuccess;
  int64_t blocks = (threads + kBlock - 1) / kBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const bool unit = unit_columns(g);
  if (fits_int32(g) && threads + blocks * kBlock <= INT32_MAX) {
    (unit ? unit32 : general32)<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        args..., g, static_cast<int32_t>(threads));
  } else {
    (unit ? unit64 : general64)<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        args..., g, threads);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_local_regression_forward(const scalar_t* input, const scalar_t* weight,
                                            const scalar_t* bias, scalar_t* output,
                                            const LocalGeometry& g, cudaStream_t stream) {
  return launch(forward_kernel<true, scalar_t, int32_t>, forward_kernel<true, scalar_t, int64_t>,
                forward_kernel<false, scalar_t, int32_t>, forward_kernel<false, scalar_t, int64_t>,
                forward_threads<scalar_t>(g), g, stream, input, weight, bias, output);
}

template <typename scalar_t>
cudaError_t launch_local_regression_backward_input(const scalar_t* grad_output,
                                                   const scalar_t* weight, scalar_t* grad_input,
                                                   const LocalGeometry& g, cudaStream_t stream) {
  return launch(backward_input_kernel<true, scalar_t, int32_t>,
                backward_input_kernel<true, scalar_t, int64_t>,
                backward_input_kernel<false, scalar_t, int32_t>,
                backward_input_kernel<false, scalar_t, int64_t>,
                backward_input_threads<scalar_t>(g), g, stream, grad_output, weight, grad_input);
}

template <typename scalar_t>
cudaError_t launch_local_regression_backward_weight(const scalar_t* grad_output,
                                                    const scalar_t* input, scalar_t* grad_weight,
                                                    const LocalGeometry& g, cudaStream_t stream) {
  return launch(backward_weight_kernel<true, scalar_t, int32_t>,
                backward_weight_kernel<true, scalar_t, int64_t>,
                backward_weight_kernel<false, scalar_t, int32_t>,
                backward_weight_kernel<false, scalar_t, int64_t>, backward_weight_threads(g), g,
                stream, grad_output, input, grad_weight);
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
