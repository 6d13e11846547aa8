"""Look at layer pairs before training: scales, sparsity, rank, coupling, and the linear baseline.

    python -m clt.inspect_pairs --run_dir tsp20_demo [--pair clt_L0_to_L2] [--json]

What is measured, and how, is clt.pair_stats'.
"""

from __future__ import annotations

import json

import click

from clt.datasets import find_pair, open_pair
from clt.pair_stats import inspect_pair
from policy.cli import command
from policy.runs import resolve_run_dir
from sae.registry import read_registry


def run(
    run_dir: str, pairs: tuple[str, ...] = (), val_ratio: float = 0.1, seed: int = 0, verify: bool = False
) -> list[dict]:
    """Each pair's statistics; `verify`: hash every file again, even those verified before."""
    run_path = resolve_run_dir(run_dir)
    if not pairs:
        pairs = tuple(name for name, entry in read_registry(run_path).items() if entry.get("kind") == "clt_pair")
        if not pairs:
            raise FileNotFoundError(
                f"{run_path} has no collected pairs; run python -m clt.collect_pairs --run_dir {run_dir}"
            )
    dumps = [open_pair(find_pair(run_path, p), "always" if verify else "cached") for p in pairs]
    return [inspect_pair(dump, val_ratio, seed) for dump in dumps]


def format_table(reports: list[dict]) -> str:
    head = f"{'pair':<30}{'rows':>9}{'|src|':>8}{'|tgt|':>8}{'rank s/t':>12}{'zero%':>7}{'|corr|':>8}"
    head += f"{'ridge R2':>10}{'ridge FVU':>10}"
    lines = [head, "-" * len(head)]
    for r in reports:
        ridge = r["ridge"] or {"r2": float("nan"), "fvu": float("nan")}
        ranks = f"{r['sources']['effective_rank']:.1f}/{r['targets']['effective_rank']:.1f}"
        zero = 100 * (r["sources"]["near_zero_fraction"] + r["targets"]["near_zero_fraction"]) / 2
        lines.append(
            f"{r['pair']:<30}{r['rows']:>9}{r['sources']['norm']['mean']:>8.2f}{r['targets']['norm']['mean']:>8.2f}"
            f"{ranks:>12}{zero:>7.2f}{r['mean_abs_correlation']:>8.3f}{ridge['r2']:>10.4f}{ridge['fvu']:>10.4f}"
        )
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.option("--run_dir", required=True, help="Run folder, or a run name under runs/.")
@click.option("--pair", "pairs", multiple=True, help="Pair name (repeatable) [default: every collected pair].")
@click.option("--val_ratio", default=0.1, help="Fraction of instances held out to score the ridge baseline.")
@click.option("--seed", default=0, help="Seed of the train/validation split (use the trainer's).")
@click.option(
    "--verify", is_flag=True, help="Hash every file again, even those verified before (reads check each version once)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def main(run_dir, pairs, val_ratio, seed, verify, as_json):
    """Statistics of each layer pair and its ridge (dense linear) baseline."""
    with command():
        reports = run(run_dir, pairs, val_ratio, seed, verify)
    click.echo(json.dumps(reports, indent=2) if as_json else format_table(reports))


if __name__ == "__main__":
    main()
