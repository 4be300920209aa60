"""RegGAN's networks: the regression stage, the refinement generator and the discriminator.

Images are float tensors in [0, 1], (N, C, H, W).
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from reggan_ext import LocalRegression

MODES = ("reggan", "regression", "refinement")


class RegressionStage(nn.Module):
    """One per-channel LocalRegression per target expression (stage 1).

    Layer e maps a source face to target expression e, each colour channel from the same
    channel's k x k neighbourhood, with its own weights at every pixel. Starts as the identity,
    so an unfitted stage passes faces through unchanged.
    """

    def __init__(self, targets: int, channels: int, size: Tuple[int, int], kernel_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            LocalRegression(channels, channels, kernel_size, input_size=size, padding="same",
                            groups=channels, init="identity")
            for _ in range(targets)
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), target (N,) indices of target expressions."""
        out = torch.zeros_like(x)
        for e in torch.unique(target).tolist():
            rows = (target == e).nonzero().squeeze(1)
            out = out.index_copy(0, rows, self.layers[e](x.index_select(0, rows)))
        return out


def _conv(in_channels, out_channels, kernel, stride=1, zero=False, bias=False):
    # No bias before an InstanceNorm: the norm removes it, and Adam would turn its vanishing
    # gradient into noise-driven updates.
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2
                     if stride == 1 else 1, padding_mode="reflect" if stride == 1 else "zeros",
                     bias=bias)
    if zero:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


class _ConditionalNorm(nn.Module):
    """Instance normalization whose scale and shift depend on the target expression (FiLM /
    conditional instance norm). A constant condition plane concatenated to the input, as in
    StarGAN, would be removed by the first instance norm; this conditions every layer."""

    def __init__(self, channels: int, conditions: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.scale = nn.Embedding(conditions, channels)
        self.shift = nn.Embedding(conditions, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x, condition):
        return self.norm(x) * self.scale(condition)[:, :, None, None] + \
            self.shift(condition)[:, :, None, None]


class _Block(nn.Module):
    """conv -> conditional norm -> ReLU (optionally after a 2x nearest upsampling)."""

    def __init__(self, in_channels, out_channels, kernel, conditions, stride=1, upsample=False):
        super().__init__()
        self.upsample = upsample
        self.conv = _conv(in_channels, out_channels, kernel, stride)
        self.norm = _ConditionalNorm(out_channels, conditions)

    def forward(self, x, condition):
        if self.upsample:
            # Nearest upsampling then a convolution: no checkerboard artefacts.
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.norm(self.conv(x), condition))


class _Residual(nn.Module):
    def __init__(self, channels, conditions):
        super().__init__()
        self.first = _Block(channels, channels, 3, conditions)
        self.conv = _conv(channels, channels, 3)
        self.norm = _ConditionalNorm(channels, conditions)

    def forward(self, x, condition):
        return x + self.norm(self.conv(self.first(x, condition)), condition)


class Generator(nn.Module):
    """Encoder, residual blocks, decoder, conditioned on the target expression through every
    normalization layer. Its output is added to its input, and its last layer starts at zero,
    so it begins as the identity and learns a correction."""

    def __init__(self, channels: int, conditions: int, width: int = 32, blocks: int = 4,
                 downsamplings: int = 2):
        super().__init__()
        layers = [_Block(channels, width, 7, conditions)]
        w = width
        for _ in range(downsamplings):
            layers.append(_Block(w, 2 * w, 4, conditions, stride=2))
            w *= 2
        layers += [_Residual(w, conditions) for _ in range(blocks)]
        for _ in range(downsamplings):
            layers.append(_Block(w, w // 2, 3, conditions, upsample=True))
            w //= 2
        self.layers = nn.ModuleList(layers)
        self.out = _conv(w, channels, 7, zero=True, bias=True)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = x * 2 - 1
        for layer in self.layers:
            h = layer(h, target)
        return x + self.out(h)


class Discriminator(nn.Module):
    """PatchGAN: real/fake scores for overlapping patches, plus an expression classifier head
    on the same features (as in StarGAN)."""

    def __init__(self, channels: int, classes: int, width: int = 32, layers: int = 4,
                 spectral: bool = True):
        super().__init__()
        wrap = spectral_norm if spectral else (lambda m: m)
        body, w_in, w = [], channels, width
        for _ in range(layers):
            body += [wrap(nn.Conv2d(w_in, w, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            w_in, w = w, w * 2
        self.body = nn.Sequential(*body)
        self.patch = wrap(nn.Conv2d(w_in, 1, 3, 1, 1))
        self.classify = nn.Linear(w_in, classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch scores (N, 1, h, w) and expression logits (N, classes)."""
        features = self.body(x * 2 - 1)
        return self.patch(features), self.classify(features.mean((2, 3)))


class RegGAN(nn.Module):
    """Source face + target expression -> (regression output, refined output).

    mode 'reggan': regression then refinement; 'regression': the regression stage alone (the
    refined output is the regression output); 'refinement': the generator on the source face
    with no regression stage (the usual conditional-GAN baseline).
    """

    def __init__(self, mode: str, targets: Sequence[str], channels: int, size: Tuple[int, int],
                 kernel_size: int, width: int, blocks: int, downsamplings: int):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.targets = list(targets)
        self.regression: Optional[RegressionStage] = None
        self.generator: Optional[Generator] = None
        if mode != "refinement":
            self.regression = RegressionStage(len(targets), channels, size, kernel_size)
        if mode != "regression":
            self.generator = Generator(channels, len(targets), width, blocks, downsamplings)

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        regressed = self.regression(x, target) if self.regression is not None else x
        refined = self.generator(regressed, target) if self.generator is not None else regressed
        return regressed, refined
