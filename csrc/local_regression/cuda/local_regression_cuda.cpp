// CUDA backend of the local_regression ops: checks the arguments (shared with every backend),
// makes the tensors contiguous and calls the launchers of local_regression_kernels.cu on the
// current stream of the inputs' device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "local_regression/cuda/local_regression_kernels.cuh"
#include "local_regression/local_regression.h"

namespace reggan_ext {
namespace {

// The CUDA type of each torch scalar type; at::Half and at::BFloat16 share the bit layout of
// __half and __nv_bfloat16.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename CudaScalar<scalar_t>::type* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaScalar<scalar_t>::type* cuda_mutable_data(at::Tensor& t) {
  return reinterpret_cast<typename CudaScalar<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

void check_cuda_dtype(const char* name, const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                       type == at::kBFloat16,
                    "local_regression: the CUDA kernels support float32, float64, float16 and "
                    "bfloat16 ", name, ", got ", type);
}

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, "local_regression: launching the CUDA kernel of ", op,
              " failed: ", cudaGetErrorName(error), ": ", cudaGetErrorString(error));
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const LocalGeometry g = check_forward_args(input, weight, bias, stride, padding, dilation, groups);
  check_cuda_dtype("input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(output_shape(g), input.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "local_regression_cuda", [&] {
    check_launch(launch_local_regression_forward(
                     cuda_data<scalar_t>(x), cuda_data<scalar_t>(w),
                     b.defined() ? cuda_data<scalar_t>(b) : nullptr, cuda_mutable_data<scalar_t>(y),
                     g, current_stream(x)),
                 "local_regression");
  });
  return y;
}

at::Tensor backward_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                               at::IntArrayRef input_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const LocalGeometry g = check_backward_input_args(grad_output, weight, input_size, stride,
                                                    padding, dilation, groups);
  check_cuda_dtype("grad_output", grad_output);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor gy = grad_output.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor grad_x = at::empty(input_shape(g), grad_output.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(),
                                  "local_regression_backward_input_cuda", [&] {
    check_launch(launch_local_regression_backward_input(
                     cuda_data<scalar_t>(gy), cuda_data<scalar_t>(w),
                     cuda_mutable_data<scalar_t>(grad_x), g, current_stream(gy)),
                 "local_regression_backward_input");
  });
  return grad_x;
}

at::Tensor backward_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  const LocalGeometry g = check_backward_weight_args(grad_output, input, kernel_size, stride,
                                                     padding, dilation, groups);
  check_cuda_dtype("input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor gy = grad_output.contiguous();
  const at::Tensor x = input.contiguous();
  // Written in full by the kernel, as zeros when the batch is empty.
  at::Tensor grad_w = at::empty(weight_shape(g), input.options());
  if (grad_w.numel() == 0) return grad_w;
  int64_t workspace_elements = 0;
  check_launch(local_regression_backward_weight_workspace(g, &workspace_elements),
               "local_regression_backward_weight");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "local_regression_backward_weight_cuda", [&] {
    using acc_t = acc_type<typename CudaScalar<scalar_t>::type>;
    // Stream-ordered by the caching allocator: free for reuse once the kernels have run.
    at::Tensor workspace;
    if (workspace_elements > 0) {
      workspace = at::empty({workspace_elements},
                            input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    check_launch(launch_local_regression_backward_weight(
                     cuda_data<scalar_t>(gy), cuda_data<scalar_t>(x),
                     cuda_mutable_data<scalar_t>(grad_w),
                     workspace.defined() ? workspace.mutable_data_ptr<acc_t>() : nullptr, g,
                     current_stream(x)),
                 "local_regression_backward_weight");
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(reggan_ext, CUDA, m) {
  m.impl("local_regression", &forward_cuda);
  m.impl("local_regression_backward_input", &backward_input_cuda);
  m.impl("local_regression_backward_weight", &backward_weight_cuda);
}

}  // namespace reggan_ext
