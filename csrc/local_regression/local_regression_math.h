// Geometry and index math of the locally connected layer, shared by the CPU and CUDA kernels.
// Plain C++ with no torch headers, so that .cu files can include it.
//
// y[n, o, i, j] = bias[o, i, j] + sum_{c, u, v} weight[o, c, u, v, i, j]
//                 * x[n, first_input_channel(o) + c, i*stride_h - pad_h + u*dilation_h,
//                                                    j*stride_w - pad_w + v*dilation_w]
// with zeros outside the image. All tensors are contiguous; sizes are 64-bit so that index
// products never overflow.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace reggan_ext {

struct LocalGeometry {
  int64_t batch;
  int64_t in_channels, in_height, in_width;
  int64_t out_channels, out_height, out_width;
  int64_t groups;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;  // zero padding before the first row / column
  int64_t dilation_h, dilation_w;

  REGGAN_HD int64_t in_per_group() const { return in_channels / groups; }
  REGGAN_HD int64_t out_per_group() const { return out_channels / groups; }
  REGGAN_HD int64_t first_input_channel(int64_t o) const {
    return (o / out_per_group()) * in_per_group();
  }
  REGGAN_HD int64_t in_plane() const { return in_height * in_width; }
  REGGAN_HD int64_t out_plane() const { return out_height * out_width; }
  // Offset of the input column read by output column 0 through kernel column v.
  REGGAN_HD int64_t col_offset(int64_t v) const { return v * dilation_w - pad_w; }
  REGGAN_HD int64_t input_row(int64_t i, int64_t u) const {
    return i * stride_h - pad_h + u * dilation_h;
  }
  // Start of the contiguous row weight[o, c, u, v, i, :].
  REGGAN_HD int64_t weight_row(int64_t o, int64_t c, int64_t u, int64_t v, int64_t i) const {
    return ((((o * in_per_group() + c) * kernel_h + u) * kernel_w + v) * out_height + i) *
           out_width;
  }
};

// Half-open range [*begin, *end) of outputs j with 0 <= j*stride + offset < in_size, clipped to
// [0, out_size). Hoisting this out of the inner loops keeps them branch-free.
REGGAN_HD void valid_output_range(int64_t offset, int64_t stride, int64_t in_size,
                                  int64_t out_size, int64_t* begin, int64_t* end) {
  int64_t first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  int64_t last = in_size - 1 - offset;  // largest j*stride allowed
  int64_t stop = last < 0 ? 0 : last / stride + 1;
  if (stop > out_size) stop = out_size;
  if (first > stop) first = stop;
  *begin = first;
  *end = stop;
}

// Output index i whose window reads input index `in` through kernel tap u, or -1 if none.
REGGAN_HD int64_t output_for_input(int64_t in, int64_t u, int64_t stride, int64_t pad,
                                   int64_t dilation, int64_t out_size) {
  const int64_t shifted = in + pad - u * dilation;
  if (shifted < 0 || shifted % stride != 0) return -1;
  const int64_t out = shifted / stride;
  return out < out_size ? out : -1;
}

}  // namespace reggan_ext
