"""Policy throughput benchmark; prints one JSON object.

    python -m bench.policy [--run_dir tsp20_demo] [--repeats 3] [--device cpu]

- greedy solve throughput (instances/s), batch 512, TSP20 and TSP100, with the run's policy;
- training throughput (instances/s) for TSP20: REINFORCE + POMO steps at batch 64.
Each figure is the median over --repeats timed runs after one warm-up.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import click
import torch

from policy.env import generate
from policy.loading import load_policy
from policy.model import AttentionModel
from policy.train import train_step


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


@click.command()
@click.option("--run_dir", default="tsp20_demo", help="Run whose policy is timed.")
@click.option("--repeats", default=3, help="Timed repetitions per figure (median reported).")
@click.option("--train_steps", default=5, help="Training steps per timed repetition.")
@click.option("--device", default="cpu", help="torch device.")
def main(run_dir, repeats, train_steps, device):
    """Time greedy solving and training of the Attention Model."""
    loaded = load_policy(run_dir, device=device)
    model = loaded.model
    results = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "policy": loaded.config.policy.to_dict()}  # fmt: skip
    for n in (20, 100):
        locs = generate(512, n, seed=0).to(device)

        def greedy(locs=locs):
            with torch.no_grad():
                model(locs)

        seconds = _median_seconds(greedy, repeats)
        results[f"greedy_tsp{n}_batch512_instances_per_s"] = round(512 / seconds, 1)

    torch.manual_seed(0)
    trainee = AttentionModel(loaded.config.policy).to(device).train()
    optimizer = torch.optim.Adam(trainee.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = generate(64, 20, seed=1).to(device)

    def train():
        for _ in range(train_steps):
            train_step(trainee, optimizer, batch, generator, 1.0)

    seconds = _median_seconds(train, repeats)
    results["train_tsp20_batch64_pomo_instances_per_s"] = round(64 * train_steps / seconds, 1)
    click.echo(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
