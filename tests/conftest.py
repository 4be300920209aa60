import os

import pytest
import torch

import reggan_ext

# GPU tests run wherever a GPU is visible; a CUDA machine with a CPU-only build fails loudly in
# test_cuda_kernels_are_built rather than skipping them.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    return f"torch {torch.__version__}, reggan_ext CUDA kernels built: {reggan_ext.cuda_built()}"


def skip_if_missing(*distributions):
    """Skips a test whose distributions of the metrics extra are not installed, or fails it under
    REGGAN_REQUIRE_METRICS=1, which `make test` sets as it installs the extra: there a broken
    install must not pass as skipped checks."""
    from reggan.metrics._assets import METRICS_EXTRA_HINT, missing_distributions
    missing = missing_distributions(*distributions)
    if missing:
        message = f"metrics extra not installed (missing {', '.join(missing)}): {METRICS_EXTRA_HINT}"
        if os.environ.get("REGGAN_REQUIRE_METRICS") == "1":
            pytest.fail(message)
        pytest.skip(message)
