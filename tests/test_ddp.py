"""LocalRegression under DistributedDataParallel: two gloo processes on loopback produce the
gradients of one process that sees the whole batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from reggan_ext import LocalRegression


def make_model():
    torch.manual_seed(0)
    return LocalRegression(3, 3, 3, (12, 10), padding="same", groups=3, dtype=torch.float64)


def make_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 12, 10, dtype=torch.float64, generator=generator)
    return x, torch.randn(x.shape, dtype=torch.float64, generator=generator)


def ddp_worker(rank, world_size, init_file, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        x, y = make_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        F.mse_loss(model(x[shard]), y[shard]).backward()
        torch.save({n: p.grad for n, p in model.module.named_parameters()},
                   os.path.join(out_dir, f"grads{rank}.pt"))
        dist.barrier()  # no rank tears down gloo while the other still uses it
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = make_model()
    x, y = make_batch()
    F.mse_loss(model(x), y).backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, param in model.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-14)
