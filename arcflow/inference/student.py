"""Generate from a training checkpoint with the EMA student (the trainer's own sampler)."""

from __future__ import annotations

from pathlib import Path

import torch

from arcflow.config import RunConfig, torch_dtype
from arcflow.images import save_grid
from arcflow.method.sampling import sample_student
from arcflow.models import build_backbone, build_text_encoder
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
