"""Qwen-Image as an ArcFlow backbone: diffusers' QwenImageTransformer2DModel + peft LoRA + ArcFlow heads.

Qwen-Image has no guidance embedding. Its teacher is guided by true classifier-free guidance
(scale ``model.guidance``, 4.0, with the empty prompt as the negative), evaluated as one call
of 2B rows; the student sees only the prompt and distils the guided teacher (SPEC §8).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from torch import Tensor, nn
from torch.nn import functional as F

from arcflow.config import ModelConfig, torch_dtype
from arcflow.models.base import PATCH, Conditioning, TransformerBackbone, pack, unpack

# SPEC §8: the image stream's feed-forward in every block and the timestep MLP; the text stream's
# feed-forward is added per block by QwenImageBackbone.lora_target_regex (all but the last block).
LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.img_mlp\.net\.(0\.proj|2)"
    r"|.*time_text_embed\.timestep_embedder\.linear_[12]"
)

QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
"""Qwen/Qwen-Image transformer/config.json (SPEC §8): 60 double-stream blocks of width 3072."""


def _text_mlp_targets(num_blocks: int) -> str:
    """The text feed-forwards of blocks 0..N-2: the last block's text stream is discarded by the model."""
    blocks = "|".join(str(i) for i in range(num_blocks - 1))
    return rf"|.*transformer_blocks\.({blocks})\.txt_mlp\.net\.(0\.proj|2)" if blocks else ""


def _text_rows(cond: Conditioning, prefix: str = "") -> tuple[Tensor, Tensor]:
    """(embeddings, mask) of the prompt (``prefix=""``) or the negative prompt (``prefix="negative_"``)."""
    key = f"{prefix}prompt_embeds"
    if key not in cond:
        raise KeyError(f"Qwen-Image conditioning has no {key!r} (keys: {sorted(cond)}); the true-CFG teacher needs "
                       "the negative (empty) prompt's embedding, which the data layer attaches from the family schema")
    embeds = cond[key]
    mask = cond.get(f"{key}_mask")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds, mask


def _padded_to(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad a batch of text rows to ``length`` tokens; the padding is masked out."""
    extra = length - embeds.shape[1]
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))


class QwenImageBackbone(TransformerBackbone):
    latent_channels = 16
    vae_scale_factor = 8
    transformer_class = QwenImageTransformer2DModel
    lora_targets = LORA_TARGETS
    block_lists = ("transformer_blocks",)

    def __init__(self, transformer: QwenImageTransformer2DModel, num_modes: int = 16, lora_rank: int = 256,
                 lora_alpha: float = 256, lora_dropout: float = 0.05, guidance: float = 4.0,
                 cfg_renorm: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
                 gradient_checkpointing: bool = False, head_seed: int = 0):
        super().__init__(transformer, num_modes=num_modes, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, compute_dtype=compute_dtype,
                         gradient_checkpointing=gradient_checkpointing, head_seed=head_seed)
        self.guidance = guidance
        self.cfg_renorm = cfg_renorm

    @classmethod
    def lora_target_regex(cls, transformer: nn.Module) -> str:
        return cls.lora_targets + _text_mlp_targets(len(transformer.transformer_blocks))

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device, head_seed: int = 0) -> QwenImageBackbone:
        dtype = torch_dtype(cfg.dtype)
        return cls.from_pretrained(
            cfg.pretrained, torch_dtype=dtype, device=device, num_modes=cfg.num_modes, lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, guidance=cfg.guidance,
            cfg_renorm=cfg.cfg_renorm, compute_dtype=dtype, gradient_checkpointing=cfg.gradient_checkpointing,
            head_seed=head_seed)

    def _call(self, x: Tensor, sigma: Tensor, embeds: Tensor, mask: Tensor) -> Tensor:
        """One transformer call on latents (B, C, H, W) and masked text rows: per-token output (B, N, D)."""
        b, _, h, w = x.shape
        device = x.device
        with self._autocast(device):
            return self.transformer(
                hidden_states=pack(x).to(self.transformer.dtype),
                encoder_hidden_states=embeds.to(self.transformer.dtype),
                encoder_hidden_states_mask=mask.to(device),
                timestep=sigma.to(device),
                img_shapes=[[(1, h // PATCH, w // PATCH)]] * b,
                return_dict=False,
            )[0]

    def _forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The prompt alone: the student (and an unguided teacher) never sees the negative prompt."""
        return self._call(x, sigma, *_text_rows(cond))

    def guided_tokens(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The true-CFG teacher's per-token velocity (B, N, 64): cond and uncond in ONE call of 2B rows.

        ``uncond + g * (cond - uncond)``; with ``cfg_renorm`` rescaled per token to the conditional
        prediction's norm, as ``QwenImagePipeline`` does (off by default, SPEC §8).
        """
        embeds, mask = _text_rows(cond)
        negative, negative_mask = _text_rows(cond, "negative_")
        length = max(embeds.shape[1], negative.shape[1])
        embeds, mask = _padded_to(embeds, mask, length)
        negative, negative_mask = _padded_to(negative.to(embeds.dtype), negative_mask.to(mask.dtype), length)
        tokens = self._call(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([embeds, negative]),
                            torch.cat([mask, negative_mask])).float()
        positive, unconditional = tokens.chunk(2)
        guided = unconditional + self.guidance * (positive - unconditional)
        if self.cfg_renorm:
            guided = guided * (positive.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return guided

    def teacher_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        if self.guidance == 1.0:
            return super().teacher_velocity(x, sigma, cond)
        with self._mode(student=False), torch.no_grad():
            tokens = self.guided_tokens(x, sigma, cond)
        return unpack(tokens, x.shape[2], x.shape[3])[:, 0]

    def load_vae(self, pretrained: str, dtype: torch.dtype) -> nn.Module:
        return AutoencoderKLQwenImage.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype)

    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Un-normalise per channel (the config's latents_mean/std), decode the one-frame video, keep the frame."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        latents = latents.float()[:, :, None] * std + mean
        with torch.no_grad():
            images = vae.decode(latents.to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
