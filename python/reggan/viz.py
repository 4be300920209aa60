"""Pictures for people: labelled image grids and the loss-curve plot."""

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from reggan.io import _atomic, save_png

_HEADER = 16


def grid(columns: Sequence[np.ndarray], titles: Sequence[str],
         row_titles: Sequence[str] = ()) -> np.ndarray:
    """Columns of uint8 images (N, H, W, 3) side by side, one row per image, with a title above
    each column (and, when given, a caption at the top-left of each row's first image)."""
    count, height, width = columns[0].shape[:3]
    gap = 2
    canvas = np.full((_HEADER + count * (height + gap), len(columns) * (width + gap), 3), 255,
                     np.uint8)
    for c, images in enumerate(columns):
        for r in range(count):
            y, x = _HEADER + r * (height + gap), c * (width + gap)
            canvas[y:y + height, x:x + width] = images[r]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for c, title in enumerate(titles):
        draw.text((c * (width + gap) + 3, 2), title, fill=(0, 0, 0))
    for r, caption in enumerate(row_titles):
        y = _HEADER + r * (height + gap)
        draw.rectangle((0, y, 7 * len(caption) + 4, y + 12), fill=(255, 255, 255))
        draw.text((2, y), caption, fill=(0, 0, 0))
    return np.asarray(image)


def save_grid(path: Path, columns, titles, row_titles=()) -> None:
    save_png(path, grid(columns, titles, row_titles))


def plot_losses(path: Path, history: List[Dict[str, float]]) -> None:
    """Loss curves (smoothed with a running mean) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not history:
        return
    steps = np.array([h["step"] for h in history])
    names = [k for k in history[0] if k != "step"]
    groups = {"discriminator": [n for n in names if n.startswith("d_")],
              "generator": [n for n in names if not n.startswith("d_")]}
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    window = max(1, len(steps) // 50)
    for axis, (title, keys) in zip(axes, groups.items()):
        for key in keys:
            values = np.array([h[key] for h in history], np.float64)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1:], smooth, label=key)
        axis.set_title(f"{title} losses")
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    _atomic(path, lambda scratch: figure.savefig(scratch, format="png", dpi=100))
    plt.close(figure)
