"""The datasets a run uses: the built-in faces (rendered and cached on first use) or a user's
paired dataset, split into training and held-out subjects."""

import logging
from pathlib import Path
from typing import Dict, Optional

from reggan.config import BUILTIN, Config
from reggan.data import PairedFaces, holdout_subjects, load_paired, scan
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
    """{'train': ..., 'heldout': ...} ('heldout' absent when there is nothing to hold out)."""
    if config.data.path == BUILTIN:
        root = builtin_root(config, distributed)
        splits = {"train": _load(config, "train", root / "train", "folders")}
        if with_heldout:
            splits["heldout"] = _load(config, "heldout", root / "test", "folders")
        return splits
    records = scan(config.data.path, config.data.layout, config.data.expressions,
                   config.data.strict)
    subjects = sorted({r.subject for r in records})
    held = set(holdout_subjects(subjects, config.data.holdout, config.train.seed))
    splits = {"train": _load(config, "train", config.data.path, config.data.layout,
                             [s for s in subjects if s not in held])}
    if held and with_heldout:
        splits["heldout"] = _load(config, "heldout", config.data.path, config.data.layout,
                                  sorted(held))
    return splits


def evaluation_splits(config: Config, variants=OOD_VARIANTS) -> Dict[str, PairedFaces]:
    """Held-out identities and each out-of-distribution variant of the built-in data."""
    root = builtin_root(config)
    splits = {"heldout": _load(config, "heldout", root / "test", "folders")}
    for variant in variants:
        splits[f"ood/{variant}"] = _load(config, f"ood/{variant}", root / "ood" / variant,
                                         "folders")
    return splits
