// Fused CPU kernels of the locally connected layer: no im2col buffer and no temporary larger
// than an output row. Every loop nest puts the contiguous output column j innermost, so that the
// compiler vectorizes it for stride 1, and each output element is written by exactly one task in
// a fixed order, which makes the backward deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "local_regression/local_regression.h"

namespace reggan_ext {
namespace {

// Tasks of at least this many multiply-adds amortize at::parallel_for's scheduling.
constexpr int64_t kMinTaskWork = 1 << 14;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// out[j] += weight[j] * in[j * stride + offset] for j in [begin, end).
template <typename scalar_t>
inline void multiply_accumulate(scalar_t* __restrict__ out, const scalar_t* __restrict__ weight,
                                const scalar_t* __restrict__ in, int64_t stride, int64_t offset,
                                int64_t begin, int64_t end) {
  if (stride == 1) {
    for (int64_t j = begin; j < end; ++j) out[j] += weight[j] * in[j + offset];
  } else {
    for (int64_t j = begin; j < end; ++j) out[j] += weight[j] * in[j * stride + offset];
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y,
                    const LocalGeometry& g) {
  const int64_t taps = g.in_per_group() * g.kernel_h * g.kernel_w;
  // One task per (o, i): the weight rows of an output row stay in cache across the batch.
  at::parallel_for(0, g.out_channels * g.out_height, grain_for(g.batch * taps * g.out_width),
                   [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / g.out_height;
      const int64_t i = task % g.out_height;
      const int64_t c0 = g.first_input_channel(o);
      for (int64_t n = 0; n < g.batch; ++n) {
        scalar_t* __restrict__ y_row = y + ((n * g.out_channels + o) * g.out_height + i) * g.out_width;
        if (bias != nullptr) {
          std::copy_n(bias + (o * g.out_height + i) * g.out_width, g.out_width, y_row);
        } else {
          std::fill_n(y_row, g.out_width, scalar_t(0));
        }
        for (int64_t c = 0; c < g.in_per_group(); ++c) {
          for (int64_t u = 0; u < g.kernel_h; ++u) {
            const int64_t row = g.input_row(i, u);
            if (row < 0 || row >= g.in_height) continue;
            const scalar_t* x_row = x + ((n * g.in_channels + c0 + c) * g.in_height + row) * g.in_width;
            for (int64_t v = 0; v < g.kernel_w; ++v) {
              const int64_t offset = g.col_offset(v);
              int64_t j0, j1;
              valid_output_range(offset, g.stride_w, g.in_width, g.out_width, &j0, &j1);
              multiply_accumulate(y_row, w + g.weight_row(o, c, u, v, i), x_row, g.stride_w,
                                  offset, j0, j1);
            }
          }
        }
      }
    }
  });
}

// grad_weight[o, c, u, v, i, j] = sum_n grad_y[n, o, i, j] * x[n, c0 + c, row(i, u), col(j, v)],
// summed over n in order by the one task that owns the row.
template <typename scalar_t>
void backward_weight_kernel(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_w,
                            const LocalGeometry& g) {
  const int64_t taps = g.in_per_group() * g.kernel_h * g.kernel_w;
  at::parallel_for(0, g.out_channels * g.out_height, grain_for(g.batch * taps * g.out_width),
                   [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / g.out_height;
      const int64_t i = task % g.out_height;
      const int64_t c0 = g.first_input_channel(o);
      for (int64_t c = 0; c < g.in_per_group(); ++c) {
        for (int64_t u = 0; u < g.kernel_h; ++u) {
          const int64_t row = g.input_row(i, u);
          for (int64_t v = 0; v < g.kernel_w; ++v) {
            scalar_t* __restrict__ gw_row = grad_w + g.weight_row(o, c, u, v, i);
            std::fill_n(gw_row, g.out_width, scalar_t(0));
            if (row < 0 || row >= g.in_height) continue;
            const int64_t offset = g.col_offset(v);
            int64_t j0, j1;
            valid_output_range(offset, g.stride_w, g.in_width, g.out_width, &j0, &j1);
            for (int64_t n = 0; n < g.batch; ++n) {
              const scalar_t* gy_row = grad_y + ((n * g.out_channels + o) * g.out_height + i) * g.out_width;
              const scalar_t* x_row = x + ((n * g.in_channels + c0 + c) * g.in_height + row) * g.in_width;
              multiply_accumulate(gw_row, gy_row, x_row, g.stride_w, offset, j0, j1);
            }
          }
        }
      }
    }
  });
}

// grad_x[n, ci, r, :] gathers weight * grad_y over every (o, u, v, i, j) that reads (ci, r).
// One task owns an input row (ci, r) for the whole batch; within it, for fixed v distinct j
// write distinct columns, so the scatter into the row is free of conflicts.
template <typename scalar_t>
void backward_input_kernel(const scalar_t* grad_y, const scalar_t* w, scalar_t* grad_x,
                           const LocalGeometry& g) {
  const int64_t work = g.batch * g.out_per_group() * g.kernel_h * g.kernel_w * g.out_width;
  at::parallel_for(0, g.in_channels * g.in_height, grain_for(work), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ci = task / g.in_height;
      const int64_t r = task % g.in_height;
      const int64_t group = ci / g.in_per_group();
      const int64_t c = ci % g.in_per_group();
      for (int64_t n = 0; n < g.batch; ++n) {
        std::fill_n(grad_x + ((n * g.in_channels + ci) * g.in_height + r) * g.in_width, g.in_width,
                    scalar_t(0));
      }
      for (int64_t o = group * g.out_per_group(); o < (group + 1) * g.out_per_group(); ++o) {
        for (int64_t u = 0; u < g.kernel_h; ++u) {
          const int64_t i = output_for_input(r, u, g.stride_h, g.pad_h, g.dilation_h, g.out_height);
          if (i < 0) continue;
          for (int64_t v = 0; v < g.kernel_w; ++v) {
            const int64_t offset = g.col_offset(v);
            int64_t j0, j1;
            valid_output_range(offset, g.stride_w, g.in_width, g.out_width, &j0, &j1);
            const scalar_t* __restrict__ w_row = w + g.weight_row(o, c, u, v, i);
            for (int64_t n = 0; n < g.batch; ++n) {
              const scalar_t* __restrict__ gy_row =
                  grad_y + ((n * g.out_channels + o) * g.out_height + i) * g.out_width;
              scalar_t* __restrict__ gx_row =
                  grad_x + ((n * g.in_channels + ci) * g.in_height + r) * g.in_width;
              if (g.stride_w == 1) {
                for (int64_t j = j0; j < j1; ++j) gx_row[j + offset] += w_row[j] * gy_row[j];
              } else {
                for (int64_t j = j0; j < j1; ++j) {
                  gx_row[j * g.stride_w + offset] += w_row[j] * gy_row[j];
                }
              }
            }
          }
        }
      }
    }
  });
}

void check_cpu_dtype(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "local_regression: the CPU kernels support float32 and float64 ", name,
                   ", got ", t.scalar_type());
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const LocalGeometry g = check_forward_args(input, weight, bias, stride, padding, dilation, groups);
  check_cpu_dtype("input", input);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(output_shape(g), input.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "local_regression_cpu", [&] {
    forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                             y.mutable_data_ptr<scalar_t>(), g);
  });
  return y;
}

at::Tensor backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                              at::IntArrayRef input_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const LocalGeometry g = check_backward_input_args(grad_output, weight, input_size, stride,
                                                    padding, dilation, groups);
  check_cpu_dtype("grad_output", grad_output);
  const at::Tensor gy = grad_output.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor grad_x = at::empty(input_shape(g), grad_output.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "local_regression_backward_input_cpu", [&] {
    backward_input_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                    grad_x.mutable_data_ptr<scalar_t>(), g);
  });
  return grad_x;
}

at::Tensor backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const LocalGeometry g = check_backward_weight_args(grad_output, input, kernel_size, stride,
                                                     padding, dilation, groups);
  check_cpu_dtype("input", input);
  const at::Tensor gy = grad_output.contiguous();
  const at::Tensor x = input.contiguous();
  at::Tensor grad_w = at::empty(weight_shape(g), input.options());
  if (grad_w.numel() == 0) return grad_w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "local_regression_backward_weight_cpu", [&] {
    backward_weight_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     grad_w.mutable_data_ptr<scalar_t>(), g);
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(reggan_ext, CPU, m) {
  m.impl("local_regression", &forward_cpu);
  m.impl("local_regression_backward_input", &backward_input_cpu);
  m.impl("local_regression_backward_weight", &backward_weight_cpu);
}

}  // namespace reggan_ext
