// Schema of the local_regression ops, the argument checks every backend shares, the ops' calls
// through the dispatcher, the Meta kernels that give fake tensors (torch.compile, opcheck) their
// shapes through the same checks, and the forward's autocast kernels.
#include "local_regression/local_regression.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace reggan_ext {
namespace {

void check_pair(const char* name, at::IntArrayRef value, int64_t minimum) {
  TORCH_CHECK_VALUE(value.size() == 2, "local_regression: ", name,
                    " must have 2 elements (height, width), got ", value);
  TORCH_CHECK_VALUE(value[0] >= minimum && value[1] >= minimum, "local_regression: ", name,
                    " must be >= ", minimum, ", got ", value);
}

}  // namespace

// Validates the hyperparameters and derives the output size with nn.Conv2d's formula.
LocalGeometry make_geometry(int64_t batch, int64_t in_channels, int64_t in_height,
                            int64_t in_width, int64_t out_channels, int64_t kernel_h,
                            int64_t kernel_w, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  check_pair("stride", stride, 1);
  check_pair("padding", padding, 0);
  check_pair("dilation", dilation, 1);
  TORCH_CHECK_VALUE(kernel_h >= 1 && kernel_w >= 1,
                    "local_regression: kernel size must be >= 1, got (", kernel_h, ", ", kernel_w,
                    ")");
  TORCH_CHECK_VALUE(groups >= 1, "local_regression: groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(in_channels % groups == 0, "local_regression: groups (", groups,
                    ") must divide the input channels (", in_channels, ")");
  TORCH_CHECK_VALUE(out_channels % groups == 0, "local_regression: groups (", groups,
                    ") must divide the output channels (", out_channels, ")");
  LocalGeometry g{};
  g.batch = batch;
  g.in_channels = in_channels;
  g.in_height = in_height;
  g.in_width = in_width;
  g.out_channels = out_channels;
  g.groups = groups;
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  const int64_t extent_h = g.dilation_h * (kernel_h - 1) + 1;
  const int64_t extent_w = g.dilation_w * (kernel_w - 1) + 1;
  const int64_t padded_h = in_height + 2 * g.pad_h;
  const int64_t padded_w = in_width + 2 * g.pad_w;
  TORCH_CHECK_VALUE(extent_h <= padded_h && extent_w <= padded_w,
                    "local_regression: the dilated kernel (", extent_h, "x", extent_w,
                    ") is larger than the padded input (", padded_h, "x", padded_w, ")");
  g.out_height = (padded_h - extent_h) / g.stride_h + 1;
  g.out_width = (padded_w - extent_w) / g.stride_w + 1;
  // A single output row or column reads no input through the stride; the kernels size their
  // scratch and loops by it, so a stride of a million must not cost a million.
  if (g.out_height == 1) g.stride_h = 1;
  if (g.out_width == 1) g.stride_w = 1;
  return g;
}

int64_t fixed_size(const at::Tensor& t, int64_t dim) {
  return t.sym_size(dim).guard_int(__FILE__, __LINE__);
}

namespace {

// The batch as the kernels read it. Only fake tensors have a symbolic one, and the fake kernels
// take it from sym_size(0) (with_batch) instead.
int64_t batch_size(const at::Tensor& t) { return t.sym_size(0).maybe_as_int().value_or(0); }

// shape with its first (batch) size replaced by batch.
std::vector<c10::SymInt> with_batch(const std::vector<int64_t>& shape, const c10::SymInt& batch) {
  std::vector<c10::SymInt> result(shape.begin(), shape.end());
  result[0] = batch;
  return result;
}

void check_floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "local_regression: ", name,
                    " must be a floating-point tensor, got ", t.scalar_type());
}

void check_same_dtype_device(const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "local_regression: ", name,
                    " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
                    ref.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "local_regression: ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device(),
                    "; they must be on the same device");
}

void check_shape(const char* name, const at::Tensor& t, c10::SymIntArrayRef expected,
                 const char* layout) {
  TORCH_CHECK_VALUE(t.sym_sizes() == expected, "local_regression: expected ", name, " of shape ",
                    layout, " = ", expected, ", got ", t.sym_sizes());
}

void check_shape(const char* name, const at::Tensor& t, const std::vector<int64_t>& expected,
                 const char* layout) {
  check_shape(name, t, c10::fromIntArrayRefSlow(expected), layout);
}

void check_rank(const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, "local_regression: expected ", name, " of shape ", layout,
                    " (", rank, " dimensions), got shape ", t.sizes());
}

constexpr const char* kInputLayout = "(N, C_in, H, W)";
constexpr const char* kWeightLayout = "(C_out, C_in/groups, kH, kW, H_out, W_out)";
constexpr const char* kOutputLayout = "(N, C_out, H_out, W_out)";
constexpr const char* kBiasLayout = "(C_out, H_out, W_out)";

}  // namespace

std::vector<int64_t> input_shape(const LocalGeometry& g) {
  return {g.batch, g.in_channels, g.in_height, g.in_width};
}

std::vector<int64_t> output_shape(const LocalGeometry& g) {
  return {g.batch, g.out_channels, g.out_height, g.out_width};
}

std::vector<int64_t> weight_shape(const LocalGeometry& g) {
  return {g.out_channels, g.in_per_group(), g.kernel_h, g.kernel_w, g.out_height, g.out_width};
}

LocalGeometry check_forward_args(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  check_rank("input", input, 4, kInputLayout);
  check_rank("weight", weight, 6, kWeightLayout);
  check_floating("input", input);
  check_same_dtype_device("weight", weight, "input", input);
  const LocalGeometry g = make_geometry(
      batch_size(input), fixed_size(input, 1), fixed_size(input, 2), fixed_size(input, 3),
      fixed_size(weight, 0), fixed_size(weight, 2), fixed_size(weight, 3), stride, padding,
      dilation, groups);
  check_shape("weight", weight, weight_shape(g), kWeightLayout);
  if (bias.has_value()) {
    check_same_dtype_device("bias", *bias, "input", input);
    check_shape("bias", *bias, std::vector<int64_t>{g.out_channels, g.out_height, g.out_width},
                kBiasLayout);
  }
  return g;
}

LocalGeometry check_backward_input_args(const at::Tensor& grad_output, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups) {
  check_rank("grad_output", grad_output, 4, kOutputLayout);
  check_rank("weight", weight, 6, kWeightLayout);
  check_floating("grad_output", grad_output);
  check_same_dtype_device("weight", weight, "grad_output", grad_output);
  TORCH_CHECK_VALUE(input_size.size() == 2, "local_regression: input_size must be (H, W), got ",
                    input_size);
  const LocalGeometry g = make_geometry(
      batch_size(grad_output), fixed_size(weight, 1) * groups, input_size[0], input_size[1],
      fixed_size(weight, 0), fixed_size(weight, 2), fixed_size(weight, 3), stride, padding,
      dilation, groups);
  check_shape("weight", weight, weight_shape(g), kWeightLayout);
  check_shape("grad_output", grad_output, with_batch(output_shape(g), grad_output.sym_size(0)),
              kOutputLayout);
  return g;
}

LocalGeometry check_backward_weight_args(const at::Tensor& grad_output, const at::Tensor& input,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  check_rank("grad_output", grad_output, 4, kOutputLayout);
  check_rank("input", input, 4, kInputLayout);
  check_floating("input", input);
  check_same_dtype_device("grad_output", grad_output, "input", input);
  TORCH_CHECK_VALUE(kernel_size.size() == 2,
                    "local_regression: kernel_size must be (kH, kW), got ", kernel_size);
  const LocalGeometry g = make_geometry(
      batch_size(input), fixed_size(input, 1), fixed_size(input, 2), fixed_size(input, 3),
      fixed_size(grad_output, 1), kernel_size[0], kernel_size[1], stride, padding, dilation,
      groups);
  check_shape("grad_output", grad_output, with_batch(output_shape(g), input.sym_size(0)),
              kOutputLayout);
  return g;
}

namespace {

using ForwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, at::IntArrayRef,
                                    at::IntArrayRef, at::IntArrayRef, int64_t);
// Both backward ops: two tensors, a size, then the geometry.
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor call_local_regression(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  static const auto op = find_op<ForwardSignature>("reggan_ext::local_regression");
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor call_local_regression_backward_input(const at::Tensor& grad_output,
                                                const at::Tensor& weight,
                                                at::IntArrayRef input_size,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups) {
  static const auto op =
      find_op<BackwardSignature>("reggan_ext::local_regression_backward_input");
  return op.call(grad_output, weight, input_size, stride, padding, dilation, groups);
}

at::Tensor call_local_regression_backward_weight(const at::Tensor& grad_output,
                                                 const at::Tensor& input,
                                                 at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups) {
  static const auto op =
      find_op<BackwardSignature>("reggan_ext::local_regression_backward_weight");
  return op.call(grad_output, input, kernel_size, stride, padding, dilation, groups);
}

namespace {

at::Tensor forward_meta(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const LocalGeometry g = check_forward_args(input, weight, bias, stride, padding, dilation, groups);
  return at::empty_symint(with_batch(output_shape(g), input.sym_size(0)), input.options());
}

at::Tensor backward_input_meta(const at::Tensor& grad_output, const at::Tensor& weight,
                               at::IntArrayRef input_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const LocalGeometry g = check_backward_input_args(grad_output, weight, input_size, stride,
                                                    padding, dilation, groups);
  return at::empty_symint(with_batch(input_shape(g), grad_output.sym_size(0)),
                          grad_output.options());
}

at::Tensor backward_weight_meta(const at::Tensor& grad_output, const at::Tensor& input,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  const LocalGeometry g = check_backward_weight_args(grad_output, input, kernel_size, stride,
                                                     padding, dilation, groups);
  return at::empty(weight_shape(g), input.options());
}

// Under autocast, a layer's float32 weight meets the reduced-precision outputs of the ops before
// it. The forward runs in the widest floating dtype of its tensors (autocast's "promote"
// policy): casting the weight down would read and write all of it at every step, more traffic
// than the op itself.
template <c10::DispatchKey kAutocast>
at::Tensor forward_autocast(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocast);
  const bool floating = at::isFloatingType(input.scalar_type()) &&
                        at::isFloatingType(weight.scalar_type()) &&
                        (!bias.has_value() || at::isFloatingType(bias->scalar_type()));
  if (!floating) {  // left to the checks' errors
    return call_local_regression(input, weight, bias, stride, padding, dilation, groups);
  }
  at::ScalarType type = c10::promoteTypes(input.scalar_type(), weight.scalar_type());
  if (bias.has_value()) type = c10::promoteTypes(type, bias->scalar_type());
  const std::optional<at::Tensor> cast_bias =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(type)) : std::nullopt;
  return call_local_regression(input.to(type), weight.to(type), cast_bias, stride, padding,
                               dilation, groups);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reggan_ext, m) {
  m.def(
      "local_regression(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "local_regression_backward_input(Tensor grad_output, Tensor weight, int[2] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "local_regression_backward_weight(Tensor grad_output, Tensor input, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(reggan_ext, Meta, m) {
  m.impl("local_regression", &forward_meta);
  m.impl("local_regression_backward_input", &backward_input_meta);
  m.impl("local_regression_backward_weight", &backward_weight_meta);
}

TORCH_LIBRARY_IMPL(reggan_ext, AutocastCPU, m) {
  m.impl("local_regression", &forward_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(reggan_ext, AutocastCUDA, m) {
  m.impl("local_regression", &forward_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace reggan_ext
