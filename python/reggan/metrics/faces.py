"""Face detection with dlib's HOG frontal face detector, which is built into dlib (no weight
file)."""

import functools
from typing import Optional

import numpy as np

from reggan.metrics._assets import require_module
from reggan.metrics.images import Box


def load_dlib(purpose: str):
    return require_module("dlib", "dlib-bin", purpose)


class FaceDetector:
    """Finds the most confident frontal face in an RGB uint8 image. `upsample` doubles the image
    that many times first, so faces down to about 40 pixels (upsample=1) are found."""

    def __init__(self, upsample: int = 1):
        if not isinstance(upsample, int) or upsample < 0:
            raise ValueError(f"upsample must be an integer >= 0, got {upsample!r}")
        self.upsample = upsample
        self._detector = load_dlib("face detection").get_frontal_face_detector()

    def __call__(self, image: np.ndarray) -> Optional[Box]:
        rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        if len(rects) == 0:
            return None
        best = rects[int(np.argmax(scores))]
        return (best.left(), best.top(), best.right() + 1, best.bottom() + 1)


@functools.lru_cache(maxsize=None)
def default_detector() -> FaceDetector:
    """A shared FaceDetector (building one takes about half a second)."""
    return FaceDetector()
