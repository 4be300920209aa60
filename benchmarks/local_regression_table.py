"""Times the LocalRegression kernels against the pure-PyTorch references side by side in one
process and prints a Markdown table of ratios, with the achieved bandwidth against a memory copy
timed in the same run (before each case; the fastest of those copies) and the peak extra memory
of each forward+backward. Against the machine's limits too: the roofline of a pass is the longer
of its minimal traffic at the copy's rate and its multiply-adds at the rate of a float matrix
product (torch.mm, timed like the copy; full precision, no TF32).
`--batch-multiplier` scales every case's batch (on a GPU, the issue's batches of 8-16 images
take a few microseconds, so launch overhead rather than bandwidth would be measured).

    python benchmarks/local_regression_table.py [--device cpu|cuda] [--dtype float32|float64]
                                                [--batch-multiplier M] [--quick] [--json PATH]

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what the inputs hold; on the CPU, the
growth of the peak resident set (VmHWM) of a fresh subprocess while one forward+backward runs in
it, so it counts every temporary, freed or not, to page granularity."""

import argparse
import json
import os
import re
import subprocess
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_regression_cases import (  # noqa: E402
    CASES, IMPLEMENTATIONS, PASSES, QUICK_CASES, multiply_adds, pass_fn, scaled_cases,
    traffic_bytes)


def median_seconds(fn, device, min_run_time):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    # Timer runs its statement on one thread unless told otherwise.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device, dtype, min_run_time):
    """GB/s of a 256 MiB tensor copy, counting bytes read and written."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).normal_().to(dtype)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, min_run_time)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def matmul_rate(device, dtype, min_run_time):
    """Multiply-adds per second of torch.mm on two 2048 x 2048 matrices."""
    n = 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return n ** 3 / median_seconds(lambda: torch.mm(a, b), device, min_run_time)


def peak_memory_cuda(impl, case, dtype):
    fn = pass_fn(IMPLEMENTATIONS[impl], case, "cuda", dtype, "forward+backward")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory_cpu(impl, case_name, dtype, batch_multiplier):
    out = subprocess.run(
        [sys.executable, __file__, "--measure-rss", impl, case_name, "--dtype", dtype,
         "--batch-multiplier", str(batch_multiplier)],
        check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def peak_rss_bytes():
    """This process's peak resident set. Not ru_maxrss: Linux carries that over from the parent
    across fork and exec, so in a child of the table's large process it read the parent's peak
    before and after the call, a growth of 0."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure_rss(impl, case_name, dtype, batch_multiplier):
    """Child process: prints the peak-RSS growth (bytes) of one forward+backward."""
    cases = scaled_cases({**CASES, **QUICK_CASES}, batch_multiplier)
    fn = pass_fn(IMPLEMENTATIONS[impl], cases[case_name], "cpu", getattr(torch, dtype),
                 "forward+backward")
    # A first call in a process grows the resident set by some 35 MiB whatever its size
    # (allocator arenas, thread pools, code pages): the tiny case pays for that first.
    pass_fn(IMPLEMENTATIONS[impl], next(iter(QUICK_CASES.values())), "cpu", getattr(torch, dtype),
            "forward+backward")()
    # Reset the peak to the current resident set (Linux >= 4.0), so that the growth counts from
    # the call and not from the peak that building the inputs left.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak_rss_bytes()
    fn()
    print(peak_rss_bytes() - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch-multiplier", type=int, default=1, metavar="M",
                        help="multiply every case's batch by M")
    parser.add_argument("--quick", action="store_true", help="one tiny case (a smoke run)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--measure-rss", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_rss:
        measure_rss(*args.measure_rss, args.dtype, args.batch_multiplier)
        return
    import reggan_ext

    # The matrix product is the compute limit of exact float32 arithmetic, not of TF32's.
    torch.set_float32_matmul_precision("highest")

    if args.device == "cuda" and not (torch.cuda.is_available() and reggan_ext.cuda_built()):
        sys.exit("--device cuda needs a GPU and a CUDA build of reggan_ext")
    dtype = getattr(torch, args.dtype)
    if args.batch_multiplier < 1:
        sys.exit(f"--batch-multiplier must be a positive integer, got {args.batch_multiplier}")
    cases = scaled_cases(QUICK_CASES if args.quick else CASES, args.batch_multiplier)
    min_run_time = 0.05 if args.quick else 0.5
    # A copy is timed before each case, and the fastest stands for the machine: on a shared
    # machine one copy may land in a slow spell and flatter every ratio against it.
    copies, matmuls = [], []
    rows = []
    for case_name, case in cases.items():
        copies.append(copy_bandwidth(args.device, dtype, min_run_time))
        matmuls.append(matmul_rate(args.device, dtype, min_run_time))
        times = {(impl, which): median_seconds(pass_fn(fn, case, args.device, dtype, which),
                                               args.device, min_run_time)
                 for impl, fn in IMPLEMENTATIONS.items() for which in PASSES}
        peak = {impl: (peak_memory_cuda(impl, case, dtype) if args.device == "cuda"
                       else peak_memory_cpu(impl, case_name, args.dtype, args.batch_multiplier))
                for impl in IMPLEMENTATIONS}
        traffic = {w: traffic_bytes(case, dtype, w) for w in ("forward", "backward")}
        gbs = {w: traffic[w] / times["kernel", w] / 1e9 for w in traffic}
        rows.append(dict(case=case_name, times_ms={f"{i} {w}": t * 1e3 for (i, w), t in times.items()},
                         forward_gbs=gbs["forward"], backward_gbs=gbs["backward"],
                         multiply_adds={w: multiply_adds(case, w) for w in traffic},
                         traffic_bytes=traffic,
                         peak_mib={i: p / 2**20 for i, p in peak.items()}))
    copy_gbs = max(copies)
    matmul_gmacs = max(matmuls) / 1e9
    for row in rows:
        row["copy_gbs"] = copy_gbs
        row["matmul_gmacs"] = matmul_gmacs

    print(f"device {args.device} ({torch.get_num_threads()} threads), {args.dtype}, torch "
          f"{torch.__version__}; memory copy {copy_gbs:.1f} GB/s and torch.mm "
          f"{matmul_gmacs:.1f} G multiply-adds/s (the fastest of {len(copies)} of each timed "
          f"through the run; the slowest {min(copies):.1f} GB/s and "
          f"{min(matmuls) / 1e9:.1f} G/s)\n")
    print("| case | pass | kernel ms | shifted ms | unfold ms | vs shifted | vs unfold |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        t = row["times_ms"]
        for which in PASSES:
            k, s, u = (t[f"{impl} {which}"] for impl in IMPLEMENTATIONS)
            print(f"| {row['case']} | {which} | {k:.3f} | {s:.3f} | {u:.2f} | {s / k:.1f}x | "
                  f"{u / k:.1f}x |")
    print("\n| case | forward GB/s (min traffic) | % of copy | backward GB/s (min traffic) | "
          "% of copy | peak MiB kernel / shifted / unfold |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        p = row["peak_mib"]
        print(f"| {row['case']} | {row['forward_gbs']:.1f} | "
              f"{100 * row['forward_gbs'] / row['copy_gbs']:.0f}% | {row['backward_gbs']:.1f} | "
              f"{100 * row['backward_gbs'] / row['copy_gbs']:.0f}% | "
              f"{p['kernel']:.1f} / {p['shifted']:.1f} / {p['unfold']:.1f} |")
    print("\n| case | pass | G multiply-adds/s | % of torch.mm | roofline ms | bound | "
          "% of roofline |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        for which in ("forward", "backward"):
            seconds = row["times_ms"][f"kernel {which}"] / 1e3
            rate = row["multiply_adds"][which] / seconds / 1e9
            memory = row["traffic_bytes"][which] / row["copy_gbs"] / 1e9
            compute = row["multiply_adds"][which] / row["matmul_gmacs"] / 1e9
            print(f"| {row['case']} | {which} | {rate:.1f} | "
                  f"{100 * rate / row['matmul_gmacs']:.0f}% | {max(memory, compute) * 1e3:.3f} | "
                  f"{'memory' if memory >= compute else 'multiply-adds'} | "
                  f"{100 * max(memory, compute) / seconds:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, dtype=args.dtype, torch=torch.__version__,
                           copies_gbs=copies, matmul_gmacs=[m / 1e9 for m in matmuls],
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
