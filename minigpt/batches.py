"""Batches: random training windows drawn from (seed, step), fixed validation batches.

:class:`BatchSampler` draws training windows statelessly from ``(seed, step)``, so resuming needs
only the step and the global batch does not depend on how it is split over ranks and micro-steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from minigpt.config import ConfigError


def too_short_fix(split: str) -> str:
    """What makes a split long enough for one window: val is a fraction of the corpus."""
    if split == "val":
        return "raise data.val_fraction, use a smaller model.block_size or more data"
    return "use a smaller model.block_size or more data"


def _windows(data: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, ...]:
    """(x, y) for windows starting at ``offsets``: one vectorised gather, y is x shifted by one."""
    rows = np.asarray(data[offsets[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    xy = torch.from_numpy(rows)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def _n_windows(data: np.ndarray, block_size: int, split: str) -> int:
    if len(data) < block_size + 1:
        raise ConfigError(
            f"the {split} split has {len(data)} tokens but model.block_size={block_size} needs "
            f"at least {block_size + 1}; {too_short_fix(split)}"
        )
    return len(data) - block_size


class BatchSampler:
    """Random windows of block_size+1 tokens; the sequence of GLOBAL batches depends only on
    (seed, step, global_batch) — never on world size or micro-step split."""

    def __init__(self, data: np.ndarray, block_size: int, global_batch: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        self.global_batch = global_batch
        self.seed = seed
        self._n_windows = _n_windows(data, block_size, "train")

    def global_offsets(self, step: int) -> np.ndarray:
        """Window starts of the whole step's batch, from a generator seeded by (seed, step)."""
        rng = np.random.default_rng([self.seed % 2**64, step])
        return rng.integers(0, self._n_windows, size=self.global_batch)

    def batch(
        self, step: int, rank: int, world_size: int, micro: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch: the global batch is split rank-major, then by micro-step."""
        parts = world_size * grad_accum
        if self.global_batch % parts:
            raise ValueError(
                f"global batch {self.global_batch} does not split into {world_size} ranks "
                f"x {grad_accum} micro-steps"
            )
        size = self.global_batch // parts
        start = (rank * grad_accum + micro) * size
        return _windows(self.data, self.global_offsets(step)[start : start + size], self.block_size)

    def state_dict(self) -> dict[str, int]:
        """What resuming needs besides the step (plain ints, checkpoint-safe)."""
        return {"seed": self.seed, "global_batch": self.global_batch, "block_size": self.block_size}

    def load_state_dict(self, d: dict[str, int]) -> None:
        """Take the checkpoint's seed; the batch shape must match or the data order would fork."""
        if (d["global_batch"], d["block_size"]) != (self.global_batch, self.block_size):
            raise ConfigError(
                f"the checkpoint was trained with global batch {d['global_batch']} and "
                f"model.block_size={d['block_size']}, this run has {self.global_batch} and "
                f"{self.block_size}; keep train.batch_size x ranks x train.grad_accum and "
                "model.block_size when resuming, or start a new run in its own hydra.run.dir"
            )
        self.seed = int(d["seed"])


class EvalBatches(Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed validation batches, built one at a time when asked for: batch i is drawn by a
    generator seeded by (seed, i), so it is the same at every eval, and memory stays that of one
    batch however many there are."""

    def __init__(
        self, data: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int
    ) -> None:
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.n_batches, self.seed = n_batches, seed
        self._n_windows = _n_windows(data, block_size, "val")

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = i + self.n_batches if i < 0 else i
        if not 0 <= i < self.n_batches:
            raise IndexError(f"batch {i} of {self.n_batches}")
        rng = np.random.default_rng([self.seed % 2**64, i])
        offsets = rng.integers(0, self._n_windows, size=self.batch_size)
        return _windows(self.data, offsets, self.block_size)


def eval_batches(
    data: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int = 0
) -> EvalBatches:
    """Fixed validation batches, the same at every eval, so losses are comparable over time."""
    return EvalBatches(data, block_size, batch_size, n_batches, seed)
