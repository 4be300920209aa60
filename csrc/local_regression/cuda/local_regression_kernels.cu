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

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                   const LocalGeometry g, index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    forward_thread<kCols, kUnitColumns, kQuads>(x, w, bias, y, g, e);
  }
}

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    backward_input_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ w,
                          scalar_t* __restrict__ grad_x, const LocalGeometry g, index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    backward_input_thread<kCols, kUnitColumns, kQuads>(grad_y, w, grad_x, g, e);
  }
}

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename out_t,
          typename index_t>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kUnitColumns, index_t>)
    backward_weight_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                           out_t* __restrict__ grad_w, int64_t splits, const LocalGeometry g,
                           index_t threads) {
  const index_t step = static_cast<index_t>(gridDim.x) * kBlock;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kBlock + threadIdx.x; e < threads;
       e += step) {
    backward_weight_thread<kCols, kUnitColumns, kQuads>(grad_y, x, grad_w, g,
                                                        static_cast<index_t>(splits), e);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock)
    sum_splits_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ grad_w,
                      int64_t elements, int64_t splits) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; e < elements;
       e += step) {
    sum_splits(partial, grad_w, elements, splits, e);
  }
}

// Each kernel's thread count and instances, for launch.
template <typename scalar_t>
struct Forward {
  template <int kCols>
  int64_t threads(const LocalGeometry& g) const {
    return forward_threads<kCols, scalar_t>(g);
  }
  template <int kCols, bool kUnitColumns, int kQuads, typename index_t>
  static auto kernel() {
    return forward_kernel<kCols, kUnitColumns, kQuads, scalar_t, index_t>;
  }
};
template <typename scalar_t>
struct BackwardInput {
  template <int kCols>
  int64_t threads(const LocalGeometry& g) const {
    return backward_input_threads<kCols, scalar_t>(g);
  }
  template <int kCols, bool kUnitColumns, int kQuads, typename index_t>
  static auto kernel() {
    return backward_input_kernel<kCols, kUnitColumns, kQuads, scalar_t, index_t>;
  }
};
// Writes grad_weight (out_t = scalar_t, splits = 1) or its partial copies (out_t = acc_t).
template <typename scalar_t, typename out_t>
struct BackwardWeight {
  int64_t splits;
  template <int kCols>
  int64_t threads(const LocalGeometry& g) const {
    return backward_weight_threads<kCols>(g, splits);
  }
  template <int kCols, bool kUnitColumns, int kQuads, typename index_t>
  static auto kernel() {
    return backward_weight_kernel<kCols, kUnitColumns, kQuads, scalar_t, out_t, index_t>;
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

// Whether a launch argument may be read or written as Quads: the tensors' pointers, and (for
// non-pointers, such as backward_weight's split count) trivially.
template <typename T>
bool quad_aligned_argument(const T* p) {
  return quad_aligned(p);
}
bool quad_aligned_argument(int64_t) { return true; }

// Splits of the batch in backward_weight. Its grid does not grow with the batch (a thread sums
// every image), so a large batch through a small layer, such as RegGAN's per-channel one, would
// leave the GPU short of threads: split into ranges, the batch fills a blocked grid
// (min_blocked_threads), and a second kernel adds the ranges' partial sums in a fixed order
// (deterministic). At least kMinSplitImages images a split, so that the partial sums cost little
// traffic next to the images, and at most kMaxSplits partial copies of grad_weight.
constexpr int64_t kMinSplitImages = 32;
constexpr int64_t kMaxSplits = 8;

cudaError_t backward_weight_splits(const LocalGeometry& g, int64_t* splits) {
  *splits = 1;
  const int64_t threads = backward_weight_threads<kColumns>(g);
  if (threads == 0 || !fits_int32(g)) return cudaSuccess;
  int64_t min_threads = 0;
  const cudaError_t status = min_blocked_threads(&min_threads);
  int64_t wanted = ceil_div(min_threads, threads);
  if (wanted > kMaxSplits) wanted = kMaxSplits;
  if (wanted > g.batch / kMinSplitImages) wanted = g.batch / kMinSplitImages;
  if (wanted > 1) *splits = wanted;
  return status;
}

// Launches Kernel's instance for the geometry: unit column steps (unit_columns(g)) or general;
// int32_t indices when every index fits in 32 bits (cheaper address and index math), else
// int64_t; kCols = 1 for grids below min_blocked_threads, else kColumns, with quad columns
// (kQuads = pad_w % 4) where quad_columns(g) holds and every tensor is aligned to a Quad. Only
// the 32-bit path has kCols = 1 and quads: 64-bit indices come with tensors of over 2^30
// elements, whose grids are large and rare.
template <typename Kernel, typename... Args>
cudaError_t launch(const Kernel& kernels, const LocalGeometry& g, cudaStream_t stream,
                   Args... args) {
  const int64_t threads = kernels.template threads<kColumns>(g);
  if (threads <= 0) return cudaSuccess;
  const bool unit = unit_columns(g);
  const int64_t blocks = grid_blocks(threads);
  if (fits_int32(g) && threads + blocks * kBlock <= INT32_MAX) {
    int64_t min_threads = 0;
    const cudaError_t status = min_blocked_threads(&min_threads);
    if (status != cudaSuccess) return status;
    if (threads < min_threads) {
      // At most 4x min_threads: far within int32_t.
      const int64_t narrow = kernels.template threads<1>(g);
      (unit ? Kernel::template kernel<1, true, -1, int32_t>()
            : Kernel::template kernel<1, false, -1, int32_t>())<<<
          static_cast<unsigned>(grid_blocks(narrow)), kBlock, 0, stream>>>(
          args..., g, static_cast<int32_t>(narrow));
    } else {
      auto kernel = unit ? Kernel::template kernel<kColumns, true, -1, int32_t>()
                         : Kernel::template kernel<kColumns, false, -1, int32_t>();
      if (quad_columns(g) && (quad_aligned_argument(args) && ...)) {
        const decltype(kernel) quad_kernels[] = {
            Kernel::template kernel<kColumns, true, 0, int32_t>(),
            Kernel::template kernel<kColumns, true, 1, int32_t>(),
            Kernel::template kernel<kColumns, true, 2, int32_t>(),
            Kernel::template kernel<kColumns, true, 3, int32_t>(),
        };
        kernel = quad_kernels[g.pad_w % 4];
      }
      kernel<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(args..., g,
                                                                 static_cast<int32_t>(threads));
    }
  } else {
    (unit ? Kernel::template kernel<kColumns, true, -1, int64_t>()
          : Kernel::template kernel<kColumns, false, -1, int64_t>())<<<
        static_cast<unsigned>(blocks), kBlock, 0, stream>>>(args..., g, threads);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_local_regression_forward(const scalar_t* input, const scalar_t* weight,
                                            const scalar_t* bias, scalar_t* output,
                                            const LocalGeometry& g, cudaStream_t stream) {
  return launch(Forward<scalar_t>(), g, stream, input, weight, bias, output);
}

template <typename scalar_t>
cudaError_t launch_local_regression_backward_input(const scalar_t* grad_output,
                                                   const scalar_t* weight, scalar_t* grad_input,
                                                   const LocalGeometry& g, cudaStream_t stream) {
  return launch(BackwardInput<scalar_t>(), g, stream, grad_output, weight, grad_input);
}

cudaError_t local_regression_backward_weight_workspace(const LocalGeometry& g,
                                                      int64_t* elements) {
  int64_t splits = 1;
  const cudaError_t status = backward_weight_splits(g, &splits);
  *elements = splits > 1 ? splits * weight_elements(g) : 0;
  return status;
}

template <typename scalar_t>
cudaError_t launch_local_regression_backward_weight(const scalar_t* grad_output,
                                                    const scalar_t* input, scalar_t* grad_weight,
                                                    acc_type<scalar_t>* workspace,
                                                    const LocalGeometry& g, cudaStream_t stream) {
  int64_t splits = 1;
  cudaError_t status = backward_weight_splits(g, &splits);
  if (status != cudaSuccess) return status;
  if (splits == 1) {
    return launch(BackwardWeight<scalar_t, scalar_t>{1}, g, stream, grad_output, input,
                  grad_weight, int64_t{1});
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  status = launch(BackwardWeight<scalar_t, acc_type<scalar_t>>{splits}, g, stream, grad_output,
                  input, workspace, splits);
  if (status != cudaSuccess) return status;
  const int64_t elements = weight_elements(g);
  sum_splits_kernel<<<static_cast<unsigned>(grid_blocks(elements)), kBlock, 0, stream>>>(
      workspace, grad_weight, elements, splits);
  return cudaGetLastError();
}

#define REGGAN_INSTANTIATE(scalar_t)                                                         \
  template cudaError_t launch_local_regression_forward<scalar_t>(                            \
      const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, const LocalGeometry&,    \
      cudaStream_t);                                                                         \
  template cudaError_t launch_local_regression_backward_input<scalar_t>(                     \
      const scalar_t*, const scalar_t*, scalar_t*, const LocalGeometry&, cudaStream_t);      \
  template cudaError_t launch_local_regression_backward_weight<scalar_t>(                    \
      const scalar_t*, const scalar_t*, scalar_t*, acc_type<scalar_t>*, const LocalGeometry&, \
      cudaStream_t);

REGGAN_INSTANTIATE(float)
REGGAN_INSTANTIATE(double)
REGGAN_INSTANTIATE(__half)
REGGAN_INSTANTIATE(__nv_bfloat16)
#undef REGGAN_INSTANTIATE

}  // namespace reggan_ext
