"""`LocalRegression`: the locally connected layer as a drop-in module with nn.Conv2d's conventions."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from reggan_ext._geometry import (IntPair, Padding, explicit_padding, output_size, pair,
                                  positive_int)
from reggan_ext.ops import local_regression

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_INITS = ("default", "identity")


class LocalRegression(nn.Module):
    """A 2-d locally connected layer: nn.Conv2d with a separate kernel and bias per output pixel.

    y[n, o, i, j] = bias[o, i, j] + sum over c < C_in/groups, u < kH, v < kW of
        weight[o, c, u, v, i, j] * x[n, g(o) * C_in/groups + c, i*sH - pH + u*dH, j*sW - pW + v*dW]
    with g(o) = o // (C_out/groups); outside the image x follows `padding_mode`.
    groups = in_channels = out_channels fits each channel separately (RegGAN's regression).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as in nn.Conv2d.
        input_size: (H, W) of the inputs; it fixes the number of output pixels and so the shape
            of the weight, (out_channels, in_channels/groups, kH, kW, H_out, W_out).
        init: 'default' mirrors nn.Conv2d's initialization; 'identity' sets the centre tap of each
            output channel's own input channel to 1 and everything else (bias too) to 0, the
            natural start for image-to-image regression (requires in_channels == out_channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        input_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        init: str = "default",
    ):
        super().__init__()
        in_channels = positive_int(in_channels, "in_channels")
        out_channels = positive_int(out_channels, "out_channels")
        groups = positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups ({groups}) must divide in_channels ({in_channels}) and "
                f"out_channels ({out_channels})"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if init == "identity" and in_channels != out_channels:
            raise ValueError("init='identity' requires in_channels == out_channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.input_size = pair(input_size, "input_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.groups = groups
        self.padding_mode = padding_mode
        self.init = init
        top, bottom, left, right = explicit_padding(padding, self.kernel_size, self.stride,
                                                    self.dilation)
        # F.pad order; non-zero modes and asymmetric 'same' padding pad explicitly.
        self._explicit_pad = (left, right, top, bottom)
        self._pads_in_kernel = padding_mode == "zeros" and top == bottom and left == right
        self.output_size = output_size(self.input_size, self.kernel_size, self.stride,
                                       self._explicit_pad[2:] + self._explicit_pad[:2],
                                       self.dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(
            out_channels, in_channels // groups, *self.kernel_size, *self.output_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "identity":
                self.weight.zero_()
                in_per_group = self.in_channels // self.groups
                centre_u, centre_v = ((k - 1) // 2 for k in self.kernel_size)
                for o in range(self.out_channels):
                    self.weight[o, o % in_per_group, centre_u, centre_v] = 1
                if self.bias is not None:
                    self.bias.zero_()
                return
            # nn.Conv2d's kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
            # with fan_in counted over one pixel's kernel.
            fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or (input.shape[1], *input.shape[2:]) != (self.in_channels,
                                                                      *self.input_size):
            raise ValueError(
                f"LocalRegression: expected input of shape (N, {self.in_channels}, "
                f"{self.input_size[0]}, {self.input_size[1]}), got {tuple(input.shape)}"
            )
        padded, padding = self.pad_input(input)
        return local_regression(padded, self.weight, self.bias, self.stride, padding,
                                self.dilation, self.groups)

    def pad_input(self, input: torch.Tensor):
        """The input as the local_regression op reads it, and the zero padding the op adds:
        non-zero padding modes and asymmetric 'same' padding are applied here with F.pad."""
        if self._pads_in_kernel:
            return input, (self._explicit_pad[2], self._explicit_pad[0])
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(input, self._explicit_pad, mode=mode), (0, 0)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"input_size={self.input_size}, output_size={self.output_size}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.init != "default":
            s += f", init={self.init}"
        return s
