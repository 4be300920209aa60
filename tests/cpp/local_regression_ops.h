// The local_regression ops as a C++ user calls them, through the dispatcher, and the geometry
// of a test case; shared by the C++ tests of the op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>

namespace local_regression_test {

using Forward = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct Case {
  int64_t batch, in_ch, out_ch, height, width, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups;
};

}  // namespace local_regression_test
