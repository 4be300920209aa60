"""ECS: the PyTorch port of fer's mini-Xception against the Keras model's recorded outputs, the
face preprocessing, the trainable classifier and the score itself."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from conftest import skip_if_missing  # noqa: E402
from reggan.metrics.expression import (FER_LABELS, ExpressionClassifier, MiniXception,  # noqa: E402
                                       expression_features, expression_score,
                                       train_expression_classifier)
from reggan.metrics.images import as_rgb_uint8, crop_square  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "metrics")
EXTRA = ("fer", "h5py", "dlib-bin")


@pytest.fixture(scope="module")
def fer():
    skip_if_missing(*EXTRA)
    return ExpressionClassifier.from_fer()


@pytest.fixture(scope="module")
def keras_reference():
    return np.load(os.path.join(FIXTURES, "fer_keras_reference.npz"))


def test_port_matches_keras_logits_probabilities_and_features(fer, keras_reference):
    gray = keras_reference["gray"]
    x = torch.from_numpy((gray.astype(np.float32) / 255.0 - 0.5) * 2.0)[:, None]
    with torch.no_grad():
        logits, features = fer(x)
    np.testing.assert_allclose(logits.numpy(), keras_reference["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits.softmax(1).numpy(), keras_reference["probabilities"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(features.numpy(), keras_reference["features"], atol=1e-4, rtol=0)


def test_predict_on_aligned_64px_faces_reproduces_fers_preprocessing(fer, keras_reference):
    # A 64x64 gray image taken whole is exactly what fer feeds its network.
    prediction = fer.predict(keras_reference["gray"], faces="full")
    np.testing.assert_allclose(prediction.probabilities.numpy(), keras_reference["probabilities"], atol=1e-4, rtol=0)
    assert prediction.detected.all()
    # The recorded faces: astronaut (smiling) and its mirror, Grace Hopper and her mirror.
    assert [FER_LABELS[i] for i in prediction.probabilities[:4].argmax(1)] == ["happy", "happy", "neutral", "neutral"]


def test_loader_rejects_a_file_that_is_not_fers_model(tmp_path):
    skip_if_missing("h5py")
    import h5py

    path = tmp_path / "other.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = '{"config": {"layers": []}}'
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [b"conv2d_1"]
        c = g.create_group("conv2d_1")
        c.attrs["weight_names"] = [b"conv2d_1/kernel:0"]
        c["conv2d_1/kernel:0"] = np.zeros((5, 5, 1, 8), np.float32)
    with pytest.raises(ValueError, match="conv2d_1: weight of shape"):
        MiniXception().load_keras_hdf5(path)


def test_ecs_on_detected_real_faces(fer):
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    astronaut = skimage.data.astronaut()
    hopper = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    result = expression_score(fer, [astronaut, hopper], ["happy", "neutral"], faces="detect")
    assert result.name == "ecs_fer" and result.available
    assert result.details["detection_rate"] == 1.0
    assert result.details["accuracy"] == 1.0
    assert result.value > 0.8
    assert result.details["per_expression"]["happy"]["n"] == 1
    # Wrong targets: the score is the (small) probability of the wrong expression.
    wrong = expression_score(fer, [astronaut], ["sad"], faces="detect")
    assert wrong.value < 0.05 and wrong.details["accuracy"] == 0.0


def test_ecs_missing_faces_full_frame_or_skip(fer):
    blank = np.full((1, 80, 80, 3), 128, np.uint8)
    whole = expression_score(fer, blank, ["neutral"], faces="detect")
    assert whole.details["detection_rate"] == 0.0 and whole.details["n"] == 1
    full = expression_score(fer, blank, ["neutral"], faces="full")
    assert whole.value == pytest.approx(full.value)
    skipped = expression_score(fer, blank, ["neutral"], faces="detect", missing="skip")
    assert not skipped.available and "no face was detected" in skipped.reason


def test_ecs_bad_input(fer):
    image = np.zeros((1, 64, 64), np.uint8)
    with pytest.raises(ValueError, match="'joyful' is not an expression of the fer classifier; valid: angry"):
        expression_score(fer, image, ["joyful"])
    with pytest.raises(ValueError, match="got 1 images but 2 targets"):
        expression_score(fer, image, ["happy", "sad"])
    with pytest.raises(ValueError, match="faces must be 'detect'"):
        expression_score(fer, image, ["happy"], faces="aligned")
    with pytest.raises(ValueError, match=r"images\[0\]: float images must be in \[0, 1\]"):
        expression_score(fer, torch.full((1, 3, 8, 8), 200.0), ["happy"])


def test_crop_square_geometry():
    image = np.arange(20 * 30, dtype=np.float64).reshape(20, 30) * 0.4
    inside = crop_square(image, (5, 4, 15, 14), margin=0.0, size=10)
    np.testing.assert_allclose(inside[0].numpy(), image[4:14, 5:15] / 255, rtol=1e-6)
    # A box hanging over the top-left corner: the outside is the mean of the bottom two rows.
    over = crop_square(image, (-3, -2, 3, 4), margin=0.0, size=6)[0].numpy() * 255
    fill = image[18:].mean()
    np.testing.assert_allclose(over[:2], fill, rtol=1e-5)
    np.testing.assert_allclose(over[:, :3], fill, rtol=1e-5)
    np.testing.assert_allclose(over[2:, 3:], image[:4, :3], rtol=1e-5)
    # A wide box is squared on its longer side, centred, with the margin on each side.
    wide = crop_square(np.zeros((40, 40)), (10, 18, 30, 22), margin=0.5, size=40)
    assert wide.shape == (1, 40, 40)


def test_images_are_normalized_to_rgb_uint8():
    floats = torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2)
    rgb = as_rgb_uint8(floats)[0]
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == [[0, 128], [255, 255]]
    assert as_rgb_uint8(torch.zeros(1, 4, 3, 5))[0].shape == (3, 5, 3)  # alpha dropped
    assert np.array_equal(as_rgb_uint8(floats.bfloat16())[0], rgb)  # numpy has no bfloat16
    assert as_rgb_uint8([np.zeros((3, 5), np.uint8)])[0].shape == (3, 5, 3)  # gray repeated
    with pytest.raises(ValueError, match="images: expected a tensor"):
        as_rgb_uint8(torch.zeros(3, 8, 8))


def _cartoon_faces(expressions, count, seed):
    """Gray 64x64 line-drawn faces whose only class cue is the mouth: a smile, a frown or an open
    'o'; position, size, contrast and noise vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    images, labels = [], []
    for i in range(count):
        label = expressions[i % len(expressions)]
        cx, cy = 32 + rng.uniform(-3, 3), 32 + rng.uniform(-3, 3)
        r = rng.uniform(20, 25)
        face = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2, 0.75, 0.25)
        for ex in (-0.4, 0.4):
            face[(xx - cx - ex * r) ** 2 + (yy - cy + 0.3 * r) ** 2 < (0.1 * r) ** 2] = 0.1
        mx, my, w = xx - cx, yy - cy - 0.45 * r, 0.45 * r
        if label == "surprised":
            mouth = np.abs(np.hypot(mx, my) - 0.18 * r) < 1.3
        else:
            bend = -0.25 if label == "happy" else 0.25  # image rows grow downwards
            mouth = (np.abs(mx) < w) & (np.abs(my - bend * r * ((mx / w) ** 2 - 0.5)) < 1.3)
        face[mouth] = 0.1
        face = face * rng.uniform(0.7, 1.0) + rng.normal(0, 0.03, face.shape)
        images.append(np.clip(face, 0, 1).astype(np.float32))
        labels.append(label)
    return torch.from_numpy(np.stack(images))[:, None], labels


def test_trained_classifier_learns_expressions_and_round_trips(tmp_path):
    names = ("happy", "sad", "surprised")
    train_x, train_y = _cartoon_faces(names, 90, seed=0)
    test_x, test_y = _cartoon_faces(names, 60, seed=1)
    history = []
    classifier = train_expression_classifier(train_x, train_y, names, epochs=8, batch_size=16,
                                             width=16, seed=3, progress=lambda *a: history.append(a))
    assert len(history) == 8 and history[-1][1] < history[0][1]
    result = expression_score(classifier, test_x, test_y)
    assert result.name == "ecs_builtin"
    assert result.details["accuracy"] > 0.9 and result.value > 0.6, result  # chance: 1/3
    assert set(result.details["per_expression"]) == set(names)
    path = tmp_path / "expr.safetensors"
    classifier.save(path)
    loaded = ExpressionClassifier.load(path)
    assert loaded.labels == names and loaded.name == "builtin"
    np.testing.assert_array_equal(expression_features(loaded, test_x), expression_features(classifier, test_x))
    again = train_expression_classifier(train_x[:32], train_y[:32], names, epochs=1, width=4, seed=3)
    once_more = train_expression_classifier(train_x[:32], train_y[:32], names, epochs=1, width=4, seed=3)
    for a, b in zip(again.state_dict().values(), once_more.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels: 'angry' is not an expression"):
        train_expression_classifier(train_x[:1], ["angry"], names)
