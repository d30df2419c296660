"""GPU memory and speed of one training iteration on the full-size FLUX.1-dev or Qwen-Image architecture.

Random weights (built on the meta device, materialised on the GPU; nothing is downloaded),
bf16 frozen weights, LoRA rank 256, K = 16, 1024x1024 (16x128x128 latents, 512 text tokens),
one process. The family is the config's: FLUX.1-dev by default, Qwen-Image with
``--config configs/qwen/arcqwen_2nfe_k16.py`` (its teacher's true CFG doubles the rows of
every teacher call; the empty negative prompt is 5 tokens). Scenarios: batch 1, batch 4,
batch 4 in micro-batches of 1, and the last one under FSDP2 on one rank. Prints a table with
peak GPU memory, seconds per iteration and model FLOPs utilisation (4 teacher forwards +
student forward, backward and recompute per student step).

    python benchmarks/gpu_train_check.py --out gpu_check.json      # on a GPU machine
    python benchmarks/gpu_train_check.py --config configs/qwen/arcqwen_2nfe_k16.py --out qwen_check.json
    python benchmarks/gpu_train_check.py --dry-run                  # anywhere: builds on meta, prints the plan
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from arcflow.config import RunConfig, load_config, resolve_dirs
from arcflow.distributed import DistEnv
from arcflow.models import Family, get_family
from arcflow.models.base import ConditioningSchema, TransformerBackbone

TEXT_TOKENS, SIZE = 512, 1024
NEGATIVE_TOKENS = 5
"""Qwen-Image's empty prompt after the template drop: <|im_end|>, newline, <|im_start|>, assistant, newline."""
H100_BF16_DENSE_FLOPS = 989e12
SCENARIOS = [  # name, parallel, batch, micro-batch
    ("ddp batch 1", "ddp", 1, None),
    ("ddp batch 4", "ddp", 4, None),
    ("ddp batch 4, micro 1", "ddp", 4, 1),
    ("fsdp2 batch 4, micro 1", "fsdp", 4, 1),
]


class RandomTextEncoder(nn.Module):
    """Random embeddings of the family encoder's real shapes (its schema); the check measures the transformer."""

    def __init__(self, family: Family, dtype: torch.dtype):
        super().__init__()
        self.schema: ConditioningSchema = family.text_encoders[family.default_text_encoder].schema
        self.width = family.full_size["joint_attention_dim"]
        self.pooled_width = family.full_size.get("pooled_projection_dim")
        self.dtype = dtype
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives .to(device) a target

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        device, n = self.anchor.device, len(prompts)
        length = NEGATIVE_TOKENS if prompts == [self.schema.negative_prompt] else TEXT_TOKENS
        out = {}
        for key, mask in self.schema.sequences.items():
            out[key] = torch.randn(n, length, self.width, device=device, dtype=self.dtype)
            if mask is not None:
                out[mask] = torch.ones(n, length, dtype=torch.long, device=device)
        for key in self.schema.vectors:
            out[key] = torch.randn(n, self.pooled_width, device=device, dtype=self.dtype)
        return out


def build_random_backbone(cfg: RunConfig, device: torch.device) -> TransformerBackbone:
    """The student on a full-size random teacher of the config's family: frozen weights bf16, trainable fp32."""
    m = cfg.model
    family = get_family(m.backbone)
    with torch.device("meta"):
        transformer = family.backbone.transformer_class(**family.full_size).to(torch.bfloat16)
        backbone = family.backbone(transformer, num_modes=m.num_modes, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                                   lora_dropout=m.lora_dropout, guidance=m.guidance, compute_dtype=torch.bfloat16,
                                   gradient_checkpointing=m.gradient_checkpointing)
    if device.type == "meta":
        return backbone
    backbone.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.zero_()
            elif p.dim() >= 2:
                p.normal_(0, 0.02, generator=generator)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return backbone


def forward_flops(family: Family) -> float:
    """Matmul FLOPs of one full-size forward of one 1024^2 image with 512 text tokens."""
    arch = family.full_size
    hidden = arch["attention_head_dim"] * arch["num_attention_heads"]
    blocks = arch["num_layers"] + arch.get("num_single_layers", 0)
    image, text = (SIZE // 16) ** 2, TEXT_TOKENS
    with torch.device("meta"):
        params = dict(family.backbone.transformer_class(**arch).named_parameters())
    attention = 4 * (image + text) ** 2 * hidden * blocks
    if family.name == "flux":
        block_params = sum(p.numel() for n, p in params.items() if "transformer_blocks" in n)
        return 2 * block_params * (image + text) + attention
    # Dual-stream blocks only (Qwen-Image): image tokens pass the img_mlp and attention's to_* projections, text
    # tokens the txt_mlp and add_* ones; the modulation MLPs run once per sample, not per token.
    img = sum(p.numel() for n, p in params.items() if ".img_mlp." in n or re.search(r"\.attn\.to_(q|k|v|out)", n))
    txt = sum(p.numel() for n, p in params.items()
              if ".txt_mlp." in n or re.search(r"\.attn\.(add_(q|k|v)_proj|to_add_out)", n))
    return 2 * (img * image + txt * text) + attention


def flops_per_iteration(cfg: RunConfig, batch: int) -> float:
    """Per student step: num_states teacher forwards (of 2B rows under true CFG) + student forward, backward (2x)
    and recompute."""
    family = get_family(cfg.model.backbone)
    cfg_rows = 1 if family.text_encoders[family.default_text_encoder].schema.negative_prompt is None else 2
    recompute = 1 if cfg.model.gradient_checkpointing else 0
    per_student_step = (cfg.distill.num_states * cfg_rows + 1 + 2 + recompute) * forward_flops(family)
    return per_student_step * cfg.distill.nfe * batch


def run_scenario(base: RunConfig, parallel: str, batch: int, micro: int | None, env: DistEnv, iters: int,
                 warmup: int) -> dict:
    from arcflow.training.trainer import Trainer

    cfg = replace(base, train_cfg=replace(base.train_cfg, parallel=parallel, batch_size=batch,
                                          grad_accum_batch_size=micro))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(env.device)
    backbone = build_random_backbone(cfg, env.device)
    text_encoder = RandomTextEncoder(get_family(cfg.model.backbone), torch.bfloat16)
    trainer = Trainer(cfg, env, backbone=backbone, text_encoder=text_encoder)
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize(env.device)
        start = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize(env.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = sum(times) / len(times)
    result = {"parallel": parallel, "batch": batch, "micro_batch": micro, "sec_per_iter": sec,
              "peak_gb": torch.cuda.max_memory_allocated(env.device) / 2**30,
              "mfu": flops_per_iteration(cfg, batch) / sec / H100_BF16_DENSE_FLOPS}
    del trainer, backbone
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/flux/arcflux_2nfe_k16.py",
                        help="the recipe, and with it the family (configs/qwen/arcqwen_2nfe_k16.py: Qwen-Image)")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="build on meta and print the plan only")
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp, "prompts.txt")
        # More than the 128 prompts that the FLUX config keeps for validation (a GPU run found 64 too few).
        prompts.write_text("\n".join(f"prompt {i}" for i in range(512)))
        data = {f"data.{s}.{k}": v for s in ("train", "val")
                for k, v in (("prompt_file", str(prompts)), ("height", SIZE), ("width", SIZE))}
        # The random text encoder below stands in for on-the-fly embedding; no cache is read.
        base = resolve_dirs(load_config(args.config, {**data, "eval_interval": 0, "data.cache": "never"}), tmp)
        if args.dry_run:
            backbone = build_random_backbone(base, torch.device("meta"))
            trainable = sum(p.numel() for _, p in backbone.trainable_named_parameters())
            print(f"built full-size {base.model.backbone} student on meta: {trainable:,} trainable parameters")
            for name, _, batch, _ in SCENARIOS:
                print(f"{name}: {flops_per_iteration(base, batch) / 1e15:.2f} PFLOP per iteration")
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        env = DistEnv(device=torch.device("cuda", 0))
        torch.cuda.set_device(env.device)
        rows = []
        for name, parallel, batch, micro in SCENARIOS:
            if args.only and name not in args.only:
                continue
            try:
                rows.append({"scenario": name, **run_scenario(base, parallel, batch, micro, env, args.iters,
                                                              args.warmup)})
            except torch.OutOfMemoryError:
                rows.append({"scenario": name, "error": "out of memory"})
            print(json.dumps(rows[-1]), flush=True)
        print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        print("| scenario | peak GPU memory (GiB) | s / iteration | MFU |\n| --- | --- | --- | --- |")
        for r in rows:
            if "error" in r:
                print(f"| {r['scenario']} | {r['error']} | | |")
            else:
                print(f"| {r['scenario']} | {r['peak_gb']:.1f} | {r['sec_per_iter']:.2f} | {100 * r['mfu']:.1f}% |")
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
