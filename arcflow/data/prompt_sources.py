"""Prompt sets: a Hugging Face dataset by name, or a local file or folder, as validated columns.

Every source is read with the ``datasets`` library, so a hub id (``Lakonik/t2i-prompts-3m``)
and a local copy of it behave alike. Columns: ``prompt`` (required), ``height`` and ``width``
(optional, positive multiples of 16; the config's size where a column or a value is absent). A
.txt file holds one prompt per line (blank lines are not prompts). Millions of rows are kept
as Arrow/NumPy columns, never as millions of Python objects, and checked with vectorised
kernels, so a bad row is reported at load time with its row number instead of surfacing as a
crash deep inside a worker.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arcflow.config import PromptsConfig

log = logging.getLogger("arcflow")

SIZE_MULTIPLE = 16
"""FLUX: VAE 8x downsampling times 2x2 latent patches."""
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXAMPLES = 3


@dataclass(frozen=True)
class Prompt:
    text: str
    height: int
    width: int


@dataclass
class PromptTable:
    """The prompts of one split in order, with each one's image size and its row in the source."""

    texts: pa.LargeStringArray
    heights: np.ndarray
    widths: np.ndarray
    source_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.heights)

    def prompt(self, index: int) -> Prompt:
        return Prompt(self.texts[index].as_py(), int(self.heights[index]), int(self.widths[index]))

    def with_size(self, height: int, width: int) -> PromptTable:
        """Every prompt at one size (bucketing off)."""
        n = len(self)
        return PromptTable(self.texts, np.full(n, height, np.int32), np.full(n, width, np.int32), self.source_rows)

    def fingerprint(self) -> str:
        """SHA-256 of texts and sizes: tells whether two runs (or ranks) see the same prompts."""
        digest = hashlib.sha256()
        offsets = np.frombuffer(self.texts.buffers()[1], np.int64)[self.texts.offset:self.texts.offset + len(self) + 1]
        data = self.texts.buffers()[2]
        if data is not None:
            digest.update(memoryview(data)[int(offsets[0]):int(offsets[-1])])
        digest.update((offsets - offsets[0]).astype("<i8").tobytes())
        digest.update(self.heights.astype("<i4").tobytes())
        digest.update(self.widths.astype("<i4").tobytes())
        return digest.hexdigest()


def _check_text_file(file: Path) -> None:
    """A text prompt file must hold something and be UTF-8; say which file and line otherwise (``datasets``
    says ``StopIteration`` for an empty file, and decodes other encodings silently wrong or fails namelessly)."""
    empty = True
    with open(file, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"prompt file {file} line {number}: not UTF-8 text (byte {line[err.start]:#04x} "
                                 f"at column {err.start + 1}); convert the file to UTF-8") from None
            empty = empty and not text.strip()
    if empty:
        raise ValueError(f"prompt file {file} is empty: expected one prompt per line or row")


def _read_local(path: Path) -> tuple[pa.Table, str]:
    """A file, or a folder of files of one supported format, via the matching ``datasets`` builder."""
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts) and p.suffix.lower() in LOCAL_BUILDERS)
        builders = {LOCAL_BUILDERS[p.suffix.lower()] for p in files}
        if not files:
            raise FileNotFoundError(f"prompt folder {path} has no {'/'.join(sorted(LOCAL_BUILDERS))} files")
        if len(builders) > 1:
            raise ValueError(f"prompt folder {path} mixes formats ({', '.join(sorted(builders))}); keep one per folder")
    else:
        files = [path]
        if path.suffix.lower() not in LOCAL_BUILDERS:
            raise ValueError(f"prompt file {path}: unsupported extension {path.suffix!r} "
                             f"(expected one of {', '.join(sorted(LOCAL_BUILDERS))})")
        builders = {LOCAL_BUILDERS[path.suffix.lower()]}
    builder = builders.pop()
    if builder != "parquet":
        for file in files:
            _check_text_file(file)
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # datasets wraps parse errors in its own types; name the file for the user
        raise ValueError(f"could not read prompts from {path}: {type(err).__name__}: {err}") from err
    table = dataset.with_format("arrow")[:]
    if builder == "text":  # one prompt per line; blank lines separate nothing and are not prompts
        text = table.column("text")
        table = pa.table({"prompt": text}).filter(pc.invert(pc.equal(pc.utf8_trim_whitespace(text), "")))
    return table, builder


def _read_hub(name: str, split: str) -> pa.Table:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth, unknown split: all end here with the dataset named
        raise ValueError(f"could not load the hub dataset {name!r} (split {split!r}): {type(err).__name__}: {err}. "
                         "Where the hub is unreachable, download it elsewhere and set data.source to the local "
                         "file or folder") from err
    return dataset.with_format("arrow")[:]


def read_source(source: str, split: str = "train") -> pa.Table:
    """The whole source as an Arrow table: a local file/folder when the path exists, else a hub id."""
    if not source:
        raise ValueError("no prompt source: set data.source (hub dataset id or local file/folder)")
    path = Path(source)
    if path.exists():
        return _read_local(path)[0]
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return _read_hub(source, split)
    raise FileNotFoundError(f"prompt source {source!r} is neither a local file/folder nor a hub dataset id "
                            "('owner/name')")


def _size_column(table: pa.Table, key: str, default: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, bad-mask) of the height or width column; the default where absent or null (not given)."""
    n = table.num_rows
    if key not in table.column_names:
        return np.full(n, default, np.int64), np.zeros(n, bool)
    column = table.column(key)
    if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise ValueError(f"{where}: column '{key}' has type {column.type}; expected integers (pixels)")
    values = pc.fill_null(column, default).to_numpy(zero_copy_only=False).astype(np.int64) if n else \
        np.zeros(0, np.int64)
    return values, (values <= 0) | (values % SIZE_MULTIPLE != 0)


def _describe_bad(row: int, height: int, width: int, empty: bool) -> str:
    if empty:
        return f"row {row}: empty prompt"
    return f"row {row}: height x width {height} x {width} is not a positive multiple of {SIZE_MULTIPLE}"


def load_prompt_table(cfg: PromptsConfig, key: str = "data.train") -> PromptTable:
    """The split as the config says: row range, validation (error or counted skip), max_size.

    ``key`` names the config section in messages (``data.train`` / ``data.val``).
    """
    table = read_source(cfg.source, cfg.split)
    where = f"{cfg.source}" + (f" (split {cfg.split!r})" if not Path(cfg.source).exists() else "")
    if "prompt" not in table.column_names:
        raise ValueError(f"{where}: no 'prompt' column (columns: {', '.join(table.column_names) or 'none'})")
    start, end, _ = slice(cfg.start_ind, cfg.end_ind).indices(table.num_rows)
    table = table.slice(start, max(end - start, 0))
    rows = np.arange(start, start + table.num_rows, dtype=np.int64)
    prompt = table.column("prompt")
    if not (pa.types.is_string(prompt.type) or pa.types.is_large_string(prompt.type) or pa.types.is_null(prompt.type)):
        raise ValueError(f"{where}: column 'prompt' has type {prompt.type}; expected strings")
    texts = pc.utf8_trim_whitespace(prompt.cast(pa.large_string()))
    empty = pc.fill_null(pc.equal(pc.utf8_length(texts), 0), True).to_numpy(zero_copy_only=False).astype(bool)
    heights, bad_h = _size_column(table, "height", cfg.height, where)
    widths, bad_w = _size_column(table, "width", cfg.width, where)
    bad = empty | bad_h | bad_w
    if bad.any():
        first = np.flatnonzero(bad)[:_EXAMPLES]
        examples = "; ".join(_describe_bad(int(rows[i]), int(heights[i]), int(widths[i]), bool(empty[i]))
                             for i in first)
        count = int(bad.sum())
        if not cfg.skip_invalid:
            raise ValueError(f"{where}: {count} invalid row(s) in rows [{start}, {end}): {examples}. "
                             f"Fix the data, or set {key}.skip_invalid=True to skip them")
        log.warning("%s: skipping %d invalid row(s) of %d in rows [%d, %d): %s", where, count, len(bad), start, end,
                    examples)
        keep = np.flatnonzero(~bad)
        texts, heights, widths, rows = texts.take(pa.array(keep)), heights[keep], widths[keep], rows[keep]
    if cfg.max_size is not None:
        texts, heights, widths, rows = (texts.slice(0, cfg.max_size), heights[:cfg.max_size],
                                        widths[:cfg.max_size], rows[:cfg.max_size])
    if len(rows) == 0:
        raise ValueError(f"{where}: no prompts in rows [{cfg.start_ind}:{cfg.end_ind}] ({key}.start_ind/end_ind)")
    return PromptTable(texts.combine_chunks(), heights.astype(np.int32), widths.astype(np.int32), rows)


def source_identity(cfg: PromptsConfig) -> dict[str, Any]:
    """Which rows of which prompt set a split reads (max_size aside: the prompts' hash covers it)."""
    return {"source": cfg.source, "split": cfg.split, "start_ind": cfg.start_ind, "end_ind": cfg.end_ind,
            "height": cfg.height, "width": cfg.width}
