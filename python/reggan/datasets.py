"""The datasets a run uses: the built-in faces (rendered and cached on first use) or a user's
paired dataset, split into training and held-out subjects."""

import logging
from pathlib import Path
from typing import Dict, Optional

from reggan.config import BUILTIN, Config
from reggan.data import PairedFaces, detect_layout, holdout_subjects, listing, load_paired
from reggan.errors import RegganError
from reggan.expressions import DEFAULT_EXPRESSIONS
from reggan.runtime import Distributed
from reggan.synthetic import OOD_VARIANTS, SyntheticSpec, ensure_dataset

log = logging.getLogger("reggan")


def builtin_spec(config: Config) -> SyntheticSpec:
    missing = [e for e in config.data.expressions if e not in DEFAULT_EXPRESSIONS]
    if missing:
        raise RegganError(f"the built-in data has no expression(s) {', '.join(missing)}; it "
                          f"renders {', '.join(DEFAULT_EXPRESSIONS)}")
    return SyntheticSpec(train_identities=config.data.builtin_identities,
                         test_identities=config.data.builtin_test_identities,
                         size=config.data.size)


def builtin_root(config: Config, distributed: Optional[Distributed] = None) -> Path:
    """The built-in dataset's folder; rank 0 renders it while the other ranks wait."""
    spec = builtin_spec(config)
    if distributed is not None and distributed.active and not distributed.main:
        distributed.barrier()
        return ensure_dataset(spec, log=log.info)
    root = ensure_dataset(spec, log=log.info)
    if distributed is not None and distributed.active:
        distributed.barrier()
    return root


def _load(config: Config, name: str, path, layout: str, subjects=None) -> PairedFaces:
    d = config.data
    return load_paired(name, path, layout, d.expressions, d.source, config.targets(), d.size,
                       d.strict, subjects)


def training_splits(config: Config, distributed: Optional[Distributed] = None,
                    with_heldout: bool = True) -> Dict[str, PairedFaces]:
    """{'train': ..., 'heldout': ...} ('heldout' absent when there is nothing to hold out). For
    a user dataset, settles in `config` what a run saves: the layout detected and the held-out
    subjects, drawn among the subjects that have pairs."""
    if config.data.path == BUILTIN:
        if config.data.heldout_subjects is not None:
            raise RegganError("data.heldout_subjects is for user datasets; the built-in data "
                              "holds out identities of its own (data.builtin_test_identities)")
        root = builtin_root(config, distributed)
        splits = {"train": _load(config, "train", root / "train", "folders")}
        if with_heldout:
            splits["heldout"] = _load(config, "heldout", root / "test", "folders")
        return splits
    d = config.data
    if d.layout == "auto":
        d.layout = detect_layout(Path(d.path))
    everything = _load(config, f"dataset {d.path}", d.path, d.layout)
    if d.heldout_subjects is None:
        d.heldout_subjects = holdout_subjects(everything.subjects, d.holdout, config.train.seed)
    unknown = sorted(set(d.heldout_subjects) - set(everything.subjects))
    if unknown:
        raise RegganError(f"data.heldout_subjects names {len(unknown)} subject(s) that "
                          f"{d.path} has no pairs of: {listing(unknown)}")
    held = set(d.heldout_subjects)
    kept = [s for s in everything.subjects if s not in held]
    if not kept:
        raise RegganError(f"data.heldout_subjects holds out every subject of {d.path}; none is "
                          f"left to train on")
    splits = {"train": everything.subset("train", kept)}
    if held and with_heldout:
        splits["heldout"] = everything.subset("heldout", sorted(held))
    return splits


def heldout_split(config: Config) -> PairedFaces:
    """The held-out subjects a run saved, from its dataset (which must still hold them)."""
    d = config.data
    if d.heldout_subjects is None:
        raise RegganError("the run does not record which subjects it held out (it was made by "
                          "an older reggan); pass --data with pairs to evaluate on")
    if not d.heldout_subjects:
        raise RegganError("the model's training data held no subjects out (data.holdout=0); "
                          "pass --data with pairs to evaluate on")
    return _load(config, "the run's held-out subjects", d.path, d.layout, d.heldout_subjects)


def evaluation_splits(config: Config, variants=OOD_VARIANTS) -> Dict[str, PairedFaces]:
    """Held-out identities and each out-of-distribution variant of the built-in data."""
    root = builtin_root(config)
    splits = {"heldout": _load(config, "heldout", root / "test", "folders")}
    for variant in variants:
        splits[f"ood/{variant}"] = _load(config, f"ood/{variant}", root / "ood" / variant,
                                         "folders")
    return splits
