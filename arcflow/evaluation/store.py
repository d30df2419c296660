"""Image folders of an evaluation: one PNG and one latent file per prompt, each written once and atomically.

A run writes every image as soon as it is made and a rerun skips those already on disk, so a
killed evaluation continues where it stopped: an image is either complete (its PNG and its
latent both present under their final names) or absent. The teacher's reference images live in
a shared :class:`ImageStore` keyed by (model, sampler, noise seed); within it each image is named
by its prompt, size and occurrence, so every later evaluation of every student reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from arcflow.images import read_png

KEY_FILE = "key.json"
LATENT_SUFFIX = ".latent.safetensors"


@dataclass(frozen=True)
class EvalItem:
    """One prompt of the evaluation set: its position, text, size, and the names of its files."""

    index: int
    prompt: str
    height: int
    width: int
    occurrence: int
    """How many earlier prompts of the set had the same text and size (duplicates get their own noise)."""

    @property
    def key(self) -> str:
        """Content name of this prompt's image in the teacher store: the same prompt gets the same file."""
        return _digest(f"{self.height}x{self.width}", str(self.occurrence), self.prompt)[:24]

    def noise_seed(self, seed: int) -> int:
        """The seed of this prompt's noise: independent of ranks, batching and the rest of the set."""
        return int(_digest(str(seed), self.key)[:15], 16)

    @property
    def name(self) -> str:
        """File name of this prompt's image in a run's own folders."""
        return f"{self.index:05d}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def make_items(prompts: list[tuple[str, int, int]]) -> list[EvalItem]:
    """(text, height, width) in order -> items, numbering repeated prompts."""
    seen: dict[tuple[str, int, int], int] = {}
    items = []
    for index, (text, height, width) in enumerate(prompts):
        occurrence = seen.get((text, height, width), 0)
        seen[(text, height, width)] = occurrence + 1
        items.append(EvalItem(index, text, height, width, occurrence))
    return items


def noise_for(item: EvalItem, seed: int, shape: tuple[int, ...]) -> Tensor:
    """The fixed noise of ``item`` (drawn on the CPU, so it is the same on every device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(item.noise_seed(seed)))


class ImageStore:
    """A folder of ``{name}.png`` + ``{name}.latent.safetensors`` pairs; ``key`` (if given) says what made them."""

    def __init__(self, root: str | Path, key: dict[str, Any] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if key is not None:
            self._check_key(key)

    def _check_key(self, key: dict[str, Any]) -> None:
        path = self.root / KEY_FILE
        text = json.dumps(key, indent=1, sort_keys=True) + "\n"
        if path.is_file():
            found = json.loads(path.read_text(encoding="utf-8"))
            if found != json.loads(text):
                raise ValueError(f"teacher store '{self.root}' was made by {found}, not by {key}; "
                                 "remove the folder or set eval_cfg.teacher_store elsewhere")
            return
        _atomic_write_text(path, text)

    def png(self, name: str) -> Path:
        return self.root / f"{name}.png"

    def latent(self, name: str) -> Path:
        return self.root / f"{name}{LATENT_SUFFIX}"

    def has(self, name: str) -> bool:
        return self.png(name).is_file() and self.latent(name).is_file()

    def write(self, name: str, image: Tensor, latent: Tensor) -> None:
        """Save one uint8 (3, H, W) image and its float latent; the PNG is renamed into place last."""
        if not torch.isfinite(latent).all():
            raise ValueError(f"refusing to store a non-finite latent as '{self.latent(name)}'")
        latent_tmp = self.latent(name).with_name(f".{name}.{os.getpid()}.tmp")
        save_file({"latent": latent.detach().float().cpu().contiguous()}, str(latent_tmp))
        latent_tmp.replace(self.latent(name))
        png_tmp = self.png(name).with_name(f".{name}.{os.getpid()}.png.tmp")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(png_tmp, format="PNG")
        png_tmp.replace(self.png(name))

    def read(self, name: str) -> tuple[Tensor, Tensor]:
        """(uint8 image (3, H, W), float32 latent) of one stored image."""
        return read_png(self.png(name)), load_file(str(self.latent(name)))["latent"]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def store_key_folder(root: str | Path, key: dict[str, Any]) -> Path:
    """The store folder of one (model, sampler, seed) key: a readable prefix plus a hash of the whole key."""
    label = "-".join(str(key[part]) for part in ("family", "sampler") if part in key)
    return Path(root) / f"{label}-{_digest(json.dumps(key, sort_keys=True))[:12]}"
