"""Per-file SHA-256 checksums of a folder we write (checkpoints, adapters), checked when it is read back.

``checksums.json`` records each file's size and SHA-256, and a digest of that record itself, so flipped or
lost bytes in any file, the record included, are reported naming the file instead of loading as garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHECKSUM_FILE = "checksums.json"
_CHUNK = 16 << 20
_THREADS = min(8, os.cpu_count() or 1)


class DamagedFile(ValueError):
    """A file is missing, truncated or altered since it was written."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(algorithm: Any, files: Any) -> str:
    return hashlib.sha256(json.dumps([algorithm, files], sort_keys=True).encode()).hexdigest()


def write_checksums(folder: Path) -> None:
    """Record size and SHA-256 of every file of ``folder`` (all written before this) in its checksums file."""
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUM_FILE]
    with ThreadPoolExecutor(_THREADS) as pool:  # hashlib releases the GIL: one core per shard file
        digests = list(pool.map(file_sha256, paths))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": digest} for p, digest in zip(paths, digests)}
    record = {"algorithm": "sha256", "files": files, "digest": _digest("sha256", files)}
    (folder / CHECKSUM_FILE).write_text(json.dumps(record, indent=1))


def read_checksums(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The recorded checksums of ``folder`` (None if it has no record); a damaged record is an error."""
    record_file = folder / CHECKSUM_FILE
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        files = record["files"]
        valid = record["digest"] == _digest(record["algorithm"], files) and record["algorithm"] == "sha256" \
            and isinstance(files, dict)
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedFile(f"file '{record_file}' is damaged ({type(err).__name__}: {err})") from None
    if not valid:
        raise DamagedFile(f"file '{record_file}' is damaged (its digest does not match its content)")
    return files


def verify_file(folder: Path, name: str, files: dict[str, dict[str, Any]], what: str) -> None:
    """Raise :class:`DamagedFile` unless ``folder/name`` has the recorded size and SHA-256."""
    file = folder / name
    record = files.get(name)
    if record is None:
        raise DamagedFile(f"{what} '{folder}' records no checksum for '{name}'")
    if Path(name).name != name or not file.is_file():
        raise DamagedFile(f"{what} '{folder}' is incomplete: missing file '{name}'")
    size = file.stat().st_size
    if size != record.get("bytes"):
        raise DamagedFile(f"{what} file '{file}' is truncated or extended: {size} bytes, {record.get('bytes')} "
                          f"when written")
    if file_sha256(file) != record.get("sha256"):
        raise DamagedFile(f"{what} file '{file}' is damaged: its SHA-256 differs from the one recorded")


def verify_folder(folder: Path, what: str) -> bool:
    """Check every recorded file of ``folder``; False if it has no record (written by an older arcflow)."""
    files = read_checksums(folder)
    if files is None:
        return False
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda name: verify_file(folder, name, files, what), files))  # the first failure is raised
    return True
