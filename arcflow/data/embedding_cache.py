"""The prompt-embedding cache: sharded safetensors written by many ranks, restartable, verifiable.

Its format comes from the family's :class:`~arcflow.models.base.ConditioningSchema` (the tensors
its text encoder returns), so this module names no family. Layout under ``{data_root}/``::

    negative.safetensors  the schema's negative (empty) prompt embedded once, float32, when the family
                          has one (true-CFG teachers); attached to every batch as ``negative_*``
    {split}/plan.json     what is being cached (prompt set, encoder, schema, storage, shard size):
                          written first, so a restart with other settings is refused
    {split}/shards/shard_000000.safetensors ...
                          ``shard_size`` prompts each, rows stored as :mod:`arcflow.data.cache_codec`
                          says (unpadded, bf16 or fp8, zstd); written under a temporary name and
                          renamed after fsync, so a file under its final name is whole (kill -9 included)
    {split}/index.arrow   prompt, height, width, shard, row, source_row of every prompt (Arrow IPC)
    {split}/manifest.json written last; its presence means the split is complete. Holds a content
                          hash of every shard, the index and the negative file

Every file also carries a hash of its own content (:mod:`arcflow.data.cache_files`): a rerun of
the cache tool re-checks every shard on disk and rebuilds exactly those that fail, and a damaged
file is named on load. Format 1 caches (FLUX-only, before the schema) are refused with a line
saying to rebuild them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file

from arcflow.config import PromptsConfig
from arcflow.data.cache_codec import CODEC, STORAGES, EncodedRows, RowDecoder, encode_rows, row_crc
from arcflow.data.cache_files import (CacheError, atomic_write_bytes, check_content, read_array, read_header, read_json,
                                      write_hashed_json, write_safetensors)
from arcflow.data.prompt_sources import PromptTable, source_identity
from arcflow.distributed import DistEnv
from arcflow.models.base import Conditioning, ConditioningSchema

__all__ = ["CacheError", "CachedSplit", "cache_negative", "cache_split", "cache_status", "describe_split",
           "estimate_storage", "finalize_split", "human_bytes", "make_plan", "shard_path", "split_dir",
           "verify_cache", "verify_split"]

FORMAT = "arcflow-prompt-cache/2"
SPLITS = ("train", "val")
NEGATIVE_FILE = "negative.safetensors"
_PER_PROMPT_OVERHEAD = 8 + 4 + 4 + 8  # text offset, height, width, source row (rows: EncodedRows.stored_bytes)
_INDEX_PER_PROMPT = 8 + 4 + 4 + 4 + 4 + 8  # string offset, height, width, shard, row, source row

EncodeFn = Callable[[list[str]], Conditioning]
"""Prompts -> their conditioning, as the family's text encoder returns it (``encoder.encode``)."""


# -- schema and shards ---------------------------------------------------------------------------
def schema_record(schema: ConditioningSchema) -> dict[str, Any]:
    """The schema as plan and manifest store it (JSON)."""
    return {"sequences": dict(schema.sequences), "vectors": list(schema.vectors),
            "negative_prompt": schema.negative_prompt}


def schema_of(record: dict[str, Any]) -> ConditioningSchema:
    return ConditioningSchema(dict(record["sequences"]), tuple(record["vectors"]), record["negative_prompt"])


def shard_path(directory: Path, shard: int) -> Path:
    return directory / "shards" / f"shard_{shard:06d}.safetensors"


def split_dir(data_root: str | os.PathLike, split: str) -> Path:
    return Path(data_root) / split


def write_shard(path: Path, table: PromptTable, start: int, rows: EncodedRows,
                metadata: dict[str, str]) -> tuple[str, int]:
    """Write prompts ``start..start+n`` of ``table`` with their encoded rows as one shard: (hash, bytes)."""
    n = len(rows.crcs)
    texts = [table.texts[start + i].as_py().encode() for i in range(n)]
    text_offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=text_offsets[1:])
    part = slice(start, start + n)
    tensors: dict[str, tuple[Any, list[int], Sequence[Any]]] = {
        "crc": (np.int64, [n], [rows.crcs]),
        "text.utf8": (np.uint8, [int(text_offsets[-1])], texts),
        "text.offsets": (np.int64, [n + 1], [text_offsets]),
        "height": (np.int32, [n], [table.heights[part].astype(np.int32)]),
        "width": (np.int32, [n], [table.widths[part].astype(np.int32)]),
        "source_row": (np.int64, [n], [table.source_rows[part].astype(np.int64)]),
    }
    for key, blobs in rows.blobs.items():
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        tensors[f"{key}.blob"] = (np.uint8, [int(offsets[-1])], blobs)
        tensors[f"{key}.offsets"] = (np.int64, [n + 1], [offsets])
        tensors[f"{key}.length"] = (np.int32, [n], [rows.lengths[key].astype(np.int32)])
    for key, vector in rows.vectors.items():
        tensors[key] = (np.float32, list(vector.shape), [np.ascontiguousarray(vector, np.float32)])
    return write_safetensors(path, tensors, {**metadata, "rows": str(n)})


def _check_metadata(path: Path, header: dict[str, Any], expected: dict[str, str]) -> dict[str, Any]:
    meta = header["__metadata__"]
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CacheError(f"shard {path}: metadata {key}={meta.get(key)!r}, expected {value!r}")
    return header


def check_shard(path: Path, expected: dict[str, str]) -> dict[str, Any]:
    """Cheap structural check (header, length, metadata) of a shard; its header, or CacheError."""
    return _check_metadata(path, read_header(path)[0], expected)


# -- plan, manifest, status ---------------------------------------------------------------------
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
              shard_size: int, schema: ConditioningSchema, storage: str) -> dict[str, Any]:
    """What a split's cache holds; a restart must compute the same plan (same prompts, encoder, shards)."""
    if storage not in STORAGES:
        raise ValueError(f"config key 'data.cache_storage': expected one of {STORAGES}, got {storage!r}")
    return {"format": FORMAT, "split": split, "num_prompts": len(table), "shard_size": shard_size,
            "num_shards": -(-len(table) // shard_size), "prompts_sha256": table.fingerprint(),
            "source": source_identity(prompts), "max_size": prompts.max_size, "encoder": encoder,
            "schema": schema_record(schema),
            "storage": {"dtype": storage, "scale": "per-token power of two" if storage == "fp8" else None,
                        "codec": CODEC, "vectors": "float32"}}


def _plan_key(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan minus max_size: two runs whose limits select the same prompts build the same cache."""
    return {k: v for k, v in plan.items() if k not in ("max_size", "sha256")}


def _plan_hash(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_plan_key(plan), sort_keys=True).encode()).hexdigest()


def _shard_metadata(plan: dict[str, Any], shard: int) -> dict[str, str]:
    """Ties a shard to its plan (prompts, encoder, shard size): a shard of another plan is never kept."""
    return {"format": FORMAT, "split": plan["split"], "shard": str(shard), "plan_sha256": _plan_hash(plan)}


def read_manifest(directory: Path) -> dict[str, Any]:
    """A split's manifest, checked against its own hash; an older format is named with what to do."""
    path = directory / "manifest.json"
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise CacheError(f"{path}: a {manifest.get('format')!r} cache, this arcflow reads {FORMAT!r} only; "
                         f"rebuild it with tools/cache_image_prompt_data.py (remove {directory} first)")
    return manifest


def estimate_storage(sample: EncodedRows, num_prompts: int, text_bytes: int, shard_size: int) -> int:
    """Bytes of a split of ``num_prompts`` prompts, from the stored size of a sample of its prompts' rows."""
    per_prompt = float(sample.stored_bytes().mean()) + _PER_PROMPT_OVERHEAD + _INDEX_PER_PROMPT
    return int(num_prompts * per_prompt) + 2 * text_bytes + -(-num_prompts // shard_size) * 1024 + 2048  # headers


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError


# -- the negative prompt ---------------------------------------------------------------------------
def negative_path(data_root: str | os.PathLike) -> Path:
    return Path(data_root) / NEGATIVE_FILE


def cache_negative(data_root: str | os.PathLike, schema: ConditioningSchema, encode: EncodeFn,
                   encoder: dict[str, Any], dist: DistEnv, say: Callable[[str], None] = lambda m: None) -> str | None:
    """Embed the schema's negative prompt once into ``negative.safetensors`` (rank 0); its content hash.

    Kept when it is whole and was made by the same encoder; None for a schema without a negative.
    """
    if schema.negative_prompt is None:
        return None
    path = negative_path(data_root)
    identity = {"format": FORMAT, "negative_prompt": schema.negative_prompt,
                "encoder_sha256": hashlib.sha256(json.dumps(encoder, sort_keys=True).encode()).hexdigest()}
    if dist.rank == 0:
        try:
            _check_metadata(path, check_content(path), identity)
        except CacheError as err:
            if path.exists():
                say(f"{err}; embedding the negative prompt again")
            cond = encode([schema.negative_prompt])
            tensors = {key: (np.float32 if value.is_floating_point() else np.int64, list(value.shape),
                             [value.detach().cpu().float().numpy() if value.is_floating_point()
                              else value.detach().cpu().long().numpy()]) for key, value in cond.items()}
            write_safetensors(path, tensors, identity)
    dist.barrier()
    return read_header(path)[0]["__metadata__"]["sha256"]


def load_negative(path: Path, sha256: str) -> Conditioning:
    """The negative prompt's conditioning (batch 1) from the file the manifest names, hash-checked."""
    if not path.is_file():
        raise CacheError(f"{path} is missing; rerun tools/cache_image_prompt_data.py")
    header = check_content(path)
    if header["__metadata__"]["sha256"] != sha256:
        raise CacheError(f"{path} is not the file the manifest lists (hash differs); rerun the cache tool")
    return load_file(str(path))


# -- writing ----------------------------------------------------------------------------------------
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


def _failing_shards(directory: Path, plan: dict[str, Any], dist: DistEnv) -> list[int]:
    """Shards missing, damaged (own content hash) or of another plan; each rank re-hashes its share."""
    flags = torch.zeros(plan["num_shards"], dtype=torch.int32)
    for shard in range(dist.rank, plan["num_shards"], dist.world_size):
        path = shard_path(directory, shard)
        try:
            if not path.is_file():
                raise CacheError(f"shard {path}: missing")
            _check_metadata(path, check_content(path), _shard_metadata(plan, shard))
        except CacheError:
            flags[shard] = 1
    if dist.is_distributed:
        flags = flags.to(dist.device)
        torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
    return flags.cpu().nonzero().flatten().tolist()


def _complete_and_sound(directory: Path, negative_sha: str | None, say: Callable[[str], None]) -> bool:
    """Whether the split's manifest, index and negative file are whole and agree (shards checked apart)."""
    try:
        manifest = read_manifest(directory)
    except CacheError as err:
        say(f"{err}; checking every shard")
        return False
    index = directory / manifest["index"]["file"]
    if not index.is_file() or hashlib.sha256(index.read_bytes()).hexdigest() != manifest["index"]["sha256"]:
        say(f"{index}: missing or damaged; writing it again")
        return False
    return (manifest.get("negative") or {}).get("sha256") == negative_sha


def cache_split(table: PromptTable, directory: Path, plan: dict[str, Any], encode: EncodeFn, batch_size: int,
                dist: DistEnv, progress: ProgressFactory = lambda total: _NoProgress(),
                say: Callable[[str], None] = lambda message: None, negative_sha: str | None = None) -> SplitReport:
    """Embed the split into ``directory``: this rank's share of the shards not yet sound on disk.

    Every shard on disk is first re-hashed (dealt to the ranks); those missing or failing are dealt
    round-robin to the ranks (every rank sees the same list: no overlap, no gap), so a rerun after a
    kill or after ``arcflow cache verify`` found damage rebuilds exactly the bad shards. A complete
    split with a damaged shard loses its manifest first, so a kill during the repair leaves it
    incomplete, never wrong. Rank 0 then writes the index and, last, the manifest. ``progress``
    counts this rank's prompts; ``say`` prints what rank 0 should tell the user.
    """
    start_time = time.perf_counter()
    schema, storage = schema_of(plan["schema"]), plan["storage"]["dtype"]
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    plan_file, manifest_file = directory / "plan.json", directory / "manifest.json"
    if dist.rank == 0:
        if plan_file.is_file():
            differences = _differences(_plan_key(read_json(plan_file)), _plan_key(plan))
            if differences:
                raise CacheError(f"{plan_file} was written for other settings ({'; '.join(differences[:4])}). "
                                 f"Rerun with the same settings, or remove {directory} to rebuild this split")
        else:
            write_hashed_json(plan_file, plan)
        for stale in (directory / "shards").glob("*.tmp-*"):  # partial files of a killed run
            stale.unlink()
    dist.barrier()
    differences = _differences(_plan_key(read_json(plan_file)), _plan_key(plan))
    if differences:
        raise CacheError(f"rank {dist.rank} disagrees with rank 0's {plan_file} ({'; '.join(differences[:4])})")

    had_manifest = manifest_file.is_file()
    todo = _failing_shards(directory, plan, dist)
    if had_manifest and _complete_and_sound(directory, negative_sha, say) and not todo:
        say(f"{plan['split']}: already complete ({plan['num_shards']:,} shards re-checked)")
        return SplitReport(plan["split"], len(table), 0, time.perf_counter() - start_time, 0)
    dist.barrier()  # every rank has read the manifest before rank 0 removes it
    if had_manifest and dist.rank == 0:
        manifest_file.unlink()
        if todo:
            say(f"{plan['split']}: rebuilding {len(todo)} shard(s) that fail verification: "
                f"{', '.join(shard_path(directory, s).name for s in todo[:8])}{' ...' if len(todo) > 8 else ''}")
    dist.barrier()
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
                cond = {key: value.detach().cpu() for key, value in encode(texts).items()}
                parts.append(pool.submit(encode_rows, cond, schema, storage))
                bar.update(len(texts))
            rows = EncodedRows.concat([f.result() for f in parts])
            if pending is not None:
                stored += pending.result()[1]
            pending = writer.submit(write_shard, shard_path(directory, shard), table, first, rows,
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
        finalize_split(directory, table, plan, negative_sha)
    dist.barrier()
    return SplitReport(plan["split"], len(table), encoded, time.perf_counter() - start_time, stored)


def finalize_split(directory: Path, table: PromptTable, plan: dict[str, Any],
                   negative_sha: str | None = None) -> dict[str, Any]:
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
    negative = {"file": f"../{NEGATIVE_FILE}", "sha256": negative_sha} if negative_sha else None
    manifest = {**_plan_key(plan), "max_size": plan["max_size"], "complete": True, "shards": shards,
                "index": {"file": "index.arrow", "bytes": len(index_bytes),
                          "sha256": hashlib.sha256(index_bytes).hexdigest()}, "negative": negative,
                "stored_bytes": sum(s["bytes"] for s in shards) + len(index_bytes)}
    write_hashed_json(directory / "manifest.json", manifest)
    return manifest


# -- reading --------------------------------------------------------------------------------------
@dataclass
class _ShardReader:
    path: Path
    blob_starts: dict[str, int]
    offsets: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    vector_starts: dict[str, int]
    crcs: np.ndarray


class CachedSplit:
    """Random access to a complete split: prompts from the index, conditioning from the shards."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
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
        self.schema = schema_of(self.manifest["schema"])
        self.storage = self.manifest["storage"]["dtype"]
        self.dims: dict[str, int] = {k: int(v) for k, v in self.manifest["encoder"]["dims"].items()}
        negative = self.manifest.get("negative")
        self.negative = load_negative(self.directory / negative["file"], negative["sha256"]) if negative else None
        """The negative prompt's conditioning (batch 1, float32), or None for a family without one."""
        self._readers: dict[int, _ShardReader] = {}

    def _reader(self, shard: int) -> _ShardReader:
        if shard not in self._readers:
            entry = self.manifest["shards"][shard]
            path = self.directory / entry["file"]
            if not path.is_file():
                raise CacheError(f"shard {path} is missing; run `arcflow cache verify`")
            header, start = read_header(path)
            meta = header["__metadata__"]
            if meta.get("sha256") != entry["sha256"] or meta.get("rows") != str(entry["rows"]):
                raise CacheError(f"shard {path} is not the file the manifest lists (hash or row count differs)")
            rows = entry["rows"]
            try:
                offsets = {k: read_array(path, header, start, f"{k}.offsets", np.int64) for k in self.schema.sequences}
                lengths = {k: read_array(path, header, start, f"{k}.length", np.int32) for k in self.schema.sequences}
                for key in self.schema.sequences:
                    if len(offsets[key]) != rows + 1 or offsets[key][-1] != header[f"{key}.blob"]["shape"][0] or \
                            len(lengths[key]) != rows or np.any(np.diff(offsets[key]) < 0):
                        raise CacheError(f"shard {path}: damaged row offsets or lengths of {key!r}")
                self._readers[shard] = _ShardReader(
                    path, {k: start + header[f"{k}.blob"]["data_offsets"][0] for k in self.schema.sequences},
                    offsets, lengths, {k: start + header[k]["data_offsets"][0] for k in self.schema.vectors},
                    read_array(path, header, start, "crc", np.int64))
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise CacheError(f"shard {path}: damaged header ({type(err).__name__}: {err})") from err
        return self._readers[shard]

    def load(self, indices: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> Conditioning:
        """Conditioning of prompts ``indices`` (rows of :attr:`table`) on ``device``, as the text encoder
        returns it: sequences padded to the batch's longest row, their masks rebuilt (long), vectors, and
        the negative prompt's ``negative_*`` entries when the family has one."""
        rows = []
        for index in indices:
            shard, row = int(self._shard[int(index)]), int(self._row[int(index)])
            rows.append((self._reader(shard), row))
        decoders = {key: RowDecoder(self.storage, len(rows), max(int(r.lengths[key][i]) for r, i in rows),
                                    self.dims[key]) for key in self.schema.sequences}
        vectors = {key: np.empty((len(rows), self.dims[key]), np.float32) for key in self.schema.vectors}
        for j, (reader, row) in enumerate(rows):
            blobs, lengths = [], []
            with open(reader.path, "rb") as f:
                for key in self.schema.sequences:
                    begin, end = int(reader.offsets[key][row]), int(reader.offsets[key][row + 1])
                    f.seek(reader.blob_starts[key] + begin)
                    blobs.append(f.read(end - begin))
                    lengths.append(int(reader.lengths[key][row]))
                for key in self.schema.vectors:
                    f.seek(reader.vector_starts[key] + row * 4 * self.dims[key])
                    vectors[key][j] = np.frombuffer(f.read(4 * self.dims[key]), np.float32)
            if row_crc(blobs, lengths, [vectors[k][j] for k in self.schema.vectors]) != int(reader.crcs[row]):
                raise CacheError(f"shard {reader.path}: row {row} is damaged (CRC mismatch); "
                                 "run `arcflow cache verify` and rerun the cache tool to rebuild the bad shards")
            for key, blob, length in zip(self.schema.sequences, blobs, lengths):
                try:
                    decoders[key].put(j, blob, length)
                except (OSError, ValueError, pa.ArrowException) as err:
                    raise CacheError(f"shard {reader.path}: row {row} does not decompress ({err})") from err
        cond: Conditioning = {}
        for key, mask_key in self.schema.sequences.items():
            cond[key], mask = decoders[key].tensors(device, dtype)
            if mask_key is not None:
                cond[mask_key] = mask
        cond.update({key: torch.from_numpy(value).to(device=device, dtype=dtype) for key, value in vectors.items()})
        if self.negative is None:
            return cond
        negative = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                    for k, v in self.negative.items()}
        return self.schema.with_negative(cond, negative)


# -- verification ---------------------------------------------------------------------------------
def verify_split(directory: Path, progress: ProgressFactory = lambda total: _NoProgress()) -> list[str]:
    """Every problem of a split, one line each naming the file: missing, truncated, hash differs."""
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        state = "incomplete (plan.json but no manifest)" if (directory / "plan.json").is_file() else "absent"
        return [f"{directory}: {state}; run tools/cache_image_prompt_data.py to (finish) building it"]
    try:
        manifest = read_manifest(directory)
    except CacheError as err:
        return [f"{err}; rerun tools/cache_image_prompt_data.py to rebuild what fails"]
    problems = []
    bar = progress(sum(entry["bytes"] for entry in manifest["shards"]))
    index = directory / manifest["index"]["file"]
    if not index.is_file() or hashlib.sha256(index.read_bytes()).hexdigest() != manifest["index"]["sha256"]:
        problems.append(f"{index}: missing or content hash differs from the manifest")
    if manifest.get("negative"):
        try:
            load_negative(directory / manifest["negative"]["file"], manifest["negative"]["sha256"])
        except CacheError as err:
            problems.append(str(err))
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        try:
            if not path.is_file():
                raise CacheError(f"shard {path}: missing")
            header = check_content(path)
            if header["__metadata__"]["sha256"] != entry["sha256"]:
                raise CacheError(f"shard {path}: content hash {header['__metadata__']['sha256'][:16]}... differs "
                                 f"from the manifest's {entry['sha256'][:16]}...")
        except CacheError as err:
            problems.append(str(err))
        bar.update(entry["bytes"])
    bar.close()
    return problems


def describe_split(directory: Path) -> str:
    """One line about a complete split: prompts, shards, bytes per prompt."""
    manifest = read_manifest(directory)
    per_prompt = manifest["stored_bytes"] / max(manifest["num_prompts"], 1)
    return (f"{directory}: {manifest['num_prompts']:,} prompts in {len(manifest['shards']):,} shards, "
            f"{human_bytes(manifest['stored_bytes'])} ({per_prompt:,.0f} B/prompt, {manifest['storage']['dtype']})")


def verify_cache(data_root: str, say: Callable[[str], None] = print) -> list[str]:
    """``arcflow cache verify``: re-hash every shard, the index and the negative file of every split."""
    from tqdm import tqdm

    if not data_root:
        return ["data.data_root is empty: no cache configured"]
    problems: list[str] = []
    for name in SPLITS:
        directory = split_dir(data_root, name)
        found = verify_split(directory, lambda total, name=name: tqdm(
            total=total, desc=f"verify {name}", unit="B", unit_scale=True, dynamic_ncols=True))
        problems += [p for p in found if p not in problems]
        if not found:
            say(f"ok {describe_split(directory)}")
    return problems
