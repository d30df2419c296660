"""Files of the prompt-embedding cache that survive kill -9 and report their own damage.

Every file is written under a temporary name, fsynced and renamed, so a file under its final name
is whole whatever moment a run was killed. Each carries a SHA-256 of its own content (a safetensors
header's ``sha256`` metadata value, a JSON file's ``"sha256"`` key), computed with that value read
as 64 zeros: a flipped byte anywhere is found without any other file, and named.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_HASH_KEY = b'"sha256":"'
_HASH_PLACEHOLDER = "0" * 64
_ST_DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int16): "I16",
              np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float32): "F32"}


class CacheError(RuntimeError):
    """A cache file is missing, damaged or does not match what it should hold (the message names it)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file written under a temporary name, fsynced and renamed: readers see all of it or nothing, and a
    failure leaves nothing behind."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, fsync, rename: readers see all of it or nothing."""
    with atomic_file(path) as f:
        f.write(data)


# -- JSON with its own hash --------------------------------------------------------------------------
def _json_digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**content, "sha256": _HASH_PLACEHOLDER}, sort_keys=True).encode()).hexdigest()


def write_hashed_json(path: Path, content: dict[str, Any]) -> None:
    """``content`` plus ``"sha256"``, the hash of the rest, atomically."""
    atomic_write_bytes(path, json.dumps({**content, "sha256": _json_digest(content)}, indent=1).encode())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; when it holds a ``"sha256"`` key, its content must match it."""
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {path}: {err}") from err
    if not isinstance(content, dict):
        raise CacheError(f"{path}: damaged (not a JSON object)")
    if "sha256" in content and _json_digest({k: v for k, v in content.items() if k != "sha256"}) != content["sha256"]:
        raise CacheError(f"{path}: damaged (its content does not match its sha256)")
    return content


# -- safetensors, streamed ---------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, tuple[np.dtype, list[int], Sequence[Any]]],
                      metadata: dict[str, str]) -> tuple[str, int]:
    """Stream tensors, each given as (dtype, shape, byte parts), into a safetensors file; atomic.

    Parts are written one after another, so a shard of compressed rows is never joined into one
    more copy in memory. Returns (content hash, file size). The hash is the SHA-256 of the whole
    file with the header's ``sha256`` metadata value read as 64 zeros: it covers header and data.
    """
    header: dict[str, Any] = {"__metadata__": {**metadata, "sha256": _HASH_PLACEHOLDER}}
    offset = 0
    order = sorted(tensors, key=lambda name: (-np.dtype(tensors[name][0]).itemsize, name))  # aligned first
    for name in order:
        dtype, shape, parts = tensors[name]
        size = sum(memoryview(part).nbytes for part in parts)
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    digest = hashlib.sha256(prefix)
    with atomic_file(path) as f:
        f.write(prefix)
        for name in order:
            for part in tensors[name][2]:
                digest.update(part)
                f.write(part)
        sha = digest.hexdigest()
        f.seek(prefix.index(_HASH_KEY + _HASH_PLACEHOLDER.encode()) + len(_HASH_KEY))
        f.write(sha.encode())
    return sha, len(prefix) + offset


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors header, data start); the file must be exactly as long as the header says."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CacheError(f"{path}: truncated ({len(raw)} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise CacheError(f"{path}: corrupt header length {length}")
            header = json.loads(f.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        if not isinstance(header.get("__metadata__"), dict):
            raise TypeError("no __metadata__")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CacheError(f"{path}: unreadable header ({type(err).__name__}: {err})") from err
    size = path.stat().st_size
    if size != 8 + length + end:
        raise CacheError(f"{path}: {size} bytes on disk, header says {8 + length + end} (truncated or damaged)")
    return header, 8 + length


def content_hash(path: Path, chunk: int = 1 << 24) -> str:
    """Recompute the hash that :func:`write_safetensors` stored (header hash value read as zeros)."""
    header, start = read_header(path)
    stored = str(header["__metadata__"].get("sha256", ""))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(start).replace(_HASH_KEY + stored.encode(), _HASH_KEY + _HASH_PLACEHOLDER.encode(), 1))
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_content(path: Path) -> dict[str, Any]:
    """The header of a safetensors file whose content matches its own stored hash, or CacheError."""
    header, _ = read_header(path)
    stored = header["__metadata__"].get("sha256")
    actual = content_hash(path)
    if actual != stored:
        raise CacheError(f"{path}: content hash {actual[:16]}... differs from its stored {str(stored)[:16]}... "
                         "(damaged)")
    return header


def read_array(path: Path, header: dict[str, Any], start: int, name: str, dtype: type) -> np.ndarray:
    """Tensor ``name`` of a safetensors file as a flat numpy array (its bytes read once)."""
    try:
        begin, end = header[name]["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
        raise CacheError(f"{path}: damaged header, no tensor {name!r}") from err
    with open(path, "rb") as f:
        f.seek(start + begin)
        data = f.read(end - begin)
    if len(data) != end - begin or len(data) % np.dtype(dtype).itemsize:
        raise CacheError(f"{path}: tensor {name!r} is truncated or damaged")
    return np.frombuffer(data, dtype)
