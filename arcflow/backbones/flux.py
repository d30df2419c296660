"""FLUX.1 as an ArcFlow backbone: diffusers' FluxTransformer2DModel + peft LoRA + ArcFlow heads.

The student is made in place on the teacher's transformer: LoRA adapters (off for the
teacher), a trainable fp32 copy of ``norm_out``, and ``proj_out`` replaced by three heads
(means, logits, rates). Both output layers sit behind a switch, so the teacher keeps its
original ``norm_out``/``proj_out`` and the frozen base weights exist once.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from arcflow.backbones.base import Backbone, Conditioning
from arcflow.policy import ArcFlowPolicy

PATCH = 2
ADAPTER_NAME = "arcflow"
# SPEC §2: single-stream blocks' proj_mlp/proj_out, double-stream feed-forwards, timestep MLP.
LORA_TARGETS = (
    r".*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
    r"|.*transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|.*time_text_embed\.timestep_embedder\.linear_[12]"
)


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, FLUX's 2x2 patch order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: Tensor, height: int, width: int, groups: int = 1) -> Tensor:
    """(B, N, G*C*4) tokens -> (B, G, C, H, W) latents; the inverse of :func:`pack` per group."""
    b = tokens.shape[0]
    h, w = height // PATCH, width // PATCH
    x = tokens.reshape(b, h, w, groups, -1, PATCH, PATCH).permute(0, 3, 4, 1, 5, 2, 6)
    return x.reshape(b, groups, -1, height, width)


def latent_image_ids(height: int, width: int, device: torch.device) -> Tensor:
    """RoPE position ids (row, column) of each 2x2 token: (H/2 * W/2, 3)."""
    h, w = height // PATCH, width // PATCH
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def policy_from_tokens(tokens: Tensor, num_modes: int, height: int, width: int, sigma: Tensor) -> ArcFlowPolicy:
    """The ArcFlow policy from the heads' per-token output (B, N, K*C*4 + K*4 + (K-1)*4).

    Shared by the trainer's student and the diffusers pipeline, so the two cannot drift.
    """
    k, pixels = num_modes, PATCH * PATCH
    n_means = tokens.shape[-1] - (2 * k - 1) * pixels
    if n_means <= 0 or n_means % (k * pixels):
        raise ValueError(f"transformer output width {tokens.shape[-1]} does not fit K={k} ArcFlow heads")
    means_t, logits_t, rates_t = tokens.split([n_means, k * pixels, (k - 1) * pixels], dim=-1)
    means = unpack(means_t, height, width, groups=k)
    logits = torch.log_softmax(unpack(logits_t, height, width, groups=k), dim=1)
    # K = 1 (a single straight mode) has no rates to unpack.
    rates = unpack(rates_t, height, width, groups=k - 1) if k > 1 else logits.new_zeros(
        tokens.shape[0], 0, 1, height, width)
    return ArcFlowPolicy(means, logits, rates, sigma.float())


class ArcFlowHeads(nn.Module):
    """Means, logits and rates of K modes per token, initialised from the teacher's proj_out."""

    def __init__(self, teacher_proj_out: nn.Linear, num_modes: int, bias_noise_std: float = 0.05,
                 rate_range: tuple[float, float] = (0.2, 4.0), generator: torch.Generator | None = None):
        super().__init__()
        hidden, out = teacher_proj_out.in_features, teacher_proj_out.out_features
        pixels = PATCH * PATCH
        channels = out // pixels
        self.num_modes = num_modes
        self.means = nn.Linear(hidden, num_modes * out)
        self.logits = nn.Linear(hidden, num_modes * pixels)
        self.rates = nn.Linear(hidden, (num_modes - 1) * pixels)
        with torch.no_grad():
            self.means.weight.copy_(teacher_proj_out.weight.float().repeat(num_modes, 1))
            # Drawn on the generator's device, then moved: the same heads whatever the model's device.
            noise = torch.randn(num_modes, channels, 1, generator=generator,
                                device=generator.device if generator is not None else "cpu") * bias_noise_std
            bias = teacher_proj_out.bias.float().reshape(1, channels, pixels) + noise.to(teacher_proj_out.bias.device)
            self.means.bias.copy_(bias.reshape(-1))
            self.logits.weight.zero_()
            self.logits.bias.zero_()
            self.rates.weight.zero_()
            low, high = math.log(rate_range[0]), math.log(rate_range[1])
            rates = torch.linspace(low, high, num_modes - 1) if num_modes > 1 else torch.zeros(0)
            self.rates.bias.copy_(rates.repeat_interleave(pixels))

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.cat([self.means(hidden), self.logits(hidden), self.rates(hidden)], dim=-1)


class _Switch(nn.Module):
    """Routes to the teacher's or the student's module; flipped by :meth:`FluxBackbone._mode`."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.use_student = False

    def forward(self, *args, **kwargs):
        return (self.student if self.use_student else self.teacher)(*args, **kwargs)


class FluxBackbone(Backbone):
    latent_channels = 16
    vae_scale_factor = 8

    def __init__(self, transformer: FluxTransformer2DModel, num_modes: int = 16, lora_rank: int = 256,
                 lora_alpha: float = 256, lora_dropout: float = 0.05, guidance: float = 3.5,
                 compute_dtype: torch.dtype = torch.bfloat16, gradient_checkpointing: bool = False,
                 head_seed: int = 0):
        super().__init__()
        transformer.requires_grad_(False)
        if lora_rank > 0:
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                               init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                                    adapter_name=ADAPTER_NAME)
        teacher_proj_out = transformer.proj_out
        generator = torch.Generator().manual_seed(head_seed)
        heads = ArcFlowHeads(teacher_proj_out, num_modes, generator=generator).to(teacher_proj_out.weight.device)
        student_norm = copy.deepcopy(transformer.norm_out).float().requires_grad_(True)
        transformer.norm_out = _Switch(transformer.norm_out, student_norm)
        transformer.proj_out = _Switch(teacher_proj_out, heads)
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer
        self.num_modes = num_modes
        self.guidance = guidance
        self.compute_dtype = compute_dtype
        # peft's disable_adapters() also flips requires_grad on every call; the teacher only
        # needs the adapters bypassed, so the flag is set on the LoRA layers directly.
        self._lora_layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]

    @classmethod
    def from_pretrained(cls, pretrained: str, subfolder: str = "transformer",
                        torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                        **kwargs) -> "FluxBackbone":
        """Load the teacher from a hub id or a local diffusers folder and build the student on it."""
        transformer = FluxTransformer2DModel.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=torch_dtype)
        return cls(transformer.to(device), **kwargs)

    @property
    def heads(self) -> ArcFlowHeads:
        return self.transformer.proj_out.student

    def shard_units(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def root_module(self) -> nn.Module:
        return self.transformer

    def rate_parameters(self) -> list[nn.Parameter]:
        """The rates head trains with a smaller learning rate (SPEC §2)."""
        return list(self.heads.rates.parameters())

    @contextmanager
    def _mode(self, student: bool) -> Iterator[None]:
        self.transformer.norm_out.use_student = student
        self.transformer.proj_out.use_student = student
        for layer in self._lora_layers:
            layer._disable_adapters = not student
        try:
            yield
        finally:
            self.transformer.norm_out.use_student = False
            self.transformer.proj_out.use_student = False
            for layer in self._lora_layers:
                layer._disable_adapters = False

    def _forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        b, _, h, w = x.shape
        text = cond["prompt_embeds"]
        device = x.device
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=device)
        autocast = torch.autocast(device.type, dtype=self.compute_dtype,
                                  enabled=self.compute_dtype != torch.float32)
        with autocast:
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

    def teacher_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        with self._mode(student=False), torch.no_grad():
            tokens = self._forward(x, sigma, cond)
        return unpack(tokens.float(), x.shape[2], x.shape[3])[:, 0]

    def student_policy(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> ArcFlowPolicy:
        with self._mode(student=True):
            tokens = self._forward(x, sigma, cond).float()
        return policy_from_tokens(tokens, self.num_modes, x.shape[2], x.shape[3], sigma)

    def load_vae(self, pretrained: str, dtype: torch.dtype) -> nn.Module:
        return AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype)

    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
