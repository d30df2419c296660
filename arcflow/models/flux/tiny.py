"""A tiny, random, offline stand-in for ``black-forest-labs/FLUX.1-dev``.

Tests and CI cannot reach the Hugging Face hub and cannot afford a 12B-parameter
teacher, so :func:`make_tiny_flux` writes a complete FLUX pipeline folder with the
same on-disk layout and component classes as the real repo, but with a few MB of
random weights.  Any code path that loads FLUX.1-dev (``FluxPipeline``, the text
encoders, the transformer on its own) can then be pointed at this folder instead.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import string
from collections import Counter

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from arcflow.models.tiny import build_atomically, caption_corpus, pair_merged, randomise_, write_json

CLIP_HIDDEN_SIZE = 32
T5_D_MODEL = 32
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
T5_EXTRA_IDS = 100

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
# The split pattern CLIP's tokenizer applies before byte-level BPE; training must see words the same way.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

def _train_clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges the way CLIP's tokenizer splits words; return (vocab, merges).

    The merge loop is written here rather than using ``tokenizers``' BpeTrainer because that
    trainer breaks frequency ties differently from run to run, and the files must be
    byte-identical.  Ties go to the lexicographically smallest pair.  The vocab is laid out like
    OpenAI's: every byte symbol, every byte symbol with ``</w>``, the merged tokens in merge
    order, then the two specials last (so EOS also has the largest id).
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts = Counter(
        word for line in caption_corpus() for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))
    )
    words = {tuple(word[:-1]) + (word[-1] + "</w>",): count for word, count in counts.items()}
    merges: list[tuple[str, str]] = []
    while True:  # until every remaining pair occurs only once
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        best = min(pairs, key=lambda pair: (-pairs[pair], pair), default=None)
        if best is None or pairs[best] < 2:
            break
        merges.append(best)
        words = {pair_merged(symbols, best): count for symbols, count in words.items()}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + [left + right for left, right in merges]
    tokens = list(dict.fromkeys(tokens)) + [_CLIP_BOS, _CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def _save_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], directory: pathlib.Path) -> None:
    """Write vocab.json + merges.txt + tokenizer_config.json, the files FLUX.1-dev ships for CLIP."""
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": _CLIP_BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": _CLIP_EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": _CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _CLIP_EOS,
    }
    write_json(directory / "tokenizer_config.json", config)


def _train_t5_tokenizer() -> T5TokenizerFast:
    """A Unigram tokenizer with T5's Metaspace splitting and T5's special-token ids.

    Pieces are whole corpus words (``▁word``) scored by their log frequency, plus every ASCII
    character and ``▁`` scored below any word, so Viterbi picks whole words and falls back to
    characters.  Counting instead of ``tokenizers``' UnigramTrainer keeps the file reproducible
    (that trainer is not deterministic across runs).  ``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in
    T5; the 100 sentinel ``<extra_id_*>`` tokens follow in reverse order, as in the real vocab.
    """
    counts = Counter(
        "▁" + match.group() for line in caption_corpus() for word in line.split() if (match := re.match(r"[A-Za-z]+", word))
    )
    total = sum(counts.values())
    scores = {piece: math.log(count / total) for piece, count in counts.items()}
    for symbol in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        scores.setdefault(symbol, math.log(0.5 / total))
    pieces = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return T5TokenizerFast(vocab=specials + pieces + sentinels, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)




def _transformer() -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer config shrunk to two heads of 16 and two blocks of each kind."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN_SIZE,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def _vae() -> AutoencoderKL:
    """FLUX's 16-channel, 8x-downsampling autoencoder with 16 channels per level."""
    levels = 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16,) * levels,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _clip(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPTextModel:
    """CLIP-L's text tower shrunk to width 32; EOS id matches the tokenizer so pooling finds it."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=64,
        projection_dim=CLIP_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def _t5(vocab_size: int) -> T5EncoderModel:
    """T5 v1.1-XXL's encoder (gated-GELU, untied) shrunk to width 32."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config FLUX.1-dev ships, unchanged."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )




def _build(directory: pathlib.Path, seed: int) -> None:
    """Write every component of the pipeline into the (empty, existing) ``directory``."""
    clip_vocab, clip_merges = _train_clip_bpe()
    _save_clip_tokenizer(clip_vocab, clip_merges, directory / "tokenizer")
    t5_tokenizer = _train_t5_tokenizer()
    t5_tokenizer.save_pretrained(directory / "tokenizer_2")

    # Constructors consume the global RNG for their default init; keep the caller's stream intact.
    with torch.random.fork_rng(devices=[]):
        transformer, vae = _transformer(), _vae()
        text_encoder = _clip(len(clip_vocab), clip_vocab[_CLIP_BOS], clip_vocab[_CLIP_EOS])
        text_encoder_2 = _t5(-(-len(t5_tokenizer) // 8) * 8)  # padded to a multiple of 8, as T5 does

    generator = torch.Generator().manual_seed(seed)
    for model in (transformer, vae, text_encoder, text_encoder_2):
        randomise_(model, generator)
    transformer.save_pretrained(directory / "transformer")
    vae.save_pretrained(directory / "vae")
    text_encoder.save_pretrained(directory / "text_encoder")
    text_encoder_2.save_pretrained(directory / "text_encoder_2")
    _scheduler().save_pretrained(directory / "scheduler")
    write_json(
        directory / "model_index.json",
        {
            "_class_name": "FluxPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def make_tiny_flux(out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny random FLUX.1-dev-shaped diffusers pipeline to ``out_dir`` and return its path.

    The same ``seed`` gives byte-identical files; the folder appears atomically (built in a hidden
    sibling, then renamed) so a crash never leaves a half-written teacher behind.  ``out_dir`` may be
    missing or an empty directory; anything else raises ``ValueError``.
    """
    return build_atomically(out_dir, lambda staging: _build(staging, seed), "make_tiny_flux")
