"""The ArcFlow trainer: one visible loop — resume, train_step, log, save, validate.

The method itself lives in :mod:`arcflow.method.rollout` (the imitation loss) and
:mod:`arcflow.method.policy` (the closed-form policy); the model family behind
:class:`arcflow.models.Backbone`; data parallelism in :func:`arcflow.training.parallel.parallelize`.
This file wires them to data, optimizer, EMA, checkpoints and logs.

All randomness of an iteration is a function of (seed, iteration, global sample index):
the latent noise and rollout draws of each prompt, and its LoRA dropout masks (per student
step and layer, :mod:`arcflow.models.lora_dropout`). With the global batches of
:class:`arcflow.data.sampler.BucketBatchSampler`, a run depends only on its global batch
(ranks x per-rank batch) and seed: resuming, micro-batching or changing the number of ranks
never changes what a prompt gets, and no RNG state needs saving.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from arcflow.config import RunConfig, torch_dtype
from arcflow.data.batches import build_train_data, build_val_data
from arcflow.distributed import DistEnv, StopSignal
from arcflow.method.rollout import RolloutConfig, RolloutNoise, segment_loss
from arcflow.method.schedule import full_batch, segment_bounds, shifted_sigma, teacher_ratio
from arcflow.models import build_backbone
from arcflow.models.base import Backbone, Conditioning
from arcflow.training import checkpoint as ckpt
from arcflow.training.guards import Divergence, check_writable, drop_records_after, reduce_step
from arcflow.training.optim import EMA, build_optimizer, set_lr
from arcflow.training.parallel import gradient_sync, parallelize, shard_text_encoder
from arcflow.training.validation import Validator

log = logging.getLogger("arcflow")


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of integers (splitmix64 steps)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _slice(cond: Conditioning, index: slice) -> Conditioning:
    return {key: value[index] for key, value in cond.items()}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class Trainer:
    """Distils the configured teacher into an n-NFE ArcFlow student on every rank of ``env``."""

    def __init__(self, cfg: RunConfig, env: DistEnv | None = None,
                 backbone: Backbone | None = None, text_encoder: torch.nn.Module | None = None):
        """``backbone``/``text_encoder`` replace the configured ones (benchmarks on random weights)."""
        self.cfg, self.env = cfg, env or DistEnv()
        env = self.env
        self.device = env.device
        self.work_dir = Path(cfg.work_dir)
        if env.is_main:  # a read-only folder is found now, not at the first save hours later
            check_writable(self.work_dir, "work dir")
            check_writable(cfg.checkpoint_dir, "checkpoint dir")
            # Opened first, so the data and model set-up below is in the run's log too.
            self._log_file = logging.FileHandler(self.work_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(self._log_file)
            log.setLevel(logging.INFO)
        self.seed = cfg.train_cfg.seed
        torch.manual_seed(mix_seed(self.seed))  # LoRA initialisation, the same on every rank (FSDP2 keeps shards)

        self.compute_dtype = torch_dtype(cfg.model.dtype)
        self.backbone = backbone if backbone is not None else build_backbone(cfg.model, self.device, self.seed)
        self.backbone.dropout_keys.seed = self.seed
        self.student = parallelize(self.backbone, cfg.train_cfg.parallel, env, self.compute_dtype)
        self.data = build_train_data(cfg, self.device, env.rank, env.world_size, self.seed, text_encoder)
        if cfg.train_cfg.parallel == "fsdp" and self.data.text_encoder is not None:
            shard_text_encoder(self.data.text_encoder, env)
        self.val_data = build_val_data(cfg, self.device, train=self.data)
        d = cfg.distill
        self.rollout_cfg = RolloutConfig(num_states=d.num_states, window_substeps=d.window_substeps,
                                         total_substeps=d.total_substeps, dropout=d.dropout,
                                         loss_scale=d.loss_scale, shift=d.shift)
        self.segments = segment_bounds(d.nfe, d.timestep_ratio)

        self.validator: Validator | None = None

        trainable = list(self.backbone.trainable_named_parameters())
        self.optimizer = build_optimizer(trainable, self.backbone.rate_parameters(), cfg.optimizer)
        self.ema = EMA(trainable, cfg.ema)
        self.iteration = 0
        self.skipped_steps = 0
        """Steps whose update was dropped for a non-finite loss or gradient norm, in this process."""
        self.writer: SummaryWriter | None = None

    # -- one iteration -----------------------------------------------------------------
    def sample_randomness(self, first_index: int, count: int, shape: tuple[int, ...]
                          ) -> tuple[torch.Tensor, list[RolloutNoise]]:
        """Latent noise and per-segment rollout draws of global samples first_index.. of this iteration."""
        noises, draws = [], []
        for index in range(first_index, first_index + count):
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.iteration, index))
            noises.append(torch.randn(shape, generator=generator))
            draws.append([RolloutNoise.draw(1, self.cfg.model.num_modes, self.rollout_cfg, generator)
                          for _ in self.segments])
        per_segment = [RolloutNoise.cat([d[k] for d in draws]) for k in range(len(self.segments))]
        return torch.stack(noises).to(self.device), per_segment

    def train_step(self) -> dict[str, float]:
        """One optimizer step: every micro-batch runs every student step of the rollout."""
        cfg, it = self.cfg, self.iteration
        rho = teacher_ratio(it, cfg.distill.teacher_ratio_decay_iters)
        lr = set_lr(self.optimizer, it, cfg.optimizer)
        batch = cfg.train_cfg.batch_size
        prompts, cond = self.data.next_batch()
        shape = self.backbone.latent_shape(prompts[0].height, prompts[0].width)
        first = self.env.rank * batch  # global index of this rank's first sample
        noise, draws = self.sample_randomness(first, batch, shape)
        micro = cfg.train_cfg.grad_accum_batch_size or batch
        starts = list(range(0, batch, micro))
        step_losses = torch.zeros(len(self.segments), dtype=torch.float64, device=self.device)

        for begin in starts:
            part = slice(begin, begin + micro)
            x, weight = noise[part], (min(begin + micro, batch) - begin) / batch
            micro_cond = _slice(cond, part)
            tau = full_batch(1.0, x.shape[0], x)

            def teacher(x_t: torch.Tensor, sigma: torch.Tensor, c: Conditioning = micro_cond) -> torch.Tensor:
                return self.backbone.teacher_velocity(x_t, sigma, c)

            for k, (tau_a, tau_b) in enumerate(self.segments):
                segment = tau_a - tau_b
                last = begin == starts[-1] and k == len(self.segments) - 1
                samples = torch.arange(first + begin, first + begin + x.shape[0], device=self.device)
                self.backbone.dropout_keys.set(it, k, samples)
                with gradient_sync(self.student, sync=last):
                    policy = self.student(x, shifted_sigma(tau, cfg.distill.shift), micro_cond)
                    loss, x = segment_loss(policy, teacher, x, tau, segment, rho, self.rollout_cfg, draws[k][part])
                    (segment * weight * loss).backward()
                step_losses[k] += weight * loss.detach()  # no host sync inside the loop
                tau = full_batch(tau_b, x.shape[0], x)

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        clip = cfg.optimizer.grad_clip if it >= cfg.optimizer.grad_clip_start_iter else float("inf")
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(params, clip))
        losses, finite = reduce_step(step_losses, grad_norm, self.env)
        if finite:
            self.optimizer.step()
            self.ema.update(it)
        else:
            self._skip_non_finite(it, losses, float(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        metrics = {f"loss_step{k}": v for k, v in enumerate(losses)}
        metrics.update(loss=sum((a - b) * v for (a, b), v in zip(self.segments, losses)),
                       teacher_ratio=rho, lr=lr, grad_norm=float(grad_norm))
        return metrics

    def _skip_non_finite(self, it: int, losses: list[float], grad_norm: float) -> None:
        """Drop this step's update; stop every rank (they all see the same reduced values) past the allowance."""
        self.skipped_steps += 1
        allowed = self.cfg.train_cfg.skip_non_finite_steps
        what = f"non-finite loss or gradient norm at iteration {it} (step losses {losses}, grad_norm {grad_norm})"
        if self.skipped_steps > allowed:
            raise Divergence(f"{what}: stopping before anything is saved ({self.skipped_steps - 1} such steps "
                             f"skipped so far, train_cfg.skip_non_finite_steps={allowed}); try a lower optimizer.lr")
        log.warning("%s: skipped, %d of %d allowed", what, self.skipped_steps, allowed)

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> None:
        """Train to ``total_iters``; on SIGINT/SIGTERM stop every rank at an iteration boundary."""
        cfg = self.cfg
        self.resume()
        self._setup_logging()
        if self.iteration >= cfg.total_iters and self.env.is_main:
            message = (f"nothing to train: the checkpoint is at iteration {self.iteration} and total_iters="
                       f"{cfg.total_iters}; raise total_iters to continue")
            log.warning(message)
            print(f"[arcflow] {message}", file=sys.stderr, flush=True)
        if self.iteration == 0 and cfg.eval_interval > 0:
            self.validate()
        progress = tqdm(total=cfg.total_iters, initial=self.iteration, desc="distill", dynamic_ncols=True,
                        disable=not self.env.is_main)
        stop = StopSignal()
        try:
            while self.iteration < cfg.total_iters:
                signum = stop.should_stop(self.env)
                if signum:
                    log.warning("received signal %d: stopping at iteration %d", signum, self.iteration)
                    raise SystemExit(128 + signum)
                start = time.perf_counter()
                metrics = self.train_step()
                metrics["sec_per_iter"] = time.perf_counter() - start
                metrics["peak_mem_gb"] = _peak_memory_gb(self.device)
                if self.iteration % cfg.log_interval == 0:
                    self._log(metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", rho=f"{metrics['teacher_ratio']:.2f}")
                if self.iteration % cfg.save_interval == 0 or self.iteration == cfg.total_iters:
                    self.save()
                if cfg.eval_interval > 0 and (self.iteration % cfg.eval_interval == 0
                                              or self.iteration == cfg.total_iters):
                    self.validate()
        finally:
            stop.restore()
            progress.close()
            if self.writer is not None:
                self.writer.close()
            if self.env.is_main:
                log.removeHandler(self._log_file)
                self._log_file.close()

    def _setup_logging(self) -> None:
        n_train = sum(p.numel() for _, p in self.backbone.trainable_named_parameters())
        n_all = sum(p.numel() for p in self.backbone.parameters())
        if not self.env.is_main:
            return
        # What an interrupted run logged after its checkpoint (or at all, without one) is logged again: drop it,
        # so each iteration appears once. A run from scratch validates iteration 0 again too.
        first_new = self.iteration + 1 if self.iteration else 0
        drop_records_after(self.work_dir / "metrics.jsonl", self.iteration)
        drop_records_after(self.work_dir / "val_metrics.jsonl", first_new - 1)
        self.writer = SummaryWriter(str(self.work_dir / "tensorboard"), purge_step=first_new)
        (self.work_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        log.info("world size %d, parallel %s, device %s", self.env.world_size, self.cfg.train_cfg.parallel,
                 self.device)
        log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / n_all)

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        record = {"iter": self.iteration, **metrics}
        with open(self.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("iter %d " + " ".join(f"{k}={v:.5g}" for k, v in metrics.items()), self.iteration)
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, self.iteration)

    # -- validation --------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Sample with the EMA weights; rank 0 writes grid, metrics.json and TensorBoard scalars."""
        if self.validator is None:
            vae = self.backbone.load_vae(self.cfg.model.pretrained, self.compute_dtype).to(self.device)
            self.validator = Validator(self.backbone, vae, self.val_data.encode, self.val_data.prompts,
                                       self.cfg.val_cfg, self.cfg.distill, self.device, self.cfg.eval_cfg)
        self.backbone.eval()
        self.ema.swap()
        try:
            out_dir = self.work_dir / "val" / f"iter_{self.iteration:07d}"
            metrics = self.validator.run(out_dir, write=self.env.is_main)
        finally:
            self.ema.swap()
            self.backbone.train()
        if self.env.is_main:
            with open(self.work_dir / "val_metrics.jsonl", "a") as f:
                f.write(json.dumps({"iter": self.iteration, **metrics}) + "\n")
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, self.iteration)
            with Image.open(out_dir / "grid.png") as grid:  # the labelled grid, as on disk
                self.writer.add_image("val/grid", np.asarray(grid.convert("RGB")), self.iteration, dataformats="HWC")
            log.info("val iter %d %s", self.iteration, json.dumps(metrics))
        return metrics

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoint_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The (possibly sharded) tensors DCP saves/loads in place, and the optimizer's scalar state."""
        model = {name: p.detach() for name, p in self.backbone.trainable_named_parameters()}
        optim = get_optimizer_state_dict(self.backbone, self.optimizer)
        tensors, scalars = {}, {}
        for name, state in optim["state"].items():
            for key, value in state.items():
                (tensors if isinstance(value, torch.Tensor) else scalars)[f"{name}/{key}"] = value
        return {"model": model, "ema": self.ema.state_dict(), "optimizer": tensors}, scalars

    def save(self) -> Path:
        tensors, scalars = self._checkpoint_tensors()
        state = {"data": self.data.state_dict(), "ema_updates": self.ema.num_updates,
                 "optimizer_scalars": scalars, "world_size": self.env.world_size,
                 "trained_with": self.data.trained_with()}
        path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.iteration, tensors, state, self.env)
        if self.env.is_main:
            ckpt.prune_checkpoints(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep_last,
                                   self.cfg.checkpoint.keep_every)
            log.info("saved %s", path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the latest checkpoint of this run, if any (any world size)."""
        chosen = Path(path) if path else ckpt.latest_good_checkpoint(self.cfg.checkpoint_dir, self.env)
        if chosen is None:
            return False
        tensors, _ = self._checkpoint_tensors()
        state = ckpt.load_checkpoint(chosen, tensors, verify=path is not None)  # else rank 0 just verified it
        optim = {"state": {}, "param_groups": get_optimizer_state_dict(self.backbone, self.optimizer)["param_groups"]}
        for flat, value in {**tensors["optimizer"], **state["optimizer_scalars"]}.items():
            name, key = flat.rsplit("/", 1)
            optim["state"].setdefault(name, {})[key] = value
        set_optimizer_state_dict(self.backbone, self.optimizer, optim)
        self.ema.num_updates = int(state["ema_updates"])
        self.data.load_state_dict(state["data"])
        self.iteration = int(state["iteration"])
        log.info("resumed from %s at iteration %d (saved on %d ranks)", chosen, self.iteration, state["world_size"])
        return True
