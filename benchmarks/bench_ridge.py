"""pytest-benchmark of the ridge solver; each group holds the kernels and their baselines, so the
ratios come from one run:

    pytest benchmarks/bench_ridge.py --benchmark-group-by=group [--benchmark-columns=min,mean]

Groups: fit-k{3,5,7} (update + solve against the pure-PyTorch reference), gram-k5 (the update
against torch.mm sgemm of the same flop count), solve-k5 (the batched solve against
torch.linalg.cholesky + cholesky_solve), on CPU and on CUDA when available. The workload is the
issue's: N=256 RGB 128x128 images, per-channel regression (groups=3). benchmarks/ridge_table.py
prints the same comparisons as a table with GFLOP/s and the per-pixel numpy loop.
"""

import pytest
import torch

from reggan_ext import RidgeFitter
from ridge_table import gram_flops, ours_fit, reference, solve_contenders, workload

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH, SIZE = 256, 128


def run(benchmark, fn, device, rounds=3):
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("method", ["ours", "ours-float32-statistics", "pytorch-reference"])
def test_fit(benchmark, method, k, device):
    benchmark.group = f"fit-k{k}-{device}"
    layer, x, y = workload(k, BATCH, SIZE, device)
    fn = {"ours": lambda: ours_fit(layer, x, y),
          "ours-float32-statistics": lambda: ours_fit(layer, x, y, torch.float32),
          "pytorch-reference": lambda: reference(layer, x, y)}[method]
    run(benchmark, fn, device, rounds=1 if method == "pytorch-reference" else 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["update-float64", "update-float32", "sgemm-same-flops"])
def test_gram(benchmark, method, device):
    benchmark.group = f"gram-k5-{device}"
    layer, x, y = workload(5, BATCH, SIZE, device)
    if method == "sgemm-same-flops":
        n = round((gram_flops(layer, BATCH) / 2) ** (1 / 3))  # n^3 multiply-adds
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        fn = lambda: a @ b  # noqa: E731
    else:
        dtype = torch.float64 if method == "update-float64" else torch.float32
        fitter = RidgeFitter(layer, dtype=dtype)  # allocated once: time the accumulation alone
        # Reading the statistics sums any batch that update gathered.
        fn = lambda: fitter.update(x, y).statistics  # noqa: E731
    run(benchmark, fn, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", ["ours", "torch-linalg"])
def test_solve(benchmark, method, dtype, device):
    benchmark.group = f"solve-k5-{device}-{str(dtype)[6:]}"
    layer, x, y = workload(5, BATCH, SIZE, device)
    fitter = RidgeFitter(layer, dtype=dtype).update(x, y)
    contenders = solve_contenders(fitter, device)
    run(benchmark, contenders["ours" if method == "ours" else "torch.linalg"], device)
