"""Paired minibatches (x_src, x_tgt) streamed from a pair dump.

Built on sae.data.RowStream: bounded-memory window shuffle, deterministic for a
seed, able to start at any step (so a resumed run sees the batches it would
have seen), sharded by rank and world size, and split by instance into train
and validation. Each side can be normalised from the dump's stored statistics
(`none`, `center`, `standard`; see clt.normalization).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from clt.normalization import Normalizer
from clt.pairs import parse_pairs
from policy.loading import LoadedPolicy, read_config
from policy.runs import check_name, list_checkpoints
from sae.data import RowStream, split_instances
from sae.hook_names import hook_names
from sae.registry import read_registry, registered_dump
from sae.runs import clt_activations_dir, owning_run
from sae.store import Dump, open_dump


def find_pair(run_dir: Path, pair: str, root: Path | None = None) -> Path:
    """A pair dump's folder: from the run's registry (checked: not dangling, not half-replaced), else the
    default location."""
    entry = read_registry(run_dir).get(pair)
    if entry is None:
        return clt_activations_dir(run_dir, pair, root)
    return registered_dump(run_dir, pair, entry).path


CONDITION_SEP = "__"
"""Between a pair's name and its collection condition in a dump's name: clt_L0_to_L1__clustered_n20_e36_seed0."""


def condition_tag(policy: LoadedPolicy, distribution: str, num_loc: int, seed: int) -> str | None:
    """What a pair dump's name adds to the pair's: None for the run's own condition (its training distribution and
    size, its latest checkpoint, seed 0), else `<distribution>_n<nodes>_e<epoch>_seed<seed>`. Dumps of one pair
    under different conditions live side by side, and none re-points another's registry entry."""
    own = (distribution, num_loc, policy.epoch, seed) == (
        policy.config.distribution, policy.config.num_loc, max(list_checkpoints(policy.run_dir)), 0
    )  # fmt: skip
    return None if own else f"{distribution}_n{num_loc}_e{policy.epoch}_seed{seed}"


def dump_name(pair: str, condition: str | None) -> str:
    """The registry name (and folder name) of a pair's dump under a condition (`condition_tag`)."""
    return pair if condition is None else f"{pair}{CONDITION_SEP}{check_name(condition, 'condition')}"


def training_dump(folder: Path, train_cfg: dict) -> tuple[Path, Dump]:
    """The run a transcoder folder belongs to (sae.runs.owning_run) and the pair dump it was trained on."""
    run_dir = owning_run(folder, train_cfg)
    return run_dir, open_pair(run_dir / train_cfg["dataset_path"])


def pair_name(run_dir: Path, pair: str) -> str:
    """A pair name from a name or a `source:target` spec (checked against the run's hook names)."""
    if ":" not in pair:  # a name, or clt_multilayer for a multi-layer transcoder over every layer's mlp pair
        return check_name(pair, "pair name")
    return parse_pairs(pair, hook_names(read_config(run_dir).policy.num_encoder_layers))[0].name


def pair_path(run_dir: Path, pair: str, root: Path | None) -> Path:
    """The pair's dump folder; a clear error naming the collected pairs when it has none."""
    path = find_pair(run_dir, pair, root)
    if not path.exists():
        collected = sorted(n for n, e in read_registry(run_dir).items() if e.get("kind") == "clt_pair")
        raise FileNotFoundError(
            f"no data for pair {pair!r} (looked in {path}); pairs collected for {run_dir.name}: "
            f"{', '.join(collected) or 'none'}; collect with python -m clt.collect_pairs --run_dir {run_dir}"
        )
    return path


def open_pair(path: str | Path, verify: str = "cached") -> Dump:
    """Open a pair dump (checksums verified as `sae.store.open_dump`'s `verify` says) and check that it is one:
    both sides, the same rows."""
    dump = open_dump(path, verify=verify)
    missing = {"sources", "targets"} - set(dump.arrays)
    if missing:
        raise ValueError(f"{dump.path} is not a pair dump: no {sorted(missing)}")
    src, tgt = dump.arrays["sources"], dump.arrays["targets"]
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"{dump.path}: sources have {src.shape[0]} rows, targets {tgt.shape[0]}")
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
        verify: str = "cached",
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


MULTILAYER = "clt_multilayer"
"""The run-folder name of multi-layer transcoders (trained on every layer's mlp_in -> mlp_out pair)."""

ROW_ALIGNMENT = ("num_instances", "nodes_per_instance", "distribution", "seed", "checkpoint_sha256")


def layer_pair_names(n_layers: int) -> list[str]:
    """The per-layer pairs a multi-layer transcoder trains on: clt_L{i}.mlp_in_to_L{i}.mlp_out."""
    return [f"clt_L{i}.mlp_in_to_L{i}.mlp_out" for i in range(n_layers)]


class MultiLayerDataset:
    """Every layer's (mlp_in, mlp_out) at once, from the per-layer pair dumps that one collection wrote row-aligned.

    Batches are (xs, ys), each [layer, batch, d]; the split, shuffle, resume and rank slicing are PairDataset's.
    """

    def __init__(
        self,
        paths: list[str | Path],
        batch_size: int = 1024,
        val_ratio: float = 0.1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.dumps = [open_pair(p) for p in paths]
        self.dump = self.dumps[0]
        for dump in self.dumps[1:]:
            differ = [k for k in ROW_ALIGNMENT if dump.metadata.get(k) != self.dump.metadata.get(k)]
            if differ:
                raise ValueError(
                    f"{dump.path} and {self.dump.path} were not collected together (they differ in {differ}): "
                    "collect every layer's pair in one python -m clt.collect_pairs run"
                )
        self.train_ids, self.val_ids = split_instances(self.dump.num_instances, val_ratio, seed)
        arrays = {}
        for i, dump in enumerate(self.dumps):
            arrays[f"sources_{i}"], arrays[f"targets_{i}"] = dump.arrays["sources"], dump.arrays["targets"]
        n = self.dump.nodes_per_instance
        self.train = RowStream(arrays, n, self.train_ids, batch_size, seed, rank=rank, world_size=world_size)
        self.val = RowStream(arrays, n, self.val_ids, batch_size, seed) if len(self.val_ids) else None

    @property
    def n_layers(self) -> int:
        return len(self.dumps)

    @property
    def d(self) -> int:
        return self.dump.arrays["sources"].shape[1]

    def statistics(self) -> list[torch.Tensor]:
        """[layer, d] source means, source stds, target means, target stds."""
        stats = [[torch.from_numpy(v) for v in (*d.stats("sources"), *d.stats("targets"))] for d in self.dumps]
        return [torch.stack(column) for column in zip(*stats, strict=True)]

    def _stacked(self, stream: RowStream, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in stream.epoch(epoch, start_step):
            xs = torch.stack([batch[f"sources_{i}"] for i in range(self.n_layers)])
            ys = torch.stack([batch[f"targets_{i}"] for i in range(self.n_layers)])
            yield xs, ys

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._stacked(self.train, epoch, start_step)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All validation rows (not sliced by rank: validation runs on rank 0)."""
        return self._stacked(self.val, 0, 0) if self.val is not None else iter(())


if __name__ == "__main__":  # python -m clt.datasets: a dump's statistics and throughput, as python -m clt.describe dump
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "clt.describe", "dump", *sys.argv[1:]])  # imports this module once
