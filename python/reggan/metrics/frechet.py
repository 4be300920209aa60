"""Frechet distance between Gaussians fitted to two feature sets, and its three uses: FID on
Inception-v3 features (user-supplied weights only), FD-expr on an expression classifier's
penultimate features and FD-face on dlib face descriptors. FD-expr and FD-face are not FID and
are never called so."""

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

from reggan.metrics.images import Images, as_rgb_uint8
from reggan.metrics.result import MetricResult


def gaussian_statistics(features, name: str = "features") -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as pytorch-fid's np.cov) of features (N, D) in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected a 2-D array (N, D) with N >= 2 samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: has NaN or infinite values")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at rounding level set to 0: a square root turns an
    error of 1e-16 into 1e-8, which would add up over the null space of a singular covariance."""
    tol = np.abs(w).max(initial=0.0) * w.size * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the squared 2-Wasserstein distance
    between N(mu1, S1) and N(mu2, S2). tr (S1 S2)^1/2 is taken from the eigenvalues of the
    symmetric S1^1/2 S2 S1^1/2, which has the same spectrum as S1 S2 and, unlike S1 S2, a real
    symmetric eigendecomposition (no complex square root to discard)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, m in (("mu1", mu1), ("mu2", mu2)):
        if m.shape != (d,):
            raise ValueError(f"{name}: expected a vector of length {d}, got shape {m.shape}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name}: expected a ({d}, {d}) covariance, got shape {s.shape}")
        if not np.allclose(s, s.T, rtol=1e-8, atol=1e-12 * max(1.0, float(np.abs(s).max()))):
            raise ValueError(f"{name}: covariance is not symmetric")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = _psd_eigenvalues(np.linalg.eigvalsh((middle + middle.T) / 2))
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum())
    # Equal distributions give 0 up to rounding, which may fall below it.
    return max(distance, 0.0)


def frechet_distance_of(features_a, features_b) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    With fewer samples than dimensions (as for 2048-d Inception features of a few hundred
    images) the covariances are Xa'Xa / (N-1) and Xb'Xb / (M-1) of the centred features, and
    tr (Sa Sb)^1/2 is exactly the sum of the singular values of Xa Xb' / sqrt((N-1)(M-1)), an
    N x M matrix: no D x D decomposition, and no square roots of rounding-level eigenvalues."""
    mu_a, sigma_a = gaussian_statistics(features_a, "features_a")
    mu_b, sigma_b = gaussian_statistics(features_b, "features_b")
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b: dimensions differ ({a.shape[1]} and {b.shape[1]})")
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if min(n, m) > d:
        return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    xa, xb = a - mu_a, b - mu_b
    cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross)
    return max(distance, 0.0)


def frechet_result(name: str, a: np.ndarray, b: np.ndarray, extractor: str) -> MetricResult:
    """The Frechet distance of feature sets `a` and `b` as a result named `name`, with the
    sample counts and what `extractor` made the features."""
    details = {"n_a": int(a.shape[0]), "n_b": int(b.shape[0]), "dim": int(a.shape[1]),
               "features": extractor}
    return MetricResult(name, frechet_distance_of(a, b), details)


def fd_expr(classifier, images_a: Images, images_b: Images, faces: str = "full") -> MetricResult:
    """FD-expr: Frechet distance on an ExpressionClassifier's penultimate features."""
    from reggan.metrics.expression import expression_features
    a = expression_features(classifier, images_a, faces)
    b = expression_features(classifier, images_b, faces)
    return frechet_result(f"fd_expr_{classifier.name}", a, b,
                          f"{classifier.name} expression classifier, penultimate layer")


def fd_face(images_a: Images, images_b: Images, describer=None, faces: str = "detect") -> MetricResult:
    """FD-face: Frechet distance on dlib's 128-d face descriptors."""
    from reggan.metrics.identity import FaceDescriber
    describer = describer if describer is not None else FaceDescriber()
    a = describer.describe(images_a, faces, "images_a")[0]
    b = describer.describe(images_b, faces, "images_b")[0]
    return frechet_result("fd_face", a, b, "dlib face descriptor")


def inception_features(model, images: Images, batch_size: int = 32, name: str = "images") -> np.ndarray:
    """Pool features (N, 2048) float64 of 8-bit RGB images (each resized to 299x299)."""
    rgb = as_rgb_uint8(images, name)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rgb), batch_size):
        chunk = rgb[start:start + batch_size]
        # Images of different sizes are resized one by one; a batch of equal ones at once.
        groups = [chunk] if len({im.shape for im in chunk}) == 1 else [[im] for im in chunk]
        for group in groups:
            x = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).float().div(255).to(device)
            out.append(model.features(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, 2048))


def fid(images_a: Images, images_b: Images, inception_weights: Optional[Union[str, Path]] = None,
        device: Union[str, torch.device] = "cpu", batch_size: int = 32) -> MetricResult:
    """FID on Inception-v3 pool features. Raises MetricUnavailable without `inception_weights`
    (see reggan.metrics.inception.load_inception)."""
    from reggan.metrics.inception import load_inception
    model = load_inception(inception_weights).to(device)
    a = inception_features(model, images_a, batch_size, "images_a")
    b = inception_features(model, images_b, batch_size, "images_b")
    return frechet_result("fid", a, b, f"Inception-v3 ({model.variant} weights), pool3")
