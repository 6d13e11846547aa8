"""Attribution-graph benchmark; prints one JSON object.

    python -m bench.attribution [--run_dir tsp20_demo] [--threads 2] [--verify 20]

Three figures, each measured in its own child process (seconds, and peak RSS as VmHWM, see bench/peak.py):
- `tsp20_decision`: one decision of the demo (TSP20, 3 layers, d=128): median of 3 after a warm-up;
  goal under 2 s on 2 cores;
- `tsp20_tour`: every step of one 20-city tour (score targets at the last step, where one city is left);
  goal under 20 s;
- `tsp100_decision`: one decision of a TSP100 instance with the same d=128, 3-layer policy; goal under 30 s.
Every decision runs clt.graph.attribution.attribute in full: graph, pruning, scores and --verify removal checks in the
local model and the live policy. The replacement is the run's multi-layer CLT when it has one; otherwise a
random one of the demo CLT's shape (expansion 8, k=16 per layer, statistics from the policy's activations),
which costs the same: the time depends on the shapes and the active features, not on the weights.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from bench.peak import peak_rss_gb
from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import Decision, greedy_tour
from clt.graph.replacement import Replacement, load_replacement
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
from policy.env import generate
from policy.loading import load_policy
from policy.runs import resolve_run_dir
from sae.hooks import HookedPolicy

SCENARIOS = ("tsp20_decision", "tsp20_tour", "tsp100_decision")


def replacement_for(run_dir: Path, policy) -> tuple[Replacement, str]:
    try:
        return load_replacement(run_dir), "trained"
    except FileNotFoundError:
        pass
    n, d = len(policy.layers), policy.cfg.embed_dim
    torch.manual_seed(0)
    clt = MultiLayerTranscoder(MultiLayerConfig(n_layers=n, d=d, expansion_factor=8, k=16)).eval()
    names = [f"encoder_layer_{i}.{p}" for i in range(n) for p in ("mlp_in", "mlp_out")]
    cache = HookedPolicy(policy).run_with_cache(generate(64, 20, seed=1), names)
    side = [
        torch.stack([cache[f"encoder_layer_{i}.{p}"].flatten(0, 1) for i in range(n)]) for p in ("mlp_in", "mlp_out")
    ]
    clt.set_statistics(side[0].mean(1), side[0].std(1), side[1].mean(1), side[1].std(1))
    return Replacement("multilayer", [Path("random/clt_multilayer/0")], [clt], None), "random"


def run_scenario(name: str, run_dir: str, verify: int) -> dict:
    run = resolve_run_dir(run_dir)
    loaded = load_policy(run)
    replacement, kind = replacement_for(run, loaded.model)
    policy = loaded.model
    rss_before = peak_rss_gb()  # the models loaded, nothing traced yet
    options = TraceOptions(verify=verify)
    n = 100 if name == "tsp100_decision" else 20
    locs = generate(1, n, seed=0)[0]
    tour = greedy_tour(policy, locs)
    attribute(policy, replacement, Decision(locs, tour[:3]), options, {})  # warm-up
    if name == "tsp20_tour":
        tic = time.perf_counter()
        for step in range(n):
            step_options = options if step < n - 1 else TraceOptions(verify=verify, target="score")
            attribute(policy, replacement, Decision(locs, tour[:step]), step_options, {})
        seconds, nodes = time.perf_counter() - tic, None
    else:
        times = []
        for _ in range(3 if name == "tsp20_decision" else 1):
            tic = time.perf_counter()
            result = attribute(policy, replacement, Decision(locs, tour[: n // 2]), options, {})
            times.append(time.perf_counter() - tic)
        seconds, nodes = statistics.median(times), len(result.doc["nodes"])
    return {"seconds": round(seconds, 3), "nodes": nodes, "replacement": kind, "peak_rss_gb": peak_rss_gb(),
            "rss_before_gb": rss_before, "threads": torch.get_num_threads()}  # fmt: skip


@click.command()
@click.option("--run_dir", default="tsp20_demo", help="Run whose policy (and multi-layer CLT, if any) is timed.")
@click.option("--threads", default=2, help="torch threads in each child (the 2-core target).")
@click.option("--verify", default=20, help="Features checked by removal per decision (clt.graph.attribute --verify).")
@click.option("--scenario", type=click.Choice(SCENARIOS), hidden=True, help="Run one scenario here (the child).")
def main(run_dir, threads, verify, scenario):
    """Time attribution graphs: one TSP20 decision, a whole TSP20 tour, one TSP100 decision."""
    torch.set_num_threads(threads)
    if scenario:
        click.echo(json.dumps(run_scenario(scenario, run_dir, verify)))
        return
    results = {"torch": torch.__version__, "threads": threads, "verify": verify,
               "goals_seconds": {"tsp20_decision": 2, "tsp20_tour": 20, "tsp100_decision": 30}}  # fmt: skip
    for name in SCENARIOS:
        cmd = [sys.executable, "-m", "bench.attribution", "--run_dir", run_dir, "--threads", str(threads), "--verify",
               str(verify), "--scenario", name]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    click.echo(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
