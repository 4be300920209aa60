// Fused CPU kernels of the locally connected layer: no im2col buffer; the only temporaries are
// padded scratch rows, about kScratchElements per thread. The kernels
// (local_regression_cpu_kernels.h) are compiled once per instruction set and the one that runs
// follows ATen's CPU capability (common/cpu_isa.h). Each output element is written by exactly one task in a fixed order, which
// makes the backward deterministic.
// The lane helpers of cpu_lanes.h are forced inline into the kernels, so their vector values
// never cross a call: the ABI note that GCC gives for them does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/cpu_isa.h"
#include "common/cpu_lanes.h"
#include "common/cpu_output_cache.h"
#include "local_regression/local_regression.h"

namespace reggan_ext {
namespace {

// Tasks of at least this many multiply-adds amortize at::parallel_for's scheduling.
constexpr int64_t kMinTaskWork = 1 << 14;
// A task's padded scratch rows fit in about this much of L2.
template <typename T>
constexpr int64_t kScratchElements = (128 << 10) / sizeof(T);
// The weight gradient's scratch may grow to about this per thread where a task's rows of grad_w
// take more than kScratchElements: fewer steps of samples, each reading and writing them from
// memory, then save more than the scratch's overflowing L2 costs (benchmarks/RESULTS.md).
template <typename T>
constexpr int64_t kWeightGradientScratchElements = (int64_t(4) << 20) / sizeof(T);
// A forward or input-gradient task reads about this many bytes of each weight plane it uses, in
// one ascending span, and a step of channels at most kWeightStreams planes at once: the hardware
// prefetcher follows a few long streams ahead of the loads, not many short ones.
constexpr int64_t kRunBytes = 4096;
constexpr int64_t kWeightStreams = 18;
// A weight gradient of at least this many bytes is stored past the caches by the AVX-512
// kernels (store_lanes): it would not stay cached for its reader anyway. Below, it is faster to
// keep it there.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// dst[t] = src[first + t * step] for t < count, and 0 where that index is outside [0, size): a
// row of the zero-padded input, so that the vector loops that read it need no bounds checks.
template <typename T>
void padded_row(T* dst, const T* src, int64_t size, int64_t first, int64_t step, int64_t count) {
  int64_t begin, end;
  valid_output_range(first, step, size, count, &begin, &end);
  std::fill(dst, dst + begin, T(0));
  if (step == 1) {
    std::memcpy(dst + begin, src + first + begin, (end - begin) * sizeof(T));
  } else {
    for (int64_t t = begin; t < end; ++t) dst[t] = src[first + t * step];
  }
  std::fill(dst + end, dst + count, T(0));
}

}  // namespace

#ifdef REGGAN_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace local_regression_avx512 {
constexpr int kVectorBytes = 64;
constexpr int kBandRows = 4;  // 4 x 4 sums + 4 inputs + 1 weight of 32 registers
constexpr int kBandSamples = 4;
constexpr int kTapTile = 4;
#include "local_regression/cpu/local_regression_cpu_kernels.h"
}  // namespace local_regression_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace local_regression_avx2 {
constexpr int kVectorBytes = 32;
constexpr int kBandRows = 2;  // 2 x 4 sums + 4 inputs + 1 weight of 16 registers
constexpr int kBandSamples = 4;
constexpr int kTapTile = 4;
#include "local_regression/cpu/local_regression_cpu_kernels.h"
}  // namespace local_regression_avx2
#pragma GCC pop_options
#endif

namespace local_regression_baseline {
constexpr int kVectorBytes = 16;
constexpr int kBandRows = 2;
constexpr int kBandSamples = 4;
constexpr int kTapTile = 4;
#include "local_regression/cpu/local_regression_cpu_kernels.h"
}  // namespace local_regression_baseline

namespace {

// The kernels of each instruction set, for with_cpu_isa.
#ifdef REGGAN_X86_ISAS
constexpr CpuIsaTags<local_regression_baseline::Tag, local_regression_avx2::Tag,
                     local_regression_avx512::Tag>
    kKernels{};
#else
constexpr CpuIsaTags<local_regression_baseline::Tag> kKernels{};
#endif

// backward_input for stride_w > 1, where the columns of an input row read different taps:
// grad_x[n, ci, r, :] gathers weight * grad_y over every (o, u, v, i, j) that reads (ci, r).
// One task owns an input row (ci, r) for the whole batch; within it, for fixed v distinct j
// write distinct columns, so the scatter into the row is free of conflicts.
template <typename scalar_t>
void backward_input_strided(const scalar_t* grad_y, const scalar_t* w, scalar_t* grad_x,
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
              for (int64_t j = j0; j < j1; ++j) {
                gx_row[j * g.stride_w + offset] += w_row[j] * gy_row[j];
              }
            }
          }
        }
      }
    }
  });
}

void check_cpu_dtype(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
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
  at::Tensor y = empty_cpu_output(output_shape(g), input.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "local_regression_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_cpu_isa(kKernels, [&](auto isa) { forward(isa, xp, wp, bp, yp, g); });
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
  at::Tensor grad_x = empty_cpu_output(input_shape(g), grad_output.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "local_regression_backward_input_cpu", [&] {
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    if (g.stride_w != 1) return backward_input_strided(gyp, wp, gxp, g);
    with_cpu_isa(kKernels, [&](auto isa) { backward_input(isa, gyp, wp, gxp, g); });
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
  at::Tensor grad_w = empty_cpu_output(weight_shape(g), input.options());
  if (grad_w.numel() == 0) return grad_w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "local_regression_backward_weight_cpu", [&] {
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    with_cpu_isa(kKernels, [&](auto isa) { backward_weight(isa, gyp, xp, gwp, g); });
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
