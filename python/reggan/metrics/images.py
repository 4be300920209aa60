"""Image batches in the forms the app and users hold them, normalized to what the extractors
need: 8-bit RGB arrays (as the images would be saved to PNG), face crops, grayscale tensors."""

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

Box = Tuple[int, int, int, int]  # left, top, right, bottom in pixels (right, bottom exclusive)
Images = Union[torch.Tensor, np.ndarray, Sequence]

# Float images are clamped to [0, 1] (a generator may overshoot slightly); beyond this they are
# taken to be in another range ([-1, 1], [0, 255]) and refused.
_FLOAT_SLACK = 0.5


def as_rgb_uint8(images: Images, name: str = "images") -> List[np.ndarray]:
    """A list of contiguous HxWx3 uint8 arrays from: a tensor (N, C, H, W) with C in {1, 3, 4},
    float in [0, 1] or uint8; a numpy array (N, H, W[, C]); or a sequence of HxW[xC] arrays or
    PIL images. Alpha is dropped, gray is repeated to RGB."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
            raise ValueError(f"{name}: expected a tensor (N, C, H, W) with C in 1, 3 or 4, got "
                             f"shape {tuple(images.shape)}")
        images = images.detach().cpu()
        if images.is_floating_point():  # numpy has no bfloat16
            images = images.float()
        items = list(images.permute(0, 2, 3, 1).numpy())
    elif isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"{name}: expected an array (N, H, W) or (N, H, W, C), got shape "
                             f"{images.shape}")
        items = list(images)
    else:
        items = list(images)
    out = []
    for i, item in enumerate(items):
        array = np.asarray(item.convert("RGB")) if hasattr(item, "convert") else np.asarray(item)
        out.append(_to_rgb_uint8(array, f"{name}[{i}]"))
    return out


def _to_rgb_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"{name}: expected an image HxW or HxWxC with C in 1, 3 or 4, got shape "
                         f"{array.shape}")
    if array.dtype == np.uint8:
        rgb = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: has NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
            raise ValueError(f"{name}: float images must be in [0, 1], got values in "
                             f"[{lo:.3g}, {hi:.3g}]")
        rgb = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    else:
        raise ValueError(f"{name}: expected uint8 or float pixels, got {array.dtype}")
    rgb = rgb[:, :, :3] if rgb.shape[2] == 4 else rgb
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (as OpenCV and PIL convert), float64 in [0, 255]."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def full_frame(image: np.ndarray) -> Box:
    return (0, 0, image.shape[1], image.shape[0])


def crop_square(image: np.ndarray, box: Box, margin: float, size: int) -> torch.Tensor:
    """The square around `box` (its longer side, widened by `margin` times it on each side),
    resized to size x size with antialiased bilinear interpolation. Parts outside the image
    are filled with the mean of its bottom two rows, as `fer` pads. `image` is HxW or HxWxC in
    [0, 255]; returns float32 (C, size, size) in [0, 1]."""
    planes = image[:, :, None] if image.ndim == 2 else image
    height, width = planes.shape[:2]
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * (1 + 2 * margin)
    x0 = int(round((left + right - side) / 2))
    y0 = int(round((top + bottom - side) / 2))
    n = max(1, int(round(side)))
    fill = planes[max(0, height - 2):].reshape(-1, planes.shape[2]).mean(axis=0)
    square = np.empty((n, n, planes.shape[2]), dtype=np.float32)
    square[:] = fill
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + n), min(height, y0 + n)
    if sx1 > sx0 and sy1 > sy0:
        square[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = planes[sy0:sy1, sx0:sx1]
    tensor = torch.from_numpy(square).permute(2, 0, 1)[None] / 255.0
    if n != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=n > size)
    return tensor[0].clamp_(0, 1)


def check_faces_mode(faces: str, missing: str) -> None:
    if faces not in ("detect", "full"):
        raise ValueError(f"faces must be 'detect' (find the face with dlib) or 'full' (the image "
                         f"is an aligned face), got {faces!r}")
    if missing not in ("full_frame", "skip"):
        raise ValueError(f"missing must be 'full_frame' (use the whole image when no face is "
                         f"found) or 'skip' (leave the image out), got {missing!r}")


def locate_faces(images: List[np.ndarray], faces: str, detector=None) -> List[Optional[Box]]:
    """Face boxes: dlib's detection for faces='detect' (None where none was found), the whole
    image for faces='full'."""
    if faces == "full":
        return [full_frame(im) for im in images]
    if detector is None:
        from reggan.metrics.faces import default_detector
        detector = default_detector()
    return [detector(im) for im in images]
