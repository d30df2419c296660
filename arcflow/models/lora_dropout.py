"""LoRA dropout whose masks are a function of (seed, iteration, call, global sample, layer, element).

peft draws LoRA dropout masks from the process's global RNG, so they depend on how a global batch
is split over ranks and micro-batches. :class:`HashDropout` replaces peft's dropout module in
every LoRA layer and computes each mask on the device with a counter-based hash instead: the
same sample gets the same mask whatever the split, no RNG state needs saving, and a recomputed
forward (gradient checkpointing) or the backward gets its masks again.

The hash is ``hash32``, a 32-bit multiply-xorshift finaliser (constants 0x21f0aaad and
0x735a2d97, C. Wellons' hash-prospector). Tensors hold the 32-bit patterns as int32: products
wrap modulo 2**32 on every backend and right shifts are made logical by masking off the copied
sign bits, so the tensor version equals the Python-integer definition bit for bit, in half the
bytes of int64 and, inside a GPU kernel, without emulated 64-bit multiplies. For an input of
shape (B, ..., F) (rows ``t`` of the middle dimensions, flattened) element (b, t, f) of sample
``s_b`` is kept iff ``hash32(g[f] ^ row[b, t]) mod 2**31 >= round(p * 2**31)``, with

    layer_key  = chain(seed, iteration, call, layer)        (Python integers, once per forward)
    sample_key = hash32(hash32(s_b mod 2**32) ^ layer_key)
    row[b, t]  = hash32(hash32(t) ^ sample_key)             (B x T values)
    g[f]       = hash32(f ^ 0x9e3779b9)                     (F values, cached)

where ``chain`` folds each value into the state by ``hash32(state ^ value)``, 32 bits at a time.
Kept elements are scaled by 1 / (1 - p), as in ``nn.Dropout``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

MASK32 = 0xFFFFFFFF
MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
FEATURE_SALT = 0x9E3779B9
KEEP_BITS = 31
"""A hash's low 31 bits decide: as int32 they are a non-negative value on every backend."""


def hash32_int(x: int) -> int:
    """``hash32`` of one 32-bit Python integer (the definition the tensor version follows)."""
    x &= MASK32
    x ^= x >> 16
    x = x * MULTIPLIERS[0] & MASK32
    x ^= x >> 15
    x = x * MULTIPLIERS[1] & MASK32
    return x ^ (x >> 15)


def chain_int(*values: int) -> int:
    """One 32-bit key from integers of any size (each folded in 32 bits at a time, low word first)."""
    state = 0
    for value in values:
        value &= 2**64 - 1
        for word in (value & MASK32, value >> 32):
            state = hash32_int(state ^ word)
    return state


def int32_pattern(x: int) -> int:
    """The int32 value with the bits of the 32-bit pattern ``x``."""
    x &= MASK32
    return x - 2**32 if x >= 2**31 else x


def hash32(x: Tensor) -> Tensor:
    """``hash32`` of every element of an int32 tensor of 32-bit patterns (a new tensor)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x.mul_(MULTIPLIERS[0])
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(MULTIPLIERS[1])
    return x.bitwise_xor_((x >> 15) & 0x1FFFF)


def keep_threshold(p: float) -> int:
    """Elements whose hash has its low 31 bits below this are dropped (a fraction ``p`` of them)."""
    return round(p * 2**KEEP_BITS)


class DropoutKeys:
    """What the masks of the next forward depend on; the trainer sets it before each student call."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.iteration = 0
        self.call = 0
        self.samples: Tensor | None = None
        """(B,) global sample indices of the batch rows, or None outside training steps."""

    def set(self, iteration: int, call: int, samples: Tensor) -> None:
        """The next forward is call ``call`` (e.g. the student step) of ``iteration`` on these samples."""
        self.iteration, self.call, self.samples = iteration, call, samples


def _row_keys(shape: torch.Size, keys: DropoutKeys, layer: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``row[b, t]`` (B, T) and ``g[f]`` (F,) of an input of ``shape`` = (B, ..., F) in layer ``layer``."""
    samples = keys.samples
    if samples is None or len(samples) != shape[0]:
        got = "no samples" if samples is None else f"{len(samples)} samples"
        raise RuntimeError(f"LoRA dropout in training mode needs the batch's global sample indices "
                           f"(DropoutKeys.set) for its {shape[0]} rows, got {got}")
    rows = shape[1:-1].numel()
    layer_key = int32_pattern(chain_int(keys.seed, keys.iteration, keys.call, layer))
    low_words = samples.to(device, torch.int64) & MASK32
    sample_patterns = torch.where(low_words >= 2**31, low_words - 2**32, low_words).to(torch.int32)
    sample_key = hash32(hash32(sample_patterns) ^ layer_key)
    row = hash32(hash32(torch.arange(rows, device=device, dtype=torch.int32)).view(1, rows) ^ sample_key.view(-1, 1))
    return row, _feature_hashes(shape[-1], device)


def _kept(row: Tensor, g: Tensor, threshold: int) -> Tensor:
    """(B, T, F) booleans: ``hash32(g[f] ^ row[b, t]) mod 2**31 >= threshold``."""
    return (hash32(g.view(1, 1, -1) ^ row.unsqueeze(-1)) & (2**KEEP_BITS - 1)) >= threshold


def keep_mask(shape: torch.Size, p: float, keys: DropoutKeys, layer: int, device: torch.device) -> Tensor:
    """Boolean keep mask of an input of ``shape`` = (B, ..., F) in layer ``layer`` (see the module docstring)."""
    row, g = _row_keys(shape, keys, layer, device)
    return _kept(row, g, keep_threshold(p)).view(shape)


def drop(x: Tensor, row: Tensor, g: Tensor, threshold: int, scale: float) -> Tensor:
    """``x`` (B, T, F) with the elements whose hash is below ``threshold`` zeroed and the rest scaled."""
    return apply_mask(x, _kept(row, g, threshold), scale)


@functools.cache
def drop_fused() -> Callable[[Tensor, Tensor, Tensor, int, float], Tensor]:
    """:func:`drop` as one kernel (``torch.compile``, built on first use). Eager, every hash step is a
    pass over an int32 tensor the size of the input, many times the cost of ``nn.Dropout``; fused, it
    reads the input and writes the output once, like ``nn.Dropout``, and keeps the hash in registers.
    The arithmetic is exact integer arithmetic, so both give the same result, which is why a machine
    whose compiler fails (no Triton, no C++ compiler) falls back to :func:`drop` with one warning."""
    kernel: Callable[[Tensor, Tensor, Tensor, int, float], Tensor] = torch.compile(drop, dynamic=True,
                                                                                   fullgraph=True)

    def run(x: Tensor, row: Tensor, g: Tensor, threshold: int, scale: float) -> Tensor:
        nonlocal kernel
        try:
            return kernel(x, row, g, threshold, scale)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            warnings.warn(f"LoRA dropout: the fused mask kernel could not be compiled ({reason.strip()}); using "
                          f"the eager masks: the same masks, several times the memory traffic", stacklevel=2)
            kernel = drop
            return drop(x, row, g, threshold, scale)
    return run


def fused_on(x: Tensor) -> bool:
    """Whether the masks of ``x`` are made by :func:`drop_fused` (on CUDA) rather than eagerly."""
    return x.is_cuda


def apply_mask(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    """``x`` where ``keep``, scaled; zero elsewhere (eager dropout with a given mask)."""
    return torch.where(keep, x * scale, 0.0)


class _HashDropFunction(torch.autograd.Function):
    """Dropout's gradient is the same masking applied to the output gradient. Fused, the hash costs
    registers rather than passes, so backward makes the mask again instead of keeping a boolean
    mask of every LoRA layer's input alive from forward to backward (nothing saved but the (B, T)
    and (F,) keys). Eager, the hash is a dozen passes over the input's size, so the mask is kept."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, row: Tensor, g: Tensor, threshold: int, scale: float) -> Tensor:
        ctx.scale, ctx.threshold, ctx.fused = scale, threshold, fused_on(x)
        if ctx.fused:
            ctx.save_for_backward(row, g)
            return drop_fused()(x, row, g, threshold, scale)
        keep = _kept(row, g, threshold)
        ctx.save_for_backward(keep)
        return apply_mask(x, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.fused:
            row, g = ctx.saved_tensors
            grad_x = drop_fused()(grad, row, g, ctx.threshold, ctx.scale)
        else:
            (keep,) = ctx.saved_tensors
            grad_x = apply_mask(grad, keep, ctx.scale)
        return grad_x, None, None, None, None


_FEATURES: dict[tuple[int, torch.device], Tensor] = {}


def _feature_hashes(features: int, device: torch.device) -> Tensor:
    """``g[f]``, computed once per (width, device)."""
    key = (features, device)
    if key not in _FEATURES:
        salt = int32_pattern(FEATURE_SALT)
        _FEATURES[key] = hash32(torch.arange(features, device=device, dtype=torch.int32) ^ salt)
    return _FEATURES[key]


class HashDropout(nn.Module):
    """``nn.Dropout(p)`` with masks from :func:`keep_mask`; the identity in eval mode. On CUDA the
    mask is made and applied by :func:`drop_fused`, in forward and again in backward; elsewhere
    eagerly, once (CPU runs are small)."""

    def __init__(self, p: float, layer: int, keys: DropoutKeys):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {p}")
        self.p, self.layer, self.keys = p, layer, keys

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        row, g = _row_keys(x.shape, self.keys, self.layer, x.device)
        rows = x.reshape(row.shape[0], row.shape[1], g.shape[0])
        out = _HashDropFunction.apply(rows, row, g, keep_threshold(self.p), 1.0 / (1.0 - self.p))
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}"


def install_hash_dropout(model: nn.Module, adapter: str, keys: DropoutKeys) -> int:
    """Swap every ``nn.Dropout`` in the ``adapter`` slot of peft's ``lora_dropout`` dicts for a
    :class:`HashDropout` of the same p, numbered in module order; returns how many were swapped."""
    count = 0
    for module in model.modules():
        slots = getattr(module, "lora_dropout", None)
        if not isinstance(slots, nn.ModuleDict) or adapter not in slots:
            continue
        if isinstance(slots[adapter], nn.Dropout):
            slots[adapter] = HashDropout(slots[adapter].p, count, keys)
            count += 1
    return count
