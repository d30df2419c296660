"""Train a small FLUX-architecture teacher on the synthetic scenes, offline (GPU in minutes, 2-core CPU in ~80).

Distillation can only be judged on a teacher whose trajectories carry something to learn,
so the demo ships one trained here: the tiny frozen CLIP/T5 (and tokenizers) of
:mod:`arcflow.models.flux.tiny`, a 16-channel 8x-downsampling ``AutoencoderKL`` trained on the
rendered scenes, and a ``FluxTransformer2DModel`` trained by rectified flow matching on its
latents and then guidance-distilled (like FLUX.1-dev), all written as a ``FluxPipeline`` folder.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import Tensor

from arcflow.demo.synthetic import accuracies, make_scene, scene_batch
from arcflow.method.schedule import shifted_sigma
from arcflow.models.base import pack, unpack
from arcflow.models.flux.backbone import latent_image_ids
from arcflow.models.flux.text_encoder import PretrainedFluxTextEncoder
from arcflow.models.flux.tiny import CLIP_HIDDEN_SIZE, T5_D_MODEL, make_tiny_flux

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
    mixed_precision: bool = True  # bf16 autocast for the training passes (weights, optimiser, EMA stay fp32)
    num_images: int = 12000
    max_sequence_length: int = 32
    # Autoencoder.
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_steps: int = 6000
    vae_batch_size: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-4
    vae_norm_groups: int = 8
    # Transformer.
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    teacher_steps: int = 6000
    teacher_batch_size: int = 64
    teacher_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    shift: float = 3.2
    caption_dropout: float = 0.1
    # Guidance distillation (how FLUX.1-dev got its guidance input): a copy of the teacher learns
    # to output the classifier-free-guided velocity for the guidance value it is given.
    guidance_steps: int = 2000
    guidance_lr: float = 3e-4
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


def _autocast(recipe: TeacherRecipe, device: torch.device) -> torch.autocast:
    """bf16 autocast when the recipe asks for it (VAE steps 0.65 s -> 0.35 s on a 2-core CPU with AMX)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.mixed_precision)


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
        with _autocast(recipe, device):
            posterior = vae.encode(batch).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents = posterior.mean + posterior.std * noise
            recon = vae.decode(latents).sample.float()
        rec = _reconstruction_loss(recon, batch)
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        loss = rec + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # an unclipped run diverged once at lr 1e-3
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


def _noisy_latents(x0: Tensor, recipe: TeacherRecipe, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC §1 rectified flow: (x_sigma, sigma, eps) with x_sigma = (1 - sigma) x0 + sigma eps.

    tau is uniform and mapped through the shift-3.2 schedule, so noise levels are drawn with
    the density the Euler samplers visit them.
    """
    b = x0.shape[0]
    sigma = shifted_sigma(torch.rand(b, generator=generator), recipe.shift).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.view(b, 1, 1, 1)
    return (1 - s) * x0 + s * eps, sigma, eps


def velocity(transformer: FluxTransformer2DModel, x: Tensor, sigma: Tensor, text: Tensor, pooled: Tensor,
             guidance: Tensor) -> Tensor:
    """The transformer's velocity on (B, 16, h, w) latents: FLUX's packing and position ids around the call."""
    h, w = x.shape[-2:]
    prediction = transformer(
        hidden_states=pack(x),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=latent_image_ids(h, w, x.device),
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
        guidance=guidance,
        return_dict=False,
    )[0]
    return unpack(prediction, h, w)[:, 0]


def flow_matching_loss(transformer: FluxTransformer2DModel, x0: Tensor, text: Tensor, pooled: Tensor,
                       recipe: TeacherRecipe, generator: torch.Generator,
                       null: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Regress u = eps - x0 at x_sigma, with guidance input 1 (unguided).

    With ``null`` (the embedded empty caption), a ``caption_dropout`` fraction of the batch is
    trained unconditionally, so classifier-free guidance exists for :func:`guidance_distillation_loss`.
    """
    x_sigma, sigma, eps = _noisy_latents(x0, recipe, generator)
    if null is not None:
        drop = (torch.rand(len(x0), generator=generator) < recipe.caption_dropout).to(x0.device)
        text = torch.where(drop.view(-1, 1, 1), null[0], text)
        pooled = torch.where(drop.view(-1, 1), null[1], pooled)
    prediction = velocity(transformer, x_sigma, sigma, text, pooled, torch.ones_like(sigma))
    return (prediction - (eps - x0)).pow(2).mean()


def guidance_distillation_loss(student: FluxTransformer2DModel, teacher: FluxTransformer2DModel, x0: Tensor,
                               text: Tensor, pooled: Tensor, null: tuple[Tensor, Tensor], recipe: TeacherRecipe,
                               generator: torch.Generator) -> Tensor:
    """The student, told guidance g, regresses the teacher's CFG velocity v_null + g (v_text - v_null)."""
    x_sigma, sigma, _ = _noisy_latents(x0, recipe, generator)
    low, high = recipe.guidance_range
    guidance = (low + (high - low) * torch.rand(len(x0), generator=generator)).to(x0.device)
    with torch.no_grad():
        both = velocity(teacher, torch.cat([x_sigma, x_sigma]), torch.cat([sigma, sigma]),
                        torch.cat([text, null[0].expand_as(text)]), torch.cat([pooled, null[1].expand_as(pooled)]),
                        torch.ones(2 * len(x0), device=x0.device))
        conditional, unconditional = both.chunk(2)
        target = unconditional + guidance.view(-1, 1, 1, 1) * (conditional - unconditional)
    return (velocity(student, x_sigma, sigma, text, pooled, guidance) - target).pow(2).mean()


def _train_with_ema(model: FluxTransformer2DModel, loss_of_batch: Callable[[Tensor], Tensor], steps: int,
                    lr: float, recipe: TeacherRecipe, generator: torch.Generator, latent_count: int,
                    name: str, log: Log) -> FluxTransformer2DModel:
    """AdamW with warm-up + cosine, gradient clipping and an EMA; returns ``model`` holding the EMA weights.

    ``loss_of_batch`` gets the indices of a random batch of training images.
    """
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.perf_counter()
    running = torch.zeros((), device=params[0].device)  # smoothed loss, read only when logged (no sync)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, recipe.warmup_steps, steps)
        with _autocast(recipe, params[0].device):
            loss = loss_of_batch(torch.randint(latent_count, (recipe.teacher_batch_size,), generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running = running.lerp(loss.detach(), 0.02 if step else 1.0)
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} step {step} loss {running.item():.4f} ({time.perf_counter() - start:.0f}s)")
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    return model.eval().requires_grad_(False)


def train_transformer(latent_mean: Tensor, latent_std: Tensor, text: Tensor, pooled: Tensor,
                      null: tuple[Tensor, Tensor], recipe: TeacherRecipe, log: Log = print) -> FluxTransformer2DModel:
    """Flow matching with caption dropout, then guidance distillation; returns the EMA weights of the latter.

    The first stage is a conditional + unconditional model (guidance input fixed at 1); the
    second teaches a copy of it what the guidance input means, as FLUX.1-dev's was taught, so
    the teacher follows its prompts at the distillation's guidance 3.5 in a single pass.
    """
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 1)
        transformer = build_transformer(recipe).to(latent_mean.device)

    def batch(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Latents sampled from the images' posteriors, with their captions' embeddings."""
        noise = torch.randn((len(index), *latent_mean.shape[1:]), generator=generator).to(latent_mean.device)
        index = index.to(latent_mean.device)
        return latent_mean[index] + latent_std[index] * noise, text[index], pooled[index]

    def flow_matching(index: Tensor) -> Tensor:
        return flow_matching_loss(transformer, *batch(index), recipe, generator, null)

    unguided = _train_with_ema(transformer, flow_matching, recipe.teacher_steps, recipe.teacher_lr, recipe,
                               generator, len(latent_mean), "teacher", log)
    if not recipe.guidance_steps:
        return unguided
    student = copy.deepcopy(unguided).train().requires_grad_(True)

    def guidance_distillation(index: Tensor) -> Tensor:
        return guidance_distillation_loss(student, unguided, *batch(index), null, recipe, generator)

    return _train_with_ema(student, guidance_distillation, recipe.guidance_steps, recipe.guidance_lr, recipe,
                           generator, len(latent_mean), "guidance", log)


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
    write_demo_prompts(directory / "prompts.jsonl", _recipe_of(record))


def _train_on_vae(vae: AutoencoderKL, text_source: pathlib.Path, recipe: TeacherRecipe, log: Log,
                  device: torch.device) -> FluxTransformer2DModel:
    """Encode the training scenes and their captions, then train the transformer on them."""
    images, scenes = scene_batch(recipe.seed, 0, recipe.num_images, recipe.image_size)
    mean, std = encode_latents(vae, images)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    latent_mean, latent_std = (mean - shift) * scale, std * scale
    encoder = PretrainedFluxTextEncoder(text_source, recipe.max_sequence_length, torch.float32)
    captions = sorted({s.caption for s in scenes})
    embedded = encoder.encode(captions + [""])  # the last row is the empty caption of guidance
    row = {caption: i for i, caption in enumerate(captions)}
    index = torch.tensor([row[s.caption] for s in scenes])
    text = embedded["prompt_embeds"][index].to(device)
    pooled = embedded["pooled_prompt_embeds"][index].to(device)
    null = (embedded["prompt_embeds"][-1:].to(device), embedded["pooled_prompt_embeds"][-1:].to(device))
    return train_transformer(latent_mean, latent_std, text, pooled, null, recipe, log)


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
        transformer = _train_on_vae(vae, text_source, recipe, log, device)
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
    record = _read_record(directory)
    recipe = _recipe_of(record)
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
        with _autocast(recipe, device):
            recon = vae.decode(mean[index] + std[index] * noise).sample.float()
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
    _swap_in(vae, directory / "vae")
    stage = {
        "stage": "finetune_decoder", "steps": steps, "lr": lr, "batch_size": batch_size, "command": command,
        "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
        "device": _device_name(device),
        "reconstruction_before": before, "reconstruction_after": after,
    }
    _append_stage(directory, record, stage)
    return stage


def retrain_transformer(pipeline_dir: str | pathlib.Path, overrides: dict[str, object], command: str = "",
                        log: Log = print, device: torch.device = CPU) -> dict[str, object]:
    """Train the transformer of an existing teacher folder again from scratch on its VAE, in place.

    The VAE (so its latent space) and the text encoders are kept; ``overrides`` change
    transformer fields of the recorded recipe, and the new recipe replaces the old one in
    ``training.json``. The transformer is swapped in only when training is done.
    """
    directory = pathlib.Path(pipeline_dir)
    record = _read_record(directory)
    recipe = replace(_recipe_of(record), **overrides)
    vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=torch.float32).to(device).eval()
    start = time.perf_counter()
    transformer = _train_on_vae(vae, directory, recipe, log, device)
    _swap_in(transformer, directory / "transformer")
    record["recipe"] = asdict(recipe)
    stage = {"stage": "retrain_transformer", "overrides": overrides, "command": command,
             "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
             "device": _device_name(device)}
    _append_stage(directory, record, stage)
    return stage


def _read_record(directory: pathlib.Path) -> dict[str, object]:
    path = directory / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a teacher folder written by train_demo_teacher")
    return json.loads(path.read_text(encoding="utf-8"))


def _recipe_of(record: dict[str, object]) -> TeacherRecipe:
    """The recorded recipe; fields added since it was written take their defaults."""
    return TeacherRecipe(**{key: tuple(value) if isinstance(value, list) else value
                            for key, value in record["recipe"].items()})


def _swap_in(model: AutoencoderKL | FluxTransformer2DModel, target: pathlib.Path) -> None:
    """Save ``model`` in fp16 beside ``target``, then replace ``target`` by renames (never half-written)."""
    staged, retired = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(staged, ignore_errors=True)
    model.to(torch.float16).save_pretrained(staged)
    target.rename(retired)
    staged.rename(target)
    shutil.rmtree(retired)


def _append_stage(directory: pathlib.Path, record: dict[str, object], stage: dict[str, object]) -> None:
    """Record a later training stage in ``training.json`` (atomically): the folder's full history, in order."""
    record.setdefault("stages", []).append(stage)
    partial = directory / ".training.json.tmp"
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.rename(directory / "training.json")
