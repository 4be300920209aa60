// The CPU kernels of local_regression, called through the dispatcher as any C++ user would,
// against a direct loop over the definition; the backward ops against the forward through the
// adjoint identities <grad_y, f(x, w)> = <grad_x, x> = <grad_w, w> (f is bilinear, no bias).
#include <ATen/ATen.h>

#include <cstdio>
#include <vector>

#include "local_regression_ops.h"

namespace {

using local_regression_test::Backward;
using local_regression_test::Case;
using local_regression_test::Forward;
using local_regression_test::op;

at::Tensor direct_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                          const Case& c) {
  const int64_t out_h = w.size(4), out_w = w.size(5);
  const int64_t in_per_group = c.in_ch / c.groups, out_per_group = c.out_ch / c.groups;
  at::Tensor y = at::zeros({c.batch, c.out_ch, out_h, out_w}, x.options());
  auto X = x.accessor<double, 4>();
  auto W = w.accessor<double, 6>();
  auto B = b.accessor<double, 3>();
  auto Y = y.accessor<double, 4>();
  for (int64_t n = 0; n < c.batch; ++n)
    for (int64_t o = 0; o < c.out_ch; ++o)
      for (int64_t i = 0; i < out_h; ++i)
        for (int64_t j = 0; j < out_w; ++j) {
          double sum = B[o][i][j];
          for (int64_t ch = 0; ch < in_per_group; ++ch)
            for (int64_t u = 0; u < c.kernel_h; ++u)
              for (int64_t v = 0; v < c.kernel_w; ++v) {
                const int64_t r = i * c.stride_h - c.pad_h + u * c.dilation_h;
                const int64_t s = j * c.stride_w - c.pad_w + v * c.dilation_w;
                if (r < 0 || r >= c.height || s < 0 || s >= c.width) continue;
                sum += W[o][ch][u][v][i][j] * X[n][(o / out_per_group) * in_per_group + ch][r][s];
              }
          Y[n][o][i][j] = sum;
        }
  return y;
}

int failures = 0;

void expect_close(const char* what, const Case& c, const at::Tensor& a, const at::Tensor& b) {
  const double error = (a - b).abs().max().item<double>();
  const double scale = 1 + b.abs().max().item<double>();
  if (!(error <= 1e-12 * scale)) {
    std::printf("FAIL %s: batch=%ld in=%ld out=%ld %ldx%ld k=%ldx%ld groups=%ld error=%g\n", what,
                (long)c.batch, (long)c.in_ch, (long)c.out_ch, (long)c.height, (long)c.width,
                (long)c.kernel_h, (long)c.kernel_w, (long)c.groups, error);
    ++failures;
  }
}

void run(const Case& c) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const std::vector<int64_t> stride{c.stride_h, c.stride_w}, padding{c.pad_h, c.pad_w},
      dilation{c.dilation_h, c.dilation_w};
  const int64_t out_h = (c.height + 2 * c.pad_h - c.dilation_h * (c.kernel_h - 1) - 1) / c.stride_h + 1;
  const int64_t out_w = (c.width + 2 * c.pad_w - c.dilation_w * (c.kernel_w - 1) - 1) / c.stride_w + 1;
  at::Tensor x = at::randn({c.batch, c.in_ch, c.height, c.width}, options);
  at::Tensor w = at::randn({c.out_ch, c.in_ch / c.groups, c.kernel_h, c.kernel_w, out_h, out_w}, options);
  at::Tensor b = at::randn({c.out_ch, out_h, out_w}, options);

  at::Tensor y = op<Forward>("reggan_ext::local_regression")
                     .call(x, w, b, stride, padding, dilation, c.groups);
  expect_close("forward", c, y, direct_forward(x, w, b, c));

  at::Tensor gy = at::randn_like(y);
  at::Tensor gx = op<Backward>("reggan_ext::local_regression_backward_input")
                      .call(gy, w, {c.height, c.width}, stride, padding, dilation, c.groups);
  at::Tensor gw = op<Backward>("reggan_ext::local_regression_backward_weight")
                      .call(gy, x, {c.kernel_h, c.kernel_w}, stride, padding, dilation, c.groups);
  const at::Tensor unbiased = y - b;
  const at::Tensor pairing = (gy * unbiased).sum();
  expect_close("backward_input adjoint", c, (gx * x).sum(), pairing);
  expect_close("backward_weight adjoint", c, (gw * w).sum(), pairing);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      {2, 3, 3, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1, 3},
      {3, 4, 6, 10, 7, 2, 3, 2, 1, 1, 2, 1, 2, 2},
      {1, 2, 4, 8, 8, 5, 5, 3, 3, 2, 2, 2, 2, 1},
      {1, 1, 1, 5, 17, 1, 7, 1, 2, 0, 3, 1, 1, 1},
      {2, 6, 3, 12, 5, 4, 2, 1, 3, 3, 0, 3, 1, 3},
  };
  for (const Case& c : cases) run(c);
  std::printf("%s: %zu geometries, %d failures\n", failures ? "FAILED" : "OK", cases.size(), failures);
  return failures ? 1 : 0;
}
