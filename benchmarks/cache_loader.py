"""Prompt-embedding cache at the real FLUX sizes: bytes per prompt, write and read throughput.

Training must never wait for its prompts, so this measures how fast the cache reader turns random
prompt indices into dequantised conditioning (``CachedSplit.load``, the path ``TrainData`` takes),
and what one prompt costs on disk. The text encoder is replaced by synthetic tensors of FLUX's
shapes (T5 512 x 4096, CLIP pooled 768) so the numbers are about the cache alone:

* ``gaussian``: every T5 row i.i.d. normal, which zstd cannot shrink much; an upper bound on size
  and on decompression work.
* ``--tiny-flux DIR``: also encodes real prompts with the tiny FLUX's T5 at 512 tokens (the real
  architecture: no attention mask, so pad rows carry prompt-dependent values) and reports how much
  zstd saves on its fp8 codes. Its weights are random, so this shows the mechanism, not T5-XXL's ratio.

Run from the repository root::

    python benchmarks/cache_loader.py [--prompts 64] [--batch-size 4] [--reads 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from arcflow.config import PromptsConfig
from arcflow.data.cache_codec import CODEC, quantize_tokens
from arcflow.data.embedding_cache import CachedSplit, cache_split, make_plan
from arcflow.data.prompt_sources import PromptTable
from arcflow.distributed import DistEnv
from arcflow.models.base import ConditioningSchema

FLUX_SCHEMA = ConditioningSchema(sequences={"prompt_embeds": None}, vectors=("pooled_prompt_embeds",))


def synthetic_table(n: int) -> PromptTable:
    texts = pa.array([f"prompt {i}: a photo of something at {i % 7} o'clock" for i in range(n)], pa.large_string())
    sizes = np.full(n, 1024, np.int32)
    return PromptTable(texts, sizes, sizes.copy(), np.arange(n, dtype=np.int64))


def build_cache(directory: Path, n: int, seq_len: int, seq_dim: int, pooled_dim: int, shard_size: int,
                batch_size: int) -> tuple[float, dict]:
    """Write a cache of ``n`` Gaussian prompts through the real writer; (seconds, manifest)."""
    table = synthetic_table(n)
    generator = torch.Generator().manual_seed(0)
    encoder = {"type": "synthetic-gaussian", "dims": {"prompt_embeds": seq_dim, "pooled_prompt_embeds": pooled_dim}}
    plan = make_plan(table, "train", PromptsConfig(source="synthetic"), encoder, shard_size, FLUX_SCHEMA, "fp8")

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": 0.2 * torch.randn(len(texts), seq_len, seq_dim, generator=generator,
                                                   dtype=torch.bfloat16),
                "pooled_prompt_embeds": torch.randn(len(texts), pooled_dim, generator=generator)}

    start = time.perf_counter()
    cache_split(table, directory, plan, encode, batch_size, DistEnv())
    seconds = time.perf_counter() - start
    return seconds, json.loads((directory / "manifest.json").read_text())


def read_throughput(directory: Path, batch_size: int, reads: int, dtype: torch.dtype) -> float:
    """Samples per second of random-batch reads, dequantised to ``dtype`` on the CPU."""
    cache = CachedSplit(directory)
    rng = np.random.default_rng(0)
    cache.load(rng.integers(0, len(cache.table), batch_size), "cpu", dtype)  # warm-up: headers, page cache
    start = time.perf_counter()
    for _ in range(reads):
        cache.load(rng.integers(0, len(cache.table), batch_size), "cpu", dtype)
    return reads * batch_size / (time.perf_counter() - start)


def tiny_t5_ratio(tiny_flux: str, prompts: list[str]) -> float:
    """Stored / raw bytes of the fp8 T5 rows of the tiny FLUX's T5 at 512 tokens."""
    from arcflow.models.flux.text_encoder import PretrainedFluxTextEncoder

    encoder = PretrainedFluxTextEncoder(tiny_flux, max_sequence_length=512, torch_dtype="float32")
    codes, _ = quantize_tokens(encoder.encode(prompts)["prompt_embeds"])
    raw = codes.numpy()
    return sum(len(pa.compress(row, codec=CODEC, asbytes=True)) for row in raw) / raw.nbytes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seq-dim", type=int, default=4096)
    parser.add_argument("--pooled-dim", type=int, default=768)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per read (per GPU in training)")
    parser.add_argument("--reads", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny-flux", help="a tiny FLUX folder: also measure zstd on its T5's 512-token outputs")
    parser.add_argument("--total-prompts", type=int, default=2_304_128, help="scale the figures to this many prompts")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cache_bench_") as tmp:
        directory = Path(tmp) / "train"
        write_s, manifest = build_cache(directory, args.prompts, args.seq_len, args.seq_dim, args.pooled_dim,
                                        args.shard_size, args.batch_size)
        read_sps = read_throughput(directory, args.batch_size, args.reads, getattr(torch, args.dtype))
    per_prompt = manifest["stored_bytes"] / args.prompts
    shards = -(-args.total_prompts // 2048) + 1  # train at the shipped shard_size, plus one val shard
    figures = {
        "t5_shape": [args.seq_len, args.seq_dim], "pooled_dim": args.pooled_dim,
        "raw_fp8_bytes_per_prompt": args.seq_len * args.seq_dim,
        "gaussian_bytes_per_prompt_on_disk": round(per_prompt),
        "gaussian_total_for_prompts_tb": per_prompt * args.total_prompts / 1e12,
        "write_prompts_per_s_without_encoder": args.prompts / write_s,
        "read_samples_per_s": read_sps,
        "files_for_total_prompts_at_shard_size_2048": shards + 6,  # + plan, index, manifest per split
        "total_prompts": args.total_prompts,
        "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    if args.tiny_flux:
        prompts = [f"{n} {c} cubes next to a {s}" for n in ("one", "two", "three") for c in ("red", "blue")
                   for s in ("sphere", "cone", "red ring on a table in a garden at night")]
        figures["tiny_t5_512_zstd_ratio"] = tiny_t5_ratio(args.tiny_flux, prompts)
    print("| figure | value |\n| --- | --- |")
    for key, value in figures.items():
        print(f"| {key} | {value:,.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
