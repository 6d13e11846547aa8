"""Paired minibatches (x_src, x_tgt) streamed from a pair dump.

Built on sae.data.RowStream: bounded-memory window shuffle, deterministic for a
seed, able to start at any step (so a resumed run sees the batches it would
have seen), sharded by rank and world size, and split by instance into train
and validation. Each side can be normalised from the dump's stored statistics
(`none`, `center`, `standard`); `Normalizer.inverse` brings predictions back to raw units.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae.data import RowStream, split_instances
from sae.runs import clt_activations_dir
from sae.store import Dump, open_dump, read_registry

NORMALIZATIONS = ("none", "center", "standard")


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor:
    """(x - mean) / std for `standard`, x - mean for `center`, x for `none`."""
    if mode == "none":
        return x
    x = x - mean.to(x.device)
    return x / std.to(x.device) if mode == "standard" else x


def denormalize(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor:
    """The inverse of `normalize`."""
    if mode == "none":
        return y
    y = y * std.to(y.device) if mode == "standard" else y
    return y + mean.to(y.device)


@dataclass
class Normalizer:
    """x -> (x - mean) / std (standard), x - mean (center) or x (none); and back."""

    mode: str
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    def __post_init__(self):
        if self.mode not in NORMALIZATIONS:
            raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {self.mode!r}")
        self.std = self.std.clamp_min(1e-6)

    @classmethod
    def from_dump(cls, dump: Dump, array: str, mode: str) -> Normalizer:
        mean, std = dump.stats(array)
        return cls(mode, torch.from_numpy(mean), torch.from_numpy(std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std, self.mode)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return denormalize(y, self.mean, self.std, self.mode)


def find_pair(run_dir: Path, pair: str, root: Path | None = None) -> Path:
    """A pair dump's folder: from the run's registry, else the default location."""
    entry = read_registry(run_dir).get(pair)
    return Path(entry["path"]) if entry else clt_activations_dir(run_dir, pair, root)


def open_pair(path: str | Path, verify: bool = False) -> Dump:
    """Open a pair dump and check that it is one: both sides, the same rows, finite statistics."""
    dump = open_dump(path, verify=verify)
    missing = {"sources", "targets"} - set(dump.arrays)
    if missing:
        raise ValueError(f"{dump.path} is not a pair dump: no {sorted(missing)}")
    src, tgt = dump.arrays["sources"], dump.arrays["targets"]
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"{dump.path}: sources have {src.shape[0]} rows, targets {tgt.shape[0]}")
    for side in ("sources", "targets"):
        mean, std = dump.stats(side)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ValueError(f"{dump.path}: NaN or Inf rows in {side}")
    return dump


class PairDataset:
    """Train and validation streams over one pair dump."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 1024,
        val_ratio: float = 0.1,
        seed: int = 0,
        normalize_source: str = "none",
        normalize_target: str = "none",
        rank: int = 0,
        world_size: int = 1,
        verify: bool = False,
    ):
        self.dump = open_pair(path, verify)
        self.train_ids, self.val_ids = split_instances(self.dump.num_instances, val_ratio, seed)
        arrays = {"sources": self.dump.arrays["sources"], "targets": self.dump.arrays["targets"]}
        n = self.dump.nodes_per_instance
        self.train = RowStream(arrays, n, self.train_ids, batch_size, seed, rank=rank, world_size=world_size)
        self.val = (
            RowStream(arrays, n, self.val_ids, batch_size, seed, rank=rank, world_size=world_size)
            if len(self.val_ids)
            else None
        )
        self.source_norm = Normalizer.from_dump(self.dump, "sources", normalize_source)
        self.target_norm = Normalizer.from_dump(self.dump, "targets", normalize_target)

    @property
    def d_src(self) -> int:
        return self.dump.arrays["sources"].shape[1]

    @property
    def d_tgt(self) -> int:
        return self.dump.arrays["targets"].shape[1]

    def _pairs(self, stream: RowStream, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in stream.epoch(epoch, start_step):
            yield self.source_norm(batch["sources"]), self.target_norm(batch["targets"])

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (x_src, x_tgt) training batches of one epoch, from `start_step` on."""
        return self._pairs(self.train, epoch, start_step)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (x_src, x_tgt) validation batches (empty when val_ratio is 0)."""
        return self._pairs(self.val, 0, 0) if self.val is not None else iter(())
