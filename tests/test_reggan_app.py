"""reggan end to end on tiny settings: training, exact resume, checkpoints, 2-process DDP,
synthesize/evaluate/prepare/demo through the CLI, and bad inputs."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

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


def stop_at(monkeypatch, when):
    """Training stops at step `when` as on Ctrl-C (SIGTERM unwinds the same way)."""
    from reggan.train import Trainer

    original = Trainer.train_step

    def train_step(self, model, disc, step):
        if step == when:
            raise KeyboardInterrupt
        return original(self, model, disc, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tmp_path, capsys,
                                                                    monkeypatch):
    old = tmp_path / "old"
    run(tiny("model.mode=regression"), old, progress=False)
    (old / "notes.txt").write_text("mine")
    model = (old / "model.safetensors").read_bytes()
    # A bad --stage1, a failing fit, a stop after a checkpoint: each leaves the old run whole
    # and no scratch folder beside it.
    assert cli("train", "--out", old, "--overwrite", "--stage1", tmp_path / "none", "--quiet",
               *TINY_ARGS) == 1
    assert_one_line_error(capsys, "none does not exist")
    assert cli("fit", "--out", old, "--overwrite", "--quiet", *TINY_ARGS, "-o", "fit.lam=0") == 1
    assert_one_line_error(capsys, "ridge fit of 'happy' failed")
    stop_at(monkeypatch, 3)
    assert cli("train", "--out", old, "--overwrite", "--quiet", *TINY_ARGS) == 130
    assert "still holds the previous one" in capsys.readouterr().err
    assert (old / "model.safetensors").read_bytes() == model
    assert (old / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    # Replacing the current folder (or one above it) is refused, not emptied.
    monkeypatch.chdir(old)
    for out in (".", ".."):
        assert cli("fit", "--out", out, "--overwrite", *TINY_ARGS) == 1
        assert_one_line_error(capsys, "is or contains the current folder")
    assert (old / "model.safetensors").read_bytes() == model


def test_a_stopped_new_run_is_resumable_and_a_failed_one_leaves_nothing(tmp_path, capsys,
                                                                        monkeypatch, trained):
    stop_at(monkeypatch, 3)
    assert cli("train", "--out", tmp_path / "run", "--quiet", *TINY_ARGS) == 130
    assert "--resume" in capsys.readouterr().err  # says how to go on
    monkeypatch.undo()
    assert cli("train", "--out", tmp_path / "run", "--resume", "--quiet") == 0
    a = tensors_of(trained / "checkpoints" / "step_0000004.safetensors")
    b = tensors_of(tmp_path / "run" / "checkpoints" / "step_0000004.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    # Nothing to resume: a failed fit leaves no folder to block the retry.
    assert cli("fit", "--out", tmp_path / "fit", "--quiet", *TINY_ARGS, "-o", "fit.lam=0") == 1
    assert_one_line_error(capsys, "ridge fit")
    assert not (tmp_path / "fit").exists()
    assert cli("fit", "--out", tmp_path / "fit", "--quiet", *TINY_ARGS) == 0


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


def test_synthesize(trained, tmp_path, capsys, monkeypatch):
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
    # Through a symbolic link, the folder it names is replaced; the link stays.
    (tmp_path / "link").symlink_to(out)
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in" / "face1.png",
               "--out", tmp_path / "link", "--overwrite", "--quiet") == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "face1").is_dir()
    assert not (out / "face0").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.chdir(out)
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out", ".",
               "--overwrite") == 1
    assert_one_line_error(capsys, "output folder . is or contains the current folder")
    assert (out / "face1").is_dir()


def test_overwrite_never_deletes_foreign_folders(trained, tmp_path, capsys):
    write_faces(tmp_path / "in", count=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out", mine,
               "--overwrite") == 1
    assert_one_line_error(capsys, "not written by reggan")
    assert (mine / "thesis.txt").read_text() == "precious"


def test_overwrite_never_replaces_the_commands_own_input(trained, tmp_path, capsys):
    from reggan.io import MARKER

    faces = tmp_path / "faces"  # a reggan output (as `reggan prepare` makes) used as input
    write_faces(faces)
    (faces / MARKER).touch()
    before = sorted(faces.iterdir())
    synthesize = ["synthesize", "--model", trained, "--input"]
    for args in (synthesize + [faces, "--out", faces],
                 synthesize + [faces / "face0.png", "--out", faces],
                 synthesize + [faces, "--out", trained],  # the model
                 ["evaluate", "--model", trained, "--faces", faces, "--out", faces],
                 ["prepare", faces, faces],
                 ["prepare", faces / "face1.png", faces],
                 ["train", "--data", faces, "--out", faces, *TINY_ARGS]):
        assert cli(*args, "--overwrite") == 1, args
        assert_one_line_error(capsys, "is or contains")
    assert cli(*synthesize, faces, "--out", tmp_path) == 1  # a folder above the input
    assert_one_line_error(capsys, f"is or contains --input {faces}")
    assert sorted(faces.iterdir()) == before
    assert (trained / "model.safetensors").is_file()


def test_outputs_inside_the_input_are_not_read_back(trained, tmp_path, capsys):
    from skimage import data

    faces = tmp_path / "faces"
    write_faces(faces)
    for _ in range(2):
        assert cli("synthesize", "--model", trained, "--input", faces, "--out", faces / "out",
                   "--expressions", "happy", "--overwrite", "--quiet") == 0
    assert sorted(p.name for p in (faces / "out").iterdir()) == [
        ".reggan-output", "face0", "face1", "face2", "grid.png"]
    for _ in range(2):
        assert cli("evaluate", "--model", trained, "--faces", faces, "--out", faces / "eval",
                   "--metrics", "l1", "--overwrite", "--quiet") == 0
        report = json.loads((faces / "eval" / "metrics.json").read_text())
        assert report["splits"]["faces"]["subjects"] == 3  # not the outputs, nor the grid
    photos = tmp_path / "photos"
    (photos / "s1").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(photos / "s1" / "neutral.jpg")
    for _ in range(2):
        assert cli("prepare", photos, photos / "aligned", "--detector", "skimage",
                   "--overwrite") == 0
    assert "not reading reggan's output folder(s)" in capsys.readouterr().err
    assert sorted(str(p.relative_to(photos)) for p in photos.rglob("*.png")) == [
        "aligned/s1/neutral.png"]


def test_inputs_differing_only_in_file_type_are_an_error(trained, tmp_path, capsys):
    write_faces(tmp_path / "in", count=2)
    Image.open(tmp_path / "in" / "face0.png").save(tmp_path / "in" / "face0.jpg")
    assert cli("synthesize", "--model", trained, "--input", tmp_path / "in", "--out",
               tmp_path / "out") == 1
    assert_one_line_error(capsys, "face0.jpg and", "face0.png", "same output")
    assert cli("prepare", tmp_path / "in", tmp_path / "aligned", "--detector", "skimage") == 1
    assert_one_line_error(capsys, "face0.jpg and", "face0.png", "same output")
    assert not (tmp_path / "out").exists() and not (tmp_path / "aligned").exists()


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
    assert cli("fit", "--out", tmp_path / "fit", "--quiet", *TINY_ARGS) == 0
    assert cli("train", "--out", tmp_path / "t", "--quiet", "--stage1", tmp_path / "fit",
               "--steps", 1, *TINY_ARGS) == 0
    fitted, fit_config = load_model(tmp_path / "fit")
    # A fit is the regression-only model, whatever model.mode says (TINY: reggan), not a
    # RegGAN with an untrained generator.
    assert fit_config.model.mode == "regression" and fitted.generator is None
    trained, _ = load_model(tmp_path / "t")
    for a, b in zip(fitted.regression.parameters(), trained.regression.parameters()):
        assert torch.equal(a, b)
    assert cli("train", "--out", tmp_path / "t2", "--stage1", tmp_path / "fit",
               *TINY_ARGS, "-o", "model.kernel_size=5") == 1
    assert_one_line_error(capsys, "another config", "model.kernel_size is 3 there, 5 here")
    # A resumed run keeps its own stage 1: --stage1 with --resume is an error, not ignored.
    assert cli("train", "--out", tmp_path / "t", "--resume", "--stage1", tmp_path / "fit") == 1
    assert_one_line_error(capsys, "--stage1 and --resume exclude each other")
    assert cli("train", "--out", tmp_path / "t", "--resume", "--overwrite") == 1
    assert_one_line_error(capsys, "--overwrite and --resume exclude each other")


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
    assert cli("train", "--out", tmp_path / "run", "--data", folder, "--quiet", *TINY_ARGS,
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


FLAT_EXPRESSIONS = ("neutral", "happy", "surprised")
FLAT_ARGS = ["-o", "data.expressions=[neutral, happy, surprised]", "-o", "data.holdout=0.2"]


def write_flat_dataset(folder, count=5, first=0):
    """Subjects S<first>.. of the built-in faces as a flat dataset: S00_Happy.png..."""
    from reggan.synthetic import render_faces

    folder.mkdir(exist_ok=True)
    faces = render_faces(first, count, size=32, expressions=FLAT_EXPRESSIONS)
    for e, name in enumerate(FLAT_EXPRESSIONS):
        for s in range(count):
            Image.fromarray(faces[e, s]).save(folder / f"S{first + s:02d}_{name.title()}.png")


def test_heldout_subjects_are_drawn_among_subjects_with_pairs(tmp_path):
    from reggan.data import holdout_subjects

    write_flat_dataset(tmp_path / "mine")
    # The subject a draw among all five would hold out has no neutral face.
    (unpaired,) = holdout_subjects([f"S{s:02d}" for s in range(5)], 0.2, 0)
    (tmp_path / "mine" / f"{unpaired}_Neutral.png").unlink()
    settings = (f"data.path={tmp_path / 'mine'}", "data.expressions=[neutral, happy, surprised]",
                "data.holdout=0.2", "model.mode=regression")
    run(tiny(*settings), tmp_path / "run", progress=False)
    held = load_model(tmp_path / "run")[1].data.heldout_subjects
    assert len(held) == 1 and held != [unpaired]
    with pytest.raises(RegganError, match="data.heldout_subjects names 1 subject.*: nobody"):
        run(tiny(*settings, "data.heldout_subjects=[nobody]"), tmp_path / "run2", progress=False)


def test_a_run_records_its_data_and_evaluate_scores_its_heldout_subjects(tmp_path, capsys,
                                                                         monkeypatch):
    from reggan.data import holdout_subjects

    data = tmp_path / "mine"
    write_flat_dataset(data)
    monkeypatch.chdir(tmp_path)
    # The run inside its flat dataset: its previews are images too.
    assert cli("train", "--data", "mine", "--out", "mine/run", "--quiet", *TINY_ARGS,
               *FLAT_ARGS, "--steps", 1) == 0
    saved = json.loads((data / "run" / "config.json").read_text())["data"]
    assert saved["path"] == str(Path.cwd() / "mine") and saved["layout"] == "flat"
    held = saved["heldout_subjects"]
    assert len(held) == 1
    assert cli("train", "--resume", "--out", "mine/run", "--steps", 2, "--quiet") == 0

    def heldout_l1(out):
        assert cli("evaluate", "--model", data / "run", "--out", out, "--metrics", "l1",
                   "ecs_builtin", "--quiet") == 0
        split = json.loads((Path(out) / "metrics.json").read_text())["splits"]["heldout"]
        # The built-in classifier still trains for a run that lists held-out subjects.
        assert split["results"]["RegGAN"]["ecs_builtin"]["available"]
        return split["subjects"], split["results"]["RegGAN"]["l1"]["value"]

    before = heldout_l1("eval1")
    # A subject added later would change a fresh draw; evaluate, from another folder, scores
    # the subjects the run held out all the same.
    write_flat_dataset(data, count=1, first=5)
    assert holdout_subjects([f"S{s:02d}" for s in range(6)], 0.2, 0) != held
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert heldout_l1("eval2") == before
    for file in data.glob(f"{held[0]}_*.png"):
        file.unlink()
    assert cli("evaluate", "--model", data / "run", "--out", "eval3") == 1
    assert_one_line_error(capsys, "held-out subjects", f"not in {data}: {held[0]}")


@pytest.mark.parametrize("name", ["123", "2024-01-01", "on", "null", "a #b"])
def test_data_flag_is_the_path_typed(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("fit", "--data", name, "--out", "run", *TINY_ARGS) == 1
    assert_one_line_error(capsys, f"dataset {Path.cwd() / name} does not exist")


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


def test_prepare(tmp_path, capsys, monkeypatch):
    from skimage import data

    photos = tmp_path / "photos" / "s1"
    photos.mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(photos / "neutral.jpg")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(photos / "wall.png")
    # Over twice Pillow's pixel limit (lowered here from 89 million): a decompression bomb to
    # it, which is skipped like any unreadable image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)
    Image.fromarray(np.zeros((800, 800, 3), np.uint8)).save(photos / "huge.png")
    assert cli("prepare", tmp_path / "photos", tmp_path / "faces", "--size", 64,
               "--detector", "skimage") == 0
    err = capsys.readouterr().err
    assert "no face found in 1 image(s)" in err
    assert "1 image(s) could not be read" in err and "huge.png" in err
    crop = np.asarray(Image.open(tmp_path / "faces" / "s1" / "neutral.png"))
    assert crop.shape == (64, 64, 3)
    assert not (tmp_path / "faces" / "s1" / "wall.png").exists()
    (photos / "huge.png").unlink()
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


def test_demo_smoke(tmp_path, monkeypatch):
    # One held-out identity keeps the evaluation's dlib descriptors few.
    assert cli("demo", "--out", tmp_path / "demo", "--quiet", "--detector", "skimage",
               "--refinement-run", *TINY_ARGS, "-o", "data.builtin_test_identities=1") == 0
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
    # The full evaluation the report gives works as written, in the demo's folder (here on
    # one metric and subject).
    (command,) = re.findall(r"`(reggan evaluate [^`]*)`", report)
    monkeypatch.chdir(out)
    assert cli(*command.split()[1:], "--metrics", "l1", "--max-subjects", 1, "--quiet") == 0
    assert list(json.loads((out / "evaluation" / "metrics.json").read_text())["metrics"]) == [
        "l1"]


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


def test_a_metric_with_no_images_is_an_error():
    metric = PSNR()
    with pytest.raises(ValueError, match="psnr: no images were scored"):
        metric.compute()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    metric.update(None, x, x * 0.5, None)
    assert metric.compute() == pytest.approx(float(PSNR().per_image(x, x * 0.5).mean()))
