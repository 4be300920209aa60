// CPU kernels of the ridge ops, vectorized across pixels. ridge_cpu.cpp includes this file once
// per instruction set, inside a namespace that defines kVectorBytes (the SIMD width in bytes),
// kTile (the side of the register tiles of accumulate_gram), kBlockRows x kBlockCols (the
// register blocks of accumulate_products) and kSolveParts (registers of systems factored side
// by side), after including everything it uses and defining the tuning constants. Hence no
// include guard and no includes.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

template <typename T>
using Lanes = cpu_lanes::Lanes<T, kVectorBytes>;

// The values of an accumulation task's scratch: the data's type where the statistics are wider,
// so that float data under float64 statistics is written and read at half the bytes and
// converted as the sums load it (per-channel k = 3: 0.87-0.93 of the update's time on AVX2,
// benchmarks/compare_builds.py --pass ridge-update); else the statistics' type.
template <typename in_t, typename acc_t>
using ScratchValue = std::conditional_t<(sizeof(in_t) < sizeof(acc_t)), in_t, acc_t>;

// A vector V of values from p, converted where the scratch is narrower than V's lanes.
template <typename V, typename S>
REGGAN_CPU_INLINE V load_as(const S* p) {
  using T = std::remove_reference_t<decltype(std::declval<V&>()[0])>;
  if constexpr (std::is_same_v<S, T>) {
    return Lanes<T>::load(p, Lanes<T>::kWidth);
  } else {
    return Lanes<T>::convert(p);
  }
}

// How a run of `width` values of the scratch reads a sample: value k of sample n is
// data[n * sample_stride + offset + k * step] for k in [begin, end), 0 elsewhere.
template <typename in_t>
struct RunRead {
  const in_t* data;
  int64_t sample_stride, offset, step, begin, end;
};

// n zeroed vectors. std::vector would take their alignment from code compiled for the default
// instruction set, which may be less than kVectorBytes.
template <typename V>
class VectorBuffer {
 public:
  explicit VectorBuffer(int64_t n)
      : data_(static_cast<V*>(::operator new(n * sizeof(V), std::align_val_t(kVectorBytes)))),
        size_(n) {
    zero();
  }
  ~VectorBuffer() { ::operator delete(data_, std::align_val_t(kVectorBytes)); }
  VectorBuffer(const VectorBuffer&) = delete;
  VectorBuffer& operator=(const VectorBuffer&) = delete;
  REGGAN_CPU_INLINE void zero() {
    for (int64_t k = 0; k < size_; ++k) data_[k] = V{};
  }
  V* data() { return data_; }
  V& operator[](int64_t k) { return data_[k]; }

 private:
  V* data_;
  int64_t size_;
};

// acc[r][q] += sum_n a_rows[r][n * stride] * b_rows[q][n * stride] (vectors of kWidth
// values of the scratch, summed in V) for n < count and q < cols: a kTile x kTile block of the
// augmented Gram held in registers across the samples. The last block of rows has cols <= kTile
// rows: its tiles skip the missing ones. On the diagonal (a_rows == b_rows) only its upper
// triangle is computed.
template <bool kDiagonal, int kCols = kTile, typename S, typename V>
inline void gram_tile(int64_t cols, const S* const* a_rows, const S* const* b_rows,
                      int64_t stride, int64_t count, V* acc) {
  if constexpr (kCols > 1) {
    if (cols < kCols) {
      return gram_tile<kDiagonal, kCols - 1>(cols, a_rows, b_rows, stride, count, acc);
    }
  }
  constexpr int kRows = kDiagonal ? kCols : kTile;
  V c[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < kCols; ++q) c[r][q] = acc[r * kTile + q];
  }
  for (int64_t n = 0; n < count; ++n) {
    V a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = load_as<V>(a_rows[r] + n * stride);
    for (int q = 0; q < kCols; ++q) {
      const V b = load_as<V>(b_rows[q] + n * stride);
      for (int r = 0; r < kRows; ++r) {
        if (!kDiagonal || r <= q) c[r][q] += a[r] * b;
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < kCols; ++q) acc[r * kTile + q] = c[r][q];
  }
}

// The multiply-adds per sample and vector of pixels of accumulate_gram's tiles for `rows` rows
// of the augmented design: the tiles on the diagonal sum their upper triangles.
inline int64_t tile_multiply_adds(int64_t rows) {
  const int64_t blocks = (rows + kTile - 1) / kTile;
  return blocks * (blocks - 1) / 2 * kTile * kTile + blocks * kTile * (kTile + 1) / 2;
}

// acc[r * kBlockCols + q] += sum_n at[a[r] + n * stride] * at[b[q] + n * stride]
// (vectors of kWidth values of the scratch, summed in V) for n < samples, r < kRows,
// q < kCols: a block of products held in registers across the samples, each vector loaded once
// for the products of its row or column.
template <int kRows, int kCols, typename S, typename V>
REGGAN_CPU_INLINE void product_block(const S* at, const int64_t* a, const int64_t* b,
                                     int64_t stride, int64_t samples, V* acc) {
  V c[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < kCols; ++q) c[r][q] = acc[r * kBlockCols + q];
  }
  for (int64_t n = 0; n < samples; ++n) {
    const S* sample = at + n * stride;
    V av[kRows];
    for (int r = 0; r < kRows; ++r) av[r] = load_as<V>(sample + a[r]);
    for (int q = 0; q < kCols; ++q) {
      V bv = load_as<V>(sample + b[q]);
      cpu_lanes::keep_in_register(bv);
      for (int r = 0; r < kRows; ++r) c[r][q] += av[r] * bv;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < kCols; ++q) acc[r * kBlockCols + q] = c[r][q];
  }
}

// product_block for 1 <= rows <= kBlockRows and 1 <= cols <= kBlockCols known at run time.
// Inlined whole into its caller, so that the dispatch is a few compares, not a call for each
// instantiation it passes through, each with a prologue that aligns the stack.
template <int kRows = kBlockRows, int kCols = kBlockCols, typename S, typename V>
REGGAN_CPU_INLINE void sized_product_block(int64_t rows, int64_t cols, const S* at,
                                           const int64_t* a, const int64_t* b, int64_t stride,
                                           int64_t samples, V* acc) {
  if constexpr (kRows > 1) {
    if (rows < kRows) {
      return sized_product_block<kRows - 1, kCols>(rows, cols, at, a, b, stride, samples, acc);
    }
  }
  if constexpr (kCols > 1) {
    if (cols < kCols) {
      return sized_product_block<kRows, kCols - 1>(rows, cols, at, a, b, stride, samples, acc);
    }
  }
  product_block<kRows, kCols>(at, a, b, stride, samples, acc);
}

// Writes the `width` values of sample n that `run` reads to dst, converted.
template <typename in_t, typename acc_t>
REGGAN_CPU_INLINE void fill_run(acc_t* dst, const RunRead<in_t>& run, int64_t n, int64_t width) {
  using L = Lanes<acc_t>;
  const in_t* p = run.data + n * run.sample_stride + run.offset;
  std::fill(dst, dst + run.begin, acc_t(0));
  int64_t k = run.begin;
  if (run.step == 1) {
    for (; k + L::kWidth <= run.end; k += L::kWidth) {
      L::store(dst + k, L::convert(p + k), L::kWidth);
    }
  }
  for (; k < run.end; ++k) dst[k] = acc_t(p[k * run.step]);
  std::fill(dst + run.end, dst + width, acc_t(0));
}

// Kernel column v of a layer reads column j + shift of residue `residue` modulo stride_w for
// output column j.
struct ColumnShift {
  int64_t shift, residue;
};

inline ColumnShift column_shift(const LocalGeometry& g, int64_t v) {
  const int64_t offset = g.col_offset(v);
  const int64_t shift = (offset >= 0 ? offset : offset - g.stride_w + 1) / g.stride_w;
  return {shift, offset - shift * g.stride_w};
}

// The runs of an accumulation task's scratch (TaskRuns) for a band of `band` output rows, and
// the run and shift each row of the augmented design reads: per input channel of the group,
// input row input_row(i0, 0) + offset (offset in input_offsets) and residue r of the column
// modulo stride_w, the inputs the segment's pixels read through it; then the group's outputs,
// row by row of the band; then a run of ones (the bias).
class RunLayout {
 public:
  RunLayout(const RidgeGeometry& rg, int64_t band) : rg_(rg), band_(band) {
    const LocalGeometry& g = rg.layer;
    for (int64_t b = 0; b < band; ++b) {
      for (int64_t u = 0; u < g.kernel_h; ++u) input_of_[b * g.stride_h + u * g.dilation_h] = 0;
    }
    for (auto& [offset, index] : input_of_) {
      index = int64_t(input_offsets_.size());
      input_offsets_.push_back(offset);
    }
    in_runs_ = g.in_per_group() * int64_t(input_offsets_.size()) * g.stride_w;
    first_shift_ = column_shift(g, 0).shift;
  }

  int64_t band() const { return band_; }
  const std::vector<int64_t>& input_offsets() const { return input_offsets_; }
  int64_t ones_run() const { return in_runs_ + band_ * rg_.layer.out_per_group(); }
  int64_t first_shift() const { return first_shift_; }
  // The largest shift a row is read from.
  int64_t span() const {
    return column_shift(rg_.layer, rg_.layer.kernel_w - 1).shift - first_shift_;
  }

  // The run that row a of the augmented design of the band's row b reads.
  int64_t run(int64_t b, int64_t a) const {
    const LocalGeometry& g = rg_.layer;
    const int64_t d = rg_.unknowns();
    if (a >= d) return in_runs_ + b * g.out_per_group() + a - d;
    if (a >= rg_.taps()) return ones_run();
    const Tap t = tap_of(a, g);
    const int64_t input = input_of_.at(b * g.stride_h + t.u * g.dilation_h);
    return (t.channel * int64_t(input_offsets_.size()) + input) * g.stride_w +
           column_shift(g, t.v).residue;
  }
  // The value of its run that row a of the augmented design reads for the segment's first pixel.
  int64_t shift(int64_t a) const {
    return a < rg_.taps() ? column_shift(rg_.layer, tap_of(a, rg_.layer).v).shift - first_shift_
                          : 0;
  }

 private:
  const RidgeGeometry& rg_;
  int64_t band_;
  std::map<int64_t, int64_t> input_of_;  // input row offset -> its index in input_offsets_
  std::vector<int64_t> input_offsets_;
  int64_t in_runs_, first_shift_;
};

// An output row's vectors of W pixels, split into as few segments as keep the accumulators
// (`vector_bytes` for each vector) within about kAccumulatorBytes, of equal sizes (a short last
// segment would read its inputs for few pixels): an accumulation task owns one segment of a
// row or band of rows.
template <int64_t W>
struct RowSegments {
  RowSegments(int64_t out_width, int64_t vector_bytes) : out_width(out_width) {
    const int64_t row_vectors = (out_width + W - 1) / W;
    const int64_t most = std::clamp<int64_t>(kAccumulatorBytes / vector_bytes, 1, row_vectors);
    count = (row_vectors + most - 1) / most;
    segment = (row_vectors + count - 1) / count;
  }

  // Values of a scratch run: a segment's pixels and `span` more, in whole vectors.
  int64_t run_width(int64_t span) const { return (segment * W + span + W - 1) / W * W; }
  // The first pixel of segment s, its pixels (none past the row's end) and its vectors.
  int64_t first(int64_t s) const { return s * segment * W; }
  int64_t lanes(int64_t s) const { return std::min(segment * W, out_width - first(s)); }
  int64_t vectors(int64_t s) const { return (lanes(s) + W - 1) / W; }

  int64_t out_width, segment, count;
};

// The scratch of an accumulation task (see accumulate): for each of `chunk` samples, the runs
// of a RunLayout, `width` values each, `sample_values` apart. A task owns a group, a band of
// output rows from row i0 and a segment of output columns from column j0; inputs outside the
// image read as zeros, and an output row has `lanes` values (none past the last row).
template <typename in_t, typename scratch_t>
class TaskRuns {
 public:
  TaskRuns(int64_t chunk, int64_t sample_values, int64_t width, int64_t ones_run)
      // Zeros, in whole vectors.
      : scratch_((chunk * sample_values + Lanes<scratch_t>::kWidth - 1) /
                 Lanes<scratch_t>::kWidth),
        sample_values_(sample_values),
        width_(width) {
    for (int64_t s = 0; s < chunk; ++s) {
      std::fill_n(scratch() + s * sample_values + ones_run * width, width, scratch_t(1));
    }
  }

  scratch_t* scratch() { return reinterpret_cast<scratch_t*>(scratch_.data()); }

  void set(const in_t* x, const in_t* y, const LocalGeometry& g, const RunLayout& layout,
           int64_t group, int64_t i0, int64_t j0, int64_t lanes) {
    const int64_t c0 = group * g.in_per_group();
    runs_.clear();
    for (int64_t c = 0; c < g.in_per_group(); ++c) {
      for (const int64_t input_offset : layout.input_offsets()) {
        const int64_t in_row = g.input_row(i0, 0) + input_offset;
        for (int64_t r = 0; r < g.stride_w; ++r) {
          // Value k of the run is input column (j0 + first_shift + k) * stride_w + r.
          const int64_t offset = (j0 + layout.first_shift()) * g.stride_w + r;
          int64_t kb = 0, ke = 0;
          if (in_row >= 0 && in_row < g.in_height) {
            valid_output_range(offset, g.stride_w, g.in_width, width_, &kb, &ke);
          }
          runs_.push_back(RunRead<in_t>{x, g.in_channels * g.in_plane(),
                                       ((c0 + c) * g.in_height + in_row) * g.in_width + offset,
                                       g.stride_w, kb, ke});
        }
      }
    }
    for (int64_t b = 0; b < layout.band(); ++b) {
      for (int64_t o = 0; o < g.out_per_group(); ++o) {
        const int64_t oc = group * g.out_per_group() + o;
        runs_.push_back(RunRead<in_t>{y, g.out_channels * g.out_plane(),
                                     (oc * g.out_height + i0 + b) * g.out_width + j0, 1, 0,
                                     i0 + b < g.out_height ? lanes : 0});
      }
    }
    lines_.clear();
    for (const RunRead<in_t>& run : runs_) {
      for (int64_t k = run.begin; k < run.end; ++k) {
        const in_t* p = run.data + run.offset + k * run.step;
        if (lines_.empty() || lines_.back().second != run.sample_stride ||
            reinterpret_cast<uintptr_t>(lines_.back().first) / 64 !=
                reinterpret_cast<uintptr_t>(p) / 64) {
          lines_.emplace_back(p, run.sample_stride);
        }
      }
    }
  }

  // Copies samples [n0, n0 + count) of the runs to the scratch.
  void fill(int64_t n0, int64_t count, int64_t batch) {
    for (int64_t s = 0; s < count; ++s) {
      const int64_t n = n0 + s;
      // Samples lie far apart in memory, beyond the hardware prefetchers' reach. Into L2: the
      // lines of a few samples are more than L1 can have in flight.
      if (n + kPrefetchSamples < batch) {
        for (const auto& [p, stride] : lines_) {
          __builtin_prefetch(p + (n + kPrefetchSamples) * stride, 0, 2);
        }
      }
      for (size_t k = 0; k < runs_.size(); ++k) {
        fill_run(scratch() + s * sample_values_ + k * width_, runs_[k], n, width_);
      }
    }
  }

 private:
  VectorBuffer<typename Lanes<scratch_t>::value> scratch_;
  int64_t sample_values_, width_;
  std::vector<RunRead<in_t>> runs_;
  // The cache lines the runs read: address in sample 0, sample stride.
  std::vector<std::pair<const in_t*, int64_t>> lines_;
};

// Adds a task's sums to the statistics: for each row b < rows of its band from output row i0
// and each entry (a, c) of the augmented Gram, values(b, packed_index(c, a)) gives the entry's
// sums for the segment's pixels from column j0 (`lanes` of them): vector v of them at
// values + v * stride. Entry (a, c) goes to G for c < d, R for a < d <= c, y^2 for a = c >= d.
// The segment's pixels of an entry are contiguous in the statistics, and the entries lie a
// plane apart: prefetch a few entries ahead.
template <typename acc_t, typename Values>
void add_to_statistics(acc_t* gram, acc_t* cross, acc_t* target_sq, const RidgeGeometry& rg,
                       int64_t group, int64_t i0, int64_t rows, int64_t j0, int64_t lanes,
                       int64_t stride, const Values& values,
                       std::vector<std::pair<acc_t*, const acc_t*>>& destinations) {
  using L = Lanes<acc_t>;
  constexpr int64_t W = L::kWidth;
  const LocalGeometry& g = rg.layer;
  const int64_t d = rg.unknowns(), packed = rg.packed_size(), pixels = g.out_plane();
  destinations.clear();
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t p0 = (i0 + b) * g.out_width + j0;
    for (int64_t a = 0; a < d; ++a) {
      for (int64_t c = a; c < d; ++c) {
        destinations.emplace_back(gram + (group * packed + packed_index(c, a)) * pixels + p0,
                                  values(b, packed_index(c, a)));
      }
    }
    for (int64_t o = 0; o < g.out_per_group(); ++o) {
      const int64_t oc = group * g.out_per_group() + o;
      for (int64_t a = 0; a < d; ++a) {
        destinations.emplace_back(cross + (oc * d + a) * pixels + p0,
                                  values(b, packed_index(d + o, a)));
      }
      destinations.emplace_back(target_sq + oc * pixels + p0,
                                values(b, packed_index(d + o, d + o)));
    }
  }
  for (size_t e = 0; e < destinations.size(); ++e) {
    if (e + kPrefetchEntries < destinations.size()) {
      for (int64_t l = 0; l < lanes; l += 64 / int64_t(sizeof(acc_t))) {
        __builtin_prefetch(destinations[e + kPrefetchEntries].first + l, 1);
      }
    }
    const auto [dst, src] = destinations[e];
    for (int64_t v = 0; v * W < lanes; ++v) {
      const int64_t n = std::min(W, lanes - v * W);
      L::store(dst + v * W, L::load(dst + v * W, n) + L::load(src + v * stride, n), n);
    }
  }
}

// The statistics of one update (ridge_accumulate_). A task owns a group, a band of consecutive
// output rows and a segment (RowSegments) of vectors of kWidth consecutive pixels of those
// rows. For a chunk of samples it first copies what the task reads into a scratch of runs
// (TaskRuns): row a of the augmented design [z, y] of pixel k of a row of the band is then
// value shift_a + k of a run, so each input is read from memory once for all the taps that read
// it.
// It then sums the chunk's augmented Gram in registers into the task's accumulators, and at the
// end adds them to gram, cross and target_sq. Each statistic is written by one task and its
// samples are summed in order: the result is deterministic. Two ways to sum:
//  - accumulate_gram: entry by entry, in kTile x kTile tiles of the Gram, one output row a task;
//  - accumulate_products: entry (a, b) is sum_n run_a[shift_a + k] * run_b[shift_b + k], and the
//    entries of the band's rows that read the same two runs at the same distance shift_b -
//    shift_a are one product of two runs, read at different k. Per channel, 4 rows at k = 3
//    need 114 products for their 264 entries (8 rows 214 for 528); at k = 7, 792 for 5304.
// The products serve layers with one input channel per group (RegGAN's per-channel layer;
// benchmarks/ridge_table.py: the float64 accumulation 1.5x faster at k = 3, 4.6x at k = 7).
// With more, a sample has more runs, so a pass takes fewer samples, fewer entries share a
// product, and planning the products and their larger accumulators cost more per update:
// accumulate takes the products there only with up to kMaxProductChannels per group, in
// batches of kMinProductBatch samples or more, where the tiles would take kProductGain times
// their multiply-adds or more (benchmarks/compare_builds.py --pass ridge-update).
template <typename in_t, typename acc_t>
void accumulate_gram(const in_t* x, const in_t* y, acc_t* gram, acc_t* cross, acc_t* target_sq,
                     const RidgeGeometry& rg) {
  using L = Lanes<acc_t>;
  using V = typename L::value;
  constexpr int64_t W = L::kWidth;
  const LocalGeometry& g = rg.layer;
  const int64_t rows = rg.unknowns() + g.out_per_group();  // of the augmented design
  const int64_t blocks = (rows + kTile - 1) / kTile;
  const int64_t padded_rows = blocks * kTile;
  const int64_t acc_size = blocks * (blocks + 1) / 2 * kTile * kTile;
  // Samples per pass: a vector's design rows for them fit in about kScratchBytes of L1.
  const int64_t chunk =
      std::clamp<int64_t>(kScratchBytes / (padded_rows * int64_t(sizeof(V))), 8, 64);
  const RowSegments<W> segments(g.out_width, acc_size * int64_t(sizeof(V)));
  const RunLayout layout(rg, 1);
  const int64_t width = segments.run_width(layout.span());
  const int64_t sample_values = (layout.ones_run() + 1) * width;
  // Where augmented row a of the segment's first vector starts in a sample's runs, and where
  // entry packed_index(b, a) is in a vector's accumulators, in values.
  std::vector<int64_t> row_offsets(rows), entry_values(rows * (rows + 1) / 2);
  for (int64_t a = 0; a < rows; ++a) {
    row_offsets[a] = layout.run(0, a) * width + layout.shift(a);
    for (int64_t b = a; b < rows; ++b) {
      entry_values[packed_index(b, a)] =
          ((packed_index(b / kTile, a / kTile) * kTile + a % kTile) * kTile + b % kTile) * W;
    }
  }
  const int64_t work = g.batch * rows * rows * W * segments.segment;
  at::parallel_for(0, g.groups * g.out_height * segments.count,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> acc(segments.segment * acc_size);
    using S = ScratchValue<in_t, acc_t>;
    TaskRuns<in_t, S> task_runs(chunk, sample_values, width, layout.ones_run());
    const S* scratch = task_runs.scratch();
    std::vector<const S*> row_starts(rows);
    std::vector<std::pair<acc_t*, const acc_t*>> destinations;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (g.out_height * segments.count);
      const int64_t i = task / segments.count % g.out_height;
      const int64_t segment = task % segments.count;
      const int64_t lanes = segments.lanes(segment);
      acc.zero();
      task_runs.set(x, y, g, layout, group, i, segments.first(segment), lanes);
      for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
        const int64_t count = std::min(chunk, g.batch - n0);
        task_runs.fill(n0, count, g.batch);
        for (int64_t v = 0; v < segments.vectors(segment); ++v) {
          for (int64_t a = 0; a < rows; ++a) row_starts[a] = scratch + row_offsets[a] + v * W;
          V* vector_acc = acc.data() + v * acc_size;
          for (int64_t ta = 0; ta < blocks; ++ta) {
            const S* const* a_rows = row_starts.data() + ta * kTile;
            for (int64_t tb = ta; tb < blocks; ++tb) {
              V* t = vector_acc + packed_index(tb, ta) * kTile * kTile;
              const int64_t cols = std::min<int64_t>(kTile, rows - tb * kTile);
              if (ta == tb) {
                gram_tile<true>(cols, a_rows, a_rows, sample_values, count, t);
              } else {
                gram_tile<false>(cols, a_rows, row_starts.data() + tb * kTile, sample_values,
                                 count, t);
              }
            }
          }
        }
      }
      const acc_t* sums = reinterpret_cast<const acc_t*>(acc.data());
      add_to_statistics(
          gram, cross, target_sq, rg, group, i, 1, segments.first(segment), lanes, acc_size * W,
          [&](int64_t, int64_t entry) { return sums + entry_values[entry]; }, destinations);
    }
  });
}

// Sums bands of band_rows output rows. Returns false, having summed nothing, where the tiles
// would take less than min_gain times its multiply-adds, or, with whole_rows, where a task
// could not own a whole output row (its accumulators over kAccumulatorBytes) or the threads
// would have fewer than kMinTasksPerThread tasks each.
template <typename in_t, typename acc_t>
bool accumulate_products(const in_t* x, const in_t* y, acc_t* gram, acc_t* cross,
                         acc_t* target_sq, const RidgeGeometry& rg, int64_t band_rows,
                         bool whole_rows, double min_gain) {
  using L = Lanes<acc_t>;
  using V = typename L::value;
  constexpr int64_t W = L::kWidth;
  const LocalGeometry& g = rg.layer;
  const int64_t rows = rg.unknowns() + g.out_per_group();  // of the augmented design
  const int64_t entries = rows * (rows + 1) / 2;
  const int64_t band = std::min<int64_t>(band_rows, g.out_height);
  const int64_t bands = (g.out_height + band - 1) / band;
  // Known before the products are planned, so too few tasks skip the planning.
  if (whole_rows && g.groups * bands < kMinTasksPerThread * at::get_num_threads()) return false;
  const RunLayout layout(rg, band);
  const int64_t ones_run = layout.ones_run();
  // The products, (first run, second run, distance): the first run is read from shift 0, the
  // second from the distance on; the ones run is constant, so its products need no shift. For
  // entry e of the band's row b: its product, products[entry_product[b * entries + e]], and the
  // shift it is read at, entry_shift[e]. The entries of two different outputs are no statistic:
  // they have no product (kNoProduct). The entries outnumber the products: their keys are
  // sorted, and a run of equal keys is one product (a map took most of the planning with
  // several channels). A key packs its triple in 32 bits each, so that sorting keys sorts
  // triples: the entries would fill memory long before a run or distance reached 2^32.
  using Key = unsigned __int128;
  constexpr int64_t kNoProduct = -1;
  const auto key_of = [](int64_t first_run, int64_t second_run, int64_t distance) {
    return Key(uint64_t(first_run)) << 64 | Key(uint64_t(second_run)) << 32 |
           Key(uint64_t(distance));
  };
  const auto unpack = [](Key key) {
    return std::array<int64_t, 3>{int64_t(key >> 64), int64_t(uint32_t(key >> 32)),
                                  int64_t(uint32_t(key))};
  };
  const int64_t d = rg.unknowns();
  std::vector<int64_t> run_of(band * rows), shift_of(rows);
  for (int64_t a = 0; a < rows; ++a) {
    shift_of[a] = layout.shift(a);
    for (int64_t b = 0; b < band; ++b) run_of[b * rows + a] = layout.run(b, a);
  }
  std::vector<std::pair<Key, int64_t>> entry_keys;  // (key, b * entries + e)
  std::vector<int64_t> entry_shift(entries);
  int64_t max_entry_shift = 0;
  for (int64_t b = 0; b < band; ++b) {
    for (int64_t col = 0; col < rows; ++col) {
      for (int64_t row = 0; row <= col; ++row) {
        if (row >= d && row != col) continue;
        int64_t ra = run_of[b * rows + row], rb = run_of[b * rows + col];
        int64_t sa = shift_of[row], sb = shift_of[col];
        if (ra == ones_run) sa = sb;
        if (rb == ones_run) sb = sa;
        if (sb < sa || (sb == sa && rb < ra)) {
          std::swap(ra, rb);
          std::swap(sa, sb);
        }
        const int64_t e = packed_index(col, row);
        entry_keys.emplace_back(key_of(ra, rb, sb - sa), b * entries + e);
        entry_shift[e] = sa;
        max_entry_shift = std::max(max_entry_shift, sa);
      }
    }
  }
  std::sort(entry_keys.begin(), entry_keys.end());
  std::vector<Key> products;
  std::vector<int64_t> entry_product(band * entries, kNoProduct);
  for (const auto& [key, entry] : entry_keys) {
    if (products.empty() || products.back() != key) products.push_back(key);
    entry_product[entry] = int64_t(products.size()) - 1;
  }
  // The products are summed in blocks of an outer product: kBlockRows second factors (a run
  // and a distance; rows) by up to kBlockCols of the first runs (columns, in order) that
  // products of these rows have. The second factors are read at a shift, across cache lines:
  // as rows, each is loaded once for a block's kBlockCols products. Rows are ordered by the set
  // of first runs they pair with, so that a block's rows mostly share their columns (at k = 3,
  // 2 x 8 blocks sum 132 products for 114, against 143 with first runs as rows). Product (r, q)
  // of block k is accumulator (k * kBlockRows + r) * kBlockCols + q of a vector of pixels; a
  // block's other products are summed and not read.
  using Factor = std::pair<int64_t, int64_t>;  // (second run, distance)
  std::map<Factor, std::vector<int64_t>> firsts_of;  // ascending: products are sorted
  for (const Key key : products) {
    const auto [first_run, second_run, distance] = unpack(key);
    firsts_of[{second_run, distance}].push_back(first_run);
  }
  std::vector<Factor> row_factors;
  for (const auto& [factor, unused] : firsts_of) row_factors.push_back(factor);
  std::stable_sort(row_factors.begin(), row_factors.end(), [&](const Factor& a, const Factor& b) {
    return firsts_of.at(a) < firsts_of.at(b);
  });
  std::map<Factor, int64_t> row_of;
  for (size_t r = 0; r < row_factors.size(); ++r) row_of[row_factors[r]] = int64_t(r);
  const int64_t row_blocks = (int64_t(row_factors.size()) + kBlockRows - 1) / kBlockRows;
  std::vector<std::map<int64_t, int64_t>> column_of(row_blocks);  // first run -> its column
  for (const Key key : products) {
    const auto [first_run, second_run, distance] = unpack(key);
    column_of[row_of[{second_run, distance}] / kBlockRows][first_run] = 0;
  }
  struct Block {
    int64_t row_block, rows, columns_begin, cols;
  };
  std::vector<Block> blocks;
  std::vector<int64_t> columns;  // first runs, block by block
  std::vector<int64_t> block_start(row_blocks);
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    block_start[rb] = int64_t(blocks.size());
    const int64_t block_rows =
        std::min<int64_t>(kBlockRows, int64_t(row_factors.size()) - rb * kBlockRows);
    int64_t q = 0;
    for (auto& [column, index] : column_of[rb]) {
      index = q++;
      if (index % kBlockCols == 0) {
        blocks.push_back(Block{rb, block_rows, int64_t(columns.size()), 0});
      }
      ++blocks.back().cols;
      columns.push_back(column);
    }
  }
  std::vector<int64_t> accumulator_of(products.size());  // of products[i]
  for (size_t i = 0; i < products.size(); ++i) {
    const auto [first_run, second_run, distance] = unpack(products[i]);
    const int64_t r = row_of[{second_run, distance}], q = column_of[r / kBlockRows][first_run];
    const int64_t k = block_start[r / kBlockRows] + q / kBlockCols;
    accumulator_of[i] = (k * kBlockRows + r % kBlockRows) * kBlockCols + q % kBlockCols;
  }
  const int64_t count_products = int64_t(blocks.size()) * kBlockRows * kBlockCols;
  const RowSegments<W> segments(g.out_width, count_products * int64_t(sizeof(V)));
  if (whole_rows && segments.count > 1) return false;
  const int64_t width = segments.run_width(layout.span());
  // A segment's products are summed for its pixels and the entries' shifts beyond them.
  const auto task_vectors = [&](int64_t segment) {
    return (segments.lanes(segment) + max_entry_shift + W - 1) / W;
  };
  if (min_gain > 0) {
    int64_t products_per_vector = 0, vectors = 0;
    for (const Block& block : blocks) products_per_vector += block.rows * block.cols;
    for (int64_t s = 0; s < segments.count; ++s) vectors += task_vectors(s);
    const int64_t tiles = tile_multiply_adds(rows) * ((g.out_width + W - 1) / W) * band;
    if (double(tiles) < min_gain * double(products_per_vector * vectors)) return false;
  }
  // The vectors of a product's values that a segment's entries read, at most width / W.
  const int64_t product_vectors = (segments.segment * W + max_entry_shift + W - 1) / W;
  const int64_t sample_values = (ones_run + 1) * width;
  // Samples per pass: a vector's values of every run for them (two cache lines each) fit in
  // about kScratchBytes of L1.
  const int64_t chunk = std::clamp<int64_t>(
      kScratchBytes / (2 * (ones_run + 1) * int64_t(sizeof(V))), 8, 64);
  // A run of the second factor is read up to `span` values past its end, into the runs after
  // it (never past the ones run, which is last and read without a shift): those values only
  // reach accumulator lanes that no entry reads.
  std::vector<int64_t> row_offsets(row_factors.size()), column_offsets(columns.size());
  for (size_t r = 0; r < row_factors.size(); ++r) {
    row_offsets[r] = row_factors[r].first * width + row_factors[r].second;
  }
  for (size_t q = 0; q < columns.size(); ++q) column_offsets[q] = columns[q] * width;
  // Where the values of entry e of the band's row b start in the accumulators.
  std::vector<int64_t> entry_values(entry_product.size());
  for (size_t e = 0; e < entry_product.size(); ++e) {
    if (entry_product[e] != kNoProduct) {
      entry_values[e] =
          accumulator_of[entry_product[e]] * product_vectors * W + entry_shift[e % entries];
    }
  }
  const int64_t work = g.batch * count_products * W * segments.segment;
  at::parallel_for(0, g.groups * bands * segments.count,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    // The accumulators, vector by vector of pixels: the blocks of a vector load and store
    // theirs from one stretch of memory, not a vector's stride apart. At the end of a task they
    // are regrouped product by product in `sums`, where an entry's values lie in a row, whatever
    // its shift.
    VectorBuffer<V> acc(product_vectors * count_products), sums(count_products * product_vectors);
    using S = ScratchValue<in_t, acc_t>;
    TaskRuns<in_t, S> task_runs(chunk, sample_values, width, layout.ones_run());
    const S* scratch = task_runs.scratch();
    std::vector<std::pair<acc_t*, const acc_t*>> destinations;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (bands * segments.count);
      const int64_t i0 = task / segments.count % bands * band;
      const int64_t segment = task % segments.count;
      const int64_t lanes = segments.lanes(segment), vectors = task_vectors(segment);
      acc.zero();
      task_runs.set(x, y, g, layout, group, i0, segments.first(segment), lanes);
      for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
        const int64_t count = std::min(chunk, g.batch - n0);
        task_runs.fill(n0, count, g.batch);
        for (int64_t m = 0; m < vectors; ++m) {
          for (size_t k = 0; k < blocks.size(); ++k) {
            const Block& block = blocks[k];
            sized_product_block(block.rows, block.cols, scratch + m * W,
                                row_offsets.data() + block.row_block * kBlockRows,
                                column_offsets.data() + block.columns_begin, sample_values,
                                count,
                                acc.data() + m * count_products + k * kBlockRows * kBlockCols);
          }
        }
      }
      for (int64_t product = 0; product < count_products; ++product) {
        for (int64_t m = 0; m < vectors; ++m) {
          sums[product * product_vectors + m] = acc[m * count_products + product];
        }
      }
      const acc_t* sum_values = reinterpret_cast<const acc_t*>(sums.data());
      add_to_statistics(
          gram, cross, target_sq, rg, group, i0, std::min(band, g.out_height - i0),
          segments.first(segment), lanes, W,
          [&](int64_t b, int64_t entry) { return sum_values + entry_values[b * entries + entry]; },
          destinations);
    }
  });
  return true;
}

template <typename in_t, typename acc_t>
void accumulate(Tag, const in_t* x, const in_t* y, acc_t* gram, acc_t* cross, acc_t* target_sq,
                const RidgeGeometry& rg) {
  // The wide bands where a task can still own a whole row; else the bands of kBandRows.
  const auto products = [&](double min_gain) {
    return accumulate_products(x, y, gram, cross, target_sq, rg, kWideBandRows, true,
                               min_gain) ||
           accumulate_products(x, y, gram, cross, target_sq, rg, kBandRows, false, min_gain);
  };
  if (rg.layer.in_per_group() == 1) {
    products(0.0);
  } else if (rg.layer.in_per_group() > kMaxProductChannels || rg.layer.batch < kMinProductBatch ||
             !products(kProductGain)) {
    accumulate_gram(x, y, gram, cross, target_sq, rg);
  }
}

// Factors every system (gram + lam P) of a batch and hands each task's factor to
// after(group, p0, lanes, factor, scratch): a task owns a group and kSolveParts registers of
// consecutive pixels, factored together lane by lane; scratch holds D vectors. Writes info.
template <typename acc_t, typename After>
void for_each_factor(const acc_t* gram, const acc_t* lam, int32_t* info, int64_t groups,
                     int64_t d, int64_t pixels, bool penalize_last, int64_t after_work,
                     const After& after) {
  using L = cpu_lanes::WideLanes<acc_t, kVectorBytes, kSolveParts>;
  using V = typename L::value;
  constexpr int64_t W = L::kWidth;
  const int64_t packed = d * (d + 1) / 2;
  const int64_t vectors = (pixels + W - 1) / W;
  const int64_t work = (d * d * d / 6 + after_work) * W;
  at::parallel_for(0, groups * vectors,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> a(packed), scratch(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / vectors;
      const int64_t p0 = task % vectors * W;
      const int64_t lanes = std::min(W, pixels - p0);
      // The entries lie a plane apart: each load prefetches the one kSolvePrefetchEntries on.
      const acc_t* system = gram + group * packed * pixels + p0;
      for (int64_t k = 0; k < packed; ++k) {
        if (k + kSolvePrefetchEntries < packed) {
          for (int64_t l = 0; l < lanes; l += Lanes<acc_t>::kWidth) {
            __builtin_prefetch(system + (k + kSolvePrefetchEntries) * pixels + l);
          }
        }
        a[k] = L::load(system + k * pixels, lanes);
      }
      const V shift = L::load(lam + group * pixels + p0, lanes);
      typename L::flag failed{};  // zeros
      ldlt_factor<L, kFactorRows>(a.data(), d, 1, shift, penalize_last,
                                  std::numeric_limits<acc_t>::epsilon(), failed);
      after(group, p0, lanes, a.data(), scratch.data());
      for (int64_t l = 0; l < lanes; ++l) info[group * pixels + p0 + l] = L::lane(failed, l);
    }
  });
}

// ridge_solve: the factor solves each output's right-hand side.
template <typename acc_t>
void solve(Tag, const acc_t* gram, const acc_t* cross, const acc_t* lam, acc_t* solution,
           int32_t* info, const SolveSizes& s, bool penalize_last) {
  using L = cpu_lanes::WideLanes<acc_t, kVectorBytes, kSolveParts>;
  using V = typename L::value;
  const int64_t d = s.unknowns, pixels = s.pixels();
  for_each_factor(gram, lam, info, s.groups, d, pixels, penalize_last,
                  s.out_per_group * d * d,
                  [&](int64_t group, int64_t p0, int64_t lanes, const V* factor, V* b) {
    for (int64_t o = 0; o < s.out_per_group; ++o) {
      const int64_t offset = (group * s.out_per_group + o) * d * pixels + p0;
      for (int64_t k = 0; k < d; ++k) b[k] = L::load(cross + offset + k * pixels, lanes);
      ldlt_solve<L>(factor, d, 1, b);
      for (int64_t k = 0; k < d; ++k) L::store(solution + offset + k * pixels, b[k], lanes);
    }
  });
}

// ridge_inverse_trace: the sum of the penalized diagonal entries of each system's inverse.
template <typename acc_t>
void inverse_trace(Tag, const acc_t* gram, const acc_t* lam, acc_t* trace, int32_t* info,
                   const SolveSizes& s, bool penalize_last) {
  using L = cpu_lanes::WideLanes<acc_t, kVectorBytes, kSolveParts>;
  using V = typename L::value;
  const int64_t d = s.unknowns, pixels = s.pixels();
  const int64_t penalized = penalize_last ? d : d - 1;
  for_each_factor(gram, lam, info, s.groups, d, pixels, penalize_last, d * d * d / 6,
                  [&](int64_t group, int64_t p0, int64_t lanes, const V* factor, V* c) {
    L::store(trace + group * pixels + p0,
             ldlt_inverse_diagonal_sum<L>(factor, d, 1, penalized, c), lanes);
  });
}
