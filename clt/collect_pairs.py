"""Collect row-aligned (source, target) activation pairs for transcoders.

    python -m clt.collect_pairs --run_dir tsp20_demo                      (pairs from clt/configs/tsp20_demo.json)
    python -m clt.collect_pairs --run_dir tsp20_demo --layer_pairs encoder_layer_0:encoder_layer_2

One forward pass per batch serves every pair (each hook is computed once), and
row i means the same (instance, node) in every pair, so the targets of
L0 -> L1 equal the sources of L1 -> L2 row for row. Decoder pairs
(`decoder.context:decoder.glimpse`) have a row per (instance, decoding step), step t
of instance i at row i * nodes + t, along the policy's greedy tours or the tours
of `--tours file.npy`; instance i's rows are the same instance in every pair. Each pair is written with
sae's DumpWriter to `runs/<run>/clt/activations/<pair>/{sources.npy,
targets.npy, locs.npy, metadata.json}` (or under the external activations root)
and registered in `runs/<run>/sae/activation_store.json`. Collectors of the same
dumps take turns (sae.store.dump_lock); the pairs one collection writes are
published together and carry one collection id, which readers check.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from clt.datasets import condition_tag, dump_name
from clt.pairs import (
    LayerPair,
    PairsConfig,
    default_config_path,
    default_instances,
    default_layer_pairs,
    parse_pairs,
    read_pairs_config,
)
from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS
from policy.io import file_sha256
from policy.loading import load_policy
from policy.options import choice, options
from sae.collection_loop import collect, collection_request, hook_dims, instance_batches, provenance
from sae.hooks import HookedPolicy
from sae.registry import check_registry_writable, new_collection_id, register_datasets
from sae.runs import activations_root, clt_activations_dir
from sae.store import DTYPES, DumpWriter, dump_lock, reusable


@dataclass
class CollectPairsConfig:
    run_dir: str
    """Run folder or name under runs/."""
    config: str | None = None
    """Pairs config JSON [default: clt/configs/<run name>.json when it exists]."""
    layer_pairs: str | None = None
    """'src:tgt,src:tgt' hook pairs; overrides the config file [default, without either: every encoder layer's
    mlp_in -> mlp_out (the multi-layer CLT's pairs), then each layer's output -> the next's]."""
    num_instances_per_pair: int | None = None
    """Instances per pair; overrides the config file [default: the config's, else 200000 rows' worth: 10000 of
    TSP20, 4000 of TSP50]."""
    seed: int | None = None
    """Seed of the instances; overrides the config file [default: the config's, else 0]."""
    distribution: str | None = choice(None, DISTRIBUTIONS)
    """Instance distribution; overrides the config file [default: the run's]."""
    num_loc: int | None = None
    """Nodes per instance [default: the run's training size]."""
    batch_size: int = 256
    """Instances per forward pass."""
    checkpoint: int | None = None
    """Epoch to load [default: the latest]."""
    dtype: str = choice("float32", DTYPES)
    """Storage dtype."""
    activations_root: str | None = None
    """Store pairs under this folder (default: $ACTIVATIONS_ROOT, else the run)."""
    overwrite: bool = False
    """Replace existing pair dumps."""
    device: str = "cpu"
    """torch device."""
    tours: str = "greedy"
    """Decoder pairs (rows per decoding step): the tours the steps follow: `greedy` (the policy's own) or a .npy
    file of tours [instances, nodes] for the collected instances (teacher forcing, e.g. optimal tours)."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")
        if self.num_instances_per_pair is not None and self.num_instances_per_pair < 1:
            raise ValueError("num_instances_per_pair must be positive")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError("num_loc must be at least 3")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")


def resolve_settings(cfg: CollectPairsConfig, run_name: str, n_layers: int) -> PairsConfig:
    """The config file (explicit, or the run's default if present) with the CLI flags on top; without pairs from
    either, default_layer_pairs."""
    path = Path(cfg.config) if cfg.config else default_config_path(run_name)
    base = read_pairs_config(path) if cfg.config or path.is_file() else PairsConfig()
    if cfg.layer_pairs:
        base.layer_pairs = [p for p in cfg.layer_pairs.split(",") if p.strip()]
    if cfg.num_instances_per_pair is not None:
        base.num_instances_per_pair = cfg.num_instances_per_pair
    if cfg.seed is not None:
        base.seed = cfg.seed
    if cfg.distribution is not None:
        base.distribution = cfg.distribution
    if not base.layer_pairs:
        base.layer_pairs = default_layer_pairs(n_layers)
    return base


def run(cfg: CollectPairsConfig) -> dict[str, Path]:
    """Collect every pair (reusing identical complete dumps); returns dump name -> folder (clt.datasets.dump_name:
    the pair's name, with the condition appended when it is not the run's own)."""
    loaded = load_policy(cfg.run_dir, cfg.checkpoint, cfg.device)
    hooked = HookedPolicy(loaded.model)
    settings = resolve_settings(cfg, loaded.run_dir.resolve().name, loaded.config.policy.num_encoder_layers)
    pairs = parse_pairs(settings.layer_pairs, hooked.hook_names())
    num_loc = cfg.num_loc or loaded.config.num_loc
    settings.num_instances_per_pair = settings.num_instances_per_pair or default_instances(num_loc)
    distribution = settings.distribution or loaded.config.distribution
    condition = condition_tag(loaded, distribution, num_loc, settings.seed)
    root = activations_root(cfg.activations_root)
    common = collection_request(
        loaded, settings.num_instances_per_pair, num_loc, distribution, settings.seed, cfg.dtype
    )
    tours = read_tours(cfg.tours, settings.num_instances_per_pair, num_loc)
    names = {pair.name: dump_name(pair.name, condition) for pair in pairs}
    paths = {pair.name: clt_activations_dir(loaded.run_dir, names[pair.name], root) for pair in pairs}
    check_registry_writable(loaded.run_dir)
    with ExitStack() as locks:
        for path in sorted(paths.values()):  # one order for every collector, so two never deadlock
            locks.enter_context(dump_lock(path))  # a second collector of these dumps waits here
        followed = {"tours": "greedy" if tours is None else f"file sha256 {file_sha256(cfg.tours)}"}
        request = {
            p.name: {**common, "hooks": [p.source, p.target], **(followed if p.on_decoder else {})} for p in pairs
        }
        todo = [pair for pair in pairs if not reusable(paths[pair.name], request[pair.name], cfg.overwrite)]
        if todo:
            _collect_pairs(cfg, loaded, hooked, todo, paths, request, tours)
        register_datasets(loaded.run_dir, {names[p.name]: (paths[p.name], {"kind": "clt_pair"}) for p in pairs})
    return {names[name]: path for name, path in paths.items()}


def read_tours(path: str, num_instances: int, num_loc: int) -> np.ndarray | None:
    """None for `greedy`, else the tours file [instances, nodes] (int64), checked: one permutation per instance."""
    if path == "greedy":
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--tours: no file {path} (give greedy, or a .npy of tours [instances, nodes])")
    tours = np.load(path, allow_pickle=False)
    if tours.shape != (num_instances, num_loc) or not np.issubdtype(tours.dtype, np.integer):
        raise ValueError(f"--tours {path}: expected integer tours [{num_instances}, {num_loc}], got {tours.dtype} "
                         f"{list(tours.shape)}")  # fmt: skip
    if not (np.sort(tours, axis=1) == np.arange(num_loc)).all():
        raise ValueError(f"--tours {path}: every row must visit each of the {num_loc} cities once")
    return tours.astype(np.int64)


def _collect_pairs(cfg, loaded, hooked, pairs: list[LayerPair], paths: dict[str, Path], request: dict,
                   tours: np.ndarray | None) -> None:  # fmt: skip
    """Write every pair, then publish them together under one collection id (see sae.registry.registered_dump)."""
    common = request[pairs[0].name]
    n, num_instances = common["nodes_per_instance"], common["num_instances"]
    dims = hook_dims(hooked, sorted({h for p in pairs for h in (p.source, p.target)}), n)
    rows = num_instances * n
    batches = instance_batches(num_instances, n, common["distribution"], common["seed"], cfg.batch_size)
    collection_id = new_collection_id()
    with ExitStack() as stack:
        writers = {
            p.name: stack.enter_context(
                DumpWriter(
                    paths[p.name],
                    {"sources": dims[p.source], "targets": dims[p.target]},
                    rows,
                    cfg.dtype,
                    cfg.overwrite,
                )
            )
            for p in pairs
        }
        routes = [(writers[p.name], {p.source: "sources", p.target: "targets"}) for p in pairs]
        locs = collect(hooked, batches, routes, num_instances, tours)
        for pair in pairs:
            writers[pair.name].add_file("locs", locs)
            writers[pair.name].finish({
                **request[pair.name],
                "kind": "clt_pair",
                "row_meaning": "(instance, decoding step)" if pair.on_decoder else "(instance, city)",
                "collection_id": collection_id,
                "pair": pair.name,
                "hooks": [pair.source, pair.target],
                "source_hook": pair.source,
                "target_hook": pair.target,
                "tensors": {"sources": pair.source_tensor, "targets": pair.target_tensor},
                "shapes": {"sources": [rows, dims[pair.source]], "targets": [rows, dims[pair.target]]},
                **provenance(loaded, common),
                "config": asdict(cfg),
            }, publish=False)  # fmt: skip
        for writer in writers.values():
            writer.publish()


@click.command()
@options(CollectPairsConfig)
def main(**settings):
    """Collect row-aligned source/target activations for every layer pair."""
    with command():
        paths = run(CollectPairsConfig(**settings))
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


if __name__ == "__main__":
    main()
