// CPU kernels of local_regression, vectorized along output rows. local_regression_cpu.cpp
// includes this file once per instruction set, inside a namespace that defines kVectorBytes (the
// SIMD width in bytes), kBandRows and kBandSamples (the rows and samples whose sums the forward
// and the input gradient hold in registers together; the weight gradient's bands have kBandRows
// rows too) and kTapTile (kernel columns whose weight-gradient sums are held together), after
// including everything it uses. Hence no include guard and no includes.
//
// A task owns a band of row indices of a group (weight gradient) or a run of adjacent bands
// (forward, input gradient): the output rows (forward, weight gradient) or input rows (input
// gradient) at those indices of every channel of the group and every sample. The rows
// it reads at shifted columns are first copied into zero-padded scratch rows (padded_row) that all
// channels of the group share, so the vector loops need no bounds checks and any stride and
// dilation reads contiguously. The weight rows (forward, input gradient) and the grad_y rows
// (weight gradient) that a task reads, one plane apart in memory, are packed side by side first
// too. A block of an output row is accumulated in registers over all the terms of a step and
// written once. Each output element is summed by one task in a fixed order, so results do not
// depend on the number of threads.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

// Elements of a scratch row that whole registers over `width` columns read, `extra` columns
// beyond the register's start included.
template <typename T>
int64_t scratch_row_length(int64_t width, int64_t extra) {
  const int64_t lanes = cpu_lanes::Lanes<T, kVectorBytes>::kWidth;
  return (width + lanes - 1) / lanes * lanes + extra;
}

// Splits `samples` x `channels` items of `item` scratch elements into steps that fit a scratch of
// `budget` elements: every sample and as many channels as fit, else one channel and as many whole
// widest batch tiles of samples as fit.
template <typename T>
void scratch_steps(int64_t item, int64_t samples, int64_t channels, int64_t* n_step,
                   int64_t* c_step, int64_t budget = kScratchElements<T>) {
  const int64_t fit = std::max<int64_t>(1, budget / item);
  if (fit >= samples) {
    *n_step = std::max<int64_t>(1, samples);
    *c_step = std::clamp<int64_t>(fit / *n_step, 1, std::max<int64_t>(1, channels));
  } else {
    constexpr int64_t kTile = kBandRows * kBandSamples;  // the widest tile of samples
    *n_step = std::max<int64_t>(kTile, fit / kTile * kTile);
    *c_step = 1;
  }
}

// An input row (the input's row x_row) kept as stride_w phase rows of row_len from row: phase
// p holds the input columns p - pad_w + t * stride_w, zeros outside the image, so that kernel
// column v reads phase (v * dilation_w) % stride_w contiguously (phase_columns).
template <typename T>
void pad_phase_rows(T* row, const T* x_row, const LocalGeometry& g, int64_t row_len) {
  for (int64_t p = 0; p < g.stride_w; ++p) {
    padded_row(row + p * row_len, x_row, g.in_width, p - g.pad_w, g.stride_w, row_len);
  }
}

// Where kernel column v reads the phase rows of pad_phase_rows: phase (v * dilation_w) %
// stride_w, from t = j + (v * dilation_w) / stride_w for output column j.
inline std::vector<int64_t> phase_columns(const LocalGeometry& g, int64_t row_len) {
  std::vector<int64_t> columns(g.kernel_w);
  for (int64_t v = 0; v < g.kernel_w; ++v) {
    const int64_t m = v * g.dilation_w;
    columns[v] = m % g.stride_w * row_len + m / g.stride_w;
  }
  return columns;
}

// Bands of band_elements weight elements per plane that one task runs through in order: about
// kRunBytes of each plane, as long as that leaves two tasks per thread.
template <typename T>
int64_t bands_per_run(int64_t band_elements, int64_t bands, int64_t groups) {
  const int64_t by_bytes = kRunBytes / std::max<int64_t>(1, band_elements * int64_t(sizeof(T)));
  const int64_t by_threads = groups * bands / (2 * at::get_num_threads());
  return std::clamp<int64_t>(std::min(by_bytes, by_threads), 1, std::max<int64_t>(1, bands));
}

// Channels whose weight planes a step reads at once: at most kWeightStreams planes.
inline int64_t weight_stream_channels(const LocalGeometry& g) {
  return std::max<int64_t>(1, kWeightStreams / (g.kernel_h * g.kernel_w));
}

// What accumulate_band reads and writes for one band of rows of one channel and a step of
// samples and channels: y[n, rho, j] = sum over c, d, v of packed[c, d - rho, v, rho, j] *
// x[n, c, d, j + x_col[v]] for the band rows rho < kRows, where window offset d is a scratch row
// that band rows read through kernel rows u = d - rho. The forward sums output rows over input
// channels (x: the input); the input gradient sums rows of grad_x over output channels (x:
// grad_y) with the kernel flipped. See forward and backward_input.
template <typename T>
struct BandTask {
  // The weights, packed [column block][c][u][v][rho][column in the block]: every weight one
  // block of columns reads lies within w_block of its start, at offsets that are compile-time
  // constants when the kernel size is.
  const T* packed;
  int64_t w_block;
  const T* x;  // scratch of sample 0; sample n is n * x_sample further
  int64_t x_sample;
  const int64_t* x_rows;  // [c][d]: where a sample's scratch holds window row d (or zeros)
  const int64_t* x_col;   // [v]: where kernel column v reads a scratch row
  int64_t channels, kernel_h, kernel_w;
  int64_t rows;  // band rows that exist, <= kRows; the others are summed but not stored
  int64_t width;
  const T* bias;  // bias row of band row 0 (rows bias_row apart), or null
  int64_t bias_row;
  bool first;  // start from the bias; else from y, which holds the sums of earlier channels
  T* y;        // row 0 of the band in sample 0
  int64_t y_sample, y_row;
};

// A block of columns, from jb, of the y rows of kBatch samples and the band's rows: the sums over
// its channels' window rows and kernel columns. An input load serves every band row that reads it
// and a weight load the kBatch samples. kKernel is 0 for any layer, or the size of a square kernel
// with unit strides and dilations: then every loop over the window unrolls, kernel column v reads
// scratch column j + v, and which band rows read a window row is decided by the compiler.
template <int kRows, int kKernel, int kBatch, bool kWhole, typename T>
REGGAN_CPU_INLINE void accumulate_band_block(const BandTask<T>& task, int64_t jb) {
  using L = cpu_lanes::Lanes<T, kVectorBytes>;
  using V = typename L::value;
  constexpr int64_t kLanes = L::kWidth;
  // A whole block's loads and stores have a constant width, which keeps the sums in registers.
  const int64_t lanes = kWhole ? kLanes : task.width - jb;
  const int64_t kernel_h = kKernel != 0 ? kKernel : task.kernel_h;
  const int64_t kernel_w = kKernel != 0 ? kKernel : task.kernel_w;
  const int64_t offsets = kernel_h + kRows - 1;
  const int64_t x_sample = task.x_sample;
  V acc[kRows][kBatch];
#pragma GCC unroll 8
  for (int rho = 0; rho < kRows; ++rho) {
    const bool stored = rho < task.rows;
    const V start = stored && task.first && task.bias != nullptr
                        ? L::load(task.bias + rho * task.bias_row + jb, lanes)
                        : V{};
#pragma GCC unroll 16
    for (int n = 0; n < kBatch; ++n) {
      acc[rho][n] = stored && !task.first
                        ? L::load(task.y + n * task.y_sample + rho * task.y_row + jb, lanes)
                        : start;
    }
  }
  for (int64_t c = 0; c < task.channels; ++c) {
    const T* w_channel =
        task.packed + jb / kLanes * task.w_block + c * kernel_h * kernel_w * kRows * kLanes;
    const int64_t* x_rows = task.x_rows + c * offsets;
#pragma GCC unroll 16
    for (int d = 0; d < offsets; ++d) {
#pragma GCC unroll 8
      for (int v = 0; v < kernel_w; ++v) {
        const T* x_tap = task.x + jb + x_rows[d] + (kKernel != 0 ? v : task.x_col[v]);
        V in[kBatch];
#pragma GCC unroll 16
        for (int n = 0; n < kBatch; ++n) {
          in[n] = L::load(x_tap + n * x_sample, kLanes);
          if constexpr (kRows > 1) cpu_lanes::keep_in_register(in[n]);
        }
#pragma GCC unroll 8
        for (int rho = 0; rho < kRows; ++rho) {
          const int u = d - rho;
          if (u < 0 || u >= kernel_h) continue;
          const V weight =
              L::load(w_channel + ((u * kernel_w + v) * kRows + rho) * kLanes, kLanes);
#pragma GCC unroll 16
          for (int n = 0; n < kBatch; ++n) acc[rho][n] += weight * in[n];
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int rho = 0; rho < kRows; ++rho) {
    if (rho >= task.rows) break;
#pragma GCC unroll 16
    for (int n = 0; n < kBatch; ++n) {
      L::store(task.y + n * task.y_sample + rho * task.y_row + jb, acc[rho][n], lanes);
    }
  }
}

template <int kRows, int kKernel, int kBatch, typename T>
void accumulate_band(const BandTask<T>& task) {
  constexpr int64_t kLanes = cpu_lanes::Lanes<T, kVectorBytes>::kWidth;
  int64_t jb = 0;
  for (; jb + kLanes <= task.width; jb += kLanes) {
    accumulate_band_block<kRows, kKernel, kBatch, true>(task, jb);
  }
  if (jb < task.width) accumulate_band_block<kRows, kKernel, kBatch, false>(task, jb);
}

// accumulate_band for `samples` samples from the task's first, in tiles of kBatch, widest
// first. Every tile has kBandRows x kBandSamples sums.
template <int kRows, int kKernel, int kBatch = kBandRows * kBandSamples / kRows, typename T>
void accumulate_band_samples(BandTask<T> task, int64_t samples) {
  for (; samples >= kBatch; samples -= kBatch) {
    accumulate_band<kRows, kKernel, kBatch>(task);
    task.x += kBatch * task.x_sample;
    task.y += kBatch * task.y_sample;
  }
  if constexpr (kBatch > 1) accumulate_band_samples<kRows, kKernel, kBatch / 2>(task, samples);
}

// accumulate_band_samples for bands of band_rows (1 or kBandRows) rows, with the unit-step square
// kernels of RegGAN's layers compiled for their size.
template <typename T>
void accumulate_band_for_kernel(const BandTask<T>& task, int64_t samples, int64_t band_rows,
                                bool unit_steps) {
  if (band_rows == 1) return accumulate_band_samples<1, 0>(task, samples);
  if (unit_steps && task.kernel_h == task.kernel_w) {
    switch (task.kernel_h) {
      case 3:
        return accumulate_band_samples<kBandRows, 3>(task, samples);
      case 5:
        return accumulate_band_samples<kBandRows, 5>(task, samples);
      case 7:
        return accumulate_band_samples<kBandRows, 7>(task, samples);
    }
  }
  accumulate_band_samples<kBandRows, 0>(task, samples);
}

// A register whose lanes l in [begin, end) hold lane_zero[l] and the others zero, reading only
// those lanes: one masked load where the instruction set has one. lane_zero may lie outside the
// array (a row's first columns, shifted left); lanes outside it are never read.
template <typename L, typename T>
REGGAN_CPU_INLINE typename L::value load_lane_range(uintptr_t lane_zero, int64_t begin,
                                                    int64_t end) {
  using V = typename L::value;
#if defined(__SSE2__)
  if constexpr (kVectorBytes == 64) {
    const auto lanes = (uint32_t(1) << end) - (uint32_t(1) << begin);
    if constexpr (sizeof(T) == 4) {
      return (V)_mm512_maskz_loadu_ps(__mmask16(lanes), reinterpret_cast<const void*>(lane_zero));
    } else {
      return (V)_mm512_maskz_loadu_pd(__mmask8(lanes), reinterpret_cast<const void*>(lane_zero));
    }
  } else if constexpr (kVectorBytes == 32) {
    using Lane = typename L::lane_int;
    typename L::mask index;
    for (int64_t l = 0; l < L::kWidth; ++l) index[l] = Lane(l);
    const typename L::mask inside = (index >= Lane(begin)) & (index < Lane(end));
    if constexpr (sizeof(T) == 4) {
      return (V)_mm256_maskload_ps(reinterpret_cast<const float*>(lane_zero), (__m256i)inside);
    } else {
      return (V)_mm256_maskload_pd(reinterpret_cast<const double*>(lane_zero), (__m256i)inside);
    }
  }
#endif
  V v{};
  for (int64_t l = begin; l < end; ++l) v[l] = reinterpret_cast<const T*>(lane_zero)[l];
  return v;
}

// dst[b * block + l] = row[b * lanes + l + shift] for the columns b * lanes + l of the blocks
// that cover width, and 0 where b * lanes + l + shift is outside [0, row_width): a row of weights
// in the column blocks that accumulate_band reads.
template <typename T>
void pack_row(T* dst, int64_t block, const T* row, int64_t row_width, int64_t shift,
              int64_t width) {
  using L = cpu_lanes::Lanes<T, kVectorBytes>;
  for (int64_t jb = 0; jb < width; jb += L::kWidth, dst += block) {
    const int64_t first = jb + shift;
    if (first >= 0 && first + L::kWidth <= row_width) {
      L::store(dst, L::load(row + first, L::kWidth), L::kWidth);
    } else {
      // Lanes [begin, end) of the block lie inside the row.
      const int64_t begin = std::clamp<int64_t>(-first, 0, L::kWidth);
      const int64_t end = std::clamp<int64_t>(row_width - first, begin, L::kWidth);
      const uintptr_t lane_zero = reinterpret_cast<uintptr_t>(row) + first * int64_t(sizeof(T));
      L::store(dst, load_lane_range<L, T>(lane_zero, begin, end), L::kWidth);
    }
  }
}

// The weight rows of band rows rho < rows_here for taps t < count, rows[t * tap + rho * width]
// (the rows of one tap are adjacent in the weight), packed into their column blocks at
// (t * band_rows + rho) * lanes. In place, the taps' rows, one plane apart (often a multiple of
// 4 KiB), would compete for the few cache sets they share, so each load would wait on memory; a
// copy loop keeps many misses in flight, and the copy stays cached for every tile of samples.
template <typename T>
void pack_band_weights(T* packed, int64_t block, const T* rows, int64_t tap, int64_t count,
                       int64_t band_rows, int64_t rows_here, int64_t width) {
  constexpr int64_t kLanes = cpu_lanes::Lanes<T, kVectorBytes>::kWidth;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t rho = 0; rho < rows_here; ++rho) {
      pack_row(packed + (t * band_rows + rho) * kLanes, block, rows + t * tap + rho * width,
               width, 0, width);
    }
  }
}

// Prefetches `elements` weights from each of `count` taps `tap` apart, from rows, into L2:
// issued before a band is summed, the next band's weights arrive meanwhile. The hardware
// prefetchers of some CPUs (AMD Zen) follow too few of the planes' streams.
template <typename T>
void prefetch_band_weights(const T* rows, int64_t tap, int64_t count, int64_t elements) {
  constexpr int64_t kLineElements = 64 / sizeof(T);
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t k = 0; k < elements; k += kLineElements) {
      __builtin_prefetch(rows + t * tap + k, 0, 2);
    }
    __builtin_prefetch(rows + t * tap + elements - 1, 0, 2);
  }
}

// One task per (group, run of bands of output rows). With stride_h and dilation_h 1, adjacent
// output rows read the same input rows through different kernel rows, so a band of kBandRows rows
// loads each input value once for all of them; otherwise a band is one row. Window offset d of
// the band from output row i0 is input row input_row(i0, d): kernel row d - rho of band row rho
// (for one row, d is the kernel row). The input rows a run's windows span, for a step of samples
// and channels, are padded once into scratch and serve every output channel of the group; a
// window row outside the image reads a row of zeros there. Input row (n, c, r) is kept as
// stride_w phase rows (pad_phase_rows). For each output channel the run's bands then go in order,
// each packing its weight rows before summing them: a step's few channels keep the weight planes
// read at once few, and the run reads each of them in one ascending span, which the hardware
// prefetcher follows. y holds the partial sums between steps of channels.
template <typename T>
void forward(Tag, const T* x, const T* w, const T* bias, T* y, const LocalGeometry& g) {
  const int64_t band_rows = g.stride_h == 1 && g.dilation_h == 1 ? kBandRows : 1;
  const int64_t bands = (g.out_height + band_rows - 1) / band_rows;
  const int64_t run_bands = bands_per_run<T>(band_rows * g.out_width, bands, g.groups);
  const int64_t runs = (bands + run_bands - 1) / run_bands;
  const int64_t offsets = g.kernel_h + band_rows - 1;  // window offsets d of a band
  const int64_t phases = g.stride_w;
  const int64_t row_len =
      scratch_row_length<T>(g.out_width, (g.kernel_w - 1) * g.dilation_w / phases);
  // The input rows a run's windows span, one slot each: slot r % slots holds input row r, and
  // slot `slots` stays zero. When a task is one step, consecutive tasks of a group share the rows
  // their windows overlap in, and those stay padded.
  const int64_t slots =
      (run_bands * band_rows - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1;
  const int64_t slot_len = phases * row_len;
  const int64_t channel_len = (slots + 1) * slot_len;  // scratch of one (n, c)
  int64_t n_step, c_step;
  scratch_steps<T>(channel_len, g.batch, g.in_per_group(), &n_step, &c_step);
  c_step = std::min(c_step, weight_stream_channels(g));
  const bool one_step = n_step >= g.batch && c_step >= g.in_per_group();
  const int64_t w_tap = g.out_plane();  // weight elements from tap to tap
  const int64_t lanes = cpu_lanes::Lanes<T, kVectorBytes>::kWidth;
  const int64_t w_block = c_step * g.kernel_h * g.kernel_w * band_rows * lanes;
  const int64_t y_sample = g.out_channels * g.out_plane();
  const bool unit_steps = g.stride_w == 1 && g.dilation_w == 1;
  const int64_t work = g.batch * g.out_per_group() * g.in_per_group() * g.kernel_h *
                       g.kernel_w * g.out_width * band_rows * run_bands;
  at::parallel_for(0, g.groups * runs, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<T> rows(n_step * c_step * channel_len);
    std::vector<int64_t> slot_row(slots, -1);  // the input row each slot holds, -1 if none
    const std::vector<int64_t> x_col = phase_columns(g, row_len);
    std::vector<int64_t> x_rows(run_bands * c_step * offsets);  // [band][c][d]
    std::vector<T> packed((g.out_width + lanes - 1) / lanes * w_block);
    int64_t padded_group = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / runs;
      const int64_t first_band = task % runs * run_bands;
      const int64_t run_end = std::min(bands, first_band + run_bands);
      const int64_t c0 = group * g.in_per_group();
      for (int64_t n_begin = 0; n_begin < g.batch; n_begin += n_step) {
        const int64_t n_count = std::min(g.batch - n_begin, n_step);
        // At least one step, so that y is written when there are no input channels.
        for (int64_t c_begin = 0; c_begin == 0 || c_begin < g.in_per_group(); c_begin += c_step) {
          const int64_t c_count = std::min(g.in_per_group() - c_begin, c_step);
          const int64_t sample_len = c_count * channel_len;
          if (!one_step || group != padded_group) std::fill(slot_row.begin(), slot_row.end(), -1);
          padded_group = group;
          for (int64_t b = first_band; b < run_end; ++b) {
            for (int64_t d = 0; d < offsets; ++d) {
              const int64_t r = g.input_row(b * band_rows, d);
              const bool inside = r >= 0 && r < g.in_height;
              const int64_t slot = inside ? r % slots : slots;
              if (inside && slot_row[slot] != r) {
                slot_row[slot] = r;
                for (int64_t n = 0; n < n_count; ++n) {
                  for (int64_t c = 0; c < c_count; ++c) {
                    const T* x_row = x + (((n_begin + n) * g.in_channels + c0 + c_begin + c) *
                                              g.in_height + r) * g.in_width;
                    pad_phase_rows(
                        rows.data() + n * sample_len + (c * (slots + 1) + slot) * slot_len, x_row,
                        g, row_len);
                  }
                }
              }
              for (int64_t c = 0; c < c_count; ++c) {
                x_rows[((b - first_band) * c_count + c) * offsets + d] =
                    (c * (slots + 1) + slot) * slot_len;
              }
            }
          }
          const int64_t c_taps = c_count * g.kernel_h * g.kernel_w;
          for (int64_t o = group * g.out_per_group(); o < (group + 1) * g.out_per_group(); ++o) {
            for (int64_t b = first_band; b < run_end; ++b) {
              const int64_t i0 = b * band_rows;
              const int64_t rows_here = std::min(band_rows, g.out_height - i0);
              pack_band_weights(packed.data(), w_block, w + g.weight_row(o, c_begin, 0, 0, i0),
                                w_tap, c_taps, band_rows, rows_here, g.out_width);
              const int64_t next_o = b + 1 < run_end ? o : o + 1;
              const int64_t next_i0 = (b + 1 < run_end ? b + 1 : first_band) * band_rows;
              if (next_o < (group + 1) * g.out_per_group()) {
                prefetch_band_weights(w + g.weight_row(next_o, c_begin, 0, 0, next_i0), w_tap,
                                      c_taps,
                                      std::min(band_rows, g.out_height - next_i0) * g.out_width);
              }
              const BandTask<T> band{
                  packed.data(), w_block, rows.data(), sample_len,
                  x_rows.data() + (b - first_band) * c_count * offsets, x_col.data(),
                  c_count, g.kernel_h, g.kernel_w, rows_here, g.out_width,
                  bias != nullptr ? bias + (o * g.out_height + i0) * g.out_width : nullptr,
                  g.out_width, c_begin == 0,
                  y + ((n_begin * g.out_channels + o) * g.out_height + i0) * g.out_width,
                  y_sample, g.out_width};
              accumulate_band_for_kernel(band, n_count, band_rows, unit_steps);
            }
          }
        }
      }
    }
  });
}

// grad_x for stride_w == 1, in runs of bands of input rows as the forward's of output rows:
// grad_x[n, ci, r, s] gathers weight[o, c, u, v, i, j] * grad_y[n, o, i, j] over the (o, u, v)
// whose window reads (r, s), with j = s + pad_w - v * dilation_w and i the output row that reads
// r through kernel row u. With the kernel flipped (u' = kH - 1 - u, v' = kW - 1 - v) this is the
// forward's sum over output channels: with unit row steps input row r0 + rho reads output row
// i = r0 + pad_h - (kH - 1) + d through u' = d - rho (with one row, d = u'), and column s reads
// grad_y column s - lead + v' * dilation_w, lead = (kW - 1) * dilation_w - pad_w. The grad_y rows
// a run's windows span, for a step of samples and output channels, are padded once (zeros outside
// the output) and serve every input channel of the group; for each input channel the run's bands
// go in order, as in forward, each packing its weights, each row shifted to the input columns that
// read it (zeros where none does). grad_x holds the partial sums between steps of output channels.
template <typename T>
void backward_input(Tag, const T* grad_y, const T* w, T* grad_x, const LocalGeometry& g) {
  const int64_t band_rows = g.stride_h == 1 && g.dilation_h == 1 ? kBandRows : 1;
  const int64_t bands = (g.in_height + band_rows - 1) / band_rows;
  const int64_t run_bands = bands_per_run<T>(band_rows * g.out_width, bands, g.groups);
  const int64_t runs = (bands + run_bands - 1) / run_bands;
  const int64_t offsets = g.kernel_h + band_rows - 1;  // window offsets d of a band
  const int64_t lead = (g.kernel_w - 1) * g.dilation_w - g.pad_w;
  const int64_t row_len = scratch_row_length<T>(g.in_width, (g.kernel_w - 1) * g.dilation_w);
  // The output rows a run's windows span, one slot each, as in forward.
  const int64_t slots =
      (run_bands * band_rows - 1 + (g.kernel_h - 1) * g.dilation_h) / g.stride_h + 1;
  const int64_t channel_len = (slots + 1) * row_len;  // grad_y scratch of one (n, o)
  int64_t n_step, o_step;
  scratch_steps<T>(channel_len, g.batch, g.out_per_group(), &n_step, &o_step);
  o_step = std::min(o_step, weight_stream_channels(g));
  const bool one_step = n_step >= g.batch && o_step >= g.out_per_group();
  const int64_t lanes = cpu_lanes::Lanes<T, kVectorBytes>::kWidth;
  const int64_t w_block = o_step * g.kernel_h * g.kernel_w * band_rows * lanes;
  const int64_t gx_sample = g.in_channels * g.in_plane();
  const int64_t work = g.batch * g.out_per_group() * g.in_per_group() * g.kernel_h *
                       g.kernel_w * g.in_width * band_rows * run_bands;
  // The output row that input row r0 + rho reads through kernel row u, or -1 if none.
  auto output_row = [&](int64_t r0, int64_t rho, int64_t u) {
    return output_for_input(r0 + rho, u, g.stride_h, g.pad_h, g.dilation_h, g.out_height);
  };
  at::parallel_for(0, g.groups * runs, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<T> gy_rows(n_step * o_step * channel_len);
    std::vector<int64_t> slot_row(slots, -1);  // the output row each slot holds, -1 if none
    std::vector<int64_t> x_col(g.kernel_w), x_rows(run_bands * o_step * offsets);  // [band][o][d]
    for (int64_t v = 0; v < g.kernel_w; ++v) x_col[v] = v * g.dilation_w;
    std::vector<T> packed((g.in_width + lanes - 1) / lanes * w_block);
    int64_t padded_group = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / runs;
      const int64_t first_band = task % runs * run_bands;
      const int64_t run_end = std::min(bands, first_band + run_bands);
      const int64_t first_o = group * g.out_per_group();
      for (int64_t n_begin = 0; n_begin < g.batch; n_begin += n_step) {
        const int64_t n_count = std::min(g.batch - n_begin, n_step);
        // At least one step, so that grad_x is written when the group has no output channels.
        for (int64_t o_begin = 0; o_begin == 0 || o_begin < g.out_per_group(); o_begin += o_step) {
          const int64_t o_count = std::min(g.out_per_group() - o_begin, o_step);
          const int64_t sample_len = o_count * channel_len;
          if (!one_step || group != padded_group) std::fill(slot_row.begin(), slot_row.end(), -1);
          padded_group = group;
          for (int64_t b = first_band; b < run_end; ++b) {
            const int64_t r0 = b * band_rows;
            for (int64_t d = 0; d < offsets; ++d) {
              const int64_t i = band_rows > 1 ? r0 + g.pad_h - (g.kernel_h - 1) + d
                                              : output_row(r0, 0, g.kernel_h - 1 - d);
              const bool inside = i >= 0 && i < g.out_height;
              const int64_t slot = inside ? i % slots : slots;
              if (inside && slot_row[slot] != i) {
                slot_row[slot] = i;
                for (int64_t n = 0; n < n_count; ++n) {
                  for (int64_t o = 0; o < o_count; ++o) {
                    padded_row(gy_rows.data() + n * sample_len + (o * (slots + 1) + slot) * row_len,
                               grad_y + (((n_begin + n) * g.out_channels + first_o + o_begin + o) *
                                             g.out_height + i) * g.out_width,
                               g.out_width, -lead, 1, row_len);
                  }
                }
              }
              for (int64_t o = 0; o < o_count; ++o) {
                x_rows[((b - first_band) * o_count + o) * offsets + d] =
                    (o * (slots + 1) + slot) * row_len;
              }
            }
          }
          for (int64_t c = 0; c < g.in_per_group(); ++c) {
            const int64_t ci = group * g.in_per_group() + c;
            for (int64_t b = first_band; b < run_end; ++b) {
              const int64_t r0 = b * band_rows;
              const int64_t rows_here = std::min(band_rows, g.in_height - r0);
              for (int64_t o = 0; o < o_count; ++o) {
                for (int64_t u = 0; u < g.kernel_h; ++u) {
                  int64_t rows_read[kBandRows];  // the output row each band row reads, or -1
                  for (int64_t rho = 0; rho < rows_here; ++rho) {
                    rows_read[rho] = output_row(r0, rho, u);
                  }
                  for (int64_t v = 0; v < g.kernel_w; ++v) {
                    const int64_t tap = (o * g.kernel_h + g.kernel_h - 1 - u) * g.kernel_w +
                                        g.kernel_w - 1 - v;
                    for (int64_t rho = 0; rho < rows_here; ++rho) {
                      const int64_t i = rows_read[rho];
                      // A row the band row does not read (i < 0) is packed as zeros.
                      pack_row(packed.data() + (tap * band_rows + rho) * lanes, w_block,
                               w + g.weight_row(first_o + o_begin + o, c, u, v,
                                                std::max<int64_t>(i, 0)),
                               i >= 0 ? g.out_width : 0, g.pad_w - v * g.dilation_w, g.in_width);
                    }
                  }
                }
              }
              // The next band's weights, as in forward. Through kernel row u the band's rows
              // read consecutive output rows, the same ones in the plane of each kernel column.
              const int64_t next_c = b + 1 < run_end ? c : c + 1;
              const int64_t next_r0 = (b + 1 < run_end ? b + 1 : first_band) * band_rows;
              const int64_t next_rows = std::min(band_rows, g.in_height - next_r0);
              for (int64_t o = 0; next_c < g.in_per_group() && o < o_count; ++o) {
                for (int64_t u = 0; u < g.kernel_h; ++u) {
                  int64_t first = -1, last = -1;
                  for (int64_t rho = 0; rho < next_rows; ++rho) {
                    const int64_t i = output_row(next_r0, rho, u);
                    if (i < 0) continue;
                    if (first < 0) first = i;
                    last = i;
                  }
                  if (first < 0) continue;
                  prefetch_band_weights(
                      w + g.weight_row(first_o + o_begin + o, next_c, u, 0, first), g.out_plane(),
                      g.kernel_w, (last - first + 1) * g.out_width);
                }
              }
              const BandTask<T> band{
                  packed.data(), w_block, gy_rows.data(), sample_len,
                  x_rows.data() + (b - first_band) * o_count * offsets, x_col.data(), o_count,
                  g.kernel_h, g.kernel_w, rows_here, g.in_width, nullptr, 0, o_begin == 0,
                  grad_x + ((n_begin * g.in_channels + ci) * g.in_height + r0) * g.in_width,
                  gx_sample, g.in_width};
              accumulate_band_for_kernel(band, n_count, band_rows, g.dilation_w == 1);
            }
          }
        }
      }
    }
  });
}

// v at p, past the caches when `stream`, p is aligned and the registers are 64 bytes (a whole
// cache line): the weight gradient, tens of MiB written once, then costs no read of each line
// before it is written. With 32-byte registers a streamed line is written in two halves, a block
// of sums apart, and that measured slower than cached stores (benchmarks/RESULTS.md). Callers
// fence before the output is read (stream_fence).
template <typename L, typename T>
REGGAN_CPU_INLINE void store_lanes(T* p, const typename L::value& v, int64_t lanes, bool stream) {
#if defined(__SSE2__)
  if constexpr (kVectorBytes == 64) {
    if (stream && lanes == L::kWidth && reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0) {
      if constexpr (sizeof(T) == 4) {
        _mm512_stream_ps(p, (__m512)v);
      } else {
        _mm512_stream_pd(p, (__m512d)v);
      }
      return;
    }
  }
#endif
  L::store(p, v, lanes);
}

// Orders the stores of store_lanes before any that follow.
REGGAN_CPU_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// What weight_band_block reads and writes for one (output channel, input channel) of a band and
// a step of samples.
template <typename T>
struct WeightBand {
  const T* gy;  // grad_y row of band row 0 and sample 0, packed
  int64_t gy_sample, gy_row;
  const T* x;  // scratch row of window offset 0 and sample 0
  int64_t x_sample, x_window_row;
  const int64_t* x_col;  // [v]: where kernel column v reads a scratch row
  int64_t samples;
  T* gw;  // grad_w[o, c, 0, 0, i0, 0]
  int64_t gw_kernel_row, gw_tap, gw_row;  // from u to u + 1, v to v + 1, i to i + 1
  int64_t width;
  bool first;   // start from zeros; else from grad_w, which holds the earlier samples' sums
  bool stream;  // the sums are final: written past the caches (store_lanes)
};

// A block of columns, from jb, of grad_w[o, c, d - rho, v0 + t, i0 + rho] for the band rows rho in
// [kFirst, kLast] that read window row d and the kernel columns v0 + t < v0 + kTaps, summed over
// the samples in order: each grad_y load serves the kTaps columns, each input load the rows.
template <int kFirst, int kLast, int kTaps, bool kWhole, typename T>
REGGAN_CPU_INLINE void weight_band_block(const WeightBand<T>& b, int64_t d, int64_t v0,
                                         int64_t jb) {
  using L = cpu_lanes::Lanes<T, kVectorBytes>;
  using V = typename L::value;
  const int64_t lanes = kWhole ? L::kWidth : b.width - jb;
  V acc[kLast + 1][kTaps];
  T* out[kLast + 1][kTaps];
#pragma GCC unroll 8
  for (int rho = kFirst; rho <= kLast; ++rho) {
#pragma GCC unroll 8
    for (int t = 0; t < kTaps; ++t) {
      out[rho][t] = b.gw + (d - rho) * b.gw_kernel_row + (v0 + t) * b.gw_tap + rho * b.gw_row + jb;
      acc[rho][t] = b.first ? V{} : L::load(out[rho][t], lanes);
    }
  }
  const T* x = b.x + d * b.x_window_row + jb;
  for (int64_t n = 0; n < b.samples; ++n) {
    V gy[kLast + 1];
#pragma GCC unroll 8
    for (int rho = kFirst; rho <= kLast; ++rho) {
      gy[rho] = L::load(b.gy + n * b.gy_sample + rho * b.gy_row + jb, lanes);
      cpu_lanes::keep_in_register(gy[rho]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < kTaps; ++t) {
      V in = L::load(x + n * b.x_sample + b.x_col[v0 + t], L::kWidth);
      cpu_lanes::keep_in_register(in);
#pragma GCC unroll 8
      for (int rho = kFirst; rho <= kLast; ++rho) acc[rho][t] += gy[rho] * in;
    }
  }
#pragma GCC unroll 8
  for (int rho = kFirst; rho <= kLast; ++rho) {
#pragma GCC unroll 8
    for (int t = 0; t < kTaps; ++t) store_lanes<L>(out[rho][t], acc[rho][t], lanes, b.stream);
  }
}

// weight_band_block over the row's blocks of columns and kTaps kernel columns from v0.
template <int kFirst, int kLast, int kTaps, typename T>
void weight_band_taps(const WeightBand<T>& b, int64_t d, int64_t v0) {
  constexpr int64_t kLanes = cpu_lanes::Lanes<T, kVectorBytes>::kWidth;
  int64_t jb = 0;
  for (; jb + kLanes <= b.width; jb += kLanes) {
    weight_band_block<kFirst, kLast, kTaps, true>(b, d, v0, jb);
  }
  if (jb < b.width) weight_band_block<kFirst, kLast, kTaps, false>(b, d, v0, jb);
}

// weight_band_taps for every kernel column, kTapTile at a time.
template <int kFirst, int kLast, typename T>
void weight_band_row(const WeightBand<T>& b, int64_t d, int64_t kernel_w) {
  static_assert(kTapTile <= 4, "the remainder below covers at most 3 taps");
  int64_t v0 = 0;
  for (; v0 + kTapTile <= kernel_w; v0 += kTapTile) {
    weight_band_taps<kFirst, kLast, kTapTile>(b, d, v0);
  }
  switch (kernel_w - v0) {
    case 3:
      return weight_band_taps<kFirst, kLast, 3>(b, d, v0);
    case 2:
      return weight_band_taps<kFirst, kLast, 2>(b, d, v0);
    case 1:
      return weight_band_taps<kFirst, kLast, 1>(b, d, v0);
  }
}

// weight_band_row for the band rows [first, last], found among the compile-time ranges.
template <int kRows, int kFirst = 0, int kLast = 0, typename T>
void weight_band_rows(const WeightBand<T>& b, int64_t d, int64_t kernel_w, int64_t first,
                      int64_t last) {
  if (first == kFirst && last == kLast) return weight_band_row<kFirst, kLast>(b, d, kernel_w);
  if constexpr (kLast + 1 < kRows) {
    weight_band_rows<kRows, kFirst, kLast + 1>(b, d, kernel_w, first, last);
  } else if constexpr (kFirst + 1 < kRows) {
    weight_band_rows<kRows, kFirst + 1, kFirst + 1>(b, d, kernel_w, first, last);
  }
}

// grad_w[o, c, u, v, i, j] = sum_n grad_y[n, o, i, j] * x[n, c0 + c, row(i, u), col(j, v)]. One
// task per (group, band of output rows), as in forward: with unit row steps, window offset d of
// the band is an input row that band row rho reads through kernel row u = d - rho, so each input
// load serves those rows and each grad_y load a tile of kernel columns. For each c the window's
// input rows of a step of samples are padded once (laid out as in forward, zeros outside the
// image) and serve every output channel of the group; the samples are summed in order, and
// grad_w holds the partial sums between steps.
template <typename T>
void backward_weight(Tag, const T* grad_y, const T* x, T* grad_w, const LocalGeometry& g) {
  const int64_t band_rows = g.stride_h == 1 && g.dilation_h == 1 ? kBandRows : 1;
  const int64_t bands = (g.out_height + band_rows - 1) / band_rows;
  const int64_t offsets = g.kernel_h + band_rows - 1;  // window offsets d of a band
  const int64_t phases = g.stride_w;
  const int64_t row_len =
      scratch_row_length<T>(g.out_width, (g.kernel_w - 1) * g.dilation_w / phases);
  const int64_t window_row = phases * row_len;
  // The grad_y rows of a step are packed too, [sample][o][rho][column], and serve every (c, d):
  // in place the rows of the samples sit a grad_y sample apart, often a multiple of 4 KiB, and
  // evict each other from the few cache sets they share.
  const int64_t gy_len = scratch_row_length<T>(g.out_width, 0);
  const int64_t gy_sample = g.out_per_group() * band_rows * gy_len;
  // Each step of samples after the first reads and writes the task's rows of grad_w again. Where
  // those take more than a scratch, they come from memory each time, which costs more than a
  // scratch beyond L2.
  const int64_t task_grad_w = g.out_per_group() * g.in_per_group() * g.kernel_h * g.kernel_w *
                              band_rows * g.out_width;
  int64_t n_step, unused;
  scratch_steps<T>(offsets * window_row + gy_sample, g.batch, 1, &n_step, &unused,
                   task_grad_w > kScratchElements<T> ? kWeightGradientScratchElements<T>
                                                     : kScratchElements<T>);
  const int64_t work = g.batch * g.out_per_group() * g.in_per_group() * g.kernel_h *
                       g.kernel_w * g.out_width * band_rows;
  const bool large = g.out_channels * g.in_per_group() * g.kernel_h * g.kernel_w *
                         g.out_plane() * int64_t(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, g.groups * bands, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<T> rows(n_step * offsets * window_row), gy_rows(n_step * gy_sample);
    const std::vector<int64_t> x_col = phase_columns(g, row_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / bands;
      const int64_t i0 = task % bands * band_rows;
      const int64_t rows_here = std::min(band_rows, g.out_height - i0);
      const int64_t c0 = group * g.in_per_group();
      const int64_t first_o = group * g.out_per_group();
      int64_t gy_packed = -1;  // the n_begin whose grad_y rows gy_rows holds, -1 if none
      for (int64_t c = 0; c < g.in_per_group(); ++c) {
        // At least one step, so that grad_w is written when the batch is empty.
        for (int64_t n_begin = 0; n_begin == 0 || n_begin < g.batch; n_begin += n_step) {
          const int64_t count = std::min(g.batch - n_begin, n_step);
          if (count > 0 && gy_packed != n_begin) {
            gy_packed = n_begin;
            for (int64_t n = 0; n < count; ++n) {
              for (int64_t o = 0; o < g.out_per_group(); ++o) {
                for (int64_t rho = 0; rho < rows_here; ++rho) {
                  std::memcpy(gy_rows.data() + n * gy_sample + (o * band_rows + rho) * gy_len,
                              grad_y + (((n_begin + n) * g.out_channels + first_o + o) *
                                            g.out_height + i0 + rho) * g.out_width,
                              g.out_width * sizeof(T));
                }
              }
            }
          }
          for (int64_t n = 0; n < count; ++n) {
            for (int64_t d = 0; d < offsets; ++d) {
              const int64_t r = g.input_row(i0, d);
              T* row = rows.data() + (n * offsets + d) * window_row;
              if (r < 0 || r >= g.in_height) {
                std::fill(row, row + window_row, T(0));
                continue;
              }
              const T* x_row =
                  x + (((n_begin + n) * g.in_channels + c0 + c) * g.in_height + r) * g.in_width;
              pad_phase_rows(row, x_row, g, row_len);
            }
          }
          for (int64_t o = 0; o < g.out_per_group(); ++o) {
            const WeightBand<T> band{
                gy_rows.data() + o * band_rows * gy_len, gy_sample, gy_len, rows.data(),
                offsets * window_row, window_row, x_col.data(), count,
                grad_w + g.weight_row(first_o + o, c, 0, 0, i0), g.kernel_w * g.out_plane(),
                g.out_plane(), g.out_width, g.out_width, n_begin == 0,
                large && n_begin + n_step >= g.batch};
            for (int64_t d = 0; d < offsets; ++d) {
              const int64_t first = std::max<int64_t>(0, d - g.kernel_h + 1);
              const int64_t last = std::min(rows_here - 1, d);
              // With one row a band has only the range [0, 0].
              if (first <= last) weight_band_rows<kBandRows>(band, d, g.kernel_w, first, last);
            }
          }
        }
      }
    }
    stream_fence();
  });
}
