"""Activation collection benchmark; prints one JSON object.

    python -m bench.collect [--run_dir tsp20_demo] [--num_instances 4096] [--big_gb 2.0] [--device cpu]

1. Rows/s collecting every `encoder_layer_{i}` output of the run's policy, side by side:
   - `encoder_floor`: the encoder's forward alone on the same batches (no hooks, no copies, no writes,
     instances already drawn): what no collector can beat; `collector_fraction_of_floor` is the ratio
     (both timed `--repeats` times, interleaved, best of each, so that a noisy machine loads both alike);
   - `collector`: sae.collect_activations' path (encoder-only forward, streamed to a dump on disk);
   - `naive`: a full greedy rollout with a forward hook on every hook point, everything
     copied to numpy lists and concatenated at the end (the way earlier SAE code did it);
   - where the collector's time beyond the floor goes: its statistics (sae.store.RunningStats: mean, spread and
     covariance of every hook's rows, on torch's threads) and the dumps' sha256 (one core, on the writer thread),
     each timed alone on the same rows; `collector_fraction_bound` is floor / (floor + statistics + sha256 / threads),
     what a collector doing that work could reach if the checksum shared the cores perfectly and nothing else
     (hooks, page-cache writes, the threads' contention) cost time.
2. Peak RSS (VmHWM, see bench/peak.py) of a separate `python -m sae.collect_activations`
   process writing a dump of about `--big_gb` GB, against the dump's size on disk.

With `--device cuda` the policy runs on the GPU (the floor's instances are moved there before the clock starts, the
collector's are drawn on the CPU and moved, as sae.collect_activations does); the clock waits for the GPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from bench.timing import cli_device, clock, device_name
from policy.heap import keep_freed_memory
from policy.loading import load_policy
from sae.collection_loop import collect, instance_batches
from sae.hooks import HookedPolicy
from sae.store import DumpWriter, RunningStats


def naive_collect(hooked: HookedPolicy, batches, keep: list[str]) -> dict[str, np.ndarray]:
    """Full rollout with every hook on; activations gathered in lists, concatenated at the end."""
    stored: dict[str, list[np.ndarray]] = {name: [] for name in hooked.hook_names()}

    def grab(x, name):
        stored[name].append(x.detach().cpu().numpy().copy())

    with torch.no_grad(), hooked.hooks(dict.fromkeys(hooked.hook_names(), grab)):
        for locs in batches:
            hooked.model(locs)
    return {name: np.concatenate([a.reshape(-1, a.shape[-1]) for a in stored[name]]) for name in keep}


def time_collectors(run_dir: str, num_instances: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    loaded = load_policy(run_dir, device=device)
    hooked = HookedPolicy(loaded.model)
    n = loaded.config.num_loc
    names = [f"encoder_layer_{i}" for i in range(len(loaded.model.layers))]
    rows = num_instances * n

    def batches():
        return instance_batches(num_instances, n, "uniform", 0, batch_size)

    hooked.run_with_cache(next(batches()).to(device), names)  # warm-up
    ready = [locs.to(device) for locs in batches()]

    def floor_seconds() -> float:
        tic = clock(device)
        with torch.no_grad():
            for locs in ready:  # the floor: the encoder alone, no hooks, no copies, no writes, instances ready
                hooked.model.encode(locs)
        return clock(device) - tic

    def collector_seconds() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            tic = clock(device)
            with DumpWriter(Path(tmp) / "dump", dict.fromkeys(names, loaded.config.policy.embed_dim), rows) as writer:
                collect(hooked, batches(), [(writer, {k: k for k in names})], num_instances)
                writer.finish({})
            return clock(device) - tic

    timings = [(floor_seconds(), collector_seconds()) for _ in range(repeats)]  # interleaved: both see the same load
    floor, fast = min(t[0] for t in timings), min(t[1] for t in timings)
    statistics_s, sha256_s = overhead_seconds(hooked, ready, names, loaded.config.policy.embed_dim)
    tic = clock(device)
    naive_collect(hooked, (locs.to(device) for locs in batches()), names)
    naive = clock(device) - tic
    return {
        "instances": num_instances,
        "rows": rows,
        "hooks": names,
        "batch_size": batch_size,
        "encoder_floor_rows_per_s": round(rows / floor),
        "collector_rows_per_s": round(rows / fast),
        "collector_fraction_of_floor": round(floor / fast, 3),
        "naive_rows_per_s": round(rows / naive),
        "speedup": round(naive / fast, 2),
        "floor_seconds": round(floor, 3),
        "statistics_seconds": round(statistics_s, 3),
        "sha256_seconds": round(sha256_s, 3),
        "collector_fraction_bound": round(floor / (floor + statistics_s + sha256_s / torch.get_num_threads()), 3),
    }


def overhead_seconds(
    hooked: HookedPolicy, ready: list[torch.Tensor], names: list[str], dim: int
) -> tuple[float, float]:
    """(statistics, sha256) seconds of the collector's work on the rows of `ready`'s batches, each timed alone
    (the rows on the CPU first, where the collector computes both)."""
    stats = {name: RunningStats(dim) for name in names}
    statistics_s = sha256_s = 0.0
    for locs in ready:
        for name, value in hooked.run_with_cache(locs, names).items():
            rows = value.reshape(-1, value.shape[-1]).cpu()  # [batch * node, d]
            tic = time.perf_counter()
            stats[name].update(rows)
            statistics_s += time.perf_counter() - tic
            tic = time.perf_counter()
            hashlib.sha256(rows.numpy())
            sha256_s += time.perf_counter() - tic
    return statistics_s, sha256_s


def peak_rss_of_big_dump(run_dir: str, gigabytes: float, batch_size: int, device: torch.device) -> dict:
    loaded = load_policy(run_dir)
    n, d, layers = loaded.config.num_loc, loaded.config.policy.embed_dim, len(loaded.model.layers)
    bytes_per_instance = n * d * 4 * layers
    num_instances = int(gigabytes * 1e9 / bytes_per_instance)
    with tempfile.TemporaryDirectory() as tmp:
        run_copy = Path(tmp) / loaded.run_dir.resolve().name  # the dump's registry entry stays out of the real run
        shutil.copytree(loaded.run_dir, run_copy, ignore=shutil.ignore_patterns("sae", "clt"))
        peak_file = Path(tmp) / "peak.json"
        cmd = [sys.executable, "-m", "bench.peak", str(peak_file), "sae.collect_activations", "--run_dir",
               str(run_copy), "--num_instances", str(num_instances), "--batch_size", str(batch_size),
               "--activations_root", tmp, "--name", "bench_big", "--device", str(device)]  # fmt: skip
        tic = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - tic
        dump_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.npy"))
        peak = json.loads(peak_file.read_text())["peak_rss_gb"]
    return {
        "big_dump_instances": num_instances,
        "big_dump_gb": round(dump_bytes / 1e9, 3),
        "big_dump_seconds": round(seconds, 1),
        "big_dump_peak_rss_gb": peak,
    }


@click.command()
@click.option("--run_dir", default="tsp20_demo", help="Run whose policy is hooked.")
@click.option("--num_instances", default=4096, help="Instances for the side-by-side timing.")
@click.option("--batch_size", default=512, help="Instances per forward pass.")
@click.option("--big_gb", default=2.0, help="Size of the dump whose peak RSS is measured (0 to skip).")
@click.option("--repeats", default=3, help="Floor and collector timed this many times, interleaved; the best of each.")
@click.option("--device", default="cpu", help="torch device the policy runs on (cpu, cuda, cuda:1).")
def main(run_dir, num_instances, batch_size, big_gb, repeats, device):
    """Time activation collection against the naive way, and measure peak memory on a big dump."""
    device = cli_device(device)
    keep_freed_memory()  # as the collector does: the floor, the collector and the naive way alike
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    result["device"] = device_name(device)
    result.update(time_collectors(run_dir, num_instances, batch_size, repeats, device))
    if big_gb > 0:
        result.update(peak_rss_of_big_dump(run_dir, big_gb, batch_size, device))
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
