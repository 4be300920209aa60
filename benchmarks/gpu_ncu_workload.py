"""One forward+backward of the per-channel k3 case with 256 images (the issue's batch x16), for
ncu in benchmarks/gpu_check.sh: the three local_regression kernels at a size that fills the GPU."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_regression_cases import (  # noqa: E402
    CASES, IMPLEMENTATIONS, pass_fn, scaled_cases)


def main():
    case = scaled_cases(CASES, 16)["N256 3->3 per-channel 128x128 k3"]
    pass_fn(IMPLEMENTATIONS["kernel"], case, "cuda", torch.float32, "forward+backward")()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
