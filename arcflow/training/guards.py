"""Guards that stop a run before it damages its own results: a diverging step, an unwritable folder."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from arcflow.distributed import DistEnv


class Divergence(RuntimeError):
    """A non-finite loss or gradient norm, on some rank, more often than the run allows."""


def reduce_step(step_losses: torch.Tensor, grad_norm: torch.Tensor, env: DistEnv) -> tuple[list[float], bool]:
    """The rank-mean of the per-segment losses, and whether every rank's losses and gradient norm are finite.

    One all-reduce for both, so every rank takes the same decision on the same step."""
    bad_norm = (~torch.isfinite(grad_norm.detach().reshape(1))).to(step_losses)
    values = torch.cat([step_losses.detach(), bad_norm])
    if env.is_distributed:
        dist.all_reduce(values)  # a NaN loss on any rank makes the sum NaN on every rank
    losses = (values[:-1] / env.world_size).tolist()
    return losses, values[-1].item() == 0 and all(math.isfinite(v) for v in losses)


def check_writable(path: str | Path, what: str) -> None:
    """Create ``path`` and write a probe file in it, so a read-only or full disk is found before training."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe."):
            pass
    except OSError as err:
        raise PermissionError(f"{what} '{folder}' is not writable: {err.strerror or err}") from None


def drop_records_after(path: Path, iteration: int) -> None:
    """Keep the JSON-lines records of ``path`` up to ``iteration`` (and none cut short by a kill), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int) and record["iter"] <= iteration:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
