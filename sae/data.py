"""Minibatches of rows streamed from dumps on disk, split by instance, with bounded memory.

The nodes of one instance are correlated, so the train/validation split is by
instance, never by row. An epoch shuffles blocks of instances (an order fixed
by seed and epoch), reads a window of blocks at a time and shuffles the rows
inside the window. Rows are read with `os.pread` from the `.npy` files, not
through a memory map of the whole file, so the process holds only the window
in memory (a memory map would keep every page it touched resident). A resumed
run that starts at `start_step` sees exactly the batches it would have seen.
Several arrays with the same rows (a pair's sources and targets) stream
together, row for row. For distributed training every rank walks the same
global batches and keeps only its slice of each (`rank`, `world_size`), so N
ranks together see exactly the batches one process would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch


def split_instances(num_instances: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), a seeded split of 0..num_instances-1; both sorted."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    order = np.random.default_rng(seed).permutation(num_instances)
    num_val = round(num_instances * val_ratio)
    if val_ratio > 0 and num_val == 0 and num_instances > 1:
        num_val = 1
    if num_val >= num_instances:
        raise ValueError(f"{num_instances} instances are too few for a validation split of {val_ratio}")
    return np.sort(order[num_val:]), np.sort(order[:num_val])


class RowReader:
    """Reads row ranges of a [rows, dim] array: with pread from its file if it is a memory map, else by slicing."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.dim = array.shape[1]
        self.dtype = array.dtype
        filename = getattr(array, "filename", None)
        self.fd = os.open(filename, os.O_RDONLY) if isinstance(array, np.memmap) and filename else None
        self.offset = array.offset if self.fd is not None else 0

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill `out` ([rows, dim], this array's dtype, contiguous) with rows start, start+1, ..."""
        if self.fd is None:
            out[:] = self.array[start : start + len(out)]
            return
        row_bytes = self.dim * self.dtype.itemsize
        wanted = len(out) * row_bytes
        got = os.preadv(self.fd, [memoryview(out).cast("B")], self.offset + start * row_bytes)
        if got != wanted:
            raise ValueError(f"{self.array.filename}: short read ({got} of {wanted} bytes); is the file truncated?")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a float32 array."""
        out = np.empty((stop - start, self.dim), self.dtype)
        self.read_into(out, start)
        return out.astype(np.float32, copy=False)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def read_instances(reader: RowReader, instances: np.ndarray, nodes: int) -> np.ndarray:
    """The rows of `instances` (in that order) as float32 [len * nodes, dim], one read per run of consecutive ids."""
    out = np.empty((len(instances) * nodes, reader.dim), reader.dtype)
    position = 0
    for run in np.split(instances, np.flatnonzero(np.diff(instances) != 1) + 1):
        if len(run):
            rows = len(run) * nodes
            reader.read_into(out[position : position + rows], int(run[0]) * nodes)
            position += rows
    return out.astype(np.float32, copy=False)


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
        block_instances: int = 32,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or window_batches < 1 or block_instances < 1:
            raise ValueError("batch_size, window_batches and block_instances must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(instance_ids) == 0:
            raise ValueError("no instances to stream")
        self.readers = {name: RowReader(array) for name, array in arrays.items()}
        self.nodes = nodes_per_instance
        self.instance_ids = np.sort(np.asarray(instance_ids))
        self.batch_size = batch_size
        self.seed = seed
        self.block_instances = block_instances
        self.window_blocks = max(1, (batch_size * window_batches) // (nodes_per_instance * block_instances))
        self.rank, self.world_size = rank, world_size

    @property
    def rows(self) -> int:
        return len(self.instance_ids) * self.nodes

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch, from batch `start_step` on (the last one may be smaller).

        Windows that hold only earlier batches are not read. With several ranks,
        each yields its slice of every global batch.
        """
        rng = np.random.default_rng([self.seed, epoch])
        ids = self.instance_ids
        blocks = [ids[i : i + self.block_instances] for i in range(0, len(ids), self.block_instances)]
        order = rng.permutation(len(blocks))
        skip = start_step * self.batch_size  # rows of the epoch's stream before the first batch wanted
        position = 0  # stream row at which the current window starts
        carry: dict[str, np.ndarray] | None = None  # rows read but not yet yielded (under one batch)
        size = self.batch_size
        for w in range(0, len(order), self.window_blocks):
            instances = np.concatenate([blocks[b] for b in order[w : w + self.window_blocks]])
            shuffle = rng.permutation(len(instances) * self.nodes)  # drawn even when skipped: same stream
            start, position = position, position + len(shuffle)
            if position <= skip:
                continue
            window = {name: read_instances(r, instances, self.nodes)[shuffle] for name, r in self.readers.items()}
            if carry is None:  # the first window read: drop the rows of skipped batches
                window = {name: rows[max(skip - start, 0) :] for name, rows in window.items()}
            else:  # the batch the last window began, completed from this one (the only rows copied twice)
                need = size - _length(carry)
                carry = {name: np.concatenate([carry[name], window[name][:need]]) for name in window}
                window = {name: rows[need:] for name, rows in window.items()}
                if _length(carry) < size:
                    continue
                yield self._slice(carry)
            full = _length(window) // size
            for b in range(full):
                yield self._slice({name: rows[b * size : (b + 1) * size] for name, rows in window.items()})
            carry = {name: rows[full * size :] for name, rows in window.items()}
        if carry is not None and _length(carry):
            yield self._slice(carry)

    def _slice(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.world_size > 1:
            batch = {name: np.array_split(rows, self.world_size)[self.rank] for name, rows in batch.items()}
        return {name: torch.from_numpy(np.ascontiguousarray(rows)) for name, rows in batch.items()}


def _length(rows: dict[str, np.ndarray]) -> int:
    return len(next(iter(rows.values())))
