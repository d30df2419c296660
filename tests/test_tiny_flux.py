"""The tiny FLUX pipeline must load like FLUX.1-dev, be reproducible and have a live teacher."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, T5EncoderModel

from arcflow.models.flux.tiny import make_tiny_flux

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _digests(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file below ``root``, keyed by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_matches_flux_dev(tiny_flux_dir: pathlib.Path) -> None:
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_flux_dir / name).is_dir(), name
    assert sum(path.stat().st_size for path in tiny_flux_dir.rglob("*") if path.is_file()) < 4_000_000
    scheduler = json.loads((tiny_flux_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0 and scheduler["use_dynamic_shifting"] is True
    assert (scheduler["base_shift"], scheduler["max_shift"]) == (0.5, 1.15)
    assert (scheduler["base_image_seq_len"], scheduler["max_image_seq_len"]) == (256, 4096)


@pytest.mark.parametrize(
    ("model_class", "subfolder"),
    [
        (FluxTransformer2DModel, "transformer"),
        (AutoencoderKL, "vae"),
        (CLIPTextModel, "text_encoder"),
        (T5EncoderModel, "text_encoder_2"),
    ],
)
def test_weights_match_architecture(tiny_flux_dir: pathlib.Path, model_class: type, subfolder: str) -> None:
    _, info = model_class.from_pretrained(tiny_flux_dir, subfolder=subfolder, output_loading_info=True)
    assert not any(info.values()), info


def test_pipeline_generates_requested_size(tiny_flux_dir: pathlib.Path) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    assert pipe.vae_scale_factor == 8
    images = pipe(
        prompt=["a red cube on a blue table", "two cats"],
        height=64,
        width=48,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 64, 48, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0


def test_teacher_output_depends_on_inputs(tiny_flux_dir: pathlib.Path) -> None:
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 64, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=-1).float()

    def velocity(text: torch.Tensor, timestep: float) -> torch.Tensor:
        with torch.no_grad():
            return transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=torch.tensor([timestep]),
                guidance=torch.tensor([3.5]),
                img_ids=img_ids,
                txt_ids=torch.zeros(8, 3),
            ).sample

    base = velocity(text, 0.5)
    assert base.shape == latents.shape
    assert 0.1 < base.std().item() < 3.0
    assert (base - velocity(torch.zeros_like(text), 0.5)).abs().mean() > 0.05
    assert (base - velocity(text, 0.9)).abs().mean() > 0.05


def test_same_seed_same_bytes_other_seed_other_weights(tiny_flux_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "again"
    empty.mkdir()  # an existing but empty folder is an allowed target
    again = make_tiny_flux(empty, seed=0)
    assert again == empty.absolute()
    assert _digests(again) == _digests(tiny_flux_dir)

    other = make_tiny_flux(tmp_path / "other", seed=1)
    reference = load_file(tiny_flux_dir / TRANSFORMER_WEIGHTS)
    changed = load_file(other / TRANSFORMER_WEIGHTS)
    assert reference.keys() == changed.keys()
    assert all(not torch.equal(reference[key], changed[key]) for key in reference)
    same_files = {"tokenizer/vocab.json", "tokenizer_2/tokenizer.json", "transformer/config.json"}
    assert all(_digests(other)[name] == _digests(tiny_flux_dir)[name] for name in same_files)


def test_refuses_non_empty_target(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="taken"):
        make_tiny_flux(target)
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]  # no staging folder left behind
    assert (target / "keep.txt").read_text() == "precious"
