"""Face similarity score (FSS): does the synthesized face keep the input's identity? Measured with
dlib's ResNet face descriptor (128-d; its authors call two faces the same person below a
Euclidean distance of 0.6), from the weights that `face_recognition_models` ships."""

from typing import Optional, Tuple

import numpy as np

from reggan.metrics._assets import package_file
from reggan.metrics.faces import FaceDetector, load_dlib
from reggan.metrics.images import Images, as_rgb_uint8, check_faces_mode, full_frame, locate_faces
from reggan.metrics.result import MetricResult

DESCRIPTOR_FILE = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
SAME_PERSON_DISTANCE = 0.6


class FaceDescriber:
    """dlib's face descriptor: 5 landmarks align a 150x150 chip of the face box, which the ResNet
    maps to 128 numbers. `jitter` > 0 averages over that many randomly jittered chips."""

    def __init__(self, detector: Optional[FaceDetector] = None, jitter: int = 0):
        purpose = "the face similarity score"
        dlib = load_dlib(purpose)
        self.dlib = dlib
        self.landmarks = dlib.shape_predictor(str(package_file(
            "face_recognition_models", LANDMARKS_FILE, purpose)))
        self.network = dlib.face_recognition_model_v1(str(package_file(
            "face_recognition_models", DESCRIPTOR_FILE, purpose)))
        self.detector = detector
        self.jitter = int(jitter)

    def describe(self, images: Images, faces: str = "detect",
                 name: str = "images") -> Tuple[np.ndarray, np.ndarray]:
        """Descriptors (N, 128) float64 and which faces were detected. faces='detect' finds each
        face with dlib (images with none found are described whole); faces='full' takes each
        image as an aligned face."""
        check_faces_mode(faces, "full_frame")
        rgb = as_rgb_uint8(images, name)
        boxes = locate_faces(rgb, faces, self.detector)
        out = np.empty((len(rgb), 128))
        for i, (image, box) in enumerate(zip(rgb, boxes)):
            left, top, right, bottom = box if box is not None else full_frame(image)
            rect = self.dlib.rectangle(left, top, right - 1, bottom - 1)
            shape = self.landmarks(image, rect)
            out[i] = np.asarray(self.network.compute_face_descriptor(image, shape, self.jitter))
        return out, np.array([b is not None for b in boxes], dtype=bool)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def face_similarity_score(outputs: Images, inputs: Images, describer: Optional[FaceDescriber] = None,
                          faces: str = "detect", missing: str = "full_frame") -> MetricResult:
    """FSS: the mean cosine similarity between the descriptors of each output face and its input
    face (the paper's convention; value). Details: the detection rate (pairs where both faces
    were found), the mean Euclidean descriptor distance and the fraction of pairs dlib would call
    the same person (distance < 0.6). Pairs where a face was not found are described whole
    (missing='full_frame') or left out (missing='skip')."""
    check_faces_mode(faces, missing)
    describer = describer if describer is not None else FaceDescriber()
    out_desc, out_found = describer.describe(outputs, faces, "outputs")
    in_desc, in_found = describer.describe(inputs, faces, "inputs")
    if len(out_desc) != len(in_desc):
        raise ValueError(f"got {len(out_desc)} outputs but {len(in_desc)} inputs; FSS compares pairs")
    return similarity_of_descriptors(out_desc, out_found, in_desc, in_found, faces == "detect",
                                     missing)


def similarity_of_descriptors(out_desc: np.ndarray, out_found: np.ndarray, in_desc: np.ndarray,
                              in_found: np.ndarray, detected: bool = True,
                              missing: str = "full_frame") -> MetricResult:
    """FSS from descriptors already computed (as `FaceDescriber.describe` returns them), so a
    report can describe each image once and score several groups of pairs; `detected` says
    whether the faces were detected (which adds the detection rate)."""
    found = out_found & in_found
    keep = found if missing == "skip" else np.ones_like(found)
    details = {"n": int(keep.sum())}
    if detected:
        details["detection_rate"] = float(found.mean()) if len(found) else 0.0
    if not keep.any():
        return MetricResult.unavailable("fss", "no image pairs to score" if len(keep) == 0 else
                                        "no pair had a face detected in both images")
    similarity = cosine_similarity(out_desc[keep], in_desc[keep])
    distance = np.linalg.norm(out_desc[keep] - in_desc[keep], axis=1)
    details["mean_distance"] = float(distance.mean())
    details["same_person_rate"] = float((distance < SAME_PERSON_DISTANCE).mean())
    return MetricResult("fss", float(similarity.mean()), details)


def face_features(images: Images, describer: Optional[FaceDescriber] = None,
                  faces: str = "detect") -> np.ndarray:
    """Descriptors (N, 128) for FD-face."""
    describer = describer if describer is not None else FaceDescriber()
    return describer.describe(images, faces)[0]
