// Torch-facing declarations of the ridge ops: argument checks shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include "ridge/ridge_math.h"

namespace reggan_ext {

// Checks the arguments of ridge_accumulate_ and returns the geometry of the update; throws
// ValueErrors (for a wrong dtype too) that name the offending argument.
RidgeGeometry check_accumulate_args(const at::Tensor& gram, const at::Tensor& cross,
                                    const at::Tensor& target_sq, const at::Tensor& input,
                                    const at::Tensor& target, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool bias);

// Sizes of a batch of ridge systems: groups x pixels systems of `unknowns` unknowns with
// out_per_group right-hand sides each.
struct SolveSizes {
  int64_t groups, unknowns, out_per_group, height, width;
  int64_t pixels() const { return height * width; }
  int64_t packed_size() const { return unknowns * (unknowns + 1) / 2; }
};

SolveSizes check_solve_args(const at::Tensor& gram, const at::Tensor& cross,
                            const at::Tensor& lam);

// ridge_inverse_trace has no right-hand sides: out_per_group is 0.
SolveSizes check_inverse_trace_args(const at::Tensor& gram, const at::Tensor& lam);

}  // namespace reggan_ext
