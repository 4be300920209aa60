"""Files: atomic writes, output folders that are never silently overwritten, images, and
checkpoints (safetensors with the config in their metadata, plus a JSON copy beside them)."""

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reggan.errors import RegganError

CHECKPOINT_FORMAT = "reggan-checkpoint-1"

log = logging.getLogger("reggan")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What open() and mkdir() would give new files and folders (mkstemp and mkdtemp give 0o600 and
# 0o700, which the scratch files and folders are renamed from).
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`, so that a
    reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(scratch)
        with open(scratch, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(scratch, _FILE_MODE)
        os.replace(scratch, path)
    except BaseException:
        if os.path.exists(scratch):
            os.unlink(scratch)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def write(scratch):
        with open(scratch, "w") as f:
            f.write(text)

    _atomic(path, write)


def save_png(path: Path, image: np.ndarray) -> None:
    """uint8 (H, W, 3) or float [0, 1] array to a PNG, atomically."""
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    _atomic(path, lambda scratch: Image.fromarray(image).save(scratch, format="PNG"))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8."""
    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


MARKER = ".reggan-output"


def is_output(folder: Path) -> bool:
    """Whether `folder` is an output reggan wrote (a run, an evaluation...): inputs are never
    searched inside one, so an output kept beside or inside its input is not read back in."""
    return (Path(folder) / MARKER).is_file()


def check_output(path: Path, overwrite: bool, what: str = "output folder",
                 inputs: Sequence[Tuple[str, Optional[Path]]] = ()) -> Path:
    """Fail early, before any work, if `path` cannot become this command's output: it is, or
    contains, the current folder or one of `inputs` ((flag, path) pairs; None is skipped), which
    replacing it would delete; it exists and is not empty (without --overwrite), was not written
    by reggan (which --overwrite never deletes), or its parent cannot be written. Returns the
    path to write, the folder itself where `path` is a symbolic link to one."""
    path = Path(path)
    if path.is_symlink() and path.is_dir():
        path = path.resolve()  # renaming the link would move the link, not the folder
    real = path.resolve()
    sources = [("the current folder", Path.cwd())]
    sources += [(f"{flag} {source}", source) for flag, source in inputs if source is not None]
    for label, source in sources:
        source = Path(source).resolve()
        if source == real or real in source.parents:
            raise RegganError(f"{what} {path} is or contains {label}, which writing the output "
                              f"would replace; choose another {what}")
    if path.exists() and not path.is_dir():
        raise RegganError(f"{what} {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise RegganError(f"{what} {path} already exists and is not empty; pass --overwrite "
                              "to replace it, or choose another")
        if not is_output(path):
            raise RegganError(f"{what} {path} is not empty and was not written by reggan; "
                              "refusing to replace it even with --overwrite")
    parent = path.parent if not path.is_dir() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RegganError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RegganError(f"cannot write {what} {path}: {parent} is not writable")
    return path


@contextlib.contextmanager
def staged_output(path: Path, overwrite: bool, what: str = "output folder",
                  inputs: Sequence[Tuple[str, Optional[Path]]] = (), resumable: bool = False):
    """Yield a scratch folder beside `path`; on success it replaces `path` in one rename, on
    failure it is removed. So an output is never half-written, and an old one is replaced only
    by a complete new one. `resumable` (a training run): a stopped run that wrote a checkpoint
    is kept at `path` instead, to be resumed, where it replaces nothing."""
    path = check_output(path, overwrite, what, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        (scratch / MARKER).touch()
        yield scratch
        os.chmod(scratch, _DIR_MODE)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(scratch, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        checkpoint = resumable and find_checkpoint(scratch) is not None
        if checkpoint and not (path.exists() and any(path.iterdir())):
            os.chmod(scratch, _DIR_MODE)
            os.rename(scratch, path)
            log.warning("the unfinished run is in %s: `reggan train --resume --out %s` "
                        "continues it", path, path)
        else:
            if checkpoint:
                log.warning("the unfinished new run is discarded; %s still holds the previous "
                            "one", path)
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def mirrored_paths(files: Sequence[Path], base: Path, suffix: str) -> Dict[Path, Path]:
    """Each input file's output path: its path relative to `base` with `suffix` instead of its
    own. Inputs that differ only in their suffix (a.png, a.jpg) would overwrite each other's
    outputs, so they are an error that names them."""
    outputs = {file: Path(file).relative_to(base).with_suffix(suffix) for file in files}
    by_output: Dict[Path, List[Path]] = {}
    for file, output in outputs.items():
        by_output.setdefault(output, []).append(file)
    clashes = [group for group in by_output.values() if len(group) > 1]
    if clashes:
        listed = "; ".join(" and ".join(map(str, group)) for group in clashes[:3])
        raise RegganError(f"{sum(map(len, clashes))} input images differ only in their file "
                          f"type and would be written to the same output ({listed}); rename "
                          f"them apart")
    return outputs


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    """`tensors` into a safetensors file whose metadata carries `meta` (JSON) and the format tag;
    then the same metadata as `<name>.json` beside it for people and tools. Both atomic."""
    path = Path(path)
    meta = dict(meta, format=CHECKPOINT_FORMAT)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda scratch: save_file(tensors, scratch,
                                            metadata={"reggan": json.dumps(meta)}))
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def read_checkpoint_meta(path: Path) -> Dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise RegganError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("reggan")
    except (SafetensorError, OSError, ValueError) as error:
        raise RegganError(f"{path} is not a readable safetensors checkpoint: {error}") from None
    if raw is None:
        raise RegganError(f"{path} is a safetensors file but not a reggan checkpoint "
                          "(its metadata has no 'reggan' entry)")
    meta = json.loads(raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RegganError(f"{path} has checkpoint format {meta.get('format')!r}; this version "
                          f"reads {CHECKPOINT_FORMAT!r}")
    return meta


def load_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    meta = read_checkpoint_meta(path)
    return load_file(str(path)), meta


def prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str):
    """An optimizer's state as flat tensors plus its JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{prefix}{index}.{name}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                   groups, prefix: str) -> None:
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in prefixed(tensors, prefix).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def find_checkpoint(run_or_file: Path) -> Optional[Path]:
    """The newest training checkpoint of a run folder, or the file itself."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step_*.safetensors"))
    return candidates[-1] if candidates else None
