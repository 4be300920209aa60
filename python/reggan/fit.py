"""Stage 1: fitting the regression layers to the paired data.

closed_form (default): each target expression's LocalRegression is the ridge solution
    argmin_W sum_pairs ||layer_W(source) - target||^2 + lam ||W||^2
computed by reggan_ext.RidgeFitter from streamed sufficient statistics (summed across DDP ranks
with all_reduce), with lam fixed (0.4 on [0, 1] images, bias penalized, as masked regression
used) or chosen among candidates by generalized cross-validation.
gradient: the same objective minimized by Adam on reggan_ext.ridge_loss over mini-batches.

With data.flip, each pair also contributes its mirror image (faces are left-right symmetric).
"""

import logging
import time
from typing import Dict, Iterator, Tuple

import torch

import reggan_ext
from reggan.config import FitConfig
from reggan.data import PairedFaces
from reggan.errors import RegganError
from reggan.models import RegressionStage
from reggan.runtime import Distributed, derived_seed

log = logging.getLogger("reggan")


def _solver(name: str):
    found = getattr(reggan_ext, name, None)
    if found is None:
        raise RegganError(f"stage-1 fitting needs reggan_ext.{name} (the ridge solver), which "
                          f"this build of reggan_ext {reggan_ext.__version__} lacks")
    return found


def _pairs_of(data: PairedFaces, target: int, distributed: Distributed) -> torch.Tensor:
    """This rank's share of the pairs of one target expression."""
    rows = (data.pairs[:, 2] == target).nonzero().squeeze(1)
    return rows[distributed.rank::distributed.world]


def _batches(data: PairedFaces, rows: torch.Tensor, batch_size: int, flip: bool,
             device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, rows.numel(), batch_size):
        source, target, _, _ = data.batch(rows[start:start + batch_size], device)
        yield source, target
        if flip:
            yield source.flip(3), target.flip(3)


def fit_regression(stage: RegressionStage, data: PairedFaces, fit: FitConfig, device,
                   distributed: Distributed, flip: bool = True,
                   progress: bool = False) -> Dict[str, object]:
    """Fit every layer of `stage` in place; returns the lambda used per target expression."""
    started = time.perf_counter()
    if fit.method == "closed_form":
        chosen = _closed_form(stage, data, fit, device, distributed, flip, progress)
    else:
        chosen = _gradient(stage, data, fit, device, distributed, flip, progress)
    log.info("stage 1 (%s) fitted %d regression layers in %.1f s", fit.method,
             len(stage.layers), time.perf_counter() - started)
    return chosen


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="layer", dynamic_ncols=True)


def _closed_form(stage, data, fit, device, distributed, flip, progress):
    RidgeFitter = _solver("RidgeFitter")
    chosen = {}
    for e in _progress(range(len(stage.layers)), progress, "fit stage 1"):
        layer = stage.layers[e]
        fitter = RidgeFitter(layer, penalize_bias=fit.penalize_bias, dtype=torch.float64)
        for source, target in _batches(data, _pairs_of(data, e, distributed), fit.batch_size,
                                       flip, device):
            fitter.update(source, target)
        if distributed.active:
            fitter.all_reduce()
        if fitter.count == 0:
            raise RegganError(f"no training pair has the target expression {data.targets[e]!r}")
        try:
            if fit.select == "gcv":
                lam = fitter.fit_(layer, fit.lam_candidates, select="gcv", scope=fit.gcv_scope)
            else:
                lam = fitter.fit_(layer, fit.lam)
        except RuntimeError as error:
            raise RegganError(f"ridge fit of {data.targets[e]!r} failed: {error}") from None
        chosen[data.targets[e]] = lam if isinstance(lam, float) else "per-pixel map"
        if isinstance(lam, float) and fit.select == "gcv":
            log.info("GCV chose lambda %.3g for %s", lam, data.targets[e])
    return chosen


def _gradient(stage, data, fit, device, distributed, flip, progress):
    ridge_loss = _solver("ridge_loss")
    chosen = {}
    for e in _progress(range(len(stage.layers)), progress, "fit stage 1 (gradient)"):
        layer = stage.layers[e]
        rows = (data.pairs[:, 2] == e).nonzero().squeeze(1)
        total = rows.numel() * (2 if flip else 1)
        if total == 0:
            raise RegganError(f"no training pair has the target expression {data.targets[e]!r}")
        layer.requires_grad_(True)
        optimizer = torch.optim.Adam(layer.parameters(), lr=fit.gradient_lr)
        batch = min(fit.batch_size, rows.numel())
        for step in range(fit.gradient_steps):
            generator = torch.Generator().manual_seed(derived_seed(e, step))
            picked = rows[torch.randperm(rows.numel(), generator=generator)[:batch]]
            picked = picked[distributed.rank::distributed.world]
            source, target, _, _ = data.batch(picked, device)
            if flip:
                mirror = torch.rand(picked.numel(), generator=generator) < 0.5
                mirror = mirror.to(device)[:, None, None, None]
                source = torch.where(mirror, source.flip(3), source)
                target = torch.where(mirror, target.flip(3), target)
            # ridge_loss is normalized per batch; lam * B / N makes its minimizer over the whole
            # data the closed-form ridge solution.
            loss = ridge_loss(layer, source, target, fit.lam * picked.numel() / total,
                              penalize_bias=fit.penalize_bias)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distributed.active:
                for parameter in layer.parameters():
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= distributed.world
            optimizer.step()
        layer.requires_grad_(False)
        chosen[data.targets[e]] = fit.lam
    return chosen
