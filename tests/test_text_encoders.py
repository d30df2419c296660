"""PretrainedFluxTextEncoder must reproduce FluxPipeline.encode_prompt exactly."""

from __future__ import annotations

import pathlib

import pytest
import torch
from diffusers import FluxPipeline

from arcflow.models.flux.text_encoder import PretrainedFluxTextEncoder

MAX_LENGTH = 32
PROMPTS = [
    "a red cube to the left of a blue sphere",
    "Three small dogs!",
    # Longer than both CLIP's 77 tokens and MAX_LENGTH T5 tokens, so truncation is exercised too.
    " ".join(["seven golden horses behind a purple cone"] * 12),
]


@pytest.fixture(scope="module")
def encoder(tiny_flux_dir: pathlib.Path) -> PretrainedFluxTextEncoder:
    return PretrainedFluxTextEncoder(tiny_flux_dir, max_sequence_length=MAX_LENGTH, torch_dtype="float32")


def test_matches_pipeline_encode_prompt(encoder: PretrainedFluxTextEncoder, tiny_flux_dir: pathlib.Path) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    # FluxPipeline.__call__ runs encode_prompt under no_grad; with grad enabled, SDPA picks another
    # CPU kernel for T5 and the last bits differ, so compare against what generation really sees.
    with torch.no_grad():
        expected, expected_pooled, _ = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, max_sequence_length=MAX_LENGTH
        )
    out = encoder.encode(PROMPTS)
    assert torch.equal(out["prompt_embeds"], expected)
    assert torch.equal(out["pooled_prompt_embeds"], expected_pooled)


def test_shapes_and_prompt_dependence(encoder: PretrainedFluxTextEncoder) -> None:
    out = encoder.encode(PROMPTS)
    assert out["prompt_embeds"].shape == (len(PROMPTS), MAX_LENGTH, encoder.t5.config.d_model)
    assert out["pooled_prompt_embeds"].shape == (len(PROMPTS), encoder.clip.config.hidden_size)
    assert out["prompt_embeds"].dtype == torch.float32
    assert not torch.equal(out["pooled_prompt_embeds"][0], out["pooled_prompt_embeds"][1])


def test_frozen_and_stays_in_eval(encoder: PretrainedFluxTextEncoder) -> None:
    encoder.train()
    assert not encoder.training and not encoder.t5.training
    assert not any(param.requires_grad for param in encoder.parameters())
    assert not encoder.encode(PROMPTS[:1])["prompt_embeds"].requires_grad


def test_string_dtype(tiny_flux_dir: pathlib.Path) -> None:
    encoder = PretrainedFluxTextEncoder(tiny_flux_dir, max_sequence_length=8, torch_dtype="bfloat16")
    out = encoder.encode(["a cat"])
    assert out["prompt_embeds"].dtype == torch.bfloat16
    assert out["pooled_prompt_embeds"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        PretrainedFluxTextEncoder(tiny_flux_dir, torch_dtype="float33")


def test_rejects_empty_and_bare_string(encoder: PretrainedFluxTextEncoder) -> None:
    with pytest.raises(ValueError, match="empty"):
        encoder.encode([])
    with pytest.raises(TypeError):
        encoder.encode("a cat")  # type: ignore[arg-type]
