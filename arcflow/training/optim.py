"""Optimizer, learning-rate warm-up and the power-schedule EMA of the trainable weights."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from arcflow.config import EMAConfig, OptimizerConfig

log = logging.getLogger(__name__)


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], rate_params: list[nn.Parameter],
                    cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the rates head gets ``rates_lr_mult`` x lr."""
    rate_ids = {id(p) for p in rate_params}
    base = [p for _, p in named_params if id(p) not in rate_ids]
    rates = [p for _, p in named_params if id(p) in rate_ids]
    groups = [{"params": base, "lr_mult": 1.0}, {"params": rates, "lr_mult": cfg.rates_lr_mult}]
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mult"]
    kwargs = dict(betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.type == "AdamW8bit":
        if torch.cuda.is_available():
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        log.warning("optimizer.type='AdamW8bit' needs CUDA; using torch AdamW on this machine")
    elif cfg.type != "AdamW":
        raise ValueError(f"optimizer.type must be 'AdamW' or 'AdamW8bit', got {cfg.type!r}")
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(iteration: int, cfg: OptimizerConfig) -> float:
    """Linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_iters``, then constant."""
    if cfg.warmup_iters <= 0:
        return 1.0
    progress = min(iteration / cfg.warmup_iters, 1.0)
    return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * progress


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, cfg: OptimizerConfig) -> float:
    factor = lr_factor(iteration, cfg)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group["lr_mult"] * factor
    return cfg.lr * factor


class EMA:
    """Shadow copy of the trainable weights with beta(n) = (1 - 1/n)^(gamma + 1).

    Before ``start_iter`` the shadow simply tracks the weights, so sampling "with EMA"
    early in a run uses the current student.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: EMAConfig):
        self.cfg = cfg
        self.params = dict(named_params)
        self.shadow = {name: p.detach().clone() for name, p in named_params}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Call after the optimizer step of 0-based ``iteration``."""
        if iteration + 1 < self.cfg.start_iter:
            beta = 0.0
        else:
            self.num_updates += 1
            beta = (1.0 - 1.0 / self.num_updates) ** (self.cfg.gamma + 1.0)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1.0 - beta)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and shadow weights (call again to undo)."""
        for name, p in self.params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name].copy_(tmp)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow tensors themselves, so a checkpoint loads into them in place."""
        return dict(self.shadow)
