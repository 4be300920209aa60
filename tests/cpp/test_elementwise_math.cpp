// The per-thread functions of the CUDA kernels (local_regression_elementwise.h), run on the host
// for every thread index of a launch, against the CPU ops called through the dispatcher. This
// checks the CUDA index math without a GPU, with 1 and kColumns columns per thread, for the
// kernels specialised for unit column steps and for quad columns (on the geometries they are
// launched for, every pad_w % 4; every quad aligned) and for the general ones (on every
// geometry):
//   - values, in float64 and float32 (whose batch tiles differ), with 32- and 64-bit indices;
//   - every output element written by exactly one thread and nothing written outside the
//     outputs (a Tracked scalar counts the writes), so the kernels cannot race;
//   - no read outside the inputs: they sit between NaN guards, and a NaN read shows in a value
//     or, for reads whose values are dropped (columns or images past the end), in the count of
//     NaN reads of the Tracked scalar.
// Also TapWalker against output_for_input.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "local_regression/local_regression.h"
#include "local_regression/local_regression_elementwise.h"
#include "local_regression_ops.h"

namespace {

// NaN values read through Tracked scalars: the inputs hold none, their guards nothing else.
int64_t nan_reads = 0;

// A scalar that counts how often it is stored to, run with the batch tiles of Like.
template <typename Like>
struct Tracked {
  explicit Tracked(double v) : value(v), writes(0) {}
  double value;
  int writes;
};
template <typename Like>
double to_acc(Tracked<Like> t) {
  if (std::isnan(t.value)) ++nan_reads;
  return t.value;
}
template <typename Like>
void store_acc(Tracked<Like>* p, double v) {
  p->value = v;
  ++p->writes;
}

}  // namespace

namespace reggan_ext {
template <typename Like>
struct Accumulate<Tracked<Like>> {
  using type = double;
};
template <typename Like>
struct BatchTiles<Tracked<Like>> : BatchTiles<Like> {};
}  // namespace reggan_ext

namespace {

using reggan_ext::LocalGeometry;

using local_regression_test::Backward;
using local_regression_test::Case;
using local_regression_test::Forward;
using local_regression_test::op;

int failures = 0;

void fail(const Case& c, const char* what, const char* detail) {
  std::printf("FAIL %s (%s): N=%ld C_in=%ld C_out=%ld %ldx%ld k=%ldx%ld s=%ldx%ld p=%ldx%ld "
              "d=%ldx%ld groups=%ld\n",
              what, detail, (long)c.batch, (long)c.in_ch, (long)c.out_ch, (long)c.height,
              (long)c.width, (long)c.kernel_h, (long)c.kernel_w, (long)c.stride_h,
              (long)c.stride_w, (long)c.pad_h, (long)c.pad_w, (long)c.dilation_h,
              (long)c.dilation_w, (long)c.groups);
  ++failures;
}

constexpr int64_t kGuard = 64;
// Batch splits of the split backward_weight checks.
constexpr int64_t kSplits = 3;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <typename T>
T make(double v) {
  return static_cast<T>(v);
}
double value_of(double v) { return v; }
double value_of(float v) { return v; }

// A tensor's elements (or NaN when undefined) between NaN guards, the first element aligned to
// a Quad like the start of a CUDA allocation.
template <typename T>
struct Guarded {
  std::vector<T> data;
  int64_t size;
  int64_t first;  // index of element 0 in data

  Guarded(const at::Tensor& t, int64_t n)
      : data(n + 2 * kGuard + 4, make<T>(kNaN)), size(n), first(kGuard) {
    while (!reggan_ext::quad_aligned(data.data() + first)) ++first;
    if (t.defined()) {
      const at::Tensor d = t.to(at::kDouble).contiguous();
      for (int64_t k = 0; k < n; ++k) data[first + k] = make<T>(d.const_data_ptr<double>()[k]);
    }
  }
  T* ptr() { return data.data() + first; }
  // The elements as a float64 tensor of the given shape.
  at::Tensor tensor(at::IntArrayRef shape) const {
    at::Tensor t = at::empty(shape, at::kDouble);
    for (int64_t k = 0; k < size; ++k) t.mutable_data_ptr<double>()[k] = value_of(data[first + k]);
    return t;
  }
  bool guards_intact() const {
    for (int64_t k = 0; k < static_cast<int64_t>(data.size()); ++k) {
      if ((k < first || k >= first + size) && !std::isnan(value_of(data[k]))) return false;
    }
    return true;
  }
};

template <typename Like>
bool each_written_once(const Guarded<Tracked<Like>>& out) {
  for (int64_t k = 0; k < static_cast<int64_t>(out.data.size()); ++k) {
    const bool inside = k >= out.first && k < out.first + out.size;
    if (out.data[k].writes != (inside ? 1 : 0)) return false;
  }
  return true;
}

void expect_close(const Case& c, const char* what, const at::Tensor& got, const at::Tensor& want,
                  double tolerance) {
  const at::Tensor expected = want.to(at::kDouble);
  if (got.sizes() != expected.sizes()) return fail(c, what, "shape");
  if (got.numel() == 0) return;
  // NaN where want has one, and nowhere else: an unwritten element or a read from a guard is
  // NaN too, and fails.
  const at::Tensor nan = expected.isnan();
  if (!at::equal(got.isnan(), nan)) return fail(c, what, "NaN where want has none, or the reverse");
  const double error = (got - expected).masked_fill(nan, 0).abs().max().item<double>();
  const double scale = 1 + expected.masked_fill(nan, 0).abs().max().item<double>();
  if (!(error <= tolerance * scale)) {
    char detail[64];
    std::snprintf(detail, sizeof detail, "max error %g", error);
    fail(c, what, detail);
  }
}

struct Inputs {
  at::Tensor x, w, b, gy;
  std::vector<int64_t> stride, padding, dilation;
};

// "what (int32, 4 columns, unit columns)" and the like, naming the kernel variant.
template <int kCols, bool kUnitColumns, int kQuads, typename index_t>
std::string variant(const char* what) {
  return std::string(what) + (sizeof(index_t) == 8 ? " (int64, " : " (int32, ") +
         std::to_string(kCols) + " columns, " +
         (kQuads >= 0 ? "quad columns, pad_w % 4 = " + std::to_string(kQuads) + ")"
                      : kUnitColumns ? "unit columns)" : "general columns)");
}

template <int kCols, bool kUnitColumns, int kQuads, typename scalar_t, typename index_t>
void check_dtype(const Case& c, const Inputs& in, at::ScalarType dtype, double tolerance) {
  const auto name = variant<kCols, kUnitColumns, kQuads, index_t>;
  const at::Tensor x = in.x.to(dtype), w = in.w.to(dtype), b = in.b.to(dtype),
                   gy = in.gy.to(dtype);
  const LocalGeometry g = reggan_ext::check_forward_args(x, w, b, in.stride, in.padding,
                                                         in.dilation, c.groups);
  if (std::is_same<index_t, int32_t>::value && !reggan_ext::fits_int32(g)) {
    return fail(c, "fits_int32", "a small geometry must take the 32-bit path");
  }
  const at::Tensor y_cpu = op<Forward>("reggan_ext::local_regression")
                               .call(x, w, b, in.stride, in.padding, in.dilation, c.groups);
  const at::Tensor gx_cpu =
      op<Backward>("reggan_ext::local_regression_backward_input")
          .call(gy, w, {c.height, c.width}, in.stride, in.padding, in.dilation, c.groups);
  const at::Tensor gw_cpu =
      op<Backward>("reggan_ext::local_regression_backward_weight")
          .call(gy, x, {c.kernel_h, c.kernel_w}, in.stride, in.padding, in.dilation, c.groups);

  Guarded<scalar_t> gx(x, x.numel()), gw(w, w.numel()), gb(b, b.numel()), ggy(gy, gy.numel());
  Guarded<scalar_t> y(at::Tensor(), y_cpu.numel()), grad_x(at::Tensor(), x.numel()),
      grad_w(at::Tensor(), w.numel());
  for (int64_t e = 0; e < reggan_ext::forward_threads<kCols, scalar_t>(g); ++e) {
    reggan_ext::forward_thread<kCols, kUnitColumns, kQuads>(gx.ptr(), gw.ptr(), gb.ptr(), y.ptr(),
                                                            g, static_cast<index_t>(e));
  }
  for (int64_t e = 0; e < reggan_ext::backward_input_threads<kCols, scalar_t>(g); ++e) {
    reggan_ext::backward_input_thread<kCols, kUnitColumns, kQuads>(
        ggy.ptr(), gw.ptr(), grad_x.ptr(), g, static_cast<index_t>(e));
  }
  for (int64_t e = 0; e < reggan_ext::backward_weight_threads<kCols>(g); ++e) {
    reggan_ext::backward_weight_thread<kCols, kUnitColumns, kQuads>(
        ggy.ptr(), gx.ptr(), grad_w.ptr(), g, static_cast<index_t>(1), static_cast<index_t>(e));
  }
  expect_close(c, name("forward").c_str(), y.tensor(y_cpu.sizes()), y_cpu, tolerance);
  expect_close(c, name("backward_input").c_str(),
               grad_x.tensor(x.sizes()), gx_cpu, tolerance);
  expect_close(c, name("backward_weight").c_str(),
               grad_w.tensor(w.sizes()), gw_cpu, tolerance);
  if (!y.guards_intact() || !grad_x.guards_intact() || !grad_w.guards_intact()) {
    fail(c, name("guards").c_str(), "a thread wrote outside its output");
  }

  // The batch split into kSplits ranges (some empty for small batches): partial sums in the
  // accumulation type, added by sum_splits.
  using acc_t = reggan_ext::acc_type<scalar_t>;
  Guarded<acc_t> partial(at::Tensor(), kSplits * w.numel());
  Guarded<scalar_t> grad_w_split(at::Tensor(), w.numel());
  for (int64_t e = 0; e < reggan_ext::backward_weight_threads<kCols>(g, kSplits); ++e) {
    reggan_ext::backward_weight_thread<kCols, kUnitColumns, kQuads>(
        ggy.ptr(), gx.ptr(), partial.ptr(), g, static_cast<index_t>(kSplits),
        static_cast<index_t>(e));
  }
  for (int64_t e = 0; e < w.numel(); ++e) {
    reggan_ext::sum_splits(partial.ptr(), grad_w_split.ptr(), w.numel(), kSplits, e);
  }
  expect_close(c, name("backward_weight, split").c_str(),
               grad_w_split.tensor(w.sizes()), gw_cpu, tolerance);
  if (!partial.guards_intact()) {
    fail(c, name("split guards").c_str(), "a thread wrote outside the partial sums");
  }

  // Without bias (the nullptr path).
  Guarded<scalar_t> y_nobias(at::Tensor(), y_cpu.numel());
  for (int64_t e = 0; e < reggan_ext::forward_threads<kCols, scalar_t>(g); ++e) {
    reggan_ext::forward_thread<kCols, kUnitColumns, kQuads, scalar_t>(
        gx.ptr(), gw.ptr(), nullptr, y_nobias.ptr(), g, static_cast<index_t>(e));
  }
  const at::Tensor y_nobias_cpu =
      op<Forward>("reggan_ext::local_regression")
          .call(x, w, std::nullopt, in.stride, in.padding, in.dilation, c.groups);
  expect_close(c, name("forward without bias").c_str(),
               y_nobias.tensor(y_cpu.sizes()), y_nobias_cpu, tolerance);

  // Every 7th weight NaN, over the image and over the padding: NaN wherever the CPU op gives it
  // (zero padding times NaN is NaN).
  const at::Tensor w_nan = w.clone();
  w_nan.view(-1).slice(0, 0, w.numel(), 7).fill_(std::numeric_limits<double>::quiet_NaN());
  Guarded<scalar_t> gw_nan(w_nan, w_nan.numel()), y_nan(at::Tensor(), y_cpu.numel());
  for (int64_t e = 0; e < reggan_ext::forward_threads<kCols, scalar_t>(g); ++e) {
    reggan_ext::forward_thread<kCols, kUnitColumns, kQuads>(gx.ptr(), gw_nan.ptr(), gb.ptr(),
                                                            y_nan.ptr(), g,
                                                            static_cast<index_t>(e));
  }
  const at::Tensor y_nan_cpu = op<Forward>("reggan_ext::local_regression")
                                   .call(x, w_nan, b, in.stride, in.padding, in.dilation,
                                         c.groups);
  expect_close(c, name("forward with NaN weights").c_str(), y_nan.tensor(y_cpu.sizes()),
               y_nan_cpu, tolerance);
}

// Every output element is stored exactly once over all threads, and nothing else is stored, with
// the batch tiles of Like.
template <int kCols, bool kUnitColumns, int kQuads, typename Like, typename index_t>
void check_writes(const Case& c, const Inputs& in) {
  const auto name = variant<kCols, kUnitColumns, kQuads, index_t>;
  using T = Tracked<Like>;
  const LocalGeometry g = reggan_ext::check_forward_args(in.x, in.w, in.b, in.stride, in.padding,
                                                         in.dilation, c.groups);
  Guarded<T> x(in.x, in.x.numel()), w(in.w, in.w.numel()), b(in.b, in.b.numel()),
      gy(in.gy, in.gy.numel());
  Guarded<T> y(at::Tensor(), in.gy.numel()), grad_x(at::Tensor(), in.x.numel()),
      grad_w(at::Tensor(), in.w.numel());
  nan_reads = 0;
  for (int64_t e = 0; e < reggan_ext::forward_threads<kCols, T>(g); ++e) {
    reggan_ext::forward_thread<kCols, kUnitColumns, kQuads>(x.ptr(), w.ptr(), b.ptr(), y.ptr(), g,
                                                            static_cast<index_t>(e));
  }
  for (int64_t e = 0; e < reggan_ext::backward_input_threads<kCols, T>(g); ++e) {
    reggan_ext::backward_input_thread<kCols, kUnitColumns, kQuads>(
        gy.ptr(), w.ptr(), grad_x.ptr(), g, static_cast<index_t>(e));
  }
  for (int64_t e = 0; e < reggan_ext::backward_weight_threads<kCols>(g); ++e) {
    reggan_ext::backward_weight_thread<kCols, kUnitColumns, kQuads>(
        gy.ptr(), x.ptr(), grad_w.ptr(), g, static_cast<index_t>(1), static_cast<index_t>(e));
  }
  Guarded<T> partial(at::Tensor(), kSplits * in.w.numel());
  for (int64_t e = 0; e < reggan_ext::backward_weight_threads<kCols>(g, kSplits); ++e) {
    reggan_ext::backward_weight_thread<kCols, kUnitColumns, kQuads>(
        gy.ptr(), x.ptr(), partial.ptr(), g, static_cast<index_t>(kSplits),
        static_cast<index_t>(e));
  }
  if (nan_reads != 0) {
    fail(c, name("reads").c_str(), "a guard read");
  }
  const char* detail = "an element not written exactly once";
  if (!each_written_once(y)) {
    fail(c, name("forward writes").c_str(), detail);
  }
  if (!each_written_once(grad_x)) {
    fail(c, name("backward_input writes").c_str(), detail);
  }
  if (!each_written_once(grad_w)) {
    fail(c, name("backward_weight writes").c_str(), detail);
  }
  if (!each_written_once(partial)) {
    fail(c, name("split backward_weight writes").c_str(), detail);
  }
}

// Every check of one kernel variant.
template <int kCols, bool kUnitColumns, int kQuads = -1>
void check_variant(const Case& c, const Inputs& in) {
  check_dtype<kCols, kUnitColumns, kQuads, double, int32_t>(c, in, at::kDouble, 1e-12);
  check_dtype<kCols, kUnitColumns, kQuads, double, int64_t>(c, in, at::kDouble, 1e-12);
  check_dtype<kCols, kUnitColumns, kQuads, float, int32_t>(c, in, at::kFloat, 1e-5);
  check_dtype<kCols, kUnitColumns, kQuads, float, int64_t>(c, in, at::kFloat, 1e-5);
  check_writes<kCols, kUnitColumns, kQuads, double, int32_t>(c, in);
  check_writes<kCols, kUnitColumns, kQuads, double, int64_t>(c, in);
  check_writes<kCols, kUnitColumns, kQuads, float, int32_t>(c, in);
  check_writes<kCols, kUnitColumns, kQuads, float, int64_t>(c, in);
}

// The quad-column variant the launcher picks for the geometry's pad_w % 4.
void check_quads(const Case& c, const Inputs& in) {
  constexpr int kCols = reggan_ext::kColumns;
  switch (c.pad_w % 4) {
    case 0: return check_variant<kCols, true, 0>(c, in);
    case 1: return check_variant<kCols, true, 1>(c, in);
    case 2: return check_variant<kCols, true, 2>(c, in);
    default: return check_variant<kCols, true, 3>(c, in);
  }
}

// Both column counts of one column path.
template <bool kUnitColumns>
void check_columns(const Case& c, const Inputs& in) {
  check_variant<1, kUnitColumns>(c, in);
  check_variant<reggan_ext::kColumns, kUnitColumns>(c, in);
}

void run(const Case& c) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.stride = {c.stride_h, c.stride_w};
  in.padding = {c.pad_h, c.pad_w};
  in.dilation = {c.dilation_h, c.dilation_w};
  const int64_t out_h =
      (c.height + 2 * c.pad_h - c.dilation_h * (c.kernel_h - 1) - 1) / c.stride_h + 1;
  const int64_t out_w =
      (c.width + 2 * c.pad_w - c.dilation_w * (c.kernel_w - 1) - 1) / c.stride_w + 1;
  in.x = at::randn({c.batch, c.in_ch, c.height, c.width}, options);
  in.w = at::randn({c.out_ch, c.in_ch / c.groups, c.kernel_h, c.kernel_w, out_h, out_w}, options);
  in.b = at::randn({c.out_ch, out_h, out_w}, options);
  in.gy = at::randn({c.batch, c.out_ch, out_h, out_w}, options);
  // The general kernels are correct for every geometry, the unit ones where they are launched.
  check_columns<false>(c, in);
  if (c.stride_w == 1 && c.dilation_w == 1) check_columns<true>(c, in);
  if (c.stride_w == 1 && c.dilation_w == 1 && c.width % 4 == 0 && out_w % 4 == 0) {
    check_quads(c, in);
  }
}

// TapWalker yields output_for_input for every tap without dividing per tap.
void check_tap_walker() {
  for (int64_t stride = 1; stride <= 4; ++stride)
    for (int64_t dilation = 1; dilation <= 5; ++dilation)
      for (int64_t pad = 0; pad <= 3; ++pad)
        for (int64_t out_size = 1; out_size <= 9; ++out_size)
          for (int64_t in = 0; in < 24; ++in) {
            reggan_ext::TapWalker<int32_t> walker(in, pad, stride, dilation);
            for (int64_t u = 0; u < 8; ++u, walker.next()) {
              const int64_t want =
                  reggan_ext::output_for_input(in, u, stride, pad, dilation, out_size);
              if (walker.output(out_size) != want) {
                std::printf("FAIL TapWalker: in=%ld u=%ld stride=%ld pad=%ld dilation=%ld "
                            "out=%ld: got %ld, want %ld\n",
                            (long)in, (long)u, (long)stride, (long)pad, (long)dilation,
                            (long)out_size, (long)walker.output(out_size), (long)want);
                ++failures;
                return;
              }
            }
          }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_tap_walker();
  // {N, C_in, C_out, H, W, kH, kW, sH, sW, pH, pW, dH, dW, groups}
  const std::vector<Case> cases = {
      {3, 3, 3, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1, 3},     // RegGAN's per-channel layer
      {1, 4, 6, 10, 7, 2, 3, 2, 1, 1, 2, 1, 2, 2},     // groups 2, even kernel
      {3, 2, 4, 13, 8, 5, 3, 3, 2, 2, 1, 2, 1, 1},     // stride 3, dilation 2, 30 taps
      {1, 1, 1, 5, 17, 1, 7, 1, 3, 0, 3, 1, 2, 1},     // 1x7 kernel
      {10, 2, 2, 7, 9, 3, 3, 2, 2, 1, 1, 1, 1, 2},     // a partial second batch tile
      {17, 3, 3, 6, 5, 3, 2, 1, 1, 1, 0, 2, 1, 3},     // batch 17: full batch tiles and a tail
      {3, 4, 4, 4, 12, 4, 2, 1, 2, 3, 1, 1, 3, 4},     // padding around a small image
      {2, 2, 2, 11, 10, 3, 3, 3, 3, 2, 2, 3, 3, 1},    // dilation a multiple of the stride
      {1, 2, 4, 12, 9, 3, 3, 2, 2, 0, 1, 3, 3, 2},     // dilation 3 over stride 2
      {3, 6, 3, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1},      // groups 1, 54 taps
      {0, 2, 2, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1},      // empty batch: grad_weight is zero
      {5, 3, 3, 6, 13, 7, 7, 1, 1, 3, 3, 1, 1, 3},     // 'same' 7x7: two tap column steps
      {3, 1, 1, 3, 9, 2, 9, 1, 1, 0, 4, 1, 1, 1},      // 2x9 kernel: three tap column steps
      {1, 2, 2, 4, 2, 3, 5, 1, 1, 1, 2, 1, 1, 1},      // batch 1, 2 columns: a partial block
      {2, 1, 2, 3, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1},      // a single column
      {2, 1, 1, 4, 6, 3, 3, 1, 1, 2, 5, 1, 1, 1},      // outputs that read only padding
      {9, 2, 4, 5, 10, 3, 3, 1, 1, 1, 1, 1, 2, 2},     // unit stride, dilation_w 2
      {4, 2, 2, 6, 15, 3, 4, 1, 2, 1, 1, 1, 1, 1},     // stride_w 2, dilation 1
      // Quad columns (widths of whole quads, unit column steps), each pad_w % 4:
      {3, 3, 3, 9, 12, 3, 3, 1, 1, 1, 1, 1, 1, 3},     // RegGAN's layer, pad 1
      {5, 2, 2, 6, 16, 5, 5, 1, 1, 2, 2, 1, 1, 2},     // pad 2, a partial tap column step
      {9, 2, 4, 5, 8, 7, 7, 2, 1, 3, 3, 1, 1, 1},      // pad 3, a partial batch tile
      {2, 2, 2, 6, 12, 3, 5, 1, 1, 1, 0, 2, 1, 2},     // pad 0, output narrower than input
      {2, 1, 1, 4, 8, 3, 9, 1, 1, 1, 4, 1, 1, 1},      // pad 4, three tap column steps
      {2, 1, 3, 5, 4, 3, 3, 1, 1, 1, 5, 2, 1, 1},      // pad 5: columns that read only padding
  };
  for (const Case& c : cases) run(c);
  std::printf("%s: %zu geometries, %d failures\n", failures ? "FAILED" : "OK", cases.size(),
              failures);
  return failures ? 1 : 0;
}
