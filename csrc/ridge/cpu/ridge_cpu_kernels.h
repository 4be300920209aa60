// CPU kernels of the ridge ops, vectorized across pixels. ridge_cpu.cpp includes this file once
// per instruction set, inside a namespace that defines kVectorBytes (the SIMD width in bytes) and
// kTile (the side of the register tile of the Gram update), after including everything it uses.
// Hence no include guard and no includes.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

template <typename T>
using Lanes = ridge_lanes::Lanes<T, kVectorBytes>;

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
  REGGAN_RIDGE_INLINE void zero() {
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

// Statistics of one update. A task owns a group and kWidth consecutive pixels of an output row:
// for a chunk of samples it copies their augmented design rows [z, y of the group's outputs]
// into a scratch (lanes = pixels, one row after the other, samples contiguous within a row so
// that the tiles stream them), then adds the chunk's augmented Gram, tile by tile, to a
// task-local accumulator; at the end the accumulator is added to gram, cross and target_sq.
// Each statistic is written by one task, in a fixed order: the result is deterministic.
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
  const int64_t tiles = blocks * (blocks + 1) / 2;
  const int64_t chunk =
      std::clamp<int64_t>(kScratchBytes / (padded_rows * int64_t(sizeof(V))), 8, 256);
  const int64_t row_vectors = (g.out_width + W - 1) / W;
  const int64_t pixels = g.out_plane(), packed = rg.packed_size();
  const int64_t in_sample = g.in_channels * g.in_plane();
  const int64_t out_sample = g.out_channels * pixels;
  const int64_t work = g.batch * rows * rows * W;
  at::parallel_for(0, g.groups * g.out_height * row_vectors,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> acc(tiles * kTile * kTile);
    VectorBuffer<V> scratch(chunk * padded_rows);
    // The bias row is 1 and the rows past `rows` 0 for every sample: set them once.
    if (rg.bias) {
      for (int64_t s = 0; s < chunk; ++s) scratch[taps * chunk + s] = L::splat(1);
    }
    std::vector<RowRead<in_t>> reads(taps + out_per_group);
    std::vector<std::pair<const in_t*, int64_t>> lines;  // address in sample 0, sample stride
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (g.out_height * row_vectors);
      const int64_t i = task / row_vectors % g.out_height;
      const int64_t j0 = task % row_vectors * W;
      const int64_t lanes = std::min(W, g.out_width - j0);
      const int64_t c0 = group * g.in_per_group();
      acc.zero();
      // Where each augmented row reads lane 0 of a sample, its step and its valid lanes.
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
        reads[a] = RowRead<in_t>{x, in_sample,
                           ((c0 + t.channel) * g.in_height + in_row) * g.in_width +
                               j0 * g.stride_w + offset,
                           g.stride_w, jb - j0, je - j0, a};
      }
      for (int64_t o = 0; o < out_per_group; ++o) {
        reads[taps + o] = RowRead<in_t>{
            y, out_sample,
            ((group * out_per_group + o) * g.out_height + i) * g.out_width + j0, 1, 0, lanes,
            d + o};
      }
      // The lines to prefetch for a sample: each read's first and last, once.
      lines.clear();
      for (const RowRead<in_t>& r : reads) {
        if (r.begin == r.end) continue;
        for (const int64_t l : {r.begin, r.end - 1}) {
          const in_t* p = r.data + r.offset + l * r.step;
          const auto line = reinterpret_cast<uintptr_t>(p) / 64;
          if (lines.empty() || lines.back().second != r.sample_stride ||
              reinterpret_cast<uintptr_t>(lines.back().first) / 64 != line) {
            lines.emplace_back(p, r.sample_stride);
          }
        }
      }
      const bool contiguous = std::all_of(reads.begin(), reads.end(), [&](const RowRead<in_t>& r) {
        return r.begin == 0 && r.end == W && r.step == 1;
      });
      const int64_t p0 = i * g.out_width + j0;
      for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
        const int64_t count = std::min(chunk, g.batch - n0);
        for (int64_t s = 0; s < count; ++s) {
          const int64_t n = n0 + s;
          // The samples are far apart in memory, beyond the hardware prefetchers' reach.
          const int64_t ahead = std::min(n + kPrefetchSamples, g.batch - 1);
          for (const auto& [p, sample_stride] : lines) __builtin_prefetch(p + ahead * sample_stride);
          if (contiguous) {  // the interior of the image
            for (const RowRead<in_t>& r : reads) {
              scratch[r.row * chunk + s] = L::convert(r.data + n * r.sample_stride + r.offset);
            }
          } else {
            for (const RowRead<in_t>& r : reads) {
              scratch[r.row * chunk + s] = L::gather(r.data + n * r.sample_stride, r.offset,
                                                     r.step, r.begin, r.end);
            }
          }
        }
        if (n0 + chunk >= g.batch) {
          // Fetch the statistics this task adds to while the last chunk computes.
          for (int64_t k = 0; k < packed; ++k) {
            __builtin_prefetch(gram + (group * packed + k) * pixels + p0, 1);
          }
          for (int64_t k = 0; k < out_per_group * (d + 1); ++k) {
            const int64_t oc = group * out_per_group + k / (d + 1), a = k % (d + 1);
            __builtin_prefetch(a < d ? cross + (oc * d + a) * pixels + p0
                                     : target_sq + oc * pixels + p0, 1);
          }
        }
        const V* rows_of = scratch.data();
        for (int64_t ta = 0; ta < blocks; ++ta) {
          const V* a_rows = rows_of + ta * kTile * chunk;
          for (int64_t tb = ta; tb < blocks; ++tb) {
            V* t = acc.data() + packed_index(tb, ta) * kTile * kTile;
            if (ta == tb) {
              gram_tile<true>(a_rows, a_rows, chunk, count, t);
            } else {
              gram_tile<false>(a_rows, rows_of + tb * kTile * chunk, chunk, count, t);
            }
          }
        }
      }
      // Entry (a, b) of the augmented Gram: G for b < d, R for a < d <= b, y^2 for a = b >= d.
      const auto add = [&](acc_t* dst, int64_t a, int64_t b) {
        const V& v = acc[(packed_index(b / kTile, a / kTile) * kTile + a % kTile) * kTile +
                         b % kTile];
        L::store(dst, L::load(dst, lanes) + v, lanes);
      };
      for (int64_t a = 0; a < d; ++a) {
        for (int64_t b = a; b < d; ++b) {
          add(gram + (group * packed + packed_index(b, a)) * pixels + p0, a, b);
        }
      }
      for (int64_t o = 0; o < out_per_group; ++o) {
        const int64_t oc = group * out_per_group + o;
        for (int64_t a = 0; a < d; ++a) add(cross + (oc * d + a) * pixels + p0, a, d + o);
        add(target_sq + oc * pixels + p0, d + o, d + o);
      }
    }
  });
}

// Solves every system of a batch (see ridge_solve's schema); a task owns a group and
// kSolveParts registers of consecutive pixels, factored together lane by lane.
template <typename acc_t>
void solve(Tag, const acc_t* gram, const acc_t* cross, const acc_t* lam, acc_t* solution,
           int32_t* info, const SolveSizes& s, bool penalize_last) {
  using L = ridge_lanes::WideLanes<acc_t, kVectorBytes, kSolveParts>;
  using V = typename L::value;
  constexpr int64_t W = L::kWidth;
  const int64_t pixels = s.pixels(), d = s.unknowns, packed = s.packed_size();
  const int64_t vectors = (pixels + W - 1) / W;
  const int64_t work = (d * d * d / 6 + s.out_per_group * d * d) * W;
  at::parallel_for(0, s.groups * vectors,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> a(packed), b(d);
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
      for (int64_t o = 0; o < s.out_per_group; ++o) {
        const int64_t offset = (group * s.out_per_group + o) * d * pixels + p0;
        for (int64_t k = 0; k < d; ++k) b[k] = L::load(cross + offset + k * pixels, lanes);
        ldlt_solve<L>(a.data(), d, 1, b.data());
        for (int64_t k = 0; k < d; ++k) L::store(solution + offset + k * pixels, b[k], lanes);
      }
      for (int64_t l = 0; l < lanes; ++l) info[group * pixels + p0 + l] = L::lane(failed, l);
    }
  });
}
