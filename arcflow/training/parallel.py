"""Data parallelism, applied by one function: DDP or FSDP2 over the backbone.

Either way there is one copy of the frozen network per rank (FSDP2: one shard of it),
shared by teacher and student. Under DDP only the trainable parameters are synchronised
and the teacher never goes through the wrapper; under FSDP2 each transformer block is a
shard unit holding its frozen weights and its LoRA adapters together, so the teacher's
forward gathers the same shards the student uses.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from arcflow.distributed import DistEnv, init_single_process_group
from arcflow.models.base import Backbone

PARALLEL_MODES = ("ddp", "fsdp")
_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


def parallelize(backbone: Backbone, mode: str, env: DistEnv, compute_dtype: torch.dtype) -> nn.Module:
    """Wrap ``backbone`` for ``mode``; returns the module whose forward is the student policy."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"config key 'train_cfg.parallel': expected one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "fsdp":
        # FSDP2 warns when a unit returns a view (an in-place op on it would skip the unit's pre-backward
        # all-gather). The blocks a backbone lists as checked return views that nothing modifies in place:
        # tests/test_distributed.py shows FSDP2 giving one process's update.
        for name in backbone.view_outputs_checked:
            warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \(FSDP{name}\) returned a view tensor")
        # Sharding pays off (and is required for the memory budget) even on one rank, where FSDP2 still
        # needs a process group: plain `python tools/train.py` gets one of this process alone.
        init_single_process_group(env.device)
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
    # No buffer is synchronised in forward (they are frozen and ignored above); torch >= 2.13 names the flag
    # forward_sync_buffers and deprecates broadcast_buffers.
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
    return DistributedDataParallel(backbone, device_ids=device_ids, gradient_as_bucket_view=True, **no_sync)


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
