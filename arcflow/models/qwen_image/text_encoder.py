"""Qwen-Image's frozen text conditioning (Qwen2.5-VL's last hidden state) without a diffusers pipeline.

Distillation only needs the prompt embeddings, so this loads the text encoder and tokenizer
alone and reproduces ``QwenImagePipeline.encode_prompt``: the chat template, its first 34
tokens dropped, the last hidden state kept with its attention mask (SPEC §8).
"""

from __future__ import annotations

import os

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from arcflow.config import torch_dtype as dtype_named
from arcflow.models.base import ConditioningSchema

TEMPLATE_PREFIX_TOKENS = 34
"""Tokens of the chat template before the prompt; ``QwenImagePipeline.prompt_template_encode_start_idx``."""
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
"""``QwenImagePipeline.prompt_template_encode``, the text the tokenizer is trained to split as Qwen's does."""
MAX_SEQUENCE_LENGTH = 1024
"""The longest text ``QwenImagePipeline`` accepts (its ``tokenizer_max_length``)."""


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept config-friendly names such as ``"bfloat16"`` as well as ``torch.bfloat16``."""
    return dtype if isinstance(dtype, torch.dtype) else dtype_named(str(dtype).removeprefix("torch."))


class PretrainedQwenImageTextEncoder(torch.nn.Module):
    """The frozen Qwen2.5-VL language model of a Qwen-Image checkpoint (hub id or local folder).

    ``encode`` returns what ``QwenImagePipeline.encode_prompt`` returns for one image per prompt:
    ``prompt_embeds`` (B, L, 3584) padded with zeros to the batch's longest row and
    ``prompt_embeds_mask`` (B, L) marking its real tokens (always returned, also when every row is
    full, so batches and the cache see one layout). No pooled vector. The vision tower is
    dropped after loading: text-to-image never feeds it pixels.
    """

    schema = ConditioningSchema(sequences={"prompt_embeds": "prompt_embeds_mask"}, negative_prompt="")

    def __init__(
        self,
        pretrained: str | os.PathLike = "Qwen/Qwen-Image",
        max_sequence_length: int = 512,
        torch_dtype: torch.dtype | str = torch.bfloat16,
    ) -> None:
        super().__init__()
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.tokenizer = Qwen2Tokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(pretrained, subfolder="text_encoder",
                                                                   dtype=_as_dtype(torch_dtype))
        del model.model.visual, model.lm_head  # ~0.7B + 0.5B parameters text-to-image never uses
        self.qwen = model.model
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PretrainedQwenImageTextEncoder:
        """Ignore ``mode``: the encoder is frozen and must stay in eval mode under a parent's ``.train()``."""
        return super().train(False)

    def fsdp_units(self) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
        """The 7B language model and its decoder layers."""
        return [(self.qwen, list(self.qwen.language_model.layers))]

    @property
    def device(self) -> torch.device:
        return self.qwen.language_model.embed_tokens.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embed ``prompts`` as ``QwenImagePipeline.encode_prompt(prompts, max_sequence_length=...)`` does.

        The tokenizer truncates at the template prefix plus ``max_sequence_length`` tokens rather
        than the pipeline's 1024: the language model is causal, so the kept tokens' states are
        the same and the cut tail is never computed.
        """
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, not a single string")
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt, got an empty list")
        tokens = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], padding=True, truncation=True,
                                max_length=self.max_sequence_length + TEMPLATE_PREFIX_TOKENS, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.qwen(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                           output_hidden_states=True).hidden_states[-1]
        rows = [row[keep.bool()][TEMPLATE_PREFIX_TOKENS:] for row, keep in zip(hidden, mask)]
        length = max(len(row) for row in rows)
        embeds = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        keep = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, : len(row)] = row
            keep[i, : len(row)] = 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": keep}
