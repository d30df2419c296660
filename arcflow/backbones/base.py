"""The interface between the ArcFlow method and a model family (FLUX, Qwen-Image, ...).

A backbone owns ONE copy of the frozen teacher network. The student is the same network
with LoRA adapters switched on and its output layer swapped for the ArcFlow heads, so
teacher and student share every frozen weight. Latents cross this interface unpacked,
as (B, C, H, W); packing into tokens is the backbone's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import Tensor, nn

from arcflow.policy import ArcFlowPolicy

Conditioning = dict[str, Tensor]
"""Text conditioning of a batch, as produced by the backbone's text encoder."""


class Backbone(nn.Module, ABC):
    """Teacher velocity and student policy of one model family."""

    latent_channels: int
    vae_scale_factor: int
    """Pixels per latent pixel along each side."""

    @abstractmethod
    def teacher_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Frozen teacher's velocity u(x, sigma) for latents (B, C, H, W) and sigma (B,)."""

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
    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Latents (B, C, H, W) to images (B, 3, H*f, W*f) in [0, 1]."""

    @abstractmethod
    def load_vae(self, pretrained: str, dtype: torch.dtype) -> nn.Module:
        """The family's VAE from the same hub id or folder as the transformer."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent for an image of height x width pixels."""
        multiple = 2 * self.vae_scale_factor
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple}")
        return self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.named_parameters() if p.requires_grad)
