"""The generalisation matrix of one pair: transcoders trained on each condition, each evaluated on every condition.

    python -m clt.generalize --run_dir tsp20_demo --pair clt_L1.mlp_in_to_L1.mlp_out \
        --conditions "tsp20_demo:uniform:20,tsp20_demo:clustered:20,tsp20_demo:uniform:50" [--num_instances 500]

A condition is `RUN[@EPOCH][:DISTRIBUTION][:NODES]`: a policy run (folder or name), its checkpoint [default: the
latest], the instance distribution and size [default: the run's training ones]. Row i ("trained on") is the
newest finished transcoder of the pair in condition i's run whose training dump was collected under condition i;
column j evaluates it on condition j (clt.transfer: FVU on fresh instances beside that condition's own ridge
baseline, and the splice drift inside that condition's policy; what does not depend on the transcoder is
prepared once per column). A condition without such a transcoder gets no row, and the two commands that make
one are logged. Writes

    <run>/clt/generalize/<pair>/<name>.json     schema tsp-interp.generalize/1 (clt.site.export shows it)
    <run>/clt/generalize/<pair>/<name>.md       the tables: FVU (ridge) and splice gap, trained on x evaluated on
    <run>/clt/generalize/<pair>/<name>.png      the same as two heatmaps      (--name, default `matrix`)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from clt.datasets import condition_tag, dump_name, pair_name, training_dump
from clt.model import CrossLayerTranscoder, load_transcoder
from clt.pairs import LayerPair
from clt.transfer import Condition, prepare, score
from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS
from policy.io import atomic_write, read_json, write_json
from policy.loading import LoadedPolicy, load_policy
from policy.options import options
from policy.runs import check_name, resolve_run_dir
from sae.runs import finished_runs

log = logging.getLogger(__name__)

SCHEMA = "tsp-interp.generalize/1"


@dataclass
class GeneralizeConfig:
    run_dir: str
    """The run the matrix is written into (<run>/clt/generalize/<pair>/), and the default run of a condition."""
    pair: str
    """Pair name (clt_L1.mlp_in_to_L1.mlp_out) or source:target hooks; a pairwise transcoder."""
    conditions: tuple[str, ...]
    """RUN[@EPOCH][:DISTRIBUTION][:NODES] each, e.g. tsp20_demo:clustered:20 or other_run@1."""
    num_instances: int = 500
    """Fresh instances per evaluation: the first half fits that condition's ridge baseline, the second scores."""
    seed: int = 2024
    """Seed of the evaluation instances (the same for every cell)."""
    batch_size: int = 256
    """Instances per forward pass."""
    name: str = "matrix"
    """File name of this matrix: several matrices of one pair (sizes, checkpoints, ...) live side by side."""
    device: str = "cpu"
    """torch device (cpu, cuda, ...)."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        check_name(self.name, "matrix name")
        self.conditions = tuple(self.conditions)
        if len(self.conditions) < 1:
            raise ValueError("give at least one condition")
        if self.num_instances < 2 or self.batch_size < 1:
            raise ValueError("num_instances must be at least 2 and batch_size positive")


def parse_condition(spec: str, default_run: str, device: str, policies: dict) -> Condition:
    """`RUN[@EPOCH][:DISTRIBUTION][:NODES]` -> a Condition (policies are cached in `policies` by (run, epoch))."""
    parts = spec.strip().split(":")
    if len(parts) > 3:
        raise ValueError(f"condition {spec!r}: expected RUN[@EPOCH][:DISTRIBUTION][:NODES]")
    run, _, epoch = parts[0].partition("@")
    if epoch and not epoch.isdigit():
        raise ValueError(f"condition {spec!r}: the checkpoint after @ must be an epoch number")
    run_dir = resolve_run_dir(run or default_run)
    key = (str(run_dir.resolve()), int(epoch) if epoch else None)
    if key not in policies:
        policies[key] = load_policy(run_dir, key[1], device)
    policy: LoadedPolicy = policies[key]
    distribution = parts[1] if len(parts) > 1 and parts[1] else policy.config.distribution
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"condition {spec!r}: distribution must be one of {DISTRIBUTIONS}")
    nodes = parts[2] if len(parts) > 2 else ""
    if nodes and (not nodes.isdigit() or int(nodes) < 3):
        raise ValueError(f"condition {spec!r}: the size must be a whole number of nodes, at least 3")
    return Condition(policy, distribution, int(nodes) if nodes else policy.config.num_loc)


def label(condition: Condition) -> str:
    return f"{condition.policy.run_dir.resolve().name}@{condition.policy.epoch} {condition.distribution} " \
           f"n{condition.num_loc}"  # fmt: skip


def trained_on(condition: Condition, pair: str) -> Path | None:
    """The newest finished transcoder of `pair` in the condition's run whose training dump is of that condition."""
    for folder in reversed(finished_runs(condition.policy.run_dir, "clt").get(pair, [])):
        try:
            meta = training_dump(folder, read_json(folder / "train_cfg.json"))[1].metadata
        except (OSError, ValueError) as err:
            log.warning("skipping %s: its training dump cannot be read (%s)", folder, err)
            continue
        if (meta["checkpoint_epoch"], meta["distribution"], meta["nodes_per_instance"]) == (
            condition.policy.epoch, condition.distribution, condition.num_loc
        ):  # fmt: skip
            return folder
    return None


def how_to_train(condition: Condition, pair: str) -> str:
    """The two commands that make a transcoder of `pair` trained on `condition`."""
    hooks, run = LayerPair.from_name(pair), condition.policy.run_dir
    tag = condition_tag(condition.policy, condition.distribution, condition.num_loc, 0)
    return (f"python -m clt.collect_pairs --run_dir {run} --layer_pairs {hooks.source}:{hooks.target} --checkpoint "
            f"{condition.policy.epoch} --distribution {condition.distribution} --num_loc {condition.num_loc}; "
            f"python -m clt.train_transcoder --run_dir {run} --pair {pair}"
            + (f" --condition {tag}" if tag else "") + f"  (dump {dump_name(pair, tag)})")  # fmt: skip


def cell(result: dict) -> dict:
    splice = result["splice"]["transcoder"]
    return {"fvu": result["reconstruction"]["fvu"], "ridge_fvu": result["ridge_val_fvu"], "gap": splice["gap"],
            "agreement": splice["action_agreement"], "kl": splice["mean_kl"],
            "recovered": splice.get("recovered")}  # fmt: skip


def run(cfg: GeneralizeConfig) -> dict:
    """Evaluate the matrix; writes <name>.json, .md and .png and returns the JSON's content."""
    out_run = resolve_run_dir(cfg.run_dir)
    pair = pair_name(out_run, cfg.pair)
    hooks = LayerPair.from_name(pair)
    policies: dict = {}
    conditions = [parse_condition(spec, cfg.run_dir, cfg.device, policies) for spec in cfg.conditions]
    rows, missing = [], []
    for condition in conditions:
        folder = trained_on(condition, pair)
        if folder is None:
            missing.append(label(condition))
            log.warning("no transcoder of %s trained on %s; make one with: %s", pair, label(condition),
                        how_to_train(condition, pair))  # fmt: skip
        else:
            rows.append((condition, folder))
    if not rows:
        raise FileNotFoundError(f"no transcoder of {pair} is trained on any of the conditions (see the warnings)")
    # instances, activations, ridge baseline and ablation splices: once per column, for every row
    columns = [prepare(hooks.source, hooks.target, c, cfg.num_instances, cfg.seed, cfg.batch_size) for c in conditions]
    cells = []
    for condition, folder in rows:
        model: CrossLayerTranscoder = load_transcoder(folder).to(cfg.device)
        log.info("trained on %s: %s", label(condition), folder)
        cells.append([cell(score(model, column)) for column in columns])
    matrix = {"schema": SCHEMA, "pair": pair, "evaluated_on": [label(c) for c in conditions],
              "trained_on": [{"condition": label(c), "transcoder": str(f)} for c, f in rows],
              "missing": missing, "cells": cells, "config": asdict(cfg)}  # fmt: skip
    out = out_run / "clt" / "generalize" / pair
    write_json(out / f"{cfg.name}.json", matrix)
    atomic_write(out / f"{cfg.name}.md", lambda tmp: tmp.write_text(format_tables(matrix) + "\n"))
    plot(matrix, out / f"{cfg.name}.png")
    return matrix


def format_tables(matrix: dict) -> str:
    """Markdown: FVU (the evaluated condition's ridge FVU) and splice gap (agreement), trained on x evaluated on."""
    head = "| trained on \\ evaluated on | " + " | ".join(matrix["evaluated_on"]) + " |"
    rule = "| --- " * (len(matrix["evaluated_on"]) + 1) + "|"
    tables = []
    formats = (("FVU (that condition's ridge FVU)", lambda c: f"{c['fvu']:.4f} ({c['ridge_fvu']:.4f})"),
               ("splice gap (action agreement)", lambda c: f"{c['gap']:.2%} ({c['agreement']:.1%})"))  # fmt: skip
    for title, fmt in formats:
        lines = [f"{matrix['pair']}: {title}", "", head, rule]
        lines += [f"| {row['condition']} | " + " | ".join(fmt(c) for c in cells) + " |"
                  for row, cells in zip(matrix["trained_on"], matrix["cells"], strict=True)]  # fmt: skip
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot(matrix: dict, path: Path) -> None:
    """Two heatmaps (FVU, splice gap), each cell annotated; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows, cols = [r["condition"] for r in matrix["trained_on"]], matrix["evaluated_on"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.4 * len(cols), 1.6 + 0.7 * len(rows)), squeeze=False)
    for ax, key, title, fmt in ((axes[0, 0], "fvu", "FVU", "{:.4f}"), (axes[0, 1], "gap", "splice gap", "{:.2%}")):
        values = np.array([[c[key] for c in cells] for cells in matrix["cells"]])
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="white", fontsize=8)
        ax.set(xticks=range(len(cols)), yticks=range(len(rows)), title=f"{title}: trained on (rows) x evaluated on")
        ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=7)
        ax.set_yticklabels(rows, fontsize=7)
        fig.colorbar(image, ax=ax)
    fig.suptitle(matrix["pair"], fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


@click.command()
@options(GeneralizeConfig)
def main(**settings):
    """Evaluate a pair's transcoders, each trained on one condition, on every condition: a matrix."""
    with command():
        matrix = run(GeneralizeConfig(**settings))
    click.echo(format_tables(matrix))


if __name__ == "__main__":
    main()
