"""Qwen-Image prompt cache: fp8 round-trip error per token, and bytes per prompt at realistic lengths.

Two questions decide how the cache stores Qwen2.5-VL's hidden states (3584 wide, up to 512 tokens):

1. **Which fp8 scale granularity?** Language-model hidden states are not Gaussian: a few channels
   carry values tens of times the rest, and some tokens (attention sinks) carry activations orders of
   magnitude above the others. This measures the relative error per token,
   ``|x_hat - x| / |x|`` over each token's 3584 values, of bf16 and of float8 e4m3 with one
   power-of-two scale per prompt or per token, on synthetic states with those outliers (and on the
   tiny Qwen-Image's real encoder with ``--tiny-qwen DIR``; its weights are random).
2. **How many bytes per prompt?** The real row codec (:func:`arcflow.data.cache_codec.encode_rows`:
   unpadded rows, zstd) on rows of 64, 128 and 512 tokens, plus the per-prompt bookkeeping of shard
   and index, projected to 2,304,128 prompts (the reference implementation's cache: ~380 GB).

Run from the repository root (a minute on 2 CPU cores)::

    python benchmarks/cache_storage.py [--prompts 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from arcflow.data.cache_codec import encode_rows, quantize, quantize_tokens
from arcflow.models.base import ConditioningSchema

QWEN_DIM = 3584
SCHEMA = ConditioningSchema(sequences={"prompt_embeds": "prompt_embeds_mask"}, negative_prompt="")
PER_PROMPT_BOOKKEEPING = 8 + 4 + 4 + 8 + 28  # shard: text offset, height, width, source row; index row
TEXT_BYTES = 2 * 400  # a long caption, stored in its shard and in the index


def hidden_states(batch: int, tokens: int, dim: int, outlier_channels: int, outlier_gain: float,
                  sink_gain: float, seed: int = 0) -> torch.Tensor:
    """Gaussian states with per-token scales spread over a decade, ``outlier_channels`` channels
    ``outlier_gain`` times larger, and token 0 of every prompt ``sink_gain`` times larger (float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64)
    x *= torch.exp(0.5 * torch.randn(batch, tokens, 1, generator=generator, dtype=torch.float64))
    channels = torch.randperm(dim, generator=generator)[:outlier_channels]
    x[..., channels] *= outlier_gain
    x[:, 0] *= sink_gain
    return x


def token_errors(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Relative round-trip error of every token (B*L,) for each storage."""
    codes, scale = quantize(x)
    per_prompt = codes.view(torch.float8_e4m3fn).double() * scale.double()[:, None, None]
    codes, exponent = quantize_tokens(x)
    per_token = codes.view(torch.float8_e4m3fn).double() * torch.exp2(exponent.double())[..., None]
    norm = x.norm(dim=-1)
    return {name: ((y - x).norm(dim=-1) / norm).flatten().numpy()
            for name, y in (("bf16", x.bfloat16().double()), ("fp8_per_prompt", per_prompt),
                            ("fp8_per_token", per_token))}


def summary(errors: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: {"mean": float(e.mean()), "p99": float(np.quantile(e, 0.99)), "max": float(e.max())}
            for name, e in errors.items()}


def bytes_per_prompt(tokens: int, storage: str, prompts: int) -> float:
    """Stored bytes per prompt of ``tokens``-token rows (outlier states in bf16, as the encoder returns)."""
    x = hidden_states(prompts, tokens, QWEN_DIM, 8, 20.0, 1.0, seed=tokens).float().bfloat16()
    rows = encode_rows({"prompt_embeds": x, "prompt_embeds_mask": torch.ones(prompts, tokens, dtype=torch.long)},
                       SCHEMA, storage)
    return float(rows.stored_bytes().mean()) + PER_PROMPT_BOOKKEEPING + TEXT_BYTES


def tiny_qwen_errors(folder: str) -> dict[str, dict[str, float]]:
    from arcflow.models.qwen_image.text_encoder import PretrainedQwenImageTextEncoder

    encoder = PretrainedQwenImageTextEncoder(folder, max_sequence_length=64, torch_dtype="float32")
    out = encoder.encode(["two red cubes on a wooden table under a lamp", "a cat", "city street at night, rain"])
    rows = [row[mask.bool()].double() for row, mask in zip(out["prompt_embeds"], out["prompt_embeds_mask"])]
    errors = [token_errors(row[None]) for row in rows]
    return summary({k: np.concatenate([e[k] for e in errors]) for k in errors[0]})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="synthetic prompts per measurement")
    parser.add_argument("--dim", type=int, default=QWEN_DIM, help="hidden width of the error measurement")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--total-prompts", type=int, default=2_304_128)
    parser.add_argument("--tiny-qwen", help="a tiny Qwen-Image folder: also measure its encoder's states")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    scenarios = {"gaussian": (0, 1.0, 1.0), "outlier_channels_x20": (8, 20.0, 1.0),
                 "outlier_channels_x20_and_sink_x1000": (8, 20.0, 1000.0)}
    figures: dict = {"error_per_token": {
        name: summary(token_errors(hidden_states(args.prompts, 128, args.dim, *spec)))
        for name, spec in scenarios.items()}}
    if args.tiny_qwen:
        figures["error_per_token"]["tiny_qwen_encoder"] = tiny_qwen_errors(args.tiny_qwen)
    figures["bytes_per_prompt"] = {storage: {str(n): bytes_per_prompt(n, storage, args.prompts) for n in args.lengths}
                                   for storage in ("bf16", "fp8")}
    figures["projection_gb"] = {storage: {n: b * args.total_prompts / 1e9 for n, b in by_length.items()}
                                for storage, by_length in figures["bytes_per_prompt"].items()}
    figures.update(total_prompts=args.total_prompts, reference_gb=380, cpus=os.cpu_count(),
                   machine=platform.processor() or platform.machine(), torch=torch.__version__)

    print("| states | storage | mean | p99 | max |\n| --- | --- | --- | --- | --- |")
    for scenario, by_storage in figures["error_per_token"].items():
        for storage, stats in by_storage.items():
            print(f"| {scenario} | {storage} | {stats['mean']:.2e} | {stats['p99']:.2e} | {stats['max']:.2e} |")
    print(f"\n| tokens | bf16 B/prompt | fp8 B/prompt | bf16, {args.total_prompts:,} prompts | fp8, same |\n"
          "| --- | --- | --- | --- | --- |")
    for n in args.lengths:
        b16, b8 = figures["bytes_per_prompt"]["bf16"][str(n)], figures["bytes_per_prompt"]["fp8"][str(n)]
        print(f"| {n} | {b16:,.0f} | {b8:,.0f} | {figures['projection_gb']['bf16'][str(n)]:,.0f} GB | "
              f"{figures['projection_gb']['fp8'][str(n)]:,.0f} GB |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
