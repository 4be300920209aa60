"""Paired face datasets: layouts, image loading and pairing.

Layouts (`data.layout`, detected when 'auto'):
- folders: one folder per subject, files named by expression: `<root>/<subject>/happy.jpg`.
- flat: one folder of files whose names carry subject and expression, CFEE style:
  `S001_happy.png`, `S001-HappilySurprised.jpg`, `012_03.jpg` (numeric CFEE category codes).
- manifest: a CSV file with the columns subject, expression, path (relative to the CSV).

Every image is read as RGB (grayscale, palette and 16-bit images are converted, transparency is
composited on white) and resized to the configured size. Unreadable files are skipped with a
warning that names them, or are errors with `strict`.
"""

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from reggan.errors import RegganError
from reggan.expressions import from_cfee_code, known_expressions, normalize
from reggan.io import is_output

log = logging.getLogger("reggan")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".gif")
LAYOUTS = ("folders", "flat", "manifest")
# What reading an image that cannot be used raises (UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Record:
    subject: str
    expression: str  # canonical name, possibly outside the vocabulary
    path: Path


class Problems:
    """Reports bad inputs that can be left out: a warning that names them and says they are
    skipped, or an error under strict."""

    def __init__(self, strict: bool):
        self.strict = strict

    def __call__(self, problem: str, items: Sequence = ()) -> None:
        listed = f": {listing(items)}" if items else ""
        if self.strict:
            raise RegganError(f"{problem}{listed} (an error under --strict)")
        log.warning("%s, skipped%s", problem, listed)


def listing(items: Sequence, limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    items = [str(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _subject_folders(root: Path) -> List[Path]:
    """The folders of `root`, but for reggan's outputs (a run kept inside its dataset)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_output(p))


def list_images(source: Path, flag: str = "input") -> List[Path]:
    """The image `source`, or every image in the folder `source` and its subfolders but for
    reggan's outputs (an output kept inside its input is not read back in)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise RegganError(f"{flag} {source} does not exist")
    files, outputs = [], []
    for folder, subfolders, names in os.walk(source):
        folder = Path(folder)
        outputs += [folder / name for name in subfolders if is_output(folder / name)]
        subfolders[:] = sorted(name for name in subfolders if not is_output(folder / name))
        files += [folder / name for name in names if _is_image(folder / name)]
    if outputs:
        log.info("not reading reggan's output folder(s) in %s: %s", source, listing(outputs))
    if not files:
        raise RegganError(f"{flag} folder {source} holds no images "
                          f"({' '.join(IMAGE_EXTENSIONS)})")
    return sorted(files)


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "manifest"
        raise RegganError(f"dataset {path} is a file but not a .csv manifest")
    if not path.is_dir():
        raise RegganError(f"dataset {path} does not exist")
    if any(_images_in(p) for p in _subject_folders(path)):
        return "folders"
    if _images_in(path):
        return "flat"
    raise RegganError(f"dataset {path} has no images: expected subject folders of images, "
                      f"images named subject_expression, or a CSV manifest "
                      f"(image types: {' '.join(IMAGE_EXTENSIONS)})")


def _expression_of(token: str, known: Sequence[str]) -> Optional[str]:
    name = normalize(token)
    if name in known:
        return name
    return from_cfee_code(token)


def parse_flat_name(stem: str, known: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(subject, expression) from a file name such as 'S001_happily_surprised', 'S001-Happy',
    '012_03' or 'happy_S001': the longest run of tokens at the end (else at the start) that
    names an expression; the rest is the subject."""
    tokens = [t for t in re.split(r"[_\-\s.]+", stem) if t]
    for n in range(len(tokens) - 1, 0, -1):
        expression = _expression_of("_".join(tokens[-n:]), known)
        if expression and tokens[:-n]:
            return "_".join(tokens[:-n]), expression
    for n in range(len(tokens) - 1, 0, -1):
        expression = _expression_of("_".join(tokens[:n]), known)
        if expression:
            return "_".join(tokens[n:]), expression
    return None


def _scan_folders(root: Path, known) -> Tuple[List[Record], List[Path]]:
    records, unknown = [], []
    for subject in _subject_folders(root):
        for path in _images_in(subject):
            expression = _expression_of(path.stem, known)
            if expression is None:
                unknown.append(path)
            else:
                records.append(Record(subject.name, expression, path))
    return records, unknown


def _scan_flat(root: Path, known) -> Tuple[List[Record], List[Path]]:
    records, unknown = [], []
    for path in _images_in(root):
        parsed = parse_flat_name(path.stem, known)
        if parsed is None:
            unknown.append(path)
        else:
            records.append(Record(parsed[0], parsed[1], path))
    return records, unknown


def _scan_manifest(csv_path: Path, known, problems: Problems) -> Tuple[List[Record], List[Path]]:
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RegganError(f"cannot read manifest {csv_path}: {error}") from None
    if not rows:
        raise RegganError(f"manifest {csv_path} is empty; expected a header row with the "
                          "columns subject, expression, path")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("subject", "expression", "path") if c not in header]
    if missing:
        raise RegganError(f"manifest {csv_path} lacks the column(s) {', '.join(missing)}; "
                          f"expected subject, expression, path, got {', '.join(header)}")
    columns = [header.index(c) for c in ("subject", "expression", "path")]
    records, unknown = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            problems(f"manifest {csv_path} line {line} has {len(row)} fields, expected "
                     f"{len(header)}")
            continue
        subject, expression, path = (row[c].strip() for c in columns)
        path = Path(path) if Path(path).is_absolute() else csv_path.parent / path
        name = _expression_of(expression, known)
        if name is None:
            unknown.append(f"{expression!r} (line {line})")
        else:
            records.append(Record(subject, name, path))
    return records, unknown


def scan(path, layout: str, vocabulary: Sequence[str], strict: bool) -> List[Record]:
    """Records of a dataset whose expression is in `vocabulary`, one per (subject, expression)."""
    path = Path(path).expanduser()
    problems = Problems(strict)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise RegganError(f"data.layout must be auto or one of {', '.join(LAYOUTS)}, "
                          f"got {layout!r}")
    if layout == "manifest" and not path.is_file():
        raise RegganError(f"manifest {path} does not exist or is not a file")
    if layout != "manifest" and not path.is_dir():
        raise RegganError(f"dataset folder {path} does not exist or is not a folder")
    known = known_expressions(vocabulary)
    if layout == "folders":
        records, unknown = _scan_folders(path, known)
    elif layout == "flat":
        records, unknown = _scan_flat(path, known)
    else:
        records, unknown = _scan_manifest(path, known, problems)
    if unknown:
        problems(f"{len(unknown)} file(s) of {path} name no known expression (valid "
                 f"expressions are: {', '.join(known)})", unknown)
    outside = sorted({r.expression for r in records if r.expression not in vocabulary})
    if outside:
        log.info("ignoring expressions outside data.expressions: %s", ", ".join(outside))
    kept: Dict[Tuple[str, str], Record] = {}
    duplicates = []
    for record in records:
        if record.expression not in vocabulary:
            continue
        key = (record.subject, record.expression)
        if key in kept:
            duplicates.append(record.path)
        else:
            kept[key] = record
    if duplicates:
        problems(f"{len(duplicates)} image(s) repeat a subject's expression", duplicates)
    if not kept:
        raise RegganError(f"dataset {path} has no images of the expressions "
                          f"{', '.join(vocabulary)}")
    return list(kept.values())


def load_image(path: Path, size: Optional[int]) -> Tuple[np.ndarray, Tuple[int, int]]:
    """An image file as uint8 RGB (size, size, 3) (its own size when size is None), and its
    original (width, height). Raises one of UNREADABLE if it cannot be used."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, np.float64)
            span = max(array.max() - array.min(), 1e-12)
            image = Image.fromarray(np.round((array - array.min()) / span * 255).astype(np.uint8))
        if image.mode == "P" or image.mode == "LA" or image.mode == "PA":
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image)
        image = image.convert("RGB")
        original = image.size
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.LANCZOS)
        return np.asarray(image), original


def read_images(paths: Sequence[Path], size: int,
                problems: Problems) -> List[Optional[np.ndarray]]:
    """Images of `paths` (None for unreadable ones, reported through `problems`)."""
    out, bad, resized = [], [], []
    for path in paths:
        try:
            image, original = load_image(path, size)
            out.append(image)
            if original != (size, size):
                resized.append(path)
        except UNREADABLE as e:
            bad.append(f"{path} ({'missing' if isinstance(e, FileNotFoundError) else 'unreadable'})")
            out.append(None)
    if resized:
        log.info("resized %d image(s) to %dx%d, e.g. %s", len(resized), size, size, resized[0])
    if bad:
        problems(f"{len(bad)} image(s) could not be read", bad)
    return out


class PairedFaces:
    """Aligned faces of subjects, and the (source, target) pairs between them.

    images: uint8 (M, 3, S, S); labels: (M,) vocabulary index of each image;
    pairs: (P, 3) rows of [source image, target image, target index into `targets`].
    """

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor,
                 subjects: List[str], image_subjects: List[str], pairs: torch.Tensor,
                 vocabulary: Sequence[str], targets: Sequence[str]):
        self.name = name
        self.images, self.labels, self.pairs = images, labels, pairs
        self.subjects, self.image_subjects = subjects, image_subjects
        self.vocabulary, self.targets = list(vocabulary), list(targets)

    def __len__(self) -> int:
        return self.pairs.shape[0]

    def batch(self, indices: torch.Tensor, device="cpu"):
        """(source, target, target index, target label in the vocabulary) of pairs `indices`."""
        rows = self.pairs[indices]
        source = self.images[rows[:, 0]].to(device).float().div_(255)
        target = self.images[rows[:, 1]].to(device).float().div_(255)
        return source, target, rows[:, 2].to(device), self.labels[rows[:, 1]].to(device)

    def subset(self, name: str, subjects: Sequence[str]) -> "PairedFaces":
        """The same images restricted to the pairs of `subjects`."""
        keep = set(subjects)
        mask = torch.tensor([self.image_subjects[i] in keep for i in self.pairs[:, 0].tolist()],
                            dtype=torch.bool)
        return PairedFaces(name, self.images, self.labels,
                           [s for s in self.subjects if s in keep], self.image_subjects,
                           self.pairs[mask], self.vocabulary, self.targets)

    def first_subjects(self, count: int) -> "PairedFaces":
        """The same data restricted to the pairs of the first `count` subjects."""
        return self.subset(self.name, self.subjects[:count])

    def sources(self) -> torch.Tensor:
        """Image indices of each subject's source face, in subject order."""
        return torch.unique(self.pairs[:, 0])


def pair_up(name: str, records: Sequence[Record], images: Sequence[Optional[np.ndarray]],
            vocabulary: Sequence[str], source: str, targets: Sequence[str],
            problems: Problems) -> PairedFaces:
    by_subject: Dict[str, Dict[str, np.ndarray]] = {}
    for record, image in zip(records, images):
        if image is not None:
            by_subject.setdefault(record.subject, {})[record.expression] = image
    kept, unpaired = [], []
    for subject in sorted(by_subject):
        faces = by_subject[subject]
        if source in faces and any(t in faces for t in targets):
            kept.append(subject)
        else:
            unpaired.append(subject)
    if unpaired:
        problems(f"{len(unpaired)} subject(s) lack a {source} face or any target expression",
                 unpaired)
    if not kept:
        raise RegganError(f"{name}: no subject has both a {source} face and one of "
                          f"{', '.join(targets)}")
    stack, labels, image_subjects, pairs = [], [], [], []
    for subject in kept:
        faces = by_subject[subject]
        source_index = len(stack)
        for expression in [source] + [t for t in targets if t in faces]:
            if expression != source:
                pairs.append((source_index, len(stack), targets.index(expression)))
            stack.append(faces[expression])
            labels.append(vocabulary.index(expression))
            image_subjects.append(subject)
    images = torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2).contiguous()
    return PairedFaces(name, images, torch.tensor(labels), kept, image_subjects,
                       torch.tensor(pairs, dtype=torch.long), vocabulary, targets)


def load_paired(name: str, path, layout: str, vocabulary: Sequence[str], source: str,
                targets: Sequence[str], size: int, strict: bool,
                subjects: Optional[Sequence[str]] = None) -> PairedFaces:
    records = scan(path, layout, vocabulary, strict)
    if subjects is not None:
        missing = sorted(set(subjects) - {r.subject for r in records})
        if missing:
            raise RegganError(f"{name}: {len(missing)} subject(s) are not in {path}: "
                              f"{listing(missing)}")
        wanted = set(subjects)
        records = [r for r in records if r.subject in wanted]
    problems = Problems(strict)
    images = read_images([r.path for r in records], size, problems)
    return pair_up(name, records, images, vocabulary, source, targets, problems)


def holdout_subjects(subjects: Sequence[str], fraction: float, seed: int) -> List[str]:
    """A deterministic `fraction` of `subjects` (at least one when fraction > 0 and there are
    two or more)."""
    subjects = sorted(subjects)
    count = int(round(fraction * len(subjects)))
    if fraction > 0 and len(subjects) > 1:
        count = min(max(count, 1), len(subjects) - 1)
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed))
    return sorted(subjects[i] for i in order[:count].tolist())
