// CPU kernels of the ridge ops, vectorized across pixels. ridge_cpu.cpp includes this file once
// per instruction set, inside a namespace that defines kVectorBytes (the SIMD width in bytes),
// kTile (the side of the register tile of the Gram update) and kSolveParts (registers of
// systems factored side by side), after including everything it uses and defining the tuning
// constants. Hence no include guard and no includes.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

template <typename T>
using Lanes = cpu_lanes::Lanes<T, kVectorBytes>;

// How a row of the augmented design matrix reads a sample: lane l of sample n is
// data[n * sample_stride + offset + l * step] for l in [begin, end), 0 elsewhere.
template <typename in_t>
struct RowRead {
  const in_t* data;
  int64_t sample_stride, offset, step, begin, end;
  int64_t row;  // index in the augmented row
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

// acc[r][q] += sum_n a_rows[r * stride + n] * b_rows[q * stride + n] for n < count: a
// kTile x kTile block of the augmented Gram held in registers across the samples. On the
// diagonal (a_rows == b_rows) only its upper triangle is computed.
template <bool kDiagonal, typename V>
inline void gram_tile(const V* a_rows, const V* b_rows, int64_t stride, int64_t count, V* acc) {
  V c[kTile][kTile];
  for (int r = 0; r < kTile; ++r) {
    for (int q = 0; q < kTile; ++q) c[r][q] = acc[r * kTile + q];
  }
  for (int64_t n = 0; n < count; ++n) {
    V a[kTile];
    for (int r = 0; r < kTile; ++r) a[r] = a_rows[r * stride + n];
    for (int q = 0; q < kTile; ++q) {
      const V b = b_rows[q * stride + n];
      for (int r = 0; r < kTile; ++r) {
        if (!kDiagonal || r <= q) c[r][q] += a[r] * b;
      }
    }
  }
  for (int r = 0; r < kTile; ++r) {
    for (int q = 0; q < kTile; ++q) acc[r * kTile + q] = c[r][q];
  }
}

// Where the augmented rows of kWidth consecutive pixels read a sample, and the cache lines to
// prefetch for it (address in sample 0, sample stride).
template <typename in_t>
struct VectorReads {
  std::vector<RowRead<in_t>> rows;
  std::vector<std::pair<const in_t*, int64_t>> lines;
  bool contiguous;  // every row reads kWidth consecutive inputs: the interior of the image
};

// Statistics of one update. A task owns a group and a segment of up to `segment` vectors of
// kWidth consecutive pixels of an output row. For a chunk of samples and each vector in turn,
// it copies the augmented design rows [z, y of the group's outputs] into a scratch (lanes =
// pixels, one row after the other, samples contiguous within a row so that the tiles stream
// them), then adds the chunk's augmented Gram, tile by tile, to the vector's accumulator. The
// vectors of a segment read overlapping inputs of the same samples, which stay in cache for
// the whole chunk. At the end the accumulators are added to gram, cross and target_sq; each
// statistic is written by one task, in a fixed order: the result is deterministic.
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
  const int64_t padded_rows = blocks * kTile;  // rows past `rows` stay zero
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
  const int64_t work = g.batch * rows * rows * W * segment;
  at::parallel_for(0, g.groups * g.out_height * segments,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> acc(segment * acc_size);
    VectorBuffer<V> scratch(chunk * padded_rows);
    // The bias row is 1 and the rows past `rows` 0 for every sample: set them once.
    if (rg.bias) {
      for (int64_t s = 0; s < chunk; ++s) scratch[taps * chunk + s] = L::splat(1);
    }
    std::vector<VectorReads<in_t>> reads(segment);
    std::vector<std::tuple<acc_t*, int64_t, int64_t>> destinations;  // plane, (a, b)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (g.out_height * segments);
      const int64_t i = task / segments % g.out_height;
      const int64_t first = task % segments * segment;
      const int64_t count_vectors = std::min(segment, row_vectors - first);
      const int64_t c0 = group * g.in_per_group();
      acc.zero();
      for (int64_t v = 0; v < count_vectors; ++v) {
        const int64_t j0 = (first + v) * W, lanes = std::min(W, g.out_width - j0);
        VectorReads<in_t>& r = reads[v];
        r.rows.clear();
        for (int64_t a = 0; a < taps; ++a) {
          const Tap t = tap_of(a, g);
          const int64_t in_row = g.input_row(i, t.u);
          const int64_t offset = g.col_offset(t.v);
          int64_t jb = 0, je = 0;
          if (in_row >= 0 && in_row < g.in_height) {
            valid_output_range(offset, g.stride_w, g.in_width, g.out_width, &jb, &je);
          }
          jb = std::clamp(jb, j0, j0 + lanes);
          je = std::clamp(je, jb, j0 + lanes);
          r.rows.push_back(RowRead<in_t>{
              x, in_sample,
              ((c0 + t.channel) * g.in_height + in_row) * g.in_width + j0 * g.stride_w + offset,
              g.stride_w, jb - j0, je - j0, a});
        }
        for (int64_t o = 0; o < out_per_group; ++o) {
          r.rows.push_back(RowRead<in_t>{
              y, out_sample,
              ((group * out_per_group + o) * g.out_height + i) * g.out_width + j0, 1, 0, lanes,
              d + o});
        }
        // Each row's first and last line, once.
        r.lines.clear();
        for (const RowRead<in_t>& row : r.rows) {
          if (row.begin == row.end) continue;
          for (const int64_t l : {row.begin, row.end - 1}) {
            const in_t* p = row.data + row.offset + l * row.step;
            const auto line = reinterpret_cast<uintptr_t>(p) / 64;
            if (r.lines.empty() || r.lines.back().second != row.sample_stride ||
                reinterpret_cast<uintptr_t>(r.lines.back().first) / 64 != line) {
              r.lines.emplace_back(p, row.sample_stride);
            }
          }
        }
        r.contiguous = std::all_of(r.rows.begin(), r.rows.end(), [&](const RowRead<in_t>& row) {
          return row.begin == 0 && row.end == W && row.step == 1;
        });
      }
      for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
        const int64_t count = std::min(chunk, g.batch - n0);
        for (int64_t v = 0; v < count_vectors; ++v) {
          const VectorReads<in_t>& r = reads[v];
          for (int64_t s = 0; s < count; ++s) {
            const int64_t n = n0 + s;
            // The same sample of the next chunk: samples lie far apart in memory, beyond the
            // hardware prefetchers' reach.
            if (n + chunk < g.batch) {
              for (const auto& [p, stride] : r.lines) {
                __builtin_prefetch(p + (n + chunk) * stride);
              }
            }
            if (r.contiguous) {
              const in_t* x_n = x + n * in_sample;
              const in_t* y_n = y + n * out_sample;
              for (int64_t a = 0; a < taps; ++a) {
                scratch[a * chunk + s] = L::convert(x_n + r.rows[a].offset);
              }
              for (int64_t o = 0; o < out_per_group; ++o) {
                scratch[(d + o) * chunk + s] = L::convert(y_n + r.rows[taps + o].offset);
              }
            } else {
              for (const RowRead<in_t>& row : r.rows) {
                scratch[row.row * chunk + s] = L::gather(row.data + n * row.sample_stride,
                                                         row.offset, row.step, row.begin,
                                                         row.end);
              }
            }
          }
          const V* rows_of = scratch.data();
          V* vector_acc = acc.data() + v * acc_size;
          for (int64_t ta = 0; ta < blocks; ++ta) {
            const V* a_rows = rows_of + ta * kTile * chunk;
            for (int64_t tb = ta; tb < blocks; ++tb) {
              V* t = vector_acc + packed_index(tb, ta) * kTile * kTile;
              if (ta == tb) {
                gram_tile<true>(a_rows, a_rows, chunk, count, t);
              } else {
                gram_tile<false>(a_rows, rows_of + tb * kTile * chunk, chunk, count, t);
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
      const int64_t segment_lanes = std::min(count_vectors * W, g.out_width - first * W);
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
