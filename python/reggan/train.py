"""Training: stage 1 (the regression fit), then stage 2 (the adversarial refinement).

GAN objective: least squares (LSGAN). The generator starts as the identity on top of a good
regression output and is driven mostly by the paired L1 loss. LSGAN's quadratic loss keeps
giving gradients to samples the discriminator already classifies correctly (the saturating loss
does not, nor does hinge once its margin is met); it needs one backward pass per step, where
WGAN-GP's gradient penalty needs a second, double-backward one that costs most on a CPU and mixes
badly with AMP; and with spectral normalization in the discriminator it trained without
divergence in every run made here (the tests' tiny models, the demo).

Reproducibility: every random choice of a step (which pairs, which flips) comes from a generator
seeded by (seed, step), so a run resumed from a checkpoint takes exactly the steps the
uninterrupted run would have taken; the checkpoint holds the models, the discriminator
(spectral-norm vectors included) and both optimizers.
"""

import contextlib
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from reggan import config as configs
from reggan.config import Config
from reggan.data import PairedFaces
from reggan.datasets import training_splits
from reggan.errors import RegganError
from reggan.fit import fit_regression
from reggan.io import (check_output, find_checkpoint, load_checkpoint, load_optimizer,
                       optimizer_tensors, prefixed, save_checkpoint, staged_output, to_uint8,
                       write_text_atomic)
from reggan.models import Discriminator, RegGAN
from reggan.runtime import Distributed, derived_seed, init_distributed, resolve_device, \
    seed_everything
from reggan.viz import plot_losses, save_grid

log = logging.getLogger("reggan")

PREVIEW_ROWS = 6


def build_model(config: Config) -> RegGAN:
    m, d = config.model, config.data
    return RegGAN(m.mode, config.targets(), 3, (d.size, d.size), m.kernel_size, m.gen_width,
                  m.gen_blocks, m.gen_downsamplings)


def build_discriminator(config: Config) -> Discriminator:
    m = config.model
    return Discriminator(3, len(config.data.expressions), m.disc_width, m.disc_layers,
                         m.disc_spectral_norm)


def model_meta(config: Config, step: int) -> Dict:
    return {"config": config.to_dict(), "step": step, "targets": config.targets(),
            "vocabulary": list(config.data.expressions)}


def save_model(path: Path, model: RegGAN, config: Config, step: int) -> None:
    """The inference model alone (what `synthesize` and `evaluate` load)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, model_meta(config, step))


def model_file(path) -> Path:
    """The checkpoint a model path names: the file itself, or a run folder's model (else its
    newest checkpoint)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if path.is_dir() and not file.exists():
        file = find_checkpoint(path)
        if file is None:
            raise RegganError(f"{path} holds no model.safetensors and no checkpoints/")
    return file


def load_model(path, device="cpu", config: Optional[Config] = None,
               keys=configs.MODEL_KEYS):
    """(model, config) from a model or training checkpoint (file or run folder). With `config`,
    the checkpoint must have been made with the same settings of `keys`."""
    file = model_file(path)
    tensors, meta = load_checkpoint(file)
    saved = configs.validate(configs.from_dict(meta["config"]))
    if config is not None:
        changed = configs.differences(saved.to_dict(), config.to_dict(), keys)
        if changed:
            raise RegganError(f"checkpoint {file} was made with another config: "
                              f"{describe_changes(changed, saved, config)}")
    model = build_model(saved)
    try:
        model.load_state_dict(prefixed(tensors, "model."))
    except RuntimeError as error:
        raise RegganError(f"checkpoint {file} does not fit the model its config describes: "
                          f"{str(error).splitlines()[0]}") from None
    return model.to(device).eval(), saved


def describe_changes(keys, saved: Config, current: Config) -> str:
    a, b = configs.flatten(saved.to_dict()), configs.flatten(current.to_dict())
    return "; ".join(f"{k} is {json.dumps(a.get(k))} there, {json.dumps(b.get(k))} here"
                     for k in keys)


def batch_indices(step: int, batch: int, count: int, seed: int) -> torch.Tensor:
    """Pair indices of global batch `step`: consecutive slices of a stream of per-epoch random
    permutations, so they depend only on (seed, step)."""
    out, position = [], step * batch
    while len(out) < batch:
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(
            derived_seed(seed, 1, epoch)))
        take = min(batch - len(out), count - offset)
        out += order[offset:offset + take].tolist()
        position += take
    return torch.tensor(out, dtype=torch.long)


def preview_pairs(data: PairedFaces, rows: int = PREVIEW_ROWS) -> torch.Tensor:
    """Fixed pairs, one per subject (spread over the subjects), cycling through the target
    expressions."""
    sources = data.pairs[:, 0].unique()
    picked = []
    for r, s in enumerate(sources[torch.linspace(0, len(sources) - 1, min(rows, len(sources)))
                                  .round().long()].tolist()):
        candidates = (data.pairs[:, 0] == s).nonzero().squeeze(1)
        picked.append(candidates[r % candidates.numel()])
    return torch.stack(picked)


@torch.no_grad()
def write_preview(path: Path, model: RegGAN, data: PairedFaces, device) -> None:
    """Grid: input | regression | refined | target, one row per pair."""
    model.eval()
    source, target, index, _ = data.batch(preview_pairs(data), device)
    regressed, refined = model(source, index)
    captions = [data.targets[i] for i in index.tolist()]
    save_grid(path, [to_uint8(x) for x in (source, regressed, refined, target)],
              ["input", "regression", "refined", "target"], captions)


@dataclass
class State:
    step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)


def _amp(device: torch.device, enabled: bool):
    """(autocast context factory, GradScaler or None)."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, None
    if torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16),
            torch.amp.GradScaler("cuda"))


def _lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(scores.float(), torch.full_like(scores.float(), 1.0 if real else 0.0))


class Trainer:
    def __init__(self, config: Config, run_dir: Path, distributed: Distributed,
                 splits: Dict[str, PairedFaces], progress: bool = True):
        self.config, self.run_dir, self.dist = config, run_dir, distributed
        self.splits, self.progress = splits, progress
        self.train_data = splits["train"]
        self.preview_data = splits.get("heldout", self.train_data)
        self.device = resolve_device(config.train.device, distributed.local_rank)
        t = config.train
        if t.batch_size % distributed.world:
            raise RegganError(f"train.batch_size ({t.batch_size}) must be a multiple of the "
                              f"number of processes ({distributed.world})")
        seed_everything(t.seed)
        self.model = build_model(config).to(self.device)
        self.disc = build_discriminator(config).to(self.device)
        self.state = State()
        regression = self.model.regression
        if regression is not None:
            regression.requires_grad_(t.finetune_regression)
        groups = []
        if self.model.generator is not None:
            groups.append({"params": list(self.model.generator.parameters()), "lr": t.lr_g})
        if regression is not None and t.finetune_regression:
            groups.append({"params": list(regression.parameters()), "lr": t.lr_regression})
        betas = (t.beta1, t.beta2)
        self.opt_g = torch.optim.Adam(groups, betas=betas) if groups else None
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t.lr_d, betas=betas)
        self.autocast, self.scaler = _amp(self.device, t.amp)

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step:07d}.safetensors"

    def save(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"disc.{k}": v for k, v in self.disc.state_dict().items()})
        meta = model_meta(self.config, self.state.step)
        meta["history"] = self.state.history
        for name, optimizer in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            if optimizer is not None:
                opt_tensors, meta[f"{name}_groups"] = optimizer_tensors(optimizer, f"{name}.")
                tensors.update(opt_tensors)
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()
        save_checkpoint(self.checkpoint_path(self.state.step), tensors, meta)

    def load(self, file: Path) -> None:
        tensors, meta = load_checkpoint(file)
        self.model.load_state_dict(prefixed(tensors, "model."))
        self.disc.load_state_dict(prefixed(tensors, "disc."))
        for name, optimizer in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            if optimizer is not None:
                load_optimizer(optimizer, tensors, meta[f"{name}_groups"], f"{name}.")
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.state = State(meta["step"], meta["history"])

    # -- stage 1 ----------------------------------------------------------------------------

    def fit_stage1(self) -> None:
        if self.model.regression is None:
            return
        chosen = fit_regression(self.model.regression, self.train_data, self.config.fit,
                                self.device, self.dist, flip=self.config.data.flip,
                                progress=self.progress and self.dist.main)
        self.model.regression.requires_grad_(self.config.train.finetune_regression)
        if self.dist.main:
            write_text_atomic(self.run_dir / "stage1.json",
                              json.dumps({"lambda": chosen}, indent=2) + "\n")

    def load_stage1(self, source: Path) -> None:
        """Regression weights from another run (e.g. `reggan fit`), which must match."""
        if self.model.regression is None:
            raise RegganError("--stage1 was given but model.mode=refinement has no regression")
        model, _ = load_model(source, "cpu", self.config, configs.STAGE1_KEYS)
        if model.regression is None:
            raise RegganError(f"{source} has no regression stage (model.mode=refinement)")
        self.model.regression.load_state_dict(model.regression.state_dict())

    # -- stage 2 ----------------------------------------------------------------------------

    def _augment(self, step: int, source, target):
        if not self.config.data.flip:
            return source, target
        generator = torch.Generator().manual_seed(derived_seed(self.config.train.seed, 2, step))
        flips = torch.rand(self.config.train.batch_size, generator=generator) < 0.5
        flips = flips[self._shard()].to(source.device)[:, None, None, None]
        return torch.where(flips, source.flip(3), source), torch.where(flips, target.flip(3), target)

    def _shard(self) -> slice:
        per_rank = self.config.train.batch_size // self.dist.world
        return slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)

    def train_step(self, model, disc, step: int) -> Dict[str, float]:
        t = self.config.train
        indices = batch_indices(step, t.batch_size, len(self.train_data), t.seed)[self._shard()]
        source, target, index, label = self.train_data.batch(indices, self.device)
        source, target = self._augment(step, source, target)
        source_label = torch.full_like(label, self.config.data.expressions.index(
            self.config.data.source))
        model.train()
        disc.train()
        with self.autocast():
            regressed, fake = model(source, index)

        # Discriminator: real targets vs fakes; expressions of real targets and sources. One
        # call on the concatenation, as DDP needs one forward per backward.
        self.disc.requires_grad_(True)
        n = source.shape[0]
        with self.autocast():
            scores, logits = disc(torch.cat([target, fake.detach(), source]))
        d_adv = 0.5 * (_lsgan(scores[:n], True) + _lsgan(scores[n:2 * n], False))
        d_cls = F.cross_entropy(torch.cat([logits[:n], logits[2 * n:]]).float(),
                                torch.cat([label, source_label]))
        loss_d = t.lambda_adv * d_adv + t.lambda_cls * d_cls
        self.opt_d.zero_grad(set_to_none=True)
        self._backward(loss_d, self.opt_d)

        # Generator: fool the (frozen) discriminator, match the paired target, show the
        # target expression.
        self.disc.requires_grad_(False)
        with self.autocast():
            scores, logits = self.disc(fake)
        g_adv = _lsgan(scores, True)
        g_cls = F.cross_entropy(logits.float(), label)
        g_l1 = F.l1_loss(fake.float(), target)
        loss_g = t.lambda_adv * g_adv + t.lambda_l1 * g_l1 + t.lambda_cls * g_cls
        self.opt_g.zero_grad(set_to_none=True)
        self._backward(loss_g, self.opt_g)
        if self.scaler is not None:
            self.scaler.update()
        losses = torch.stack([d_adv, d_cls, g_adv, g_l1, g_cls,
                              F.l1_loss(regressed.float(), target)]).detach().float()
        if self.dist.active:
            torch.distributed.all_reduce(losses)
            losses /= self.dist.world
        names = ("d_adv", "d_cls", "g_adv", "g_l1", "g_cls", "reg_l1")
        return dict(zip(names, losses.cpu().tolist()))

    def _backward(self, loss, optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)

    def train(self) -> None:
        t = self.config.train
        model, disc = self.model, self.disc
        if self.dist.active:
            model = DistributedDataParallel(model, find_unused_parameters=t.finetune_regression)
            disc = DistributedDataParallel(disc)
        bar = None
        if self.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.state.step, desc="train", unit="step",
                       dynamic_ncols=True)
        last = time.perf_counter()
        while self.state.step < t.steps:
            losses = self.train_step(model, disc, self.state.step)
            self.state.step += 1
            self.state.history.append({"step": self.state.step, **losses})
            if bar is not None:
                now = time.perf_counter()
                bar.set_postfix(g_l1=f"{losses['g_l1']:.4f}", g_adv=f"{losses['g_adv']:.3f}",
                                d_adv=f"{losses['d_adv']:.3f}",
                                img_s=f"{t.batch_size / max(now - last, 1e-9):.1f}")
                last = now
                bar.update(1)
            if self.state.step % t.preview_every == 0 or self.state.step == t.steps:
                self.write_outputs()
            if self.state.step % t.checkpoint_every == 0 or self.state.step == t.steps:
                if self.dist.main:
                    self.save()
        if bar is not None:
            bar.close()

    def write_outputs(self) -> None:
        if not self.dist.main:
            return
        step = self.state.step
        write_preview(self.run_dir / "previews" / f"step_{step:07d}.png", self.model,
                      self.preview_data, self.device)
        if self.state.history:
            plot_losses(self.run_dir / "losses.png", self.state.history)
            write_text_atomic(self.run_dir / "losses.json",
                              json.dumps(self.state.history) + "\n")

    def finish(self) -> Path:
        """Write the inference model and the last preview; return the model's path."""
        path = self.run_dir / "model.safetensors"
        if self.dist.main:
            save_model(path, self.model, self.config, self.state.step)
            write_preview(self.run_dir / "preview.png", self.model, self.preview_data,
                          self.device)
        self.dist.barrier()
        return path


def run(config: Config, run_dir: Path, overwrite: bool = False, resume: bool = False,
        stage1: Optional[Path] = None, fit_only: bool = False, progress: bool = True) -> Path:
    """`reggan fit` (fit_only) and `reggan train`: returns the run folder. A new run is built
    beside `run_dir` and replaces it only once complete (a stopped one that wrote a checkpoint
    is kept there to be resumed, unless it would replace a run)."""
    if resume and stage1 is not None:
        raise RegganError("--stage1 and --resume exclude each other: a resumed run goes on with "
                          "the regression it has")
    if resume and overwrite:
        raise RegganError("--overwrite and --resume exclude each other: a resumed run goes on in "
                          "its folder, which --overwrite would replace")
    # A validated copy, settled below (fit's mode, the data's layout and held-out subjects).
    config = configs.validate(configs.from_dict(config.to_dict()))
    if fit_only:
        if config.model.mode == "refinement":
            raise RegganError("model.mode=refinement has no regression stage to fit")
        config.model.mode = "regression"  # what a fit makes: its generator would be untrained
    distributed = init_distributed(config.train.device)
    try:
        if resume:
            saved = _saved_config(run_dir)
        else:
            data = None if config.data.path == configs.BUILTIN else Path(config.data.path)
            inputs = [("--data", data), ("--stage1", stage1)]
            check_output(run_dir, overwrite, "run folder", inputs)
        # The data before any run folder: a bad dataset leaves nothing behind.
        splits = training_splits(config, distributed)
        if resume:
            _check_resume(saved, config)
        # Only rank 0 writes, into a staged folder; the other ranks never touch run_dir.
        if resume or not distributed.main:
            staging = contextlib.nullcontext(run_dir)
        else:
            staging = staged_output(run_dir, overwrite, "run folder", inputs, resumable=True)
        with staging as folder:
            trainer = Trainer(config, folder, distributed, splits, progress)
            if distributed.main:
                configs.save(config, folder / "config.json")
            if resume:
                checkpoint = find_checkpoint(run_dir)
                if checkpoint is None:
                    raise RegganError(f"cannot resume: {run_dir} has no checkpoints/ yet")
                trainer.load(checkpoint)
                log.info("resuming %s from step %d", run_dir, trainer.state.step)
            elif stage1 is not None:
                trainer.load_stage1(stage1)
            else:
                trainer.fit_stage1()
            if config.model.mode != "regression" and trainer.state.step < config.train.steps:
                trainer.train()
            trainer.finish()
        return run_dir
    finally:
        if distributed.active and torch.distributed.is_initialized():
            # DistributedDataParallel wrappers outlive train() in reference cycles. Left to the
            # collector, they may be freed during interpreter shutdown, where releasing the gloo
            # work their reducers hold can abort the process (seen once in CI: SIGABRT at exit).
            gc.collect()
            torch.distributed.destroy_process_group()


def _saved_config(run_dir: Path) -> Config:
    saved_file = Path(run_dir) / "config.json"
    if not saved_file.is_file():
        raise RegganError(f"cannot resume: {saved_file} does not exist")
    return configs.validate(configs.from_dict(json.loads(saved_file.read_text())))


def _check_resume(saved: Config, requested: Config) -> None:
    """That `requested` differs from the run's saved config only in what a resume may change."""
    refused = [k for k in configs.differences(saved.to_dict(), requested.to_dict())
               if k not in configs.RESUMABLE_CHANGES]
    if refused:
        raise RegganError(f"cannot resume with a different config: "
                          f"{describe_changes(refused, saved, requested)} (a resume may change "
                          f"only {', '.join(configs.RESUMABLE_CHANGES)})")
