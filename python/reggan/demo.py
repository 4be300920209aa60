"""`reggan demo`: RegGAN end to end on the built-in faces.

Renders (or reuses) the built-in dataset, fits the regression stage in closed form, trains the
refinement briefly, then synthesizes every target expression for held-out identities, for each
out-of-distribution variant and for scikit-image's astronaut photo, and writes a grid, the
samples, the metrics and a short report. Its default settings fit in a few minutes of a 2-core
CPU; `-o train.steps=...` trains longer.
"""

import json
import logging
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from reggan import config as configs
from reggan.config import Config
from reggan.datasets import evaluation_splits
from reggan.classifier import ClassifierRecipe
from reggan.evaluate import evaluate_into, markdown
from reggan.io import save_png, staged_output, to_uint8, write_text_atomic
from reggan.runtime import resolve_device
from reggan.synthesize import transform
from reggan.train import load_model, run
from reggan.viz import save_grid

log = logging.getLogger("reggan")

HELDOUT_ROWS = 3
# The short version of `reggan evaluate`: few subjects per split. Its expression classifier is
# evaluate's own (about a minute of training, once: it is cached and shared with evaluate),
# since a briefer one recognized only half the real held-out expressions.
EVALUATION_SUBJECTS = 5


def demo_config() -> Config:
    """The demo's defaults: the built-in data, full RegGAN, a lighter generator (16 channels
    at full resolution instead of 32: a quarter of the convolution work) trained briefly."""
    config = Config()
    config.model.gen_width = 16
    config.train.steps = 300
    config.train.batch_size = 8
    config.train.preview_every = 100
    config.train.checkpoint_every = 300
    return config


def _astronaut(size: int, detector: str):
    from skimage import data

    from reggan.prepare import make_detector, prepare_image

    return prepare_image(data.astronaut(), make_detector(detector), size)


def _report(config: Config, timings: Dict[str, float], results: Dict, runs: List[str],
            rows: List[str], stage1: Dict, refinement_run: bool) -> str:
    """report.md; `runs`: the names of the run folders, the RegGAN run's first."""
    run_name = runs[0]
    metrics_md = Path("evaluation") / "metrics.md"
    total = sum(timings.values())
    lines = [
        "# RegGAN demo",
        "",
        f"Model: `{config.model.mode}`; regression kernel {config.model.kernel_size}x"
        f"{config.model.kernel_size} per channel, fitted by `{config.fit.method}` "
        f"(lambda {json.dumps(stage1.get('lambda'))}); refinement trained for "
        f"{config.train.steps} steps of batch {config.train.batch_size} on "
        f"{config.data.builtin_identities} built-in identities.",
        "",
        "![demo grid](demo_grid.png)",
        "",
        "Rows: " + ", ".join(rows) + ". Columns: the input, then each target expression.",
        "",
        "## Timings",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines += [f"| total | {total:.1f} |", "", "## Evaluation", "",
              f"`reggan evaluate` on the first {EVALUATION_SUBJECTS} subjects of each split "
              f"(the expression classifier of ECS (builtin) is trained "
              f"{ClassifierRecipe().epochs} epochs on the built-in training identities, once: "
              f"it is cached); the full report, run in this folder: `reggan evaluate --model "
              f"{' '.join(runs)} --out evaluation --overwrite` (it replaces `evaluation/`)."]
    if not refinement_run:
        lines.append("The refinement-only ablation is not trained by default, to keep the demo "
                     "within minutes (it about doubles the training time): `reggan demo "
                     "--refinement-run` trains it.")
    lines.append("")
    lines.append(markdown(results, heading="###"))
    lines += [f"Per-split grids (input | regression-only | refinement-only | RegGAN | target) "
              f"are in `evaluation/`; training previews, the loss curve (`{run_name}/losses.png`) "
              f"and the model (`{run_name}/model.safetensors`) in `{run_name}/`. Samples of "
              f"every expression are in `samples/`. Details: `{metrics_md}`, "
              f"`evaluation/metrics.json`.", ""]
    return "\n".join(lines)


def demo(out_dir: Path, overrides=(), config_file=None, overwrite: bool = False,
         detector: str = "auto", progress: bool = True, refinement_run: bool = False) -> Path:
    """`refinement_run`: also train the refinement-only ablation with the same settings, so the
    evaluation compares all three models (it about doubles the training time, which is why the
    default demo leaves that column absent)."""
    config = configs.build(config_file, overrides, base=demo_config())
    if config.data.path != configs.BUILTIN:
        log.warning("the demo runs on the built-in data; ignoring data.path=%s",
                    config.data.path)
        config.data.path = configs.BUILTIN
    timings: Dict[str, float] = {}
    with staged_output(out_dir, overwrite) as scratch:
        started = time.perf_counter()
        splits = evaluation_splits(config)
        timings["built-in data (render on first use, load)"] = time.perf_counter() - started

        started = time.perf_counter()
        run_dir = scratch / "run"
        run(config, run_dir, progress=progress)
        timings["stage 1 fit + stage 2 training"] = time.perf_counter() - started
        runs = [run_dir]
        if refinement_run:
            started = time.perf_counter()
            ablation = configs.from_dict(config.to_dict())
            ablation.model.mode = "refinement"
            runs.append(run(ablation, scratch / "run-refinement", progress=progress))
            timings["refinement-only ablation training"] = time.perf_counter() - started

        started = time.perf_counter()
        device = resolve_device(config.train.device)
        model, config = load_model(run_dir, device)
        # Staged, so that it carries the marker of reggan's outputs, which the full
        # evaluation's --overwrite asks for.
        with staged_output(scratch / "evaluation", False) as evaluation:
            results = evaluate_into(evaluation, runs, device=device,
                                    max_subjects=EVALUATION_SUBJECTS,
                                    run_labels=[r.name for r in runs])
        timings["evaluation (held-out and OOD, all metrics)"] = time.perf_counter() - started

        started = time.perf_counter()
        inputs, captions = [], []
        heldout = splits["heldout"]
        for i in heldout.sources()[:HELDOUT_ROWS].tolist():
            inputs.append(heldout.images[i])
            captions.append(f"held-out {heldout.image_subjects[i]}")
        for name, pairs in splits.items():
            if name.startswith("ood/"):
                inputs.append(pairs.images[pairs.sources()[0]])
                captions.append(name[4:])
        astronaut = _astronaut(config.data.size, detector)
        if astronaut is not None:
            inputs.append(torch.tensor(astronaut).permute(2, 0, 1))
            captions.append("astronaut")
        else:
            log.warning("no face found in the astronaut photo; it is left out")
        stack = torch.stack(inputs)
        targets = list(range(len(model.targets)))
        outputs = transform(model, stack, targets, 16, device)
        columns = [stack.permute(0, 2, 3, 1).numpy()]
        columns += [to_uint8(outputs[:, k]) for k in targets]
        save_grid(scratch / "demo_grid.png", columns, ["input"] + model.targets, captions)
        for caption, image, faces in zip(captions, stack, outputs):
            stem = caption.replace("held-out ", "heldout_").replace(" ", "_")
            save_png(scratch / "samples" / f"{stem}_input.png",
                     image.permute(1, 2, 0).numpy().astype(np.uint8))
            for name, face in zip(model.targets, to_uint8(faces)):
                save_png(scratch / "samples" / f"{stem}_{name}.png", face)
        timings["synthesis and pictures"] = time.perf_counter() - started

        stage1_file = run_dir / "stage1.json"
        stage1 = json.loads(stage1_file.read_text()) if stage1_file.exists() else {}
        write_text_atomic(scratch / "report.md",
                          _report(config, timings, results, [r.name for r in runs], captions,
                                  stage1, refinement_run))
    log.info("demo written to %s (%.0f s); open %s", out_dir, sum(timings.values()),
             Path(out_dir) / "report.md")
    return Path(out_dir)
