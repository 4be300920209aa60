"""Times the CPU forward of one LocalRegression case at several batch sizes, on one thread and on
all of them, beside a plain read and a copy of 256 MiB and torch.mm's rate on the same threads.

The weights are read once per call whatever the batch, and every sample adds the same
multiply-adds, so the sweep shows the two limits apart: with one sample the time is mostly the
weight stream (its GB/s is weight bytes / time), with many it is mostly the multiply-adds (their
rate is samples x multiply-adds per sample / time). Where the case's own batch lies between them
tells whether its bandwidth against a copy is held back by the stream, the arithmetic, or their
not overlapping.

    python benchmarks/forward_batch_scaling.py [--case SUBSTRING] [--batches 1 2 4 8 16 32]
                                               [--threads 1 2] [--seconds 0.5]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_regression_cases import (  # noqa: E402
    CASES, IMPLEMENTATIONS, multiply_adds, pass_fn, traffic_bytes, weight_elements)
from local_regression_table import copy_bandwidth, matmul_rate, median_seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="16->16", help="substring of one case's name")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--seconds", type=float, default=0.5, help="timed per measurement")
    args = parser.parse_args()
    names = [name for name in CASES if args.case in name]
    if len(names) != 1:
        sys.exit(f"--case {args.case!r} must select one case of {list(CASES)}")
    if min(args.batches) < 1 or min(args.threads) < 1:
        sys.exit("--batches and --threads must be >= 1")
    name = names[0]
    _, channels, size, kernel, groups = CASES[name]
    per_sample = multiply_adds((1, channels, size, kernel, groups), "forward")
    weight_bytes = weight_elements(CASES[name]) * 4
    source = torch.ones(64 << 20)
    print(f"{name} at other batch sizes, float32 forward, torch {torch.__version__}; weights "
          f"{weight_bytes / 1e6:.1f} MB, {per_sample / 1e6:.1f} M multiply-adds per sample\n")
    print("| threads | read GB/s | copy GB/s | torch.mm G multiply-adds/s | batch | ms | "
          "weight GB/s | G multiply-adds/s | % of torch.mm | % of copy (min traffic) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        read_gbs = source.numel() * 4 / median_seconds(source.sum, "cpu", args.seconds) / 1e9
        copy_gbs = copy_bandwidth("cpu", torch.float32, args.seconds)
        mm_rate = matmul_rate("cpu", torch.float32, args.seconds)
        for batch in args.batches:
            case = (batch, channels, size, kernel, groups)
            fn = pass_fn(IMPLEMENTATIONS["kernel"], case, "cpu", torch.float32, "forward")
            seconds = median_seconds(fn, "cpu", args.seconds)
            traffic = traffic_bytes(case, torch.float32, "forward")
            rate = batch * per_sample / seconds
            print(f"| {threads} | {read_gbs:.1f} | {copy_gbs:.1f} | {mm_rate / 1e9:.1f} | {batch} "
                  f"| {seconds * 1e3:.3f} | {weight_bytes / seconds / 1e9:.1f} | {rate / 1e9:.1f} "
                  f"| {100 * rate / mm_rate:.0f}% | {100 * traffic / seconds / 1e9 / copy_gbs:.0f}% |")


if __name__ == "__main__":
    main()
