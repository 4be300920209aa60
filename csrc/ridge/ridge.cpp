// Schema of the ridge ops, the argument checks every backend shares, and the Meta kernels that
// give fake tensors (torch.compile, opcheck) their shapes through the same checks.
#include "ridge/ridge.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "local_regression/local_regression.h"

namespace reggan_ext {
namespace {

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": expected ", name, " of shape ", layout, " (", rank,
                    " dimensions), got shape ", t.sizes());
}

void check_shape(const char* op, const char* name, const at::Tensor& t,
                 at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": expected ", name, " of shape ", layout, " = ",
                    expected, ", got ", t.sizes());
}

void check_real(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                    name, " must be float32 or float64, got ", t.scalar_type());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                    t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                    "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; they must be on the same device");
}

constexpr const char* kAccumulate = "ridge_accumulate_";
constexpr const char* kSolve = "ridge_solve";
constexpr const char* kInverseTrace = "ridge_inverse_trace";
constexpr const char* kGramLayout = "(groups, D*(D+1)/2, H_out, W_out)";
constexpr const char* kCrossLayout = "(C_out, D, H_out, W_out)";
constexpr const char* kTargetSqLayout = "(C_out, H_out, W_out)";

}  // namespace

RidgeGeometry check_accumulate_args(const at::Tensor& gram, const at::Tensor& cross,
                                    const at::Tensor& target_sq, const at::Tensor& input,
                                    const at::Tensor& target, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool bias) {
  const char* op = kAccumulate;
  check_rank(op, "input", input, 4, "(N, C_in, H, W)");
  check_rank(op, "target", target, 4, "(N, C_out, H_out, W_out)");
  check_rank(op, "gram", gram, 4, kGramLayout);
  check_rank(op, "cross", cross, 4, kCrossLayout);
  check_rank(op, "target_sq", target_sq, 3, kTargetSqLayout);
  check_real(op, "input", input);
  check_like(op, "target", target, "input", input);
  check_real(op, "gram", gram);
  check_like(op, "cross", cross, "gram", gram);
  check_like(op, "target_sq", target_sq, "gram", gram);
  TORCH_CHECK_VALUE(gram.device() == input.device(), op, ": gram is on ", gram.device(),
                    " but input is on ", input.device(), "; they must be on the same device");
  TORCH_CHECK_VALUE(gram.scalar_type() == at::kDouble || gram.scalar_type() == input.scalar_type(),
                    op, ": float32 statistics need float32 input, got ", input.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == input.size(0), op, ": input has ", input.size(0),
                    " samples but target has ", target.size(0), "; they must match");
  TORCH_CHECK_VALUE(kernel_size.size() == 2, op, ": kernel_size must be (kH, kW), got ",
                    kernel_size);
  RidgeGeometry rg{make_geometry(input.size(0), input.size(1), input.size(2), input.size(3),
                                 target.size(1), kernel_size[0], kernel_size[1], stride, padding,
                                 dilation, groups),
                   bias};
  const LocalGeometry& g = rg.layer;
  check_shape(op, "target", target, {g.batch, g.out_channels, g.out_height, g.out_width},
              "(N, C_out, H_out, W_out)");
  const int64_t d = rg.unknowns();
  check_shape(op, "gram", gram, {g.groups, d * (d + 1) / 2, g.out_height, g.out_width},
              kGramLayout);
  check_shape(op, "cross", cross, {g.out_channels, d, g.out_height, g.out_width}, kCrossLayout);
  check_shape(op, "target_sq", target_sq, {g.out_channels, g.out_height, g.out_width},
              kTargetSqLayout);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"gram", gram},
                                {"cross", cross},
                                {"target_sq", target_sq}}) {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name,
                      " is updated in place and must be contiguous");
  }
  return rg;
}

SolveSizes check_solve_args(const at::Tensor& gram, const at::Tensor& cross,
                            const at::Tensor& lam) {
  const char* op = kSolve;
  check_rank(op, "gram", gram, 4, kGramLayout);
  check_rank(op, "cross", cross, 4, kCrossLayout);
  check_rank(op, "lam", lam, 3, "(groups, H_out, W_out)");
  check_real(op, "gram", gram);
  check_like(op, "cross", cross, "gram", gram);
  check_like(op, "lam", lam, "gram", gram);
  SolveSizes s{gram.size(0), cross.size(1), 0, gram.size(2), gram.size(3)};
  TORCH_CHECK_VALUE(s.groups >= 1 && s.unknowns >= 1, op,
                    ": gram and cross need at least one group and one unknown, got gram ",
                    gram.sizes(), " and cross ", cross.sizes());
  TORCH_CHECK_VALUE(cross.size(0) % s.groups == 0, op, ": the groups of gram (", s.groups,
                    ") must divide the output channels of cross (", cross.size(0), ")");
  s.out_per_group = cross.size(0) / s.groups;
  check_shape(op, "gram", gram, {s.groups, s.packed_size(), s.height, s.width}, kGramLayout);
  check_shape(op, "cross", cross, {cross.size(0), s.unknowns, s.height, s.width}, kCrossLayout);
  check_shape(op, "lam", lam, {s.groups, s.height, s.width}, "(groups, H_out, W_out)");
  return s;
}

SolveSizes check_inverse_trace_args(const at::Tensor& gram, const at::Tensor& lam) {
  const char* op = kInverseTrace;
  check_rank(op, "gram", gram, 4, kGramLayout);
  check_rank(op, "lam", lam, 3, "(groups, H_out, W_out)");
  check_real(op, "gram", gram);
  check_like(op, "lam", lam, "gram", gram);
  // D from D(D+1)/2.
  const int64_t packed = gram.size(1);
  const int64_t d = static_cast<int64_t>((std::sqrt(8.0 * double(packed) + 1) - 1) / 2 + 0.5);
  TORCH_CHECK_VALUE(gram.size(0) >= 1 && d >= 1 && d * (d + 1) / 2 == packed, op,
                    ": expected gram of shape ", kGramLayout,
                    " with at least one group and one unknown, got ", gram.sizes());
  SolveSizes s{gram.size(0), d, 0, gram.size(2), gram.size(3)};
  check_shape(op, "lam", lam, {s.groups, s.height, s.width}, "(groups, H_out, W_out)");
  return s;
}

namespace {

void accumulate_meta(const at::Tensor& gram, const at::Tensor& cross, const at::Tensor& target_sq,
                     const at::Tensor& input, const at::Tensor& target,
                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool bias) {
  check_accumulate_args(gram, cross, target_sq, input, target, kernel_size, stride, padding,
                        dilation, groups, bias);
}

std::tuple<at::Tensor, at::Tensor> solve_meta(const at::Tensor& gram, const at::Tensor& cross,
                                              const at::Tensor& lam, bool penalize_last) {
  const SolveSizes s = check_solve_args(gram, cross, lam);
  return {at::empty(cross.sizes(), cross.options()),
          at::empty({s.groups, s.height, s.width}, gram.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> inverse_trace_meta(const at::Tensor& gram,
                                                      const at::Tensor& lam, bool penalize_last) {
  check_inverse_trace_args(gram, lam);
  return {at::empty(lam.sizes(), lam.options()),
          at::empty(lam.sizes(), lam.options().dtype(at::kInt))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reggan_ext, m) {
  // Adds one batch's sufficient statistics of the per-pixel ridge problems of a LocalRegression
  // layer to gram, cross and target_sq (layouts in ridge/ridge_math.h).
  m.def(
      "ridge_accumulate_(Tensor(a!) gram, Tensor(b!) cross, Tensor(c!) target_sq, Tensor input, "
      "Tensor target, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool bias) -> ()");
  // Solves (G + lam P) w = r for every group and pixel: the solution has cross's layout, info
  // (groups, H_out, W_out) int32 is 0 or the order of the first leading minor that is not
  // positive definite. P is the identity, without its last entry unless penalize_last.
  m.def(
      "ridge_solve(Tensor gram, Tensor cross, Tensor lam, bool penalize_last) -> "
      "(Tensor, Tensor)");
  // sum_j [(G + lam P)^-1]_jj over the penalized j for every group and pixel, (groups, H_out,
  // W_out), and info as ridge_solve's: the hat-matrix trace of GCV is D - lam * this.
  m.def("ridge_inverse_trace(Tensor gram, Tensor lam, bool penalize_last) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reggan_ext, Meta, m) {
  m.impl("ridge_accumulate_", &accumulate_meta);
  m.impl("ridge_solve", &solve_meta);
  m.impl("ridge_inverse_trace", &inverse_trace_meta);
}

}  // namespace reggan_ext
