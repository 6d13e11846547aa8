"""How far attribution graphs predict the live policy, against the one-line baseline; prints one JSON object.

    python -m bench.faithfulness [--runs tsp20_demo,kool_tsp20,kool_tsp50] [--instances 20] [--verify 20]

For each run (with a multi-layer CLT; --clt picks another) and each graph mode (`frozen`: attention and glimpse
patterns held; `tangent`: both responding to first order), decisions on held-out instances (seeds from 900000,
which no collection, training, labelling or export uses) at an early, a middle and a late step. Each decision's
graph is checked by removing its `--verify` most influential features in the live policy (clt.graph.verify);
reported: the live Pearson r (mean, median, share >= 0.9) and sign agreement of the graph's predictions, the same
for gradient x activation in the live policy (the baseline) and for the patched removal effects (each feature
removed in the replacement with the transcoders' selection held), how often the graph's and the patched r beat
the baseline's (by more than 1e-4; ties counted apart), the edge check's r for the 30 strongest edges
(clt.graph.edge_check: sources scaled by 0.9 and by 0, direct and total predictions), the circuit faithfulness
of the pruned graph and of its complement (clt.graph.circuit), and seconds per decision (all checks included).
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch

from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import Decision, greedy_tour
from clt.graph.replacement import load_replacement
from policy.env import generate
from policy.loading import load_policy
from policy.runs import resolve_run_dir

MODES = {mode: {"attention": mode, "glimpse": mode} for mode in ("frozen", "tangent")}


def summary(rs: list[float]) -> dict:
    finite = [r for r in rs if r == r]
    if not finite:
        return {"mean": None, "median": None, "share_ge_0.9": None}
    return {"mean": round(statistics.fmean(finite), 4), "median": round(statistics.median(finite), 4),
            "share_ge_0.9": round(sum(r >= 0.9 for r in finite) / len(finite), 4)}  # fmt: skip


def measure(run: str, instances: int, verify: int, clt: str | None = None) -> dict:
    run_dir = resolve_run_dir(run)
    replacement = load_replacement(run_dir, clt)
    loaded = load_policy(run_dir, replacement.checkpoint_epoch)
    policy, n = loaded.model, loaded.config.num_loc
    steps = sorted({3, n // 2, n - 5})
    out = {"decisions": instances * len(steps), "steps": steps, "replacement": replacement.id,
           "activation": replacement.models[0].cfg.activation}  # fmt: skip
    for mode, settings in MODES.items():
        live, sign, base, base_sign, patched, patched_sign, seconds = [], [], [], [], [], [], []
        edges = {f"scale_{a}_{kind}": [] for a in ("0.9", "0") for kind in ("direct", "total")}
        circuit, complement = [], []
        for i in range(instances):
            locs = generate(1, n, seed=900000 + i)[0]
            tour = greedy_tour(policy, locs)
            for step in steps:
                start = time.perf_counter()
                options = TraceOptions(verify=verify, **settings)
                doc = attribute(policy, replacement, Decision(locs, tour[:step]), options, {}).doc
                seconds.append(time.perf_counter() - start)
                v = doc["verification"]["live"]
                live.append(v["pearson_r"])
                sign.append(v["sign_agreement"])
                base.append(v["gradient_x_activation"]["pearson_r"])
                base_sign.append(v["gradient_x_activation"]["sign_agreement"])
                patched.append(v["patched"]["pearson_r"])
                patched_sign.append(v["patched"]["sign_agreement"])
                for key, values in edges.items():
                    scale, kind = key.rsplit("_", 1)
                    values.append(doc["verification"]["edges"][scale][kind]["pearson_r"])
                circuit.append(doc["verification"]["circuit"]["faithfulness"])
                complement.append(doc["verification"]["circuit"]["complement"])
        pairs = [(a, b) for a, b in zip(live, base, strict=True) if a == a and b == b]
        out[mode] = {"live_r": summary(live), "sign_agreement": round(statistics.fmean(s for s in sign if s == s), 4),
                     "gradient_x_activation_r": summary(base),
                     "gradient_x_activation_sign": round(statistics.fmean(s for s in base_sign if s == s), 4),
                     "graph_beats_baseline": f"{sum(a > b + 1e-4 for a, b in pairs)} of {len(pairs)}",
                     "ties_within_1e-4": sum(abs(a - b) <= 1e-4 for a, b in pairs),
                     "patched_r": summary(patched),
                     "patched_sign": round(statistics.fmean(s for s in patched_sign if s == s), 4),
                     "patched_sign_median": round(statistics.median(s for s in patched_sign if s == s), 4),
                     "patched_beats_baseline": f"{sum(p > b + 1e-4 for p, b in zip(patched, base, strict=True))} of "
                                               f"{len(patched)}",
                     "edge_check_r": {key: summary(values) for key, values in edges.items()},
                     "circuit_faithfulness": summary(circuit), "circuit_complement": summary(complement),
                     "seconds_per_decision": round(statistics.median(seconds), 3)}  # fmt: skip
    return out


@click.command()
@click.option("--runs", default="tsp20_demo,kool_tsp20,kool_tsp50", show_default=True,
              help="Comma-separated runs, each with a multi-layer CLT.")  # fmt: skip
@click.option("--instances", type=int, default=20, show_default=True, help="Held-out instances per run (3 steps each).")
@click.option("--verify", type=int, default=20, show_default=True, help="Features removed per decision.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads.")
@click.option("--clt", default=None, help="A multi-layer CLT folder to use instead of the run's newest (one run).")
def main(runs, instances, verify, threads, clt):
    """Live faithfulness of attribution graphs against gradient x activation, per run and mode; prints JSON."""
    torch.set_num_threads(threads)
    if clt is not None and "," in runs:
        raise click.UsageError("--clt names one run's CLT: pass one run to --runs")
    click.echo(json.dumps({run: measure(run, instances, verify, clt) for run in runs.split(",")}, indent=1))


if __name__ == "__main__":
    main()
