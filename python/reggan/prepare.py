"""`reggan prepare`: find, align and crop faces in arbitrary photos, like the training faces.

Detectors ship inside wheels, so nothing is downloaded:
- 'opencv': OpenCV's Haar cascades (frontal face, then eyes to level and scale the face), from
  opencv-python-headless < 5 (`pip install "reggan-ext[prepare]"`; 5.x no longer ships them);
- 'skimage': scikit-image's LBP frontal-face cascade (a face box only, no eye alignment).
'auto' uses OpenCV when it is installed.

The crop puts the eyes where the built-in faces have them: level, at 47% of the height, 27% of
the width apart (or, without eyes, the face box scaled by the same proportions).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from reggan.data import UNREADABLE, Problems, list_images, load_image
from reggan.errors import RegganError
from reggan.io import mirrored_paths, save_png

log = logging.getLogger("reggan")

DETECTORS = ("auto", "opencv", "skimage")
EYE_DISTANCE = 0.27  # of the crop's width
EYE_HEIGHT = 0.47  # of the crop's height
FACE_WIDTH = 0.62  # a detector's face box, as a fraction of the crop's width


@dataclass
class Face:
    box: Tuple[float, float, float, float]  # x, y, width, height in pixels
    eyes: Optional[Tuple[Tuple[float, float], Tuple[float, float]]] = None  # left, right centres


class _OpenCV:
    def __init__(self):
        import cv2

        self.cv2 = cv2
        folder = Path(getattr(getattr(cv2, "data", None), "haarcascades", ""))
        face, eye = folder / "haarcascade_frontalface_default.xml", folder / "haarcascade_eye.xml"
        if not face.is_file() or not eye.is_file():
            raise RegganError(f"OpenCV {cv2.__version__} ships no Haar cascades (5.x dropped "
                              "them); install opencv-python-headless<5, or use --detector skimage")
        self.face = cv2.CascadeClassifier(str(face))
        self.eye = cv2.CascadeClassifier(str(eye))

    def __call__(self, rgb: np.ndarray) -> List[Face]:
        gray = self.cv2.equalizeHist(self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY))
        side = min(gray.shape)
        boxes = self.face.detectMultiScale(gray, 1.1, 5, minSize=(max(24, side // 10),) * 2)
        faces = []
        for x, y, w, h in boxes:
            upper = gray[y:y + h // 2 + h // 8, x:x + w]
            eyes = self.eye.detectMultiScale(upper, 1.1, 5, minSize=(max(8, w // 10),) * 2)
            centres = sorted((x + ex + ew / 2, y + ey + eh / 2) for ex, ey, ew, eh in eyes)
            pair = None
            if len(centres) >= 2:
                left, right = centres[0], centres[-1]
                if 0.25 * w < right[0] - left[0] < 0.75 * w:
                    pair = (left, right)
            faces.append(Face((float(x), float(y), float(w), float(h)), pair))
        return faces


class _SkImage:
    def __init__(self):
        from skimage import data
        from skimage.feature import Cascade

        self.cascade = Cascade(data.lbp_frontal_face_cascade_filename())

    def __call__(self, rgb: np.ndarray) -> List[Face]:
        side = min(rgb.shape[:2])
        found = self.cascade.detect_multi_scale(img=rgb, scale_factor=1.2, step_ratio=1,
                                                min_size=(max(24, side // 10),) * 2,
                                                max_size=(side, side))
        return [Face((float(f["c"]), float(f["r"]), float(f["width"]), float(f["height"])))
                for f in found]


def make_detector(name: str):
    if name not in DETECTORS:
        raise RegganError(f"--detector must be one of {', '.join(DETECTORS)}, got {name!r}")
    if name in ("auto", "opencv"):
        try:
            return _OpenCV()
        except ImportError:
            if name == "opencv":
                raise RegganError("--detector opencv needs OpenCV: pip install "
                                  "'opencv-python-headless<5' (or the [prepare] extra)") from None
    return _SkImage()


def align(rgb: np.ndarray, face: Face, size: int) -> np.ndarray:
    """Crop `face` out of `rgb` as a size x size image, rotated so the eyes are level."""
    if face.eyes is not None:
        (lx, ly), (rx, ry) = face.eyes
        angle = np.arctan2(ry - ly, rx - lx)
        scale = np.hypot(rx - lx, ry - ly) / (EYE_DISTANCE * size)  # input px per output px
        cx, cy = (lx + rx) / 2, (ly + ry) / 2
        ox, oy = 0.5 * size, EYE_HEIGHT * size
    else:
        x, y, w, h = face.box
        angle = 0.0
        scale = w / (FACE_WIDTH * size)
        cx, cy = x + w / 2, y + 0.36 * h
        ox, oy = 0.5 * size, EYE_HEIGHT * size
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    # Output (u, v) -> input: c + R(angle) * scale * ((u, v) - o).
    matrix = (cos, -sin, cx - cos * ox + sin * oy, sin, cos, cy - sin * ox - cos * oy)
    border = tuple(int(c) for c in np.median(rgb.reshape(-1, 3), axis=0))
    out = Image.fromarray(rgb).transform((size, size), Image.AFFINE, matrix,
                                         resample=Image.BICUBIC, fillcolor=border)
    return np.asarray(out)


def largest(faces: List[Face]) -> Optional[Face]:
    return max(faces, key=lambda f: f.box[2] * f.box[3]) if faces else None


def prepare_image(rgb: np.ndarray, detector, size: int) -> Optional[np.ndarray]:
    face = largest(detector(rgb))
    return None if face is None else align(rgb, face, size)


def prepare_folder(source: Path, out_dir: Path, size: int, detector_name: str,
                   strict: bool) -> Tuple[int, int]:
    """Aligned crops of every image under `source` (a file or a folder, searched recursively)
    into `out_dir` with the same relative paths as PNG. Returns (written, skipped)."""
    source = Path(source)
    files = list_images(source)
    outputs = mirrored_paths(files, source if source.is_dir() else source.parent, ".png")
    detector = make_detector(detector_name)
    problems = Problems(strict)
    written, unreadable, faceless = 0, [], []
    for path in files:
        try:
            rgb, _ = load_image(path, None)
        except UNREADABLE:
            unreadable.append(str(path))
            continue
        crop = prepare_image(rgb, detector, size)
        if crop is None:
            faceless.append(str(path))
            continue
        save_png(out_dir / outputs[path], crop)
        written += 1
    if unreadable:
        problems(f"{len(unreadable)} image(s) could not be read", unreadable)
    if faceless:
        problems(f"no face found in {len(faceless)} image(s)", faceless)
    if written == 0:
        raise RegganError(f"no face was found in any image of {source}")
    return written, len(unreadable) + len(faceless)

