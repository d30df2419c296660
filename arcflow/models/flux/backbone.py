"""FLUX.1 as an ArcFlow backbone: diffusers' FluxTransformer2DModel + peft LoRA + ArcFlow heads.

FLUX.1-dev is guidance-distilled: teacher and student both receive the guidance embedding
(3.5), and there is no classifier-free guidance pass (SPEC §3).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import Tensor, nn

from arcflow.config import ModelConfig, torch_dtype
from arcflow.models.base import PATCH, Conditioning, TransformerBackbone, pack

# SPEC §2: single-stream blocks' proj_mlp/proj_out, double-stream feed-forwards, timestep MLP.
LORA_TARGETS = (
    r".*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
    r"|.*transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|.*time_text_embed\.timestep_embedder\.linear_[12]"
)

FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56)}
"""black-forest-labs/FLUX.1-dev transformer/config.json."""


def latent_image_ids(height: int, width: int, device: torch.device) -> Tensor:
    """RoPE position ids (row, column) of each 2x2 token: (H/2 * W/2, 3)."""
    h, w = height // PATCH, width // PATCH
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


class FluxBackbone(TransformerBackbone):
    latent_channels = 16
    vae_scale_factor = 8
    transformer_class = FluxTransformer2DModel
    lora_targets = LORA_TARGETS
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    # A single-stream block returns its text and image halves as slices of one tensor; the next block
    # concatenates them again and norm_out reads the image half, both out of place.
    view_outputs_checked = ("FluxSingleTransformerBlock",)

    def __init__(self, transformer: FluxTransformer2DModel, num_modes: int = 16, lora_rank: int = 256,
                 lora_alpha: float = 256, lora_dropout: float = 0.05, guidance: float = 3.5,
                 compute_dtype: torch.dtype = torch.bfloat16, gradient_checkpointing: bool = False,
                 head_seed: int = 0):
        super().__init__(transformer, num_modes=num_modes, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, compute_dtype=compute_dtype,
                         gradient_checkpointing=gradient_checkpointing, head_seed=head_seed)
        self.guidance = guidance

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device, head_seed: int = 0) -> "FluxBackbone":
        dtype = torch_dtype(cfg.dtype)
        return cls.from_pretrained(
            cfg.pretrained, torch_dtype=dtype, device=device, num_modes=cfg.num_modes, lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, guidance=cfg.guidance, compute_dtype=dtype,
            gradient_checkpointing=cfg.gradient_checkpointing, head_seed=head_seed)

    def _forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        b, _, h, w = x.shape
        text = cond["prompt_embeds"]
        device = x.device
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=device)
        with self._autocast(device):
            return self.transformer(
                hidden_states=pack(x).to(self.transformer.dtype),
                encoder_hidden_states=text.to(self.transformer.dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(self.transformer.dtype),
                timestep=sigma.to(device),
                img_ids=latent_image_ids(h, w, device),
                txt_ids=torch.zeros(text.shape[1], 3, device=device),
                guidance=guidance,
                return_dict=False,
            )[0]

    def load_vae(self, pretrained: str, dtype: torch.dtype) -> nn.Module:
        return AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype)

    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
