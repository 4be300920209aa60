"""`reggan synthesize`: a trained model applied to new faces, one output per expression."""

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from reggan.data import Problems, list_images, read_images
from reggan.errors import RegganError
from reggan.expressions import resolve
from reggan.io import mirrored_paths, save_png, staged_output, to_uint8
from reggan.runtime import resolve_device
from reggan.train import load_model
from reggan.viz import save_grid

log = logging.getLogger("reggan")

GRID_ROWS = 16
CHUNK = 256  # images read at once


@torch.no_grad()
def transform(model, images: torch.Tensor, expressions: Sequence[int], batch_size: int,
              device) -> torch.Tensor:
    """uint8 faces (N, 3, S, S) -> float outputs (N, len(expressions), 3, S, S) in [0, 1]."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device).float().div_(255)
        row = []
        for e in expressions:
            index = torch.full((x.shape[0],), e, dtype=torch.long, device=device)
            row.append(model(x, index)[1].clamp(0, 1).cpu())
        out.append(torch.stack(row, 1))
    return torch.cat(out)


def synthesize(model_path: Path, source: Path, out_dir: Path,
               expressions: Optional[Sequence[str]] = None, batch_size: int = 16,
               device: str = "auto", strict: bool = False, overwrite: bool = False) -> int:
    """Writes `<out>/<input path>/<expression>.png` (and input.png) for every input image and
    expression, plus grid.png; returns the number of faces."""
    if batch_size < 1:
        raise RegganError(f"--batch-size must be >= 1, got {batch_size}")
    files = list_images(source, "--input")
    folders = mirrored_paths(files, Path(source) if Path(source).is_dir() else
                             Path(source).parent, "")
    with staged_output(out_dir, overwrite,
                       inputs=[("--input", source), ("--model", model_path)]) as scratch:
        device = resolve_device(device, setting="--device")
        model, config = load_model(model_path, device)
        names = resolve(expressions, model.targets, "target expression") if expressions \
            else list(model.targets)
        indices = [model.targets.index(n) for n in names]
        grid_inputs, grid_outputs, captions, done = [], [], [], 0
        # Chunks bound the memory a large folder takes.
        for start in range(0, len(files), CHUNK):
            chunk = files[start:start + CHUNK]
            images = read_images(chunk, config.data.size, Problems(strict))
            kept = [(f, i) for f, i in zip(chunk, images) if i is not None]
            if not kept:
                continue
            stack = torch.from_numpy(np.stack([i for _, i in kept])).permute(0, 3, 1, 2)
            outputs = transform(model, stack, indices, batch_size, device)
            for (path, image), faces in zip(kept, outputs):
                folder = scratch / folders[path]
                save_png(folder / "input.png", image)
                for name, face in zip(names, to_uint8(faces)):
                    save_png(folder / f"{name}.png", face)
            room = GRID_ROWS - len(captions)
            grid_inputs += [i for _, i in kept[:room]]
            grid_outputs += list(outputs[:room])
            captions += [p.stem for p, _ in kept[:room]]
            done += len(kept)
        if not done:
            raise RegganError(f"no readable image in {source}")
        faces = torch.stack(grid_outputs)
        columns = [np.stack(grid_inputs)] + [to_uint8(faces[:, k]) for k in range(len(names))]
        save_grid(scratch / "grid.png", columns, ["input"] + names, captions)
    log.info("wrote %d face(s) x %d expression(s) to %s", done, len(names), out_dir)
    return done
