"""A tiny, random, offline stand-in for ``Qwen/Qwen-Image``.

:func:`make_tiny_qwen_image` writes a complete ``QwenImagePipeline`` folder in the real
layout (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) with
the real component classes: a Qwen2.5-VL text encoder (language model and a one-block
vision tower), a byte-level BPE Qwen2 tokenizer, ``AutoencoderKLQwenImage`` and
``QwenImageTransformer2DModel``, all a few MB of random weights.

The tokenizer keeps one property of the real one that the pipeline depends on: its chat
template's prefix (system prompt and ``<|im_start|>user\\n``) is exactly
:data:`TEMPLATE_PREFIX_TOKENS` tokens, so the pipeline's fixed 34-token drop removes the
template and nothing of the prompt.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections import Counter

import diffusers
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from arcflow.models.qwen_image.text_encoder import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from arcflow.models.tiny import build_atomically, caption_corpus, pair_merged, randomise_, write_json

TEXT_HIDDEN_SIZE = 32
"""Width of the tiny Qwen2.5-VL language model, hence the transformer's ``joint_attention_dim``."""
# Qwen2's split before byte-level BPE (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_ENDOFTEXT = "<|endoftext|>"
# Qwen2.5-VL's special tokens in the real vocab's order (after <|endoftext|>).
_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _splitter() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE merges until every word of the corpus is one token; return (vocab, merges).

    Real Qwen splits each word of the template into one token; merging every corpus word whole
    gives the same split (hence the 34-token prefix) and falls back to bytes for unseen words.
    Ties go to the lexicographically smallest pair, so the files are byte-identical run to run.
    """
    template_text = PROMPT_TEMPLATE.replace("<|im_start|>", "\n").replace("<|im_end|>", "\n").format("")
    splitter, normalizer = _splitter(), normalizers.NFC()
    lines = [template_text, *caption_corpus()]
    counts = Counter(word for line in lines for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    words = {tuple(word): count for word, count in counts.items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {pair_merged(symbols, best): count for symbols, count in words.items()}
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + [left + right for left, right in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer (``Qwen2Tokenizer``) on the tiny vocab, with Qwen2.5-VL's special tokens after it."""
    vocab, merges = _train_bpe()
    vocab = {**vocab, **{token: len(vocab) + i for i, token in enumerate((_ENDOFTEXT, *_SPECIALS))}}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in _SPECIALS],
                         special_tokens=True)
    prefix = PROMPT_TEMPLATE[: PROMPT_TEMPLATE.index("{}")]
    assert len(tokenizer(prefix).input_ids) == TEMPLATE_PREFIX_TOKENS, "tiny tokenizer broke the template prefix"
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL-7B-Instruct shrunk to width 32 (2 heads of 16, one KV head), with a one-block vision tower."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (_ENDOFTEXT, *_SPECIALS)}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": -(-len(tokenizer) // 8) * 8,
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids[_ENDOFTEXT],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids[_ENDOFTEXT],
            "tie_word_embeddings": False,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": TEXT_HIDDEN_SIZE, "fullatt_block_indexes": [0], "window_size": 112,
                       "patch_size": 14},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _transformer() -> QwenImageTransformer2DModel:
    """Qwen-Image's transformer shrunk to two double-stream blocks of two heads of 16."""
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _vae() -> AutoencoderKLQwenImage:
    """Qwen-Image's 16-channel, 8x causal-3D autoencoder at base width 8 (its real per-channel statistics)."""
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config Qwen-Image ships, unchanged."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def _build(directory: pathlib.Path, seed: int) -> None:
    """Write every component of the pipeline into the (empty, existing) ``directory``."""
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(directory / "tokenizer")
    with torch.random.fork_rng(devices=[]):  # constructors draw their default init from the global RNG
        transformer, vae, text_encoder = _transformer(), _vae(), _text_encoder(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    for model in (transformer, vae, text_encoder):
        randomise_(model, generator)
    transformer.save_pretrained(directory / "transformer")
    vae.save_pretrained(directory / "vae")
    text_encoder.save_pretrained(directory / "text_encoder")
    _scheduler().save_pretrained(directory / "scheduler")
    write_json(
        directory / "model_index.json",
        {
            "_class_name": "QwenImagePipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
    )


def make_tiny_qwen_image(out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random Qwen-Image-shaped diffusers pipeline to ``out_dir`` and return its path.

    The same ``seed`` gives byte-identical files; the folder appears atomically, and ``out_dir``
    may be missing or an empty directory (anything else raises ``ValueError``).
    """
    return build_atomically(out_dir, lambda staging: _build(staging, seed), "make_tiny_qwen_image")
