"""The multi-layer CLT and 2-process DDP cases of bench.train.

    python -m bench.train_scaling [--tokens 1000000]         (bench.train runs it too and merges its JSON)

- multilayer: the 3-layer CLT of runs/tsp20_demo (1024 features and k=16 per layer, every
  layer's mlp_in -> mlp_out) against three pairwise mlp transcoders of the same total width
  trained on the same rows: tokens/s and validation FVU per layer.
- ddp: the pairwise L1 mlp transcoder under `torchrun --nproc_per_node 2` (gloo, one thread
  per rank), tokens/s per process against one process with the same total threads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import click
import torch

from clt.metrics import layer_reconstructions
from clt.model import CrossLayerTranscoder, TranscoderConfig
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
from clt.train_transcoder import TrainingForward, train_step
from policy.distributed import init_distributed, shutdown, synchronize
from policy.env import generate
from policy.heap import keep_freed_memory
from policy.loading import load_policy
from sae.hooks import HookedPolicy

BATCH = 4096


@torch.no_grad()
def collect_layers(run_dir: str, instances: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's (mlp_in, mlp_out) rows: [layer, rows, d] each."""
    hooked = HookedPolicy(load_policy(run_dir).model)
    n = len(hooked.model.layers)
    names = [f"encoder_layer_{i}.{p}" for i in range(n) for p in ("mlp_in", "mlp_out")]
    parts = []
    for start in range(0, instances, 1024):
        cache = hooked.run_with_cache(generate(min(1024, instances - start), 20, seed=seed + start), names)
        parts.append(torch.stack([cache[name].flatten(0, 1) for name in names]))
    rows = torch.cat(parts, dim=1)  # [2 * layer, rows, d]
    return rows[0::2], rows[1::2]


def _batches(rows: int, tokens: int) -> list[torch.Tensor]:
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    out = [order[(i * BATCH) % rows :][:BATCH] for i in range(tokens // BATCH)]
    return [b if len(b) == BATCH else order[:BATCH] for b in out]


def multilayer_case(run_dir: str, tokens: int) -> dict:
    xs, ys = collect_layers(run_dir, 10_000, seed=1)
    xs_val, ys_val = collect_layers(run_dir, 2_000, seed=10**6)
    n, d = xs.shape[0], xs.shape[2]
    batches = _batches(xs.shape[1], tokens)
    stats = (xs.mean(1), xs.std(1), ys.mean(1), ys.std(1))
    torch.manual_seed(0)
    ml = MultiLayerTranscoder(MultiLayerConfig(n_layers=n, d=d, expansion_factor=8, k=16))
    ml.set_statistics(*stats)
    opt, counters = torch.optim.Adam(ml.parameters(), lr=4e-3), torch.zeros(ml.feature_count, dtype=torch.long)
    start = time.perf_counter()
    for rows in batches:
        train_step(ml, opt, xs[:, rows], ys[:, rows], counters)
    ml_s = time.perf_counter() - start
    ml_fvu = [r.fvu for r in layer_reconstructions(ml, [(xs_val, ys_val)])]
    pair_s, pair_fvu = 0.0, []
    for i in range(n):
        torch.manual_seed(0)
        cfg = TranscoderConfig(d, d, expansion_factor=8, k=16, normalize_source="standard", normalize_target="center")
        model = CrossLayerTranscoder(cfg)
        model.set_statistics(*(s[i] for s in stats))
        opt, counters = torch.optim.Adam(model.parameters(), lr=4e-3), torch.zeros(cfg.n_features, dtype=torch.long)
        start = time.perf_counter()
        for rows in batches:
            train_step(model, opt, xs[i, rows], ys[i, rows], counters)
        pair_s += time.perf_counter() - start
        pair_fvu.append(layer_reconstructions(model, [(xs_val[i], ys_val[i])])[0].fvu)
    trained = len(batches) * BATCH
    return {
        "multilayer": {"layers": n, "features_per_layer": 8 * d, "k_per_layer": 16, "tokens": trained,
                       "tokens_per_s": round(trained / ml_s), "val_fvu_per_layer": [round(v, 5) for v in ml_fvu]},
        "pairwise_x3": {"tokens_per_s": round(trained / pair_s), "val_fvu_per_layer": [round(v, 5) for v in pair_fvu]},
    }  # fmt: skip


def ddp_case(run_dir: str, tokens: int) -> dict:
    """tokens/s of 1 process (2 threads) and of 2 DDP ranks (1 thread each), on the pairwise L1 mlp transcoder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = ["-m", "bench.train_scaling", "--worker", "--run_dir", run_dir, "--tokens", str(tokens)]
    single = subprocess.run([sys.executable, *worker, "--threads", "2"], capture_output=True, text=True, check=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), *worker, "--threads", "1"]  # fmt: skip
    two = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    one_rate, two_rate = json.loads(single.stdout)["tokens_per_s"], json.loads(two.stdout)["tokens_per_s"]
    return {"ddp": {"one_process_tokens_per_s": one_rate, "two_ranks_tokens_per_s": two_rate,
                    "two_ranks_tokens_per_s_per_process": round(two_rate / 2), "backend": "gloo"}}  # fmt: skip


def run_worker(run_dir: str, tokens: int, threads: int) -> None:
    torch.set_num_threads(threads)
    keep_freed_memory()  # as the trainers do
    info, _ = init_distributed("cpu")
    xs, ys = collect_layers(run_dir, 4_000, seed=1)
    x, y = xs[1], ys[1]
    torch.manual_seed(0)
    model = CrossLayerTranscoder(TranscoderConfig(128, 128, expansion_factor=8, k=16, normalize_source="standard"))
    model.set_statistics(x.mean(0), x.std(0), y.mean(0), y.std(0))
    forward = torch.nn.parallel.DistributedDataParallel(TrainingForward(model)) if info.enabled else None
    opt, counters = torch.optim.Adam(model.parameters(), lr=4e-3), torch.zeros(1024, dtype=torch.long)
    batches = _batches(len(x), tokens)
    start = time.perf_counter()
    for rows in batches:
        mine = rows.tensor_split(info.world_size)[info.rank]
        train_step(model, opt, x[mine], y[mine], counters, dist=info, forward=forward)
    seconds = time.perf_counter() - start
    if info.is_main:
        click.echo(json.dumps({"tokens_per_s": round(len(batches) * BATCH / seconds)}))
    synchronize(info)
    shutdown(info)


@click.command()
@click.option("--run_dir", default="tsp20_demo", help="Run whose policy produces the activations.")
@click.option("--tokens", default=1_000_000, help="Training rows per implementation.")
@click.option("--threads", default=2, help="torch threads.")
@click.option("--worker", is_flag=True, help="Internal: one (DDP) training process, run by the ddp case.")
def main(run_dir, tokens, threads, worker):
    """Print JSON: multi-layer CLT vs three pairwise transcoders, and 2 DDP ranks vs 1 process."""
    if worker:
        run_worker(run_dir, tokens, threads)
        return
    torch.set_num_threads(threads)
    keep_freed_memory()
    click.echo(json.dumps({**multilayer_case(run_dir, tokens), **ddp_case(run_dir, tokens)}, indent=1))


if __name__ == "__main__":
    main()
