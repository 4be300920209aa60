"""Inception-v3 pool features (2048-d) for FID, from user-supplied weights: pytorch-fid's
`pt_inception-2015-12-05-*.pth` (TensorFlow's 2015 FID network) or a torchvision `inception_v3`
state dict. The network is defined here because torchvision's wheels do not import beside every
torch; parameter names follow torchvision, so both files load as they are.

pytorch-fid's network differs from torchvision's in its pooling: TensorFlow's average pools do not
count the padding, and the last block's pool branch max-pools. The variant is told by the
classifier's size (1008 classes for the FID network, 1000 for torchvision's)."""

from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from reggan.metrics.result import MetricUnavailable

FID_VARIANT, TORCHVISION_VARIANT = "fid", "torchvision"
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x, tf_style: bool):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=not tf_style)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, tf_style: bool):
        super().__init__()
        self.tf_style = tf_style
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x, self.tf_style)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, 2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, tf_style: bool):
        super().__init__()
        self.tf_style = tf_style
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x, self.tf_style)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """pool: 'avg' (torchvision), 'avg_tf' (average without the padding) or 'max'."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, 1, 1)
        else:
            pooled = _avg_pool(x, self.pool == "avg_tf")
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """Inception-v3 up to its 2048-d average pool. `features` takes RGB images (N, 3, H, W) in
    [0, 1], resizes them to 299x299 (bilinear) and scales them to [-1, 1], as pytorch-fid does
    (and as torchvision's weights expect with their transform_input)."""

    def __init__(self, variant: str = FID_VARIANT):
        super().__init__()
        if variant not in (FID_VARIANT, TORCHVISION_VARIANT):
            raise ValueError(f"variant must be {FID_VARIANT!r} or {TORCHVISION_VARIANT!r}, got {variant!r}")
        tf = variant == FID_VARIANT
        self.variant = variant
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, tf)
        self.Mixed_5c = InceptionA(256, 64, tf)
        self.Mixed_5d = InceptionA(288, 64, tf)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, tf)
        self.Mixed_6c = InceptionC(768, 160, tf)
        self.Mixed_6d = InceptionC(768, 160, tf)
        self.Mixed_6e = InceptionC(768, 192, tf)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_tf" if tf else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if tf else "avg")
        # The classifier is not used for features but is part of both weight files.
        self.fc = nn.Linear(2048, 1008 if tf else 1000)

    def forward(self, x):
        """x: (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self(2 * x - 1)


def load_inception(path: Union[str, Path, None]) -> InceptionV3:
    """The Inception-v3 of the weight file `path` (pytorch-fid's or torchvision's); raises
    MetricUnavailable when no path is given or the file is missing."""
    if path is None:
        raise MetricUnavailable(
            "FID needs Inception-v3 weights, which reggan never downloads: pass "
            "--inception-weights PATH (inception_weights=PATH) with pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (the standard FID network) or a torchvision "
            "inception_v3 state dict (inception_v3_google-0cc3c7bd.pth)")
    path = Path(path)
    if not path.is_file():
        raise MetricUnavailable(f"FID: the Inception weight file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, KeyError, EOFError, RuntimeError... by content
        raise ValueError(f"inception_weights: {path} is not a state dict saved by torch.save "
                         f"({type(error).__name__} on loading it; a whole pickled model is never "
                         f"loaded: save its state_dict() instead)") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"inception_weights: {path} is not an Inception-v3 state dict "
                         f"(no 'fc.weight'); expected pytorch-fid's or torchvision's file")
    classes = state["fc.weight"].shape[0]
    variant = {1008: FID_VARIANT, 1000: TORCHVISION_VARIANT}.get(classes)
    if variant is None:
        raise ValueError(f"inception_weights: {path} has {classes} classes; expected 1008 "
                         f"(pytorch-fid) or 1000 (torchvision)")
    model = InceptionV3(variant)
    # torchvision's file also holds the auxiliary classifier, which features never use.
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes
        raise ValueError(f"inception_weights: {path} does not fit Inception-v3: "
                         f"{str(error).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"inception_weights: {path} does not fit Inception-v3: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
