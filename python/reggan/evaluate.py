"""`reggan evaluate`: metrics of trained models on held-out and out-of-distribution pairs.

For every model and split it scores the model's output, its regression stage alone (for full
RegGAN models), and the unchanged input as a reference, against the paired targets, overall
and per target expression. Writes metrics.json, metrics.md and a grid per split
(input | regression | refined | target).
"""

import json
import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from reggan.metrics import paired as metric_registry
from reggan.config import BUILTIN
from reggan.data import PairedFaces, load_paired
from reggan.datasets import evaluation_splits, training_splits
from reggan.errors import RegganError
from reggan.io import staged_output, to_uint8, write_text_atomic
from reggan.runtime import resolve_device
from reggan.train import load_model, preview_pairs
from reggan.viz import save_grid

log = logging.getLogger("reggan")


def _splits(config, data: Optional[str], strict: bool) -> Dict[str, PairedFaces]:
    """The model's own held-out data by default (built-in: held-out identities and every OOD
    variant; a user dataset: its held-out subjects), else all pairs of `data`."""
    config.data.strict = strict
    if data is None or data == BUILTIN and config.data.path == BUILTIN:
        if config.data.path == BUILTIN:
            return evaluation_splits(config)
        splits = training_splits(config)
        if "heldout" not in splits:
            raise RegganError("the model's training data held no subjects out "
                              "(data.holdout=0); pass --data with pairs to evaluate on")
        return {"heldout": splits["heldout"]}
    if data == BUILTIN:
        config.data.path = BUILTIN
        return evaluation_splits(config)
    d = config.data
    return {"data": load_paired("data", data, "auto", d.expressions, d.source, config.targets(),
                                d.size, strict)}


@torch.no_grad()
def score(model, data: PairedFaces, names: Sequence[str], batch_size: int, device) -> Dict:
    """{output kind: {"all" or expression: {metric: value}}}."""
    kinds = ["output", "input (unchanged)"]
    if model.mode == "reggan":
        kinds.insert(1, "regression stage")
    present = [data.targets[e] for e in sorted(set(data.pairs[:, 2].tolist()))]
    found = {k: {e: metric_registry.create(names) for e in ["all"] + present} for k in kinds}
    for start in range(0, len(data), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(data)))
        source, target, index, label = data.batch(indices, device)
        regressed, refined = model(source, index)
        outputs = {"output": refined, "regression stage": regressed, "input (unchanged)": source}
        groups = [("all", slice(None))] + [
            (data.targets[e], (index == e).nonzero().squeeze(1)) for e in index.unique().tolist()]
        for kind in kinds:
            for k, metric in enumerate(found[kind]["all"]):
                if isinstance(metric, metric_registry.PerImageMetric):
                    # Per-image scores once, shared by every group.
                    scores = metric.per_image(outputs[kind].float().clamp(0, 1), target).cpu()
                    for group, rows in groups:
                        found[kind][group][k].add(scores[rows.cpu() if torch.is_tensor(rows)
                                                         else rows])
                else:
                    for group, rows in groups:
                        found[kind][group][k].update(source[rows], outputs[kind][rows],
                                                     target[rows], label[rows])
    return {kind: {group: {m.name: m.compute() for m in ms} for group, ms in groups.items()}
            for kind, groups in found.items()}


def _markdown(results: Dict, names: Sequence[str]) -> str:
    arrows = {n: "↑" if metric_registry.REGISTRY[n].higher_is_better else "↓" for n in names}
    lines = ["| model | split | output | " + " | ".join(f"{n} {arrows[n]}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for model, splits in results.items():
        for split, kinds in splits.items():
            for kind, groups in kinds.items():
                values = groups["all"]
                cells = [f"{values[n]:.4f}" if math.isfinite(values[n]) else "n/a" for n in names]
                lines.append(f"| {model} | {split} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(model_paths: Sequence[Path], out_dir: Path, data: Optional[str] = None,
             metrics: Sequence[str] = ("l1", "psnr", "ssim"), batch_size: int = 32,
             device: str = "auto", strict: bool = False, overwrite: bool = False,
             max_subjects: Optional[int] = None) -> Dict:
    unknown = [m for m in metrics if m not in metric_registry.REGISTRY]
    if unknown:
        raise RegganError(f"unknown metric(s) {', '.join(unknown)}; available: "
                          f"{', '.join(metric_registry.available())}")
    if batch_size < 1:
        raise RegganError(f"--batch-size must be >= 1, got {batch_size}")
    if max_subjects is not None and max_subjects < 1:
        raise RegganError(f"--max-subjects must be >= 1, got {max_subjects}")
    with staged_output(out_dir, overwrite) as scratch:
        return evaluate_into(scratch, model_paths, data, metrics, batch_size, device, strict,
                             max_subjects)


@torch.no_grad()
def evaluate_into(scratch: Path, model_paths: Sequence[Path], data: Optional[str],
                  metrics: Sequence[str], batch_size: int, device, strict: bool,
                  max_subjects: Optional[int] = None) -> Dict:
    """evaluate(), writing into an existing folder (the demo's); with `max_subjects`, on the
    first subjects of each split only."""
    names = [str(Path(p).resolve().name) for p in model_paths]
    if len(set(names)) != len(names):
        names = [str(p) for p in model_paths]
    device = resolve_device(device) if isinstance(device, str) else device
    results: Dict[str, Dict] = {}
    for name, path in zip(names, model_paths):
        model, config = load_model(path, device)
        results[name] = {}
        for split, pairs in _splits(config, data, strict).items():
            if max_subjects is not None:
                pairs = pairs.first_subjects(max_subjects)
            results[name][split] = score(model, pairs, metrics, batch_size, device)
            source, target, index, _ = pairs.batch(preview_pairs(pairs), device)
            regressed, refined = model(source, index)
            save_grid(scratch / f"grid_{name}_{split.replace('/', '_')}.png",
                      [to_uint8(x) for x in (source, regressed, refined, target)],
                      ["input", "regression", "refined", "target"],
                      [pairs.targets[i] for i in index.tolist()])
    write_text_atomic(scratch / "metrics.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(scratch / "metrics.md", _markdown(results, metrics))
    return results
