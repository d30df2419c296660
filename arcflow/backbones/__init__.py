"""Model families behind one small interface; the trainer only ever sees :class:`Backbone`."""

from __future__ import annotations

import torch

from arcflow.backbones.base import Backbone, Conditioning
from arcflow.backbones.flux import FluxBackbone
from arcflow.config import ModelConfig, torch_dtype

BACKBONES: dict[str, type[Backbone]] = {"flux": FluxBackbone}


def build_backbone(cfg: ModelConfig, device: torch.device, head_seed: int = 0) -> Backbone:
    """The configured teacher, with the student built on it (frozen weights in ``cfg.dtype``)."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"config key 'model.backbone': unknown {cfg.backbone!r}; expected one of {sorted(BACKBONES)}")
    dtype = torch_dtype(cfg.dtype)
    return BACKBONES[cfg.backbone].from_pretrained(
        cfg.pretrained, torch_dtype=dtype, device=device, num_modes=cfg.num_modes, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, guidance=cfg.guidance, compute_dtype=dtype,
        gradient_checkpointing=cfg.gradient_checkpointing, head_seed=head_seed)


__all__ = ["BACKBONES", "Backbone", "Conditioning", "FluxBackbone", "build_backbone"]
