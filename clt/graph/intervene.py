"""Change features in the live policy at one decision and see what it then does.

    python -m clt.graph.intervene --run_dir tsp20_demo --seed 3 --step 7 --changes "0:17:526=zero"
    python -m clt.graph.intervene --run_dir tsp20_demo --seed 3 --step 7 --changes "0:17:*=scale:0.5,1:11:864=set:2"

The run's replacement (as clt.graph.attribute picks it) is spliced into every encoder layer with the error terms
held fixed (clt.graph.spliced), so that without a change the policy is unchanged. A change is
LAYER:CITY:FEATURE=zero, =scale:FACTOR or =set:VALUE (FEATURE `*`: every feature of that layer at that city).
Prints the candidates' probabilities at step t before and after, and the tours the policy builds from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from clt.graph.decision import DecisionOptions
from clt.graph.replacement import load_replacement
from clt.graph.spliced import Change, intervene
from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import tour_length
from policy.io import write_json
from policy.loading import load_policy
from policy.options import options, split_nested
from policy.runs import resolve_run_dir


@dataclass
class InterveneConfig:
    run_dir: str
    """Run folder, or a run name under runs/."""
    changes: list[str]
    """Changes: LAYER:CITY:FEATURE=zero | =scale:FACTOR | =set:VALUE (FEATURE * for every feature)."""
    decision: DecisionOptions
    """Which decision (flattened into options)."""
    clt: str | None = None
    """A multi-layer CLT run folder [default: the run's newest, else its per-layer mlp_in -> mlp_out transcoders]."""
    glimpse_clt: str | None = None
    """Also splice a decoder.context -> decoder.glimpse transcoder into step t's glimpse (a run folder, or `newest`);
    its features are then changed as layer <n_layers> at the current city."""
    checkpoint: int | None = None
    """Policy epoch [default: the one the transcoders were trained on, else the latest]."""
    out: str | None = None
    """Also write the report as JSON here."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if not self.changes:
            raise ValueError("give at least one change (--changes LAYER:CITY:FEATURE=zero)")
        self.parsed = [Change.parse(c) for c in self.changes]


def run(cfg: InterveneConfig) -> dict:
    run_dir = resolve_run_dir(cfg.run_dir)
    replacement = load_replacement(run_dir, cfg.clt, cfg.glimpse_clt)
    epoch = cfg.checkpoint if cfg.checkpoint is not None else replacement.checkpoint_epoch
    policy = load_policy(run_dir, epoch, cfg.device)
    replacement.to(cfg.device)
    decision, instance, _ = cfg.decision.decision(policy.model, policy.config.num_loc)
    result = intervene(policy.model, replacement, decision, cfg.parsed)
    locs = decision.locs[None]
    report = {
        "run": run_dir.name,
        "checkpoint_epoch": policy.epoch,
        "replacement": replacement.id,
        "instance": instance,
        "step": decision.step,
        "changes": cfg.changes,
        **result.summary(),
        "length_before": float(tour_length(locs, result.original.tour_tensor())),
        "length_after": float(tour_length(locs, result.changed.tour_tensor())),
    }
    if cfg.out:
        write_json(cfg.out, report)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"step {report['step']}, changes {', '.join(report['changes'])}:",
        f"  {'city':>5}{'before':>10}{'after':>10}{'score before':>14}{'score after':>13}",
    ]
    for c in report["candidates"]:
        lines.append(
            f"  {c['city']:>5}{c['probability_before']:>10.1%}{c['probability_after']:>10.1%}"
            f"{c['score_before']:>14.3f}{c['score_after']:>13.3f}"
        )
    step = report["step"]
    lines += [
        f"tour before: {report['tour_before'][step:]} (length {report['length_before']:.4f})",
        f"tour after:  {report['tour_after'][step:]} (length {report['length_after']:.4f})"
        + ("" if report["tour_changed"] else "   (unchanged)"),
        f"splicing alone moves the scores by at most {report['splice_max_score_error']:.1e}",
    ]
    return "\n".join(lines)


@click.command()
@options(InterveneConfig, flatten=("decision",))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def main(as_json, **settings):
    """Set, scale or zero features at one decision and report the new probabilities and tour."""
    with command():
        report = run(InterveneConfig(**split_nested(InterveneConfig, settings, "decision")))
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))


if __name__ == "__main__":
    main()
