"""pytest-benchmark suite: the LocalRegression kernels against the pure-PyTorch references.

    pytest benchmarks/bench_local_regression.py --benchmark-group-by=param:case,param:which

Every case runs on the CPU and, where a GPU and the CUDA kernels are there, on CUDA. Compare
implementations within one run (the table script prints the ratios directly)."""

import pytest
import torch

import reggan_ext
from local_regression_cases import CASES, IMPLEMENTATIONS, PASSES, pass_fn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and reggan_ext.cuda_built() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("case", list(CASES))
def test_local_regression(benchmark, case, which, impl, device):
    fn = pass_fn(IMPLEMENTATIONS[impl], CASES[case], device, torch.float32, which)
    if device == "cuda":
        run = fn

        def fn():
            run()
            torch.cuda.synchronize()

    benchmark(fn)
