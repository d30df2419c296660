"""What the counter-based LoRA dropout masks cost, here and estimated for FLUX.1-dev at 1024x1024.

Measured on this machine:
  * per element of a (1, tokens, features) input: the eager masks (every hash step a pass over an int32
    tensor), the fused kernel CUDA runs (``drop_fused``, compiled here for this device),
    ``nn.functional.dropout`` (what peft's dropout does) and one elementwise pass (``x * 2``) for scale;
  * one real peft LoRA layer of FLUX's widest adapted input (single blocks' ``proj_out``: 15360 -> 3072,
    rank 256) forward and backward under bf16 autocast, as peft ships it (its fp32 input cast, then
    ``nn.Dropout``) and as arcflow runs it (no cast, :class:`HashDropout`), each with and without dropout.

Full size, estimated: the masked elements of one student forward are counted on the real module tree
(the student on the meta device, every LoRA layer's input width times its tokens); the iteration time
is the FLOPs of ``gpu_train_check.flops_per_iteration`` at an assumed MFU; the passes over each LoRA
input are taken to be bound by memory traffic (bytes per element below) at the given HBM bandwidth.

    python benchmarks/lora_dropout_cost.py [--tokens 1024] [--features 3072] [--mfu 0.3 0.45] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from arcflow.config import load_config
from arcflow.models import lora_dropout
from arcflow.models.base import ADAPTER_NAME, train_lora
from arcflow.models.lora_dropout import DropoutKeys, keep_threshold

FLUX_CONFIG = "configs/flux/arcflux_2nfe_k16.py"
PROJ_OUT = (15360, 3072)
"""(in, out) features of FLUX's single blocks' ``proj_out``, the widest adapted input (59 % of the masked elements)."""
BYTES_PER_ELEMENT = {
    # (forward, backward) bytes moved per LoRA input element by the passes outside the matmuls.
    "peft as shipped: fp32 input cast, nn.Dropout": (
        (2 + 4) + (4 + 4 + 1) + (4 + 2),   # cast bf16 -> fp32; dropout (output, bool mask); autocast back to bf16
        (2 + 4) + (4 + 1 + 4) + (4 + 2)),  # the same three steps' gradients
    "peft as shipped, dropout 0: fp32 input cast": ((2 + 4) + (4 + 2), (2 + 4) + (4 + 2)),
    "arcflow: bf16, hash masks fused, remade in backward": (2 + 2, 2 + 2),
}


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
    threshold, scale = keep_threshold(p), 1 / (1 - p)
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


def lora_layer(rank: int, p: float, arcflow: bool, keys: DropoutKeys) -> nn.Module:
    """FLUX's ``proj_out`` (bf16) with a real peft LoRA (fp32) of ``rank``, as peft ships it or as arcflow runs it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(*PROJ_OUT).to(torch.bfloat16))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=p, target_modules=["0"],
                                       init_lora_weights="gaussian"), model, adapter_name=ADAPTER_NAME)
    if arcflow:  # what the student's backbone does to its LoRA
        train_lora(model, keys, torch.bfloat16)
    else:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    return model.train()


def layer_costs(tokens: int, rank: int, p: float, repeats: int, fused: bool) -> dict[str, float]:
    """ms per forward + backward of one LoRA layer of FLUX's widest input, under bf16 autocast on the CPU."""
    keys = DropoutKeys(0)
    keys.set(0, 0, torch.zeros(1, dtype=torch.int64))
    x = torch.randn(1, tokens, PROJ_OUT[0], dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, tokens, PROJ_OUT[1], dtype=torch.bfloat16)
    variants = {"peft as shipped: fp32 input cast, nn.Dropout": (p, False, False),
                "peft as shipped, dropout 0: fp32 input cast": (0.0, False, False),
                "arcflow, eager hash masks (CPUs)": (p, True, False),
                "arcflow, dropout 0": (0.0, True, False)}
    if fused:
        variants["arcflow, fused hash masks (what CUDA runs)"] = (p, True, True)
    costs = {}
    for name, (prob, arcflow, use_kernel) in variants.items():
        model = lora_layer(rank, prob, arcflow, keys)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.backward(grad)
        with mock.patch.object(lora_dropout, "fused_on", lambda _: True) if use_kernel else nullcontext():
            costs[name] = ns_per_element(step, 1, repeats) / 1e6
    return costs


def full_size(mfus: list[float], bandwidth: float) -> dict[str, Any]:
    check = _sibling("gpu_train_check")
    cfg = load_config(FLUX_CONFIG)
    image_tokens = (check.SIZE // 16) ** 2
    elements = flux_masked_elements(image_tokens, check.TEXT_TOKENS)
    forwards = 2 if cfg.model.gradient_checkpointing else 1  # the recompute makes the forward passes again
    flops = check.flops_per_iteration(cfg, 1)
    seconds = {mfu: flops / (mfu * check.H100_BF16_DENSE_FLOPS) for mfu in mfus}
    rows = []
    for design, (forward, backward) in BYTES_PER_ELEMENT.items():
        bytes_per_element = cfg.distill.nfe * (forwards * forward + backward)
        pass_sec = elements * bytes_per_element / bandwidth
        rows.append({"design": design, "bytes_per_element": bytes_per_element, "pass_sec": pass_sec,
                     "share_pct": {mfu: 100 * pass_sec / sec for mfu, sec in seconds.items()}})
    return {"masked_elements_per_forward": elements, "forwards_per_step": forwards, "nfe": cfg.distill.nfe,
            "iteration_pflop": flops / 1e15, "bandwidth": bandwidth, "sec_per_iter": seconds, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--features", type=int, default=3072)
    parser.add_argument("--p", type=float, default=0.05, help="dropout probability (model.lora_dropout)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layer-tokens", type=int, default=1024, help="tokens of the LoRA layer measurement")
    parser.add_argument("--rank", type=int, default=256, help="LoRA rank of the layer measurement")
    parser.add_argument("--no-fused", action="store_true", help="skip the compiled kernel (no compiler here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.45], help="assumed H100 MFU at full size")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM: 3.35e12)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    measured = measure(args.tokens, args.features, args.p, args.repeats, not args.no_fused, device)
    layers = layer_costs(args.layer_tokens, args.rank, args.p, args.repeats, not args.no_fused)
    estimate = full_size(args.mfu, args.bandwidth)
    print(f"measured on {device} ({torch.get_num_threads()} threads), input (1, {args.tokens}, {args.features}):")
    print("| masks | ns/element |\n| --- | ---: |")
    for name, ns in measured.items():
        print(f"| {name} | {ns:.2f} |")
    baseline = layers["arcflow, dropout 0"]
    print(f"\none LoRA layer {PROJ_OUT[0]} -> {PROJ_OUT[1]}, rank {args.rank}, {args.layer_tokens} tokens, "
          f"forward + backward under bf16 autocast, CPU:")
    print("| LoRA layer | ms | vs arcflow at dropout 0 % |\n| --- | ---: | ---: |")
    for name, ms in layers.items():
        print(f"| {name} | {ms:.1f} | {100 * (ms / baseline - 1):+.1f} |")
    print(f"\nFLUX.1-dev 1024x1024, one sample: {estimate['masked_elements_per_forward']:.3g} masked elements per "
          f"student forward, {estimate['nfe']} student steps, their forward passes made "
          f"{estimate['forwards_per_step']} times (gradient checkpointing); {estimate['iteration_pflop']:.2f} PFLOP "
          f"per iteration; passes over the LoRA inputs at {estimate['bandwidth'] / 1e12:.2f} TB/s:")
    mfus = list(estimate["sec_per_iter"])
    print("| LoRA input passes | bytes/element/iter | ms/iter | "
          + " | ".join(f"share at {mfu:.0%} MFU ({estimate['sec_per_iter'][mfu]:.2f} s/iter) %" for mfu in mfus)
          + " |\n| --- | ---: | ---: |" + " ---: |" * len(mfus))
    for row in estimate["rows"]:
        shares = " | ".join(f"{row['share_pct'][mfu]:.2f}" for mfu in mfus)
        print(f"| {row['design']} | {row['bytes_per_element']} | {1e3 * row['pass_sec']:.0f} | {shares} |")
    result = {"measured_ns_per_element": measured, "layer_ms": layers, "full_size": estimate,
              "machine": {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
