"""Paired metrics of synthesized faces (L1, PSNR, SSIM against the paired target), behind one
small interface for `reggan evaluate`.

A metric sees batches (source, output, target, label) and reduces them to one number:
`update(...)` then `compute()`. Per-image metrics against the paired target only define
`per_image`.
"""

from typing import Dict, List, Type

import torch
import torch.nn.functional as F


class Metric:
    name = ""
    higher_is_better = True
    needs_target = False

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, source, output, target, label) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError


class PerImageMetric(Metric):
    """The mean of a per-image score against the paired target."""

    needs_target = True

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def per_image(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, source, output, target, label) -> None:
        self.add(self.per_image(output.float().clamp(0, 1), target.float()))

    def add(self, scores: torch.Tensor) -> None:
        """Adds per-image scores computed elsewhere (they are shared between groups)."""
        self.total += float(scores.double().sum())
        self.count += scores.numel()

    def compute(self) -> float:
        if not self.count:
            raise ValueError(f"{self.name}: no images were scored; call update first")
        return self.total / self.count


class L1(PerImageMetric):
    name = "l1"
    higher_is_better = False

    def per_image(self, output, target):
        return (output - target).abs().flatten(1).mean(1)


class PSNR(PerImageMetric):
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""

    name = "psnr"

    def per_image(self, output, target):
        mse = (output - target).pow(2).flatten(1).mean(1)
        return 10 * torch.log10(1 / mse.clamp_min(1e-12))


class SSIM(PerImageMetric):
    """Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, data range 1, averaged over channels and valid window positions
    (scikit-image's structural_similarity with gaussian_weights=True,
    use_sample_covariance=False)."""

    name = "ssim"

    def per_image(self, output, target):
        channels = output.shape[1]
        coords = torch.arange(11, dtype=output.dtype, device=output.device) - 5
        g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
        g = g / g.sum()
        window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11)

        def blur(x):
            return F.conv2d(x, window, groups=channels)

        mu_x, mu_y = blur(output), blur(target)
        var_x = blur(output * output) - mu_x ** 2
        var_y = blur(target * target) - mu_y ** 2
        cov = blur(output * target) - mu_x * mu_y
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
            ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        # Valid positions only, as scikit-image crops (window - 1) / 2 pixels at each border.
        return ssim.flatten(1).mean(1)


REGISTRY: Dict[str, Type[Metric]] = {m.name: m for m in (L1, PSNR, SSIM)}


def available() -> List[str]:
    return list(REGISTRY)


def create(names) -> List[Metric]:
    return [REGISTRY[n]() for n in names]
