"""Which prompts form each training batch: one sequence of global batches, whatever the world size."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def bucket_ids(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """One small integer per distinct (height, width): the latent-shape bucket of each prompt."""
    keys = heights.astype(np.int64) << 32 | widths.astype(np.int64)
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


class BucketBatchSampler:
    """Endless global batches of one image size each; every rank takes its rows of each one.

    A global batch holds ``batch_size * world_size`` items (the config's global batch). Epoch
    ``e`` shuffles the items with ``(seed, e)``, cuts each bucket into global batches (its last
    one topped up from the bucket's start, so every item appears each epoch and a bucket smaller
    than a batch still trains) and shuffles the batches. The sequence depends only on (seed, each
    item's bucket, global batch size). At step ``t`` rank ``r`` takes rows ``r * batch_size ..``
    of global batch ``t``, so row ``j`` of a rank is global sample ``r * batch_size + j`` of the
    step however the global batch is split over ranks (and, by the trainer, micro-batches).

    The state is ``position``, the number of global batches handed out: a run saved on ``W``
    ranks continues the same sequence on ``W'`` ranks whose per-rank batch keeps the global
    batch (``W * b == W' * b'``).
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
        self.global_batch_size = batch_size * world_size
        counts = np.bincount(self.buckets)
        self.batches_per_epoch = int(sum(-(-int(c) // self.global_batch_size) for c in counts if c))
        self.position = 0
        self._epoch, self._batches = -1, np.zeros((0, self.global_batch_size), np.int64)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, global_batch_size) item indices of one epoch."""
        if epoch != self._epoch:
            size = self.global_batch_size
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            order = torch.randperm(len(self.buckets), generator=generator).numpy()
            order = order[np.argsort(self.buckets[order], kind="stable")]  # grouped by bucket, shuffled within
            batches = []
            for items in np.split(order, np.cumsum(np.bincount(self.buckets))[:-1]):
                if len(items):
                    batches.append(np.concatenate([items, np.resize(items, -len(items) % size)]).reshape(-1, size))
            stacked = np.concatenate(batches)
            self._batches = stacked[torch.randperm(len(stacked), generator=generator).numpy()]
            self._epoch = epoch
        return self._batches

    def next_global_batch(self) -> np.ndarray:
        """The whole next global batch (every rank's rows, in rank order); advances the position."""
        number = self.position
        self.position += 1
        return self.epoch_batches(number // self.batches_per_epoch)[number % self.batches_per_epoch]

    def next_indices(self) -> np.ndarray:
        """This rank's rows of the next global batch: ``batch_size`` item indices of one bucket."""
        return self.next_global_batch()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_items": len(self.buckets),
                "batches_per_epoch": self.batches_per_epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved sequence (its seed wins); prompts and global batch size must be unchanged."""
        if "global_batch_size" not in state:
            raise ValueError("checkpoint's data position counts per-rank batches (saved before global batches); "
                             "it cannot continue the same sequence: start a new run or use an older arcflow")
        for key, mine in (("num_items", len(self.buckets)), ("global_batch_size", self.global_batch_size),
                          ("batches_per_epoch", self.batches_per_epoch)):
            if int(state[key]) != mine:
                raise ValueError(f"checkpoint's data position is for {key}={state[key]}, this run has {mine} "
                                 "(prompt set, buckets or the global batch, world size x train_cfg.batch_size, "
                                 "changed since it was saved)")
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._epoch = -1
