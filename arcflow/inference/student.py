"""Generate from a training checkpoint with the EMA student (the trainer's own sampler)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from arcflow.config import RunConfig, torch_dtype
from arcflow.images import save_grid
from arcflow.inference.export import join_student_state
from arcflow.method.sampling import sample_student
from arcflow.models import build_backbone, build_text_encoder
from arcflow.models.adapter import CONFIG_FILE, HEADS_FILE, LORA_FILE, AdapterConfig, adapter_file, check_shapes
from arcflow.training import checkpoint as ckpt


def load_ema_student(cfg: RunConfig, checkpoint: str | Path, device: torch.device):
    """The backbone with the checkpoint's EMA weights, plus the text encoder and VAE."""
    path = ckpt.resolve_checkpoint(checkpoint)
    backbone = build_backbone(cfg.model, device)
    # The EMA weights are loaded straight into the student's trainable parameters.
    ema = {name: p.detach() for name, p in backbone.trainable_named_parameters()}
    try:
        ckpt.load_checkpoint(path, {"ema": ema})
    except ValueError as err:
        raise ValueError(f"checkpoint '{path}' does not match config '{cfg.name}': {err}") from None
    backbone.eval()
    text_encoder = build_text_encoder(cfg.model).to(device)
    vae = backbone.load_vae(cfg.model.pretrained, torch_dtype(cfg.model.dtype)).to(device)
    return backbone, text_encoder, vae


def load_adapter_student(cfg: RunConfig, adapter: str | Path, device: torch.device):
    """The backbone of ``cfg.model`` with an exported adapter's weights as its student, plus text encoder and VAE.

    The adapter's K, LoRA rank and alpha replace the config's; its shift, NFE and timestep ratio
    are returned in its :class:`AdapterConfig` for sampling. Sampling this backbone equals the
    family pipeline with the adapter loaded (tested), and its teacher is the same frozen weights.
    """
    folder = Path(adapter)
    config = AdapterConfig.load(adapter_file(folder, CONFIG_FILE))
    if config.family != cfg.model.backbone:
        raise ValueError(f"adapter '{folder}' is for family '{config.family}', config '{cfg.name}' for "
                         f"'{cfg.model.backbone}'")
    model = dataclasses.replace(cfg.model, num_modes=config.num_modes, lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha, guidance=config.guidance)
    backbone = build_backbone(model, device)
    tensors = join_student_state(load_file(adapter_file(folder, LORA_FILE)),
                                 load_file(adapter_file(folder, HEADS_FILE)))
    params = dict(backbone.trainable_named_parameters())
    check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, {k: tuple(p.shape) for k, p in params.items()},
                 f"adapter '{folder}' does not fit model.pretrained='{cfg.model.pretrained}'")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    backbone.eval()
    text_encoder = build_text_encoder(model).to(device)
    vae = backbone.load_vae(model.pretrained, torch_dtype(model.dtype)).to(device)
    return backbone, text_encoder, vae, config


@torch.no_grad()
def generate(cfg: RunConfig, checkpoint: str | Path, prompts: list[str], nfe: int, out: str | Path,
             height: int = 1024, width: int = 1024, seed: int = 0, device: str | torch.device = "cpu") -> Path:
    """Sample one image per prompt at ``nfe`` student evaluations and save them as one PNG row."""
    device = torch.device(device)
    backbone, text_encoder, vae = load_ema_student(cfg, checkpoint, device)
    shape = backbone.latent_shape(height, width)
    noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    cond = {k: v.to(device) for k, v in text_encoder.encode(prompts).items()}
    latents = sample_student(backbone, noise, cond, nfe, cfg.distill.shift, cfg.distill.timestep_ratio)
    images = backbone.decode(vae, latents)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid([[img for img in images]], out, pad=0)
    return out
