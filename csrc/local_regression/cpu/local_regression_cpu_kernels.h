// CPU kernels of local_regression, vectorized along output rows. local_regression_cpu.cpp
// includes this file once per instruction set, inside a namespace that defines kVectorBytes (the
// SIMD width in bytes), kVectors (registers per block of a row), kBatchTile (samples that share
// each weight load) and kTapTile (weight-gradient rows accumulated side by side), after including
// everything it uses. Hence no include guard and no includes.
//
// Every kernel owns whole output rows, accumulates a block of a row in registers over all the
// terms it sums and writes it once. The rows it reads at shifted columns are first copied into
// zero-padded scratch rows (padded_row), so the vector loops need no bounds checks and any
// stride and dilation reads contiguously. Each output element is summed by one task in a fixed
// order, so results do not depend on the number of threads.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

// kVectors registers along a row.
template <typename T>
using Block = cpu_lanes::WideLanes<T, kVectorBytes, kVectors>;

// acc[n] += a_rows[t][jb + l] * b_rows[t * kBatch + n][jb + l] for every tap t < taps and lane l
// of the block. a_rows are read for a_lanes lanes (zeros after them), so that a row of the
// caller's tensor that ends inside the block is not read past its end; b_rows are scratch rows
// padded to whole blocks. a_lanes is a constant for whole blocks once inlined.
template <int kBatch, typename T>
REGGAN_CPU_INLINE void accumulate_taps(typename Block<T>::value* acc, const T* const* a_rows,
                                       const T* const* b_rows, int64_t taps, int64_t jb,
                                       int64_t a_lanes) {
  using L = Block<T>;
  for (int64_t t = 0; t < taps; ++t) {
    const typename L::value a = L::load(a_rows[t] + jb, a_lanes);
    const T* const* b = b_rows + t * kBatch;
#pragma GCC unroll 16
    for (int n = 0; n < kBatch; ++n) acc[n] += a * L::load(b[n] + jb, L::kWidth);
  }
}

template <int kBatch, typename T>
REGGAN_CPU_INLINE void accumulate_block(typename Block<T>::value* acc, const T* const* a_rows,
                                        const T* const* b_rows, int64_t taps, int64_t jb,
                                        int64_t a_lanes) {
  if (a_lanes == Block<T>::kWidth) {
    accumulate_taps<kBatch>(acc, a_rows, b_rows, taps, jb, Block<T>::kWidth);
  } else {
    accumulate_taps<kBatch>(acc, a_rows, b_rows, taps, jb, a_lanes);
  }
}

// Elements of a scratch row that a whole number of blocks of `width` columns reads, `extra`
// columns beyond the block start included.
template <typename T>
int64_t scratch_row_length(int64_t width, int64_t extra) {
  const int64_t lanes = Block<T>::kWidth;
  return (width + lanes - 1) / lanes * lanes + extra;
}

// Forward for samples n0 .. n0 + kBatch - 1 of output row (o, i). The input channels are taken
// c_step at a time so that their padded rows stay in `rows`; y holds the partial sums between
// steps. Input row (n, c, u) is kept as stride_w phase rows: phase p holds the input columns
// p - pad_w + t * stride_w, so tap v reads phase (v * dilation_w) % stride_w contiguously from
// t = j + (v * dilation_w) / stride_w.
template <int kBatch, typename T>
void forward_rows(const T* x, const T* w, const T* bias, T* y, const LocalGeometry& g, int64_t o,
                  int64_t i, int64_t n0, int64_t row_len, int64_t c_step, T* rows,
                  const T** a_rows, const T** b_rows) {
  using L = Block<T>;
  using V = typename L::value;
  const int64_t c0 = g.first_input_channel(o);
  const int64_t phases = g.stride_w;
  T* y_rows[kBatch];
  for (int n = 0; n < kBatch; ++n) {
    y_rows[n] = y + (((n0 + n) * g.out_channels + o) * g.out_height + i) * g.out_width;
  }
  const T* bias_row = bias != nullptr ? bias + (o * g.out_height + i) * g.out_width : nullptr;
  // At least one step, so that the output is written when there are no input channels.
  for (int64_t c_begin = 0; c_begin == 0 || c_begin < g.in_per_group(); c_begin += c_step) {
    const int64_t c_end = std::min(g.in_per_group(), c_begin + c_step);
    int64_t taps = 0;
    T* row = rows;
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t u = 0; u < g.kernel_h; ++u) {
        const int64_t r = g.input_row(i, u);
        if (r < 0 || r >= g.in_height) continue;
        for (int n = 0; n < kBatch; ++n) {
          const T* x_row = x + (((n0 + n) * g.in_channels + c0 + c) * g.in_height + r) * g.in_width;
          for (int64_t p = 0; p < phases; ++p) {
            padded_row(row + (n * phases + p) * row_len, x_row, g.in_width, p - g.pad_w,
                       g.stride_w, row_len);
          }
        }
        for (int64_t v = 0; v < g.kernel_w; ++v) {
          const int64_t m = v * g.dilation_w;
          a_rows[taps] = w + g.weight_row(o, c, u, v, i);
          for (int n = 0; n < kBatch; ++n) {
            b_rows[taps * kBatch + n] = row + (n * phases + m % phases) * row_len + m / phases;
          }
          ++taps;
        }
        row += kBatch * phases * row_len;
      }
    }
    for (int64_t jb = 0; jb < g.out_width; jb += L::kWidth) {
      const int64_t lanes = std::min<int64_t>(L::kWidth, g.out_width - jb);
      V acc[kBatch];
      const V start = bias_row != nullptr ? L::load(bias_row + jb, lanes) : V{};
      for (int n = 0; n < kBatch; ++n) acc[n] = c_begin > 0 ? L::load(y_rows[n] + jb, lanes) : start;
      accumulate_block<kBatch>(acc, a_rows, b_rows, taps, jb, lanes);
      for (int n = 0; n < kBatch; ++n) L::store(y_rows[n] + jb, acc[n], lanes);
    }
  }
}

// One task per output row (o, i), all samples: the weight rows of (o, i), read from memory once,
// serve kBatchTile samples per load from cache.
template <typename T>
void forward(Tag, const T* x, const T* w, const T* bias, T* y, const LocalGeometry& g) {
  const int64_t phases = g.stride_w;
  const int64_t row_len =
      scratch_row_length<T>(g.out_width, (g.kernel_w - 1) * g.dilation_w / g.stride_w);
  const int64_t per_channel = kBatchTile * g.kernel_h * phases * row_len;
  const int64_t c_step = std::clamp<int64_t>(kScratchElements<T> / per_channel, 1,
                                             std::max<int64_t>(1, g.in_per_group()));
  const int64_t taps = c_step * g.kernel_h * g.kernel_w;
  const int64_t work = g.batch * g.in_per_group() * g.kernel_h * g.kernel_w * g.out_width;
  at::parallel_for(0, g.out_channels * g.out_height, grain_for(work), [&](int64_t begin,
                                                                          int64_t end) {
    std::vector<T> rows(c_step * per_channel);
    std::vector<const T*> a_rows(taps), b_rows(taps * kBatchTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / g.out_height;
      const int64_t i = task % g.out_height;
      int64_t n0 = 0;
      for (; n0 + kBatchTile <= g.batch; n0 += kBatchTile) {
        forward_rows<kBatchTile>(x, w, bias, y, g, o, i, n0, row_len, c_step, rows.data(),
                                 a_rows.data(), b_rows.data());
      }
      for (; n0 < g.batch; ++n0) {
        forward_rows<1>(x, w, bias, y, g, o, i, n0, row_len, c_step, rows.data(), a_rows.data(),
                        b_rows.data());
      }
    }
  });
}

// grad_x for samples n0 .. n0 + kBatch - 1 of input row (ci, r), stride_w == 1: column col
// gathers weight * grad_y at output column j = col + pad_w - v * dilation_w over every (o, u, v).
// The weight rows (w_rows, per (o, u, v) of the step) and the grad_y rows (per (n, o, u)) are
// padded with zeros so that j outside [0, W_out) contributes nothing; both are read from
// t = col + pad_w + (kW - 1 - v) * dilation_w. grad_x holds the partial sums between steps of
// output channels.
template <int kBatch, typename T>
void backward_input_rows(const T* grad_y, T* grad_x, const LocalGeometry& g, int64_t ci, int64_t r,
                         int64_t n0, int64_t first_o, int64_t o_begin, int64_t o_end,
                         int64_t row_len,
                         const T* w_rows, T* gy_rows, const T** a_rows, const T** b_rows) {
  using L = Block<T>;
  using V = typename L::value;
  const int64_t lead = (g.kernel_w - 1) * g.dilation_w;
  T* gx_rows[kBatch];
  for (int n = 0; n < kBatch; ++n) {
    gx_rows[n] = grad_x + (((n0 + n) * g.in_channels + ci) * g.in_height + r) * g.in_width;
  }
  int64_t taps = 0;
  const T* w_row = w_rows;
  T* gy_row = gy_rows;
  for (int64_t o = first_o + o_begin; o < first_o + o_end; ++o) {
    for (int64_t u = 0; u < g.kernel_h; ++u) {
      const int64_t i = output_for_input(r, u, g.stride_h, g.pad_h, g.dilation_h, g.out_height);
      if (i < 0) continue;
      for (int n = 0; n < kBatch; ++n) {
        padded_row(gy_row + n * row_len,
                   grad_y + (((n0 + n) * g.out_channels + o) * g.out_height + i) * g.out_width,
                   g.out_width, -lead, 1, row_len);
      }
      for (int64_t v = 0; v < g.kernel_w; ++v) {
        const int64_t t = g.pad_w + (g.kernel_w - 1 - v) * g.dilation_w;
        a_rows[taps] = w_row + t;
        for (int n = 0; n < kBatch; ++n) b_rows[taps * kBatch + n] = gy_row + n * row_len + t;
        w_row += row_len;
        ++taps;
      }
      gy_row += kBatch * row_len;
    }
  }
  for (int64_t jb = 0; jb < g.in_width; jb += L::kWidth) {
    const int64_t lanes = std::min<int64_t>(L::kWidth, g.in_width - jb);
    V acc[kBatch];
    for (int n = 0; n < kBatch; ++n) acc[n] = o_begin > 0 ? L::load(gx_rows[n] + jb, lanes) : V{};
    accumulate_taps<kBatch>(acc, a_rows, b_rows, taps, jb, L::kWidth);
    for (int n = 0; n < kBatch; ++n) L::store(gx_rows[n] + jb, acc[n], lanes);
  }
}

// One task per input row (ci, r), all samples; the output channels of its group are taken
// o_step at a time so that their padded weight and grad_y rows stay in scratch.
template <typename T>
void backward_input(Tag, const T* grad_y, const T* w, T* grad_x, const LocalGeometry& g) {
  const int64_t lead = (g.kernel_w - 1) * g.dilation_w;
  const int64_t row_len = scratch_row_length<T>(g.in_width, g.pad_w + lead);
  const int64_t per_channel = (g.kernel_w + kBatchTile) * g.kernel_h * row_len;
  const int64_t o_step = std::clamp<int64_t>(kScratchElements<T> / per_channel, 1,
                                             std::max<int64_t>(1, g.out_per_group()));
  const int64_t taps = o_step * g.kernel_h * g.kernel_w;
  const int64_t work = g.batch * g.out_per_group() * g.kernel_h * g.kernel_w * g.in_width;
  at::parallel_for(0, g.in_channels * g.in_height, grain_for(work), [&](int64_t begin,
                                                                        int64_t end) {
    std::vector<T> w_rows(taps * row_len), gy_rows(kBatchTile * o_step * g.kernel_h * row_len);
    std::vector<const T*> a_rows(taps), b_rows(taps * kBatchTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ci = task / g.in_height;
      const int64_t r = task % g.in_height;
      const int64_t c = ci % g.in_per_group();
      const int64_t first_o = ci / g.in_per_group() * g.out_per_group();
      // At least one step, so that grad_x is written when the group has no output channels.
      for (int64_t o_begin = 0; o_begin == 0 || o_begin < g.out_per_group(); o_begin += o_step) {
        const int64_t o_end = std::min(g.out_per_group(), o_begin + o_step);
        T* w_row = w_rows.data();
        for (int64_t o = first_o + o_begin; o < first_o + o_end; ++o) {
          for (int64_t u = 0; u < g.kernel_h; ++u) {
            const int64_t i =
                output_for_input(r, u, g.stride_h, g.pad_h, g.dilation_h, g.out_height);
            if (i < 0) continue;
            for (int64_t v = 0; v < g.kernel_w; ++v, w_row += row_len) {
              padded_row(w_row, w + g.weight_row(o, c, u, v, i), g.out_width, -lead, 1, row_len);
            }
          }
        }
        int64_t n0 = 0;
        for (; n0 + kBatchTile <= g.batch; n0 += kBatchTile) {
          backward_input_rows<kBatchTile>(grad_y, grad_x, g, ci, r, n0, first_o, o_begin, o_end,
                                          row_len, w_rows.data(), gy_rows.data(),
                                          a_rows.data(), b_rows.data());
        }
        for (; n0 < g.batch; ++n0) {
          backward_input_rows<1>(grad_y, grad_x, g, ci, r, n0, first_o, o_begin, o_end, row_len,
                                 w_rows.data(), gy_rows.data(), a_rows.data(), b_rows.data());
        }
      }
    }
  });
}

// grad_w[o, c, u, v0 + t, i, jb:] for t < kTaps, summed over samples n_begin .. n_end - 1 in
// order: x_rows[n * kernel_w + v] is the padded input row tap v of sample n reads.
template <int kTaps, typename T>
REGGAN_CPU_INLINE void weight_taps(const T* gy_row, int64_t gy_step, const T* const* x_rows,
                                   int64_t kernel_w, int64_t v0, int64_t count, int64_t jb,
                                   int64_t lanes, T* const* gw_rows, bool first) {
  using L = Block<T>;
  using V = typename L::value;
  V acc[kTaps];
#pragma GCC unroll 16
  for (int t = 0; t < kTaps; ++t) acc[t] = first ? V{} : L::load(gw_rows[v0 + t] + jb, lanes);
  for (int64_t n = 0; n < count; ++n) {
    const V gy = L::load(gy_row + n * gy_step + jb, lanes);
    const T* const* x = x_rows + n * kernel_w + v0;
#pragma GCC unroll 16
    for (int t = 0; t < kTaps; ++t) acc[t] += gy * L::load(x[t] + jb, L::kWidth);
  }
#pragma GCC unroll 16
  for (int t = 0; t < kTaps; ++t) L::store(gw_rows[v0 + t] + jb, acc[t], lanes);
}

template <typename T>
REGGAN_CPU_INLINE void weight_block(const T* gy_row, int64_t gy_step, const T* const* x_rows,
                                    int64_t kernel_w, int64_t count, int64_t jb, int64_t lanes,
                                    T* const* gw_rows, bool first) {
  int64_t v0 = 0;
  for (; v0 + kTapTile <= kernel_w; v0 += kTapTile) {
    weight_taps<kTapTile>(gy_row, gy_step, x_rows, kernel_w, v0, count, jb, lanes, gw_rows, first);
  }
  switch (kernel_w - v0) {
    case 3:
      return weight_taps<3>(gy_row, gy_step, x_rows, kernel_w, v0, count, jb, lanes, gw_rows,
                            first);
    case 2:
      return weight_taps<2>(gy_row, gy_step, x_rows, kernel_w, v0, count, jb, lanes, gw_rows,
                            first);
    case 1:
      return weight_taps<1>(gy_row, gy_step, x_rows, kernel_w, v0, count, jb, lanes, gw_rows,
                            first);
  }
}

// grad_w[o, c, u, v, i, j] = sum_n grad_y[n, o, i, j] * x[n, c0 + c, row(i, u), col(j, v)]. One
// task per output row (o, i) sums over the samples in order, n_step at a time so that their
// padded input rows (laid out as in forward_rows) stay in scratch; grad_w holds the partial sums
// between steps.
template <typename T>
void backward_weight(Tag, const T* grad_y, const T* x, T* grad_w, const LocalGeometry& g) {
  static_assert(kTapTile <= 4, "weight_block handles remainders of at most 3 taps");
  using L = Block<T>;
  const int64_t phases = g.stride_w;
  const int64_t row_len =
      scratch_row_length<T>(g.out_width, (g.kernel_w - 1) * g.dilation_w / g.stride_w);
  const int64_t n_step = std::clamp<int64_t>(kScratchElements<T> / (phases * row_len), 1,
                                             std::max<int64_t>(1, g.batch));
  const int64_t gy_step = g.out_channels * g.out_plane();
  const int64_t work = g.batch * g.in_per_group() * g.kernel_h * g.kernel_w * g.out_width;
  at::parallel_for(0, g.out_channels * g.out_height, grain_for(work), [&](int64_t begin,
                                                                          int64_t end) {
    std::vector<T> rows(n_step * phases * row_len);
    std::vector<const T*> x_rows(n_step * g.kernel_w);
    std::vector<T*> gw_rows(g.kernel_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / g.out_height;
      const int64_t i = task % g.out_height;
      const int64_t c0 = g.first_input_channel(o);
      const T* gy_row = grad_y + (o * g.out_height + i) * g.out_width;
      for (int64_t c = 0; c < g.in_per_group(); ++c) {
        for (int64_t u = 0; u < g.kernel_h; ++u) {
          for (int64_t v = 0; v < g.kernel_w; ++v) {
            gw_rows[v] = grad_w + g.weight_row(o, c, u, v, i);
          }
          const int64_t r = g.input_row(i, u);
          if (r < 0 || r >= g.in_height) {
            for (T* gw_row : gw_rows) std::fill_n(gw_row, g.out_width, T(0));
            continue;
          }
          // At least one step, so that grad_w is written when the batch is empty.
          for (int64_t n_begin = 0; n_begin == 0 || n_begin < g.batch; n_begin += n_step) {
            const int64_t count = std::min(g.batch, n_begin + n_step) - n_begin;
            for (int64_t n = 0; n < count; ++n) {
              const T* x_row =
                  x + (((n_begin + n) * g.in_channels + c0 + c) * g.in_height + r) * g.in_width;
              T* row = rows.data() + n * phases * row_len;
              for (int64_t p = 0; p < phases; ++p) {
                padded_row(row + p * row_len, x_row, g.in_width, p - g.pad_w, g.stride_w,
                           row_len);
              }
              for (int64_t v = 0; v < g.kernel_w; ++v) {
                const int64_t m = v * g.dilation_w;
                x_rows[n * g.kernel_w + v] = row + (m % phases) * row_len + m / phases;
              }
            }
            for (int64_t jb = 0; jb < g.out_width; jb += L::kWidth) {
              const int64_t lanes = std::min<int64_t>(L::kWidth, g.out_width - jb);
              const T* gy = gy_row + n_begin * gy_step;
              if (lanes == L::kWidth) {
                weight_block(gy, gy_step, x_rows.data(), g.kernel_w, count, jb, L::kWidth,
                             gw_rows.data(), n_begin == 0);
              } else {
                weight_block(gy, gy_step, x_rows.data(), g.kernel_w, count, jb, lanes,
                             gw_rows.data(), n_begin == 0);
              }
            }
          }
        }
      }
    }
  });
}
