"""FSS: dlib descriptors of the same face agree more than those of different faces. The faces:
scikit-image's astronaut.png (Eileen Collins) against its mirror image, and against matplotlib's
sample photo grace_hopper.jpg (a different person)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from conftest import skip_if_missing  # noqa: E402
from reggan.metrics.frechet import fd_face  # noqa: E402
from reggan.metrics.identity import FaceDescriber, cosine_similarity, face_similarity_score  # noqa: E402


@pytest.fixture(scope="module")
def describer():
    skip_if_missing("dlib-bin", "face_recognition_models")
    return FaceDescriber()


@pytest.fixture(scope="module")
def faces():
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    astronaut = skimage.data.astronaut()
    hopper = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    return {"astronaut": astronaut, "mirror": np.ascontiguousarray(astronaut[:, ::-1]), "hopper": hopper}


def test_same_face_scores_higher_than_a_different_face(describer, faces):
    same = face_similarity_score([faces["mirror"]], [faces["astronaut"]], describer)
    different = face_similarity_score([faces["hopper"]], [faces["astronaut"]], describer)
    assert same.name == "fss" and same.details["detection_rate"] == 1.0
    assert same.value > different.value
    # dlib's own convention: under 0.6 apart is the same person (the issue measured 0.19 here).
    assert same.details["mean_distance"] < 0.3 and same.details["same_person_rate"] == 1.0
    assert different.details["mean_distance"] > 0.6 and different.details["same_person_rate"] == 0.0
    identical = face_similarity_score([faces["astronaut"]], [faces["astronaut"]], describer)
    assert identical.value == pytest.approx(1.0, abs=1e-12)


def test_pairs_without_a_face(describer, faces):
    blank = np.full((200, 200, 3), 90, np.uint8)
    outputs = [faces["mirror"], blank]
    inputs = [faces["astronaut"], faces["astronaut"]]
    whole = face_similarity_score(outputs, inputs, describer)
    assert whole.details["detection_rate"] == 0.5 and whole.details["n"] == 2
    skipped = face_similarity_score(outputs, inputs, describer, missing="skip")
    assert skipped.details["n"] == 1
    only_pair = face_similarity_score([faces["mirror"]], [faces["astronaut"]], describer)
    assert skipped.value == pytest.approx(only_pair.value)
    none = face_similarity_score([blank], [blank], describer, missing="skip")
    assert not none.available and "no pair had a face detected" in none.reason


def test_bad_input(describer, faces):
    with pytest.raises(ValueError, match="got 2 outputs but 1 inputs"):
        face_similarity_score([faces["mirror"]] * 2, [faces["astronaut"]], describer)
    with pytest.raises(ValueError, match="missing must be 'full_frame'"):
        face_similarity_score([faces["mirror"]], [faces["astronaut"]], describer, missing="drop")


def test_fd_face_separates_people(describer, faces):
    # Small shifted crops of each photo give a spread of descriptors per person.
    def crops(image, box):
        left, top, right, bottom = box
        return [image[top + dy:bottom + dy, left + dx:right + dx] for dy in (-8, 0, 8) for dx in (-8, 0, 8)]

    astronauts = crops(faces["astronaut"], (140, 40, 310, 210))
    hoppers = crops(faces["hopper"], (130, 100, 410, 380))
    between = fd_face(astronauts, hoppers, describer)
    within = fd_face(astronauts[::2], astronauts[1::2], describer)
    assert between.name == "fd_face" and between.details["dim"] == 128
    assert between.value > 5 * within.value


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [0.0, 1.0])
