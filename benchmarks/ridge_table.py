"""Benchmark table of the ridge solver: every ratio is measured side by side in one run, the
contenders taking turns (interleaved) so that a change in the machine's load hits them alike.

    python benchmarks/ridge_table.py [--device cpu|cuda] [--batch 256] [--size 128] [--ks 3 5 7]
                                     [--channels 3 3 3]

What it times, for N samples of size x size images with kernel k and padding='same', by default
RGB fitted per channel (--channels C_IN C_OUT GROUPS, 3 3 3):
  - the whole fit (update + solve) against the pure-PyTorch reference (unfold + bmm Gram,
    chunked over N, + torch.linalg.cholesky + cholesky_solve) and against the per-pixel loop of
    masked regression (one small np.linalg.solve per pixel and group, timed on a sample of them
    and scaled to all);
  - the Gram accumulation in nominal GFLOP/s (2 flops per multiply-add of the upper triangle
    with the bias, D(D+1)/2 per sample and pixel, over the time; the per-channel CPU kernel
    shares products among entries and does fewer) against torch.mm's sgemm rate (2048^3), in
    turns;
  - the batched solve (the ridge_solve op) against torch.linalg.cholesky + cholesky_solve on the
    same systems;
  - the memory of the statistics against an unfolded copy of all N inputs in float32 (the
    reference unfolds chunks of 32 samples in float64).
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


def interleaved(fns, device, rounds=3, once=None):
    """Best wall time of each of fns (name -> function), running them in turn for `rounds`
    rounds, so that a change in the machine's load hits every contender alike. Each is warmed
    up first: those in `once` (name -> a cheap warm-up, such as the same call on a few
    samples, which loads the libraries it calls: cuBLAS, cuSOLVER) are timed in the first
    round only."""
    once = once or {}
    for name, fn in fns.items():
        once.get(name, fn)()
    best = {}
    for round_ in range(rounds):
        for name, fn in fns.items():
            if round_ == 0 or name not in once:
                best[name] = min(best.get(name, float("inf")), elapsed(fn, device))
    return best


def workload(k, batch, size, device, channels=(3, 3, 3), seed=0):
    in_channels, out_channels, groups = channels
    gen = torch.Generator().manual_seed(seed)
    layer = LocalRegression(in_channels, out_channels, k, (size, size), groups=groups,
                            padding="same", device=device)
    x = torch.rand(batch, in_channels, size, size, generator=gen).to(device)
    y = torch.rand(batch, out_channels, size, size, generator=gen).to(device)
    return layer, x, y


def unknowns(layer):
    return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1] + 1


def systems(layer):
    return layer.groups * layer.output_size[0] * layer.output_size[1]


def ours_fit(layer, x, y, dtype=torch.float64):
    return RidgeFitter(layer, dtype=dtype).update(x, y).solve(LAM)


def reference(layer, x, y, chunk=32):
    return reference_fit(layer, [(x[n:n + chunk], y[n:n + chunk]) for n in range(0, len(x), chunk)],
                         LAM)


def numpy_per_pixel_seconds(layer, x, y, pixels=256, seed=0):
    """Seconds per pixel system of the per-pixel loop of masked regression: the design matrix of
    one pixel and group sliced from the padded image, then np.linalg.solve for the group's
    outputs; timed on `pixels` random systems."""
    k = layer.kernel_size[0]
    pad = (k - 1) // 2
    xp = np.pad(x.cpu().double().numpy(), ((0, 0), (0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad)))
    yn = y.cpu().double().numpy()
    cin, cout = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    rng = np.random.default_rng(seed)
    picks = [(int(rng.integers(layer.groups)), int(rng.integers(yn.shape[2])),
              int(rng.integers(yn.shape[3]))) for _ in range(pixels)]
    eye = LAM * np.eye(unknowns(layer))
    start = time.perf_counter()
    n = xp.shape[0]
    for g, i, j in picks:
        z = xp[:, g * cin:(g + 1) * cin, i:i + k, j:j + k].reshape(n, cin * k * k)
        z = np.concatenate([z, np.ones((n, 1))], 1)
        np.linalg.solve(z.T @ z + eye, z.T @ yn[:, g * cout:(g + 1) * cout, i, j])
    return (time.perf_counter() - start) / pixels


def gram_flops(layer, batch):
    d = unknowns(layer)
    return 2 * d * (d + 1) // 2 * batch * systems(layer)


def solve_contenders(fitter, device):
    """The batched solve of the fitter's systems at LAM: {"ours": the ridge_solve op,
    "torch.linalg": cholesky + cholesky_solve on the unpacked systems}."""
    stats = fitter.statistics
    gram = stats["gram"]  # (groups, D(D+1)/2, H_out, W_out)
    lam_map = torch.full((gram.shape[0], *gram.shape[2:]), LAM, dtype=fitter.dtype,
                         device=device)
    d = fitter.unknowns
    eye = torch.eye(d, dtype=fitter.dtype, device=device)
    full = _unpack(stats["gram"].flatten(2), d) + LAM * eye   # (groups, P, d, d)
    groups = full.shape[0]
    # (groups, P, d, outputs of a group): a group's outputs share its Gram.
    rhs = stats["cross"].reshape(groups, -1, d, full.shape[1]).permute(0, 3, 2, 1).contiguous()
    return {
        "ours": lambda: torch.ops.reggan_ext.ridge_solve(stats["gram"], stats["cross"], lam_map,
                                                         True),
        "torch.linalg": lambda: torch.cholesky_solve(rhs, torch.linalg.cholesky(full))}


def solve_comparison(fitter, device):
    """(our solve, torch.linalg) seconds on the fitter's systems."""
    best = interleaved(solve_contenders(fitter, device), device)
    return best["ours"], best["torch.linalg"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7])
    parser.add_argument("--channels", type=int, nargs=3, default=[3, 3, 3],
                        metavar=("C_IN", "C_OUT", "GROUPS"))
    args = parser.parse_args()
    device = args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU kernels: {torch.ops.reggan_ext.ridge_cpu_isa()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f"; {args.batch} samples of {args.channels[0]} -> {args.channels[1]} channels, "
          f"groups={args.channels[2]}, {args.size}x{args.size}")
    rows = []
    for k in args.ks:
        layer, x, y = workload(k, args.batch, args.size, device, args.channels)
        fit = interleaved({"ours": lambda: ours_fit(layer, x, y),
                           "ours32": lambda: ours_fit(layer, x, y, torch.float32),
                           "reference": lambda: reference(layer, x, y)},
                          device, once={"reference": lambda: reference(layer, x[:2], y[:2])})
        per_pixel = numpy_per_pixel_seconds(layer, x, y) * systems(layer)
        # The statistics exist already: time the accumulation alone, against sgemm.
        fitter, fitter32 = RidgeFitter(layer), RidgeFitter(layer, dtype=torch.float32)
        a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
        # Reading the statistics sums any batch that update gathered (small ones, on the CPU).
        gram = interleaved({"update": lambda: fitter.update(x, y).statistics,
                            "update32": lambda: fitter32.update(x, y).statistics,
                            "sgemm": lambda: a @ b}, device, rounds=5)
        sgemm = 2 * 2048 ** 3 / gram["sgemm"] / 1e9
        flops = gram_flops(layer, args.batch)
        solve, linalg = solve_comparison(fitter, device)
        solve32, linalg32 = solve_comparison(fitter32, device)
        stats_bytes = sum(t.numel() * t.element_size() for t in fitter.statistics.values())
        unfolded = args.batch * layer.in_channels * k * k * args.size ** 2 * x.element_size()
        rows.append((layer, k, fit["ours"], fit["ours32"], fit["reference"], per_pixel,
                     gram["update"], gram["update32"], flops, sgemm, solve, linalg, solve32,
                     linalg32, stats_bytes, unfolded))

    print("| k | fit (f64 stats) | fit (f32 stats) | PyTorch reference | x reference | "
          "numpy per pixel | x numpy |")
    print("|---|---|---|---|---|---|---|")
    for _, k, fit, fit32, ref, per_pixel, *_ in rows:
        print(f"| {k} | {fit:.3f} s | {fit32:.3f} s | {ref:.2f} s | {ref / fit:.1f} | "
              f"{per_pixel:.1f} s | {per_pixel / fit:.0f} |")
    print("\n| k | sgemm GFLOP/s | Gram update f64 | nominal GFLOP/s | % of sgemm | "
          "Gram update f32 | nominal GFLOP/s | % of sgemm |")
    print("|---|---|---|---|---|---|---|---|")
    for _, k, _, _, _, _, update, update32, flops, sgemm, *_ in rows:
        print(f"| {k} | {sgemm:.0f} | {update * 1e3:.0f} ms | {flops / update / 1e9:.0f} | "
              f"{100 * flops / update / 1e9 / sgemm:.0f}% | {update32 * 1e3:.0f} ms | "
              f"{flops / update32 / 1e9:.0f} | {100 * flops / update32 / 1e9 / sgemm:.0f}% |")
    print("\n| k | D | systems | solve f64 | torch.linalg f64 | x | solve f32 | "
          "torch.linalg f32 | x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer, k, *_, solve, linalg, solve32, linalg32, _, _ in rows:
        print(f"| {k} | {unknowns(layer)} | {systems(layer)} | {solve * 1e3:.1f} ms | "
              f"{linalg * 1e3:.0f} ms | {linalg / solve:.1f} | {solve32 * 1e3:.1f} ms | "
              f"{linalg32 * 1e3:.0f} ms | {linalg32 / solve32:.1f} |")
    print("\n| k | statistics (f64) | = itemsize * P * (groups D(D+1)/2 + C_out (D+1)) + 8 | "
          "unfolded copy of all N inputs |")
    print("|---|---|---|---|")
    for layer, k, *_, stats_bytes, unfolded in rows:
        d = unknowns(layer)
        formula = 8 * args.size ** 2 * (layer.groups * d * (d + 1) // 2
                                        + layer.out_channels * (d + 1)) + 8
        print(f"| {k} | {stats_bytes / 2 ** 20:.1f} MiB | {formula / 2 ** 20:.1f} MiB "
              f"({'equal' if formula == stats_bytes else 'DIFFERS'}) | "
              f"{unfolded / 2 ** 20:.0f} MiB |")


if __name__ == "__main__":
    main()
