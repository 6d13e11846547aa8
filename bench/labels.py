"""Feature-labelling benchmark; prints one JSON object.

    python -m bench.labels [--run_dir tsp20_demo] [--threads 2]

Each figure is measured in its own child process (wall seconds from the policy's forward to the last label, and peak
RSS as VmHWM, see bench/peak.py), labelling with clt.feature_labels' defaults:
- `multilayer_tsp20`: every layer of the run's newest multi-layer CLT (3 x 1024 features on the demo) on 2000 fresh
  TSP20 instances; goal under 60 s on 2 cores; with the census of each layer;
- `dictionary_tsp100`: one 1024-feature dictionary (the run's newest SAE, else the CLT's first layer) on 500 fresh
  TSP100 instances; goal under 60 s;
- `stability`: the multi-layer CLT labelled on two disjoint sets of 2000 instances (other seeds): of the features
  labelled on both, the share whose category, and whose descriptor, agree; goal >= 0.9 for the category.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from bench.peak import peak_rss_gb
from clt.dictionaries import find_dictionaries
from clt.feature_labels import LabelOptions, city_rows, label_dictionary, measure
from policy.env import generate
from policy.loading import load_policy
from policy.reference import two_opt
from policy.runs import resolve_run_dir
from sae.runs import newest_runs

SCENARIOS = ("multilayer_tsp20", "dictionary_tsp100", "stability")


def dictionaries(run_dir: Path, which: str):
    multilayer = [f for f in newest_runs(run_dir, "clt") if f.parent.name == "clt_multilayer"]
    if not multilayer:
        raise SystemExit(f"{run_dir} has no multi-layer CLT: python -m clt.train_transcoder --run_dir R --multilayer")
    layers = find_dictionaries(run_dir, multilayer)
    if which == "multilayer":
        return layers
    saes = newest_runs(run_dir, "sae")
    return find_dictionaries(run_dir, saes[:1]) if saes else layers[:1]


def label(run_dir: Path, dicts, num_instances: int, num_loc: int, seed: int) -> tuple[dict, float]:
    policy = load_policy(run_dir)
    start = time.perf_counter()
    locs = generate(num_instances, num_loc, policy.config.distribution, seed=seed)
    cache, greedy = measure(policy.model, locs, sorted({h for d in dicts for h in d.hooks}))
    rows = city_rows(locs.numpy().astype("float64"), two_opt(locs, greedy).numpy())
    sections = {d.id: label_dictionary(d, cache, rows, LabelOptions()) for d in dicts}
    return sections, time.perf_counter() - start


def child(run_dir: Path, scenario: str) -> dict:
    if scenario == "multilayer_tsp20":
        dicts = dictionaries(run_dir, "multilayer")
        sections, seconds = label(run_dir, dicts, 2000, 20, seed=97531)
        return {"seconds": round(seconds, 2), "features": sum(d.n_features for d in dicts),
                "census": {k: s["census"] for k, s in sections.items()}, "peak_rss_gb": peak_rss_gb()}  # fmt: skip
    if scenario == "dictionary_tsp100":
        dicts = dictionaries(run_dir, "one")
        sections, seconds = label(run_dir, dicts, 500, 100, seed=97532)
        return {"seconds": round(seconds, 2), "dictionary": dicts[0].id, "features": dicts[0].n_features,
                "census": sections[dicts[0].id]["census"], "peak_rss_gb": peak_rss_gb()}  # fmt: skip
    dicts = dictionaries(run_dir, "multilayer")
    a, _ = label(run_dir, dicts, 2000, 20, seed=13579)
    b, _ = label(run_dir, dicts, 2000, 20, seed=24680)
    pairs = [(x, y) for k in a for x, y in zip(a[k]["labels"], b[k]["labels"], strict=True)]
    labelled = lambda e: e["category"] not in ("unexplained", "rare", "dead")  # noqa: E731
    both = [(x, y) for x, y in pairs if labelled(x) and labelled(y)]
    either = sum(labelled(x) or labelled(y) for x, y in pairs)
    return {"labelled_in_both": len(both), "labelled_in_either": either,
            "category_agreement": round(sum(x["category"] == y["category"] for x, y in both) / max(len(both), 1), 4),
            "descriptor_agreement": round(sum(x.get("descriptor") == y.get("descriptor") for x, y in both)
                                          / max(len(both), 1), 4)}  # fmt: skip


@click.command()
@click.option("--run_dir", default="tsp20_demo", show_default=True, help="Run with a multi-layer CLT (and an SAE).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch and BLAS threads in each child.")
@click.option("--scenario", type=click.Choice(SCENARIOS), default=None, help="Run one figure here (a child).")
def main(run_dir, threads, scenario):
    """Time feature labelling at the issue's sizes and check its stability; prints JSON."""
    torch.set_num_threads(threads)
    run_dir = resolve_run_dir(run_dir)
    if scenario:
        click.echo(json.dumps(child(run_dir, scenario)))
        return
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    out = {"run_dir": str(run_dir), "threads": threads}
    for name in SCENARIOS:
        args = [sys.executable, "-m", "bench.labels", "--run_dir", str(run_dir), "--threads", str(threads),
                "--scenario", name]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, check=False)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    click.echo(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
