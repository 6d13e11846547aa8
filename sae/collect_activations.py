"""Dump a policy's activations at named hook points to disk.

    python -m sae.collect_activations --run_dir tsp20_demo --hooks encoder_layer_0,encoder_layer_1 --num_instances 10000

Rows are (instance, node) in a fixed order: row i is node i % n of instance i // n
(for decoder points: decoding step i % n). When only encoder points are asked
for, only the encoder runs. The dump goes to `runs/<run>/sae/activations/<name>/`
(or under `--activations_root` / $ACTIVATIONS_ROOT) and is recorded in
`runs/<run>/sae/activation_store.json`. The same arguments reuse a complete
dump unless `--overwrite`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import click

from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS
from policy.loading import load_policy
from policy.options import choice, options
from sae.collection_loop import collect, collection_request, hook_dims, instance_batches, provenance
from sae.hooks import HookedPolicy
from sae.registry import check_registry_writable, new_collection_id, register_dataset
from sae.runs import activations_root, sae_activations_dir
from sae.store import DTYPES, DumpWriter, dump_lock, reusable


@dataclass
class CollectConfig:
    run_dir: str
    """Run folder or name under runs/."""
    hooks: tuple[str, ...] = ()
    """Hook names to dump (see sae.hooks) [default: every encoder_layer_{i}]."""
    num_instances: int = 1000
    """Instances to run; rows = num_instances * num_loc."""
    num_loc: int | None = None
    """Nodes per instance [default: the run's training size]."""
    distribution: str | None = choice(None, DISTRIBUTIONS)
    """Instance distribution [default: the run's]."""
    seed: int = 0
    """Seed of the instances."""
    batch_size: int = 256
    """Instances per forward pass."""
    checkpoint: int | None = None
    """Epoch to load [default: the latest]."""
    dtype: str = choice("float32", DTYPES)
    """Storage dtype."""
    activations_root: str | None = None
    """Store the dump under this folder instead of the run (default: $ACTIVATIONS_ROOT, else the run)."""
    name: str | None = None
    """Dataset name [default: <distribution>_n<nodes>_<count>x_seed<seed>]."""
    overwrite: bool = False
    """Replace an existing dump."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        self.hooks = tuple(self.hooks)
        if self.num_instances < 1 or self.batch_size < 1:
            raise ValueError("num_instances and batch_size must be positive")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError("num_loc must be at least 3")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")


def run(cfg: CollectConfig) -> Path:
    """Collect (or reuse) the dump; returns its folder."""
    loaded = load_policy(cfg.run_dir, cfg.checkpoint, cfg.device)
    hooked = HookedPolicy(loaded.model)
    names = hooked.check_names(cfg.hooks or [f"encoder_layer_{i}" for i in range(len(loaded.model.layers))])
    num_loc = cfg.num_loc or loaded.config.num_loc
    distribution = cfg.distribution or loaded.config.distribution
    name = cfg.name or f"{distribution}_n{num_loc}_{cfg.num_instances}x_seed{cfg.seed}"
    root = activations_root(cfg.activations_root)
    path = sae_activations_dir(loaded.run_dir, name, root)
    request = {
        "hooks": names,
        **collection_request(loaded, cfg.num_instances, num_loc, distribution, cfg.seed, cfg.dtype),
    }
    check_registry_writable(loaded.run_dir)
    with dump_lock(path):  # a second collector of this dump waits here, then reuses or replaces it
        if not reusable(path, request, cfg.overwrite, "pass --overwrite or another --name"):
            _collect(cfg, loaded, hooked, path, request)
        register_dataset(loaded.run_dir, name, path, {"kind": "sae"})
    return path


def _collect(cfg: CollectConfig, loaded, hooked: HookedPolicy, path: Path, request: dict) -> None:
    names, num_loc = request["hooks"], request["nodes_per_instance"]
    rows = cfg.num_instances * num_loc
    dims = hook_dims(hooked, names, num_loc)
    batches = instance_batches(cfg.num_instances, num_loc, request["distribution"], cfg.seed, cfg.batch_size)
    with DumpWriter(path, dims, rows, cfg.dtype, overwrite=cfg.overwrite) as writer:
        locs = collect(hooked, batches, [(writer, {n: n for n in names})], cfg.num_instances)
        writer.add_file("locs", locs)
        writer.finish({
            **request,
            "kind": "sae",
            "collection_id": new_collection_id(),
            "shapes": {n: [rows, d] for n, d in dims.items()},
            **provenance(loaded, request),
            "config": asdict(cfg),
        })  # fmt: skip


@click.command()
@options(CollectConfig)
def main(**settings):
    """Dump activations at named hook points to .npy files with a metadata.json."""
    with command():
        path = run(CollectConfig(**settings))
    click.echo(f"activations in {path}")


if __name__ == "__main__":
    main()
