"""reggan-ext: fused C++/CUDA kernels for RegGAN's locally connected regression layer."""

import torch  # noqa: F401  (loads libtorch, which the kernels library links against)

from reggan_ext import _C  # noqa: F401  (loads the library that registers the ops)
from reggan_ext import reference
from reggan_ext.modules import LocalRegression
from reggan_ext.ops import cpu_cache_bytes, cuda_built, empty_cpu_cache, local_regression
from reggan_ext.ridge import RidgeFitter, fit_local_regression, ridge_loss

__all__ = [
    "LocalRegression", "RidgeFitter", "cpu_cache_bytes", "cuda_built", "empty_cpu_cache",
    "fit_local_regression", "local_regression", "reference", "ridge_loss",
]
__version__ = "0.1.0"
