"""How one prompt's conditioning is stored in the cache: unpadded rows, bf16 or fp8, zstd.

A sequence with an attention mask is stored without its padding (its length kept beside it;
padding is masked, so nothing is lost) and padded again, with its mask rebuilt, when a batch is
read. A sequence without a mask (FLUX's T5 runs unmasked: its outputs at pad positions depend on
the prompt) is stored whole. Row values are kept as

* ``bf16``: the encoder's output in bfloat16 (exact for a bf16 encoder), or
* ``fp8``: float8 e4m3 codes with one power-of-two scale per token. Per token, not per prompt:
  language-model hidden states carry outlier channels and a few tokens (the first, typically) with
  activations orders of magnitude above the rest; one scale per prompt pushes every other token's
  values into e4m3's subnormals (``benchmarks/cache_storage.py`` measures it). A power-of-two scale
  makes ``code * scale`` exact in any float dtype, so dequantising depends only on the fp8 rounding.

Each (prompt, key) row is one zstd blob; vectors (a pooled embedding) stay float32. A CRC32 over
everything stored for a prompt is checked on every read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from arcflow.models.base import Conditioning, ConditioningSchema

STORAGES = ("bf16", "fp8")
"""``data.cache_storage`` values."""
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CODEC = "zstd"


def check_finite(cond: Conditioning) -> None:
    """Refuse a batch with a non-finite embedding, naming its rows: the cache must never hold one."""
    for key, value in cond.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value.float())).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"text encoder output {key!r} has non-finite values for batch rows {bad}")


def _power_of_two_scale(amax: Tensor) -> Tensor:
    _, exponent = torch.frexp(amax / FP8_MAX)
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exponent), torch.ones_like(amax))


def quantize(sequence: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L, D) -> fp8 e4m3 codes as uint8 (B, L, D) and ONE power-of-two scale per prompt (B,) float32.

    The coarser alternative to :func:`quantize_tokens`, kept to measure against it.
    """
    x = sequence.float()
    check_finite({"sequence": x})
    scale = _power_of_two_scale(x.abs().flatten(1).amax(1))
    return (x / scale[:, None, None]).to(FP8).view(torch.uint8), scale


def quantize_tokens(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(..., D) -> fp8 e4m3 codes as uint8 (..., D) and int8 exponents (...,): one scale 2**e per token."""
    x = rows.float()
    scale = _power_of_two_scale(x.abs().amax(-1))
    exponent = torch.log2(scale).round().to(torch.int8)
    return (x / scale[..., None]).to(FP8).view(torch.uint8), exponent


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 codes (B, L, D) and scales (B,) or (B, L) -> (B, L, D) in ``dtype`` (exact, see the module)."""
    scale = scale.to(device=codes.device, dtype=dtype)
    return codes.view(FP8).to(dtype) * scale.reshape(*scale.shape, *[1] * (codes.dim() - scale.dim()))


def token_bytes(storage: str, dim: int) -> int:
    """Bytes of one stored token of width ``dim`` before zstd."""
    return 2 * dim if storage == "bf16" else dim + 1


@dataclass
class EncodedRows:
    """What the cache stores for a run of prompts: per sequence key blobs and lengths; vectors; CRCs."""

    blobs: dict[str, list[bytes]]
    lengths: dict[str, np.ndarray]
    vectors: dict[str, np.ndarray]
    crcs: np.ndarray

    @staticmethod
    def concat(parts: list[EncodedRows]) -> EncodedRows:
        first = parts[0]
        return EncodedRows({k: [b for p in parts for b in p.blobs[k]] for k in first.blobs},
                           {k: np.concatenate([p.lengths[k] for p in parts]) for k in first.lengths},
                           {k: np.concatenate([p.vectors[k] for p in parts]) for k in first.vectors},
                           np.concatenate([p.crcs for p in parts]))

    def stored_bytes(self) -> np.ndarray:
        """Bytes each prompt's rows, lengths, vectors and CRC take in a shard, (n,)."""
        total = np.full(len(self.crcs), 8, np.int64)
        for blobs in self.blobs.values():
            total += np.array([len(b) for b in blobs], np.int64) + 8 + 4  # blob, its offset, its length
        for vector in self.vectors.values():
            total += vector.shape[1] * 4
        return total


def row_crc(blobs: list[bytes | memoryview], lengths: list[int], vectors: list[np.ndarray]) -> int:
    crc = 0
    for blob, length in zip(blobs, lengths):
        crc = zlib.crc32(np.int32(length).tobytes(), zlib.crc32(blob, crc))
    for vector in vectors:
        crc = zlib.crc32(np.ascontiguousarray(vector, np.float32).tobytes(), crc)
    return crc


def row_lengths(cond: Conditioning, key: str, mask_key: str | None) -> np.ndarray:
    """Tokens kept per prompt of sequence ``key``: its mask's ones, which must come first (right padding)."""
    batch, length = cond[key].shape[:2]
    if mask_key is None:
        return np.full(batch, length, np.int32)
    mask = cond[mask_key].bool().cpu()
    lengths = mask.sum(1)
    prefix = torch.arange(length)[None, :] < lengths[:, None]
    if not torch.equal(mask, prefix):
        bad = (mask != prefix).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{mask_key!r} of batch rows {bad} is not right padding (ones then zeros); "
                         "the cache stores each row's first tokens")
    return lengths.numpy().astype(np.int32)


def encode_rows(cond: Conditioning, schema: ConditioningSchema, storage: str) -> EncodedRows:
    """A batch of the text encoder's conditioning -> its stored form (see the module docstring)."""
    check_finite(cond)
    blobs: dict[str, list[bytes]] = {}
    lengths: dict[str, np.ndarray] = {}
    for key, mask_key in schema.sequences.items():
        lengths[key] = row_lengths(cond, key, mask_key)
        sequence = cond[key].detach().cpu()
        blobs[key] = []
        for row, length in zip(sequence, lengths[key]):
            kept = row[:length]
            if storage == "bf16":
                raw = kept.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            else:
                codes, exponents = quantize_tokens(kept)
                raw = exponents.numpy().tobytes() + codes.numpy().tobytes()
            blobs[key].append(pa.compress(raw, codec=CODEC, asbytes=True))
    vectors = {key: cond[key].detach().float().cpu().numpy() for key in schema.vectors}
    crcs = np.array([row_crc([blobs[k][i] for k in blobs], [int(lengths[k][i]) for k in lengths],
                             [vectors[k][i] for k in vectors]) for i in range(len(next(iter(blobs.values()))))],
                    np.int64)
    return EncodedRows(blobs, lengths, vectors, crcs)


class RowDecoder:
    """Decompressed rows of one batch and one sequence key, padded into one buffer, dequantised at the end."""

    def __init__(self, storage: str, batch: int, length: int, dim: int):
        self.storage, self.dim = storage, dim
        self.codes = np.zeros((batch, length, dim), np.int16 if storage == "bf16" else np.uint8)
        self.exponents = np.zeros((batch, length), np.int8)
        self.lengths = np.zeros(batch, np.int64)

    def put(self, i: int, blob: bytes, length: int) -> None:
        """Row ``i`` from its blob (raises pyarrow/ValueError errors on a blob that does not decode)."""
        size = length * token_bytes(self.storage, self.dim)
        raw = np.frombuffer(pa.decompress(blob, decompressed_size=size, codec=CODEC), np.uint8)
        if self.storage == "bf16":
            self.codes[i, :length] = raw.view(np.int16).reshape(length, self.dim)
        else:
            self.exponents[i, :length] = raw[:length].view(np.int8)
            self.codes[i, :length] = raw[length:].reshape(length, self.dim)
        self.lengths[i] = length

    def tensors(self, device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, L, D) values in ``dtype`` on ``device`` (zeros past each row's length) and the (B, L) long mask."""
        codes = torch.from_numpy(self.codes).to(device, non_blocking=True)
        if self.storage == "bf16":
            values = codes.view(torch.bfloat16).to(dtype)
        else:
            scale = torch.ldexp(torch.ones(self.exponents.shape), torch.from_numpy(self.exponents).int())
            values = dequantize(codes, scale, dtype)
        mask = (torch.arange(self.codes.shape[1])[None, :] < torch.from_numpy(self.lengths)[:, None]).long()
        return values, mask.to(device)
