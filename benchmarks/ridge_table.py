"""Benchmark table of the ridge solver: every ratio is measured side by side in one run, the
contenders taking turns (interleaved) so that a change in the machine's load hits them alike.

    python benchmarks/ridge_table.py [--device cpu|cuda] [--batch 256] [--size 128] [--ks 3 5 7]

What it times, for N samples of RGB size x size images fitted per channel (groups=3,
padding='same') with kernel k:
  - the whole fit (update + solve) against the pure-PyTorch reference (unfold + bmm Gram,
    chunked over N, + torch.linalg.cholesky + cholesky_solve) and against the per-pixel loop of
    masked regression (one small np.linalg.solve per pixel, timed on a sample of pixels and
    scaled to all of them);
  - the Gram accumulation in nominal GFLOP/s (2 flops per multiply-add of the upper triangle
    with the bias, D(D+1)/2 per sample and pixel, over the time; the per-channel CPU kernel
    shares products among entries and does fewer) against torch.mm's sgemm rate (2048^3), in
    turns;
  - the batched solve (the ridge_solve op) against torch.linalg.cholesky + cholesky_solve on the
    same systems;
  - the memory of the statistics against the unfolded copy of the data the reference makes.
"""

import argparse
import time

import numpy as np
import torch

from reggan_ext import LocalRegression, RidgeFitter
from reggan_ext.ridge import _unpack, reference_fit

LAM = 1e-2


def elapsed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(fns, device, rounds=3, once=()):
    """Best wall time of each of fns (name -> function), running them in turn for `rounds`
    rounds (those named in `once` in the first round only, without warm-up), so that a change
    in the machine's load hits every contender alike."""
    for name, fn in fns.items():
        if name not in once:
            fn()
    best = {}
    for round_ in range(rounds):
        for name, fn in fns.items():
            if round_ == 0 or name not in once:
                best[name] = min(best.get(name, float("inf")), elapsed(fn, device))
    return best


def workload(k, batch, size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = LocalRegression(3, 3, k, (size, size), groups=3, padding="same", device=device)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    y = torch.rand(batch, 3, size, size, generator=gen).to(device)
    return layer, x, y


def ours_fit(layer, x, y, dtype=torch.float64):
    return RidgeFitter(layer, dtype=dtype).update(x, y).solve(LAM)


def reference(layer, x, y, chunk=32):
    return reference_fit(layer, [(x[n:n + chunk], y[n:n + chunk]) for n in range(0, len(x), chunk)],
                         LAM)


def numpy_per_pixel_seconds(layer, x, y, pixels=256, seed=0):
    """Seconds per pixel system of the per-pixel loop of masked regression: the design matrix of
    one pixel and channel sliced from the padded image, then np.linalg.solve; timed on `pixels`
    random systems."""
    k = layer.kernel_size[0]
    pad = (k - 1) // 2
    xp = np.pad(x.cpu().double().numpy(), ((0, 0), (0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad)))
    yn = y.cpu().double().numpy()
    rng = np.random.default_rng(seed)
    picks = [(int(rng.integers(3)), int(rng.integers(yn.shape[2])), int(rng.integers(yn.shape[3])))
             for _ in range(pixels)]
    eye = LAM * np.eye(k * k + 1)
    start = time.perf_counter()
    n = xp.shape[0]
    for c, i, j in picks:
        z = xp[:, c, i:i + k, j:j + k].reshape(n, k * k)
        z = np.concatenate([z, np.ones((n, 1))], 1)
        np.linalg.solve(z.T @ z + eye, z.T @ yn[:, c, i, j])
    return (time.perf_counter() - start) / pixels


def gram_flops(k, batch, size):
    d = k * k + 1
    return 2 * d * (d + 1) // 2 * batch * size * size * 3


def solve_comparison(fitter, device):
    """(our solve, torch.linalg) seconds on the fitter's systems."""
    stats = fitter.statistics
    lam_map = torch.full(stats["target_sq"].shape, LAM, dtype=fitter.dtype, device=device)
    d = fitter.unknowns
    eye = torch.eye(d, dtype=fitter.dtype, device=device)
    full = _unpack(stats["gram"].flatten(2), d) + LAM * eye
    rhs = stats["cross"].flatten(2).transpose(1, 2).unsqueeze(-1).contiguous()
    best = interleaved({
        "ours": lambda: torch.ops.reggan_ext.ridge_solve(stats["gram"], stats["cross"], lam_map,
                                                         True),
        "torch.linalg": lambda: torch.cholesky_solve(rhs, torch.linalg.cholesky(full))}, device)
    return best["ours"], best["torch.linalg"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7])
    args = parser.parse_args()
    device = args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU kernels: {torch.ops.reggan_ext.ridge_cpu_isa()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    rows = []
    for k in args.ks:
        layer, x, y = workload(k, args.batch, args.size, device)
        fit = interleaved({"ours": lambda: ours_fit(layer, x, y),
                           "ours32": lambda: ours_fit(layer, x, y, torch.float32),
                           "reference": lambda: reference(layer, x, y)},
                          device, once=("reference",))
        per_pixel = numpy_per_pixel_seconds(layer, x, y) * 3 * args.size ** 2
        # The statistics exist already: time the accumulation alone, against sgemm.
        fitter, fitter32 = RidgeFitter(layer), RidgeFitter(layer, dtype=torch.float32)
        a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
        gram = interleaved({"update": lambda: fitter.update(x, y),
                            "update32": lambda: fitter32.update(x, y),
                            "sgemm": lambda: a @ b}, device, rounds=5)
        sgemm = 2 * 2048 ** 3 / gram["sgemm"] / 1e9
        flops = gram_flops(k, args.batch, args.size)
        solve, linalg = solve_comparison(fitter, device)
        solve32, linalg32 = solve_comparison(fitter32, device)
        stats_bytes = sum(t.numel() * t.element_size() for t in fitter.statistics.values())
        unfolded = args.batch * 3 * k * k * args.size ** 2 * x.element_size()
        rows.append((k, fit["ours"], fit["ours32"], fit["reference"], per_pixel, gram["update"],
                     gram["update32"], flops, sgemm, solve, linalg, solve32, linalg32,
                     stats_bytes, unfolded))

    print("| k | fit (f64 stats) | fit (f32 stats) | PyTorch reference | x reference | "
          "numpy per pixel | x numpy |")
    print("|---|---|---|---|---|---|---|")
    for k, fit, fit32, ref, per_pixel, *_ in rows:
        print(f"| {k} | {fit:.3f} s | {fit32:.3f} s | {ref:.2f} s | {ref / fit:.1f} | "
              f"{per_pixel:.1f} s | {per_pixel / fit:.0f} |")
    print("\n| k | sgemm GFLOP/s | Gram update f64 | nominal GFLOP/s | % of sgemm | "
          "Gram update f32 | nominal GFLOP/s | % of sgemm |")
    print("|---|---|---|---|---|---|---|---|")
    for k, _, _, _, _, update, update32, flops, sgemm, *_ in rows:
        print(f"| {k} | {sgemm:.0f} | {update * 1e3:.0f} ms | {flops / update / 1e9:.0f} | "
              f"{100 * flops / update / 1e9 / sgemm:.0f}% | {update32 * 1e3:.0f} ms | "
              f"{flops / update32 / 1e9:.0f} | {100 * flops / update32 / 1e9 / sgemm:.0f}% |")
    print("\n| k | D | systems | solve f64 | torch.linalg f64 | x | solve f32 | "
          "torch.linalg f32 | x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, *_, solve, linalg, solve32, linalg32, _, _ in rows:
        print(f"| {k} | {k * k + 1} | {3 * args.size ** 2} | {solve * 1e3:.1f} ms | "
              f"{linalg * 1e3:.0f} ms | {linalg / solve:.1f} | {solve32 * 1e3:.1f} ms | "
              f"{linalg32 * 1e3:.0f} ms | {linalg32 / solve32:.1f} |")
    print("\n| k | statistics (f64) | = itemsize * P * (groups D(D+1)/2 + C_out (D+1)) + 8 | "
          "unfolded copy of all N inputs |")
    print("|---|---|---|---|")
    for k, *_, stats_bytes, unfolded in rows:
        d = k * k + 1
        formula = 8 * args.size ** 2 * (3 * d * (d + 1) // 2 + 3 * (d + 1)) + 8
        print(f"| {k} | {stats_bytes / 2 ** 20:.1f} MiB | {formula / 2 ** 20:.1f} MiB "
              f"({'equal' if formula == stats_bytes else 'DIFFERS'}) | "
              f"{unfolded / 2 ** 20:.0f} MiB |")


if __name__ == "__main__":
    main()
