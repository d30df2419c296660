"""Parameter and memory figures of the full-size ArcFlow student (FLUX.1-dev or Qwen-Image), without its weights.

The 12B / 20B-parameter teachers cannot be downloaded here, and their counts need no values:
the architecture is built on the meta device from the published transformer config, and the
student is made on it by the trainer's own code (the config family's backbone), so the figures
follow any change to the LoRA targets, the heads or the norm_out copy.

    python benchmarks/param_count.py [--config CONFIG] [--num-modes K] [--lora-rank R]
    python benchmarks/param_count.py --config configs/qwen/arcqwen_2nfe_k16.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from arcflow.config import ModelConfig, load_config, torch_dtype
from arcflow.models import get_family
from arcflow.models.base import TransformerBackbone

REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs/flux/arcflux_2nfe_k16.py"

TEACHERS = {"flux": "FLUX.1-dev", "qwen_image": "Qwen-Image"}

# Every trainable parameter belongs to exactly one group, matched by this part of its name.
TRAINABLE_GROUPS = (
    ("LoRA adapters", ".lora_"),
    ("heads: means", ".proj_out.student.means."),
    ("heads: logits", ".proj_out.student.logits."),
    ("heads: rates", ".proj_out.student.rates."),
    ("norm_out copy", ".norm_out.student."),
)

SPEC_MAX_TRAINABLE_PCT = 5.0
"""SPEC §6: the reference trains < 5 % of the parameters."""


def build_student(model: ModelConfig, architecture: dict[str, Any]) -> TransformerBackbone:
    """The trainer's student (as ``build_backbone`` makes it) on a weightless teacher.

    Two layers get help to stay off real memory without touching package code:
    ``ArcFlowHeads`` copies the teacher's ``proj_out`` through the CPU, so that one small
    layer gets (uninitialised) CPU storage; and peft creates each LoRA layer on the default
    device before moving it next to its base layer, so ``add_adapter`` runs under the meta
    device (otherwise 0.6B adapter weights are allocated and initialised on the CPU first).
    """
    dtype = torch_dtype(model.dtype)
    backbone_class = get_family(model.backbone).backbone
    with torch.device("meta"):
        transformer = backbone_class.transformer_class(**architecture)
    # ModelMixin.to(dtype) warns about fp32-pinned modules even when, as for FLUX and Qwen-Image, there are none.
    torch.nn.Module.to(transformer, dtype)
    transformer.proj_out.to_empty(device="cpu")
    add_adapter = transformer.add_adapter

    def add_adapter_on_meta(*args: Any, **kwargs: Any) -> Any:
        with torch.device("meta"):
            return add_adapter(*args, **kwargs)

    with mock.patch.object(transformer, "add_adapter", add_adapter_on_meta):
        return backbone_class(transformer, num_modes=model.num_modes, lora_rank=model.lora_rank,
                            lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout, guidance=model.guidance,
                            compute_dtype=dtype, gradient_checkpointing=model.gradient_checkpointing)


def group_of(name: str) -> str:
    for group, marker in TRAINABLE_GROUPS:
        if marker in name:
            return group
    raise ValueError(f"trainable parameter {name!r} is in none of the groups {[g for g, _ in TRAINABLE_GROUPS]}")


def count(backbone: TransformerBackbone) -> dict[str, Any]:
    """Parameter counts by group and the bytes each kind of training state occupies."""
    trainable = dict.fromkeys((group for group, _ in TRAINABLE_GROUPS), 0)
    frozen = frozen_bytes = trainable_bytes = 0
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            trainable[group_of(name)] += p.numel()
            trainable_bytes += p.numel() * p.element_size()
        else:
            frozen += p.numel()
            frozen_bytes += p.numel() * p.element_size()
    n_trainable = sum(trainable.values())
    memory = {
        "frozen weights": frozen_bytes,
        "trainable weights": trainable_bytes,
        "gradients": trainable_bytes,
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
        "AdamW moments": 2 * trainable_bytes,
        "EMA shadow": trainable_bytes,
    }
    return {
        "total": frozen + n_trainable,
        "frozen": frozen,
        "trainable": n_trainable,
        "trainable_groups": trainable,
        "trainable_pct_of_total": 100 * n_trainable / (frozen + n_trainable),
        "trainable_pct_of_frozen": 100 * n_trainable / frozen,
        "bytes": memory,
        "bytes_total": sum(memory.values()),
        # bitsandbytes' AdamW8bit (the reference recipe on CUDA): one byte per moment, plus small block scales.
        "bytes_adamw8bit_moments_approx": 2 * n_trainable,
    }


def report(figures: dict[str, Any], model: ModelConfig) -> str:
    gib = 2**30
    total = figures["total"]
    teacher = TEACHERS[model.backbone]
    lines = [
        f"{teacher} student: K = {model.num_modes} modes, LoRA rank {model.lora_rank} (alpha {model.lora_alpha:g}), "
        f"frozen weights {model.dtype}",
        "",
        "| parameters | count | % of total |",
        "| --- | ---: | ---: |",
        f"| total | {total:,} | 100.00 |",
        f"| frozen base (teacher) | {figures['frozen']:,} | {100 * figures['frozen'] / total:.2f} |",
        f"| trainable | {figures['trainable']:,} | {figures['trainable_pct_of_total']:.2f} |",
    ]
    for group, n in figures["trainable_groups"].items():
        lines.append(f"| - {group} | {n:,} | {100 * n / total:.2f} |")
    lines += [
        "",
        f"trainable share: {figures['trainable_pct_of_total']:.2f} % of all parameters "
        f"({figures['trainable_pct_of_frozen']:.2f} % of the frozen teacher); "
        f"SPEC reference figure: < {SPEC_MAX_TRAINABLE_PCT:g} %",
        "",
        "| training state | bytes | GiB |",
        "| --- | ---: | ---: |",
    ]
    for what, size in figures["bytes"].items():
        lines.append(f"| {what} | {size:,} | {size / gib:.2f} |")
    lines.append(f"| total (before activations) | {figures['bytes_total']:,} | {figures['bytes_total'] / gib:.2f} |")
    approx = figures["bytes_adamw8bit_moments_approx"]
    lines.append(f"\nwith AdamW8bit the moments take about {approx / gib:.2f} GiB instead")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REFERENCE_CONFIG,
                        help="run config whose `model` section (family included) is applied (default: the FLUX.1-dev recipe)")
    parser.add_argument("--num-modes", type=int, help="override model.num_modes (K)")
    parser.add_argument("--lora-rank", type=int, help="override model.lora_rank (alpha follows it, as in the recipe)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = load_config(args.config).model
    if args.num_modes is not None:
        model = dataclasses.replace(model, num_modes=args.num_modes)
    if args.lora_rank is not None:
        model = dataclasses.replace(model, lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank))
    figures = count(build_student(model, get_family(model.backbone).full_size))
    print(report(figures, model))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
