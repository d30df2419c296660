"""Generate from a training checkpoint with the EMA student (the trainer's own sampler): ``arcflow sample``.

Left-out settings are the ones the checkpoint was trained with (its ``state.json`` records the
text length and the image sizes; the config gives NFE and schedule), so a bare
``arcflow sample CONFIG --ckpt RUN --prompt ... --out x.png`` samples what was distilled.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from arcflow.config import RunConfig, TextEncoderConfig, torch_dtype
from arcflow.images import save_grid
from arcflow.inference.export import join_student_state
from arcflow.method.sampling import sample_student
from arcflow.models import build_backbone, build_text_encoder
from arcflow.models.adapter import (CONFIG_FILE, HEADS_FILE, LORA_FILE, AdapterConfig, adapter_file, check_shapes,
                                    read_safetensors, settings_outside)
from arcflow.training import checkpoint as ckpt


@dataclass(frozen=True)
class TrainedWith:
    """What the student saw of its prompts in training."""

    max_sequence_length: int
    resolutions: tuple[tuple[int, int], ...]
    """(height, width), most frequent first."""


def trained_with(cfg: RunConfig, checkpoint: str | Path) -> TrainedWith:
    """The checkpoint's record (written by the trainer), or the config's values for a checkpoint without one."""
    path = ckpt.resolve_checkpoint(checkpoint)
    record = json.loads((path / ckpt.STATE_FILE).read_text()).get("trained_with") or {}
    configured = TrainedWith((cfg.model.text_encoder or TextEncoderConfig()).max_sequence_length,
                             ((cfg.data.train.height, cfg.data.train.width),))
    if not record.get("max_sequence_length") or not record.get("resolutions"):
        warnings.warn(f"checkpoint '{path}' does not record the text length and image sizes it was trained with "
                      f"(saved by an older arcflow); using the config's: {configured.max_sequence_length} tokens, "
                      f"{configured.resolutions[0][0]}x{configured.resolutions[0][1]}", UserWarning, stacklevel=2)
        return configured
    return TrainedWith(int(record["max_sequence_length"]), tuple((int(h), int(w)) for h, w in record["resolutions"]))


def load_ema_student(cfg: RunConfig, checkpoint: str | Path, device: torch.device, text_length: int | None = None):
    """The backbone with the checkpoint's EMA weights, plus the text encoder (``text_length`` tokens if given)
    and the VAE."""
    path = ckpt.resolve_checkpoint(checkpoint)
    backbone = build_backbone(cfg.model, device)
    # The EMA weights are loaded straight into the student's trainable parameters.
    ema = {name: p.detach() for name, p in backbone.trainable_named_parameters()}
    try:
        ckpt.load_checkpoint(path, {"ema": ema})
    except ckpt.CheckpointDamaged:  # names the damaged file already; not a mismatch
        raise
    except ValueError as err:
        raise ValueError(f"checkpoint '{path}' does not match config '{cfg.name}': {err}") from None
    backbone.eval()
    model = cfg.model
    if text_length is not None:
        encoder = dataclasses.replace(model.text_encoder or TextEncoderConfig(), max_sequence_length=text_length)
        model = dataclasses.replace(model, text_encoder=encoder)
    text_encoder = build_text_encoder(model).to(device)
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
    tensors = join_student_state(read_safetensors(adapter_file(folder, LORA_FILE)),
                                 read_safetensors(adapter_file(folder, HEADS_FILE)))
    params = dict(backbone.trainable_named_parameters())
    check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, {k: tuple(p.shape) for k, p in params.items()},
                 f"adapter '{folder}' does not fit model.pretrained='{cfg.model.pretrained}'")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    backbone.eval()
    if config.max_sequence_length is not None:  # the text length the student was trained with
        encoder = dataclasses.replace(model.text_encoder or TextEncoderConfig(),
                                      max_sequence_length=config.max_sequence_length)
        model = dataclasses.replace(model, text_encoder=encoder)
    text_encoder = build_text_encoder(model).to(device)
    vae = backbone.load_vae(model.pretrained, torch_dtype(model.dtype)).to(device)
    return backbone, text_encoder, vae, config


@torch.no_grad()
def generate(cfg: RunConfig, checkpoint: str | Path, prompts: list[str], out: str | Path, nfe: int | None = None,
             height: int | None = None, width: int | None = None, seed: int = 0,
             device: str | torch.device = "cpu") -> Path:
    """Sample one image per prompt and save them as one PNG row; left-out settings are the trained ones."""
    device = torch.device(device)
    trained = trained_with(cfg, checkpoint)
    default_height, default_width = trained.resolutions[0]
    height, width, nfe = height or default_height, width or default_width, nfe or cfg.distill.nfe
    for why in settings_outside({"nfe": cfg.distill.nfe}, trained.resolutions, size=(height, width),
                                nfe=nfe).values():
        warnings.warn(f"checkpoint '{checkpoint}': {why}; expect worse images", UserWarning, stacklevel=2)
    backbone, text_encoder, vae = load_ema_student(cfg, checkpoint, device, trained.max_sequence_length)
    shape = backbone.latent_shape(height, width)
    # Prompt i draws from seed + i, as in ``arcflow generate``: an image does not depend on the other prompts.
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(prompts))]).to(device)
    cond = {k: v.to(device) for k, v in text_encoder.encode(prompts).items()}
    latents = sample_student(backbone, noise, cond, nfe, cfg.distill.shift, cfg.distill.timestep_ratio)
    images = backbone.decode(vae, latents)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid([[img for img in images]], out, pad=0)
    return out
