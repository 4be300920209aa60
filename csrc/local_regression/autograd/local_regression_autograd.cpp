// Autograd kernels of the local_regression ops. They are C++ so that the layer's forward and
// backward run no Python between its kernels: the autograd.Function that
// torch.library.register_autograd makes cost more per call than a small layer's kernels
// (`benchmarks/compare_builds.py --case 16x16` times the tiny case, mostly that cost). A C++
// Function's needs_input_grad also knows which gradients a call of torch.autograd.grad asks
// for, where a Python one only knows which inputs require grad, so the backward runs no kernel
// whose gradient is not wanted.
//
// Each op's derivatives are the other two ops, called from the dispatcher's top, so gradients of
// gradients come back through these kernels and are exact to any order. reggan_ext/ops.py
// holds the same formulas, with forward-mode ones, for torch.func's transforms and forward-mode
// AD, which a C++ Function does not support.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "local_regression/local_regression.h"

namespace reggan_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The hyperparameters every op takes after its tensors and size, kept for the backward.
struct Hyperparameters {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }

  static Hyperparameters saved(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }
};

// (height, width) of an input or of a weight's kernel, from their dimensions 2 and 3.
std::vector<int64_t> spatial_size(const at::Tensor& t) {
  return {fixed_size(t, 2), fixed_size(t, 3)};
}

}  // namespace

// Outside the anonymous namespace so that a grad_fn's name reads
// torch::autograd::CppNode<reggan_ext::LocalRegressionFunction> (or BackwardFunction<...>).
class LocalRegressionFunction : public torch::autograd::Function<LocalRegressionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({input, weight});
    Hyperparameters{stride.vec(), padding.vec(), dilation.vec(), groups}.save(ctx);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_local_regression(input, weight, bias, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& grad = grads[0];
    const Hyperparameters h = Hyperparameters::saved(ctx);
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = call_local_regression_backward_input(grad, weight, spatial_size(input),
                                                        h.stride, h.padding, h.dilation,
                                                        h.groups);
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = call_local_regression_backward_weight(grad, input, spatial_size(weight),
                                                          h.stride, h.padding, h.dilation,
                                                          h.groups);
    }
    // The bias's edge exists only where a bias was given.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = grad.sum(0);
    }
    return {grad_input, grad_weight, grad_bias, {}, {}, {}, {}};
  }
};

// The backward ops: grad_input = backward_input(grad_output, weight) and grad_weight =
// backward_weight(grad_output, input), each linear in its two tensors, whose derivatives Op
// gives (grad is a gradient with respect to the op's result).
template <typename Op>
class BackwardFunction : public torch::autograd::Function<BackwardFunction<Op>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output,
                            const at::Tensor& other, at::IntArrayRef size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({grad_output, other});
    Hyperparameters{stride.vec(), padding.vec(), dilation.vec(), groups}.save(ctx);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return Op::call(grad_output, other, size, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_output = saved[0];
    const at::Tensor& other = saved[1];
    const at::Tensor& grad = grads[0];
    const Hyperparameters h = Hyperparameters::saved(ctx);
    at::Tensor d_grad_output, d_other;
    if (ctx->needs_input_grad(0)) d_grad_output = Op::grad_output_derivative(other, grad, h);
    if (ctx->needs_input_grad(1)) d_other = Op::other_derivative(grad_output, other, grad, h);
    return {d_grad_output, d_other, {}, {}, {}, {}, {}};
  }
};

struct BackwardInput {
  static constexpr auto call = &call_local_regression_backward_input;
  static at::Tensor grad_output_derivative(const at::Tensor& weight, const at::Tensor& grad,
                                           const Hyperparameters& h) {
    return call_local_regression(grad, weight, std::nullopt, h.stride, h.padding, h.dilation,
                                 h.groups);
  }
  static at::Tensor other_derivative(const at::Tensor& grad_output, const at::Tensor& weight,
                                     const at::Tensor& grad, const Hyperparameters& h) {
    return call_local_regression_backward_weight(grad_output, grad, spatial_size(weight),
                                                 h.stride, h.padding, h.dilation, h.groups);
  }
};

struct BackwardWeight {
  static constexpr auto call = &call_local_regression_backward_weight;
  static at::Tensor grad_output_derivative(const at::Tensor& input, const at::Tensor& grad,
                                           const Hyperparameters& h) {
    return call_local_regression(input, grad, std::nullopt, h.stride, h.padding, h.dilation,
                                 h.groups);
  }
  static at::Tensor other_derivative(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& grad, const Hyperparameters& h) {
    return call_local_regression_backward_input(grad_output, grad, spatial_size(input), h.stride,
                                                h.padding, h.dilation, h.groups);
  }
};

namespace {

at::Tensor forward_autograd(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return LocalRegressionFunction::apply(input, weight, bias, stride, padding, dilation, groups);
}

// The backward ops' autograd kernels: Op's.
template <typename Op>
at::Tensor backward_autograd(const at::Tensor& grad_output, const at::Tensor& other,
                             at::IntArrayRef size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return BackwardFunction<Op>::apply(grad_output, other, size, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(reggan_ext, Autograd, m) {
  m.impl("local_regression", &forward_autograd);
  m.impl("local_regression_backward_input", &backward_autograd<BackwardInput>);
  m.impl("local_regression_backward_weight", &backward_autograd<BackwardWeight>);
}

}  // namespace reggan_ext
