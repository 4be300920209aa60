// Vectors of pixels for the CPU kernels: GCC vector types with the lane operations that the
// ridge solver templates of ridge_math.h and the local_regression kernels need. Everything here is
// compiled for the default instruction set and forced inline, so that it takes on the
// instruction set of the kernel it lands in (the kernel headers are compiled once per
// instruction set, see cpu_isa.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define REGGAN_CPU_INLINE inline __attribute__((always_inline))

namespace reggan_ext {
namespace cpu_lanes {

// A register of pixels, one lane each, with the lane operations ldlt_factor needs.
template <typename T, int kVectorBytes>
struct Lanes {
  typedef T value __attribute__((vector_size(kVectorBytes)));
  typedef std::conditional_t<sizeof(T) == 8, int64_t, int32_t> lane_int;
  typedef lane_int mask __attribute__((vector_size(kVectorBytes)));
  using flag = mask;
  static constexpr int64_t kWidth = kVectorBytes / sizeof(T);

  REGGAN_CPU_INLINE static value splat(double s) { return value{} + T(s); }
  REGGAN_CPU_INLINE static mask not_above(const value& d, const value& tol) { return ~(d > tol); }
  REGGAN_CPU_INLINE static value select(const mask& m, const value& a, const value& b) {
    return (value)(((mask)a & m) | ((mask)b & ~m));
  }
  REGGAN_CPU_INLINE static value max(const value& a, const value& b) {
    return select(a > b, a, b);
  }
  REGGAN_CPU_INLINE static void mark(flag& info, const mask& m, int32_t k) {
    const mask first = m & (info == 0);
    info = (info & ~first) | (first & lane_int(k));
  }
  // The first n lanes from p, zeros after them.
  REGGAN_CPU_INLINE static value load(const T* p, int64_t n) {
    value v{};
    if (n == kWidth) {
      std::memcpy(&v, p, sizeof v);
    } else {
      for (int64_t l = 0; l < n; ++l) v[l] = p[l];
    }
    return v;
  }
  // p[0], ..., p[kWidth - 1], converted. Lane by lane: GCC compiles this to one converting
  // load, where it splits __builtin_convertvector of a widening into halves and reassembles
  // them (GCC 12: three instructions and a spill to the stack for float to double in AVX2).
  template <typename in_t>
  REGGAN_CPU_INLINE static value convert(const in_t* p) {
    value v;
    for (int64_t l = 0; l < kWidth; ++l) v[l] = T(p[l]);
    return v;
  }
  REGGAN_CPU_INLINE static void store(T* p, const value& v, int64_t n) {
    if (n == kWidth) {
      std::memcpy(p, &v, sizeof v);
    } else {
      for (int64_t l = 0; l < n; ++l) p[l] = v[l];
    }
  }
};

// Makes the compiler hold v in a register: GCC folds a loaded value that several multiply-adds
// use into each of them as a memory operand, loading it once per use.
template <typename V>
REGGAN_CPU_INLINE void keep_in_register(V& v) {
#if defined(__x86_64__)
  __asm__("" : "+v"(v));
#endif
}

// kParts registers of pixels side by side as one value, so that each dependent step of the
// solver gives the core kParts independent operations. (GCC keeps such a struct in registers;
// a vector type wider than the registers it keeps in memory.)
template <typename V, int kParts>
struct Wide {
  V r[kParts];
  REGGAN_CPU_INLINE Wide& operator+=(const Wide& o) {
    for (int i = 0; i < kParts; ++i) r[i] += o.r[i];
    return *this;
  }
  REGGAN_CPU_INLINE Wide& operator-=(const Wide& o) {
    for (int i = 0; i < kParts; ++i) r[i] -= o.r[i];
    return *this;
  }
  REGGAN_CPU_INLINE Wide& operator*=(const Wide& o) {
    for (int i = 0; i < kParts; ++i) r[i] *= o.r[i];
    return *this;
  }
  REGGAN_CPU_INLINE friend Wide operator+(const Wide& a, const Wide& b) {
    Wide c = a;
    return c += b;
  }
  REGGAN_CPU_INLINE friend Wide operator-(const Wide& a, const Wide& b) {
    Wide c = a;
    return c -= b;
  }
  REGGAN_CPU_INLINE friend Wide operator*(const Wide& a, const Wide& b) {
    Wide c = a;
    return c *= b;
  }
  REGGAN_CPU_INLINE friend Wide operator/(const Wide& a, const Wide& b) {
    Wide c = a;
    for (int i = 0; i < kParts; ++i) c.r[i] /= b.r[i];
    return c;
  }
};

// The lane operations of Lanes on Wide values.
template <typename T, int kVectorBytes, int kParts>
struct WideLanes {
  using Narrow = Lanes<T, kVectorBytes>;
  using value = Wide<typename Narrow::value, kParts>;
  using mask = Wide<typename Narrow::mask, kParts>;
  using flag = mask;
  static constexpr int64_t kWidth = Narrow::kWidth * kParts;
  static constexpr int kChains = 1;  // the parts are the independent chains (see dot)

  REGGAN_CPU_INLINE static value splat(double s) {
    value v;
    for (int i = 0; i < kParts; ++i) v.r[i] = Narrow::splat(s);
    return v;
  }
  REGGAN_CPU_INLINE static mask not_above(const value& d, const value& tol) {
    mask m;
    for (int i = 0; i < kParts; ++i) m.r[i] = Narrow::not_above(d.r[i], tol.r[i]);
    return m;
  }
  REGGAN_CPU_INLINE static value select(const mask& m, const value& a, const value& b) {
    value v;
    for (int i = 0; i < kParts; ++i) v.r[i] = Narrow::select(m.r[i], a.r[i], b.r[i]);
    return v;
  }
  REGGAN_CPU_INLINE static value max(const value& a, const value& b) {
    value v;
    for (int i = 0; i < kParts; ++i) v.r[i] = Narrow::max(a.r[i], b.r[i]);
    return v;
  }
  REGGAN_CPU_INLINE static void mark(flag& info, const mask& m, int32_t k) {
    for (int i = 0; i < kParts; ++i) Narrow::mark(info.r[i], m.r[i], k);
  }
  REGGAN_CPU_INLINE static int32_t lane(const flag& info, int64_t l) {
    return int32_t(info.r[l / Narrow::kWidth][l % Narrow::kWidth]);
  }
  REGGAN_CPU_INLINE static int64_t part_lanes(int64_t n, int i) {
    return std::clamp<int64_t>(n - i * Narrow::kWidth, 0, Narrow::kWidth);
  }
  REGGAN_CPU_INLINE static value load(const T* p, int64_t n) {
    value v;
    for (int i = 0; i < kParts; ++i) {
      v.r[i] = Narrow::load(p + i * Narrow::kWidth, part_lanes(n, i));
    }
    return v;
  }
  REGGAN_CPU_INLINE static void store(T* p, const value& v, int64_t n) {
    for (int i = 0; i < kParts; ++i) {
      Narrow::store(p + i * Narrow::kWidth, v.r[i], part_lanes(n, i));
    }
  }
};

}  // namespace cpu_lanes
}  // namespace reggan_ext
