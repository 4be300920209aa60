"""Frechet distance against closed forms and an independent matrix square root; the Inception-v3
port against torchvision's and pytorch-fid's networks on the same synthetic weights; FID's
missing-weights message."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "metrics")
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, FIXTURES)

from make_inception_fixture import synthetic_state_dict  # noqa: E402
from conftest import skip_if_missing  # noqa: E402
from reggan.metrics.frechet import (fid, frechet_distance, frechet_distance_of,  # noqa: E402
                                    gaussian_statistics, inception_features)
from reggan.metrics.inception import InceptionV3, load_inception  # noqa: E402
from reggan.metrics.result import MetricUnavailable, measure  # noqa: E402


def random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def closed_form(mu1, eig1, mu2, eig2):
    """FD for covariances with common eigenvectors: |mu1 - mu2|^2 + sum (sqrt l1 - sqrt l2)^2."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(eig1) - np.sqrt(eig2)) ** 2).sum())


def test_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # |dmu|^2 = 5; (1-2)^2 + (2-1)^2 + 0 = 2.
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(7.0, rel=1e-12)


@pytest.mark.parametrize("d", [1, 5, 64])
def test_commuting_covariances_including_singular(d):
    rng = np.random.default_rng(d)
    q = random_orthogonal(d, rng)
    eig1, eig2 = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    eig1[: d // 3] = 0.0  # rank-deficient, as with fewer samples than dimensions
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * eig1) @ q.T, (q * eig2) @ q.T
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    expected = closed_form(mu1, eig1, mu2, eig2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_non_commuting_2x2_closed_form():
    # For 2x2 PSD A, B: tr (AB)^1/2 = sqrt(tr AB + 2 sqrt(det A det B)).
    a = np.array([[2.0, 0.7], [0.7, 1.0]])
    b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(a @ b, b @ a)
    cross = np.sqrt(np.trace(a @ b) + 2 * np.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 2.0])
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * cross
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-12)


def test_matches_scipy_sqrtm_on_general_covariances():
    skip_if_missing("scipy")
    import scipy.linalg

    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    y = rng.normal(size=(250, 40)) @ rng.normal(size=(40, 40)) + 0.5
    mu1, s1 = gaussian_statistics(x)
    mu2, s2 = gaussian_statistics(y)
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_zero_symmetric_and_invariant():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(60, 6)) * 1.5 + 0.2
    # 0 up to rounding, relative to the traces it is the difference of (about 12 here).
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-12)
    d = frechet_distance_of(x, y)
    assert d > 0
    assert frechet_distance_of(y, x) == pytest.approx(d, rel=1e-10)
    q = random_orthogonal(6, rng)
    shift = rng.normal(size=6)
    assert frechet_distance_of(x @ q + shift, y @ q + shift) == pytest.approx(d, rel=1e-10)


@pytest.mark.parametrize("n, m", [(5, 9), (30, 12), (80, 100)])
def test_low_rank_sample_route_matches_covariance_route(n, m):
    # 40-d features: fewer samples than dimensions takes the N x M singular-value route.
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 40))
    y = rng.normal(size=(m, 40)) @ rng.normal(size=(40, 40)) + 1.0
    via_covariances = frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y))
    assert frechet_distance_of(x, y) == pytest.approx(via_covariances, rel=1e-9)


def test_statistics_and_bad_input():
    x = np.arange(12.0).reshape(4, 3) ** 1.5
    mu, sigma = gaussian_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T))
    with pytest.raises(ValueError, match=r"features: expected a 2-D array \(N, D\) with N >= 2"):
        gaussian_statistics(x[:1])
    with pytest.raises(ValueError, match="features_a and features_b: dimensions differ"):
        frechet_distance_of(x, x[:, :2])
    with pytest.raises(ValueError, match="features_b: has NaN"):
        frechet_distance_of(x, np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match=r"sigma2: expected a \(3, 3\) covariance"):
        frechet_distance(mu, sigma, mu, np.eye(2))
    with pytest.raises(ValueError, match="mu2: expected a vector of length 3"):
        frechet_distance(mu, sigma, mu[:2], sigma)
    with pytest.raises(ValueError, match="sigma1: covariance is not symmetric"):
        frechet_distance(mu, np.triu(sigma), mu, sigma)


@pytest.fixture(scope="module")
def inception_reference():
    return np.load(os.path.join(FIXTURES, "inception_reference.npz"))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Synthetic weights saved as each source saves them: pytorch-fid's file predates BatchNorm's
    num_batches_tracked; torchvision's also holds the (unused) auxiliary classifier."""
    folder = tmp_path_factory.mktemp("inception")
    paths = {}
    for variant in ("fid", "torchvision"):
        state = synthetic_state_dict([(k, v.shape) for k, v in InceptionV3(variant).state_dict().items()])
        if variant == "fid":
            state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        else:
            state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
        paths[variant] = folder / f"{variant}.pth"
        torch.save(state, paths[variant])
    return paths


@pytest.mark.parametrize("variant", ["fid", "torchvision"])
def test_inception_port_matches_reference_networks(variant, inception_reference, weight_files):
    model = load_inception(weight_files[variant])
    assert model.variant == variant
    features = model.features(torch.from_numpy(inception_reference["inputs"])).numpy()
    expected = inception_reference[f"{variant}_features"]
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fid_end_to_end_and_missing_weights(tmp_path, inception_reference, weight_files):
    images = torch.from_numpy(inception_reference["inputs"])
    missing = measure("fid", fid, images, images)
    assert not missing.available and "--inception-weights PATH" in missing.reason
    assert "pt_inception-2015-12-05" in missing.reason
    with pytest.raises(MetricUnavailable, match="does not exist"):
        fid(images, images, inception_weights=tmp_path / "nothing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="inception_weights: .* is not an Inception-v3 state dict"):
        fid(images, images, inception_weights=tmp_path / "bad.pth")

    # The same two images as 8-bit HxWx3 arrays, in the other order: the same set, distance 0.
    uint8 = [np.round(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in images.flip(0)]
    result = fid(images, uint8, inception_weights=weight_files["fid"])
    assert result.name == "fid" and result.value == pytest.approx(0.0, abs=1e-6)
    assert result.details == {"n_a": 2, "n_b": 2, "dim": 2048, "features": "Inception-v3 (fid weights), pool3"}


def test_unreadable_weight_files_are_value_errors(tmp_path):
    """What evaluate reports as a one-line --inception-weights error, never a crash."""
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")  # a whole pickled model
    torch.save({"fc.weight": torch.zeros(1008, 3)}, tmp_path / "shapes.pth")
    for name, message in (("notes.txt", "is not a state dict saved by torch.save"),
                          ("model.pth", "a whole pickled model is never loaded"),
                          ("shapes.pth", "does not fit Inception-v3")):
        with pytest.raises(ValueError, match=f"inception_weights: .*{message}"):
            load_inception(tmp_path / name)


class _MeanFeatures(torch.nn.Module):
    """Stands in for Inception: the per-channel means of what it is given, and the batch shapes."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.shapes = []

    def features(self, x):
        self.shapes.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_inception_features_batches_equal_sizes_and_takes_others_one_by_one():
    model = _MeanFeatures()
    same = [np.full((4, 6, 3), v, np.uint8) for v in (0, 51, 102)]
    np.testing.assert_allclose(inception_features(model, same, batch_size=2)[:, 0], [0.0, 0.2, 0.4])
    assert model.shapes == [(2, 3, 4, 6), (1, 3, 4, 6)]
    model.shapes.clear()
    mixed = [np.full((4, 6, 3), 255, np.uint8), np.zeros((5, 5, 3), np.uint8)]
    np.testing.assert_allclose(inception_features(model, mixed)[:, 0], [1.0, 0.0])
    assert model.shapes == [(1, 3, 4, 6), (1, 3, 5, 5)]
