"""What the counter-based LoRA dropout masks cost, here and estimated for FLUX.1-dev at 1024x1024.

Measured on this machine, per element of a (1, tokens, features) input: the eager masks (every hash step
a pass over an int64 tensor), the fused kernel CUDA runs (``drop_fused``, compiled here for this device),
``nn.functional.dropout`` (what peft's dropout did) and a single elementwise pass (``x * 2``) for scale.

Full size, estimated: the masked elements of one student forward are counted on the real module tree
(the student on the meta device, every LoRA layer's input width times its tokens); the iteration time
is the FLOPs of ``gpu_train_check.flops_per_iteration`` at an assumed MFU; the fused kernel is taken to
be bound by memory traffic (forward: read x, write the output and a bool mask; backward: read the
gradient and the mask, write the gradient), at the given HBM bandwidth.

    python benchmarks/lora_dropout_cost.py [--tokens 1024] [--features 3072] [--mfu 0.3 0.45] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from arcflow.config import load_config
from arcflow.models import lora_dropout
from arcflow.models.lora_dropout import DropoutKeys

FLUX_CONFIG = "configs/flux/arcflux_2nfe_k16.py"
FUSED_BYTES_PER_ELEMENT = (4 + 4 + 1) + (4 + 1 + 4)
"""fp32 input read, output and bool mask written; backward: gradient and mask read, gradient written."""


def _sibling(name: str) -> ModuleType:
    """Another script of benchmarks/ (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ns_per_element(fn: Callable[[], Any], elements: int, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats / elements * 1e9


def measure(tokens: int, features: int, p: float, repeats: int, fused: bool, device: torch.device) -> dict[str, float]:
    shape = torch.Size((1, tokens, features))
    x = torch.randn(shape, device=device)
    keys = DropoutKeys(0)
    keys.set(0, 0, torch.zeros(1, dtype=torch.int64))
    row, g = lora_dropout._row_keys(shape, keys, 0, device)
    threshold, scale = round(p * 2**32), 1 / (1 - p)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    candidates = {"eager hash masks": lambda: lora_dropout.drop(x, row, g, threshold, scale),
                  "nn.functional.dropout": lambda: nn.functional.dropout(x, p, True),
                  "one elementwise pass (x * 2)": lambda: x * 2}
    if fused:
        kernel = lora_dropout.drop_fused()
        candidates["fused hash masks (drop_fused)"] = lambda: kernel(x, row, g, threshold, scale)
    return {name: ns_per_element(lambda fn=fn: (fn(), sync()), shape.numel(), repeats)
            for name, fn in candidates.items()}


def flux_masked_elements(image_tokens: int, text_tokens: int) -> int:
    """Masked input elements of one FLUX.1-dev student forward on one sample."""
    check = _sibling("gpu_train_check")
    backbone = check.build_random_backbone(load_config(FLUX_CONFIG), torch.device("meta"))
    total = 0
    for name, module in backbone.transformer.named_modules():
        slots = getattr(module, "lora_dropout", None)
        if isinstance(slots, nn.ModuleDict) and any(isinstance(s, lora_dropout.HashDropout) for s in slots.values()):
            if name.startswith("time_text_embed"):
                rows = 1
            elif name.startswith("single_transformer_blocks"):
                rows = image_tokens + text_tokens
            else:
                rows = text_tokens if ".ff_context." in name else image_tokens
            total += rows * module.get_base_layer().in_features
    return total


def full_size(mfus: list[float], bandwidth: float) -> dict[str, Any]:
    check = _sibling("gpu_train_check")
    cfg = load_config(FLUX_CONFIG)
    image_tokens = (check.SIZE // 16) ** 2
    elements = flux_masked_elements(image_tokens, check.TEXT_TOKENS)
    forwards = cfg.distill.nfe * (2 if cfg.model.gradient_checkpointing else 1)  # recompute makes them again
    mask_sec = forwards * elements * FUSED_BYTES_PER_ELEMENT / bandwidth
    flops = check.flops_per_iteration(cfg, 1)
    rows = [{"mfu": mfu, "sec_per_iter": flops / (mfu * check.H100_BF16_DENSE_FLOPS), "mask_sec": mask_sec}
            for mfu in mfus]
    for row in rows:
        row["share_pct"] = 100 * mask_sec / row["sec_per_iter"]
    return {"masked_elements_per_forward": elements, "mask_computations_per_iteration": forwards,
            "iteration_pflop": flops / 1e15, "bandwidth": bandwidth, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--features", type=int, default=3072)
    parser.add_argument("--p", type=float, default=0.05, help="dropout probability (model.lora_dropout)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-fused", action="store_true", help="skip the compiled kernel (no compiler here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.45], help="assumed H100 MFU at full size")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM: 3.35e12)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    measured = measure(args.tokens, args.features, args.p, args.repeats, not args.no_fused, device)
    estimate = full_size(args.mfu, args.bandwidth)
    print(f"measured on {device} ({torch.get_num_threads()} threads), input (1, {args.tokens}, {args.features}):")
    print("| masks | ns/element |\n| --- | ---: |")
    for name, ns in measured.items():
        print(f"| {name} | {ns:.2f} |")
    print(f"\nFLUX.1-dev 1024x1024, one sample: {estimate['masked_elements_per_forward']:.3g} masked elements per "
          f"student forward, made {estimate['mask_computations_per_iteration']} times per iteration; "
          f"{estimate['iteration_pflop']:.2f} PFLOP per iteration")
    print("| H100 MFU | s/iter | fused masks ms/iter | share % |\n| --- | ---: | ---: | ---: |")
    for row in estimate["rows"]:
        print(f"| {row['mfu']:.0%} | {row['sec_per_iter']:.2f} | {1e3 * row['mask_sec']:.0f} | {row['share_pct']:.2f} |")
    result = {"measured_ns_per_element": measured, "full_size": estimate,
              "machine": {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
