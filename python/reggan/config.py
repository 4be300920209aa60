"""Run configuration: nested dataclasses, read from YAML or JSON, overridden from the command
line with dotted keys (`train.steps=200`), validated, and saved with every run."""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import yaml

from reggan.errors import RegganError
from reggan.expressions import DEFAULT_EXPRESSIONS, check_vocabulary, resolve

BUILTIN = "builtin"
# A command-line override: 'section.key=value' (the value read as YAML), or (key, value).
Override = Union[str, Tuple[str, Any]]


@dataclass
class DataConfig:
    path: str = BUILTIN  # 'builtin', a dataset folder or a CSV manifest (saved absolute)
    layout: str = "auto"  # auto | folders | flat | manifest (a run saves the one detected)
    expressions: List[str] = field(default_factory=lambda: list(DEFAULT_EXPRESSIONS))
    source: str = "neutral"  # the expression every pair starts from
    targets: Optional[List[str]] = None  # default: every expression but the source
    size: int = 128  # images are resized to size x size
    holdout: float = 0.1  # fraction of subjects held out of training (user datasets)
    # The subjects held out (user datasets): drawn (a `holdout` fraction) when null, and saved
    # with the run, so that evaluate scores exactly them whatever the folder holds later.
    heldout_subjects: Optional[List[str]] = None
    flip: bool = True  # random horizontal flips of training pairs
    strict: bool = False  # unreadable or unknown files are errors instead of warnings
    builtin_identities: int = 200  # training identities of the built-in data
    builtin_test_identities: int = 40  # held-out identities (with OOD variants)


@dataclass
class ModelConfig:
    mode: str = "reggan"  # reggan | regression (stage 1 only) | refinement (GAN only)
    kernel_size: int = 5  # of the per-pixel regression
    gen_width: int = 32
    gen_blocks: int = 4
    gen_downsamplings: int = 2
    disc_width: int = 32
    disc_layers: int = 4
    disc_spectral_norm: bool = True


@dataclass
class FitConfig:
    method: str = "closed_form"  # closed_form (RidgeFitter) | gradient (ridge loss)
    lam: float = 0.4  # ridge penalty on [0, 1] images, as in masked regression
    select: str = "none"  # none | gcv: pick lambda among lam_candidates by GCV
    lam_candidates: List[float] = field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    gcv_scope: str = "global"  # global | pixel
    penalize_bias: bool = True
    batch_size: int = 64
    gradient_steps: int = 300
    gradient_lr: float = 0.05


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8  # global: split over DDP ranks
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_l1: float = 10.0
    lambda_adv: float = 1.0
    lambda_cls: float = 1.0
    finetune_regression: bool = False  # stage 3: train the regression layer jointly
    lr_regression: float = 1e-5
    amp: bool = True  # mixed precision on CUDA (bfloat16, or float16 with loss scaling)
    preview_every: int = 250
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | N


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def targets(self) -> List[str]:
        if self.data.targets is not None:
            return list(self.data.targets)
        return [e for e in self.data.expressions if e != self.data.source]


# Keys that may differ between a checkpoint and the run that resumes from it.
RESUMABLE_CHANGES = ("train.steps", "train.preview_every", "train.checkpoint_every",
                     "train.device", "train.amp", "data.strict")
# Keys that fix the shape of the inference model, and of its regression stage.
MODEL_KEYS = ("data.expressions", "data.source", "data.targets", "data.size", "model.")
STAGE1_KEYS = ("data.expressions", "data.source", "data.targets", "data.size",
               "model.kernel_size")

_CHOICES = {
    "data.layout": ("auto", "folders", "flat", "manifest"),
    "model.mode": ("reggan", "regression", "refinement"),
    "fit.method": ("closed_form", "gradient"),
    "fit.select": ("none", "gcv"),
    "fit.gcv_scope": ("global", "pixel"),
}


def _sections(config: Config):
    for section in dataclasses.fields(config):
        yield section.name, getattr(config, section.name)


def flatten(tree: Dict[str, Any]) -> Dict[str, Any]:
    return {f"{s}.{k}": v for s, values in tree.items() for k, v in values.items()}


def _coerce(key: str, value: Any, default: Any, annotation: Any) -> Any:
    """Check and convert `value` to the type of the field."""
    text = str(annotation)
    if isinstance(default, bool) or text == "bool":
        if isinstance(value, bool):
            return value
        raise RegganError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int) or text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RegganError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float) or text == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RegganError(f"{key} must be a number, got {value!r}")
        return float(value)
    if "List[float]" in text:
        if isinstance(value, list):
            value = [_coerce(key, v, 0.0, float) for v in value]
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise RegganError(f"{key} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if "List[str]" in text:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if value is None and "Optional" in text:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RegganError(f"{key} must be a list of names, got {value!r}")
        return value
    if not isinstance(value, str):
        raise RegganError(f"{key} must be a string, got {value!r}")
    return value


def from_dict(tree: Dict[str, Any], base: Optional[Config] = None) -> Config:
    """A Config from a nested dict; unknown sections or keys are errors that list valid ones."""
    config = base if base is not None else Config()
    if not isinstance(tree, dict):
        raise RegganError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    sections = dict(_sections(config))
    for name, values in tree.items():
        if name not in sections:
            raise RegganError(f"unknown config section {name!r}; valid: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise RegganError(f"config section {name!r} must be a mapping")
        section = sections[name]
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in fields:
                raise RegganError(f"unknown config key {name}.{key}; valid keys of {name}: "
                                  f"{', '.join(fields)}")
            setattr(section, key, _coerce(f"{name}.{key}", value, getattr(section, key),
                                          fields[key].type))
    return config


def load_file(path: str) -> Dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RegganError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise RegganError(f"config file {path} is not valid "
                          f"{'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(error).splitlines()[0]}") from None
    return tree or {}


def parse_override(text: str) -> Tuple[str, Any]:
    """'train.steps=200' -> ('train.steps', 200); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise RegganError(f"an override must look like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise RegganError(f"an override key must be section.key (e.g. train.steps), got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(config: Config, overrides: Iterable[Override]) -> Config:
    """`overrides`: 'section.key=value' texts, or (key, value) pairs taken as they are."""
    tree: Dict[str, Dict[str, Any]] = {}
    for override in overrides:
        key, value = parse_override(override) if isinstance(override, str) else override
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return from_dict(tree, config)


def build(config_file: Optional[str] = None, overrides: Iterable[Override] = (),
          base: Optional[Config] = None) -> Config:
    config = base if base is not None else Config()
    if config_file:
        config = from_dict(load_file(config_file), config)
    return validate(apply_overrides(config, overrides))


def _positive(key: str, value, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and
                                                        not math.isfinite(value)):
        raise RegganError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(config: Config) -> Config:
    tree = flatten(config.to_dict())
    for key, choices in _CHOICES.items():
        if tree[key] not in choices:
            raise RegganError(f"{key} must be one of {', '.join(choices)}, got {tree[key]!r}")
    data, model, fit = config.data, config.model, config.fit
    data.expressions = check_vocabulary(data.expressions)
    (data.source,) = resolve([data.source], data.expressions, "source expression")
    if data.targets is not None:
        data.targets = resolve(data.targets, data.expressions, "target expression")
    if not config.targets():
        raise RegganError("there is no target expression: data.expressions must name at least "
                          "one expression besides data.source")
    if data.source in config.targets():
        raise RegganError(f"data.targets must not contain the source expression {data.source!r}")
    for key in ("data.size", "data.builtin_identities", "data.builtin_test_identities",
                "model.kernel_size", "model.gen_width", "model.gen_blocks", "model.disc_width",
                "model.disc_layers", "fit.batch_size", "fit.gradient_steps", "train.batch_size",
                "train.preview_every", "train.checkpoint_every"):
        _positive(key, tree[key])
    for key in ("model.gen_downsamplings", "train.steps", "fit.lam", "train.lambda_l1",
                "train.lambda_adv", "train.lambda_cls", "train.lr_regression", "train.seed"):
        _positive(key, tree[key], allow_zero=True)
    if config.train.seed >= 2 ** 63:  # torch's generators take 64-bit seeds
        raise RegganError(f"train.seed must be below 2**63 = {2 ** 63}, got {config.train.seed}")
    if not data.path.strip():
        raise RegganError("data.path must be 'builtin', a dataset folder or a CSV manifest, "
                          "got an empty path")
    if data.path != BUILTIN:  # the run's data wherever it is read from later
        data.path = os.path.abspath(os.path.expanduser(data.path))
    for key in ("fit.gradient_lr", "train.lr_g", "train.lr_d"):
        _positive(key, tree[key])
    if not 0 <= data.holdout < 1:
        raise RegganError(f"data.holdout must be in [0, 1), got {data.holdout}")
    if model.kernel_size % 2 == 0:
        raise RegganError(f"model.kernel_size must be odd (the regression is centred), "
                          f"got {model.kernel_size}")
    if data.size % (2 ** (model.gen_downsamplings + 1)) or data.size < 2 ** model.disc_layers:
        raise RegganError(
            f"data.size ({data.size}) must be a multiple of {2 ** (model.gen_downsamplings + 1)} "
            f"and at least {2 ** model.disc_layers} for this generator and discriminator")
    if not fit.lam_candidates or any(v <= 0 or not math.isfinite(v) for v in fit.lam_candidates):
        raise RegganError(f"fit.lam_candidates must be positive numbers, got {fit.lam_candidates}")
    for key in ("train.beta1", "train.beta2"):
        if not 0 <= tree[key] < 1:
            raise RegganError(f"{key} must be in [0, 1), got {tree[key]}")
    return config


def differences(saved: Dict[str, Any], current: Dict[str, Any], prefixes: Iterable[str] = None,
                ignore: Iterable[str] = ()) -> List[str]:
    """Dotted keys whose values differ (restricted to `prefixes` when given)."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    if prefixes is not None:
        prefixes = tuple(prefixes)
        keys = [k for k in keys if k.startswith(prefixes)]
    return [k for k in keys if k not in ignore and a.get(k) != b.get(k)]


def save(config: Config, path: Path) -> None:
    from reggan.io import write_text_atomic

    write_text_atomic(path, json.dumps(config.to_dict(), indent=2) + "\n")


def describe() -> str:
    """Every key with its default, for --help."""
    lines = []
    for section, values in _sections(Config()):
        for f in dataclasses.fields(values):
            lines.append(f"  {section}.{f.name} = {json.dumps(getattr(values, f.name))}")
    return "\n".join(lines)
