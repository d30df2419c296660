"""Inference speed of the exported ArcFlow student (ArcFluxPipeline, 2 NFE) against its multi-step teacher.

Wall time per image of the 2-NFE student and of the teacher's 50-step FluxPipeline at the same
size, their ratio (at most 50 / 2 = 25x: text encoding and VAE decoding are paid once by both),
and the share of each image's time spent outside the transformer (timed with forward hooks).
No weights are downloaded: the models are built in-process with random weights.

    python benchmarks/inference_speed.py                 # CPU: a small FLUX-architecture model, 256x256
    python benchmarks/inference_speed.py --full-size --device cuda   # FLUX.1-dev sizes, bf16, 1024x1024,
                                                         # also peak GPU memory and model CPU offload
    python benchmarks/inference_speed.py --full-size --device meta   # only builds the full-size pipeline
                                                         # and installs a small adapter (no GPU needed)

The CPU model keeps the tiny text encoders and VAE of ``arcflow tiny-flux`` and widens the
transformer, so the transformer dominates as it does in the real FLUX.1-dev. The full-size
mode builds the real architectures (FLUX.1-dev transformer, T5-XXL, CLIP-L, FLUX VAE) directly
on the target device in bf16 (on ``meta`` when checking the construction).

On a CPU shared with other jobs, ``--threads 1`` gives far steadier figures (idle-spinning
OpenMP threads otherwise fight the other jobs, and the long teacher run suffers most), and the
speed-up in CPU time, printed beside the wall-clock one, does not depend on the other jobs.
``--unfused`` adds the student with its LoRA left unfused (``load_arcflow_adapter(fuse=False)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from arcflow.inference.export import split_student_state, student_ema_shapes, write_adapter
from arcflow.models.adapter import AdapterConfig
from arcflow.models.flux.backbone import FLUX_DEV_TRANSFORMER, LORA_TARGETS
from arcflow.models.flux.tiny import make_tiny_flux
from arcflow.pipelines import ArcFluxPipeline

# Published configs of black-forest-labs/FLUX.1-dev's vae/ (its transformer/: FLUX_DEV_TRANSFORMER),
# openai/clip-vit-large-patch14's text tower and google/t5-v1_1-xxl's encoder.
FLUX_DEV_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True)
CLIP_L_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
T5_XXL_ENCODER: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
# The CPU model: FLUX's block structure at width 512, text width of the tiny encoders (32).
SMALL_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 28, 28))

PROMPT = "a photo of a red fox in the snow, sharp focus"


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (no float32 copy of a 12B model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(tiny: Path, device: torch.device, dtype: torch.dtype, full_size: bool) -> ArcFluxPipeline:
    """Random-weight FLUX pipeline; tokenizers (and, for the small model, text encoders and VAE) from ``tiny``."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(tiny, subfolder="tokenizer_2")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler")
    if full_size:
        with torch.device(device), default_dtype(dtype):
            torch.manual_seed(0)
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.eos_token_id)  # pooling must find the tokenizer's EOS
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids))
            text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL_ENCODER))
            vae = AutoencoderKL(**FLUX_DEV_VAE)
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    else:
        text_encoder = CLIPTextModel.from_pretrained(tiny, subfolder="text_encoder", dtype=dtype)
        text_encoder_2 = T5EncoderModel.from_pretrained(tiny, subfolder="text_encoder_2", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae", dtype=dtype)
        torch.manual_seed(0)
        with default_dtype(dtype):
            transformer = FluxTransformer2DModel(**SMALL_TRANSFORMER)
    pipe = ArcFluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    if device.type != "meta":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_random_adapter(transformer: nn.Module, out_dir: Path, num_modes: int, lora_rank: int,
                         dtype: torch.dtype) -> Path:
    """An adapter folder of the exported format with random values, shaped for ``transformer``."""
    generator = torch.Generator().manual_seed(0)
    shapes = student_ema_shapes(transformer, num_modes, lora_rank, LORA_TARGETS)
    ema = {name: torch.randn(shape, generator=generator, dtype=dtype) * 0.02 for name, shape in shapes.items()}
    lora, heads = split_student_state(ema)
    config = AdapterConfig(base_model="random", num_modes=num_modes, shift=3.2, nfe=2, timestep_ratio=1.0,
                           total_substeps=128, guidance=3.5, lora_rank=lora_rank, lora_alpha=float(lora_rank),
                           lora_dropout=0.0, dtype=str(dtype).removeprefix("torch."), iteration=0,
                           max_sequence_length=512, resolutions=((1024, 1024),))
    return write_adapter(out_dir, lora, heads, config)


class ModuleTimer:
    """Seconds spent inside some modules' forwards, and how often they ran (hooks; synchronised on CUDA).

    Both wall-clock and CPU seconds (``time.process_time``, all of this process's threads) are
    counted: on a CPU shared with other jobs the CPU time is the figure that does not depend on them.
    With model CPU offload, a module's move to the GPU happens inside its forward and is counted.
    """

    def __init__(self, modules: list[nn.Module], device: torch.device):
        self.device = device
        self.seconds, self.cpu_seconds, self.calls = 0.0, 0.0, 0
        self._start = (0.0, 0.0)
        self._handles = [handle for module in modules for handle in (
            module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave))]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enter(self, *_: Any) -> None:
        self.sync()
        self._start = (time.perf_counter(), time.process_time())

    def _leave(self, *_: Any) -> None:
        self.sync()
        self.seconds += time.perf_counter() - self._start[0]
        self.cpu_seconds += time.process_time() - self._start[1]
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(pipe: ArcFluxPipeline, device: torch.device, repeats: int, num_inference_steps: int,
            **call: Any) -> dict[str, float]:
    """Median wall time of one image (after a short warm-up), split by component, and peak GPU memory."""
    timers = {"transformer": ModuleTimer([pipe.transformer], device),
              "text_encoders": ModuleTimer([pipe.text_encoder, pipe.text_encoder_2], device),
              "vae_decode": ModuleTimer([pipe.vae.decoder], device)}
    clock = timers["transformer"]
    runs = []
    try:
        pipe(**call, num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for repeat in range(repeats):
            for timer in timers.values():
                timer.seconds, timer.cpu_seconds, timer.calls = 0.0, 0.0, 0
            clock.sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            pipe(**call, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(repeat))
            clock.sync()
            run = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
                   "transformer_calls": clock.calls}
            run.update({f"{name}_seconds": timer.seconds for name, timer in timers.items()})
            run.update({f"{name}_cpu_seconds": timer.cpu_seconds for name, timer in timers.items()})
            runs.append(run)
    finally:
        for timer in timers.values():
            timer.remove()
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["other_seconds"] = result["seconds"] - sum(result[f"{name}_seconds"] for name in timers)
    result["outside_share"] = 1 - result["transformer_seconds"] / result["seconds"]
    result["seconds_per_call"] = result["transformer_seconds"] / result["transformer_calls"]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def table(rows: dict[str, dict[str, float]], cuda: bool) -> str:
    """Seconds per image by component; "other" is the sampler itself (scheduler or policy math) and glue."""
    head = ("| sampler | transformer calls | s / image | CPU s / image | transformer | s / call | text encoders "
            "| VAE decode | other | outside the transformer |")
    lines = [head + (" peak GPU memory (GiB) |" if cuda else ""), "|---" * (10 + cuda) + "|"]
    for name, r in rows.items():
        line = (f"| {name} | {r['transformer_calls']:.0f} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} "
                f"| {r['transformer_seconds']:.3f} "
                f"| {r['seconds_per_call']:.3f} | {r['text_encoders_seconds']:.3f} | {r['vae_decode_seconds']:.3f} "
                f"| {r['other_seconds']:.3f} | {100 * r['outside_share']:.1f} % |")
        lines.append(line + (f" {r['peak_gib']:.1f} |" if cuda else ""))
    return "\n".join(lines)


def weight_gib(pipe: ArcFluxPipeline) -> dict[str, float]:
    """Parameter bytes per component (the resident weights without offloading)."""
    return {name: sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30
            for name, module in pipe.components.items() if isinstance(module, nn.Module)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="FLUX.1-dev architectures, bf16, 1024x1024")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or meta (build only)")
    parser.add_argument("--size", type=int, help="image side (default: 256, or 1024 with --full-size)")
    parser.add_argument("--nfe", type=int, default=2)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed student images (median reported)")
    parser.add_argument("--teacher-repeats", type=int, default=1, help="timed teacher images (median reported)")
    parser.add_argument("--num-modes", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, help="default: 256 (full size), 64 (CPU), 4 (meta)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--unfused", action="store_true", help="also time the student with its LoRA left unfused")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.full_size else torch.float32
    size = args.size or (1024 if args.full_size else 256)
    rank = args.lora_rank or (4 if device.type == "meta" else 256 if args.full_size else 64)

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_flux(Path(tmp) / "tiny", seed=0)
        pipe = build_pipeline(tiny, device, dtype, args.full_size)
        adapter = write_random_adapter(pipe.transformer, Path(tmp) / "adapter", args.num_modes, rank, dtype)
        figures: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads"
                       + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "model": "FLUX.1-dev sizes" if args.full_size else f"small FLUX transformer {SMALL_TRANSFORMER}",
            "image": f"{size}x{size}", "dtype": str(dtype), "lora_rank": rank, "num_modes": args.num_modes,
        }
        if device.type == "meta":  # construction check only: no kernels run on meta
            pipe.load_arcflow_adapter(adapter)
            figures["weights_gib"] = weight_gib(pipe)
            figures["lora_adapted_modules"] = sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
            print(json.dumps(figures, indent=1))
            return figures
        call = dict(prompt=PROMPT, height=size, width=size, output_type="pil")
        rows = {}
        if args.teacher_steps:
            rows[f"teacher, {args.teacher_steps}-step FluxPipeline"] = measure(
                pipe, device, args.teacher_repeats, args.teacher_steps, **call)
        student = f"ArcFlow student, {args.nfe} NFE"
        if args.unfused:  # the LoRA as a diffusers adapter, as before fusing became the default
            pipe.load_arcflow_adapter(adapter, fuse=False)
            rows[student + ", LoRA unfused"] = measure(pipe, device, args.repeats, args.nfe, **call)
            pipe.unload_arcflow_adapter()
        pipe.load_arcflow_adapter(adapter)
        figures["weights_gib"] = weight_gib(pipe)
        rows[student] = measure(pipe, device, args.repeats, args.nfe, **call)
        if device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
            torch.cuda.empty_cache()
            rows[student + ", model CPU offload"] = measure(pipe, device, args.repeats, args.nfe, **call)
    figures["rows"] = rows
    print(f"{figures['machine']}\n{figures['model']}, {figures['image']}, {dtype}, K={args.num_modes}, "
          f"LoRA rank {rank}\n")
    print(table(rows, device.type == "cuda"))
    if args.teacher_steps:
        teacher = rows[f"teacher, {args.teacher_steps}-step FluxPipeline"]
        print()
        for name, row in rows.items():
            if name.startswith("teacher"):
                continue
            wall, cpu = teacher["seconds"] / row["seconds"], teacher["cpu_seconds"] / row["cpu_seconds"]
            if name == student:
                figures["speedup"], figures["speedup_cpu_time"] = wall, cpu
            print(f"speed-up of the {name}: {wall:.1f}x wall-clock, {cpu:.1f}x CPU time "
                  f"(transformer calls alone: {args.teacher_steps / args.nfe:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
