"""Prompts for training and validation, and a resumable sampler of same-shape batches.

A prompt file is plain text (one prompt per line) or JSONL (``prompt`` plus optional
``height``/``width``). Batches only group prompts of one image size, so every batch has
one latent shape; the sampler's position is part of the checkpoint.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from arcflow.config import PromptsConfig


@dataclass(frozen=True)
class Prompt:
    text: str
    height: int
    width: int


def read_prompts(cfg: PromptsConfig, size_multiple: int = 16) -> list[Prompt]:
    """Load, validate and slice a prompt file as the config says."""
    path = Path(cfg.prompt_file)
    if not cfg.prompt_file or not path.is_file():
        raise FileNotFoundError(f"prompt file not found: '{cfg.prompt_file}' (set data.*.prompt_file in the config)")
    is_jsonl = path.suffix in (".jsonl", ".json")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        if is_jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{where}: expected an object with a string 'prompt'")
            text = record["prompt"]
            height, width = record.get("height", cfg.height), record.get("width", cfg.width)
        else:
            text, height, width = line.strip(), cfg.height, cfg.width
        if not text.strip():
            raise ValueError(f"{where}: empty prompt")
        for key, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % size_multiple:
                raise ValueError(f"{where}: {key} {value!r} is not a positive multiple of {size_multiple}")
        prompts.append(Prompt(text.strip(), height, width))
    selected = prompts[cfg.start_ind:cfg.end_ind] * cfg.repeat
    if not selected:
        raise ValueError(f"{path}: no prompts in [start_ind={cfg.start_ind}, end_ind={cfg.end_ind}]")
    return selected


class PromptBatchSampler:
    """Endless, reshuffled-per-epoch batches of prompt indices sharing one image size.

    Deterministic in (seed, epoch); ``state_dict`` records the position so a resumed run
    draws exactly the batches the interrupted one would have drawn.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in torch.randperm(len(self.prompts), generator=generator).tolist():
            p = self.prompts[index]
            groups[(p.height, p.width)].append(index)
        batches = []
        for indices in groups.values():
            # Wrap around so a group smaller than the batch still yields full batches.
            repeats = -(-self.batch_size // len(indices))
            padded = indices * repeats if len(indices) < self.batch_size else indices
            full = len(padded) - len(padded) % self.batch_size
            batches += [padded[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def next_batch(self) -> list[Prompt]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return [self.prompts[i] for i in batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._batches = self._epoch_batches(self.epoch)
