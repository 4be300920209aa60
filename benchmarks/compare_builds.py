"""Times the LocalRegression benchmark cases, or with `--pass ridge-update` RidgeFitter.update on
the ridge cases below (a stream of batches, then the statistics read), under two builds of
reggan_ext, in subprocesses that alternate between the builds round by round, so that both see
the same drift of a shared, noisy machine. A build is a source tree whose reggan_ext/_C has been
built in place (`python setup.py build_ext --inplace`), e.g. a `git worktree` of the commit to
compare with.

    python benchmarks/compare_builds.py BASELINE_TREE [CANDIDATE_TREE] [--pass forward+backward]
                                        [--rounds 4] [--seconds 1.5] [--case SUBSTRING ...]
                                        [--candidate-env NAME=VALUE ...] [--batch-multiplier 4]

`--pass input-gradient` and `--pass weight-gradient` time one of the backward's two kernels
alone, without autograd and the other kernel around it. Prints, per case, the median and
fastest time of each build over the rounds and the ratios of both: on a machine whose
neighbours slow some rounds, the fastest rounds are the less disturbed.
With --candidate-env the candidate's subprocesses also get those environment variables: one
tree given twice then compares a setting, e.g. THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator
asks for transparent huge pages). --batch-multiplier times the LocalRegression cases at larger
batches (their names saying so). The LocalRegression cases include the tests' tiny one, whose
time is mostly the cost of a call (Python, dispatch, autograd) rather than its kernels."""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from reggan_ext import RidgeFitter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from local_regression_cases import (  # noqa: E402
    CASES, IMPLEMENTATIONS, PASSES, QUICK_CASES, make_inputs, pass_fn, scaled_cases)
from ridge_table import workload  # noqa: E402

RIDGE_PASS = "ridge-update"
KERNEL_PASSES = ("input-gradient", "weight-gradient")
# name -> (samples, in_channels, out_channels, groups, size, kernel, batch): the samples go to
# RidgeFitter.update in batches of `batch`, and the statistics are read once at the end. Float32
# data, float64 statistics, padding 'same'.
RIDGE_CASES = {
    "N256 3->3 per-channel 128x128 k3": (256, 3, 3, 3, 128, 3, 256),
    "N128 3->3 groups=1 128x128 k3": (128, 3, 3, 1, 128, 3, 128),
    "N128 3->3 groups=1 128x128 k5": (128, 3, 3, 1, 128, 5, 128),
    "N128 3->3 groups=1 128x128 k7": (128, 3, 3, 1, 128, 7, 128),
    "N128 4->4 groups=2 128x128 k5": (128, 4, 4, 2, 128, 5, 128),
    "N128 6->6 groups=1 64x64 k5": (128, 6, 6, 1, 64, 5, 128),
    "N128 8->8 groups=1 64x64 k3": (128, 8, 8, 1, 64, 3, 128),
    "N8 3->3 groups=1 64x64 k5": (8, 3, 3, 1, 64, 5, 8),
    "N256 3->3 per-channel 128x128 k3, batches of 8": (256, 3, 3, 3, 128, 3, 8),
    "N256 3->3 per-channel 128x128 k5, batches of 8": (256, 3, 3, 3, 128, 5, 8),
    "N256 3->3 per-channel 128x128 k5, batches of 64": (256, 3, 3, 3, 128, 5, 64),
    "N256 3->3 per-channel 128x128 k7, batches of 16": (256, 3, 3, 3, 128, 7, 16),
}


def ridge_update_fn(case):
    samples, in_channels, out_channels, groups, size, kernel, batch = case
    layer, x, y = workload(kernel, samples, size, "cpu", (in_channels, out_channels, groups))
    fitter = RidgeFitter(layer)

    def stream():
        for start in range(0, samples, batch):
            fitter.update(x[start:start + batch], y[start:start + batch])
        return fitter.statistics

    return stream


def backward_kernel_fn(case, which):
    """One of the backward's kernels, called as autograd calls it for the case's layer."""
    batch, channels, size, kernel, groups = case
    x, w, _ = make_inputs(case, "cpu", torch.float32)
    grad = torch.randn(batch, channels, size, size)
    geometry = ([1, 1], [kernel // 2] * 2, [1, 1], groups)
    if which == "input-gradient":
        op = torch.ops.reggan_ext.local_regression_backward_input.default
        return lambda: op(grad, w, [size, size], *geometry)
    op = torch.ops.reggan_ext.local_regression_backward_weight.default
    return lambda: op(grad, x, [kernel, kernel], *geometry)


def time_in_this_process(case, which, seconds):
    """Child: the mean seconds of one pass over repetitions filling `seconds` (at least one)."""
    if which == RIDGE_PASS:
        fn = ridge_update_fn(case)
    elif which in KERNEL_PASSES:
        fn = backward_kernel_fn(case, which)
    else:
        fn = pass_fn(IMPLEMENTATIONS["kernel"], case, "cpu", torch.float32, which)
    fn()
    start, calls = time.perf_counter(), 0
    while calls == 0 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="source tree of the baseline build")
    parser.add_argument("candidate", nargs="?", default=os.path.dirname(HERE),
                        help="source tree of the candidate build (default: this one)")
    parser.add_argument("--pass", dest="which", default="forward+backward",
                        choices=PASSES + KERNEL_PASSES + (RIDGE_PASS,))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.5, help="timed per run")
    parser.add_argument("--case", nargs="*", default=[],
                        help="substrings selecting cases (default: every case)")
    parser.add_argument("--candidate-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment variables of the candidate's subprocesses only")
    parser.add_argument("--batch-multiplier", type=int, default=1,
                        help="multiplies the batch of every LocalRegression case")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_multiplier < 1:
        sys.exit("--batch-multiplier must be >= 1")
    if args.which == RIDGE_PASS and args.batch_multiplier != 1:
        sys.exit("--batch-multiplier applies to the LocalRegression cases, not ridge-update's")
    all_cases = (RIDGE_CASES if args.which == RIDGE_PASS
                 else scaled_cases({**CASES, **QUICK_CASES}, args.batch_multiplier))
    if args.child:
        print(time_in_this_process(all_cases[args.child[0]], args.child[1], args.seconds))
        return
    malformed = [item for item in args.candidate_env
                 if "=" not in item or not item.partition("=")[0]]
    if malformed:
        sys.exit(f"--candidate-env takes NAME=VALUE items, got {malformed}")
    builds = {"baseline": os.path.abspath(args.baseline),
              "candidate": os.path.abspath(args.candidate)}
    extra_env = {"baseline": {},
                 "candidate": dict(item.split("=", 1) for item in args.candidate_env)}
    for tree in builds.values():
        if not os.path.isdir(os.path.join(tree, "reggan_ext")):
            sys.exit(f"{tree} holds no reggan_ext package")
    cases = [name for name in all_cases if not args.case or any(s in name for s in args.case)]
    if not cases:
        sys.exit(f"no case matches {args.case}; the cases: {list(all_cases)}")
    times = {(case, build): [] for case in cases for build in builds}
    for _ in range(args.rounds):
        for case in cases:
            for build, tree in builds.items():
                child = subprocess.run(
                    [sys.executable, __file__, tree, "--seconds", str(args.seconds),
                     "--batch-multiplier", str(args.batch_multiplier), "--child", case, args.which],
                    env={**os.environ, "PYTHONPATH": tree, **extra_env[build]}, cwd=tree,
                    capture_output=True, text=True)
                if child.returncode != 0:
                    sys.exit(f"the {build} build ({tree}) failed on {case}:\n{child.stderr}")
                times[case, build].append(float(child.stdout.split()[-1]))
    print(f"{args.which}, ms, {args.rounds} alternating rounds of {args.seconds} s each"
          + (f"; the candidate with {' '.join(args.candidate_env)}" if args.candidate_env else ""))
    print("| case | baseline median (min) | candidate median (min) | candidate / baseline, "
          "medians | fastest |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for case in cases:
        base, cand = times[case, "baseline"], times[case, "candidate"]
        print(f"| {case} | {statistics.median(base) * 1e3:.3f} ({min(base) * 1e3:.3f}) | "
              f"{statistics.median(cand) * 1e3:.3f} ({min(cand) * 1e3:.3f}) | "
              f"{statistics.median(cand) / statistics.median(base):.2f} | "
              f"{min(cand) / min(base):.2f} |")


if __name__ == "__main__":
    main()
