"""Process-group set-up from torchrun's environment, and cooperative stopping on signals.

One process per GPU (NCCL) or per CPU worker (gloo). Everything else in the package asks
:class:`DistEnv` who it is instead of reading environment variables.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def init_distributed(launcher: str) -> DistEnv:
    """``none``: this process alone. ``pytorch``: join the group torchrun described in the environment."""
    if launcher not in ("none", "pytorch"):
        raise ValueError(f"--launcher must be 'none' or 'pytorch', got {launcher!r}")
    use_cuda = torch.cuda.is_available()
    if launcher == "none":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # each of them would run the whole job
            raise RuntimeError(f"started by torchrun with {world} processes but with --launcher none: each would run "
                               "the whole job into the same work dir; add --launcher pytorch")
        return DistEnv(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--launcher pytorch needs torchrun's environment; missing {', '.join(missing)}")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                            device_id=device if use_cuda else None)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def init_single_process_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store), for what needs one on one rank (FSDP2)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)


def destroy_distributed(graceful: bool = True) -> None:
    """``graceful``: leave together (a rank tearing the group down while a peer still talks to it
    can hang). After a failure no barrier: the peers may never arrive."""
    if dist.is_initialized():
        if graceful:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_max(value: float, env: DistEnv) -> float:
    """The largest of every rank's value (a float so it also carries flags)."""
    if not env.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


class StopSignal:
    """Records SIGINT/SIGTERM so the loop can stop at an iteration boundary on every rank.

    The signal may reach only some ranks (a scheduler killing one process); the flag is
    shared at each boundary, so all ranks leave together and no checkpoint is cut short.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def should_stop(self, env: DistEnv) -> int:
        """0 to go on, else the signal number that some rank received."""
        return int(all_reduce_max(float(self.signum or 0), env))

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
