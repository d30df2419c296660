"""The interface between the ArcFlow method and a model family (FLUX, Qwen-Image, ...).

A backbone owns ONE copy of the frozen teacher network. The student is the same network
with LoRA adapters switched on and its output layer swapped for the ArcFlow heads, so
teacher and student share every frozen weight. Latents cross this interface unpacked,
as (B, C, H, W); packing into tokens is the backbone's business.

Both families of diffusers transformers we distil end in ``norm_out`` -> ``proj_out`` on
2x2-patch tokens, so :class:`TransformerBackbone` builds the student the same way for all
of them; a family supplies its transformer class, LoRA targets, forward call and VAE.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from arcflow.method.policy import ArcFlowPolicy
from arcflow.models.lora_dropout import DropoutKeys, install_hash_dropout

Conditioning = dict[str, Tensor]
"""Text conditioning of a batch, as produced by the family's text encoder."""

PATCH = 2
"""Latent pixels per token side: FLUX and Qwen-Image both pack 2x2 patches."""
ADAPTER_NAME = "arcflow"
"""peft adapter name of the student's LoRA, in training and in the diffusers pipelines."""


# -- tokens <-> latents ---------------------------------------------------------------------------
def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, in the diffusers 2x2 patch order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: Tensor, height: int, width: int, groups: int = 1) -> Tensor:
    """(B, N, G*C*4) tokens -> (B, G, C, H, W) latents; the inverse of :func:`pack` per group."""
    b = tokens.shape[0]
    h, w = height // PATCH, width // PATCH
    x = tokens.reshape(b, h, w, groups, -1, PATCH, PATCH).permute(0, 3, 4, 1, 5, 2, 6)
    return x.reshape(b, groups, -1, height, width)


def policy_from_tokens(tokens: Tensor, num_modes: int, height: int, width: int, sigma: Tensor) -> ArcFlowPolicy:
    """The ArcFlow policy from the heads' per-token output (B, N, K*C*4 + K*4 + (K-1)*4).

    Shared by the trainer's student and the diffusers pipelines, so the two cannot drift.
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


# -- the student's output layers ------------------------------------------------------------------
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


class OutputSwitch(nn.Module):
    """Routes to the teacher's or the student's module; flipped by :meth:`TransformerBackbone._mode`."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.use_student = False

    def forward(self, *args, **kwargs):
        return (self.student if self.use_student else self.teacher)(*args, **kwargs)


def student_output_layers(transformer: nn.Module, num_modes: int) -> nn.ModuleDict:
    """Fresh student ``norm_out`` + heads shaped for ``transformer`` (keys as in the adapter's heads file).

    Their values are meant to be overwritten by loaded tensors; the heads are built on CPU
    around a stand-in of the teacher's ``proj_out`` (which may live on meta or an accelerator)
    and without touching the global RNG, so loading an adapter never changes later samples.
    """
    teacher_proj_out = transformer.proj_out
    with torch.random.fork_rng(devices=[]):
        stand_in = nn.Linear(teacher_proj_out.in_features, teacher_proj_out.out_features)
        heads = ArcFlowHeads(stand_in, num_modes)
    return nn.ModuleDict({"norm_out": copy.deepcopy(transformer.norm_out), "heads": heads})


# -- the interface --------------------------------------------------------------------------------
class Backbone(nn.Module, ABC):
    """Teacher velocity and student policy of one model family."""

    latent_channels: int
    vae_scale_factor: int
    """Pixels per latent pixel along each side."""
    view_outputs_checked: ClassVar[tuple[str, ...]] = ()
    """Class names of shard units that return views of one tensor, checked never to be modified in place
    by their callers (so FSDP2's warning about them is silenced; see training/parallel.py)."""
    dropout_keys: DropoutKeys
    """Seed, iteration, call and global sample indices the student's LoRA dropout masks are drawn from."""

    @abstractmethod
    def teacher_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Frozen teacher's (guided) velocity u(x, sigma) for latents (B, C, H, W) and sigma (B,)."""

    @abstractmethod
    def student_policy(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> ArcFlowPolicy:
        """Student's ArcFlow policy predicted at (x, sigma)."""

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> ArcFlowPolicy:
        """The student, so that a data-parallel wrapper's forward is the student's."""
        return self.student_policy(x, sigma, cond)

    @abstractmethod
    def shard_units(self) -> list[nn.Module]:
        """The repeated blocks: FSDP2 and activation-checkpointing units."""

    @abstractmethod
    def root_module(self) -> nn.Module:
        """The network both teacher and student call; FSDP2's root."""

    @abstractmethod
    def rate_parameters(self) -> list[nn.Parameter]:
        """The rates head, which trains with a smaller learning rate (SPEC §2)."""

    @abstractmethod
    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Latents (B, C, H, W) to images (B, 3, H*f, W*f) in [0, 1]."""

    @abstractmethod
    def load_vae(self, pretrained: str, dtype: torch.dtype) -> nn.Module:
        """The family's VAE from the same hub id or folder as the transformer."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent for an image of height x width pixels."""
        multiple = PATCH * self.vae_scale_factor
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple}")
        return self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.named_parameters() if p.requires_grad)


def train_lora(module: nn.Module, keys: DropoutKeys, compute_dtype: torch.dtype) -> list[BaseTunerLayer]:
    """Make the peft LoRA of ``module`` the student's trainable part: fp32 adapter weights, dropout masks
    from ``keys`` (:mod:`arcflow.models.lora_dropout`), inputs left in ``compute_dtype``. Returns the
    LoRA layers."""
    install_hash_dropout(module, ADAPTER_NAME, keys)
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if compute_dtype != torch.float32:
        # Under autocast lora_A computes in compute_dtype whatever it is given, so peft's cast of each
        # LoRA input to the fp32 adapter weights' dtype is a round trip: two passes over the input (and
        # dropout on fp32) forward and backward that change no bit of the result.
        for layer in layers:
            layer.cast_input_dtype_enabled = False
    return layers


class TransformerBackbone(Backbone):
    """A diffusers transformer ending in ``norm_out`` -> ``proj_out``, made into teacher and student.

    The student is made in place: LoRA adapters on ``lora_targets`` (off for the teacher), a
    trainable fp32 copy of ``norm_out``, and ``proj_out`` replaced by the ArcFlow heads. Both
    output layers sit behind an :class:`OutputSwitch`, so the teacher keeps its original
    layers and the frozen base weights exist once. A family subclass sets the class
    attributes and implements :meth:`_forward` (one call of the transformer on tokens).
    """

    transformer_class: ClassVar[type]
    """The diffusers model class of the ``transformer/`` subfolder."""
    lora_targets: ClassVar[str]
    """peft ``target_modules`` regex (full module names) of the student's LoRA."""
    block_lists: ClassVar[tuple[str, ...]]
    """Attribute names of the transformer's ``nn.ModuleList``s of repeated blocks."""

    def __init__(self, transformer: nn.Module, num_modes: int = 16, lora_rank: int = 256, lora_alpha: float = 256,
                 lora_dropout: float = 0.05, compute_dtype: torch.dtype = torch.bfloat16,
                 gradient_checkpointing: bool = False, head_seed: int = 0):
        super().__init__()
        transformer.requires_grad_(False)
        if lora_rank > 0:
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                               init_lora_weights="gaussian",
                                               target_modules=self.lora_target_regex(transformer)),
                                    adapter_name=ADAPTER_NAME)
        self.dropout_keys = DropoutKeys()
        """Set by the trainer before each student call: LoRA dropout masks follow the global sample index."""
        # peft's disable_adapters() also flips requires_grad on every call; the teacher only
        # needs the adapters bypassed, so the flag is set on the LoRA layers directly.
        self._lora_layers = train_lora(transformer, self.dropout_keys, compute_dtype)
        teacher_proj_out = transformer.proj_out
        generator = torch.Generator().manual_seed(head_seed)
        heads = ArcFlowHeads(teacher_proj_out, num_modes, generator=generator).to(teacher_proj_out.weight.device)
        student_norm = copy.deepcopy(transformer.norm_out).float().requires_grad_(True)
        transformer.norm_out = OutputSwitch(transformer.norm_out, student_norm)
        transformer.proj_out = OutputSwitch(teacher_proj_out, heads)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer
        self.num_modes = num_modes
        self.compute_dtype = compute_dtype

    @classmethod
    def lora_target_regex(cls, transformer: nn.Module) -> str:
        """peft ``target_modules`` regex for ``transformer``; a family whose targets depend on depth overrides it."""
        return cls.lora_targets

    @classmethod
    def from_pretrained(cls, pretrained: str, torch_dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu", **kwargs: Any) -> TransformerBackbone:
        """Load the teacher from a hub id or a local diffusers folder and build the student on it."""
        return cls(cls.load_transformer(pretrained, torch_dtype, device), **kwargs)

    @classmethod
    def load_transformer(cls, pretrained: str, torch_dtype: torch.dtype, device: str | torch.device) -> nn.Module:
        """The teacher's transformer from a hub id or a local diffusers folder."""
        return cls.transformer_class.from_pretrained(pretrained, subfolder="transformer",
                                                     torch_dtype=torch_dtype).to(device)

    @property
    def heads(self) -> ArcFlowHeads:
        return self.transformer.proj_out.student

    def shard_units(self) -> list[nn.Module]:
        return [block for name in self.block_lists for block in getattr(self.transformer, name)]

    def root_module(self) -> nn.Module:
        return self.transformer

    def rate_parameters(self) -> list[nn.Parameter]:
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

    def _autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    @abstractmethod
    def _forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """One transformer call on latents (B, C, H, W): its per-token output (B, N, D)."""

    def teacher_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        with self._mode(student=False), torch.no_grad():
            tokens = self._forward(x, sigma, cond)
        return unpack(tokens.float(), x.shape[2], x.shape[3])[:, 0]

    def student_policy(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> ArcFlowPolicy:
        with self._mode(student=True):
            tokens = self._forward(x, sigma, cond).float()
        return policy_from_tokens(tokens, self.num_modes, x.shape[2], x.shape[3], sigma)


# -- what a text encoder returns --------------------------------------------------------------------
@dataclass(frozen=True)
class ConditioningSchema:
    """What a family's text encoder puts in a :data:`Conditioning`, so data and cache need not know it.

    ``sequences`` maps each (B, L, D) key to the key of its (B, L) attention mask, or to None when
    every position counts (FLUX's T5 runs unmasked: its outputs at pad positions depend on the
    prompt). ``vectors`` are (B, D) keys. ``negative_prompt`` is the prompt of the teacher's
    unconditional branch (true CFG), or None for a family without one; its conditioning reaches
    the backbone in every batch as ``negative_<key>`` entries.
    """

    sequences: dict[str, str | None]
    vectors: tuple[str, ...] = ()
    negative_prompt: str | None = None

    def with_negative(self, cond: Conditioning, negative: Conditioning) -> Conditioning:
        """``cond`` plus the (batch-1) ``negative`` conditioning broadcast to its batch as ``negative_*``."""
        batch = next(iter(cond.values())).shape[0]
        extra = {f"negative_{key}": value.expand(batch, *value.shape[1:]) for key, value in negative.items()}
        return {**cond, **extra}


# -- what a family registers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One model family's pieces, found by name (``model.backbone``) through :mod:`arcflow.models`."""

    name: str
    backbone: type[TransformerBackbone]
    text_encoders: dict[str, type[nn.Module]]
    """Config ``model.text_encoder.type`` names -> classes; the first is the default."""
    pipeline: type
    """The ArcFlow diffusers pipeline (a subclass of the family's diffusers pipeline)."""
    make_tiny: Callable[[str | Path, int], Path]
    """(out_dir, seed) -> a tiny random model of the family in the real on-disk layout."""
    diffusers_pipelines: tuple[str, ...] = field(default=())
    """``model_index.json`` ``_class_name`` values of this family's base models."""
    full_size: dict[str, Any] = field(default_factory=dict)
    """The real model's published transformer config (``transformer/config.json``): meta-device figures
    (parameter counts, the GPU check) build the full-size architecture from it without any download."""
    eval_teacher_steps: int = 50
    """Steps of the teacher's own sampler in the evaluation protocol (with the config's guidance: FLUX.1-dev
    50 steps at guidance 3.5, Qwen-Image 50 steps of true CFG 4.0), as the papers of the field report it."""

    @property
    def default_text_encoder(self) -> str:
        return next(iter(self.text_encoders))

    def build_text_encoder(self, type_name: str | None, **kwargs: Any) -> nn.Module:
        name = type_name or self.default_text_encoder
        if name not in self.text_encoders:
            raise ValueError(f"config key 'model.text_encoder.type': unknown {name!r} for model.backbone="
                             f"'{self.name}'; expected one of {sorted(self.text_encoders)}")
        return self.text_encoders[name](**kwargs)
