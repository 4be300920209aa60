"""LocalRegression under DistributedDataParallel: two gloo processes on loopback produce the
gradients of one process that sees the whole batch, over two backwards (the second accumulates
into the first's gradients), for a small layer and for one whose weight gradient comes from the
kernels' cache of large CPU outputs (35 MiB, at least 32)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from reggan_ext import LocalRegression

# name -> (channels, groups, size)
LAYERS = {"small": (3, 3, (12, 10)), "cached gradient": (8, 1, (80, 100))}


def make_model(layer):
    channels, groups, size = LAYERS[layer]
    torch.manual_seed(0)
    return LocalRegression(channels, channels, 3, size, padding="same", groups=groups,
                           dtype=torch.float64)


def make_batch(layer):
    channels, _, size = LAYERS[layer]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, channels, *size, dtype=torch.float64, generator=generator)
    return x, torch.randn(x.shape, dtype=torch.float64, generator=generator)


def two_steps(model, x, y):
    for _ in range(2):
        F.mse_loss(model(x), y).backward()


def ddp_worker(rank, world_size, init_file, out_dir, layer):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model(layer))
        x, y = make_batch(layer)
        shard = slice(rank * 4, (rank + 1) * 4)
        two_steps(model, x[shard], y[shard])
        torch.save({n: p.grad for n, p in model.module.named_parameters()},
                   os.path.join(out_dir, f"grads{rank}.pt"))
        dist.barrier()  # no rank tears down gloo while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layer", LAYERS)
def test_ddp_gloo_two_processes_match_single_process(tmp_path, layer):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), layer), nprocs=2,
             join=True)
    model = make_model(layer)
    x, y = make_batch(layer)
    two_steps(model, x, y)
    if layer == "cached gradient":
        assert model.weight.grad.nbytes >= 32 << 20
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, param in model.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-14)
