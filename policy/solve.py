"""Solve your own instances with a trained policy.

    python -m policy.solve --run_dir tsp20_demo --instances X.npy --out tours.npy
    python -m policy.solve --run_dir tsp20_demo --instances berlin52.tsp --decode multistart --augment 8

`X.npy` holds float coordinates [B, n, 2] (or one instance [n, 2]) in the unit
square, the square the policy was trained on. A TSPLIB `.tsp` file (EUC_2D) is
scaled into the unit square, and its tour length is reported in the file's units.
The output is int64 [B, n]: each row visits every node once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from policy.checks import check_device, check_types
from policy.cli import command
from policy.inference import AUGMENTS, DECODE_MODES, solve
from policy.instances import read_instances
from policy.io import save_npy
from policy.loading import load_policy
from policy.options import choice, options

log = logging.getLogger(__name__)


@dataclass
class SolveConfig:
    run_dir: str
    """Run folder or name under runs/."""
    instances: str
    """.npy of float [B, n, 2] or [n, 2], or a TSPLIB EUC_2D .tsp file."""
    out: str = "tours.npy"
    """Where the int64 [B, n] tours are written."""
    decode: str = choice("greedy", DECODE_MODES)
    """greedy: one trajectory; sample: best of num_samples; multistart: greedy from every node, best kept."""
    augment: int = 1
    """1, or 8: also solve the 8 symmetries of the unit square and keep the best."""
    num_samples: int = 16
    """Trajectories per instance with decode=sample."""
    checkpoint: int | None = None
    """Epoch to load [default: the latest]."""
    batch_size: int = 256
    """Instances per forward pass."""
    seed: int = 0
    """Seed for sampling."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}")


@dataclass
class SolveResult:
    tours: np.ndarray  # [B, n] int64
    lengths: np.ndarray  # [B], in the units of the input
    tsplib_length: int | None  # TSPLIB's integer EUC_2D length, for a .tsp input


def run(cfg: SolveConfig) -> SolveResult:
    loaded = load_policy(cfg.run_dir, cfg.checkpoint, cfg.device)
    locs, factor, tsplib = read_instances(Path(cfg.instances))
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    tours, lengths = solve(
        loaded.model, locs, cfg.decode, cfg.augment, cfg.num_samples, cfg.batch_size, generator, progress=True
    )
    save_npy(cfg.out, tours.numpy().astype(np.int64))
    tsplib_length = tsplib.euc_2d_length(tours[0].tolist()) if tsplib is not None else None
    return SolveResult(tours.numpy(), lengths.double().numpy() * factor, tsplib_length)


@click.command()
@options(SolveConfig)
def main(**settings):
    """Solve TSP instances with a trained policy and write the tours."""
    with command():
        result = run(SolveConfig(**settings))
    b, n = result.tours.shape
    click.echo(f"wrote {b} tour(s) of {n} nodes to {settings['out']}")
    if result.tsplib_length is not None:
        click.echo(
            f"tour length: {result.lengths[0]:.2f} (Euclidean, file units); "
            f"TSPLIB EUC_2D length: {result.tsplib_length}"
        )
    else:
        click.echo(f"mean tour length: {result.lengths.mean():.4f}")


if __name__ == "__main__":
    main()
