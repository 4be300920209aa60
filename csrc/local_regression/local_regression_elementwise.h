// Per-thread work of the CUDA local_regression kernels as __host__ __device__ functions, so that
// a C++ test runs the exact index math of every thread on the CPU. A thread is named by a flat
// index e in [0, *_threads(g)); *_thread(e) decodes it and computes the elements it owns:
//
//   forward          (o, i, batch tile, j): y[n, o, i, j] for the n of one batch tile. Each
//                    weight is loaded once per tile and applied to kForwardTile images.
//   backward_input   (ci, r, batch tile, s): grad_x[n, ci, r, s] for the n of one batch tile,
//                    gathered over the (o, u, v) whose window reads (r, s); no scatter.
//   backward_weight  (o, c, u, i, j): grad_w[o, c, u, v, i, j] for every v, each summed over the
//                    batch in order by this one thread; grad_y[:, o, i, j] is held in registers.
//
// j (or s) is the fastest index, so a warp reads and writes contiguous columns. Every output
// element is written by exactly one thread, with a fixed summation order: results are
// deterministic and need no atomics. Sums run in float for float/half/bfloat16 and in double for
// double. index_t is int64_t, or int32_t when fits_int32(g) (the kernels' fast path).
#pragma once

#include <cstdint>

#include "local_regression/local_regression_math.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define REGGAN_UNROLL _Pragma("unroll")
#else
#define REGGAN_UNROLL
#endif

namespace reggan_ext {

// Images per thread in the forward and backward_input kernels, and the batch size up to which
// backward_weight keeps grad_y in registers.
constexpr int kForwardTile = 8;
constexpr int kBackwardInputTile = 8;
constexpr int kBackwardWeightTile = 16;
// Kernel taps whose weights the forward and backward_input threads load before using any, so
// that each thread keeps several reads of the weight stream in flight.
constexpr int kTapChunk = 8;

template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename Accumulate<scalar_t>::type;

// Explicit conversions: torch builds CUDA code with the implicit __half/__nv_bfloat16 ones off.
REGGAN_HD float to_acc(float v) { return v; }
REGGAN_HD double to_acc(double v) { return v; }
REGGAN_HD void store_acc(float* p, float v) { *p = v; }
REGGAN_HD void store_acc(double* p, double v) { *p = v; }
#ifdef __CUDACC__
REGGAN_HD float to_acc(__half v) { return __half2float(v); }
REGGAN_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
REGGAN_HD void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
REGGAN_HD void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

REGGAN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether every offset and coordinate the thread functions form fits in int32_t. Coordinates
// stay within the padded input and offsets within one tensor; the cursors of the tap loops run
// up to one channel or kernel past the end, hence the factor 2 of headroom.
REGGAN_HD bool fits_int32(const LocalGeometry& g) {
  const int64_t limit = INT32_MAX / 2;
  const int64_t values[] = {
      g.batch * g.in_channels * g.in_plane(),
      g.batch * g.out_channels * g.out_plane(),
      g.out_channels * g.in_per_group() * g.kernel_h * g.kernel_w * g.out_plane(),
      g.in_height + 2 * g.pad_h + g.dilation_h + g.stride_h,
      g.in_width + 2 * g.pad_w + g.dilation_w + g.stride_w,
  };
  for (int64_t v : values) {
    if (v > limit) return false;
  }
  return true;
}

// Walks the kernel taps u = 0, 1, ... of one input coordinate `in` and yields the output
// coordinate whose window reads `in` through tap u (output_for_input), without the division per
// tap: (in + pad - u * dilation) = q * stride + rem is updated by subtraction.
template <typename index_t>
struct TapWalker {
  index_t q, rem, stride, q_step, rem_step;

  REGGAN_HD TapWalker(index_t in, index_t pad, index_t stride_, index_t dilation)
      : q((in + pad) / stride_),
        rem((in + pad) % stride_),
        stride(stride_),
        q_step(dilation / stride_),
        rem_step(dilation % stride_) {}

  // The output coordinate of the current tap, or -1 when the tap reads `in` from no output.
  REGGAN_HD index_t output(index_t out_size) const {
    return rem == 0 && q >= 0 && q < out_size ? q : index_t(-1);
  }
  REGGAN_HD void next() {
    q -= q_step;
    rem -= rem_step;
    if (rem < 0) {
      rem += stride;
      --q;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward: y[n0 + t, o, i, j] for t < min(kForwardTile, batch - n0).

REGGAN_HD int64_t forward_threads(const LocalGeometry& g) {
  return g.out_channels * g.out_height * ceil_div(g.batch, kForwardTile) * g.out_width;
}

template <typename scalar_t, typename index_t>
REGGAN_HD void forward_outputs(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                               const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                               const LocalGeometry& g, index_t n0, index_t o, index_t i,
                               index_t j) {
  using acc_t = acc_type<scalar_t>;
  const index_t in_h = g.in_height, in_w = g.in_width;
  const index_t in_plane = in_h * in_w;
  const index_t x_batch = static_cast<index_t>(g.in_channels) * in_plane;
  const index_t out_plane = static_cast<index_t>(g.out_plane());
  const index_t y_batch = static_cast<index_t>(g.out_channels) * out_plane;
  const index_t pixel = i * static_cast<index_t>(g.out_width) + j;
  const index_t kernel_h = g.kernel_h, kernel_w = g.kernel_w;
  const index_t dilation_h = g.dilation_h, dilation_w = g.dilation_w;
  const index_t taps = static_cast<index_t>(g.in_per_group()) * kernel_h * kernel_w;
  const index_t count = static_cast<index_t>(g.batch) - n0 < kForwardTile
                            ? static_cast<index_t>(g.batch) - n0
                            : index_t(kForwardTile);

  // Offsets of the tile's images; a tile past the end of the batch repeats its last image, so
  // that the inner loops need no predicates (those sums are computed but not stored).
  index_t image[kForwardTile];
  acc_t acc[kForwardTile];
  const acc_t b = bias != nullptr ? to_acc(bias[o * out_plane + pixel]) : acc_t(0);
  REGGAN_UNROLL
  for (int t = 0; t < kForwardTile; ++t) {
    image[t] = (t < count ? t : count - 1) * x_batch;
    acc[t] = b;
  }

  // weight[o, c, u, v, i, j] over the taps (c, u, v) of o: one output plane apart.
  const index_t w_o = o * taps * out_plane + pixel;
  const index_t row0 = i * static_cast<index_t>(g.stride_h) - static_cast<index_t>(g.pad_h);
  const index_t col0 = j * static_cast<index_t>(g.stride_w) - static_cast<index_t>(g.pad_w);
  // Cursor of the next tap: its kernel column v and row u, input row and column, and the offset
  // of its input channel's plane in image n0.
  index_t u = 0, v = 0, row = row0, col = col0;
  index_t channel = n0 * x_batch + static_cast<index_t>(g.first_input_channel(o)) * in_plane;
  for (index_t tap0 = 0; tap0 < taps; tap0 += kTapChunk) {
    acc_t weight[kTapChunk];
    index_t offset[kTapChunk];
    bool valid[kTapChunk];
    REGGAN_UNROLL
    for (int q = 0; q < kTapChunk; ++q) {
      const bool in_kernel = tap0 + q < taps;
      valid[q] = in_kernel && row >= 0 && row < in_h && col >= 0 && col < in_w;
      weight[q] = in_kernel ? to_acc(w[w_o + (tap0 + q) * out_plane]) : acc_t(0);
      offset[q] = valid[q] ? channel + row * in_w + col : index_t(0);
      col += dilation_w;
      if (++v == kernel_w) {
        v = 0;
        col = col0;
        row += dilation_h;
        if (++u == kernel_h) {
          u = 0;
          row = row0;
          channel += in_plane;
        }
      }
    }
    REGGAN_UNROLL
    for (int q = 0; q < kTapChunk; ++q) {
      if (!valid[q]) continue;
      REGGAN_UNROLL
      for (int t = 0; t < kForwardTile; ++t) {
        acc[t] += weight[q] * to_acc(x[offset[q] + image[t]]);
      }
    }
  }
  scalar_t* y_out = y + (n0 * y_batch + o * out_plane + pixel);
  REGGAN_UNROLL
  for (int t = 0; t < kForwardTile; ++t) {
    if (t < count) store_acc(y_out + t * y_batch, acc[t]);
  }
}

template <typename scalar_t, typename index_t>
REGGAN_HD void forward_thread(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                              const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                              const LocalGeometry& g, index_t e) {
  const index_t width = g.out_width, height = g.out_height;
  const index_t tiles = static_cast<index_t>(ceil_div(g.batch, kForwardTile));
  const index_t j = e % width;
  e /= width;
  const index_t tile = e % tiles;
  e /= tiles;
  const index_t i = e % height;
  const index_t o = e / height;
  forward_outputs(x, w, bias, y, g, tile * kForwardTile, o, i, j);
}

// ---------------------------------------------------------------------------------------------
// Backward input: grad_x[n0 + t, ci, r, s] for t < min(kBackwardInputTile, batch - n0).

REGGAN_HD int64_t backward_input_threads(const LocalGeometry& g) {
  return g.in_channels * g.in_height * ceil_div(g.batch, kBackwardInputTile) * g.in_width;
}

template <typename scalar_t, typename index_t>
REGGAN_HD void backward_input_elements(const scalar_t* __restrict__ grad_y,
                                       const scalar_t* __restrict__ w,
                                       scalar_t* __restrict__ grad_x, const LocalGeometry& g,
                                       index_t n0, index_t ci, index_t r, index_t s) {
  using acc_t = acc_type<scalar_t>;
  const index_t in_plane = static_cast<index_t>(g.in_plane());
  const index_t x_batch = static_cast<index_t>(g.in_channels) * in_plane;
  const index_t out_h = g.out_height, out_w = g.out_width;
  const index_t out_plane = out_h * out_w;
  const index_t y_batch = static_cast<index_t>(g.out_channels) * out_plane;
  const index_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const index_t kernel_h = g.kernel_h, kernel_w = g.kernel_w;
  const index_t kernel_plane = kernel_h * kernel_w * out_plane;
  const index_t taps = out_per_group * kernel_h * kernel_w;
  const index_t count = static_cast<index_t>(g.batch) - n0 < kBackwardInputTile
                            ? static_cast<index_t>(g.batch) - n0
                            : index_t(kBackwardInputTile);
  const index_t group = ci / in_per_group;
  const index_t c = ci - group * in_per_group;

  // As in forward_outputs, a short tile repeats its last image instead of predicating.
  index_t image[kBackwardInputTile];
  acc_t acc[kBackwardInputTile];
  REGGAN_UNROLL
  for (int t = 0; t < kBackwardInputTile; ++t) {
    image[t] = (t < count ? t : count - 1) * y_batch;
    acc[t] = acc_t(0);
  }

  const TapWalker<index_t> rows(r, g.pad_h, g.stride_h, g.dilation_h);
  const TapWalker<index_t> cols(s, g.pad_w, g.stride_w, g.dilation_w);
  // Cursor of the next tap (o, u, v): the output pixel (i, j) that reads (r, s) through it comes
  // from the walkers; w_oc and gy_o are the offsets of weight[o, c] and grad_y[n0, o].
  const index_t o0 = group * out_per_group;
  index_t u = 0, v = 0;
  TapWalker<index_t> row_tap = rows, col_tap = cols;
  index_t w_oc = (o0 * in_per_group + c) * kernel_plane;
  index_t gy_o = n0 * y_batch + o0 * out_plane;
  for (index_t tap0 = 0; tap0 < taps; tap0 += kTapChunk) {
    acc_t weight[kTapChunk];
    index_t offset[kTapChunk];
    bool valid[kTapChunk];
    REGGAN_UNROLL
    for (int q = 0; q < kTapChunk; ++q) {
      const index_t i = row_tap.output(out_h), j = col_tap.output(out_w);
      valid[q] = tap0 + q < taps && i >= 0 && j >= 0;
      const index_t pixel = i * out_w + j;
      weight[q] = valid[q] ? to_acc(w[w_oc + (u * kernel_w + v) * out_plane + pixel]) : acc_t(0);
      offset[q] = valid[q] ? gy_o + pixel : index_t(0);
      col_tap.next();
      if (++v == kernel_w) {
        v = 0;
        col_tap = cols;
        row_tap.next();
        if (++u == kernel_h) {
          u = 0;
          row_tap = rows;
          w_oc += in_per_group * kernel_plane;
          gy_o += out_plane;
        }
      }
    }
    REGGAN_UNROLL
    for (int q = 0; q < kTapChunk; ++q) {
      if (!valid[q]) continue;
      REGGAN_UNROLL
      for (int t = 0; t < kBackwardInputTile; ++t) {
        acc[t] += weight[q] * to_acc(grad_y[offset[q] + image[t]]);
      }
    }
  }
  scalar_t* gx_out =
      grad_x + (n0 * x_batch + ci * in_plane + r * static_cast<index_t>(g.in_width) + s);
  REGGAN_UNROLL
  for (int t = 0; t < kBackwardInputTile; ++t) {
    if (t < count) store_acc(gx_out + t * x_batch, acc[t]);
  }
}

template <typename scalar_t, typename index_t>
REGGAN_HD void backward_input_thread(const scalar_t* __restrict__ grad_y,
                                     const scalar_t* __restrict__ w,
                                     scalar_t* __restrict__ grad_x, const LocalGeometry& g,
                                     index_t e) {
  const index_t width = g.in_width, height = g.in_height;
  const index_t tiles = static_cast<index_t>(ceil_div(g.batch, kBackwardInputTile));
  const index_t s = e % width;
  e /= width;
  const index_t tile = e % tiles;
  e /= tiles;
  const index_t r = e % height;
  const index_t ci = e / height;
  backward_input_elements(grad_y, w, grad_x, g, tile * kBackwardInputTile, ci, r, s);
}

// ---------------------------------------------------------------------------------------------
// Backward weight: grad_w[o, c, u, v, i, j] = sum over n (in order) of
// grad_y[n, o, i, j] * x[n, c0 + c, row(i, u), col(j, v)], for every v.

REGGAN_HD int64_t backward_weight_threads(const LocalGeometry& g) {
  return g.out_channels * g.in_per_group() * g.kernel_h * g.out_plane();
}

template <typename scalar_t, typename index_t>
REGGAN_HD void backward_weight_elements(const scalar_t* __restrict__ grad_y,
                                        const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ grad_w, const LocalGeometry& g,
                                        index_t o, index_t c, index_t u, index_t i, index_t j) {
  using acc_t = acc_type<scalar_t>;
  const index_t in_h = g.in_height, in_w = g.in_width;
  const index_t in_plane = in_h * in_w;
  const index_t x_batch = static_cast<index_t>(g.in_channels) * in_plane;
  const index_t out_plane = static_cast<index_t>(g.out_plane());
  const index_t y_batch = static_cast<index_t>(g.out_channels) * out_plane;
  const index_t batch = g.batch;
  const index_t kernel_h = g.kernel_h, kernel_w = g.kernel_w, dilation_w = g.dilation_w;
  const index_t in_per_group = g.in_per_group();
  const index_t pixel = i * static_cast<index_t>(g.out_width) + j;
  // grad_w[o, c, u, v, i, j] for v = 0: the v are one output plane apart.
  const index_t gw = ((o * in_per_group + c) * kernel_h + u) * kernel_w * out_plane + pixel;
  const index_t row = i * static_cast<index_t>(g.stride_h) - static_cast<index_t>(g.pad_h) +
                      u * static_cast<index_t>(g.dilation_h);
  if (row < 0 || row >= in_h) {
    for (index_t v = 0; v < kernel_w; ++v) store_acc(grad_w + (gw + v * out_plane), acc_t(0));
    return;
  }
  const index_t x_row =
      (static_cast<index_t>(g.first_input_channel(o)) + c) * in_plane + row * in_w;
  const index_t gy = o * out_plane + pixel;
  const index_t col0 = j * static_cast<index_t>(g.stride_w) - static_cast<index_t>(g.pad_w);

  if (batch <= kBackwardWeightTile) {
    acc_t gy_n[kBackwardWeightTile];
    REGGAN_UNROLL
    for (int t = 0; t < kBackwardWeightTile; ++t) {
      gy_n[t] = t < batch ? to_acc(grad_y[gy + t * y_batch]) : acc_t(0);
    }
    for (index_t v = 0; v < kernel_w; ++v) {
      const index_t col = col0 + v * dilation_w;
      acc_t acc = 0;
      if (col >= 0 && col < in_w) {
        // All loads before the multiply-adds, so that they are in flight together.
        acc_t value[kBackwardWeightTile];
        REGGAN_UNROLL
        for (int t = 0; t < kBackwardWeightTile; ++t) {
          value[t] = t < batch ? to_acc(x[x_row + t * x_batch + col]) : acc_t(0);
        }
        REGGAN_UNROLL
        for (int t = 0; t < kBackwardWeightTile; ++t) {
          if (t < batch) acc += gy_n[t] * value[t];
        }
      }
      store_acc(grad_w + (gw + v * out_plane), acc);
    }
  } else {
    for (index_t v = 0; v < kernel_w; ++v) {
      const index_t col = col0 + v * dilation_w;
      acc_t acc = 0;
      if (col >= 0 && col < in_w) {
        for (index_t n = 0; n < batch; ++n) {
          acc += to_acc(grad_y[gy + n * y_batch]) * to_acc(x[x_row + n * x_batch + col]);
        }
      }
      store_acc(grad_w + (gw + v * out_plane), acc);
    }
  }
}

template <typename scalar_t, typename index_t>
REGGAN_HD void backward_weight_thread(const scalar_t* __restrict__ grad_y,
                                      const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ grad_w, const LocalGeometry& g,
                                      index_t e) {
  const index_t width = g.out_width, height = g.out_height;
  const index_t kernel_h = g.kernel_h, in_per_group = g.in_per_group();
  const index_t j = e % width;
  e /= width;
  const index_t i = e % height;
  e /= height;
  const index_t u = e % kernel_h;
  e /= kernel_h;
  const index_t c = e % in_per_group;
  const index_t o = e / in_per_group;
  backward_weight_elements(grad_y, x, grad_w, g, o, c, u, i, j);
}

}  // namespace reggan_ext
