"""The ArcFlow trainer: one visible loop — resume, train_step, log, save, validate.

The method itself lives in :mod:`arcflow.rollout` (the imitation loss) and
:mod:`arcflow.policy` (the closed-form policy); the model family behind
:class:`arcflow.backbones.Backbone`. This file wires them to data, optimizer, EMA,
checkpoints and logs.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from arcflow import checkpoint as ckpt
from arcflow.backbones import build_backbone
from arcflow.backbones.base import Conditioning
from arcflow.config import RunConfig, torch_dtype
from arcflow.data import Prompt, PromptBatchSampler, read_prompts
from arcflow.evaluation import Validator
from arcflow.optim import EMA, build_optimizer, set_lr
from arcflow.rollout import RolloutConfig, RolloutNoise, segment_loss
from arcflow.schedule import full_batch, segment_bounds, shifted_sigma, teacher_ratio
from arcflow.text_encoders import build_text_encoder

log = logging.getLogger("arcflow")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _slice(cond: Conditioning, index: slice) -> Conditioning:
    return {key: value[index] for key, value in cond.items()}


class Trainer:
    """Distils the configured teacher into an n-NFE ArcFlow student in this process."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu", seed_offset: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.work_dir = Path(cfg.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        seed = cfg.train_cfg.seed + seed_offset
        random.seed(seed)
        torch.manual_seed(seed)
        self.generator = torch.Generator(self.device).manual_seed(seed)

        self.backbone = build_backbone(cfg.model, self.device, head_seed=cfg.train_cfg.seed)
        self.text_encoder = build_text_encoder(cfg.model).to(self.device)
        d = cfg.distill
        self.rollout_cfg = RolloutConfig(num_states=d.num_states, window_substeps=d.window_substeps,
                                         total_substeps=d.total_substeps, dropout=d.dropout,
                                         loss_scale=d.loss_scale, shift=d.shift)
        self.segments = segment_bounds(d.nfe, d.timestep_ratio)

        self.sampler = PromptBatchSampler(read_prompts(cfg.data.train), cfg.train_cfg.batch_size, seed)
        self.val_prompts: list[Prompt] = read_prompts(cfg.data.val)
        self.validator: Validator | None = None

        trainable = list(self.backbone.trainable_named_parameters())
        self.optimizer = build_optimizer(trainable, self.backbone.rate_parameters(), cfg.optimizer)
        self.ema = EMA(trainable, cfg.ema)
        self.iteration = 0
        self.writer: SummaryWriter | None = None

    # -- one iteration -----------------------------------------------------------------
    def encode(self, texts: list[str]) -> Conditioning:
        return {k: v.to(self.device) for k, v in self.text_encoder.encode(texts).items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step: every micro-batch runs every student step of the rollout."""
        cfg, it = self.cfg, self.iteration
        rho = teacher_ratio(it, cfg.distill.teacher_ratio_decay_iters)
        lr = set_lr(self.optimizer, it, cfg.optimizer)
        prompts = self.sampler.next_batch()
        cond = self.encode([p.text for p in prompts])
        shape = self.backbone.latent_shape(prompts[0].height, prompts[0].width)
        noise = torch.randn((len(prompts), *shape), generator=self.generator, device=self.device)
        draws = [RolloutNoise.draw(len(prompts), cfg.model.num_modes, self.rollout_cfg, self.generator)
                 for _ in self.segments]
        micro = cfg.train_cfg.grad_accum_batch_size or len(prompts)
        step_losses = [0.0] * len(self.segments)
        timings = {"forward_backward": 0.0}

        start = time.perf_counter()
        for begin in range(0, len(prompts), micro):
            part = slice(begin, begin + micro)
            x, weight = noise[part], (min(begin + micro, len(prompts)) - begin) / len(prompts)
            micro_cond = _slice(cond, part)
            tau = full_batch(1.0, x.shape[0], x)
            teacher = lambda x_t, sigma, c=micro_cond: self.backbone.teacher_velocity(x_t, sigma, c)  # noqa: E731
            for k, (tau_a, tau_b) in enumerate(self.segments):
                segment = tau_a - tau_b
                sigma = shifted_sigma(tau, cfg.distill.shift)
                policy = self.backbone.student_policy(x, sigma, micro_cond)
                loss, x = segment_loss(policy, teacher, x, tau, segment, rho, self.rollout_cfg, draws[k][part])
                (segment * weight * loss).backward()
                step_losses[k] += weight * loss.item()
                tau = full_batch(tau_b, x.shape[0], x)
        timings["forward_backward"] = time.perf_counter() - start

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        clip = cfg.optimizer.grad_clip if it >= cfg.optimizer.grad_clip_start_iter else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(it)
        self.iteration += 1
        metrics = {f"loss_step{k}": v for k, v in enumerate(step_losses)}
        metrics.update(loss=sum((a - b) * v for (a, b), v in zip(self.segments, step_losses)),
                       teacher_ratio=rho, lr=lr, grad_norm=float(grad_norm))
        return metrics

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        self._setup_logging()
        self.resume()
        if self.iteration == 0 and cfg.eval_interval > 0:
            self.validate()
        progress = tqdm(total=cfg.total_iters, initial=self.iteration, desc="distill", dynamic_ncols=True)
        while self.iteration < cfg.total_iters:
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
        progress.close()
        if self.writer is not None:
            self.writer.close()

    def _setup_logging(self) -> None:
        handler = logging.FileHandler(self.work_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self.writer = SummaryWriter(str(self.work_dir / "tensorboard"))
        (self.work_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        n_train = sum(p.numel() for _, p in self.backbone.trainable_named_parameters())
        n_all = sum(p.numel() for p in self.backbone.parameters())
        log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / n_all)

    def _log(self, metrics: dict[str, float]) -> None:
        record = {"iter": self.iteration, **metrics}
        with open(self.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("iter %d " + " ".join(f"{k}={v:.5g}" for k, v in metrics.items()), self.iteration)
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, self.iteration)

    # -- validation --------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Sample with the EMA weights; write grid, metrics.json and TensorBoard scalars."""
        if self.validator is None:
            vae = self.backbone.load_vae(self.cfg.model.pretrained, torch_dtype(self.cfg.model.dtype)).to(self.device)
            self.validator = Validator(self.backbone, vae, self.encode, self.val_prompts, self.cfg.val_cfg,
                                       self.cfg.distill, self.device)
        self.backbone.eval()
        self.ema.swap()
        try:
            metrics = self.validator.run(self.work_dir / "val" / f"iter_{self.iteration:07d}")
        finally:
            self.ema.swap()
            self.backbone.train()
        with open(self.work_dir / "val_metrics.jsonl", "a") as f:
            f.write(json.dumps({"iter": self.iteration, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, self.iteration)
        log.info("val iter %d %s", self.iteration, json.dumps(metrics))
        return metrics

    # -- checkpoints -------------------------------------------------------------------
    def save(self) -> Path:
        state: dict[str, Any] = {"sampler": self.sampler.state_dict(), "ema_updates": self.ema.num_updates}
        path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.iteration, self.backbone.trainable_state_dict(),
                                    self.ema.state_dict(), self.optimizer.state_dict(),
                                    ckpt.rng_state(self.generator), state)
        ckpt.prune_checkpoints(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        log.info("saved %s", path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the latest checkpoint of this run, if any."""
        path = Path(path) if path else ckpt.latest_checkpoint(self.cfg.checkpoint_dir)
        if path is None:
            return False
        data = ckpt.load_checkpoint(path)
        self.backbone.load_trainable_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.ema.load_state_dict(data["ema"], data["state"]["ema_updates"])
        self.sampler.load_state_dict(data["state"]["sampler"])
        ckpt.set_rng_state(self.generator, data["rng"])
        self.iteration = int(data["state"]["iteration"])
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True
