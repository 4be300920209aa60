"""The uniform result type, the 'unavailable, with the reason' path, and QualiCLIP's gate: it runs
only with pyiqa installed and its weights on disk, and otherwise says how to provide them."""

import hashlib
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from reggan.metrics import quality  # noqa: E402
from reggan.metrics._assets import missing_distributions, package_file, require_module  # noqa: E402
from reggan.metrics.result import MetricResult, MetricUnavailable, measure  # noqa: E402


def test_result_has_a_value_or_a_reason():
    ok = MetricResult("ecs_fer", 0.5, {"n": 3, "accuracy": 0.25})
    assert ok.available and str(ok) == "ecs_fer = 0.5000 (n 3, accuracy 0.2500)"
    assert json.loads(json.dumps(ok.to_dict())) == {
        "name": "ecs_fer", "available": True, "value": 0.5, "details": {"n": 3, "accuracy": 0.25}}
    off = MetricResult.unavailable("fid", "no weights")
    assert not off.available and off.value is None and str(off) == "fid: unavailable (no weights)"
    assert off.to_dict()["reason"] == "no weights"
    with pytest.raises(ValueError, match="exactly one of value and reason"):
        MetricResult("x")
    with pytest.raises(ValueError, match="exactly one of value and reason"):
        MetricResult("x", 1.0, reason="both")
    with pytest.raises(ValueError, match="non-finite value nan"):
        MetricResult("x", float("nan"))
    with pytest.raises(TypeError):
        MetricResult("x", 1.0, {"array": np.zeros(2)}).to_dict()


def test_measure_turns_only_unavailability_into_a_result():
    def unavailable():
        raise MetricUnavailable("needs the moon")

    def broken():
        raise ValueError("bad input")

    assert measure("m", unavailable) == MetricResult.unavailable("m", "needs the moon")
    assert measure("m", lambda x: MetricResult("m", x), 2.0).value == 2.0
    with pytest.raises(ValueError, match="bad input"):
        measure("m", broken)


def test_missing_packages_say_how_to_install():
    assert missing_distributions("pip", "no-such-package-reggan") == ["no-such-package-reggan"]
    with pytest.raises(MetricUnavailable, match=r"needs x/y.dat from the 'no-such-package-reggan' "
                                                r"package, which is not installed; install the metrics extra: pip install"):
        package_file("no-such-package-reggan", "x/y.dat", "Testing")
    with pytest.raises(MetricUnavailable, match="which the installed 'pip' .* does not have"):
        package_file("pip", "pip/no_such_file.dat", "Testing")
    with pytest.raises(MetricUnavailable, match="Testing needs the 'no-such-package-reggan' package"):
        require_module("no_such_module", "no-such-package-reggan", "Testing")


def _fake_pyiqa(root, monkeypatch):
    """An installed package named pyiqa whose 'qualiclip' scores an image by its mean brightness."""
    (root / "pyiqa").mkdir(parents=True)
    (root / "pyiqa" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        calls = []
        def create_metric(name, device=None, as_loss=False):
            calls.append((name, str(device), as_loss))
            return lambda x: x.mean(dim=(1, 2, 3), keepdim=True)[:, :, 0]
    '''))
    (root / "pyiqa-0.1.16.dist-info").mkdir()
    (root / "pyiqa-0.1.16.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pyiqa\nVersion: 0.1.16\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "pyiqa", raising=False)


def test_qualiclip_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = measure("qualiclip", quality.qualiclip, torch.rand(1, 3, 8, 8))
    assert not result.available and result.value is None
    hub = tmp_path / "torch" / "hub"
    assert str(hub / "clip" / "RN50.pt") in result.reason and str(hub / "pyiqa" / "QualiCLIP.pth") in result.reason
    assert "never downloads" in result.reason and "pyiqa.create_metric('qualiclip')" in result.reason
    if missing_distributions("pyiqa"):
        assert "pyiqa is not installed" in result.reason


def test_qualiclip_with_corrupt_clip_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for rel in ("hub/clip/RN50.pt", "hub/pyiqa/QualiCLIP.pth"):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_bytes(b"not weights")
    result = measure("qualiclip", quality.qualiclip, torch.rand(1, 3, 8, 8))
    assert not result.available and "RN50.pt is corrupt" in result.reason


def test_qualiclip_runs_through_pyiqa_when_everything_is_there(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = b"fake clip weights"
    for rel, data in (("clip/RN50.pt", weights), ("pyiqa/QualiCLIP.pth", b"fake")):
        path = tmp_path / "torch" / "hub" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    monkeypatch.setattr(quality, "CLIP_RN50", ("clip/RN50.pt", hashlib.sha256(weights).hexdigest()))
    _fake_pyiqa(tmp_path / "site", monkeypatch)
    images = [np.full((4, 6, 3), 51, np.uint8), np.full((5, 5, 3), 153, np.uint8)]
    result = quality.qualiclip(images)
    assert result.name == "qualiclip" and result.value == pytest.approx(0.4) and result.details == {"n": 2}
    assert sys.modules["pyiqa"].calls == [("qualiclip", "cpu", False)]
