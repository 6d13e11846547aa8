"""The census of a policy's concepts: `python -m clt.census --run_dirs tsp20_demo,kool_tsp20 [--figure F.png]`.

Reads the labels clt.label wrote (`<dictionary>/eval/labels.json`) for the newest finished SAE of every hook and
transcoder of every pair of each run, and prints, per dictionary, its live features (at least `min_events` events
on the labelling instances) and the share of them in each category, as a Markdown table. With `--figure`, draws
one stacked bar per dictionary (a multi-layer CLT: one per layer), and with `--examples`, beside it
(`<figure stem>_examples.png`) the strongest features of each category drawn as instances: the cities of the
instance where the feature peaks, coloured by its activation, the label above.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from clt.dictionaries import find_dictionaries
from clt.feature_labels import CATEGORIES, measure
from policy.checks import check_types
from policy.cli import command
from policy.env import generate
from policy.io import atomic_write
from policy.loading import load_policy
from policy.options import options
from policy.runs import resolve_run_dir
from sae.runs import newest_runs

log = logging.getLogger(__name__)

COLOURS = {"boundary": "#1b9e77", "spot": "#d95f02", "separator": "#7570b3", "density / cluster": "#e7298a",
           "tour structure": "#66a61e", "decoding state": "#e6ab02", "unexplained": "#bbbbbb"}  # fmt: skip


@dataclass
class CensusConfig:
    run_dirs: tuple[str, ...]
    """Runs (folders or names under runs/) whose labelled dictionaries are counted, comma-separated."""
    figure: str | None = None
    """Also draw the stacked bars into this PNG."""
    examples: int = 0
    """With --figure: this many example features per category drawn as instances (0: none)."""
    num_instances: int = 2000
    """Fresh instances searched for each example's peak (an example that never fires on them is left out)."""

    def __post_init__(self):
        check_types(self)
        self.run_dirs = tuple(self.run_dirs)
        if not self.run_dirs:
            raise ValueError("give --run_dirs")
        if self.examples < 0 or self.num_instances < 1:
            raise ValueError("examples must be >= 0 and num_instances positive")
        if self.figure is not None and not self.figure.endswith(".png"):
            raise ValueError(f"--figure names a .png file, got {self.figure!r}")


def labelled(run_dir: Path) -> dict[str, dict]:
    """Dictionary id -> its labels section, for the run's newest dictionaries that have been labelled."""
    found = {}
    for folder in [*newest_runs(run_dir, "sae"), *newest_runs(run_dir, "clt")]:
        path = folder / "eval" / "labels.json"
        if path.is_file():
            found.update(json.loads(path.read_text())["dictionaries"])
    if not found:
        raise FileNotFoundError(
            f"no labelled dictionary in {run_dir}: run python -m clt.label --run_dir {run_dir} --all"
        )
    return found


def table(census: dict[str, dict[str, dict]]) -> str:
    lines = ["| run | dictionary | live / features | " + " | ".join(CATEGORIES) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in CATEGORIES) + " |"]  # fmt: skip
    for run, sections in census.items():
        for name, section in sections.items():
            c = section["census"]
            shares = " | ".join(f"{100 * c['shares'][k]:.1f}%" for k in CATEGORIES)
            lines.append(f"| {run} | {name} | {c['live']} / {c['features']} | {shares} |")
    return "\n".join(lines)


def draw_bars(census: dict[str, dict[str, dict]], path: Path) -> None:
    from matplotlib import pyplot as plt

    bars = [(f"{run}\n{name.split('/', 1)[1].replace('/', chr(10)).replace('_to_', chr(10))}", s["census"])
            for run, sections in census.items() for name, s in sections.items()]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars)), 5))
    bottom = np.zeros(len(bars))
    for category in CATEGORIES:
        share = np.array([100 * c["shares"][category] for _, c in bars])
        ax.bar(range(len(bars)), share, bottom=bottom, color=COLOURS[category], label=category)
        bottom += share
    ax.set_xticks(range(len(bars)), [f"{b}\n{c['live']} live" for b, c in bars], fontsize=6.5)
    ax.set_ylabel("share of live features (%)")
    ax.set_title("What the features respond to (clt.label: folded AUROC >= 0.8 and above the 99% null)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


@torch.no_grad()
def draw_examples(run_dir: Path, sections: dict[str, dict], per_category: int, num_instances: int, path: Path):
    """The strongest labelled features of each category (by score), each on the instance where it peaks."""
    from matplotlib import pyplot as plt

    picks = []
    for category in CATEGORIES[:-1]:
        entries = [(e["score"], name, e) for name, s in sections.items() if s["rows"] == "city"
                   for e in s["labels"] if e["category"] == category]  # fmt: skip
        picks += [(name, e) for _, name, e in sorted(entries, key=lambda x: -x[0])[:per_category]]
    if not picks:
        return
    policy = load_policy(run_dir)
    dicts = {d.id: d for d in find_dictionaries(run_dir)}
    locs = generate(num_instances, policy.config.num_loc, policy.config.distribution, seed=8642)
    cache, _ = measure(policy.model, locs, sorted({h for name, _ in picks for h in dicts[name].hooks}))
    n = policy.config.num_loc
    shown = []
    for name, entry in picks:
        d = dicts[name]
        acts = d.codes({h: cache[h] for h in d.hooks})[:, entry["index"]].reshape(-1, n).numpy()
        if acts.max() > 0:
            shown.append((name, entry, acts))
    cols = min(len(shown), 4)
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, entry, acts) in zip(axes.ravel(), shown, strict=False):
        i = int(acts.max(1).argmax())
        ax.scatter(*locs[i].T, c=acts[i], cmap="viridis", s=28, edgecolors="k", linewidths=0.3)
        ax.set_title(f"{name.split('/', 1)[1]} #{entry['index']}\n{entry['label']}", fontsize=6.5)
        ax.set(xlim=(0, 1), ylim=(0, 1), xticks=[], yticks=[], aspect="equal")
    for ax in axes.ravel()[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run(cfg: CensusConfig) -> dict[str, dict[str, dict]]:
    """Read every run's labels; draw what was asked; returns run name -> dictionary id -> labels section."""
    runs = {Path(r).name: resolve_run_dir(r) for r in cfg.run_dirs}
    census = {name: labelled(run_dir) for name, run_dir in runs.items()}
    if cfg.figure:
        draw_bars(census, Path(cfg.figure))
        if cfg.examples:
            for name, run_dir in runs.items():
                out = Path(cfg.figure).with_name(f"{Path(cfg.figure).stem}_{name}_examples.png")
                draw_examples(run_dir, census[name], cfg.examples, cfg.num_instances, out)
    return census


@click.command()
@options(CensusConfig)
def main(**settings):
    """The share of each run's live features per category, from the labels clt.label wrote."""
    with command():
        census = run(CensusConfig(**settings))
    click.echo(table(census))


if __name__ == "__main__":
    main()
