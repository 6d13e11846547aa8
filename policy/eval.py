"""Measure a trained policy: mean tour length, gap to a reference solver, seconds per instance.

    python -m policy.eval --run_dir tsp20_demo --num_instances 1000 --num_loc 20

Every decoding mode is measured on the same fresh instances (a seed that no
training epoch used). The reference is LKH-3 when the optional `elkai` package
is installed, otherwise nearest neighbour + 2-opt, and the report says which.
Gap = mean over instances of (policy length / reference length - 1), in percent.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import click
import torch

from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS, generate, tour_length
from policy.inference import check_memory, solve, trajectories_per_instance
from policy.loading import load_policy
from policy.options import choice, options
from policy.reference import SOLVERS, reference_tours

log = logging.getLogger(__name__)

MODES = (("greedy", 1), ("greedy", 8), ("sample", 1), ("multistart", 1), ("multistart", 8))
EVAL_SEED_OFFSET = 987_654_321


@dataclass
class EvalConfig:
    run_dir: str
    """Run folder or name under runs/."""
    num_instances: int = 1000
    """Fresh instances to evaluate on."""
    num_loc: int | None = None
    """Nodes per instance [default: the run's training size]."""
    distribution: str | None = choice(None, DISTRIBUTIONS)
    """Instance distribution [default: the run's training distribution]."""
    seed: int = 0
    """Seed of the evaluation instances (offset so they differ from any training epoch)."""
    reference: str = choice("auto", SOLVERS)
    """Reference solver: auto = LKH-3 when elkai is installed, else nearest neighbour + 2-opt."""
    num_samples: int = 16
    """Trajectories per instance in `sample` mode."""
    checkpoint: int | None = None
    """Epoch to load [default: the latest]."""
    batch_size: int = 250
    """Instances per forward pass."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if self.num_instances < 1:
            raise ValueError("num_instances must be positive")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError("num_loc must be at least 3")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
        if self.reference not in SOLVERS:
            raise ValueError(f"reference must be one of {SOLVERS}")


def run(cfg: EvalConfig) -> dict:
    """Evaluate every decoding mode; returns the report as a dict (also what --json prints)."""
    loaded = load_policy(cfg.run_dir, cfg.checkpoint, cfg.device)
    num_loc = cfg.num_loc or loaded.config.num_loc
    distribution = cfg.distribution or loaded.config.distribution
    per_instance = max(trajectories_per_instance(d, a, cfg.num_samples, num_loc) for d, a in MODES)
    rows = min(cfg.batch_size, cfg.num_instances) * per_instance
    check_memory(loaded.model, rows, num_loc, next(loaded.model.parameters()).device, cfg.num_samples)  # fail first
    locs = generate(cfg.num_instances, num_loc, distribution, seed=cfg.seed + EVAL_SEED_OFFSET)
    tic = time.perf_counter()
    ref_tours, ref_name = reference_tours(locs, cfg.reference, progress=True)
    ref_seconds = time.perf_counter() - tic
    ref_lengths = tour_length(locs, ref_tours)
    report = {
        "run_dir": str(loaded.run_dir),
        "checkpoint_epoch": loaded.epoch,
        "num_instances": cfg.num_instances,
        "num_loc": num_loc,
        "distribution": distribution,
        "reference": {
            "solver": ref_name,
            "mean_length": ref_lengths.mean().item(),
            "seconds_per_instance": ref_seconds / cfg.num_instances,
        },
        "modes": {},
    }
    for decode, augment in MODES:
        generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        tic = time.perf_counter()
        _, lengths = solve(
            loaded.model, locs, decode, augment, cfg.num_samples, cfg.batch_size, generator, progress=True
        )
        seconds = time.perf_counter() - tic
        name = (
            f"{decode}"
            + (f" x{augment}" if augment > 1 else "")
            + (f" (best of {cfg.num_samples})" if decode == "sample" else "")
        )
        report["modes"][name] = {
            "mean_length": lengths.mean().item(),
            "gap_percent": ((lengths / ref_lengths - 1).mean() * 100).item(),
            "seconds_per_instance": seconds / cfg.num_instances,
        }
    return report


def format_report(report: dict) -> str:
    ref = report["reference"]
    lines = [
        f"{report['run_dir']} (epoch {report['checkpoint_epoch']}): {report['num_instances']} {report['distribution']} "
        f"TSP{report['num_loc']} instances",
        f"reference: {ref['solver']}, mean length {ref['mean_length']:.4f}, "
        f"{ref['seconds_per_instance'] * 1e3:.2f} ms/instance",
        f"{'mode':<28}{'mean length':>12}{'gap %':>9}{'ms/inst':>10}",
    ]
    for name, m in report["modes"].items():
        lines.append(
            f"{name:<28}{m['mean_length']:>12.4f}{m['gap_percent']:>9.3f}{m['seconds_per_instance'] * 1e3:>10.3f}"
        )
    return "\n".join(lines)


@click.command()
@options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def main(as_json, **settings):
    """Tour length, gap to a reference solver and speed, for every decoding mode."""
    with command():
        report = run(EvalConfig(**settings))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


if __name__ == "__main__":
    main()
