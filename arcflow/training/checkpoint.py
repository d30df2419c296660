"""Checkpoints of the trainable state on torch.distributed.checkpoint (DCP), written atomically, read safely.

Layout: ``{checkpoint_dir}/iter_0000500/`` holds DCP's shard files (trainable weights, EMA,
optimizer moments — tensors only, possibly sharded DTensors), ``state.json`` (iteration, data
position, EMA count, scalar optimizer state) and ``checksums.json`` (size and SHA-256 of every
other file, and a digest of itself). DCP reshards on load, so a run saved on N ranks resumes on
M. The folder is written under a temporary name and renamed once every rank has finished, so a
folder named ``iter_*`` with a ``state.json`` was complete when written; the checksums tell
whether it still is.

Nothing read from a checkpoint can run code: DCP's index (``.metadata``, a pickle) is unpickled
with an allow-list of exact (module, name) pairs and its entries are then checked to be tensor
entries stored in plain files of the folder; the load planner refuses DCP's pickled byte entries
(which torch would read with ``torch.load(weights_only=False)``); tensor data is read by DCP with
``weights_only=True``. A non-finite tensor is never saved.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.tensor import DTensor

from arcflow.checksums import DamagedFile as CheckpointDamaged
from arcflow.checksums import verify_folder, write_checksums
from arcflow.distributed import DistEnv, all_reduce_max

log = logging.getLogger("arcflow")

_ITER_DIR = re.compile(r"^iter_(\d+)$")
STATE_FILE = "state.json"
# How a damaged pickle fails; none of these can come from code past the allow-list running.
_PICKLE_DAMAGE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                  OverflowError, MemoryError, RecursionError)
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Exactly the globals a DCP index of tensors pickles (torch 2.4+), and nothing reachable through them.
_SAFE_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "BytesStorageMetadata"), (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
    ("collections", "OrderedDict"),
})


class NonFiniteCheckpoint(ValueError):
    """Refused to save: a tensor holds NaN or infinity."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _SAFE_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise RefusedGlobal(f"refusing to load '{module}.{name}'")


def read_metadata(path: str | Path) -> Metadata:
    """DCP's index of the checkpoint at ``path``, unpickled with the allow-list and checked entry by entry."""
    path = Path(path)
    metadata_file = path / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointDamaged(f"checkpoint '{path}' is incomplete: missing .metadata")
    where = f"checkpoint '{metadata_file}'"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(metadata_file.read_bytes())).load()
    except RefusedGlobal as err:
        raise ValueError(f"{where} is not a plain DCP index ({err}); not loading it") from None
    except _PICKLE_DAMAGE as err:
        raise CheckpointDamaged(f"{where} is damaged: {type(err).__name__}: {err}") from None
    if type(metadata) is not Metadata or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise ValueError(f"{where} is not a plain DCP index (holds a {type(metadata).__name__}); not loading it")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or type(entry) is not TensorStorageMetadata:
            raise ValueError(f"{where}: entry {key!r} is a {type(entry).__name__}, not a tensor; not loading it")
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if type(info) is not _StorageInfo or not isinstance(name, str) or Path(name).name != name \
                or name.startswith(".") or info.transform_descriptors or not isinstance(info.offset, int) \
                or not isinstance(info.length, int) or min(info.offset, info.length) < 0:
            raise ValueError(f"{where}: storage of {getattr(index, 'fqn', index)!r} is not a plain file of the "
                             f"checkpoint folder ({info!r}); not loading it")
    return metadata


def check_metadata(path: Path) -> None:
    """Raise a clear error unless ``path/.metadata`` is a plain DCP index of tensors."""
    read_metadata(path)


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by :func:`read_metadata` (never ``pickle.load``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise ValueError(f"checkpoint '{self.path}': per-rank metadata files are not supported")
        return read_metadata(Path(self.path))


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """Loads exactly the tensors asked for; refuses DCP's pickled byte entries."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise ValueError(f"checkpoint entry '{read_item.dest_index.fqn}' is pickled bytes, not a tensor; "
                         f"not loading it")


@contextmanager
def _quiet_without_process_group() -> Iterator[None]:
    """DCP warns on each save/load without a process group; for a one-process run (the demo, sample,
    export) that is the intent, so the warning is dropped there and only there."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def first_non_finite(tensors: dict[str, Any]) -> str | None:
    """The name of the first (local shard of a) floating-point tensor holding NaN or infinity, if any."""
    for name, value in _leaves(tensors):
        local = value.to_local() if isinstance(value, DTensor) else value
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


_VERIFIED: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()
"""Checkpoint folders this process found intact, with each file's (name, size, mtime): one command that
picks a checkpoint and then loads it hashes its files once, and a file changed since is checked again."""


def _file_signature(path: Path) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    stats = ((f.name, f.stat()) for f in path.iterdir() if f.is_file())
    return str(path.resolve()), tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointDamaged` naming the file unless every file matches its recorded checksum."""
    path = Path(path)
    signature = _file_signature(path)
    if signature in _VERIFIED:
        return
    if not verify_folder(path, "checkpoint"):
        warnings.warn(f"checkpoint '{path}' records no checksums (saved by an older arcflow): its bytes cannot be "
                      f"checked", UserWarning, stacklevel=2)
        return
    _VERIFIED.add(signature)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except ValueError as err:
        raise CheckpointDamaged(f"checkpoint file '{path / STATE_FILE}' is damaged: {err}") from None


def check_checkpoint(path: Path) -> None:
    """Every check short of loading: the files' checksums, the index, the JSON state."""
    verify_checkpoint(path)
    read_metadata(path)
    _read_state(path)


def save_checkpoint(checkpoint_dir: str | Path, iteration: int, tensors: dict[str, Any], state: dict[str, Any],
                    env: DistEnv) -> Path:
    """Collective: every rank passes its (sharded) tensors; rank 0 adds ``state`` and the checksums, and publishes.

    Refused on every rank, before anything is written, if any rank holds a non-finite tensor."""
    bad = first_non_finite(tensors)
    if all_reduce_max(float(bad is not None), env) > 0:
        where = f"'{bad}' on rank {env.rank}" if bad else "a tensor on another rank"
        raise NonFiniteCheckpoint(f"not saving checkpoint iteration {iteration}: {where} holds NaN or infinity")
    root = Path(checkpoint_dir)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f".{final.name}.partial"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    env.barrier()
    try:
        with _quiet_without_process_group():
            dcp.save(tensors, checkpoint_id=str(tmp))  # a failure on any rank raises on every rank
        env.barrier()
        if env.is_main:
            (tmp / STATE_FILE).write_text(json.dumps({"iteration": iteration, **state}, indent=1))
            write_checksums(tmp)
    except (OSError, CheckpointException) as err:  # a full or read-only disk, named with its path
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _failure_cause(err) if isinstance(err, CheckpointException) else err
        raise OSError(f"cannot write checkpoint '{tmp}' (kept the earlier ones): {type(cause).__name__}: "
                      f"{cause}") from None
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    env.barrier()
    return final


def _failure_cause(err: CheckpointException) -> BaseException:
    """The first rank's own exception inside DCP's wrapper."""
    for failure in err.failures.values():
        return failure[0] if isinstance(failure, tuple) else failure
    return err


def load_checkpoint(path: str | Path, tensors: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """Fill ``tensors`` (same structure as saved, any sharding) in place; return the JSON state.

    ``verify``: check every file's checksum first (skipped by a caller that already did)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointDamaged(f"checkpoint '{path}' is incomplete: missing {STATE_FILE}")
    if verify:
        verify_checkpoint(path)
    metadata = read_metadata(path)
    state = _read_state(path)
    wanted = {name for name, _ in _leaves(tensors)}
    missing = sorted(wanted - set(metadata.state_dict_metadata))
    if missing:
        raise ValueError(f"checkpoint '{path}' does not fit this model: it lacks {len(missing)} tensor(s), "
                         f"e.g. '{missing[0]}'")
    try:
        with _quiet_without_process_group():
            dcp.load(tensors, storage_reader=_SafeReader(str(path)), planner=_TensorsOnlyPlanner())
    except CheckpointException as err:
        cause = _failure_cause(err)
        if isinstance(cause, ValueError):  # ours: a refused or damaged entry
            raise cause from None
        raise ValueError(f"checkpoint '{path}' does not fit this model or is damaged: "
                         f"{type(cause).__name__}: {cause}") from None
    except (RuntimeError, ValueError) as err:  # e.g. a shape the checkpoint does not have
        raise ValueError(f"checkpoint '{path}' does not fit this model: {err}") from None
    return state


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


def _intact_newest_first(found: list[tuple[int, Path]], then: str) -> Iterator[tuple[int, Path]]:
    """The checkpoints of ``found`` that pass :func:`check_checkpoint`, newest first; each damaged one
    met on the way is logged and warned about ("<what is wrong>; <then>")."""
    for iteration, path in reversed(found):
        try:
            check_checkpoint(path)
        except (CheckpointDamaged, ValueError) as err:
            log.warning("skipping checkpoint %s: %s", path.name, err)
            warnings.warn(f"{err}; {then}", UserWarning, stacklevel=3)
            continue
        yield iteration, path


def latest_good_checkpoint(checkpoint_dir: str | Path, env: DistEnv) -> Path | None:
    """Collective: the newest checkpoint whose files match their checksums, checked by rank 0 only.

    A damaged or incomplete newer one is skipped with a warning naming the file."""
    found = list_checkpoints(checkpoint_dir)
    chosen = -1.0
    if env.is_main:
        intact = next(_intact_newest_first(found, "resuming from an earlier checkpoint"), None)
        if intact is not None:
            chosen = float(intact[0])
    chosen = all_reduce_max(chosen, env)
    return next((path for iteration, path in found if iteration == chosen), None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (as given: loading it names any damage), or a run's work/checkpoint dir meaning
    its newest intact checkpoint: a damaged newer one is skipped with a warning naming the file."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        found = list_checkpoints(candidate)
        intact = next(_intact_newest_first(found, "using an earlier checkpoint"), None)
        if intact is not None:
            return intact[1]
        if found:  # none is intact: the newest one's error
            check_checkpoint(found[-1][1])
    raise FileNotFoundError(f"no checkpoint at '{path}' (expected an iter_* folder or a run dir holding them)")


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int, keep_every: int | None) -> None:
    """Delete old checkpoints except the newest ``keep_last`` (at least the newest one, which is the one
    just saved and so finite) and multiples of ``keep_every``."""
    found = list_checkpoints(checkpoint_dir)
    recent = {path for _, path in found[-max(keep_last, 1):]}
    for iteration, path in found:
        if path in recent or (keep_every and iteration % keep_every == 0):
            continue
        shutil.rmtree(path)
