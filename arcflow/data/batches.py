"""Prompts as training batches: global batches of one aspect-ratio bucket, split over the ranks, with
their conditioning.

The trainer uses :func:`build_train_data` (this rank's batches, one image size each, and their
text conditioning; the position is part of the checkpoint) and :func:`build_val_data` (fixed
validation prompts and an ``encode`` function for :class:`arcflow.training.validation.Validator`).

Where the conditioning comes from is decided once per run by :func:`embedding_source`:

* ``data.cache='never'``: embed on the fly with ``build_text_encoder(cfg.model)``.
* ``data.cache='always'``: read the cache under ``data.data_root``; an error unless complete.
* ``data.cache='auto'`` (default):
    - cache complete (every split has its manifest): read it; the text encoder is not loaded.
      If ``model.text_encoder`` is set too, its type and max_sequence_length must match the
      encoder the cache was built with (else an error: the two paths would differ);
    - cache started but not complete: an error (finish it by rerunning the cache tool, or set
      ``data.cache='never'``): silently embedding on the fly would hide an unfinished job;
    - no cache, ``model.text_encoder`` set (the seed's switch: the commented lines in the training
      base config, ``configs/*/_ddp_train.py``): embed on the fly;
    - neither: an error naming both ways out.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from arcflow.config import PromptsConfig, RunConfig, torch_dtype
from arcflow.data.embedding_cache import SPLITS, CachedSplit, cache_status, read_manifest, split_dir
from arcflow.data.prompt_sources import Prompt, PromptTable, load_prompt_table, source_identity
from arcflow.data.sampler import BucketBatchSampler, bucket_ids
from arcflow.models import build_text_encoder, text_encoder_type
from arcflow.models.base import Conditioning, ConditioningSchema

__all__ = ["Prompt", "TrainData", "ValData", "build_train_data",
           "build_val_data", "embedding_source", "read_prompts"]

log = logging.getLogger("arcflow")

CACHE_TOOL = "tools/cache_image_prompt_data.py CONFIG --text-encoder TEXT_ENCODER_CONFIG"


def _sized(table: PromptTable, cfg: PromptsConfig) -> PromptTable:
    """Bucketing on: each prompt keeps its own size; off: every prompt at the configured size."""
    return table if cfg.bucketize else table.with_size(cfg.height, cfg.width)


def read_prompts(cfg: PromptsConfig, key: str = "data.train") -> list[Prompt]:
    """A split's prompts as training sees them (sizes per ``bucketize``, ``repeat`` applied)."""
    table = _sized(load_prompt_table(cfg, key), cfg)
    return [table.prompt(i) for i in range(len(table))] * cfg.repeat


# -- where the conditioning comes from ---------------------------------------------------------
def _check_cache_matches(cfg: RunConfig) -> None:
    """The complete cache must hold what the config describes (see the module docstring)."""
    problems = []
    for name in SPLITS:
        manifest = read_manifest(split_dir(cfg.data.data_root, name))
        split = getattr(cfg.data, name)
        wanted = {**source_identity(split), "max_size": split.max_size}
        cached = {**manifest["source"], "max_size": manifest.get("max_size")}
        for key, value in wanted.items():
            if key == "max_size" and value is None:
                continue  # no limit in the config: take what was cached (the tool's --max-size)
            if cached.get(key) != value:
                problems.append(f"data.{name}.{key}: cache {cached.get(key)!r}, config {value!r}")
    encoder = cfg.model.text_encoder
    built = read_manifest(split_dir(cfg.data.data_root, "train"))["encoder"]
    if encoder is not None:
        configured = {"type": text_encoder_type(cfg.model), "max_sequence_length": encoder.max_sequence_length}
        for key, value in configured.items():
            if built.get(key) != value:
                problems.append(f"model.text_encoder.{key}: cache {built.get(key)!r}, config {value!r}")
    if problems:
        raise ValueError(f"the prompt-embedding cache under {cfg.data.data_root} does not match the config: "
                         f"{'; '.join(problems)}. Rebuild it ({CACHE_TOOL}; remove the split folder first), "
                         "point data.data_root elsewhere, or set data.cache='never' to embed on the fly")
    pretrained = (encoder.pretrained if encoder else None) or cfg.model.pretrained
    if built.get("pretrained") != pretrained:
        log.warning("cache under %s was built from text encoders at %r; the model is %r",
                    cfg.data.data_root, built.get("pretrained"), pretrained)


def embedding_source(cfg: RunConfig) -> str:
    """'cache' or 'encoder', by the rule in the module docstring; an error says how to fix it."""
    mode, root = cfg.data.cache, cfg.data.data_root
    if mode == "never":
        return "encoder"
    status = cache_status(root)
    if status == "complete":
        _check_cache_matches(cfg)
        return "cache"
    where = f"under data.data_root={root!r}" if root else "(data.data_root is empty)"
    if mode == "always" or status == "incomplete":
        state = "is not complete" if status == "incomplete" else "does not exist"
        raise FileNotFoundError(f"the prompt-embedding cache {where} {state} and data.cache={mode!r}: "
                                f"(re)run {CACHE_TOOL} to finish it, or set data.cache='never' to embed on the fly")
    if cfg.model.text_encoder is None:
        raise FileNotFoundError(f"no prompt-embedding cache {where} and no model.text_encoder: build the cache "
                                f"({CACHE_TOOL}), or embed prompts on the fly: uncomment text_encoder=dict(type="
                                f"'{text_encoder_type(cfg.model)}') in the model dict of the training base config "
                                "(e.g. configs/flux/_ddp_train.py)")
    return "encoder"


def _build_encoder(cfg: RunConfig, device: torch.device) -> nn.Module:
    return build_text_encoder(cfg.model).to(device)


def _to_model(cond: Conditioning, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """Embeddings in the model dtype on ``device``; masks keep their integer dtype."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in cond.items()}


def _encode_with(encoder: nn.Module, device: torch.device, dtype: torch.dtype) -> Callable[[list[str]], Conditioning]:
    """Prompts -> conditioning, with the schema's negative prompt (embedded once) attached to every batch."""
    schema: ConditioningSchema = encoder.schema
    negative: list[Conditioning] = []

    def encode(texts: list[str]) -> Conditioning:
        cond = _to_model(encoder.encode(texts), device, dtype)
        if schema.negative_prompt is None:
            return cond
        if not negative:
            negative.append(_to_model(encoder.encode([schema.negative_prompt]), device, dtype))
        return schema.with_negative(cond, negative[0])
    return encode


class TrainData:
    """This rank's training batches: prompts of one image size and their conditioning."""

    def __init__(self, table: PromptTable, sampler: BucketBatchSampler,
                 condition: Callable[[np.ndarray, list[Prompt]], Conditioning], source: str,
                 text_encoder: nn.Module | None = None, text_length: int | None = None):
        self.table, self.sampler, self._condition = table, sampler, condition
        self.source = source
        """'cache' or 'encoder'."""
        self.text_encoder = text_encoder
        """The on-the-fly encoder (None when reading the cache), e.g. for sharding or validation."""
        self.text_length = text_length
        """Text tokens per prompt of the conditioning (the encoder's max_sequence_length), if it has one."""

    def trained_with(self) -> dict[str, Any]:
        """What the student sees of its prompts, for export and sampling to default to: the text length
        and every image size, most frequent first (JSON-serialisable)."""
        sizes, counts = np.unique(np.stack([self.table.heights, self.table.widths], axis=1), axis=0,
                                  return_counts=True)
        order = sorted(range(len(counts)), key=lambda i: (-counts[i], tuple(sizes[i])))
        return {"max_sequence_length": self.text_length,
                "resolutions": [[int(sizes[i][0]), int(sizes[i][1])] for i in order]}

    def next_batch(self) -> tuple[list[Prompt], Conditioning]:
        """This rank's next prompts (one shape) and their conditioning on the device, in the model dtype."""
        rows = self.sampler.next_indices() % len(self.table)
        prompts = [self.table.prompt(int(r)) for r in rows]
        return prompts, self._condition(rows, prompts)

    def state_dict(self) -> dict[str, int]:
        """Position in the global batch sequence: JSON-serialisable, independent of how the batch is split."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def build_train_data(cfg: RunConfig, device: torch.device | str, rank: int, world_size: int, seed: int,
                     text_encoder: nn.Module | None = None) -> TrainData:
    """The trainer's data. ``seed`` orders the batches and must be equal on every rank
    (``train_cfg.seed``, not a ``--diff_seed`` per-rank seed), or ranks would overlap.
    ``text_encoder`` replaces the configured on-the-fly encoder (benchmarks on random weights)."""
    device, dtype = torch.device(device), torch_dtype(cfg.model.dtype)
    source, split = embedding_source(cfg), cfg.data.train
    encoder = None
    if source == "cache":
        cache = CachedSplit(split_dir(cfg.data.data_root, "train"))
        table = cache.table

        def condition(rows: np.ndarray, prompts: list[Prompt]) -> Conditioning:
            return cache.load(rows, device, dtype)
        where = f"the prompt-embedding cache {cache.directory}"
        text_length = cache.manifest["encoder"].get("max_sequence_length")
    else:
        table = load_prompt_table(split, "data.train")
        encoder = text_encoder.to(device) if text_encoder is not None else _build_encoder(cfg, device)
        encode = _encode_with(encoder, device, dtype)

        def condition(rows: np.ndarray, prompts: list[Prompt]) -> Conditioning:
            return encode([p.text for p in prompts])
        why = "data.cache='never'" if cfg.data.cache == "never" else f"no cache under {cfg.data.data_root!r}"
        where = f"text encoder {text_encoder_type(cfg.model)} on the fly ({why})"
        text_length = getattr(encoder, "max_sequence_length", None)
    table = _sized(table, split)
    buckets = np.tile(bucket_ids(table.heights, table.widths), split.repeat)
    sampler = BucketBatchSampler(buckets, cfg.train_cfg.batch_size, seed, rank, world_size)
    log.info("conditioning source: %s", where)
    log.info("training prompts: %d (x%d), %d size buckets, %d global batches of %d per epoch", len(table),
             split.repeat, int(buckets.max()) + 1, sampler.batches_per_epoch, sampler.global_batch_size)
    return TrainData(table, sampler, condition, source, encoder, text_length)


class ValData:
    """Fixed validation prompts (``repeat`` copies get their own noise) and how to condition them."""

    def __init__(self, prompts: list[Prompt], encode: Callable[[list[str]], Conditioning]):
        self.prompts = prompts
        self.encode = encode


def build_val_data(cfg: RunConfig, device: torch.device | str, train: TrainData | None = None) -> ValData:
    """Validation prompts and ``encode(texts)``; reuses ``train``'s text encoder when embedding on the fly."""
    device, dtype = torch.device(device), torch_dtype(cfg.model.dtype)
    split = cfg.data.val
    if embedding_source(cfg) == "cache":
        cache = CachedSplit(split_dir(cfg.data.data_root, "val"))
        table = cache.table
        row_of: dict[str, int] = {}
        for i in range(len(table)):
            row_of.setdefault(table.texts[i].as_py(), i)

        def encode(texts: list[str]) -> Conditioning:
            missing = [t for t in texts if t not in row_of]
            if missing:
                raise KeyError(f"prompts not in the validation cache {cache.directory}: {missing[:3]}")
            return cache.load([row_of[t] for t in texts], device, dtype)
    else:
        table = load_prompt_table(split, "data.val")
        encoder = train.text_encoder if train is not None and train.text_encoder is not None else \
            _build_encoder(cfg, device)
        encode = _encode_with(encoder, device, dtype)
    table = _sized(table, split)
    return ValData([table.prompt(i) for i in range(len(table))] * split.repeat, encode)

