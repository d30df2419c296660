"""Teacher training: a 2-step smoke run writes a pipeline that FluxPipeline and the backbone load."""

from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from arcflow.demo import synthetic
from arcflow.demo.teacher_training import (EVAL_SEED, TeacherRecipe, build_transformer, finetune_decoder,
                                           flow_matching_loss, guidance_distillation_loss, reconstruction_accuracy,
                                           retrain_transformer, train_demo_teacher)
from arcflow.method.sampling import sample_teacher
from arcflow.models.base import pack
from arcflow.models.flux.backbone import FluxBackbone

SHIPPED = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"
TINY = TeacherRecipe(num_images=8, vae_channels=(8, 8, 8, 8), vae_steps=2, vae_batch_size=2, teacher_steps=2,
                     guidance_steps=2, teacher_batch_size=2, num_attention_heads=2, attention_head_dim=16,
                     warmup_steps=1)


def _check_pipeline(folder: pathlib.Path) -> None:
    """Loads as FluxPipeline, samples a 64x64 image, and works as the distillation backbone."""
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    image = pipe("a red circle on the left on a white background", height=64, width=64, num_inference_steps=1,
                 max_sequence_length=32, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    backbone = FluxBackbone.from_pretrained(str(folder), torch_dtype=torch.float32, num_modes=2, lora_rank=2,
                                            compute_dtype=torch.float32)
    cond = {"prompt_embeds": torch.randn(1, 32, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
    latents = sample_teacher(backbone, torch.randn(1, 16, 8, 8), cond, 2, 3.2)
    assert torch.isfinite(latents).all()


def test_two_step_teacher_training_smoke(tmp_path: pathlib.Path) -> None:
    out = train_demo_teacher(tmp_path / "teacher", TINY, command="pytest", log=lambda message: None)
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "pytest" and record["recipe"]["teacher_steps"] == 2
    assert set(record["vae_reconstruction"]) == {"prompt", "colour", "shape", "mse"}
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert prompts[-1]["height"] == 64 and len(prompts) > 8
    assert not list(tmp_path.glob(".teacher.*"))  # staging folder cleaned up
    _check_pipeline(out)
    with pytest.raises(ValueError, match="not empty"):
        train_demo_teacher(out, TINY, log=lambda message: None)


def test_flow_matching_loss_is_zero_for_the_exact_velocity() -> None:
    """The regression target is eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps: an oracle scores 0."""
    recipe = TeacherRecipe(num_attention_heads=2, attention_head_dim=16)
    transformer = build_transformer(recipe)
    x0 = torch.randn(3, 16, 8, 8)
    text, pooled = torch.randn(3, 32, 32), torch.randn(3, 32)
    pack_x0 = pack(x0)
    captured: dict[str, torch.Tensor] = {}

    def oracle(hidden_states: torch.Tensor, timestep: torch.Tensor, **_: object) -> tuple[torch.Tensor]:
        sigma = timestep.view(-1, 1, 1)
        captured["sigma"] = timestep
        eps = (hidden_states - (1 - sigma) * pack_x0) / sigma
        return (eps - pack_x0,)

    transformer.forward = oracle
    loss = flow_matching_loss(transformer, x0, text, pooled, recipe, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    assert ((captured["sigma"] > 0) & (captured["sigma"] < 1)).all()


def test_caption_dropout_swaps_in_the_empty_caption() -> None:
    """Dropped rows see the null embedding, kept rows their own; the guidance input is always 1."""
    transformer = build_transformer(TeacherRecipe(num_attention_heads=2, attention_head_dim=16))
    seen: dict[str, torch.Tensor] = {}

    def spy(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
            guidance: torch.Tensor, **_: object) -> tuple[torch.Tensor]:
        seen.update(text=encoder_hidden_states, pooled=pooled_projections, guidance=guidance)
        return (torch.zeros_like(hidden_states),)

    transformer.forward = spy
    text, pooled = torch.randn(64, 32, 32), torch.randn(64, 32)
    null = (torch.full((1, 32, 32), 7.0), torch.full((1, 32), 7.0))
    for dropout, expected in ((0.0, 0), (1.0, 64)):
        flow_matching_loss(transformer, torch.randn(64, 16, 8, 8), text, pooled,
                           TeacherRecipe(caption_dropout=dropout), torch.Generator().manual_seed(0), null)
        dropped = (seen["text"] == 7.0).flatten(1).all(1)
        assert int(dropped.sum()) == expected and bool(((seen["pooled"] == 7.0).all(1) == dropped).all())
        assert torch.equal(seen["text"][~dropped], text[~dropped]) and bool((seen["guidance"] == 1).all())
    flow_matching_loss(transformer, torch.randn(64, 16, 8, 8), text, pooled, TeacherRecipe(caption_dropout=0.25),
                       torch.Generator().manual_seed(0), null)
    assert 4 <= int((seen["text"] == 7.0).flatten(1).all(1).sum()) <= 28


def test_guidance_distillation_target_is_classifier_free_guidance() -> None:
    """A student computing v_null + g (v_text - v_null) from a known teacher scores 0; a wrong formula does not."""
    recipe = TeacherRecipe(num_attention_heads=2, attention_head_dim=16)

    def teacher_velocity(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * encoder_hidden_states.mean((1, 2)).view(-1, 1, 1) + encoder_hidden_states[:, :1, :1]

    teacher, student = build_transformer(recipe), build_transformer(recipe)
    teacher.forward = lambda hidden_states, encoder_hidden_states, guidance, **_: (
        teacher_velocity(hidden_states, encoder_hidden_states) * guidance.view(-1, 1, 1),)  # must be told g = 1
    null = (torch.randn(1, 32, 32), torch.randn(1, 32))

    def cfg(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, guidance: torch.Tensor,
            **_: object) -> tuple[torch.Tensor]:
        conditional = teacher_velocity(hidden_states, encoder_hidden_states)
        unconditional = teacher_velocity(hidden_states, null[0].expand_as(encoder_hidden_states))
        return (unconditional + guidance.view(-1, 1, 1) * (conditional - unconditional),)

    student.forward = cfg
    text, pooled, x0 = torch.randn(5, 32, 32), torch.randn(5, 32), torch.randn(5, 16, 8, 8)
    loss = guidance_distillation_loss(student, teacher, x0, text, pooled, null, recipe, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    student.forward = lambda guidance, **kwargs: cfg(guidance=guidance + 0.5, **kwargs)
    assert guidance_distillation_loss(student, teacher, x0, text, pooled, null, recipe,
                                      torch.Generator().manual_seed(0)).item() > 1e-3


def test_retrain_transformer_keeps_the_vae(tmp_path: pathlib.Path) -> None:
    out = train_demo_teacher(tmp_path / "teacher", TINY, command="pytest", log=lambda message: None)
    vae = (out / "vae/diffusion_pytorch_model.safetensors").read_bytes()
    before = load_file(out / "transformer/diffusion_pytorch_model.safetensors")
    entry = retrain_transformer(out, {"teacher_steps": 3, "guidance_steps": 2}, command="again",
                                log=lambda message: None)
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == vae
    after = load_file(out / "transformer/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    record = json.loads((out / "training.json").read_text())
    assert record["recipe"]["teacher_steps"] == 3 and record["recipe"]["guidance_steps"] == 2
    assert record["stages"] == [entry] and entry["command"] == "again" and record["command"] == "pytest"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    _check_pipeline(out)


def test_decoder_finetune_keeps_the_latent_space(tmp_path: pathlib.Path) -> None:
    out = train_demo_teacher(tmp_path / "teacher", TINY, command="pytest", log=lambda message: None)
    before = load_file(out / "vae/diffusion_pytorch_model.safetensors")
    transformer = (out / "transformer/diffusion_pytorch_model.safetensors").read_bytes()
    entry = finetune_decoder(out, steps=2, batch_size=2, command="ft", log=lambda message: None)
    after = load_file(out / "vae/diffusion_pytorch_model.safetensors")
    assert set(before) == set(after)
    assert all(torch.equal(before[name], after[name]) for name in before if not name.startswith("decoder."))
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("decoder."))
    assert (out / "transformer/diffusion_pytorch_model.safetensors").read_bytes() == transformer
    record = json.loads((out / "training.json").read_text())
    assert record["stages"] == [entry] and entry["command"] == "ft" and entry["steps"] == 2
    assert record["command"] == "pytest"  # the original training is still described
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing half-written left
    _check_pipeline(out)


def test_reconstruction_accuracy_is_perfect_for_an_identity_autoencoder() -> None:
    """The accuracy check itself, on an 'autoencoder' that returns its input: detector on clean renders."""
    class Identity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x, std=torch.zeros_like(x)))

        def decode(self, z: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(sample=z)

    scores = reconstruction_accuracy(Identity(), 64, num_scenes=32)
    assert scores["prompt"] == scores["colour"] == scores["shape"] == 1.0
    assert scores["mse"] < 1e-4  # only the uint8 round trip


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="no shipped demo teacher")
def test_shipped_demo_teacher_loads() -> None:
    record = json.loads((SHIPPED / "training.json").read_text())
    assert "train_demo_teacher.py" in record["command"]
    _check_pipeline(SHIPPED)


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="no shipped demo teacher")
def test_shipped_demo_teacher_follows_prompts_in_diffusers() -> None:
    """diffusers' own FluxPipeline (its scheduler, guidance 3.5) draws the held-out captions' colour and shape."""
    pipe = FluxPipeline.from_pretrained(SHIPPED, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = [synthetic.make_scene(EVAL_SEED, index) for index in range(16)]
    images = pipe([scene.caption for scene in scenes], height=64, width=64, num_inference_steps=20,
                  guidance_scale=3.5, max_sequence_length=32, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    scores = synthetic.accuracies(scenes, list((images * 255).round().astype(np.uint8)))
    assert scores["prompt"] >= 0.8 and scores["colour"] >= 0.9, scores
