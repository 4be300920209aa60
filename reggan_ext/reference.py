"""Pure-PyTorch implementations of the locally connected layer.

`local_regression` is the readable oracle the tests compare the kernels with: an unfold (im2col)
followed by a per-pixel dot product. `local_regression_shifted` (one shifted multiply-add over
whole planes per kernel tap) is the faster of the two for few channels per group, unfold's
matrix products for many; the benchmarks time the kernels against both.
"""

import torch
import torch.nn.functional as F

from reggan_ext._geometry import IntPair, Padding, explicit_padding, pair


def _padded_input(input, weight, stride, padding, dilation):
    top, bottom, left, right = explicit_padding(padding, weight.shape[2:4], stride, dilation)
    return F.pad(input, (left, right, top, bottom))


def local_regression(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """y[n, o, i, j] = bias[o, i, j] + sum_{c, u, v} weight[o, c, u, v, i, j] * x_pad[n, g(o) * C_in/groups + c, i*sH + u*dH, j*sW + v*dW]."""
    out_channels, in_per_group, kernel_h, kernel_w, out_h, out_w = weight.shape
    batch = input.shape[0]
    padded = _padded_input(input, weight, stride, padding, dilation)
    columns = F.unfold(padded, (kernel_h, kernel_w), dilation=pair(dilation, "dilation"),
                       stride=pair(stride, "stride"))
    taps = in_per_group * kernel_h * kernel_w
    columns = columns.reshape(batch, groups, taps, out_h * out_w)
    w = weight.reshape(groups, out_channels // groups, taps, out_h * out_w)
    y = torch.einsum("ngkp,gokp->ngop", columns, w).reshape(batch, out_channels, out_h, out_w)
    return y if bias is None else y + bias


def local_regression_shifted(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The same layer as one strided view of the input and one multiply-add over whole planes
    per kernel tap (a per-pixel channel contraction when a group has several input channels)."""
    out_channels, in_per_group, kernel_h, kernel_w, out_h, out_w = weight.shape
    batch = input.shape[0]
    stride_h, stride_w = pair(stride, "stride")
    dilation_h, dilation_w = pair(dilation, "dilation")
    padded = _padded_input(input, weight, stride, padding, dilation)
    x = padded.reshape(batch, groups, in_per_group, *padded.shape[2:])
    w = weight.reshape(groups, out_channels // groups, in_per_group, kernel_h, kernel_w, out_h, out_w)
    y = None
    for u in range(kernel_h):
        rows = slice(u * dilation_h, u * dilation_h + (out_h - 1) * stride_h + 1, stride_h)
        for v in range(kernel_w):
            cols = slice(v * dilation_w, v * dilation_w + (out_w - 1) * stride_w + 1, stride_w)
            x_tap, w_tap = x[..., rows, cols], w[:, :, :, u, v]
            if in_per_group == 1:  # per-channel: a plain broadcast product
                term = x_tap * w_tap.squeeze(2)
            else:
                term = torch.einsum("ngchw,gochw->ngohw", x_tap, w_tap)
            y = term if y is None else y + term
    y = y.reshape(batch, out_channels, out_h, out_w)
    return y if bias is None else y + bias
