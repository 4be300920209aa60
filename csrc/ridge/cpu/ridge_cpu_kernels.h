// CPU kernels of the ridge ops, vectorized across pixels. ridge_cpu.cpp includes this file once
// per instruction set, inside a namespace that defines kVectorBytes (the SIMD width in bytes),
// kTile (the side of the register tile of the Gram update) and kSolveParts (registers of
// systems factored side by side), after including everything it uses and defining the tuning
// constants. Hence no include guard and no includes.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

template <typename T>
using Lanes = cpu_lanes::Lanes<T, kVectorBytes>;

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
// values) for n < count and q < cols: a kTile x kTile block of the augmented Gram held in
// registers across the samples. The last block of rows has cols <= kTile rows: its tiles skip
// the missing ones. On the diagonal (a_rows == b_rows) only its upper triangle is computed.
template <bool kDiagonal, int kCols = kTile, typename T, typename V>
inline void gram_tile(int64_t cols, const T* const* a_rows, const T* const* b_rows,
                      int64_t stride, int64_t count, V* acc) {
  if constexpr (kCols > 1) {
    if (cols < kCols) {
      return gram_tile<kDiagonal, kCols - 1>(cols, a_rows, b_rows, stride, count, acc);
    }
  }
  using L = Lanes<T>;
  constexpr int kRows = kDiagonal ? kCols : kTile;
  V c[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < kCols; ++q) c[r][q] = acc[r * kTile + q];
  }
  for (int64_t n = 0; n < count; ++n) {
    V a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = L::load(a_rows[r] + n * stride, L::kWidth);
    for (int q = 0; q < kCols; ++q) {
      const V b = L::load(b_rows[q] + n * stride, L::kWidth);
      for (int r = 0; r < kRows; ++r) {
        if (!kDiagonal || r <= q) c[r][q] += a[r] * b;
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < kCols; ++q) acc[r * kTile + q] = c[r][q];
  }
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

// Statistics of one update. A task owns a group and a segment of up to `segment` vectors of
// kWidth consecutive pixels of an output row. For a chunk of samples it first copies, sample by
// sample, what the segment reads into a scratch of runs: per input row the group reads and
// residue of the column modulo stride_w, the inputs the segment's pixels read through it, zero
// where they are padding (in_runs of them); then the group's outputs; then a run of ones (the
// bias). Every augmented design row [z, y] of a vector is then kWidth consecutive values of
// one run, taps of the same input row starting at different columns, so each input is
// converted once for all the taps and vectors that read it. Then, vector by vector, it adds
// the chunk's augmented Gram, tile by tile, to the vector's accumulator. At the end the
// accumulators are added to gram, cross and target_sq; each statistic is written by one task,
// in a fixed order: the result is deterministic.
template <typename in_t, typename acc_t>
void accumulate(Tag, const in_t* x, const in_t* y, acc_t* gram, acc_t* cross, acc_t* target_sq,
                const RidgeGeometry& rg) {
  using L = Lanes<acc_t>;
  using V = typename L::value;
  constexpr int64_t W = L::kWidth;
  const LocalGeometry& g = rg.layer;
  const int64_t taps = rg.taps(), d = rg.unknowns(), out_per_group = g.out_per_group();
  const int64_t rows = d + out_per_group;
  const int64_t blocks = (rows + kTile - 1) / kTile;
  const int64_t padded_rows = blocks * kTile;
  const int64_t acc_size = blocks * (blocks + 1) / 2 * kTile * kTile;
  const int64_t chunk =
      std::clamp<int64_t>(kScratchBytes / (padded_rows * int64_t(sizeof(V))), 8, 64);
  const int64_t row_vectors = (g.out_width + W - 1) / W;
  const int64_t segment = std::clamp<int64_t>(
      kAccumulatorBytes / (acc_size * int64_t(sizeof(V))), 1, row_vectors);
  const int64_t segments = (row_vectors + segment - 1) / segment;
  const int64_t pixels = g.out_plane(), packed = rg.packed_size();
  const int64_t in_sample = g.in_channels * g.in_plane();
  const int64_t out_sample = g.out_channels * pixels;
  // Kernel column v reads column j + shift(v) of residue residue(v) for output column j.
  const auto shift = [&](int64_t v) {
    const int64_t offset = g.col_offset(v);
    return (offset >= 0 ? offset : offset - g.stride_w + 1) / g.stride_w;
  };
  const auto residue = [&](int64_t v) { return g.col_offset(v) - shift(v) * g.stride_w; };
  const int64_t first_shift = shift(0);
  const int64_t width = (segment * W + shift(g.kernel_w - 1) - first_shift + W - 1) / W * W;
  const int64_t in_runs = g.in_per_group() * g.kernel_h * g.stride_w;
  const int64_t ones_run = in_runs + out_per_group;
  const int64_t sample_values = (ones_run + 1) * width;
  // Where augmented row a of the segment's first vector starts in a sample's runs.
  std::vector<int64_t> row_offsets(rows);
  for (int64_t a = 0; a < rows; ++a) {
    if (a < taps) {
      const Tap t = tap_of(a, g);
      const int64_t run = (t.channel * g.kernel_h + t.u) * g.stride_w + residue(t.v);
      row_offsets[a] = run * width + shift(t.v) - first_shift;
    } else {
      row_offsets[a] = (a < d ? ones_run : in_runs + a - d) * width;
    }
  }
  const int64_t work = g.batch * rows * rows * W * segment;
  at::parallel_for(0, g.groups * g.out_height * segments,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> acc(segment * acc_size);
    VectorBuffer<V> scratch_vectors(chunk * sample_values / W);  // zeros
    acc_t* scratch = reinterpret_cast<acc_t*>(scratch_vectors.data());
    for (int64_t s = 0; s < chunk; ++s) {
      std::fill_n(scratch + s * sample_values + ones_run * width, width, acc_t(1));
    }
    std::vector<RunRead<in_t>> runs;
    // The cache lines the runs read: address in sample 0, sample stride.
    std::vector<std::pair<const in_t*, int64_t>> lines;
    std::vector<const acc_t*> row_starts(rows);
    std::vector<std::tuple<acc_t*, int64_t, int64_t>> destinations;  // plane, (a, b)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (g.out_height * segments);
      const int64_t i = task / segments % g.out_height;
      const int64_t first = task % segments * segment;
      const int64_t count_vectors = std::min(segment, row_vectors - first);
      const int64_t segment_lanes = std::min(count_vectors * W, g.out_width - first * W);
      const int64_t c0 = group * g.in_per_group();
      acc.zero();
      runs.clear();
      for (int64_t c = 0; c < g.in_per_group(); ++c) {
        for (int64_t u = 0; u < g.kernel_h; ++u) {
          const int64_t in_row = g.input_row(i, u);
          for (int64_t r = 0; r < g.stride_w; ++r) {
            // Value k of the run is input column (first * W + first_shift + k) * stride_w + r.
            const int64_t offset = (first * W + first_shift) * g.stride_w + r;
            int64_t kb = 0, ke = 0;
            if (in_row >= 0 && in_row < g.in_height) {
              valid_output_range(offset, g.stride_w, g.in_width, width, &kb, &ke);
            }
            runs.push_back(RunRead<in_t>{
                x, in_sample, ((c0 + c) * g.in_height + in_row) * g.in_width + offset,
                g.stride_w, kb, ke});
          }
        }
      }
      for (int64_t o = 0; o < out_per_group; ++o) {
        const int64_t oc = group * out_per_group + o;
        runs.push_back(RunRead<in_t>{
            y, out_sample, (oc * g.out_height + i) * g.out_width + first * W, 1, 0, segment_lanes});
      }
      lines.clear();
      for (const RunRead<in_t>& run : runs) {
        for (int64_t k = run.begin; k < run.end; ++k) {
          const in_t* p = run.data + run.offset + k * run.step;
          if (lines.empty() || lines.back().second != run.sample_stride ||
              reinterpret_cast<uintptr_t>(lines.back().first) / 64 !=
                  reinterpret_cast<uintptr_t>(p) / 64) {
            lines.emplace_back(p, run.sample_stride);
          }
        }
      }
      for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
        const int64_t count = std::min(chunk, g.batch - n0);
        for (int64_t s = 0; s < count; ++s) {
          const int64_t n = n0 + s;
          // Samples lie far apart in memory, beyond the hardware prefetchers' reach.
          if (n + kPrefetchSamples < g.batch) {
            for (const auto& [p, stride] : lines) {
              __builtin_prefetch(p + (n + kPrefetchSamples) * stride);
            }
          }
          for (size_t k = 0; k < runs.size(); ++k) {
            fill_run(scratch + s * sample_values + k * width, runs[k], n, width);
          }
        }
        for (int64_t v = 0; v < count_vectors; ++v) {
          for (int64_t a = 0; a < rows; ++a) row_starts[a] = scratch + row_offsets[a] + v * W;
          V* vector_acc = acc.data() + v * acc_size;
          for (int64_t ta = 0; ta < blocks; ++ta) {
            const acc_t* const* a_rows = row_starts.data() + ta * kTile;
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
      // Entry (a, b) of the augmented Gram goes to G for b < d, R for a < d <= b, y^2 for
      // a = b >= d. The segment's pixels of an entry are contiguous in the statistics, and the
      // entries lie a plane apart: prefetch a few entries ahead.
      destinations.clear();
      for (int64_t a = 0; a < d; ++a) {
        for (int64_t b = a; b < d; ++b) {
          destinations.emplace_back(gram + (group * packed + packed_index(b, a)) * pixels, a, b);
        }
      }
      for (int64_t o = 0; o < out_per_group; ++o) {
        const int64_t oc = group * out_per_group + o;
        for (int64_t a = 0; a < d; ++a) {
          destinations.emplace_back(cross + (oc * d + a) * pixels, a, d + o);
        }
        destinations.emplace_back(target_sq + oc * pixels, d + o, d + o);
      }
      const int64_t p0 = i * g.out_width + first * W;
      for (size_t e = 0; e < destinations.size(); ++e) {
        if (e + kPrefetchEntries < destinations.size()) {
          acc_t* ahead = std::get<0>(destinations[e + kPrefetchEntries]) + p0;
          for (int64_t l = 0; l < segment_lanes; l += 64 / int64_t(sizeof(acc_t))) {
            __builtin_prefetch(ahead + l, 1);
          }
        }
        const auto [plane, a, b] = destinations[e];
        const int64_t index =
            (packed_index(b / kTile, a / kTile) * kTile + a % kTile) * kTile + b % kTile;
        for (int64_t v = 0; v < count_vectors; ++v) {
          acc_t* dst = plane + p0 + v * W;
          const int64_t lanes = std::min(W, segment_lanes - v * W);
          L::store(dst, L::load(dst, lanes) + acc[v * acc_size + index], lanes);
        }
      }
    }
  });
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
      for (int64_t k = 0; k < packed; ++k) {
        a[k] = L::load(gram + (group * packed + k) * pixels + p0, lanes);
      }
      if (task + 1 < end) {
        // The next task's systems, a row of the triangle apart each, while this one computes.
        const int64_t next_p0 = (task + 1) % vectors * W;
        const int64_t next = (task + 1) / vectors * packed * pixels + next_p0;
        for (int64_t k = 0; k < packed; ++k) {
          for (int64_t l = 0; l < std::min(W, pixels - next_p0); l += Lanes<acc_t>::kWidth) {
            __builtin_prefetch(gram + next + k * pixels + l);
          }
        }
      }
      const V shift = L::load(lam + group * pixels + p0, lanes);
      typename L::flag failed{};  // zeros
      ldlt_factor<L>(a.data(), d, 1, shift, penalize_last,
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
