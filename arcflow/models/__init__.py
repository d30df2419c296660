"""Model families behind one small interface, registered by name (``model.backbone`` in a config).

The method, data, training and inference layers only ever see :class:`Backbone`, a text
encoder's ``encode`` and a :class:`Family`; adding a family is a new package under
``arcflow/models/`` that defines ``FAMILY``, plus one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from arcflow.config import ModelConfig, TextEncoderConfig
from arcflow.models.base import Backbone, Conditioning, Family
from arcflow.models.hub import require_pretrained

FAMILIES: dict[str, str] = {
    "flux": "arcflow.models.flux",
    "qwen_image": "arcflow.models.qwen_image",
}
"""Family name -> the package holding its ``FAMILY`` (imported on first use: each pulls in diffusers)."""


def get_family(name: str) -> Family:
    """The registered family ``name``; an error lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"config key 'model.backbone': unknown {name!r}; expected one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_of_pretrained(pretrained: str | Path) -> Family | None:
    """The family of a local diffusers folder, from its ``model_index.json``; None if it says nothing we know."""
    index = Path(pretrained, "model_index.json")
    if not index.is_file():
        return None
    class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    for name in FAMILIES:
        family = get_family(name)
        if class_name in family.diffusers_pipelines:
            return family
    return None


def check_family_of_pretrained(pretrained: str | Path, family: str, key: str, asked_by: str) -> None:
    """A local base folder of another family than ``family`` is a one-line error naming both, before any weights load.

    A hub id, or a folder whose ``model_index.json`` names no family we know, passes (it cannot be told here).
    """
    found = family_of_pretrained(pretrained)
    if found is not None and found.name != family:
        raise ValueError(f"{key}: '{pretrained}' is a {found.name} model ({', '.join(found.diffusers_pipelines)}), "
                         f"but {asked_by} is for the {family} family")


def build_backbone(cfg: ModelConfig, device: torch.device, head_seed: int = 0) -> Backbone:
    """The configured teacher, with the student built on it (frozen weights in ``cfg.dtype``)."""
    require_pretrained(cfg.pretrained, subfolder="transformer")
    check_family_of_pretrained(cfg.pretrained, cfg.backbone, "model.pretrained", f"model.backbone='{cfg.backbone}'")
    return get_family(cfg.backbone).backbone.from_config(cfg, device, head_seed)


def text_encoder_type(model: ModelConfig) -> str:
    """``model.text_encoder.type``, or the family's default encoder when it is not set."""
    configured = model.text_encoder.type if model.text_encoder else None
    return configured or get_family(model.backbone).default_text_encoder


def build_text_encoder(model: ModelConfig) -> nn.Module:
    """The configured text encoder; by default the family's, from the same hub id or folder as the model."""
    cfg = model.text_encoder or TextEncoderConfig()
    require_pretrained(cfg.pretrained or model.pretrained,
                       "model.text_encoder.pretrained" if cfg.pretrained else "model.pretrained")
    return get_family(model.backbone).build_text_encoder(
        text_encoder_type(model), pretrained=cfg.pretrained or model.pretrained, max_sequence_length=cfg.max_sequence_length,
        torch_dtype=cfg.dtype or model.dtype)


__all__ = ["FAMILIES", "Backbone", "Conditioning", "Family", "build_backbone", "build_text_encoder",
           "check_family_of_pretrained", "family_of_pretrained", "get_family", "text_encoder_type"]
