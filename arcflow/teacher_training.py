"""Train a small FLUX-architecture teacher on the synthetic scenes, offline (GPU in minutes, CPU in about an hour).

Distillation can only be judged on a teacher whose trajectories carry something to learn,
so the demo ships one trained here: the tiny frozen CLIP/T5 (and tokenizers) of
:mod:`arcflow.tiny_flux`, a 16-channel 8x-downsampling ``AutoencoderKL`` trained on the
rendered scenes, and a ``FluxTransformer2DModel`` trained by rectified flow matching on its
latents, all written as a ``FluxPipeline`` folder.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import Tensor

from arcflow.backbones.flux import latent_image_ids, pack, unpack
from arcflow.schedule import shifted_sigma
from arcflow.synthetic import accuracies, make_scene, scene_batch
from arcflow.text_encoders import PretrainedFluxTextEncoder
from arcflow.tiny_flux import CLIP_HIDDEN_SIZE, T5_D_MODEL, make_tiny_flux

# The text side is reused unchanged from the tiny random FLUX (its tokenizers know every
# content word of the captions); only the VAE and the transformer are trained.
_TEXT_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "scheduler", "model_index.json")

Log = Callable[[str], None]
CPU = torch.device("cpu")
EVAL_SEED = 1
"""Scene set of held-out evaluation (validation prompts, the distillation table); training uses ``recipe.seed``."""


@dataclass
class TeacherRecipe:
    """Every knob of the shipped teacher; saved beside the weights as ``training.json``."""

    seed: int = 0
    image_size: int = 64
    num_images: int = 12000
    max_sequence_length: int = 32
    # Autoencoder.
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    vae_norm_groups: int = 8
    # Transformer.
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    teacher_steps: int = 5000
    teacher_batch_size: int = 64
    teacher_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    shift: float = 3.2
    guidance_range: tuple[float, float] = (1.0, 5.0)


def build_vae(recipe: TeacherRecipe) -> AutoencoderKL:
    """FLUX's autoencoder layout (16 latent channels, three down-samplings = 8x) at tiny width."""
    levels = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=recipe.vae_norm_groups,
        sample_size=recipe.image_size,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def build_transformer(recipe: TeacherRecipe) -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer (guidance-embedded, RoPE over 3 axes) at small width and depth."""
    head_dim = recipe.attention_head_dim
    spatial = 3 * head_dim // 8
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=recipe.num_layers,
        num_single_layers=recipe.num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=recipe.num_attention_heads,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN_SIZE,
        guidance_embeds=True,
        axes_dims_rope=(head_dim - 2 * spatial, spatial, spatial),
    )


def _to_unit_range(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%: a short run still ends on a settled model."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """L1 + MSE: L1 keeps edges sharp, MSE punishes the large colour errors."""
    return (recon - target).abs().mean() + (recon - target).pow(2).mean()


def train_vae(images: np.ndarray, recipe: TeacherRecipe, log: Log = print,
              device: torch.device = CPU) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) with a small KL term; then set FLUX's scaling/shift from the latents.

    The KL weight only keeps the posterior from collapsing to points; the latents are then
    standardised by ``shift_factor``/``scaling_factor`` exactly as FLUX's pipeline expects.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vae = build_vae(recipe).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    data = _to_unit_range(images).to(device)
    start = time.perf_counter()
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * _lr_factor(step, recipe.warmup_steps, recipe.vae_steps)
        batch = data[torch.randint(len(data), (recipe.vae_batch_size,), generator=generator).to(device)]
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise
        recon = vae.decode(latents).sample
        rec = _reconstruction_loss(recon, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step} rec {rec.item():.4f} kl/elem {kl.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    mean, _ = encode_latents(vae, images[:2048])
    vae.register_to_config(shift_factor=float(mean.mean()), scaling_factor=float(1.0 / mean.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image, raw (before FLUX's shift/scale), on the VAE's device."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for begin in range(0, len(images), batch_size):
        posterior = vae.encode(_to_unit_range(images[begin:begin + batch_size]).to(device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, image_size: int, num_scenes: int = 256) -> dict[str, float]:
    """The scene detector on VAE reconstructions of held-out renders: the ceiling of the teacher's accuracy.

    A teacher can only draw what its decoder can draw, so this is checked before the
    (much longer) transformer training is worth running.
    """
    images, scenes = scene_batch(EVAL_SEED, 0, num_scenes, image_size)
    mean, _ = encode_latents(vae, images)
    decoded = torch.cat([vae.decode(mean[begin:begin + 256]).sample for begin in range(0, len(mean), 256)])
    pixels = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    found = accuracies(scenes, list(pixels))
    return {
        **{key: found[key] for key in ("prompt", "colour", "shape")},
        "mse": float(((torch.from_numpy(pixels).float() - torch.from_numpy(images).float()) / 127.5).pow(2).mean()),
    }


def flow_matching_loss(transformer: FluxTransformer2DModel, x0: Tensor, text: Tensor, pooled: Tensor,
                       recipe: TeacherRecipe, generator: torch.Generator) -> Tensor:
    """SPEC §1 rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, regress u = eps - x0.

    tau is uniform and mapped through the shift-3.2 schedule, so noise levels are drawn with
    the density the Euler samplers visit them; guidance is random because no guided target
    exists here: the model learns to accept FLUX-dev's guidance input without depending on it.
    """
    b, _, h, w = x0.shape
    device = x0.device
    sigma = shifted_sigma(torch.rand(b, generator=generator), recipe.shift).to(device)
    eps = torch.randn(x0.shape, generator=generator).to(device)
    s = sigma.view(b, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    low, high = recipe.guidance_range
    guidance = (low + (high - low) * torch.rand(b, generator=generator)).to(device)
    prediction = transformer(
        hidden_states=pack(x_sigma),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=latent_image_ids(h, w, x0.device),
        txt_ids=torch.zeros(text.shape[1], 3, device=device),
        guidance=guidance,
        return_dict=False,
    )[0]
    return (unpack(prediction, h, w)[:, 0] - (eps - x0)).pow(2).mean()


def train_transformer(latent_mean: Tensor, latent_std: Tensor, text: Tensor, pooled: Tensor,
                      recipe: TeacherRecipe, log: Log = print) -> FluxTransformer2DModel:
    """Flow matching on standardised VAE samples; returns the EMA weights (what samples best)."""
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 1)
        transformer = build_transformer(recipe).to(latent_mean.device)
    params = list(transformer.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=recipe.teacher_lr, betas=(0.9, 0.99),
                                  weight_decay=0.0)
    start = time.perf_counter()
    running = torch.zeros((), device=latent_mean.device)  # smoothed loss, read only when logged (no sync)
    for step in range(recipe.teacher_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.teacher_lr * _lr_factor(step, recipe.warmup_steps, recipe.teacher_steps)
        index = torch.randint(len(latent_mean), (recipe.teacher_batch_size,), generator=generator)
        noise = torch.randn((len(index), *latent_mean.shape[1:]), generator=generator).to(latent_mean.device)
        index = index.to(latent_mean.device)
        x0 = latent_mean[index] + latent_std[index] * noise
        loss = flow_matching_loss(transformer, x0, text[index], pooled[index], recipe, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running = running.lerp(loss.detach(), 0.02 if step else 1.0)
        if step % 250 == 0 or step == recipe.teacher_steps - 1:
            log(f"teacher step {step} loss {running.item():.4f} ({time.perf_counter() - start:.0f}s)")
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    return transformer.eval().requires_grad_(False)


def _device_name(device: torch.device) -> str:
    """What ``training.json`` records as the device: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_demo_prompts(path: pathlib.Path, recipe: TeacherRecipe, num_val: int = 8) -> None:
    """Distillation prompts: every distinct training caption (sorted), then ``num_val`` held-out ones last.

    The demo config takes the last ``num_val`` lines as validation prompts (``end_ind=-8``).
    """
    train = sorted({make_scene(recipe.seed, index).caption for index in range(recipe.num_images)})
    val = [make_scene(EVAL_SEED, index).caption for index in range(num_val)]
    size = recipe.image_size
    lines = [json.dumps({"prompt": caption, "height": size, "width": size}) for caption in train + val]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_pipeline(directory: pathlib.Path, text_source: pathlib.Path, vae: AutoencoderKL,
                    transformer: FluxTransformer2DModel, record: dict[str, object]) -> None:
    """The FluxPipeline folder (text parts copied, VAE and transformer in fp16) plus the demo's prompts."""
    for part in _TEXT_PARTS:
        source = text_source / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, directory / part)
    vae.to(torch.float16).save_pretrained(directory / "vae")
    transformer.to(torch.float16).save_pretrained(directory / "transformer")
    (directory / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_demo_prompts(directory / "prompts.jsonl", TeacherRecipe(**record["recipe"]))


def train_demo_teacher(out_dir: str | pathlib.Path, recipe: TeacherRecipe, command: str = "",
                       log: Log = print, device: torch.device = CPU) -> pathlib.Path:
    """Render the data, train VAE then transformer, and write the pipeline folder atomically.

    Random draws come from CPU generators on every device, so a GPU run sees the same data,
    noise and guidance as a CPU run; only floating-point rounding differs.
    """
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"train_demo_teacher: {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        started = time.perf_counter()
        text_source = make_tiny_flux(staging / "text_source", seed=recipe.seed)
        images, scenes = scene_batch(recipe.seed, 0, recipe.num_images, recipe.image_size)
        log(f"rendered {len(scenes)} scenes ({len({s.caption for s in scenes})} distinct captions)")

        vae = train_vae(images, recipe, log, device)
        vae_seconds = time.perf_counter() - started
        reconstruction = reconstruction_accuracy(vae, recipe.image_size)
        log(f"vae reconstructions of held-out scenes: {json.dumps(reconstruction)}")
        mean, std = encode_latents(vae, images)
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor
        latent_mean, latent_std = (mean - shift) * scale, std * scale

        encoder = PretrainedFluxTextEncoder(text_source, recipe.max_sequence_length, torch.float32)
        captions = sorted({s.caption for s in scenes})
        embedded = encoder.encode(captions)
        row = {caption: i for i, caption in enumerate(captions)}
        index = torch.tensor([row[s.caption] for s in scenes])
        text = embedded["prompt_embeds"][index].to(device)
        pooled = embedded["pooled_prompt_embeds"][index].to(device)

        transformer = train_transformer(latent_mean, latent_std, text, pooled, recipe, log)
        record = {
            "recipe": asdict(recipe),
            "command": command,
            "vae_seconds": round(vae_seconds, 1),
            "vae_reconstruction": reconstruction,
            "total_seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads(),
            "device": _device_name(device),
        }
        final = staging / "pipeline"
        final.mkdir()
        _write_pipeline(final, text_source, vae, transformer, record)
        final.chmod(0o755)
        if out.exists():
            out.rmdir()
        final.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out}")
    return out


def finetune_decoder(pipeline_dir: str | pathlib.Path, steps: int, lr: float = 3e-4, batch_size: int = 32,
                     command: str = "", log: Log = print, device: torch.device = CPU) -> dict[str, object]:
    """Train only the VAE decoder of an existing teacher folder, in place, and record it in ``training.json``.

    The encoder (hence the latent space, ``shift_factor``/``scaling_factor`` and the
    transformer trained on it) is untouched, so the teacher stays valid while its samples
    decode sharper (the way Stable Diffusion's ft-MSE decoder was made). Weights are swapped
    in only when training is done.
    """
    directory = pathlib.Path(pipeline_dir)
    record = json.loads((directory / "training.json").read_text(encoding="utf-8"))
    recipe = TeacherRecipe(**{key: tuple(value) if isinstance(value, list) else value
                              for key, value in record["recipe"].items()})
    vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=torch.float32).to(device).eval()
    before = reconstruction_accuracy(vae, recipe.image_size)
    log(f"decoder fine-tune: reconstructions before {json.dumps(before)}")
    images, _ = scene_batch(recipe.seed, 0, recipe.num_images, recipe.image_size)
    mean, std = encode_latents(vae, images)
    data = _to_unit_range(images).to(device)
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    vae.decoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, min(100, steps // 10 + 1), steps)
        index = torch.randint(len(data), (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *mean.shape[1:]), generator=generator).to(device)
        index = index.to(device)
        recon = vae.decode(mean[index] + std[index] * noise).sample
        loss = _reconstruction_loss(recon, data[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"decoder step {step} rec {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    after = reconstruction_accuracy(vae, recipe.image_size)
    log(f"decoder fine-tune: reconstructions after {json.dumps(after)}")
    staged = directory / ".vae.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    vae.to(torch.float16).save_pretrained(staged)
    retired = directory / ".vae.old"
    (directory / "vae").rename(retired)
    staged.rename(directory / "vae")
    shutil.rmtree(retired)
    record["decoder_finetune"] = {
        "steps": steps, "lr": lr, "batch_size": batch_size, "command": command,
        "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
        "device": _device_name(device),
        "reconstruction_before": before, "reconstruction_after": after,
    }
    partial = directory / ".training.json.tmp"
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.rename(directory / "training.json")
    return record["decoder_finetune"]

