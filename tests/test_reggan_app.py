"""reggan end to end on tiny settings: training, exact resume, checkpoints, 2-process DDP,
synthesize/evaluate/prepare/demo through the CLI, and bad inputs."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from reggan import config as configs
from reggan.cli import main
from reggan.errors import RegganError
from reggan.metrics.paired import PSNR, SSIM
from reggan.train import load_model, run

MODE = "reggan"
TINY = [
    "data.builtin_identities=6", "data.builtin_test_identities=2", "data.size=32",
    "model.kernel_size=3", "model.gen_width=8", "model.gen_blocks=1", "model.disc_width=8",
    "model.disc_layers=3", "fit.batch_size=5", "train.batch_size=4", "train.steps=4",
    "train.preview_every=2", "train.checkpoint_every=2", f"model.mode={MODE}",
    # Exact resume and the gloo DDP comparison are CPU promises; CUDA has tests of its own below.
    "train.device=cpu",
]
TINY_ARGS = [a for o in TINY for a in ("-o", o)]  # the same as command-line options


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory):
    """Built-in data rendered once per session, in a private cache."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REGGAN_CACHE")
    os.environ["REGGAN_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["REGGAN_CACHE"]
    else:
        os.environ["REGGAN_CACHE"] = old


def tiny(*overrides):
    return configs.build(None, TINY + list(overrides))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    run(tiny(), folder, progress=False)
    return folder


def tensors_of(path):
    return load_file(str(path))


def cli(*args):
    """Run the CLI in-process; returns (exit code, stdout, stderr) via capsys in callers."""
    return main([str(a) for a in args])


# -- training ----------------------------------------------------------------------------------


def test_tiny_run_writes_everything(trained):
    for name in ("config.json", "model.safetensors", "model.json", "losses.png", "losses.json",
                 "preview.png", "previews/step_0000002.png", "previews/step_0000004.png",
                 "checkpoints/step_0000002.safetensors", "checkpoints/step_0000004.json",
                 ".reggan-output"):
        assert (trained / name).exists(), name
    if MODE != "refinement":
        assert json.loads((trained / "stage1.json").read_text())["lambda"]["happy"] == 0.4
    history = json.loads((trained / "losses.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert json.loads((trained / "config.json").read_text()) == tiny().to_dict()
    model, config = load_model(trained)
    assert config.to_dict() == tiny().to_dict()
    assert model.targets == ["happy", "sad", "fearful", "angry", "surprised", "disgusted"]
    preview = np.asarray(Image.open(trained / "preview.png"))
    assert preview.shape[1] == 4 * (32 + 2)  # input | regression | refined | target


def test_training_is_deterministic_and_resume_is_exact(tmp_path, trained):
    run(tiny("train.steps=2"), tmp_path / "b", progress=False)
    run(tiny(), tmp_path / "b", resume=True, progress=False)
    a = tensors_of(trained / "checkpoints" / "step_0000004.safetensors")
    b = tensors_of(tmp_path / "b" / "checkpoints" / "step_0000004.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (json.loads((trained / "losses.json").read_text()) ==
            json.loads((tmp_path / "b" / "losses.json").read_text()))


def test_resume_refuses_a_different_model(trained, tmp_path):
    with pytest.raises(RegganError, match="model.gen_width is 8 there, 16 here"):
        run(tiny("model.gen_width=16"), trained, resume=True, progress=False)
    with pytest.raises(RegganError, match="cannot resume: .* does not exist"):
        run(tiny(), tmp_path / "none", resume=True, progress=False)


def test_checkpoint_from_another_config_is_a_clear_error(trained, tmp_path):
    with pytest.raises(RegganError, match="another config: model.kernel_size is 3 there, 5 here"):
        load_model(trained, config=tiny("model.kernel_size=5"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RegganError, match="not a reggan checkpoint"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(RegganError, match="not a readable safetensors checkpoint"):
        load_model(tmp_path / "broken.safetensors")


def test_existing_run_is_not_overwritten(trained):
    before = (trained / "model.safetensors").read_bytes()
    with pytest.raises(RegganError, match="already exists and is not empty; pass --overwrite"):
        run(tiny(), trained, progress=False)
    assert (trained / "model.safetensors").read_bytes() == before


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(out, cache, nproc, *overrides):
    """`reggan train` under torchrun with nproc processes and the tiny settings."""
    arguments = [a for o in TINY + list(overrides) for a in ("-o", o)]
    env = dict(os.environ, REGGAN_CACHE=str(cache), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "reggan", "train",
         "--out", str(out), "--quiet", *arguments],
        env=env, capture_output=True, text=True, timeout=300)


def test_ddp_two_processes_match_one(tmp_path, trained, cache):
    """torchrun with 2 gloo processes, each on half of every batch (and half of the stage-1
    statistics, all-reduced), trains the model one process trains on whole batches."""
    result = torchrun_train(tmp_path / "ddp", cache, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    single = tensors_of(trained / "model.safetensors")
    ddp = tensors_of(tmp_path / "ddp" / "model.safetensors")
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


# -- CUDA, wherever a GPU is -----------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def regression_tensors(path):
    tensors = tensors_of(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.regression.")}


@needs_cuda
def test_cuda_training_with_amp(tmp_path, trained):
    """On CUDA under autocast: stage 1 fits the regression the CPU fits (float64 statistics on
    both), the GAN trains to finite losses, and the checkpoint loads on the CPU."""
    run(tiny("train.device=cuda", "train.amp=true"), tmp_path / "gpu", progress=False)
    history = json.loads((tmp_path / "gpu" / "losses.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    cpu = regression_tensors(trained / "model.safetensors")
    gpu = regression_tensors(tmp_path / "gpu" / "model.safetensors")
    assert cpu and cpu.keys() == gpu.keys()
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-5, atol=1e-6, msg=key)
    model, _ = load_model(tmp_path / "gpu")
    assert next(model.parameters()).device.type == "cpu"


@needs_cuda
def test_cuda_synthesize_matches_cpu(trained, tmp_path):
    write_faces(tmp_path / "in", count=2)
    for device in ("cpu", "cuda"):
        assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
                   tmp_path / device, "--expressions", "happy", "--device", device,
                   "--quiet") == 0
    for face in ("face0", "face1"):
        cpu = np.asarray(Image.open(tmp_path / "cpu" / face / "happy.png"), dtype=np.int16)
        gpu = np.asarray(Image.open(tmp_path / "cuda" / face / "happy.png"), dtype=np.int16)
        # cuDNN may convolve in TF32: a few 8-bit levels apart, where a wrong kernel is ~100.
        assert np.abs(cpu - gpu).max() <= 3, face


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl DDP needs two GPUs")
def test_nccl_two_processes_train(tmp_path, cache):
    """torchrun with 2 nccl processes on 2 GPUs; the stage-1 statistics are all-reduced over
    nccl, so the regression equals the single-GPU fit."""
    result = torchrun_train(tmp_path / "nccl", cache, 2, "train.device=cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    run(tiny("train.device=cuda"), tmp_path / "one", progress=False)
    one = regression_tensors(tmp_path / "one" / "model.safetensors")
    two = regression_tensors(tmp_path / "nccl" / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


# -- CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, words", [
    ([], ["demo", "prepare", "fit", "train", "synthesize", "evaluate"]),
    (["demo"], ["--out", "--overwrite", "train.steps", "builtin", "--refinement-run",
                # every setting the demo changes
                "model.gen_width=16", "train.steps=300", "train.preview_every=100",
                "train.checkpoint_every=300"]),
    (["prepare"], ["--detector", "opencv", "skimage", "--size"]),
    (["fit"], ["fit.select", "gcv", "fit.lam = 0.4", "manifest"]),
    (["train"], ["--resume", "--stage1", "torchrun", "train.amp"]),
    (["synthesize"], ["--expressions", "--batch-size", "--device", "--input"]),
    (["evaluate"], ["--metrics", "--data", "--faces", "held-out", "refinement-only",
                    "--expression-classifier", "--inception-weights", "ecs_fer", "qualiclip",
                    "fd_face", "lower is better"]),
])
def test_help_is_complete(command, words, capsys):
    with pytest.raises(SystemExit) as exit:
        cli(*command, "--help")
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text, word


def test_console_entry_point():
    result = subprocess.run([sys.executable, "-m", "reggan", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("reggan ")


def write_faces(folder, count=3, size=32, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size + 8 * i, size, 3), np.uint8)).save(
            folder / f"face{i}.png")


def assert_one_line_error(capsys, *needles):
    """Besides log lines (INFO/WARNING), stderr holds one error line."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if not l.startswith(("INFO: ", "WARNING: "))]
    assert len(lines) == 1 and "Traceback" not in err and "error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], err


def test_synthesize(trained, tmp_path, capsys):
    write_faces(tmp_path / "in")
    (tmp_path / "in" / "bad.png").write_bytes(b"corrupt")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
               tmp_path / "out", "--expressions", "Happiness", "sad", "--quiet") == 0
    assert "bad.png" in capsys.readouterr().err  # skipped with a warning that names it
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "face1").iterdir()) == ["happy.png", "input.png",
                                                                 "sad.png"]
    assert Image.open(out / "face1" / "happy.png").size == (32, 32)  # resized to the model
    assert (out / "grid.png").exists() and not (out / "bad").exists()
    umask = os.umask(0)
    os.umask(umask)
    # Written through scratch files and folders, but with the modes open() and mkdir() give.
    assert (out / "grid.png").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask

    # Bad inputs: one line, nothing written.
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
               tmp_path / "out2", "--expressions", "smirk") == 1
    assert_one_line_error(capsys, "unknown target expression 'smirk'", "happy, sad, fearful")
    assert not (tmp_path / "out2").exists()
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out", out) == 1
    assert_one_line_error(capsys, "already exists", "--overwrite")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
               tmp_path / "out3", "--strict") == 1
    assert_one_line_error(capsys, "bad.png", "strict")
    assert not (tmp_path / "out3").exists()
    assert cli("synthesize", "--model", tmp_path / "nothing", "--input", tmp_path / "in",
               "--out", tmp_path / "out4") == 1
    assert_one_line_error(capsys, "does not exist")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
               tmp_path / "in" / "face0.png" / "out") == 1
    assert_one_line_error(capsys, "cannot write output folder", "is a file, not a folder")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
               tmp_path / "out5", "--device", "tpu") == 1
    assert_one_line_error(capsys, "--device must be auto, cpu, cuda, cuda:N or N, got 'tpu'")
    (tmp_path / "in" / "bad.png").unlink()
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out", out,
               "--overwrite", "--quiet") == 0
    assert sorted(p.name for p in (out / "face0").iterdir())[0] == "angry.png"


def test_overwrite_never_deletes_foreign_folders(trained, tmp_path, capsys):
    write_faces(tmp_path / "in", count=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out", mine,
               "--overwrite") == 1
    assert_one_line_error(capsys, "not written by reggan")
    assert (mine / "thesis.txt").read_text() == "precious"


def test_evaluate(trained, tmp_path, capsys):
    # The paired metrics only; tests/test_reggan_evaluate.py covers the whole report.
    assert cli("evaluate", "--model", trained, "--out", tmp_path / "eval", "--metrics", "l1",
               "psnr", "ssim") == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sorted(report["splits"]) == ["heldout", "ood/color_light", "ood/noise_jpeg",
                                        "ood/scale_rotate", "ood/sketch", "ood/texture_bg"]
    results = report["splits"]["heldout"]["results"]
    assert "input (unchanged)" in results and "RegGAN" in results
    assert ("regression-only" in results) == (MODE == "reggan")
    l1 = results["RegGAN"]["l1"]
    assert set(l1["details"]["per_expression"]) == {"happy", "sad", "fearful", "angry",
                                                    "surprised", "disgusted"}
    assert set(results["RegGAN"]) == {"l1", "psnr", "ssim"}
    assert "| L1 ↓ |" in capsys.readouterr().out
    assert (tmp_path / "eval" / "grid_ood_sketch.png").exists()


def test_fit_then_train_from_stage1(tmp_path, capsys):
    overrides = [a for o in TINY for a in ("-o", o)]
    assert cli("fit", "--out", tmp_path / "fit", "--quiet", "--mode", "regression",
               *overrides) == 0
    assert cli("train", "--out", tmp_path / "t", "--quiet", "--stage1", tmp_path / "fit",
               "--steps", 1, *overrides) == 0
    fitted, _ = load_model(tmp_path / "fit")
    trained, _ = load_model(tmp_path / "t")
    for a, b in zip(fitted.regression.parameters(), trained.regression.parameters()):
        assert torch.equal(a, b)
    assert cli("train", "--out", tmp_path / "t2", "--stage1", tmp_path / "fit",
               *overrides, "-o", "model.kernel_size=5") == 1
    assert_one_line_error(capsys, "another config", "model.kernel_size is 3 there, 5 here")


def tiny_model_regression():
    from reggan.train import build_model

    return build_model(tiny()).regression.state_dict()


def test_stage1_gcv_and_gradient_options(tmp_path, trained):
    run(tiny("model.mode=regression", "fit.select=gcv", "fit.lam_candidates=[0.001, 1e3]"),
        tmp_path / "gcv", progress=False)
    chosen = json.loads((tmp_path / "gcv" / "stage1.json").read_text())["lambda"]
    # With 12 samples (6 identities, mirrored) for 10 unknowns per pixel, a huge lambda that
    # shrinks everything to zero cannot win.
    assert set(chosen.values()) == {0.001}
    run(tiny("model.mode=regression", "fit.method=gradient", "fit.gradient_steps=60"),
        tmp_path / "gradient", progress=False)
    # Gradient descent on the ridge loss heads for the closed-form solution.
    closed = load_model(trained)[0].regression.state_dict()
    descended = load_model(tmp_path / "gradient")[0].regression.state_dict()
    start = tiny_model_regression()
    for key in closed:
        assert (descended[key] - closed[key]).norm() < 0.7 * (start[key] - closed[key]).norm()


def test_stage3_finetunes_the_regression_through_the_kernels(tmp_path, trained):
    run(tiny("train.finetune_regression=true", "train.lr_regression=1e-3", "train.steps=2"),
        tmp_path / "joint", progress=False)
    fitted = load_model(trained)[0].regression.state_dict()
    joint = load_model(tmp_path / "joint")[0].regression.state_dict()
    moved = {k for k in fitted if not torch.equal(fitted[k], joint[k])}
    # The layers of the expressions in the 2 batches were trained, weights and biases.
    layers = {k.rsplit(".", 1)[0] for k in moved}
    assert layers and moved == {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}


def test_user_dataset_in_flat_layout(tmp_path, capsys):
    from reggan.synthetic import render_faces

    folder = tmp_path / "mine"
    folder.mkdir()
    faces = render_faces(0, 5, size=32, expressions=("neutral", "happy", "surprised"))
    for e, name in enumerate(("neutral", "happy", "surprised")):
        for s in range(5):
            Image.fromarray(faces[e, s]).save(folder / f"S{s:02d}_{name.title()}.png")
    overrides = [a for o in TINY for a in ("-o", o)]
    assert cli("train", "--out", tmp_path / "run", "--data", folder, "--quiet", *overrides,
               "-o", "data.expressions=[neutral, happy, surprised]", "-o", "data.holdout=0.2",
               "--steps", 1) == 0
    model, config = load_model(tmp_path / "run")
    assert model.targets == ["happy", "surprised"]
    assert cli("evaluate", "--model", tmp_path / "run", "--out", tmp_path / "eval",
               "--metrics", "l1", "--quiet") == 0
    splits = json.loads((tmp_path / "eval" / "metrics.json").read_text())["splits"]
    assert list(splits) == ["heldout"]  # the subject held out of training
    assert set(splits["heldout"]["results"]["RegGAN"]["l1"]["details"]["per_expression"]) == {
        "happy", "surprised"}


@pytest.mark.parametrize("name", ["123", "2024-01-01", "on", "null", "a #b"])
def test_data_flag_is_the_path_typed(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("fit", "--data", name, "--out", "run", *TINY_ARGS) == 1
    assert_one_line_error(capsys, f"dataset {name} does not exist")


def test_device_flag_is_text(tmp_path, capsys):
    code = cli("fit", "--device", "0", "--out", tmp_path / "run", "--quiet", *TINY_ARGS)
    if torch.cuda.is_available():
        assert code == 0  # cuda:0
    else:
        assert code == 1
        assert_one_line_error(capsys, "train.device (--device) '0' asks for CUDA")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        cli("train")
    assert exit.value.code == 2
    assert_one_line_error(capsys, "--out")
    assert cli("train", "--out", "/nonexistent/x", "-o", "train.steps=-3") == 1
    assert_one_line_error(capsys, "train.steps must be >= 0")


def test_prepare(tmp_path, capsys):
    from skimage import data

    photos = tmp_path / "photos" / "s1"
    photos.mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(photos / "neutral.jpg")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(photos / "wall.png")
    assert cli("prepare", tmp_path / "photos", tmp_path / "faces", "--size", 64,
               "--detector", "skimage") == 0
    assert "no face found in 1 image(s)" in capsys.readouterr().err
    crop = np.asarray(Image.open(tmp_path / "faces" / "s1" / "neutral.png"))
    assert crop.shape == (64, 64, 3)
    assert not (tmp_path / "faces" / "s1" / "wall.png").exists()
    assert cli("prepare", tmp_path / "photos", tmp_path / "f2", "--strict") == 1
    assert_one_line_error(capsys, "no face found", "strict")
    assert not (tmp_path / "f2").exists()


def test_align_puts_the_eyes_where_the_training_faces_have_them():
    from reggan.prepare import EYE_DISTANCE, EYE_HEIGHT, Face, align

    photo = np.zeros((300, 400, 3), np.uint8)
    left, right = (150.0, 120.0), (230.0, 140.0)  # tilted by 14 degrees
    for x, y in (left, right):
        photo[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 255
    crop = align(photo, Face((100, 80, 180, 180), (left, right)), 100).astype(float).sum(-1)
    found = []
    for half in (crop[:, :50], crop[:, 50:]):
        ys, xs = np.nonzero(half > 200)
        found.append((xs.mean(), ys.mean()))
    found[1] = (found[1][0] + 50, found[1][1])
    expected_x = (50 - 50 * EYE_DISTANCE, 50 + 50 * EYE_DISTANCE)
    for (x, y), ex in zip(found, expected_x):
        assert abs(x + 0.5 - ex) < 1.0 and abs(y + 0.5 - 100 * EYE_HEIGHT) < 1.0


def test_opencv_detector_finds_the_astronaut_and_her_eyes():
    from skimage import data

    from reggan.prepare import make_detector

    faces = make_detector("opencv")(data.astronaut())
    assert len(faces) == 1 and faces[0].eyes is not None
    (lx, ly), (rx, ry) = faces[0].eyes
    x, y, w, h = faces[0].box
    assert x < lx < rx < x + w and y < min(ly, ry) < y + h / 2


def test_demo_smoke(tmp_path):
    overrides = [a for o in TINY for a in ("-o", o)]
    # One held-out identity keeps the evaluation's dlib descriptors few.
    assert cli("demo", "--out", tmp_path / "demo", "--quiet", "--detector", "skimage",
               "--refinement-run", *overrides, "-o", "data.builtin_test_identities=1") == 0
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    assert "![demo grid](demo_grid.png)" in report
    assert ("| metric | input (unchanged) | regression-only | refinement-only | RegGAN | "
            "target (real) |") in report
    assert "| ECS (builtin) ↑ |" in report and "| refinement-only ablation training |" in report
    assert (out / "evaluation" / "grid_heldout.png").exists()
    assert (out / "run-refinement" / "model.safetensors").exists()
    grid = np.asarray(Image.open(out / "demo_grid.png"))
    assert grid.shape[1] == 7 * (32 + 2)  # input + six expressions
    assert (out / "samples" / "astronaut_happy.png").exists()
    assert (out / "samples" / "sketch_surprised.png").exists()
    assert (out / "run" / "model.safetensors").exists()


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 33, 40, dtype=torch.float64, generator=generator)
    y = (x + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        ssim = structural_similarity(a, b, channel_axis=2, data_range=1, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
        assert SSIM().per_image(x, y)[i].item() == pytest.approx(ssim, abs=1e-10)
        assert PSNR().per_image(x, y)[i].item() == pytest.approx(
            peak_signal_noise_ratio(b, a, data_range=1), abs=1e-10)
