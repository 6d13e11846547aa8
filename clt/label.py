"""Label every feature of a run's dictionaries by measured geometry: `python -m clt.label`.

    python -m clt.label --run_dir tsp20_demo --all                      # every newest finished SAE and transcoder
    python -m clt.label --run_dir tsp20_demo --dictionary <folder>[,<folder>...] [--json]

Fresh instances (a seed training and splicing never use) go through the policy greedily; each dictionary's features
are scored against policy.geometry's descriptors with a permutation null (clt.feature_labels: the algorithm, the
scores and the thresholds). Tour descriptors use 2-opt improvements of the policy's greedy tours.

Writes `<dictionary folder>/eval/labels.json` (clt.feature_labels.label_folders; clt.eval writes it too), schema
`tsp-interp.labels/1`:

    schema, folder, run_dir
    instances     {num_instances, num_loc, distribution, seed, checkpoint_epoch, tours}
    options       the scoring options (clt.feature_labels.LabelOptions)
    dictionaries  {dictionary id (clt.dictionaries; a multi-layer CLT has one per layer):
                   {kind, read_hook, rows ("city" or "step"), features,
                    census {features, live, counts {category: n}, shares {category: share of live features}},
                    labels [one per feature: index, category, label, score (folded AUROC), descriptor, direction
                            ("high" / "low"), null (the feature's null threshold), frequency, events, top (the five
                            best candidates with their AUROC), r2_absolute, r2_relative, explained_r2, and, by kind:
                            spearman, spearman_firing, activation_auroc, precision / recall / f1 / threshold,
                            conjunction / conjunction_score, spot {centre}, half_plane {normal, offset}]}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import click

from clt.feature_labels import CATEGORIES, Instances, LabelOptions, label_folders
from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS
from policy.options import options
from policy.runs import resolve_run_dir


@dataclass(kw_only=True)
class LabelConfig(LabelOptions):
    run_dir: str
    """Run folder, or a run name under runs/."""
    dictionary: tuple[str, ...] = ()
    """SAE / transcoder run folders to label (comma-separated)."""
    all: bool = False
    """Label the newest finished SAE of every hook and transcoder of every pair instead."""
    num_instances: int = 2000
    """Fresh instances the features are measured on."""
    num_loc: int | None = None
    """Cities per instance [default: the run's]."""
    distribution: str | None = None
    """Instance distribution (uniform, clustered, mixed) [default: the run's]."""
    instance_seed: int = 97531
    """Seed of the instances (collection, training and splicing use others)."""
    checkpoint: int | None = None
    """Policy checkpoint epoch [default: the latest]."""
    device: str = "cpu"
    """torch device of the policy's forward passes (the scoring runs on the CPU)."""

    def __post_init__(self):
        super().__post_init__()
        check_types(self)
        check_device(self.device)
        self.dictionary = tuple(self.dictionary)
        if bool(self.dictionary) == self.all:
            raise ValueError("give --dictionary FOLDER (one or more) or --all")
        if self.num_instances < 4:
            raise ValueError(f"num_instances must be at least 4 (half fit, half held out), got {self.num_instances}")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError(f"num_loc must be at least 3, got {self.num_loc}")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")

    @property
    def scoring(self) -> LabelOptions:
        return LabelOptions(**{f.name: getattr(self, f.name) for f in fields(LabelOptions)})


def run(cfg: LabelConfig) -> dict[str, dict]:
    """Label; returns {labels.json path: its document}."""
    run_dir = resolve_run_dir(cfg.run_dir)
    instances = Instances(cfg.num_instances, cfg.num_loc, cfg.distribution, cfg.instance_seed)
    return label_folders(run_dir, cfg.dictionary, instances, cfg.scoring, cfg.checkpoint, cfg.device)


def format_census(documents: dict[str, dict]) -> str:
    """The census table: per dictionary, live features and the share of them in each category."""
    head = ["dictionary", "live", *(c.split(" ")[0] for c in CATEGORIES)]
    lines = ["  ".join(f"{h:>12}" if i else f"{h:<28}" for i, h in enumerate(head))]
    for doc in documents.values():
        for name, section in doc["dictionaries"].items():
            c = section["census"]
            cells = [f"{c['live']}/{c['features']}", *(f"{100 * c['shares'][k]:.1f}%" for k in CATEGORIES)]
            lines.append("  ".join([f"{name:<28}", *(f"{v:>12}" for v in cells)]))
    return "\n".join(lines)


@click.command()
@options(LabelConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the documents as JSON instead of the census table.")
def main(as_json, **settings):
    """Label every feature of a run's SAEs and transcoders by measured geometry, with scores and a null control."""
    with command():
        documents = run(LabelConfig(**settings))
    if as_json:
        click.echo(json.dumps(documents))
        return
    click.echo(format_census(documents))
    for path in documents:
        click.echo(f"labels written to {path}")


if __name__ == "__main__":
    main()
