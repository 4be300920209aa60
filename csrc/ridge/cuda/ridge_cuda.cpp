// CUDA backend of the ridge ops: checks the arguments (shared with every backend), makes the
// inputs contiguous and calls the launchers of ridge_kernels.cu on the current stream of the
// inputs' device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "ridge/cuda/ridge_kernels.cuh"
#include "ridge/ridge.h"

namespace reggan_ext {
namespace {

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": launching the CUDA kernel failed: ",
              cudaGetErrorName(error), ": ", cudaGetErrorString(error),
              error == cudaErrorInvalidConfiguration
                  ? " (more groups, or a longer design row, than one grid can hold; the CPU "
                    "kernels have no such limit)"
                  : "");
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Global memory of `sizes` for the kernels that factor there (a thread per system); empty for
// those that factor in shared memory, which would leave up to the size of gram unused.
at::Tensor factor_memory(const at::Tensor& gram, int64_t unknowns, at::IntArrayRef sizes) {
  const bool needed = ridge_factors_in_global_memory(unknowns, gram.element_size());
  return at::empty(needed ? sizes.vec() : std::vector<int64_t>{0}, gram.options());
}

void accumulate_cuda(const at::Tensor& gram, const at::Tensor& cross, const at::Tensor& target_sq,
                     const at::Tensor& input, const at::Tensor& target,
                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool bias) {
  const RidgeGeometry rg = check_accumulate_args(gram, cross, target_sq, input, target,
                                                 kernel_size, stride, padding, dilation, groups,
                                                 bias);
  const c10::cuda::CUDAGuard guard(input.device());
  if (rg.layer.batch == 0 || rg.pixels() == 0) return;
  const at::Tensor x = input.contiguous();
  const at::Tensor y = target.contiguous();
  const cudaStream_t stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "ridge_accumulate_cuda", [&] {
    using acc_t = scalar_t;
    acc_t* g = gram.mutable_data_ptr<acc_t>();
    acc_t* r = cross.mutable_data_ptr<acc_t>();
    acc_t* yy = target_sq.mutable_data_ptr<acc_t>();
    if (x.scalar_type() == at::kFloat) {
      check_launch(launch_ridge_accumulate(x.const_data_ptr<float>(), y.const_data_ptr<float>(),
                                           g, r, yy, rg, stream),
                   "ridge_accumulate_");
    } else if constexpr (std::is_same_v<acc_t, double>) {
      check_launch(launch_ridge_accumulate(x.const_data_ptr<double>(),
                                           y.const_data_ptr<double>(), g, r, yy, rg, stream),
                   "ridge_accumulate_");
    }
  });
}

std::tuple<at::Tensor, at::Tensor> solve_cuda(const at::Tensor& gram, const at::Tensor& cross,
                                              const at::Tensor& lam, bool penalize_last) {
  const SolveSizes s = check_solve_args(gram, cross, lam);
  const c10::cuda::CUDAGuard guard(gram.device());
  // The kernels factor gram in shared memory, or a copy in work, and solve in the solution's
  // storage.
  const at::Tensor g = gram.contiguous();
  at::Tensor work = factor_memory(g, s.unknowns, g.sizes());
  at::Tensor solution = cross.clone(at::MemoryFormat::Contiguous);
  const at::Tensor shift = lam.contiguous();
  at::Tensor info = at::empty({s.groups, s.height, s.width}, gram.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "ridge_solve_cuda", [&] {
    check_launch(launch_ridge_solve(g.const_data_ptr<scalar_t>(),
                                    work.mutable_data_ptr<scalar_t>(),
                                    solution.mutable_data_ptr<scalar_t>(),
                                    shift.const_data_ptr<scalar_t>(),
                                    info.mutable_data_ptr<int32_t>(), s.groups, s.unknowns,
                                    s.out_per_group, s.pixels(), penalize_last,
                                    current_stream(g)),
                 "ridge_solve");
  });
  return {solution, info};
}

std::tuple<at::Tensor, at::Tensor> inverse_trace_cuda(const at::Tensor& gram,
                                                      const at::Tensor& lam, bool penalize_last) {
  const SolveSizes s = check_inverse_trace_args(gram, lam);
  const c10::cuda::CUDAGuard guard(gram.device());
  const at::Tensor g = gram.contiguous();
  at::Tensor work = factor_memory(g, s.unknowns, g.sizes());
  at::Tensor scratch = factor_memory(g, s.unknowns, {s.groups, s.unknowns, s.pixels()});
  const at::Tensor shift = lam.contiguous();
  at::Tensor trace = at::empty(lam.sizes(), lam.options());
  at::Tensor info = at::empty(lam.sizes(), lam.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "ridge_inverse_trace_cuda", [&] {
    check_launch(launch_ridge_inverse_trace(
                     g.const_data_ptr<scalar_t>(), work.mutable_data_ptr<scalar_t>(),
                     scratch.mutable_data_ptr<scalar_t>(),
                     shift.const_data_ptr<scalar_t>(), trace.mutable_data_ptr<scalar_t>(),
                     info.mutable_data_ptr<int32_t>(), s.groups, s.unknowns, s.pixels(),
                     penalize_last, current_stream(g)),
                 "ridge_inverse_trace");
  });
  return {trace, info};
}

}  // namespace

TORCH_LIBRARY_IMPL(reggan_ext, CUDA, m) {
  m.impl("ridge_accumulate_", &accumulate_cuda);
  m.impl("ridge_solve", &solve_cuda);
  m.impl("ridge_inverse_trace", &inverse_trace_cuda);
}

}  // namespace reggan_ext
