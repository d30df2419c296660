"""Data parallelism, applied by one function: DDP or FSDP2 over the backbone.

Either way there is one copy of the frozen network per rank (FSDP2: one shard of it),
shared by teacher and student. Under DDP only the trainable parameters are synchronised
and the teacher never goes through the wrapper; under FSDP2 each transformer block is a
shard unit holding its frozen weights and its LoRA adapters together, so the teacher's
forward gathers the same shards the student uses.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from arcflow.distributed import DistEnv
from arcflow.models.base import Backbone

PARALLEL_MODES = ("ddp", "fsdp")


def parallelize(backbone: Backbone, mode: str, env: DistEnv, compute_dtype: torch.dtype) -> nn.Module:
    """Wrap ``backbone`` for ``mode``; returns the module whose forward is the student policy."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"config key 'train_cfg.parallel': expected one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "fsdp":
        # Sharding pays off (and is required for the memory budget) even on one rank.
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in backbone.shard_units():
            fully_shard(block, mp_policy=policy)
        fully_shard(backbone.root_module(), mp_policy=policy)
        return backbone
    if not env.is_distributed:
        return backbone
    frozen = [name for name, p in backbone.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in backbone.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(backbone, frozen)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(backbone, device_ids=device_ids, broadcast_buffers=False,
                                   gradient_as_bucket_view=True)


def shard_text_encoder(text_encoder: nn.Module, env: DistEnv) -> None:
    """FSDP2 over the large encoders' layers (T5-XXL is 9.5 GB in bf16), when distributed."""
    if not env.is_distributed:
        return
    for root, layers in text_encoder.fsdp_units():
        for layer in layers:
            fully_shard(layer)
        fully_shard(root)


def gradient_sync(student: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP: all-reduce only on the last backward of an optimizer step."""
    if isinstance(student, DistributedDataParallel) and not sync:
        return student.no_sync()
    return nullcontext()
