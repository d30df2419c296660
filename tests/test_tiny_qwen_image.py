"""The tiny Qwen-Image pipeline loads like Qwen/Qwen-Image, is reproducible, and its text encoder is the pipeline's."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration

from arcflow.models.qwen_image.text_encoder import (PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS,
                                                    PretrainedQwenImageTextEncoder)
from arcflow.models.qwen_image.tiny import make_tiny_qwen_image

# How Qwen2.5-VL's own tokenizer splits the template prefix: one token per word, as the tiny one must.
REAL_PREFIX = [
    "<|im_start|>", "system", "Ċ", "Describe", "Ġthe", "Ġimage", "Ġby", "Ġdetailing", "Ġthe", "Ġcolor", ",", "Ġshape",
    ",", "Ġsize", ",", "Ġtexture", ",", "Ġquantity", ",", "Ġtext", ",", "Ġspatial", "Ġrelationships", "Ġof", "Ġthe",
    "Ġobjects", "Ġand", "Ġbackground", ":", "<|im_end|>", "Ċ", "<|im_start|>", "user", "Ċ",
]
PROMPTS = ["a red cube", "two green cats under a white square, at night", "zebra xylophone"]


def _digests(root: pathlib.Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def pipe(tiny_qwen_dir: pathlib.Path) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(tiny_qwen_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(tiny_qwen_dir: pathlib.Path) -> PretrainedQwenImageTextEncoder:
    return PretrainedQwenImageTextEncoder(tiny_qwen_dir, torch_dtype="float32")


def test_layout_matches_qwen_image(tiny_qwen_dir: pathlib.Path) -> None:
    index = json.loads((tiny_qwen_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert sorted(p.name for p in tiny_qwen_dir.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    assert sum(p.stat().st_size for p in tiny_qwen_dir.rglob("*") if p.is_file()) < 4_000_000


@pytest.mark.parametrize(("model_class", "subfolder"), [
    (QwenImageTransformer2DModel, "transformer"), (AutoencoderKLQwenImage, "vae"),
    (Qwen2_5_VLForConditionalGeneration, "text_encoder")])
def test_weights_match_architecture(tiny_qwen_dir: pathlib.Path, model_class: type, subfolder: str) -> None:
    _, info = model_class.from_pretrained(tiny_qwen_dir, subfolder=subfolder, output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_template_prefix_is_34_tokens_and_kept_apart_from_the_prompt(pipe: QwenImagePipeline) -> None:
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_PREFIX_TOKENS == 34
    for prompt in PROMPTS:
        ids = pipe.tokenizer(PROMPT_TEMPLATE.format(prompt)).input_ids
        prefix = pipe.tokenizer.convert_ids_to_tokens(ids[:TEMPLATE_PREFIX_TOKENS])
        assert prefix == REAL_PREFIX
        assert pipe.tokenizer.decode(ids[TEMPLATE_PREFIX_TOKENS:]).startswith(prompt + "<|im_end|>")


def test_other_seed_other_weights_same_tokenizer(tiny_qwen_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = _digests(make_tiny_qwen_image(tmp_path / "other", seed=1))
    assert other["tokenizer/tokenizer.json"] == _digests(tiny_qwen_dir)["tokenizer/tokenizer.json"]
    assert other["transformer/diffusion_pytorch_model.safetensors"] != _digests(tiny_qwen_dir)[
        "transformer/diffusion_pytorch_model.safetensors"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        make_tiny_qwen_image(tmp_path / "full")


def test_pipeline_samples_with_true_cfg(pipe: QwenImagePipeline) -> None:
    def run(cfg: float) -> torch.Tensor:
        return pipe("a red cube", negative_prompt="", true_cfg_scale=cfg, height=32, width=48, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    guided = run(4.0)
    assert guided.shape == (1, 3, 32, 48) and torch.isfinite(guided).all()
    assert not torch.equal(guided, run(1.0))  # the negative branch takes part


def test_encoder_equals_pipeline_encode_prompt(pipe: QwenImagePipeline, encoder: PretrainedQwenImageTextEncoder) -> None:
    cond = encoder.encode(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask"}  # no pooled vector
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    assert torch.equal(cond["prompt_embeds_mask"], mask)
    assert mask[0].sum() < mask[1].sum()  # variable-length rows, masked


def test_encoder_truncates_like_the_pipeline(tiny_qwen_dir: pathlib.Path, pipe: QwenImagePipeline) -> None:
    short = PretrainedQwenImageTextEncoder(tiny_qwen_dir, max_sequence_length=6, torch_dtype=torch.float32)
    cond = short.encode(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=6)
    assert cond["prompt_embeds"].shape[1] == 6 and mask is None  # the pipeline drops an all-ones mask
    torch.testing.assert_close(cond["prompt_embeds"], embeds)  # causal: equal up to kernel rounding
    assert cond["prompt_embeds_mask"].all()


def test_empty_negative_and_frozen(encoder: PretrainedQwenImageTextEncoder, pipe: QwenImagePipeline) -> None:
    assert encoder.schema.negative_prompt == "" and encoder.schema.vectors == ()
    negative = encoder.encode([encoder.schema.negative_prompt])
    torch.testing.assert_close(negative["prompt_embeds"], pipe.encode_prompt("", device="cpu")[0], rtol=0, atol=0)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert not hasattr(encoder.qwen, "visual")
    with pytest.raises(TypeError):
        encoder.encode("a bare string")
    with pytest.raises(ValueError, match="at least one prompt"):
        encoder.encode([])
    with pytest.raises(ValueError, match="max_sequence_length"):
        PretrainedQwenImageTextEncoder("unused", max_sequence_length=2000)


def test_cli_writes_the_same_bytes_for_the_same_seed(tiny_qwen_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                     capsys) -> None:
    """The README's ``arcflow tiny DIR --family qwen_image`` (seed 0 by default) rebuilds the fixture bit for bit."""
    from arcflow.cli import main

    main(["tiny", str(tmp_path / "cli"), "--family", "qwen_image"])
    assert "wrote" in capsys.readouterr().out
    assert _digests(tmp_path / "cli") == _digests(tiny_qwen_dir)
