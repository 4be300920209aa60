// Torch-facing declarations of the local_regression ops: argument checking shared by every
// backend, and the per-backend entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "local_regression/local_regression_math.h"

namespace reggan_ext {

// Validates the hyperparameters and derives the output size with nn.Conv2d's formula.
LocalGeometry make_geometry(int64_t batch, int64_t in_channels, int64_t in_height,
                            int64_t in_width, int64_t out_channels, int64_t kernel_h,
                            int64_t kernel_w, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups);

// Checks the forward arguments and returns their geometry; throws ValueErrors (for a wrong dtype
// too) that name the offending argument.
LocalGeometry check_forward_args(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups);

LocalGeometry check_backward_input_args(const at::Tensor& grad_output, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups);

LocalGeometry check_backward_weight_args(const at::Tensor& grad_output, const at::Tensor& input,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups);

// A size that the layer fixes (every one but the batch) as an int. Reading it specializes
// nothing, so the batch stays symbolic under torch.compile's dynamic shapes.
int64_t fixed_size(const at::Tensor& t, int64_t dim);

// The ops called through the dispatcher from its top: autograd and autocast included.
at::Tensor call_local_regression(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups);
at::Tensor call_local_regression_backward_input(const at::Tensor& grad_output,
                                                const at::Tensor& weight,
                                                at::IntArrayRef input_size,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups);
at::Tensor call_local_regression_backward_weight(const at::Tensor& grad_output,
                                                 const at::Tensor& input,
                                                 at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups);

// Sizes of the tensors of a geometry.
std::vector<int64_t> input_shape(const LocalGeometry& g);
std::vector<int64_t> output_shape(const LocalGeometry& g);
std::vector<int64_t> weight_shape(const LocalGeometry& g);

}  // namespace reggan_ext
