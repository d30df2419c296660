"""Pieces every family's tiny offline model generator shares (arcflow/models/<family>/tiny.py).

A tiny model must be byte-identical for a seed and must never be left half-written, whatever
the family; these helpers keep those two promises in one place.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import torch

_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "golden")
_SHAPES = ("circle", "square", "triangle", "cube", "sphere", "cylinder", "cone", "star", "ring", "pyramid")
_OBJECTS = (
    "cat", "dog", "bird", "horse", "car", "train", "bicycle", "apple", "banana", "cup",
    "bottle", "chair", "table", "book", "clock", "lamp", "tree", "flower", "house", "boat",
)  # fmt: skip
_POSITIONS = (
    "on top of", "under", "next to", "behind", "in front of",
    "to the left of", "to the right of", "above", "below", "inside",
)  # fmt: skip
_COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SCENES = (
    "A photo of a city street at night with bright lights and wet roads.",
    "A painting of a quiet lake in the mountains at sunrise, in the style of an old master.",
    "A close up of a small flower in a garden, soft light, high detail, sharp focus.",
    "An old man reading a newspaper in a busy cafe while it rains outside.",
    "A child playing with a large ball on the beach under a clear sky.",
    "A bowl of fresh fruit on a wooden kitchen table near the window.",
    "A cartoon drawing of a happy robot holding a sign that says hello.",
    "3 cups, 2 plates and 1 knife lie on a white cloth; it's a simple still life.",
)


def caption_corpus() -> list[str]:
    """A few hundred words of captions, so tiny tokenizers learn real English sub-words."""
    lines = list(_SCENES)
    for i in range(60):
        count = _COUNTS[i % len(_COUNTS)]
        noun = _OBJECTS[i % len(_OBJECTS)] + ("" if count == "one" else "s")
        colour, other = _COLOURS[i % len(_COLOURS)], _COLOURS[(5 * i + 3) % len(_COLOURS)]
        place, shape = _POSITIONS[(3 * i) % len(_POSITIONS)], _SHAPES[(7 * i) % len(_SHAPES)]
        lines.append(f"{count} {colour} {noun} {place} a {other} {shape}")
    return lines




def pair_merged(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``symbols`` with every left-to-right occurrence of ``pair`` fused into one symbol (one BPE merge)."""
    fused: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            fused.append(pair[0] + pair[1])
            index += 2
        else:
            fused.append(symbols[index])
            index += 1
    return tuple(fused)


def randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter from ``generator`` so nothing is zero-initialised.

    diffusers zero-initialises e.g. the adaLN modulation and output projection, which would
    make the teacher ignore its inputs.  Matrices and embeddings get std 1/sqrt(fan_in) so
    activations stay O(1) through a tiny network; norm scales are drawn around one and biases small.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise * param[0].numel() ** -0.5
            elif name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.02 * noise
            param.copy_(value)


def write_json(path: pathlib.Path, payload: dict[str, object]) -> None:
    """Sorted, indented JSON so the same content always gives the same bytes."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_atomically(out_dir: str | os.PathLike, build: Callable[[pathlib.Path], None], what: str) -> pathlib.Path:
    """Run ``build`` on a hidden sibling of ``out_dir``, then rename it into place; return the absolute path.

    ``out_dir`` may be missing or an empty directory; anything else raises ``ValueError`` naming
    ``what`` (the generator), and a failed build leaves nothing behind.
    """
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{what}: {out} already exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the result should look like any other folder
        try:
            staging.rename(out)  # replaces a missing or empty directory, fails on a non-empty one
        except OSError as error:
            raise ValueError(f"{what}: {out} was filled by someone else while building") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
