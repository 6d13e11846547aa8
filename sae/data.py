"""Minibatches of rows streamed from memory-mapped dumps, split by instance.

The nodes of one instance are correlated, so the train/validation split is by
instance, never by row. Each epoch visits the instances of its split in an
order fixed by (seed, epoch); rows are read a window of instances at a time
and shuffled inside the window, so memory stays bounded by the window. A
resumed run that starts at `start_step` sees exactly the batches it would have
seen. Several arrays with the same rows (e.g. a pair's sources and targets)
stream together, row for row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def split_instances(num_instances: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), a seeded split of 0..num_instances-1; both sorted."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    order = np.random.default_rng(seed).permutation(num_instances)
    num_val = int(round(num_instances * val_ratio))
    if val_ratio > 0 and num_val == 0 and num_instances > 1:
        num_val = 1
    if num_val >= num_instances:
        raise ValueError(f"{num_instances} instances are too few for a validation split of {val_ratio}")
    return np.sort(order[num_val:]), np.sort(order[:num_val])


class RowStream:
    """Shuffled minibatches `{name: tensor[batch, dim]}` over the rows of some instances."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        nodes_per_instance: int,
        instance_ids: np.ndarray,
        batch_size: int,
        seed: int = 0,
        window_batches: int = 16,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if len(instance_ids) == 0:
            raise ValueError("no instances to stream")
        self.arrays = arrays
        self.nodes = nodes_per_instance
        self.instance_ids = np.asarray(instance_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.window_instances = max(1, (batch_size * window_batches) // nodes_per_instance)

    @property
    def rows(self) -> int:
        return len(self.instance_ids) * self.nodes

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows // self.batch_size)

    def _rows_of(self, instances: np.ndarray) -> np.ndarray:
        return (instances[:, None] * self.nodes + np.arange(self.nodes)).reshape(-1)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch, from batch `start_step` on (the last one may be smaller)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.instance_ids)
        step, carry = 0, None
        for start in range(0, len(order), self.window_instances):
            window_rows = self._rows_of(order[start : start + self.window_instances])
            window_rows = window_rows[rng.permutation(len(window_rows))]
            rows = window_rows if carry is None else np.concatenate([carry, window_rows])
            full = len(rows) // self.batch_size * self.batch_size
            for b in range(0, full, self.batch_size):
                if step >= start_step:
                    yield self._read(rows[b : b + self.batch_size])
                step += 1
            carry = rows[full:]
        if carry is not None and len(carry) and step >= start_step:
            yield self._read(carry)

    def _read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        order = np.argsort(rows)  # read in file order, then put back in shuffled order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_rows = rows[order]
        return {
            name: torch.from_numpy(np.asarray(array[sorted_rows], dtype=np.float32)[inverse])
            for name, array in self.arrays.items()
        }
