"""Processes and devices: torchrun/DDP set-up, device choice, seeding, logging."""

import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from reggan.errors import RegganError

log = logging.getLogger("reggan")


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Optional[object] = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0,
                   setting: str = "train.device (--device)") -> torch.device:
    """The device `name` ('auto', 'cpu', 'cuda', 'cuda:N', or N for cuda:N); errors name the
    `setting` the user gave it with."""
    requested = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.isdigit():
        name = f"cuda:{name}"
    expected = f"{setting} must be auto, cpu, cuda, cuda:N or N, got {requested!r}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RegganError(expected) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RegganError(f"{setting} {requested!r} asks for CUDA, which is not available "
                              f"(torch {torch.__version__}); use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise RegganError(f"{setting} {requested!r} names a GPU this machine lacks (it has "
                              f"{torch.cuda.device_count()})")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise RegganError(expected)
    return device


def init_distributed(device_name: str) -> Distributed:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on
    CUDA); a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(rank=rank, world=world, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, for random streams that depend only on (seed, step, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def setup_logging(verbose: bool = False) -> None:
    """Warnings and progress lines on stderr as 'reggan: ...'; other ranks stay quiet."""
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("reggan").setLevel(logging.ERROR)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("reggan")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
