"""FLUX's frozen text conditioning (CLIP-L pooled + T5 sequence) without a diffusers pipeline.

Distillation only needs the prompt embeddings, so loading the whole ``FluxPipeline`` (and its
12B transformer) just to call ``encode_prompt`` would waste memory.  This module loads the two
text towers alone and reproduces ``FluxPipeline.encode_prompt`` bit for bit.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from arcflow.config import torch_dtype
from arcflow.models.base import ConditioningSchema


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept config-friendly names such as ``"bfloat16"`` as well as ``torch.bfloat16``."""
    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(str(dtype).removeprefix("torch."))


class PretrainedFluxTextEncoder(torch.nn.Module):
    """The frozen CLIP and T5 encoders of a FLUX checkpoint (hub id or local folder).

    ``encode`` returns what ``FluxPipeline.encode_prompt`` returns for ``prompt_2=None`` and one
    image per prompt: T5's last hidden state padded to ``max_sequence_length`` and CLIP's pooled
    output.  The encoders never train, so the module stays in eval mode even under ``.train()``
    (T5 has dropout) and its parameters do not require gradients.
    """

    schema = ConditioningSchema(sequences={"prompt_embeds": None}, vectors=("pooled_prompt_embeds",))

    def __init__(
        self,
        pretrained: str | os.PathLike = "black-forest-labs/FLUX.1-dev",
        max_sequence_length: int = 512,
        torch_dtype: torch.dtype | str = torch.bfloat16,
    ) -> None:
        super().__init__()
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        dtype = _as_dtype(torch_dtype)
        self.max_sequence_length = max_sequence_length
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        self.clip = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=dtype)
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_2")
        self.t5 = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_2", dtype=dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PretrainedFluxTextEncoder:
        """Ignore ``mode``: a parent's ``.train()`` must not switch on T5's dropout."""
        return super().train(False)

    def fsdp_units(self) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
        """T5 and its blocks are worth sharding; CLIP-L (0.1B) is not."""
        return [(self.t5, list(self.t5.encoder.block))]

    @property
    def device(self) -> torch.device:
        """Where the embeddings are returned (T5's device; both encoders normally share it)."""
        return self.t5.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embed ``prompts`` as FLUX does: ``prompt_embeds`` (B, L, d_t5), ``pooled_prompt_embeds`` (B, d_clip).

        Both tokenizers pad to a fixed length and truncate silently, exactly like the pipeline
        (CLIP to its 77-token limit, T5 to ``max_sequence_length``); no attention masks are used.
        """
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, not a single string")
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt, got an empty list")
        clip_ids = self.clip_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        sequence = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False).last_hidden_state
        return {
            "prompt_embeds": sequence.to(device=self.device, dtype=self.t5.dtype),
            "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.clip.dtype),
        }
