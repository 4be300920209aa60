"""reggan-ext: fused C++/CUDA kernels for RegGAN's locally connected regression layer."""

import torch  # loads libtorch, which the kernels library links against

try:
    from reggan_ext import _C  # noqa: F401  (loads the library that registers the ops)
except ImportError as error:
    # Python's own message for a missing _C blames a circular import.
    raise ImportError(
        "reggan_ext's kernels (reggan_ext/_C) are not built, or do not load. They are compiled "
        f"when the package is installed, against the installed torch (now {torch.__version__}): "
        "build them with `pip install --no-build-isolation -e .` in the source tree (README.md, "
        "'Installing by hand'). Python run from inside a source tree imports its reggan_ext/ "
        f"before an installed one. The import failed with: {error}"
    ) from error

from reggan_ext import reference
from reggan_ext.modules import LocalRegression
from reggan_ext.ops import cpu_cache_bytes, cuda_built, empty_cpu_cache, local_regression
from reggan_ext.ridge import RidgeFitter, fit_local_regression, ridge_loss

__all__ = [
    "LocalRegression", "RidgeFitter", "cpu_cache_bytes", "cuda_built", "empty_cpu_cache",
    "fit_local_regression", "local_regression", "reference", "ridge_loss",
]
__version__ = "0.1.0"
