"""The prompt-embedding cache: sharded safetensors written by many ranks, restartable, verifiable.

Layout of one split (``train`` or ``val``) under ``{data_root}/{split}/``::

    plan.json            what is being cached (prompt set, encoder, shard size): written first,
                         so a restart with other settings is refused instead of mixing two caches
    shards/shard_000000.safetensors ...
                         ``shard_size`` prompts each; written under a temporary name and renamed
                         after fsync, so a file under its final name is always whole, whatever
                         moment a run was killed (kill -9 included)
    index.arrow          prompt, height, width, shard, row, source_row of every prompt (Arrow IPC)
    manifest.json        written last; its presence means the split is complete. Holds a content
                         hash per shard and of the index (``arcflow cache verify`` checks them)

Per prompt a shard stores T5's whole sequence (L x D, pads included: FLUX's T5 runs without an
attention mask, so its outputs at pad positions depend on the prompt and cannot be rebuilt) in
float8 e4m3 with a per-prompt power-of-two scale, so dequantising is exact in any float dtype and
equals the encoder's output up to the fp8 rounding; zstd-compressed, because most rows are padding
whose outputs vary little from row to row. CLIP's pooled embedding is kept in float32. A CRC32 over each prompt's
stored bytes is checked on every read: a damaged or truncated shard is an error naming the shard,
never a silent wrong tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from arcflow.config import PromptsConfig
from arcflow.data.prompt_sources import PromptTable, source_identity
from arcflow.distributed import DistEnv

FORMAT = "arcflow-prompt-cache/1"
SPLITS = ("train", "val")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CODEC = "zstd"
_HASH_KEY = b'"sha256":"'
_HASH_PLACEHOLDER = "0" * 64
_ST_DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
              np.dtype(np.float32): "F32"}
_PER_PROMPT_OVERHEAD = 8 + 4 + 8 + 8 + 4 + 4 + 8  # blob offset, scale, crc, text offset, height, width, source row
_INDEX_PER_PROMPT = 8 + 4 + 4 + 4 + 4 + 8  # string offset, height, width, shard, row, source row

EncodeFn = Callable[[list[str]], tuple[Tensor, Tensor]]
"""Prompts -> (T5 sequence (B, L, D), pooled (B, D2)), as the text encoder returns them."""


class CacheError(RuntimeError):
    """A cache file is missing, damaged or does not match what it should hold (the message names it)."""


# -- quantisation ------------------------------------------------------------------------------
def quantize(sequence: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L, D) float -> float8 e4m3 codes as uint8 (B, L, D) and power-of-two scales (B,) float32.

    A power-of-two scale makes ``code * scale`` exact in bf16/fp16/fp32, so the dequantised tensor
    depends only on the fp8 rounding, not on the compute dtype's rounding of a product.
    """
    x = sequence.float()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"text encoder output has non-finite values for batch rows {bad}")
    amax = x.abs().flatten(1).amax(1)
    _, exponent = torch.frexp(amax / FP8_MAX)
    scale = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exponent), torch.ones_like(amax))
    codes = (x / scale[:, None, None]).to(FP8).view(torch.uint8)
    return codes, scale


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 codes (B, L, D) and scales (B,) -> (B, L, D) in ``dtype`` (exact: see :func:`quantize`)."""
    return codes.view(FP8).to(dtype) * scale.to(device=codes.device, dtype=dtype)[:, None, None]


def _row_crc(blob: bytes | memoryview, scale: np.ndarray, pooled: np.ndarray) -> int:
    return zlib.crc32(pooled.tobytes(), zlib.crc32(scale.tobytes(), zlib.crc32(blob)))


# -- safetensors, streamed -------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, fsync, rename: readers see all of it or nothing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for name in order:
                for part in tensors[name][2]:
                    digest.update(part)
                    f.write(part)
            sha = digest.hexdigest()
            f.seek(prefix.index(_HASH_KEY + _HASH_PLACEHOLDER.encode()) + len(_HASH_KEY))
            f.write(sha.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return sha, len(prefix) + offset


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(safetensors header, data start); the file must be exactly as long as the header says."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CacheError(f"shard {path}: truncated ({len(raw)} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise CacheError(f"shard {path}: corrupt header length {length}")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        raise CacheError(f"shard {path}: unreadable header ({err})") from err
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    size = path.stat().st_size
    if size != 8 + length + end:
        raise CacheError(f"shard {path}: {size} bytes on disk, header says {8 + length + end} (truncated or damaged)")
    return header, 8 + length


def content_hash(path: Path, chunk: int = 1 << 24) -> str:
    """Recompute the hash that :func:`write_safetensors` stored (header hash value read as zeros)."""
    header, start = read_header(path)
    stored = header["__metadata__"]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(start).replace(_HASH_KEY + stored.encode(), _HASH_KEY + _HASH_PLACEHOLDER.encode(), 1))
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- shards --------------------------------------------------------------------------------------
def shard_path(directory: Path, shard: int) -> Path:
    return directory / "shards" / f"shard_{shard:06d}.safetensors"


@dataclass
class EncodedRows:
    """Stored form of a run of prompts: compressed fp8 rows, scales, pooled, CRCs."""

    blobs: list[bytes]
    scales: np.ndarray
    pooled: np.ndarray
    crcs: np.ndarray


def compress_rows(codes: np.ndarray, scales: np.ndarray, pooled: np.ndarray) -> EncodedRows:
    """zstd each prompt's (L, D) fp8 codes; CRC32 over what is stored for it (blob, scale, pooled)."""
    blobs = [pa.compress(row, codec=CODEC, asbytes=True) for row in codes]
    crcs = np.array([_row_crc(b, scales[i:i + 1], pooled[i]) for i, b in enumerate(blobs)], np.int64)
    return EncodedRows(blobs, scales, pooled, crcs)


def write_shard(path: Path, table: PromptTable, start: int, rows: EncodedRows,
                metadata: dict[str, str]) -> tuple[str, int]:
    """Write prompts ``start..start+n`` of ``table`` with their encoded rows as one shard: (hash, bytes)."""
    n = len(rows.blobs)
    texts = [table.texts[start + i].as_py().encode() for i in range(n)]
    blob_offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(b) for b in rows.blobs], out=blob_offsets[1:])
    text_offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=text_offsets[1:])
    part = slice(start, start + n)
    tensors = {
        "t5.blob": (np.uint8, [int(blob_offsets[-1])], rows.blobs),
        "t5.offsets": (np.int64, [n + 1], [blob_offsets]),
        "t5.scale": (np.float32, [n], [rows.scales.astype(np.float32)]),
        "pooled": (np.float32, list(rows.pooled.shape), [np.ascontiguousarray(rows.pooled, np.float32)]),
        "crc": (np.int64, [n], [rows.crcs]),
        "text.utf8": (np.uint8, [int(text_offsets[-1])], texts),
        "text.offsets": (np.int64, [n + 1], [text_offsets]),
        "height": (np.int32, [n], [table.heights[part].astype(np.int32)]),
        "width": (np.int32, [n], [table.widths[part].astype(np.int32)]),
        "source_row": (np.int64, [n], [table.source_rows[part].astype(np.int64)]),
    }
    return write_safetensors(path, tensors, {**metadata, "rows": str(n)})


def check_shard(path: Path, expected: dict[str, str]) -> dict[str, Any]:
    """Cheap structural check (header, length, metadata) of a shard; its header, or CacheError."""
    header, _ = read_header(path)
    meta = header.get("__metadata__", {})
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CacheError(f"shard {path}: metadata {key}={meta.get(key)!r}, expected {value!r}")
    return header


# -- plan, manifest, status ---------------------------------------------------------------------
def split_dir(data_root: str | os.PathLike, split: str) -> Path:
    return Path(data_root) / split


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {path}: {err}") from err


def cache_status(data_root: str) -> str:
    """'complete' (every split has a manifest), 'absent' (nothing started) or 'incomplete'."""
    if not data_root:
        return "absent"
    states = [("complete" if (split_dir(data_root, s) / "manifest.json").is_file() else
               "started" if (split_dir(data_root, s) / "plan.json").is_file() else "absent") for s in SPLITS]
    if all(s == "complete" for s in states):
        return "complete"
    return "absent" if all(s == "absent" for s in states) else "incomplete"


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def make_plan(table: PromptTable, split: str, prompts: PromptsConfig, encoder: dict[str, Any],
              shard_size: int) -> dict[str, Any]:
    """What a split's cache holds; a restart must compute the same plan (same prompts, encoder, shards)."""
    return {"format": FORMAT, "split": split, "num_prompts": len(table), "shard_size": shard_size,
            "num_shards": -(-len(table) // shard_size), "prompts_sha256": table.fingerprint(),
            "source": source_identity(prompts), "max_size": prompts.max_size, "encoder": encoder,
            "t5": {"dtype": "float8_e4m3fn", "scale": "per-prompt power of two", "codec": CODEC},
            "pooled": {"dtype": "float32"}}


def _plan_key(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan minus max_size: two runs whose limits select the same prompts build the same cache."""
    return {k: v for k, v in plan.items() if k != "max_size"}


def _shard_metadata(plan: dict[str, Any], shard: int) -> dict[str, str]:
    """Ties a shard to its plan (prompts, encoder, shard size): a shard of another plan is never kept."""
    plan_hash = hashlib.sha256(json.dumps(_plan_key(plan), sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "split": plan["split"], "shard": str(shard), "plan_sha256": plan_hash}


def storage_estimate(num_prompts: int, text_bytes: int, seq_len: int, seq_dim: int, pooled_dim: int,
                     shard_size: int) -> tuple[int, int]:
    """(bytes at most, number of files) of a split: fp8 rows before compression, texts, index."""
    rows = seq_len * seq_dim
    zstd_worst = rows + (rows // (128 << 10) + 1) * 3 + 32  # raw blocks when nothing compresses
    per_prompt = zstd_worst + 4 * pooled_dim + _PER_PROMPT_OVERHEAD + _INDEX_PER_PROMPT
    shards = -(-num_prompts // shard_size)
    return num_prompts * per_prompt + 2 * text_bytes + shards * 4096, shards + 3


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError


@dataclass
class SplitReport:
    split: str
    num_prompts: int
    encoded: int
    seconds: float
    stored_bytes: int


class Progress(Protocol):
    """A progress bar (tqdm fits); cache_split and verify_split make one with their total and close it."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[int], Progress]
"""total -> a fresh progress bar."""


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def cache_split(table: PromptTable, directory: Path, plan: dict[str, Any], encode: EncodeFn, batch_size: int,
                dist: DistEnv, progress: ProgressFactory = lambda total: _NoProgress(),
                say: Callable[[str], None] = lambda message: None) -> SplitReport:
    """Embed the split into ``directory``: this rank's share of the shards not yet on disk.

    Shards missing or failing the structural check after the barrier are dealt round-robin to the
    ranks (every rank sees the same list, so there is no overlap and no gap); complete shards from
    an earlier, interrupted run are kept. Rank 0 then writes the index and, last, the manifest.
    ``progress`` counts this rank's prompts; ``say`` prints what rank 0 should tell the user.
    """
    start_time = time.perf_counter()
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    plan_file, manifest_file = directory / "plan.json", directory / "manifest.json"
    if dist.rank == 0:
        if plan_file.is_file():
            differences = _differences(_plan_key(read_json(plan_file)), _plan_key(plan))
            if differences:
                raise CacheError(f"{plan_file} was written for other settings ({'; '.join(differences[:4])}). "
                                 f"Rerun with the same settings, or remove {directory} to rebuild this split")
        else:
            atomic_write_bytes(plan_file, json.dumps(plan, indent=1).encode())
        for stale in (directory / "shards").glob("*.tmp-*"):  # partial files of a killed run
            stale.unlink()
    dist.barrier()
    differences = _differences(_plan_key(read_json(plan_file)), _plan_key(plan))
    if differences:
        raise CacheError(f"rank {dist.rank} disagrees with rank 0's {plan_file} ({'; '.join(differences[:4])})")
    if manifest_file.is_file():
        say(f"{plan['split']}: already complete")
        return SplitReport(plan["split"], len(table), 0, time.perf_counter() - start_time, 0)

    todo = []
    for shard in range(plan["num_shards"]):
        try:
            check_shard(shard_path(directory, shard), _shard_metadata(plan, shard))
        except CacheError:
            todo.append(shard)
    mine = todo[dist.rank::dist.world_size]
    encoded = stored = 0
    size = plan["shard_size"]
    say(f"{plan['split']}: {plan['num_prompts']:,} prompts in {plan['num_shards']:,} shards; "
        f"{plan['num_shards'] - len(todo):,} already complete, {len(todo):,} to write on {dist.world_size} rank(s)")
    bar = progress(sum(min((s + 1) * size, len(table)) - s * size for s in mine))
    with ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // max(dist.world_size, 1)))) as pool, \
            ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        for number, shard in enumerate(mine):
            first, last = shard * size, min((shard + 1) * size, len(table))
            parts: list[Future] = []
            for begin in range(first, last, batch_size):
                texts = [table.texts[i].as_py() for i in range(begin, min(begin + batch_size, last))]
                sequence, pooled = encode(texts)
                codes, scales = quantize(sequence)
                parts.append(pool.submit(compress_rows, codes.cpu().numpy(), scales.cpu().numpy(),
                                         pooled.float().cpu().numpy()))
                bar.update(len(texts))
            rows = [f.result() for f in parts]
            merged = EncodedRows([b for r in rows for b in r.blobs], np.concatenate([r.scales for r in rows]),
                                 np.concatenate([r.pooled for r in rows]), np.concatenate([r.crcs for r in rows]))
            if pending is not None:
                stored += pending.result()[1]
            pending = writer.submit(write_shard, shard_path(directory, shard), table, first, merged,
                                    _shard_metadata(plan, shard))
            encoded += last - first
            if number == 0:
                per_prompt = pending.result()[1] / (last - first)
                say(f"{plan['split']}: first shard stores {per_prompt:,.0f} B/prompt -> about "
                    f"{human_bytes(per_prompt * plan['num_prompts'])} for the split's {plan['num_prompts']:,} prompts")
        if pending is not None:
            stored += pending.result()[1]
    bar.close()
    dist.barrier()
    if dist.rank == 0:
        finalize_split(directory, table, plan)
    dist.barrier()
    return SplitReport(plan["split"], len(table), encoded, time.perf_counter() - start_time, stored)


def finalize_split(directory: Path, table: PromptTable, plan: dict[str, Any]) -> dict[str, Any]:
    """Write index.arrow then manifest.json (atomically, in that order) once every shard is on disk."""
    shards = []
    for shard in range(plan["num_shards"]):
        path = shard_path(directory, shard)
        header = check_shard(path, _shard_metadata(plan, shard))
        shards.append({"file": str(path.relative_to(directory)), "rows": int(header["__metadata__"]["rows"]),
                       "bytes": path.stat().st_size, "sha256": header["__metadata__"]["sha256"]})
    if sum(s["rows"] for s in shards) != len(table):
        raise CacheError(f"{directory}: shards hold {sum(s['rows'] for s in shards)} prompts, plan says {len(table)}")
    position = np.arange(len(table))
    index = pa.table({"prompt": table.texts, "height": pa.array(table.heights, pa.int32()),
                      "width": pa.array(table.widths, pa.int32()),
                      "shard": pa.array(position // plan["shard_size"], pa.int32()),
                      "row": pa.array(position % plan["shard_size"], pa.int32()),
                      "source_row": pa.array(table.source_rows, pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, index.schema) as ipc:
        ipc.write_table(index)
    index_bytes = sink.getvalue().to_pybytes()
    atomic_write_bytes(directory / "index.arrow", index_bytes)
    manifest = {**plan, "complete": True, "shards": shards,
                "index": {"file": "index.arrow", "bytes": len(index_bytes),
                          "sha256": hashlib.sha256(index_bytes).hexdigest()},
                "stored_bytes": sum(s["bytes"] for s in shards) + len(index_bytes)}
    atomic_write_bytes(directory / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


# -- reading --------------------------------------------------------------------------------------
@dataclass
class _ShardReader:
    path: Path
    blob_start: int
    pooled_start: int
    pooled_dim: int
    offsets: np.ndarray
    scales: np.ndarray
    crcs: np.ndarray


class CachedSplit:
    """Random access to a complete split: prompts from the index, embeddings from the shards."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = self.read_manifest(self.directory)
        index_path = self.directory / self.manifest["index"]["file"]
        index_bytes = index_path.read_bytes() if index_path.is_file() else b""
        if hashlib.sha256(index_bytes).hexdigest() != self.manifest["index"]["sha256"]:
            raise CacheError(f"{index_path}: missing or damaged (content hash differs from the manifest); "
                             "run `arcflow cache verify`")
        index = pa.ipc.open_file(pa.py_buffer(index_bytes)).read_all()
        self.table = PromptTable(index.column("prompt").combine_chunks().cast(pa.large_string()),
                                 index.column("height").to_numpy().astype(np.int32),
                                 index.column("width").to_numpy().astype(np.int32),
                                 index.column("source_row").to_numpy().astype(np.int64))
        self._shard = index.column("shard").to_numpy()
        self._row = index.column("row").to_numpy()
        encoder = self.manifest["encoder"]
        self.seq_shape = (int(encoder["seq_len"]), int(encoder["seq_dim"]))
        self._readers: dict[int, _ShardReader] = {}

    @staticmethod
    def read_manifest(directory: Path) -> dict[str, Any]:
        manifest = read_json(directory / "manifest.json")
        if manifest.get("format") != FORMAT or not manifest.get("complete"):
            raise CacheError(f"{directory}/manifest.json: not a complete {FORMAT} cache")
        return manifest

    def _reader(self, shard: int) -> _ShardReader:
        if shard not in self._readers:
            entry = self.manifest["shards"][shard]
            path = self.directory / entry["file"]
            if not path.is_file():
                raise CacheError(f"shard {path} is missing; run `arcflow cache verify`")
            header, start = read_header(path)
            meta = header["__metadata__"]
            if meta.get("sha256") != entry["sha256"] or int(meta.get("rows", -1)) != entry["rows"]:
                raise CacheError(f"shard {path} is not the file the manifest lists (hash or row count differs)")

            def array(name: str, dtype: type) -> np.ndarray:
                begin, end = header[name]["data_offsets"]
                with open(path, "rb") as f:
                    f.seek(start + begin)
                    return np.frombuffer(f.read(end - begin), dtype)

            try:
                offsets = array("t5.offsets", np.int64)
                if len(offsets) != entry["rows"] + 1 or offsets[-1] != header["t5.blob"]["shape"][0]:
                    raise CacheError(f"shard {path}: damaged row offsets")
                self._readers[shard] = _ShardReader(path, start + header["t5.blob"]["data_offsets"][0],
                                                    start + header["pooled"]["data_offsets"][0],
                                                    header["pooled"]["shape"][1], offsets,
                                                    array("t5.scale", np.float32), array("crc", np.int64))
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise CacheError(f"shard {path}: damaged header ({type(err).__name__}: {err})") from err
        return self._readers[shard]

    def _read_row(self, index: int, codes: np.ndarray) -> tuple[float, np.ndarray]:
        """Decompress prompt ``index``'s fp8 codes into ``codes``; return (scale, pooled)."""
        shard, row = int(self._shard[index]), int(self._row[index])
        reader = self._reader(shard)
        begin, end = int(reader.offsets[row]), int(reader.offsets[row + 1])
        pooled_bytes = reader.pooled_dim * 4
        with open(reader.path, "rb") as f:
            f.seek(reader.blob_start + begin)
            blob = f.read(end - begin)
            f.seek(reader.pooled_start + row * pooled_bytes)
            pooled = np.frombuffer(f.read(pooled_bytes), np.float32)
        scale = reader.scales[row:row + 1]
        if len(blob) != end - begin or len(pooled) != reader.pooled_dim or \
                _row_crc(blob, scale, pooled) != int(reader.crcs[row]):
            raise CacheError(f"shard {reader.path}: row {row} is damaged (CRC mismatch); "
                             "run `arcflow cache verify` and rebuild the bad shards")
        try:
            raw = pa.decompress(blob, decompressed_size=codes.size, codec=CODEC)
        except (OSError, ValueError, pa.ArrowException) as err:
            raise CacheError(f"shard {reader.path}: row {row} does not decompress ({err})") from err
        codes.reshape(-1)[:] = np.frombuffer(raw, np.uint8)
        return float(scale[0]), pooled

    def load(self, indices: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        """Conditioning of prompts ``indices`` (rows of :attr:`table`), dequantised on ``device``."""
        codes = torch.empty((len(indices), *self.seq_shape), dtype=torch.uint8)
        scales, pooled = torch.empty(len(indices)), []
        for j, index in enumerate(indices):
            scales[j], row_pooled = self._read_row(int(index), codes[j].numpy())
            pooled.append(torch.from_numpy(row_pooled.copy()))
        codes = codes.to(device, non_blocking=True)
        return {"prompt_embeds": dequantize(codes, scales, dtype),
                "pooled_prompt_embeds": torch.stack(pooled).to(device=device, dtype=dtype)}


# -- verification ---------------------------------------------------------------------------------
def verify_split(directory: Path, progress: ProgressFactory = lambda total: _NoProgress()) -> list[str]:
    """Every problem of a split, one line each naming the file: missing, truncated, hash differs."""
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        state = "incomplete (plan.json but no manifest)" if (directory / "plan.json").is_file() else "absent"
        return [f"{directory}: {state}; run tools/cache_image_prompt_data.py to (finish) building it"]
    manifest = read_json(manifest_file)
    problems = []
    bar = progress(sum(entry["bytes"] for entry in manifest["shards"]))
    index = directory / manifest["index"]["file"]
    if not index.is_file() or hashlib.sha256(index.read_bytes()).hexdigest() != manifest["index"]["sha256"]:
        problems.append(f"{index}: missing or content hash differs from the manifest")
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        try:
            if not path.is_file():
                raise CacheError(f"shard {path}: missing")
            actual = content_hash(path)
            if actual != entry["sha256"]:
                raise CacheError(f"shard {path}: content hash {actual[:16]}... differs from the manifest's "
                                 f"{entry['sha256'][:16]}...")
        except CacheError as err:
            problems.append(str(err))
        bar.update(entry["bytes"])
    bar.close()
    return problems


def describe_split(directory: Path) -> str:
    """One line about a complete split: prompts, shards, bytes per prompt."""
    manifest = CachedSplit.read_manifest(directory)
    per_prompt = manifest["stored_bytes"] / max(manifest["num_prompts"], 1)
    return (f"{directory}: {manifest['num_prompts']:,} prompts in {len(manifest['shards']):,} shards, "
            f"{human_bytes(manifest['stored_bytes'])} ({per_prompt:,.0f} B/prompt)")


def verify_cache(data_root: str, say: Callable[[str], None] = print) -> list[str]:
    """``arcflow cache verify``: re-hash every shard and the index of every split; the problems found."""
    from tqdm import tqdm

    if not data_root:
        return ["data.data_root is empty: no cache configured"]
    problems = []
    for name in SPLITS:
        directory = split_dir(data_root, name)
        found = verify_split(directory, lambda total, name=name: tqdm(
            total=total, desc=f"verify {name}", unit="B", unit_scale=True, dynamic_ncols=True))
        problems += found
        if not found:
            say(f"ok {describe_split(directory)}")
    return problems
