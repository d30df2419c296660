"""Which prompts form each training batch: aspect-ratio buckets in one world-size-free sequence."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def bucket_ids(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """One small integer per distinct (height, width): the latent-shape bucket of each prompt."""
    keys = heights.astype(np.int64) << 32 | widths.astype(np.int64)
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


class BucketBatchSampler:
    """Endless batches of one image size, dealt to the ranks from one world-size-free sequence.

    Epoch ``e`` shuffles the items with ``(seed, e)``, cuts each bucket into batches of
    ``batch_size`` (its last batch topped up from the bucket's start, so every item appears each
    epoch and a bucket smaller than a batch still trains) and shuffles the batches. The sequence
    of batches depends only on (seed, each item's bucket, batch_size). At every step rank ``r`` of
    ``W`` takes batch ``position + r`` and all ranks advance ``position`` by ``W``.

    The state is ``position``, the number of batches handed out by all ranks together. "The same
    sequence" after a resume with ``W'`` ranks means: the next step's ``W'`` batches are the next
    ``W'`` of the sequence, so no batch is skipped or repeated, whatever the number of ranks.
    """

    def __init__(self, buckets: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(buckets) == 0:
            raise ValueError("no prompts to sample from")
        self.buckets = np.asarray(buckets, np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        counts = np.bincount(self.buckets)
        self.batches_per_epoch = int(sum(-(-int(c) // batch_size) for c in counts if c))
        self.position = 0
        self._epoch, self._batches = -1, np.zeros((0, batch_size), np.int64)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) item indices of one epoch."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            order = torch.randperm(len(self.buckets), generator=generator).numpy()
            order = order[np.argsort(self.buckets[order], kind="stable")]  # grouped by bucket, shuffled within
            batches = []
            for items in np.split(order, np.cumsum(np.bincount(self.buckets))[:-1]):
                if len(items):
                    short = -len(items) % self.batch_size
                    batches.append(np.concatenate([items, np.resize(items, short)]).reshape(-1, self.batch_size))
            stacked = np.concatenate(batches)
            self._batches = stacked[torch.randperm(len(stacked), generator=generator).numpy()]
            self._epoch = epoch
        return self._batches

    def next_indices(self) -> np.ndarray:
        """This rank's next batch: ``batch_size`` item indices of one bucket."""
        number = self.position + self.rank
        batch = self.epoch_batches(number // self.batches_per_epoch)[number % self.batches_per_epoch]
        self.position += self.world_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batch_size": self.batch_size, "num_items": len(self.buckets),
                "batches_per_epoch": self.batches_per_epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved sequence (its seed wins); prompts and batch size must be unchanged."""
        for key, mine in (("num_items", len(self.buckets)), ("batch_size", self.batch_size),
                          ("batches_per_epoch", self.batches_per_epoch)):
            if int(state[key]) != mine:
                raise ValueError(f"checkpoint's data position is for {key}={state[key]}, this run has {mine} "
                                 "(prompt set, buckets or train_cfg.batch_size changed since it was saved)")
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._epoch = -1
