"""How far do attribution graphs hold on a run? Trace many decisions and summarise their scores and checks.

    python examples/decisions.py --run_dir tsp20_demo [--steps 2,6,10,14] [--glimpse tangent] [--attention tangent]

For each of --instances fresh instances (seeds --seed, --seed + 1, ...) and each step, the policy's greedy tour
is followed to that step and the decision is attributed (clt.graph.attribution.attribute, the defaults of
`python -m clt.graph.attribute`). One row per decision: the graph's replacement and completeness scores, check
(a) (removal in the local model: the largest relative error) and check (b) (removal in the live policy: Pearson r
and sign agreement, with the transcoders' selection free and held); then the means.
"""

from __future__ import annotations

import click
import numpy as np

from clt.graph.attention import ATTENTIONS
from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import Decision, greedy_tour
from clt.graph.pointer import GLIMPSES
from clt.graph.replacement import load_replacement
from policy.env import generate
from policy.loading import load_policy
from policy.runs import resolve_run_dir


@click.command()
@click.option("--run_dir", default="tsp20_demo", help="Run folder or name.")
@click.option("--instances", default=5, help="Fresh instances.")
@click.option("--steps", default="2,6,10,14", help="Steps of each tour to attribute (comma-separated).")
@click.option("--seed", default=100, help="Seed of the first instance.")
@click.option("--verify", default=20, help="Features checked by removal per decision.")
@click.option("--glimpse", type=click.Choice(GLIMPSES), default="frozen", help="The glimpse in the local model.")
@click.option("--attention", type=click.Choice(ATTENTIONS), default="frozen", help="Encoder attention in it.")
def main(run_dir, instances, steps, seed, verify, glimpse, attention):
    """Attribute several decisions of a run and summarise how well the graphs hold."""
    run = resolve_run_dir(run_dir)
    replacement = load_replacement(run)
    loaded = load_policy(run, replacement.checkpoint_epoch)
    n = loaded.config.num_loc
    steps = [int(s) for s in steps.split(",")]
    if not steps or max(steps) > n - 2 or min(steps) < 0:
        raise click.BadParameter(f"steps must lie in 0..{n - 2} (a score difference needs two candidates)")
    columns = (("decision", -14), ("picks", 6), ("repl.", 8), ("compl.", 8), ("(a) err", 10), ("r", 8),
               ("sign", 7), ("r held", 8), ("sign held", 10))  # fmt: skip
    click.echo("".join(f"{name:<{-w}}" if w < 0 else f"{name:>{w}}" for name, w in columns))
    rows = []
    for i in range(instances):
        locs = generate(1, n, loaded.config.distribution, seed=seed + i)[0]
        tour = greedy_tour(loaded.model, locs)
        for step in steps:
            doc = attribute(
                loaded.model,
                replacement,
                Decision(locs, tour[:step]),
                TraceOptions(verify=verify, glimpse=glimpse, attention=attention),
                {},
            ).doc
            live, held = doc["verification"]["live"], doc["verification"]["live"]["selection_held"]
            row = [doc["scores"]["graph"]["replacement"], doc["scores"]["graph"]["completeness"],
                   doc["verification"]["local"]["max_relative_error"], live["pearson_r"], live["sign_agreement"],
                   held["pearson_r"], held["sign_agreement"]]  # fmt: skip
            rows.append(row)
            click.echo(f"{f'seed{seed + i} t={step}':<14}{tour[step]:>6}{row[0]:>8.3f}{row[1]:>8.3f}{row[2]:>10.1e}"
                       f"{row[3]:>8.3f}{row[4]:>7.0%}{row[5]:>8.3f}{row[6]:>10.0%}")  # fmt: skip
    mean = np.nanmean(np.array(rows), axis=0)
    worst = max(r[2] for r in rows)
    click.echo(f"{f'mean of {len(rows)}':<20}{mean[0]:>8.3f}{mean[1]:>8.3f}{worst:>10.1e}{mean[3]:>8.3f}"
               f"{mean[4]:>7.0%}{mean[5]:>8.3f}{mean[6]:>10.0%}   ((a): the largest)")  # fmt: skip


if __name__ == "__main__":
    main()
