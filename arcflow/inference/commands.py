"""``arcflow export`` and ``arcflow generate``: their arguments, with the heavy imports deferred.

Kept free of diffusers so that registering these commands costs the rest of the CLI nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from mmengine.config import DictAction

from arcflow.models.hub import reports_unavailable_model

SIZE_MULTIPLE = 16
"""FLUX image sides: 8x VAE downsampling, then 2x2 patches."""


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run config the checkpoint was trained with")
    parser.add_argument("--ckpt", required=True, help="an iter_* checkpoint, or a run dir (its latest)")
    parser.add_argument("--out-dir", required=True, help="adapter folder to write (replaced if it is one already)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="of the exported tensors (default: the config's model.dtype)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. model.pretrained=/path/to/FLUX.1-dev")


def run_export(args: argparse.Namespace) -> Path:
    from arcflow.config import load_config
    from arcflow.inference.export import export_adapter

    cfg = load_config(args.config, dict(args.cfg_options or {}))
    out = export_adapter(cfg, args.ckpt, args.out_dir, args.dtype)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out.iterdir()))
    print(f"wrote {out}: {sizes}")
    return out


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model the adapter was distilled from: hub id or local "
                        "diffusers folder")
    parser.add_argument("--adapter", required=True, help="ArcFlow adapter folder (arcflow export) or hub id")
    parser.add_argument("--prompt", nargs="+", default=[], help="one or more prompts (default: none)")
    parser.add_argument("--prompts-file", help="one prompt per line, or .jsonl with prompt and optional height/width "
                        "(default: none)")
    parser.add_argument("--nfe", type=int, help="student evaluations per image, >= 2 (default: the adapter's)")
    parser.add_argument("--timestep-ratio", type=float, help="last segment's share (default: the adapter's)")
    parser.add_argument("--height", type=int, help="image height (default: the adapter's most frequent training size)")
    parser.add_argument("--width", type=int, help="image width (default: the adapter's most frequent training size)")
    parser.add_argument("--max-sequence-length", type=int, help="text tokens per prompt (default: the adapter's)")
    parser.add_argument("--guidance-scale", type=float, help="guidance embedding (default: the adapter's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default: 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt, the grid's columns (default: 1)")
    parser.add_argument("--out", required=True, help="PNG grid to write (rows: prompts, with their captions)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="weights and compute (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload: less GPU memory "
                        "(default: off)")


@dataclass(frozen=True)
class Prompt:
    text: str
    height: int | None
    width: int | None
    """None: the adapter's default size."""


def _size(value: object, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % SIZE_MULTIPLE:
        raise ValueError(f"{where} {value!r} is not a positive multiple of {SIZE_MULTIPLE}")
    return value


def read_prompts_file(path: str | Path, height: int | None, width: int | None) -> list[Prompt]:
    """Plain text (one prompt per line) or JSONL (``prompt``, optional ``height``/``width``); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file '{path}' not found")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{where}: expected an object with a string 'prompt'")
            prompts.append(Prompt(record["prompt"], _size(record.get("height", height), f"{where}: height"),
                                  _size(record.get("width", width), f"{where}: width")))
        else:
            prompts.append(Prompt(line.strip(), height, width))
    return prompts


def _prompts(args: argparse.Namespace) -> list[Prompt]:
    height, width = _size(args.height, "--height"), _size(args.width, "--width")
    prompts = [Prompt(text, height, width) for text in args.prompt]
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file, height, width)
    if not prompts:
        raise ValueError("no prompts: give --prompt and/or --prompts-file")
    return prompts


@reports_unavailable_model
def run_generate(args: argparse.Namespace) -> Path:
    from arcflow.inference.generate import generate_grid

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    return generate_grid(args.base, args.adapter, _prompts(args), args.out, nfe=args.nfe,
                         timestep_ratio=args.timestep_ratio, seed=args.seed, num_images=args.num_images,
                         device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload,
                         max_sequence_length=args.max_sequence_length, guidance_scale=args.guidance_scale)
