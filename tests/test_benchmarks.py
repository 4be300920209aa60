"""The benchmark scripts run and report what they claim: peak memory, rooflines, threads, batch
scaling and the side-by-side comparison of two builds (tiny timings; nothing is asserted on
speed)."""

import json
import os
import subprocess
import sys

import torch

import reggan_ext


def test_table_measures_peak_memory_below_a_large_parent():
    """The table measures each peak in a child process; a child's ru_maxrss starts at its
    parent's, which once made every figure of a full run read 0."""
    ballast = torch.ones(2**27)  # 512 MiB resident in this process, the child's parent
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "local_regression_table.py"),
         "--measure-rss", "kernel", "N16 3->3 per-channel 128x128 k3"],
        check=True, capture_output=True, text=True).stdout
    del ballast
    # At least the output and the three gradients (3 + 3 + 1.7 + 0.2 MiB) are new.
    assert int(out) > 7 * 2**20


def test_table_reports_each_pass_against_its_roofline(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    from local_regression_cases import QUICK_CASES, make_inputs

    report = tmp_path / "table.json"
    out = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "local_regression_table.py"), "--quick",
         "--json", str(report)], check=True, capture_output=True, text=True).stdout
    (name, case), = QUICK_CASES.items()
    x, w, _ = make_inputs(case, "cpu", torch.float32)
    row, = json.loads(report.read_text())["rows"]
    # A multiply-add per weight and sample; the backward's two gradients do as many each.
    assert row["multiply_adds"] == {"forward": x.shape[0] * w.numel(),
                                    "backward": 2 * x.shape[0] * w.numel()}
    assert row["matmul_gmacs"] > 0
    bounds = [line.split("|")[6].strip() for line in out.splitlines()
              if line.startswith(f"| {name} | ")]
    assert bounds.count("memory") + bounds.count("multiply-adds") == 2  # forward and backward


def test_table_times_with_the_threads_it_reports(monkeypatch):
    """torch.utils.benchmark.Timer runs on one thread by default, which once made the table time
    the kernels single-threaded under a header that named every thread."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import local_regression_table

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        local_regression_table.median_seconds(lambda: seen.append(torch.get_num_threads()),
                                              "cpu", 0.01)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {2}


def test_forward_batch_scaling_times_every_batch_and_thread_count():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "forward_batch_scaling.py")
    out = subprocess.run(
        [sys.executable, script, "--case", "per-channel 128x128 k3", "--batches", "1", "3",
         "--threads", "1", "2", "--seconds", "0.01"],
        check=True, capture_output=True, text=True).stdout
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [(row[0], row[4]) for row in rows] == [("1", "1"), ("1", "3"), ("2", "1"), ("2", "3")]
    assert all(float(row[3]) > 0 and float(row[5]) > 0 for row in rows)  # torch.mm rate, ms
    ambiguous = subprocess.run([sys.executable, script, "--case", "per-channel"],
                               capture_output=True, text=True)
    assert ambiguous.returncode != 0 and "must select one case" in ambiguous.stderr


def test_compare_builds_times_both_builds(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "compare_builds.py")
    # The folder holding the built package under test: this tree when built in place, else the
    # site-packages it was installed into.
    build = os.path.dirname(os.path.dirname(os.path.abspath(reggan_ext.__file__)))
    out = subprocess.run(
        [sys.executable, script, build, build, "--rounds", "1", "--seconds", "0.01",
         "--pass", "forward", "--case", "per-channel 128x128 k3", "--batch-multiplier", "2"],
        check=True, capture_output=True, text=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| N32")]
    assert len(rows) == 1 and all(float(ratio) > 0 for ratio in rows[0][-2:]), out
    # What a child times for the backward's kernels alone, in this process (a subprocess each
    # would mostly time importing torch).
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import compare_builds
    for which in compare_builds.KERNEL_PASSES:
        case = compare_builds.CASES["N16 3->3 per-channel 128x128 k3"]
        assert compare_builds.time_in_this_process(case, which, 0) > 0
    ridge_case = compare_builds.RIDGE_CASES["N8 3->3 groups=1 64x64 k5"]
    assert compare_builds.time_in_this_process(ridge_case, compare_builds.RIDGE_PASS, 0) > 0
    missing = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "holds no reggan_ext package" in missing.stderr
    # A package that fails to import: the child's traceback reaches the user.
    (tmp_path / "reggan_ext").mkdir()
    (tmp_path / "reggan_ext" / "__init__.py").write_text("raise ImportError('not built')\n")
    broken = subprocess.run([sys.executable, script, str(tmp_path), build, "--rounds", "1",
                             "--seconds", "0.01", "--case", "per-channel 128x128 k3"],
                            capture_output=True, text=True)
    assert broken.returncode != 0 and "the baseline build" in broken.stderr
    assert "ImportError: not built" in broken.stderr
    # --candidate-env reaches the candidate's subprocesses and not the baseline's: a Python
    # that cannot start fails the candidate only.
    no_python = subprocess.run([sys.executable, script, build, build, "--rounds", "1",
                                "--seconds", "0.01", "--case", "per-channel 128x128 k3",
                                "--candidate-env", f"PYTHONHOME={tmp_path / 'missing'}"],
                               capture_output=True, text=True)
    assert no_python.returncode != 0 and "the candidate build" in no_python.stderr
    malformed = subprocess.run([sys.executable, script, build, "--candidate-env", "=1"],
                               capture_output=True, text=True)
    assert malformed.returncode != 0 and "NAME=VALUE" in malformed.stderr
    for arguments, message in ((["--batch-multiplier", "0"], "must be >= 1"),
                               (["--batch-multiplier", "2", "--pass", "ridge-update"],
                                "not ridge-update's")):
        refused = subprocess.run([sys.executable, script, build, *arguments],
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and message in refused.stderr
