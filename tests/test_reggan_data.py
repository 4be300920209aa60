"""reggan's data side: expression names, dataset layouts, image loading, the built-in
generator, and the config."""

import csv
import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from reggan import config as configs
from reggan import synthetic
from reggan.data import load_paired, parse_flat_name, scan
from reggan.errors import RegganError
from reggan.expressions import DEFAULT_EXPRESSIONS, known_expressions, normalize, resolve

VOCAB = list(DEFAULT_EXPRESSIONS)
TARGETS = VOCAB[1:]


def face(seed, size=20, mode="RGB"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


# -- expressions -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, canonical", [
    ("Happy", "happy"), ("happiness", "happy"), ("SURPRISE", "surprised"), ("fear", "fearful"),
    ("HappilySurprised", "happily_surprised"), ("happily surprised", "happily_surprised"),
    ("Sadly-Angry", "sadly_angry"), ("AN", "angry"), ("awed", "awed"),
])
def test_normalize(raw, canonical):
    assert normalize(raw) == canonical


def test_resolve_rejects_unknown_names_listing_valid_ones():
    assert resolve(["Happiness", "sad"], VOCAB) == ["happy", "sad"]
    with pytest.raises(RegganError, match="unknown expression 'joyful'.*neutral, happy, sad"):
        resolve(["joyful"], VOCAB)


@pytest.mark.parametrize("stem, parsed", [
    ("S001_happy", ("S001", "happy")),
    ("S001-HappilySurprised", ("S001", "happily_surprised")),
    ("subj_12_happily_disgusted", ("subj_12", "happily_disgusted")),
    ("012_03", ("012", "sad")),  # CFEE numeric category codes
    ("happy_S001", ("S001", "happy")),
    ("S001_smirk", None),
    ("happy", None),
])
def test_parse_flat_name(stem, parsed):
    assert parse_flat_name(stem, known_expressions(VOCAB)) == parsed


# -- layouts -----------------------------------------------------------------------------------


def write_folders(root, subjects=("a", "b"), expressions=("neutral", "happy", "sad")):
    for s, subject in enumerate(subjects):
        (root / subject).mkdir(parents=True)
        for e, expression in enumerate(expressions):
            face(10 * s + e).save(root / subject / f"{expression}.png")


def test_folder_layout(tmp_path):
    write_folders(tmp_path)
    data = load_paired("t", tmp_path, "auto", VOCAB, "neutral", TARGETS, 16, strict=True)
    assert data.subjects == ["a", "b"]
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8
    # Pairs: (neutral of a, happy of a), (neutral of a, sad of a), ... with target indices.
    assert data.pairs.tolist() == [[0, 1, 0], [0, 2, 1], [3, 4, 0], [3, 5, 1]]
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    source, target, index, label = data.batch(torch.tensor([1, 2]))
    assert source.dtype == torch.float32 and float(source.max()) <= 1
    expected = np.array(face(10 + 1).resize((16, 16), Image.LANCZOS))
    assert torch.equal(target[1], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
    assert index.tolist() == [1, 0] and label.tolist() == [2, 1]


def test_flat_layout_with_cfee_names(tmp_path):
    for name, seed in (("S01_neutral", 0), ("S01_HappilySurprised", 1), ("S01_happy", 2),
                       ("S02_01", 3), ("S02_02", 4)):
        face(seed).save(tmp_path / f"{name}.jpg")
    vocab = VOCAB + ["happily_surprised"]
    records = scan(tmp_path, "auto", vocab, strict=True)
    assert sorted((r.subject, r.expression) for r in records) == [
        ("S01", "happily_surprised"), ("S01", "happy"), ("S01", "neutral"),
        ("S02", "happy"), ("S02", "neutral")]
    # Compound names outside the vocabulary are ignored, not errors.
    assert len(scan(tmp_path, "flat", VOCAB, strict=True)) == 4


def test_manifest_layout(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [("subject", "expression", "path")]
    for i, (subject, expression) in enumerate([("x", "neutral"), ("x", "Anger"), ("y", "neutral"),
                                               ("y", "fear")]):
        face(i).save(tmp_path / "img" / f"{i}.png")
        rows.append((subject, expression, f"img/{i}.png"))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = load_paired("t", tmp_path / "pairs.csv", "auto", VOCAB, "neutral", TARGETS, 20,
                       strict=True)
    assert data.subjects == ["x", "y"]
    assert [data.targets[i] for i in data.pairs[:, 2].tolist()] == ["angry", "fearful"]


def test_manifest_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("subject,path\na,b.png\n")
    with pytest.raises(RegganError, match="lacks the column.*expression"):
        scan(tmp_path / "m.csv", "auto", VOCAB, False)


def test_grayscale_rgba_and_sizes_are_converted(tmp_path):
    (tmp_path / "s").mkdir()
    face(0, 40, "L").save(tmp_path / "s" / "neutral.png")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:12, :, 3] = 255  # opaque red top half, transparent bottom half
    Image.fromarray(rgba).save(tmp_path / "s" / "happy.png")
    data = load_paired("t", tmp_path, "folders", VOCAB, "neutral", TARGETS, 24, strict=True)
    gray, happy = data.images[0], data.images[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert happy[:, 0, 0].tolist() == [200, 0, 0]
    assert happy[:, -1, 0].tolist() == [255, 255, 255]  # transparency over white


def test_corrupt_and_unknown_files_warn_or_fail_under_strict(tmp_path, caplog):
    write_folders(tmp_path)
    (tmp_path / "a" / "sad.png").write_bytes(b"not an image")
    face(5).save(tmp_path / "b" / "smirk.png")
    with caplog.at_level(logging.WARNING, logger="reggan"):
        data = load_paired("t", tmp_path, "folders", VOCAB, "neutral", TARGETS, 16,
                           strict=False)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "smirk.png" in messages and "valid expressions are: neutral" in messages
    assert "skipped" in messages
    assert "a/sad.png" in messages and "could not be read" in messages
    assert len(data) == 3  # a: happy; b: happy, sad
    with pytest.raises(RegganError, match="smirk.png.*strict"):
        load_paired("t", tmp_path, "folders", VOCAB, "neutral", TARGETS, 16, strict=True)
    (tmp_path / "b" / "smirk.png").unlink()
    with pytest.raises(RegganError, match="a/sad.png.*strict"):
        load_paired("t", tmp_path, "folders", VOCAB, "neutral", TARGETS, 16, strict=True)


def test_subjects_without_source_are_skipped(tmp_path, caplog):
    write_folders(tmp_path, subjects=("a",))
    write_folders(tmp_path, subjects=("b",), expressions=("happy", "sad"))
    with caplog.at_level(logging.WARNING, logger="reggan"):
        data = load_paired("t", tmp_path, "folders", VOCAB, "neutral", TARGETS, 16, False)
    assert data.subjects == ["a"]
    assert "lack a neutral face" in caplog.text and "b" in caplog.text


def test_bad_dataset_paths(tmp_path):
    with pytest.raises(RegganError, match="does not exist"):
        scan(tmp_path / "nope", "auto", VOCAB, False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegganError, match="has no images"):
        scan(tmp_path / "empty", "auto", VOCAB, False)


# -- the built-in generator --------------------------------------------------------------------


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_builtin_dataset_is_byte_identical_across_runs(tmp_path):
    spec = synthetic.SyntheticSpec(train_identities=3, test_identities=2, size=48)
    synthetic.write_dataset(spec, tmp_path / "one")
    synthetic.write_dataset(spec, tmp_path / "two")
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    # 5 identities x 7 expressions, plus 2 held-out identities x 5 OOD variants x 7.
    assert len(files) == 5 * 7 + 2 * 5 * 7
    assert str(files[0]) == "ood/color_light/id0003/angry.png"


def test_identities_do_not_depend_on_how_many_are_rendered():
    few = synthetic.render_faces(2, 2, size=32)
    many = synthetic.render_faces(0, 5, size=32)
    assert np.array_equal(few, many[:, 2:4])


def test_faces_vary_and_expressions_are_visible():
    images = synthetic.render_faces(0, 12, size=64).astype(np.float64) / 255  # (E, N, H, W, 3)
    neutral = images[0]
    # Identities differ far more than pixel noise.
    assert np.abs(neutral[:, None] - neutral[None]).mean(axis=(2, 3, 4))[~np.eye(12, dtype=bool)].min() > 0.03
    for e, name in enumerate(DEFAULT_EXPRESSIONS[1:], start=1):
        change = np.abs(images[e] - neutral).max(-1)
        # Every expression clearly changes at least 20 of the 4096 pixels of every identity
        # (brows, eyes, mouth are small)...
        assert (change > 0.15).sum(axis=(1, 2)).min() >= 20, name
        # ...and leaves the background and hair above the head alone.
        assert (change[:, :4] > 0.02).sum() == 0, name
    # The mouth opens in surprise: dark pixels appear below the nose.
    mouth = (slice(40, 56), slice(20, 44))
    surprised = images[DEFAULT_EXPRESSIONS.index("surprised")]
    dark_open = (surprised[:, mouth[0], mouth[1]].mean(-1) < 0.25).sum(axis=(1, 2))
    dark_closed = (neutral[:, mouth[0], mouth[1]].mean(-1) < 0.25).sum(axis=(1, 2))
    assert (dark_open >= dark_closed + 10).all()


def test_ensure_dataset_caches(tmp_path):
    spec = synthetic.SyntheticSpec(train_identities=2, test_identities=1, size=32,
                                   ood_variants=("sketch",))
    messages = []
    root = synthetic.ensure_dataset(spec, tmp_path, log=messages.append)
    assert (root / "spec.json").is_file() and len(messages) == 1
    assert synthetic.ensure_dataset(spec, tmp_path, log=messages.append) == root
    assert len(messages) == 1  # second call renders nothing
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no scratch left


# -- config ------------------------------------------------------------------------------------


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  steps: 7\nmodel:\n  mode: regression\n")
    config = configs.build(str(tmp_path / "c.yaml"), ["train.lr_g=1e-3",
                                                     "data.expressions=[neutral, happy, sad]"])
    assert config.train.steps == 7 and config.model.mode == "regression"
    assert config.train.lr_g == 1e-3 and config.targets() == ["happy", "sad"]
    (tmp_path / "c.json").write_text('{"fit": {"select": "gcv"}}')
    assert configs.build(str(tmp_path / "c.json")).fit.select == "gcv"


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key train.stepz; valid keys of train: steps"),
    ("model.mode=gan", "model.mode must be one of reggan, regression, refinement"),
    ("train.steps=-1", "train.steps must be >= 0"),
    ("train.steps=abc", "train.steps must be an integer"),
    ("model.kernel_size=4", "model.kernel_size must be odd"),
    ("data.source=smile", "unknown source expression 'smile'; valid expressions are"),
    ("data.size=100", "data.size \\(100\\) must be a multiple of 8"),
    ("steps=3", "section.key"),
    ("train.seed=99999999999999999999", "train.seed must be below 2\\*\\*63"),
    (f"train.seed={10 ** 400}", "train.seed must be below"),
    ("data.path=''", "data.path must be 'builtin', a dataset folder or a CSV manifest"),
])
def test_config_errors(override, message):
    with pytest.raises(RegganError, match=message):
        configs.build(None, [override])
