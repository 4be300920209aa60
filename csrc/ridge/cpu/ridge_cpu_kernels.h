// CPU kernels of the ridge ops, vectorized across pixels. ridge_cpu.cpp includes this file once
// per instruction set, inside a namespace that defines kVectorBytes (the SIMD width in bytes) and
// kTile (the side of the register tile of the Gram update), after including everything it uses.
// Hence no include guard and no includes.

// Selects this instruction set's kernels through argument-dependent lookup.
struct Tag {};

// A vector of pixels, one lane each, with the lane operations ldlt_factor needs.
template <typename T>
struct Lanes {
  typedef T value __attribute__((vector_size(kVectorBytes)));
  typedef std::conditional_t<sizeof(T) == 8, int64_t, int32_t> lane_int;
  typedef lane_int mask __attribute__((vector_size(kVectorBytes)));
  using flag = mask;
  static constexpr int64_t kWidth = kVectorBytes / sizeof(T);

  static value splat(double s) { return value{} + T(s); }
  static mask not_above(const value& d, const value& tol) { return ~(d > tol); }
  static value select(const mask& m, const value& a, const value& b) {
    return (value)(((mask)a & m) | ((mask)b & ~m));
  }
  static value max(const value& a, const value& b) { return select(a > b, a, b); }
  static void mark(flag& info, const mask& m, int32_t k) {
    const mask first = m & (info == 0);
    info = (info & ~first) | (first & lane_int(k));
  }
  // The first n lanes from p, zeros after them.
  static value load(const T* p, int64_t n) {
    value v{};
    if (n == kWidth) {
      std::memcpy(&v, p, sizeof v);
    } else {
      for (int64_t l = 0; l < n; ++l) v[l] = p[l];
    }
    return v;
  }
  static void store(T* p, const value& v, int64_t n) {
    if (n == kWidth) {
      std::memcpy(p, &v, sizeof v);
    } else {
      for (int64_t l = 0; l < n; ++l) p[l] = v[l];
    }
  }
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
  void zero() {
    for (int64_t k = 0; k < size_; ++k) data_[k] = V{};
  }
  V* data() { return data_; }
  V& operator[](int64_t k) { return data_[k]; }

 private:
  V* data_;
  int64_t size_;
};

// acc[r][q] += sum over the first `count` scratch rows of s[a0 + r] * s[b0 + q]: a kTile x kTile
// block of the augmented Gram held in registers across the samples. On the diagonal only its
// upper triangle is computed.
template <bool kDiagonal, typename V>
inline void gram_tile(const V* s, int64_t row_stride, int64_t count, int64_t a0, int64_t b0,
                      V* acc) {
  V c[kTile][kTile];
  for (int r = 0; r < kTile; ++r) {
    for (int q = 0; q < kTile; ++q) c[r][q] = acc[r * kTile + q];
  }
  for (int64_t n = 0; n < count; ++n) {
    const V* row = s + n * row_stride;
    V a[kTile];
    for (int r = 0; r < kTile; ++r) a[r] = row[a0 + r];
    for (int q = 0; q < kTile; ++q) {
      const V b = row[b0 + q];
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
// into a small scratch (lanes = pixels), then adds the chunk's augmented Gram, tile by tile, to
// a task-local accumulator; at the end the accumulator is added to gram, cross and target_sq.
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
      std::clamp<int64_t>(kScratchBytes / (padded_rows * int64_t(sizeof(V))), 4, 64);
  const int64_t row_vectors = (g.out_width + W - 1) / W;
  const int64_t pixels = g.out_plane(), packed = rg.packed_size();
  const int64_t work = g.batch * rows * rows * W;
  at::parallel_for(0, g.groups * g.out_height * row_vectors,
                   std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    VectorBuffer<V> acc(tiles * kTile * kTile);
    VectorBuffer<V> scratch(chunk * padded_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / (g.out_height * row_vectors);
      const int64_t i = task / row_vectors % g.out_height;
      const int64_t j0 = task % row_vectors * W;
      const int64_t lanes = std::min(W, g.out_width - j0);
      const int64_t c0 = group * g.in_per_group();
      acc.zero();
      for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
        const int64_t count = std::min(chunk, g.batch - n0);
        for (int64_t s = 0; s < count; ++s) {
          const int64_t n = n0 + s;
          V* row = scratch.data() + s * padded_rows;
          for (int64_t a = 0; a < taps; ++a) {
            acc_t lane[W] = {};
            const Tap t = tap_of(a, g);
            const int64_t in_row = g.input_row(i, t.u);
            if (in_row >= 0 && in_row < g.in_height) {
              const int64_t offset = g.col_offset(t.v);
              int64_t jb, je;
              valid_output_range(offset, g.stride_w, g.in_width, g.out_width, &jb, &je);
              jb = std::max(jb, j0);
              je = std::min(je, j0 + lanes);
              const in_t* x_row =
                  x + ((n * g.in_channels + c0 + t.channel) * g.in_height + in_row) * g.in_width;
              for (int64_t j = jb; j < je; ++j) lane[j - j0] = acc_t(x_row[j * g.stride_w + offset]);
            }
            std::memcpy(row + a, lane, sizeof(V));
          }
          if (rg.bias) row[taps] = L::splat(1);
          for (int64_t o = 0; o < out_per_group; ++o) {
            acc_t lane[W] = {};
            const in_t* y_row =
                y + ((n * g.out_channels + group * out_per_group + o) * g.out_height + i) *
                        g.out_width + j0;
            for (int64_t l = 0; l < lanes; ++l) lane[l] = acc_t(y_row[l]);
            std::memcpy(row + d + o, lane, sizeof(V));
          }
        }
        for (int64_t ta = 0; ta < blocks; ++ta) {
          V* t = acc.data() + packed_index(ta, ta, blocks) * kTile * kTile;
          gram_tile<true>(scratch.data(), padded_rows, count, ta * kTile, ta * kTile, t);
          for (int64_t tb = ta + 1; tb < blocks; ++tb) {
            t += kTile * kTile;
            gram_tile<false>(scratch.data(), padded_rows, count, ta * kTile, tb * kTile, t);
          }
        }
      }
      // Entry (a, b) of the augmented Gram: G for b < d, R for a < d <= b, y^2 for a = b >= d.
      const int64_t p0 = i * g.out_width + j0;
      const auto add = [&](acc_t* dst, int64_t a, int64_t b) {
        const V& v = acc[(packed_index(a / kTile, b / kTile, blocks) * kTile + a % kTile) * kTile +
                         b % kTile];
        L::store(dst, L::load(dst, lanes) + v, lanes);
      };
      for (int64_t a = 0; a < d; ++a) {
        for (int64_t b = a; b < d; ++b) {
          add(gram + (group * packed + packed_index(a, b, d)) * pixels + p0, a, b);
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

// Solves every system of a batch (see ridge_solve's schema); a task owns a group and kWidth
// consecutive pixels, factored together lane by lane.
template <typename acc_t>
void solve(Tag, const acc_t* gram, const acc_t* cross, const acc_t* lam, acc_t* solution,
           int32_t* info, const SolveSizes& s, bool penalize_last) {
  using L = Lanes<acc_t>;
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
      const V shift = L::load(lam + group * pixels + p0, lanes);
      typename L::flag failed{};
      ldlt_factor<L>(a.data(), d, 1, shift, penalize_last,
                     std::numeric_limits<acc_t>::epsilon(), failed);
      for (int64_t o = 0; o < s.out_per_group; ++o) {
        const int64_t offset = (group * s.out_per_group + o) * d * pixels + p0;
        for (int64_t k = 0; k < d; ++k) b[k] = L::load(cross + offset + k * pixels, lanes);
        ldlt_solve<L>(a.data(), d, 1, b.data(), 1);
        for (int64_t k = 0; k < d; ++k) L::store(solution + offset + k * pixels, b[k], lanes);
      }
      for (int64_t l = 0; l < lanes; ++l) info[group * pixels + p0 + l] = int32_t(failed[l]);
    }
  });
}
