"""`reggan evaluate` end to end on tiny trained runs: the ablation columns (given, derived from
the RegGAN run, absent with a reason), every metric either finite or unavailable with its
reason, the JSON/Markdown/grid outputs, the cached expression classifier, unpaired faces, and
bad arguments as one-line errors."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from reggan import classifier as classifiers
from reggan.evaluate import INPUT, METRICS, REFINEMENT, REGGAN, REGRESSION, TARGET, evaluate
from reggan.metrics._assets import missing_distributions
from reggan.train import run
from test_reggan_app import TINY_ARGS, assert_one_line_error, cache, cli, tiny, write_faces  # noqa: F401

SPLITS = ["heldout", "ood/color_light", "ood/noise_jpeg", "ood/scale_rotate", "ood/sketch",
          "ood/texture_bg"]
TARGETS = ["happy", "sad", "fearful", "angry", "surprised", "disgusted"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny RegGAN run and a refinement-only run with the same data and training."""
    folder = tmp_path_factory.mktemp("ablations")
    run(tiny(), folder / "reggan", progress=False)
    run(tiny("model.mode=refinement"), folder / "refinement", progress=False)
    return folder


def check_results(report):
    """Each metric is a finite number or unavailable with a reason; never a silent NaN."""
    for split in report["splits"].values():
        for results in split["results"].values():
            for name, result in results.items():
                if result["available"]:
                    assert math.isfinite(result["value"]), name
                else:
                    assert result["value"] is None and result["reason"], name


def test_report_compares_a_run_and_its_ablations(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    # One subject per split keeps dlib's descriptors (0.1 s a face on a CPU) cheap.
    assert cli("evaluate", "--model", runs / "reggan", "--model", runs / "refinement",
               "--out", out, "--max-subjects", 1) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["models"]) == [INPUT, REGRESSION, REFINEMENT, REGGAN, TARGET]
    assert all(m["available"] for m in report["models"].values())
    assert "stage 1 of" in report["models"][REGRESSION]["description"]
    assert list(report["metrics"]) == list(METRICS)
    assert sorted(report["splits"]) == SPLITS
    check_results(report)
    heldout = report["splits"]["heldout"]
    assert heldout["subjects"] == 1 and heldout["cases"] == 6 and heldout["paired"]
    results = heldout["results"]
    # Absent weights or packages: unavailable, with what to do.
    assert "--inception-weights" in results[REGGAN]["fid"]["reason"]
    if not results[REGGAN]["qualiclip"]["available"]:
        assert "QualiCLIP" in results[REGGAN]["qualiclip"]["reason"]
    # The built-in classifier needs nothing beyond torch: always there, per expression.
    ecs = results[REGGAN]["ecs_builtin"]
    assert ecs["available"] and set(ecs["details"]["per_expression"]) == set(TARGETS)
    assert set(results[REGGAN]["l1"]["details"]["per_expression"]) == set(TARGETS)
    # FSS is there exactly when its part of the metrics extra is.
    fss = results[INPUT]["fss"]
    if missing_distributions("dlib-bin", "face_recognition_models"):
        assert not fss["available"] and "install the metrics extra" in fss["reason"]
    else:
        assert fss["available"], fss["reason"]
        assert fss["value"] == pytest.approx(1.0)
        assert 0 <= results[REGGAN]["fss"]["details"]["detection_rate"] <= 1
        assert set(results[REGGAN]["fss"]["details"]["per_expression"]) == set(TARGETS)
    # Four different images per case (the tiny models are too small to rank; the derived
    # column is checked against a fitted run below).
    assert len({results[m]["l1"]["value"] for m in (INPUT, REGRESSION, REFINEMENT, REGGAN)}) == 4
    # The real targets are the reference: ECS of real expressions, no distance to themselves.
    assert results[TARGET]["ecs_builtin"]["available"]
    assert "reference" in results[TARGET]["l1"]["reason"]
    assert "reference" in results[TARGET]["fd_expr_builtin"]["reason"]
    table = (out / "metrics.md").read_text()
    assert ("| metric | input (unchanged) | regression-only | refinement-only | RegGAN | "
            "target (real) |") in table
    assert "| FID ↓ | n/a [" in table and "| ECS (builtin) ↑ |" in table
    assert "## ood/sketch" in table and table.split("# reggan evaluate\n\n")[1] == printed
    grid = np.asarray(Image.open(out / "grid_ood_sketch.png"))
    assert grid.shape[1] == 5 * (32 + 2)  # input | regression | refinement | RegGAN | target


def test_derived_regression_is_the_fitted_regression_and_absences_have_reasons(runs, tmp_path):
    # A plain fit (model.mode is reggan in TINY) makes the regression-only model.
    assert cli("fit", "--out", tmp_path / "fit", "--quiet", *TINY_ARGS) == 0
    metrics = ["l1", "psnr"]
    derived = evaluate([runs / "reggan"], tmp_path / "a", metrics=metrics, max_subjects=1)
    given = evaluate([runs / "reggan", tmp_path / "fit"], tmp_path / "b", metrics=metrics,
                     max_subjects=1)
    for split in SPLITS:
        assert (derived["splits"][split]["results"][REGRESSION] ==
                given["splits"][split]["results"][REGRESSION])
    assert "model.mode=regression" in given["models"][REGRESSION]["description"]
    absent = derived["models"][REFINEMENT]
    assert not absent["available"] and "reggan train --mode refinement" in absent["reason"]
    assert REFINEMENT not in derived["splits"]["heldout"]["results"]
    table = (tmp_path / "a" / "metrics.md").read_text()
    assert "| metric | input (unchanged) | regression-only | RegGAN | target (real) |" in table
    assert "Not compared: **refinement-only**" in table
    grid = np.asarray(Image.open(tmp_path / "a" / "grid_heldout.png"))
    assert grid.shape[1] == 5 * (32 + 2)  # the absent column is left blank

    # A run that fine-tuned its regression (stage 3) has no regression-only model inside.
    run(tiny("train.finetune_regression=true", "train.steps=1"), tmp_path / "joint",
        progress=False)
    joint = evaluate([tmp_path / "joint"], tmp_path / "c", metrics=metrics, max_subjects=1)
    assert "fine-tuned its regression jointly" in joint["models"][REGRESSION]["reason"]


def test_expression_classifier_is_cached_and_can_be_given(runs, tmp_path, cache):
    evaluate([runs / "reggan"], tmp_path / "a", metrics=["ecs_builtin"], max_subjects=1)
    cached = classifiers.cached_path(tiny(), classifiers.ClassifierRecipe())
    assert cached.is_file() and cached.is_relative_to(cache)
    stamp = cached.stat().st_mtime_ns
    first = evaluate([runs / "reggan"], tmp_path / "b", metrics=["ecs_builtin"], max_subjects=1)
    assert cached.stat().st_mtime_ns == stamp  # loaded, not trained again
    given = evaluate([runs / "reggan"], tmp_path / "c", metrics=["ecs_builtin"], max_subjects=1,
                     expression_classifier=cached)
    assert given["splits"] == first["splits"]


def test_a_missing_package_leaves_the_other_metrics_running(runs, tmp_path, monkeypatch):
    from reggan import evaluate as evaluation
    from reggan.metrics import MetricUnavailable

    def no_fer(device):
        raise MetricUnavailable("the FER2013 expression classifier needs fer, not installed")

    monkeypatch.setattr(evaluation, "_fer", no_fer)
    report = evaluate([runs / "reggan"], tmp_path / "e", metrics=["ecs_fer", "fd_expr_fer", "l1"],
                      max_subjects=1)
    check_results(report)
    results = report["splits"]["ood/sketch"]["results"][REGGAN]
    for name in ("ecs_fer", "fd_expr_fer"):
        assert results[name]["reason"] == "the FER2013 expression classifier needs fer, not installed"
    assert results["l1"]["available"]
    assert "n/a [1]" in (tmp_path / "e" / "metrics.md").read_text()


def test_unpaired_faces(runs, tmp_path, capsys):
    write_faces(tmp_path / "faces", count=2)
    assert cli("evaluate", "--model", runs / "reggan", "--faces", tmp_path / "faces", "--out",
               tmp_path / "eval", "--metrics", "ecs_builtin", "l1", "fd_expr_builtin",
               "--quiet") == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    faces = report["splits"]["faces"]
    assert faces["cases"] == 2 * len(TARGETS) and not faces["paired"]
    check_results(report)
    results = faces["results"][REGGAN]
    assert results["ecs_builtin"]["available"]
    for name in ("l1", "fd_expr_builtin"):
        assert "unpaired faces (--faces) do not have" in results[name]["reason"]
    assert TARGET not in faces["results"]
    assert (tmp_path / "eval" / "grid_faces.png").exists()


def test_bad_arguments_are_one_line_errors(runs, tmp_path, capsys):
    model = runs / "reggan"
    assert cli("evaluate", "--model", model, "--out", tmp_path / "e", "--metrics", "fid",
               "fsim") == 1
    assert_one_line_error(capsys, "unknown metric(s) fsim; available: ecs_fer, ecs_builtin")
    assert cli("evaluate", "--model", model, model, "--out", tmp_path / "e") == 1
    assert_one_line_error(capsys, "are both model.mode=reggan runs")
    assert cli("evaluate", "--model", model, "--out", tmp_path / "e", "--inception-weights",
               tmp_path / "none.pth") == 1
    assert_one_line_error(capsys, "--inception-weights", "does not exist")
    (tmp_path / "notes.txt").write_text("not weights")
    assert cli("evaluate", "--model", model, "--out", tmp_path / "e", "--metrics", "fid",
               "--inception-weights", tmp_path / "notes.txt") == 1
    assert_one_line_error(capsys, "--inception-weights", "is not a state dict saved by torch.save")
    assert cli("evaluate", "--model", model, "--out", tmp_path / "e", "--device", "tpu") == 1
    assert_one_line_error(capsys, "--device must be auto, cpu, cuda, cuda:N or N, got 'tpu'")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    assert cli("evaluate", "--model", model, "--out", tmp_path / "e", "--metrics",
               "ecs_builtin", "--expression-classifier", tmp_path / "bad.safetensors") == 1
    assert_one_line_error(capsys, "--expression-classifier", "not an expression classifier")
    run(tiny("data.holdout=0.2", "model.mode=regression"), tmp_path / "other", progress=False)
    assert cli("evaluate", "--model", model, "--model", tmp_path / "other", "--out",
               tmp_path / "e", "--quiet") == 1
    assert_one_line_error(capsys, "trained on other data", "data.holdout is 0.2 there, 0.1 here")
    assert not (tmp_path / "e").exists()
