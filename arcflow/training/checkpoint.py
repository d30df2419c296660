"""Checkpoints of the trainable state on torch.distributed.checkpoint (DCP), written atomically.

Layout: ``{checkpoint_dir}/iter_0000500/`` holds DCP's shard files (trainable weights, EMA,
optimizer moments — tensors only, possibly sharded DTensors) and ``state.json``
(iteration, data position, EMA count, scalar optimizer state). DCP reshards on load, so a
run saved on N ranks resumes on M. The folder is written under a temporary name and
renamed once every rank has finished, so a folder named ``iter_*`` with a ``state.json``
is always complete; anything else is ignored.

DCP stores its index (``.metadata``) as a pickle; before loading, that file is unpickled
with an allow-list of DCP's own metadata classes, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from arcflow.distributed import DistEnv

_ITER_DIR = re.compile(r"^iter_(\d+)$")
STATE_FILE = "state.json"
_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"),
                 ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")


def check_metadata(path: Path) -> None:
    """Unpickle DCP's index with the allow-list; raise a clear error for anything else."""
    metadata = path / ".metadata"
    if not metadata.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete: missing .metadata")
    try:
        _MetadataUnpickler(io.BytesIO(metadata.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise ValueError(f"checkpoint '{path}/.metadata' is not a plain DCP index ({err}); not loading it") from None


@contextmanager
def _quiet_without_process_group() -> Iterator[None]:
    """DCP warns on each save/load without a process group; for a one-process run (the demo, sample,
    export) that is the intent, so the warning is dropped there and only there."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(checkpoint_dir: str | Path, iteration: int, tensors: dict[str, Any], state: dict[str, Any],
                    env: DistEnv) -> Path:
    """Collective: every rank passes its (sharded) tensors; rank 0 adds ``state`` and publishes."""
    root = Path(checkpoint_dir)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f".{final.name}.partial"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    env.barrier()
    with _quiet_without_process_group():
        dcp.save(tensors, checkpoint_id=str(tmp))
    env.barrier()
    if env.is_main:
        (tmp / STATE_FILE).write_text(json.dumps({"iteration": iteration, **state}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    env.barrier()
    return final


def load_checkpoint(path: str | Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Fill ``tensors`` (same structure as saved, any sharding) in place; return the JSON state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint '{path}' is incomplete: missing {STATE_FILE}")
    check_metadata(path)
    try:
        with _quiet_without_process_group():
            dcp.load(tensors, checkpoint_id=str(path))
    except (RuntimeError, CheckpointException) as err:  # e.g. a key the checkpoint lacks
        raise ValueError(f"checkpoint '{path}' does not fit this model: {err}") from None
    return json.loads((path / STATE_FILE).read_text())


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ITER_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's work/checkpoint dir meaning its latest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at '{path}' (expected an iter_* folder or a run dir holding them)")


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int, keep_every: int | None) -> None:
    """Delete old checkpoints except the newest ``keep_last`` and multiples of ``keep_every``."""
    found = list_checkpoints(checkpoint_dir)
    recent = {path for _, path in found[-keep_last:]} if keep_last > 0 else set()
    for iteration, path in found:
        if path in recent or (keep_every and iteration % keep_every == 0):
            continue
        shutil.rmtree(path)
