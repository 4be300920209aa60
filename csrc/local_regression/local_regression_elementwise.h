// Per-thread work of the CUDA local_regression kernels as __host__ __device__ functions, so that
// a C++ test runs the exact index math of every thread on the CPU. A thread is named by a flat
// index e in [0, *_threads<kCols>(g)); *_thread<kCols, kUnitColumns>(e) decodes it and computes
// the elements it owns (kCols: see kColumns; kUnitColumns: see unit_columns):
//
//   forward          (o, i, batch tile, j block): y[n, o, i, j] for the n of one batch tile
//                    (BatchTiles::batch_tile images) and the kCols adjacent j of one block.
//                    Each weight is loaded once per tile and applied to all its images.
//   backward_input   (ci, r, batch tile, s block): grad_x[n, ci, r, s] for the n of one batch
//                    tile and the kCols adjacent s of one block, gathered over the (o, u, v)
//                    whose window reads (r, s); no scatter.
//   backward_weight  (split, o, c, i, u, j block): grad_w[o, c, u, v, i, j] for every v and
//                    the kCols adjacent j of one block, each summed in order by this one
//                    thread over the images of one split of the batch (all of it when there
//                    is one split). With several, each split writes its sums to its own
//                    partial copy of grad_w, and sum_splits adds the copies in order.
//
// Register blocking: the threads take kernel columns kTapColumns at a time, so that one row of
// kCols outputs by kTapColumns taps needs kCols * kTapColumns weights (loaded once per
// batch tile) and, when stride_w and dilation_w are 1 (RegGAN's layers), only
// kCols + kTapColumns - 1 input (or grad_output) columns per image: adjacent outputs share
// them. Other strides and dilations load each of the kCols * kTapColumns values. kCols = 1 keeps
// the tap column steps (a window of kTapColumns columns) for grids too small to block.
//
// Quad columns (kQuads >= 0, kCols = 4, where quad_columns(g) holds and the tensors are aligned
// to Quad): every load and store is one aligned 4-wide vector (Quad) instead of 4 scalars
// strided across the warp, a quarter of the L1 requests. A thread's 4 columns are a quad; the
// input columns its taps read start pad_w % 4 (kQuads) columns off a quad boundary, so the
// thread loads the whole quads around them and picks the values by compile-time offsets.
//
// The j (or s) blocks are the fastest index, so a warp reads and writes adjacent columns. Every
// output element is written by exactly one thread, with a fixed summation order: results are
// deterministic and need no atomics. Sums run in float for float/half/bfloat16 and in double for
// double. index_t is int64_t, or int32_t when fits_int32(g) (the kernels' fast path).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "local_regression/local_regression_math.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace reggan_ext {

// Adjacent output (or, in backward_input, input) columns per thread (kCols) of the register-
// blocked kernels, launched when the grid is large; small grids take kCols = 1 for 4x the
// threads. And kernel columns per step.
constexpr int kColumns = 4;
constexpr int kTapColumns = 4;

// Images per thread in the forward and backward_input kernels (batch_tile), and images whose
// values backward_weight loads per step before summing them (weight_step). double takes half as
// many, as each value needs two registers.
template <typename scalar_t>
struct BatchTiles {
  static constexpr int batch_tile = 8;
  static constexpr int weight_step = 4;
};
template <>
struct BatchTiles<double> {
  static constexpr int batch_tile = 4;
  static constexpr int weight_step = 2;
};

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

// 4 adjacent values, aligned to their size, loaded or stored by one vector instruction.
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Quad {
  scalar_t v[4];
};

// Whether p may be read or written as a Quad (nullptr may).
template <typename scalar_t>
REGGAN_HD bool quad_aligned(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Quad<scalar_t>) == 0;
}

// The host runs the quad paths only in the C++ test, which this makes fail on a misaligned quad
// (on the device it would be a misaligned-address fault).
template <typename scalar_t>
inline void check_quad_aligned_on_host(const scalar_t* p) {
  if (!quad_aligned(p)) {
    std::fprintf(stderr, "local_regression: misaligned quad\n");
    std::abort();
  }
}

template <typename scalar_t>
REGGAN_HD void load_quad(const scalar_t* __restrict__ p, acc_type<scalar_t>* value) {
#ifdef __CUDA_ARCH__
  const Quad<scalar_t> q = *reinterpret_cast<const Quad<scalar_t>*>(p);
  REGGAN_UNROLL
  for (int k = 0; k < 4; ++k) value[k] = to_acc(q.v[k]);
#else
  check_quad_aligned_on_host(p);
  for (int k = 0; k < 4; ++k) value[k] = to_acc(p[k]);
#endif
}

template <typename scalar_t>
REGGAN_HD void store_quad(scalar_t* __restrict__ p, const acc_type<scalar_t>* value) {
#ifdef __CUDA_ARCH__
  Quad<scalar_t> q;
  REGGAN_UNROLL
  for (int k = 0; k < 4; ++k) store_acc(&q.v[k], value[k]);
  *reinterpret_cast<Quad<scalar_t>*>(p) = q;
#else
  check_quad_aligned_on_host(p);
  for (int k = 0; k < 4; ++k) store_acc(p + k, value[k]);
#endif
}

// Whether every offset and coordinate the thread functions form fits in int32_t. Coordinates
// stay within the padded input (give or take kColumns + kTapColumns) and offsets within one
// tensor; the cursors of the tap loops run
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

// Whether stride_w and dilation_w are 1, so that adjacent outputs share input columns. The thread
// functions have a specialisation for this case (kUnitColumns true), which the launchers pick
// by this test; the general one (false) is correct for every geometry.
REGGAN_HD bool unit_columns(const LocalGeometry& g) { return g.stride_w == 1 && g.dilation_w == 1; }

// Whether the quad-column functions (kQuads = pad_w % 4) are correct for the geometry: unit
// column steps and rows of whole quads, so that with aligned tensors (checked at launch) a
// thread's 4 columns and every quad it reads are aligned and lie wholly inside or wholly
// outside a row, which makes zero padding a per-quad test.
static_assert(kColumns == 4, "a quad is one block of columns");
REGGAN_HD bool quad_columns(const LocalGeometry& g) {
  return unit_columns(g) && g.in_width % 4 == 0 && g.out_width % 4 == 0;
}

// line[k] = row[first + k] for k < 4 * kCount (first a multiple of 4), loaded by whole quads:
// those that hold a k in [need_begin, need_end) and lie inside [0, width); zeros elsewhere.
template <int kCount, typename scalar_t, typename index_t>
REGGAN_HD void load_quad_line(const scalar_t* __restrict__ row, index_t first, index_t width,
                              index_t need_begin, index_t need_end,
                              acc_type<scalar_t> (&line)[4 * kCount]) {
  REGGAN_UNROLL
  for (int q = 0; q < kCount; ++q) {
    const index_t at = first + 4 * q;
    if (4 * q < need_end && 4 * q + 3 >= need_begin && at >= 0 && at < width) {
      load_quad(row + at, line + 4 * q);
    } else {
      REGGAN_UNROLL
      for (int k = 0; k < 4; ++k) line[4 * q + k] = acc_type<scalar_t>(0);
    }
  }
}

template <typename index_t>
REGGAN_HD index_t min_index(index_t a, index_t b) { return a < b ? a : b; }

// value[vv][jj] = row[col + jj * stride + vv * dilation] for jj < columns and vv < taps, and 0
// outside [0, width) (zero padding); callers skip the values past columns or taps, which the
// general path sets to 0. With kUnitColumns (stride and dilation 1) these are the
// kCols + kTapColumns - 1 consecutive columns from col, each loaded once; with kQuads >= 0 as
// whole quads: col = j0 - pad_w + v0 with j0 and v0 multiples of 4 lies (4 - kQuads) % 4
// columns past a quad boundary.
template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename index_t>
REGGAN_HD void load_row_window(const scalar_t* __restrict__ row, index_t col, index_t width,
                               index_t stride, index_t dilation, index_t columns, index_t taps,
                               acc_type<scalar_t> (&value)[kTapColumns][kCols]) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (kQuads >= 0) {
    constexpr int kShift = (4 - kQuads) % 4;
    static_assert(kCols == 4, "quad columns are blocks of 4");
    constexpr int kQuadCount = (kShift + kCols + kTapColumns - 1 + 3) / 4;
    acc_t line[4 * kQuadCount];
    load_quad_line<kQuadCount>(row, col - kShift, width, index_t(kShift),
                               kShift + columns + taps - 1, line);
    REGGAN_UNROLL
    for (int vv = 0; vv < kTapColumns; ++vv) {
      REGGAN_UNROLL
      for (int jj = 0; jj < kCols; ++jj) value[vv][jj] = line[kShift + jj + vv];
    }
  } else if constexpr (kUnitColumns) {
    acc_t line[kCols + kTapColumns - 1];
    REGGAN_UNROLL
    for (int k = 0; k < kCols + kTapColumns - 1; ++k) {
      const index_t at = col + k;
      line[k] = k < columns + taps - 1 && at >= 0 && at < width ? to_acc(row[at]) : acc_t(0);
    }
    REGGAN_UNROLL
    for (int vv = 0; vv < kTapColumns; ++vv) {
      REGGAN_UNROLL
      for (int jj = 0; jj < kCols; ++jj) value[vv][jj] = line[jj + vv];
    }
  } else {
    REGGAN_UNROLL
    for (int vv = 0; vv < kTapColumns; ++vv) {
      REGGAN_UNROLL
      for (int jj = 0; jj < kCols; ++jj) {
        // Columns past `columns` may lie far past the row: their position is not formed.
        const bool used = vv < taps && jj < columns;
        const index_t at = used ? col + jj * stride + vv * dilation : index_t(-1);
        value[vv][jj] = at >= 0 && at < width ? to_acc(row[at]) : acc_t(0);
      }
    }
  }
}

// out[t * image_stride + jj] = acc[t][jj] for t < count and jj < columns: a batch tile's rows
// of kCols columns, one quad each with kQuads >= 0.
template <int kQuads, int kTile, int kCols, typename scalar_t, typename index_t>
REGGAN_HD void store_tile(scalar_t* __restrict__ out, index_t image_stride, index_t count,
                          index_t columns, const acc_type<scalar_t> (&acc)[kTile][kCols]) {
  REGGAN_UNROLL
  for (int t = 0; t < kTile; ++t) {
    if constexpr (kQuads >= 0) {
      if (t < count) store_quad(out + t * image_stride, acc[t]);
    } else {
      REGGAN_UNROLL
      for (int jj = 0; jj < kCols; ++jj) {
        if (t < count && jj < columns) store_acc(out + (t * image_stride + jj), acc[t][jj]);
      }
    }
  }
}

// A forward or backward_input thread's rows: channel `channel`, row `row`, images from n0 and
// columns from col0 of `channels` x `height` rows of `width` columns.
template <typename index_t>
struct RowBlock {
  index_t channel, row, n0, col0;
};

// Threads of kCols columns and batch_tile images each over those rows.
template <int kCols, typename scalar_t>
REGGAN_HD int64_t row_block_threads(int64_t channels, int64_t height, int64_t width,
                                    int64_t batch) {
  return channels * height * ceil_div(batch, BatchTiles<scalar_t>::batch_tile) *
         ceil_div(width, kCols);
}

// Thread e's rows (the order of the file's first comment).
template <int kCols, typename scalar_t, typename index_t>
REGGAN_HD RowBlock<index_t> row_block(index_t e, int64_t height, int64_t width, int64_t batch) {
  constexpr int kTile = BatchTiles<scalar_t>::batch_tile;
  const index_t blocks = static_cast<index_t>(ceil_div(width, kCols));
  const index_t tiles = static_cast<index_t>(ceil_div(batch, kTile));
  const index_t rows = static_cast<index_t>(height);
  const index_t col0 = e % blocks * kCols;
  e /= blocks;
  const index_t n0 = e % tiles * kTile;
  e /= tiles;
  return {e / rows, e % rows, n0, col0};
}

// ---------------------------------------------------------------------------------------------
// Forward: y[n0 + t, o, i, j0 + jj] for t < min(batch_tile, batch - n0) and
// jj < min(kCols, out_width - j0).

template <int kCols, typename scalar_t>
REGGAN_HD int64_t forward_threads(const LocalGeometry& g) {
  return row_block_threads<kCols, scalar_t>(g.out_channels, g.out_height, g.out_width, g.batch);
}

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename index_t>
REGGAN_HD void forward_outputs(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                               const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                               const LocalGeometry& g, index_t n0, index_t o, index_t i,
                               index_t j0) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kTile = BatchTiles<scalar_t>::batch_tile;
  const index_t in_h = g.in_height, in_w = g.in_width;
  const index_t in_plane = in_h * in_w;
  const index_t x_batch = static_cast<index_t>(g.in_channels) * in_plane;
  const index_t out_w = g.out_width;
  const index_t out_plane = static_cast<index_t>(g.out_plane());
  const index_t y_batch = static_cast<index_t>(g.out_channels) * out_plane;
  const index_t pixel = i * out_w + j0;
  const index_t kernel_h = g.kernel_h, kernel_w = g.kernel_w;
  const index_t stride_w = g.stride_w, dilation_h = g.dilation_h, dilation_w = g.dilation_w;
  const index_t in_per_group = g.in_per_group();
  const index_t columns = min_index(out_w - j0, index_t(kCols));
  const index_t count = min_index(static_cast<index_t>(g.batch) - n0, index_t(kTile));

  // Offsets of the tile's images; a tile past the end of the batch repeats its last image, so
  // that the inner loops need no predicates (those sums are computed but not stored).
  index_t image[kTile];
  acc_t acc[kTile][kCols];
  acc_t b[kCols];
  if (kQuads >= 0 && bias != nullptr) {
    load_quad(bias + (o * out_plane + pixel), b);
  } else {
    REGGAN_UNROLL
    for (int jj = 0; jj < kCols; ++jj) {
      b[jj] = bias != nullptr && jj < columns ? to_acc(bias[o * out_plane + pixel + jj]) : acc_t(0);
    }
  }
  REGGAN_UNROLL
  for (int t = 0; t < kTile; ++t) {
    image[t] = (t < count ? t : count - 1) * x_batch;
    REGGAN_UNROLL
    for (int jj = 0; jj < kCols; ++jj) acc[t][jj] = b[jj];
  }

  const index_t row0 = i * static_cast<index_t>(g.stride_h) - static_cast<index_t>(g.pad_h);
  const index_t col0 = j0 * stride_w - static_cast<index_t>(g.pad_w);
  // weight[o, c, u, v, i, j0] for the current (c, u) and v = 0: the v are one plane apart.
  index_t w_row = o * in_per_group * kernel_h * kernel_w * out_plane + pixel;
  // Offset of input channel c's plane in image n0.
  index_t channel = n0 * x_batch + static_cast<index_t>(g.first_input_channel(o)) * in_plane;
  for (index_t c = 0; c < in_per_group; ++c, channel += in_plane) {
    for (index_t u = 0; u < kernel_h; ++u, w_row += kernel_w * out_plane) {
      const index_t row = row0 + u * dilation_h;
      if (row < 0 || row >= in_h) {
        // The padding's zeros add nothing unless a weight is NaN or Inf, whose product with zero
        // is NaN: so in the reference and the CPU kernels, and here (as over padded columns).
        for (index_t v = 0; v < kernel_w; ++v) {
          REGGAN_UNROLL
          for (int jj = 0; jj < kCols; ++jj) {
            const acc_t nothing =
                jj < columns ? to_acc(w[w_row + v * out_plane + jj]) * acc_t(0) : acc_t(0);
            REGGAN_UNROLL
            for (int t = 0; t < kTile; ++t) acc[t][jj] += nothing;
          }
        }
        continue;
      }
      const scalar_t* x_row = x + (channel + row * in_w);
      for (index_t v0 = 0; v0 < kernel_w; v0 += kTapColumns) {
        const index_t taps = min_index(kernel_w - v0, index_t(kTapColumns));
        acc_t weight[kTapColumns][kCols];
        REGGAN_UNROLL
        for (int vv = 0; vv < kTapColumns; ++vv) {
          if (kQuads >= 0 && vv < taps) {
            load_quad(w + (w_row + (v0 + vv) * out_plane), weight[vv]);
          } else {
            REGGAN_UNROLL
            for (int jj = 0; jj < kCols; ++jj) {
              weight[vv][jj] = vv < taps && jj < columns
                                   ? to_acc(w[w_row + (v0 + vv) * out_plane + jj])
                                   : acc_t(0);
            }
          }
        }
        REGGAN_UNROLL
        for (int t = 0; t < kTile; ++t) {
          acc_t value[kTapColumns][kCols];
          load_row_window<kCols, kUnitColumns, kQuads>(x_row + image[t], col0 + v0 * dilation_w,
                                                       in_w, stride_w, dilation_w, columns, taps,
                                                       value);
          // Predicated, not a branch, with unit columns: a branch would keep the compiler from
          // issuing the next images' loads before these multiply-adds. The general kernels keep
          // it: hoisting their kCols x kTapColumns loads per image would spill.
          REGGAN_UNROLL
          for (int vv = 0; vv < kTapColumns; ++vv) {
            if (!kUnitColumns && vv >= taps) break;
            REGGAN_UNROLL
            for (int jj = 0; jj < kCols; ++jj) {
              if (vv < taps) acc[t][jj] += weight[vv][jj] * value[vv][jj];
            }
          }
        }
      }
    }
  }
  store_tile<kQuads>(y + (n0 * y_batch + o * out_plane + pixel), y_batch, count, columns, acc);
}

template <int kCols, bool kUnitColumns, int kQuads = -1, typename scalar_t, typename index_t>
REGGAN_HD void forward_thread(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                              const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                              const LocalGeometry& g, index_t e) {
  const RowBlock<index_t> t = row_block<kCols, scalar_t>(e, g.out_height, g.out_width, g.batch);
  forward_outputs<kCols, kUnitColumns, kQuads>(x, w, bias, y, g, t.n0, t.channel, t.row, t.col0);
}

// ---------------------------------------------------------------------------------------------
// Backward input: grad_x[n0 + t, ci, r, s0 + ss] for t < min(batch_tile, batch - n0) and
// ss < min(kCols, in_width - s0).

template <int kCols, typename scalar_t>
REGGAN_HD int64_t backward_input_threads(const LocalGeometry& g) {
  return row_block_threads<kCols, scalar_t>(g.in_channels, g.in_height, g.in_width, g.batch);
}

// The output column whose window reads input column s through kernel column v, or -1 if none.
// With kUnitColumns (stride and dilation 1) this needs no division.
template <bool kUnitColumns, typename index_t>
REGGAN_HD index_t output_column(index_t s, index_t v, index_t pad, index_t stride,
                                index_t dilation, index_t out_size) {
  const index_t shifted = s + pad - v * dilation;
  if (kUnitColumns) return shifted >= 0 && shifted < out_size ? shifted : index_t(-1);
  if (shifted < 0 || shifted % stride != 0) return -1;
  return shifted / stride < out_size ? shifted / stride : index_t(-1);
}

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename index_t>
REGGAN_HD void backward_input_elements(const scalar_t* __restrict__ grad_y,
                                       const scalar_t* __restrict__ w,
                                       scalar_t* __restrict__ grad_x, const LocalGeometry& g,
                                       index_t n0, index_t ci, index_t r, index_t s0) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kTile = BatchTiles<scalar_t>::batch_tile;
  const index_t in_w = g.in_width;
  const index_t in_plane = static_cast<index_t>(g.in_plane());
  const index_t x_batch = static_cast<index_t>(g.in_channels) * in_plane;
  const index_t out_h = g.out_height, out_w = g.out_width;
  const index_t out_plane = out_h * out_w;
  const index_t y_batch = static_cast<index_t>(g.out_channels) * out_plane;
  const index_t in_per_group = g.in_per_group(), out_per_group = g.out_per_group();
  const index_t kernel_h = g.kernel_h, kernel_w = g.kernel_w;
  const index_t kernel_plane = kernel_h * kernel_w * out_plane;
  const index_t pad_w = g.pad_w, stride_w = g.stride_w, dilation_w = g.dilation_w;
  const index_t columns = min_index(in_w - s0, index_t(kCols));
  const index_t count = min_index(static_cast<index_t>(g.batch) - n0, index_t(kTile));
  const index_t group = ci / in_per_group;
  const index_t c = ci - group * in_per_group;

  // As in forward_outputs, a short tile repeats its last image instead of predicating.
  index_t image[kTile];
  acc_t acc[kTile][kCols];
  REGGAN_UNROLL
  for (int t = 0; t < kTile; ++t) {
    image[t] = (t < count ? t : count - 1) * y_batch;
    REGGAN_UNROLL
    for (int ss = 0; ss < kCols; ++ss) acc[t][ss] = acc_t(0);
  }

  const TapWalker<index_t> rows(r, g.pad_h, g.stride_h, g.dilation_h);
  const index_t o0 = group * out_per_group;
  // Offsets of weight[o, c] and grad_y[n0, o] for the current o.
  index_t w_oc = (o0 * in_per_group + c) * kernel_plane;
  index_t gy_o = n0 * y_batch + o0 * out_plane;
  for (index_t o = 0; o < out_per_group;
       ++o, w_oc += in_per_group * kernel_plane, gy_o += out_plane) {
    TapWalker<index_t> row_tap = rows;
    for (index_t u = 0; u < kernel_h; ++u, row_tap.next()) {
      const index_t i = row_tap.output(out_h);
      if (i < 0) continue;
      // weight[o, c, u, v, i, 0] for v = 0 (the v are one plane apart), and grad_y[n0, o, i, 0].
      const index_t w_row = w_oc + u * kernel_w * out_plane + i * out_w;
      const scalar_t* gy_row = grad_y + (gy_o + i * out_w);
      for (index_t v0 = 0; v0 < kernel_w; v0 += kTapColumns) {
        const index_t taps = min_index(kernel_w - v0, index_t(kTapColumns));
        // Output column j[vv][ss] that reads input column s0 + ss through kernel column v0 + vv
        // (-1 for none, or past the columns and taps), and its weight.
        index_t j[kTapColumns][kCols];
        acc_t weight[kTapColumns][kCols];
        REGGAN_UNROLL
        for (int vv = 0; vv < kTapColumns; ++vv) {
          if constexpr (kQuads >= 0) {
            // Output columns s0 + pad_w - v0 - vv + ss, from (kQuads - vv) % 4 past a quad
            // boundary: the quad there and, unless that is 0, the next one.
            const int shift = (kQuads - vv) & 3;
            acc_t quads[8];
            load_quad_line<2>(w + (w_row + (v0 + vv) * out_plane), s0 + pad_w - v0 - vv - shift,
                              out_w, index_t(shift), index_t(vv < taps ? shift + 4 : 0), quads);
            REGGAN_UNROLL
            for (int ss = 0; ss < kCols; ++ss) weight[vv][ss] = quads[shift + ss];
          } else {
            REGGAN_UNROLL
            for (int ss = 0; ss < kCols; ++ss) {
              j[vv][ss] = vv < taps && ss < columns
                              ? output_column<kUnitColumns>(s0 + ss, v0 + vv, pad_w, stride_w,
                                                            dilation_w, out_w)
                              : index_t(-1);
              weight[vv][ss] = j[vv][ss] >= 0
                                   ? to_acc(w[w_row + (v0 + vv) * out_plane + j[vv][ss]])
                                   : acc_t(0);
            }
          }
        }
        REGGAN_UNROLL
        for (int t = 0; t < kTile; ++t) {
          acc_t value[kTapColumns][kCols];
          if constexpr (kQuads >= 0) {
            // As below, with first kShift columns past a quad boundary.
            constexpr int kShift = (kQuads + 1) % 4;
            constexpr int kQuadCount = (kShift + kCols + kTapColumns - 1 + 3) / 4;
            acc_t line[4 * kQuadCount];
            load_quad_line<kQuadCount>(gy_row + image[t],
                                       s0 + pad_w - v0 - (kTapColumns - 1) - kShift, out_w,
                                       kShift + kTapColumns - taps,
                                       index_t(kShift + kCols + kTapColumns - 1), line);
            REGGAN_UNROLL
            for (int vv = 0; vv < kTapColumns; ++vv) {
              REGGAN_UNROLL
              for (int ss = 0; ss < kCols; ++ss) {
                value[vv][ss] = line[kShift + ss - vv + kTapColumns - 1];
              }
            }
          } else if constexpr (kUnitColumns) {
            // j[vv][ss] = first + ss - vv + kTapColumns - 1: one line of grad_y columns.
            const index_t first = s0 + pad_w - v0 - (kTapColumns - 1);
            acc_t line[kCols + kTapColumns - 1];
            REGGAN_UNROLL
            for (int k = 0; k < kCols + kTapColumns - 1; ++k) {
              const index_t at = first + k;
              line[k] = k >= kTapColumns - taps && at >= 0 && at < out_w
                            ? to_acc(gy_row[image[t] + at])
                            : acc_t(0);
            }
            REGGAN_UNROLL
            for (int vv = 0; vv < kTapColumns; ++vv) {
              REGGAN_UNROLL
              for (int ss = 0; ss < kCols; ++ss) {
                value[vv][ss] = line[ss - vv + kTapColumns - 1];
              }
            }
          } else {
            REGGAN_UNROLL
            for (int vv = 0; vv < kTapColumns; ++vv) {
              REGGAN_UNROLL
              for (int ss = 0; ss < kCols; ++ss) {
                value[vv][ss] = j[vv][ss] >= 0 ? to_acc(gy_row[image[t] + j[vv][ss]]) : acc_t(0);
              }
            }
          }
          // Predicated with unit columns, as in forward_outputs.
          REGGAN_UNROLL
          for (int vv = 0; vv < kTapColumns; ++vv) {
            if (!kUnitColumns && vv >= taps) break;
            REGGAN_UNROLL
            for (int ss = 0; ss < kCols; ++ss) {
              if (vv < taps) acc[t][ss] += weight[vv][ss] * value[vv][ss];
            }
          }
        }
      }
    }
  }
  store_tile<kQuads>(grad_x + (n0 * x_batch + ci * in_plane + r * in_w + s0), x_batch, count,
                     columns, acc);
}

template <int kCols, bool kUnitColumns, int kQuads = -1, typename scalar_t, typename index_t>
REGGAN_HD void backward_input_thread(const scalar_t* __restrict__ grad_y,
                                     const scalar_t* __restrict__ w,
                                     scalar_t* __restrict__ grad_x, const LocalGeometry& g,
                                     index_t e) {
  const RowBlock<index_t> t = row_block<kCols, scalar_t>(e, g.in_height, g.in_width, g.batch);
  backward_input_elements<kCols, kUnitColumns, kQuads>(grad_y, w, grad_x, g, t.n0, t.channel,
                                                       t.row, t.col0);
}

// ---------------------------------------------------------------------------------------------
// Backward weight: grad_w[o, c, u, v, i, j0 + jj] = sum over n in [n_begin, n_end) (in order)
// of grad_y[n, o, i, j0 + jj] * x[n, c0 + c, row(i, u), col(j0 + jj, v)], for every v and
// jj < min(kCols, out_width - j0). grad_w is out_t: scalar_t, or the accumulation type for the
// partial sums of a split batch.

REGGAN_HD int64_t weight_elements(const LocalGeometry& g) {
  return g.out_channels * g.in_per_group() * g.kernel_h * g.kernel_w * g.out_plane();
}

template <int kCols>
REGGAN_HD int64_t backward_weight_threads(const LocalGeometry& g, int64_t splits = 1) {
  return splits * g.out_channels * g.in_per_group() * g.kernel_h * g.out_height *
         ceil_div(g.out_width, kCols);
}

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename out_t,
          typename index_t>
REGGAN_HD void backward_weight_elements(const scalar_t* __restrict__ grad_y,
                                        const scalar_t* __restrict__ x,
                                        out_t* __restrict__ grad_w, const LocalGeometry& g,
                                        index_t o, index_t c, index_t u, index_t i, index_t j0,
                                        index_t n_begin, index_t n_end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kStep = BatchTiles<scalar_t>::weight_step;
  const index_t in_h = g.in_height, in_w = g.in_width;
  const index_t in_plane = in_h * in_w;
  const index_t x_batch = static_cast<index_t>(g.in_channels) * in_plane;
  const index_t out_w = g.out_width;
  const index_t out_plane = static_cast<index_t>(g.out_plane());
  const index_t y_batch = static_cast<index_t>(g.out_channels) * out_plane;
  const index_t kernel_h = g.kernel_h, kernel_w = g.kernel_w;
  const index_t stride_w = g.stride_w, dilation_w = g.dilation_w;
  const index_t in_per_group = g.in_per_group();
  const index_t columns = min_index(out_w - j0, index_t(kCols));
  const index_t pixel = i * out_w + j0;
  // grad_w[o, c, u, v, i, j0] for v = 0: the v are one output plane apart.
  const index_t gw = ((o * in_per_group + c) * kernel_h + u) * kernel_w * out_plane + pixel;
  const index_t row = i * static_cast<index_t>(g.stride_h) - static_cast<index_t>(g.pad_h) +
                      u * static_cast<index_t>(g.dilation_h);
  const bool row_inside = row >= 0 && row < in_h;
  const index_t x_row =
      (static_cast<index_t>(g.first_input_channel(o)) + c) * in_plane + row * in_w;
  const index_t gy = o * out_plane + pixel;
  const index_t col0 = j0 * stride_w - static_cast<index_t>(g.pad_w);

  for (index_t v0 = 0; v0 < kernel_w; v0 += kTapColumns) {
    const index_t taps = min_index(kernel_w - v0, index_t(kTapColumns));
    acc_t acc[kTapColumns][kCols];
    REGGAN_UNROLL
    for (int vv = 0; vv < kTapColumns; ++vv) {
      REGGAN_UNROLL
      for (int jj = 0; jj < kCols; ++jj) acc[vv][jj] = acc_t(0);
    }
    // A row in the padding reads only zeros.
    for (index_t n0 = n_begin; row_inside && n0 < n_end; n0 += kStep) {
      // All of a step's loads before its multiply-adds, so that they are in flight together. A
      // step past the end of the range loads its last image again and does not sum it.
      acc_t grad[kStep][kCols];
      acc_t value[kStep][kTapColumns][kCols];
      REGGAN_UNROLL
      for (int t = 0; t < kStep; ++t) {
        const index_t n = n0 + t < n_end ? n0 + t : n_end - 1;
        if constexpr (kQuads >= 0) {
          load_quad(grad_y + (gy + n * y_batch), grad[t]);
        } else {
          REGGAN_UNROLL
          for (int jj = 0; jj < kCols; ++jj) {
            grad[t][jj] = jj < columns ? to_acc(grad_y[gy + n * y_batch + jj]) : acc_t(0);
          }
        }
        load_row_window<kCols, kUnitColumns, kQuads>(x + (x_row + n * x_batch),
                                                     col0 + v0 * dilation_w, in_w, stride_w,
                                                     dilation_w, columns, taps, value[t]);
      }
      REGGAN_UNROLL
      for (int t = 0; t < kStep; ++t) {
        if (n0 + t >= n_end) break;
        REGGAN_UNROLL
        for (int vv = 0; vv < kTapColumns; ++vv) {
          if (vv >= taps) break;
          REGGAN_UNROLL
          for (int jj = 0; jj < kCols; ++jj) acc[vv][jj] += grad[t][jj] * value[t][vv][jj];
        }
      }
    }
    REGGAN_UNROLL
    for (int vv = 0; vv < kTapColumns; ++vv) {
      if constexpr (kQuads >= 0) {
        if (vv < taps) store_quad(grad_w + (gw + (v0 + vv) * out_plane), acc[vv]);
      } else {
        REGGAN_UNROLL
        for (int jj = 0; jj < kCols; ++jj) {
          if (vv < taps && jj < columns) {
            store_acc(grad_w + (gw + (v0 + vv) * out_plane + jj), acc[vv][jj]);
          }
        }
      }
    }
  }
}

// grad_w: grad_weight when splits is 1, else the splits partial copies of it.
template <int kCols, bool kUnitColumns, int kQuads = -1, typename scalar_t, typename out_t,
          typename index_t>
REGGAN_HD void backward_weight_thread(const scalar_t* __restrict__ grad_y,
                                      const scalar_t* __restrict__ x, out_t* __restrict__ grad_w,
                                      const LocalGeometry& g, index_t splits, index_t e) {
  const index_t per_split = static_cast<index_t>(backward_weight_threads<kCols>(g));
  const index_t split = e / per_split;
  e -= split * per_split;
  const index_t chunk = static_cast<index_t>(ceil_div(g.batch, splits));
  const index_t n_begin = min_index(split * chunk, static_cast<index_t>(g.batch));
  const index_t n_end = min_index(n_begin + chunk, static_cast<index_t>(g.batch));
  // 64-bit: the partial copies together may pass 2^31 elements.
  out_t* const out = grad_w + split * weight_elements(g);
  const index_t blocks = static_cast<index_t>(ceil_div(g.out_width, kCols));
  const index_t height = g.out_height;
  const index_t kernel_h = g.kernel_h, in_per_group = g.in_per_group();
  // u before i: the threads of one output row (its kernel rows u) share its grad_output row
  // and most of their input rows, in L1 or L2, instead of reading them kernel_h times from DRAM.
  const index_t block = e % blocks;
  e /= blocks;
  const index_t u = e % kernel_h;
  e /= kernel_h;
  const index_t i = e % height;
  e /= height;
  const index_t c = e % in_per_group;
  const index_t o = e / in_per_group;
  backward_weight_elements<kCols, kUnitColumns, kQuads>(grad_y, x, out, g, o, c, u, i,
                                                        block * kCols, n_begin, n_end);
}

// grad_w[e] = the sum of partial[s * elements + e] over s < splits, in order.
template <typename scalar_t, typename acc_t>
REGGAN_HD void sum_splits(const acc_t* __restrict__ partial, scalar_t* __restrict__ grad_w,
                          int64_t elements, int64_t splits, int64_t e) {
  acc_t sum = partial[e];
  for (int64_t s = 1; s < splits; ++s) sum += partial[s * elements + e];
  store_acc(grad_w + e, sum);
}

}  // namespace reggan_ext
