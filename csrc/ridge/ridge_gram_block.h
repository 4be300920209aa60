// What one CUDA thread of the ridge accumulation (ridge_accumulate_) computes: a Tile x Tile
// block of the augmented Gram of one pixel, summed over the batch in registers and added to the
// statistics. Plain C++ shared with the host test, which runs every thread's block of small
// geometries against a plain loop.
//
// The augmented design row of pixel (i, j) of a group is [z, y of the group's outputs]
// (rows = D + C_out/groups entries); its Gram holds G (b < D), R (a < D <= b) and y^2 (a = b >= D).
// Block (ta, tb), ta <= tb, covers rows ta * Tile + r and tb * Tile + q; rows past the end read 0.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "ridge/ridge_math.h"

namespace reggan_ext {

// Where one row of the augmented design row comes from: sample n reads at[n * sample_stride].
// Constant rows (1 for the bias; 0 for zero padding and for the rows past the end) read
// zero_one[0] or zero_one[1] at stride 0, so that reading a row needs no branch.
template <typename in_t>
struct RowSource {
  const in_t* at;
  int64_t sample_stride;
};

template <typename in_t>
REGGAN_HD RowSource<in_t> row_source(const in_t* x, const in_t* y, const in_t* zero_one,
                                     const RidgeGeometry& rg, int64_t group, int64_t row,
                                     int64_t i, int64_t j) {
  const LocalGeometry& g = rg.layer;
  const int64_t taps = rg.taps(), d = rg.unknowns();
  if (row < taps) {
    const int64_t offset = tap_offset(g, group * g.in_per_group(), row, i, j);
    if (offset < 0) return {zero_one, 0};
    return {x + offset, g.in_channels * g.in_plane()};
  }
  if (row < d) return {zero_one + 1, 0};
  if (row < d + g.out_per_group()) {
    const int64_t o = group * g.out_per_group() + (row - d);
    return {y + (o * g.out_height + i) * g.out_width + j, g.out_channels * g.out_plane()};
  }
  return {zero_one, 0};
}

// Loads this sample's values of the rows, advancing the sources to the next sample. The inputs
// are read-only during the kernel: on the GPU through the read-only data path, which the
// sources' generic pointers would otherwise not take.
template <int Tile, typename in_t>
REGGAN_HD void load_sample(RowSource<in_t> (&sources)[Tile], in_t (&values)[Tile]) {
  REGGAN_UNROLL
  for (int r = 0; r < Tile; ++r) {
#ifdef __CUDA_ARCH__
    values[r] = __ldg(sources[r].at);
#else
    values[r] = *sources[r].at;
#endif
    sources[r].at += sources[r].sample_stride;
  }
}

// The Tile x Tile blocks of the upper triangle of the augmented Gram come in two launches:
// the diagonal blocks (ta = tb), which keep only their upper triangle, and the others. Their
// number (a grid's y extent) and block `index` of them: (index, index) on the diagonal, else
// index = packed_index(tb - 1, ta), ta < tb.
template <int Tile, bool Diagonal>
REGGAN_HD int64_t gram_block_count(const RidgeGeometry& rg) {
  const int64_t sides = (rg.unknowns() + rg.layer.out_per_group() + Tile - 1) / Tile;
  return Diagonal ? sides : sides * (sides - 1) / 2;
}

struct GramBlock {
  int64_t ta, tb;
};

template <bool Diagonal>
REGGAN_HD GramBlock gram_block(int64_t index) {
  if (Diagonal) return {index, index};
  int64_t tb = 1;
  while (packed_index(tb, 0) <= index) ++tb;
  return {index - packed_index(tb - 1, 0), tb};
}

// acc[r][q] = sum_n a_r b_q over the batch (batch >= 1) in order. A diagonal block reads only a
// (b is its copy) and sums only r <= q, the entries of the upper triangle.
template <int Tile, bool Diagonal, typename in_t, typename acc_t>
REGGAN_HD void sum_block(RowSource<in_t> (&a)[Tile], RowSource<in_t> (&b)[Tile], int64_t batch,
                         acc_t (&acc)[Tile][Tile]) {
  // The next sample's loads are issued before this one's multiply-adds, which hide their latency.
  in_t next_a[Tile], next_b[Tile];
  load_sample(a, next_a);
  if (!Diagonal) load_sample(b, next_b);
  for (int64_t n = 0; n < batch; ++n) {
    acc_t va[Tile], vb[Tile];
    REGGAN_UNROLL
    for (int r = 0; r < Tile; ++r) {
      va[r] = acc_t(next_a[r]);
      vb[r] = Diagonal ? va[r] : acc_t(next_b[r]);
    }
    if (n + 1 < batch) {
      load_sample(a, next_a);
      if (!Diagonal) load_sample(b, next_b);
    }
    REGGAN_UNROLL
    for (int r = 0; r < Tile; ++r) {
      REGGAN_UNROLL
      for (int q = Diagonal ? r : 0; q < Tile; ++q) acc[r][q] += va[r] * vb[q];
    }
  }
}

// Adds block `block` of pixel p (= i * out_width + j) of `group` to the statistics; Diagonal
// says whether ta = tb.
template <int Tile, bool Diagonal, typename in_t, typename acc_t>
REGGAN_HD void accumulate_gram_block(const in_t* x, const in_t* y, const in_t* zero_one,
                                     acc_t* gram, acc_t* cross, acc_t* target_sq,
                                     const RidgeGeometry& rg, int64_t group, GramBlock block,
                                     int64_t p) {
  const LocalGeometry& g = rg.layer;
  const int64_t i = p / g.out_width, j = p % g.out_width;
  RowSource<in_t> a_source[Tile], b_source[Tile];
  REGGAN_UNROLL
  for (int r = 0; r < Tile; ++r) {
    a_source[r] = row_source(x, y, zero_one, rg, group, block.ta * Tile + r, i, j);
    if (!Diagonal) b_source[r] = row_source(x, y, zero_one, rg, group, block.tb * Tile + r, i, j);
  }
  acc_t acc[Tile][Tile] = {};
  sum_block<Tile, Diagonal>(a_source, b_source, g.batch, acc);
  const int64_t d = rg.unknowns(), out_per_group = g.out_per_group();
  const int64_t rows = d + out_per_group, packed = rg.packed_size(), pixels = g.out_plane();
  REGGAN_UNROLL
  for (int r = 0; r < Tile; ++r) {
    REGGAN_UNROLL
    for (int q = 0; q < Tile; ++q) {
      const int64_t a = block.ta * Tile + r, b = block.tb * Tile + q;
      if (a > b || b >= rows) continue;
      if (b < d) {
        gram[(group * packed + packed_index(b, a)) * pixels + p] += acc[r][q];
      } else if (a < d) {
        cross[((group * out_per_group + b - d) * d + a) * pixels + p] += acc[r][q];
      } else if (a == b) {
        target_sq[(group * out_per_group + a - d) * pixels + p] += acc[r][q];
      }
    }
  }
}

}  // namespace reggan_ext
