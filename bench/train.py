"""Transcoder training speed and quality: clt's trainer against a plain dense PyTorch TopK transcoder.

    python -m bench.train [--tokens 2000000] [--seeds 5] [--threads 2] [--device cpu]

Data: `encoder_layer_1.mlp_in -> encoder_layer_1.mlp_out` of runs/tsp20_demo (d=128),
collected in memory from uniform TSP20 instances; validation rows come from other
instances. Both transcoders have 8x expansion (1024 features), k=16, batch 4096, fp32,
the same initial weights (one set per seed, `--seeds` of them) and normalisation (clt.train_transcoder's
defaults), and see the same batches (slices of the rows shuffled once), stepping in turn so that a machine whose speed
drifts slows both alike. clt's side is its trainer's defaults (sae.trainer.adam at 32e-3 with its schedule):
`train_step` selects with sae.sparse.select_topk (the compiled kernel of sae.topk_kernel), decodes from
the active features only (sae.sparse, its backward compiled in sae.decode_kernel) and also keeps
unit-norm decoder rows, dead-feature counters and the AuxK loss. The plain one computes everything
densely and lets autograd differentiate it (z = scatter(torch.topk), y = z @ W_dec), with the same Adam at
--plain_lr. Prints JSON: tokens/s (all steps of every seed but each one's first; the first compiles),
validation FVU after the same tokens per seed and its median (on this pair clt's FVU moves by up to a third
with the initial weights, the plain one's by a tenth: one seed cannot tell the two apart, and the median of three
moved past the plain one's when only the order of a row's summed entries changed), the median step
against the encoder-GEMM floor (timed every 10th step beside them), top-k and batch top-k selection against
torch.topk and the GEMM (each timed in turn, medians of 5), and the
targets (`targets`: >= 3x the plain rows/s at no worse median FVU, a step within 2.5x of the GEMM floor,
selection under 25% of the GEMM, batchtopk within 2x of topk). Then (unless
--no_scaling) bench.train_scaling's cases: the multi-layer CLT against three pairwise
transcoders of the same total width, and 2 DDP ranks against 1 process (on the CPU).

`--device cuda` runs the race and the selections on the GPU (the rows are collected on the CPU, then moved), where
the selections are torch.topk's and the sparse decode's backward dense GEMMs (sae.sparse); every timing then waits
for the GPU (torch.cuda.synchronize) before it reads the clock.
"""

from __future__ import annotations

import json
import statistics
from typing import NamedTuple

import click
import torch
from torch import nn

from bench.timing import cli_device, clock, device_name
from bench.train_scaling import collect_layers, ddp_case, multilayer_case
from clt.model import CrossLayerTranscoder
from clt.train_transcoder import TranscoderTrainConfig, lr_factor, train_step
from policy.heap import keep_freed_memory
from sae.sparse import select_batchtopk, select_topk
from sae.trainer import adam


class DenseTopK(nn.Module):
    """The plain way: dense codes, dense decoder, autograd through everything."""

    def __init__(self, model: CrossLayerTranscoder):
        super().__init__()
        self.k = model.cfg.active
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(model, name).detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc.T + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return z @ self.W_dec + self.b_dec


def fvu(model, x_val, y_val, predict) -> float:
    with torch.no_grad():
        y_hat = torch.cat([predict(rows) for rows in x_val.split(8192)])
        return ((y_hat - y_val).pow(2).sum() / (y_val - y_val.mean(0)).pow(2).sum()).item()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Milliseconds per call of fn, after one untimed call."""
    fn()
    start = clock(device)
    for _ in range(repeats):
        fn()
    return (clock(device) - start) / repeats * 1e3


class Race(NamedTuple):
    """Both trainers after the same steps from one seed's initial weights, and their step times [s]."""

    ours: CrossLayerTranscoder
    plain: DenseTopK
    ours_times: list[float]
    plain_times: list[float]
    gemm_times: list[float]  # the encoder GEMM at the current weights, every 10th step


def race(x, y, batches: list[slice], train_cfg: TranscoderTrainConfig, plain_lr: float, seed: int) -> Race:
    """The two trainers from seed's weights, stepping in turn on the same batches, and every 10th step the floor
    (the encoder GEMM at this step's weights) timed beside them: a machine whose speed drifts slows all three
    alike."""
    torch.manual_seed(seed)
    cfg = train_cfg.model_config(x.shape[1], y.shape[1])
    ours = CrossLayerTranscoder(cfg).to(x.device)  # initialised on the CPU: the same weights on every device
    ours.set_statistics(x.mean(0), x.std(0), y.mean(0), y.std(0))
    plain = DenseTopK(ours)
    opt_ours = adam(ours.parameters(), train_cfg.lr)  # the trainer's Adam (fused where torch has it), for both
    opt_plain = adam(plain.parameters(), plain_lr)
    counters = torch.zeros(cfg.n_features, dtype=torch.long, device=x.device)

    def plain_step(rows):
        xn, yn = ours.normalize_source(x[rows]), ours.normalize_target(y[rows])
        loss = (plain(xn) - yn).pow(2).sum(-1).mean() / (yn - yn.mean(0)).pow(2).sum(-1).mean()
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

    xb = ours.normalize_source(x[batches[0]])
    gemm_out = torch.empty(len(xb), cfg.n_features, device=x.device)
    result = Race(ours, plain, [], [], [])
    for step, rows in enumerate(batches):
        opt_ours.param_groups[0]["lr"] = train_cfg.lr * lr_factor(step, len(batches), train_cfg.lr_decay)
        start = clock(x.device)
        train_step(ours, opt_ours, x[rows], y[rows], counters)
        result.ours_times.append(clock(x.device) - start)
        start = clock(x.device)
        plain_step(rows)
        result.plain_times.append(clock(x.device) - start)
        if step % 10 == 0:
            w, b = ours.W_enc.detach(), ours.b_enc.detach()
            gemm_ms = timed(lambda: torch.addmm(b, xb, w.T, out=gemm_out), 3, x.device)  # noqa: B023
            result.gemm_times.append(gemm_ms / 1e3)
    ours.eval()
    return result


def validation_fvus(r: Race, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[float, float]:
    """(clt's, the plain transcoder's) validation FVU, in raw target units."""
    ours = fvu(r.ours, x_val, y_val, lambda rows: r.ours(rows)[0])
    plain = fvu(r.plain, x_val, y_val, lambda rows: r.ours.denormalize_target(r.plain(r.ours.normalize_source(rows))))
    return ours, plain


@click.command()
@click.option("--run_dir", default="tsp20_demo", help="Run whose policy produces the pair.")
@click.option("--tokens", default=2_000_000, help="Training rows per implementation (and seed).")
@click.option("--train_instances", default=10_000, help="Instances whose rows are cycled for training.")
@click.option("--val_instances", default=2_000, help="Other instances for validation.")
@click.option("--batch_size", default=4096, help="Rows per step.")
@click.option("--plain_lr", default=4e-3, help="Adam learning rate of the plain transcoder (clt's is its default).")
@click.option("--seeds", default=5, help="Initial weights to train both from (seeds 0..N-1); FVUs compared by median.")
@click.option("--threads", default=2, help="torch threads.")
@click.option("--scaling/--no_scaling", default=True, help="Also the multi-layer and 2-process DDP cases (CPU).")
@click.option("--device", default="cpu", help="torch device of the race and the selections (cpu, cuda, cuda:1).")
def main(run_dir, tokens, train_instances, val_instances, batch_size, plain_lr, seeds, threads, scaling, device):
    """Print JSON: training tokens/s and validation FVU, clt vs plain dense TopK transcoder."""
    if seeds < 1:
        raise click.BadParameter("needs at least one seed", param_hint="--seeds")
    device = cli_device(device)
    torch.set_num_threads(threads)
    keep_freed_memory()  # as the dictionary trainers do: both sides' freed tensors stay in the heap
    xs, ys = collect_layers(run_dir, train_instances, seed=1)
    xs_val, ys_val = collect_layers(run_dir, val_instances, seed=10**6)
    # encoder_layer_1.mlp_in -> .mlp_out
    x, y, x_val, y_val = (t[1].to(device) for t in (xs, ys, xs_val, ys_val))
    train_cfg = TranscoderTrainConfig(run_dir=run_dir, pair="bench", expansion_factor=8, k=16, batch_size=batch_size)
    steps = tokens // batch_size
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = x[order], y[order]  # shuffled once: a batch is a slice, as the trainer's loader hands it over
    batches = [slice(start, start + batch_size) for start in range(0, len(x) - batch_size + 1, batch_size)]
    batches = [batches[i % len(batches)] for i in range(steps)]
    races = [race(x, y, batches, train_cfg, plain_lr, seed) for seed in range(seeds)]
    val_ours, val_plain = zip(*(validation_fvus(r, x_val, y_val) for r in races), strict=True)
    ours = races[0].ours  # the selections below are timed on seed 0's trained encoder
    ours_times = [t for r in races for t in r.ours_times[1:]]  # each race's first step (the first one compiles)
    plain_times = [t for r in races for t in r.plain_times[1:]]
    gemm_times = [t for r in races for t in r.gemm_times]
    ours_s, plain_s = sum(ours_times), sum(plain_times)
    xb, gemm_out = ours.normalize_source(x[batches[0]]), torch.empty(batch_size, ours.cfg.n_features, device=device)

    # the selections, torch.topk and the GEMM on this step's pre-activations, each timed in turn 5 times (medians)
    out = torch.addmm(ours.b_enc.detach(), xb, ours.W_enc.detach().T)
    timings = {
        "topk_ms": lambda: select_topk(out, 16),
        "torch_topk_ms": lambda: torch.topk(out, 16, dim=-1, sorted=False),
        "int32_torch_topk_ms": lambda: torch.topk(out.view(torch.int32), 16, dim=-1, sorted=False),
        "batchtopk_ms": lambda: select_batchtopk(out, 16),
        "encoder_gemm_ms": lambda: torch.addmm(ours.b_enc.detach(), xb, ours.W_enc.detach().T, out=gemm_out),
    }
    spans = {name: [] for name in timings}
    for _ in range(5):
        for name, fn in timings.items():
            spans[name].append(timed(fn, 10, device))
    ms = {name: statistics.median(values) for name, values in spans.items()}
    same = torch.equal(select_topk(out, 16).features.view(-1, 16).sort(1).values, out.topk(16).indices.sort(1).values)
    ours.train()
    forward_ms = timed(lambda: ours.forward_train(xb), 20, device)
    ours_step_ms = statistics.median(ours_times) * 1e3
    plain_step_ms = statistics.median(plain_times) * 1e3
    gemm_ms = statistics.median(gemm_times) * 1e3
    topk_ms, batchtopk_ms = ms["topk_ms"], ms["batchtopk_ms"]
    result = {
        "device": device_name(device),
        "threads": threads,
        "shape": {"d": 128, "features": 1024, "k": 16, "batch": batch_size, "dtype": "float32"},
        "tokens": steps * batch_size,
        "seeds": seeds,
        "clt_tokens_per_s": round(len(ours_times) * batch_size / ours_s),
        "plain_dense_tokens_per_s": round(len(plain_times) * batch_size / plain_s),
        "speedup": round(plain_s / ours_s, 2),
        "clt_val_fvu": round(statistics.median(val_ours), 5),
        "plain_dense_val_fvu": round(statistics.median(val_plain), 5),
        "clt_val_fvu_per_seed": [round(v, 5) for v in val_ours],
        "plain_dense_val_fvu_per_seed": [round(v, 5) for v in val_plain],
        "encoder_gemm_ms": round(gemm_ms, 2),
        "encoder_gemm_gflop_per_s": round(2 * batch_size * 128 * 1024 / gemm_ms / 1e6, 1),
        "topk_ms": round(topk_ms, 2),
        "torch_topk_ms": round(ms["torch_topk_ms"], 2),
        "int32_torch_topk_ms": round(ms["int32_torch_topk_ms"], 2),
        "topk_same_selection_as_torch": same,
        "batchtopk_ms": round(batchtopk_ms, 2),
        "encoder_gemm_ms_beside_selections": round(ms["encoder_gemm_ms"], 2),
        "topk_fraction_of_gemm": round(topk_ms / ms["encoder_gemm_ms"], 3),
        "clt_forward_ms": round(forward_ms, 2),
        "clt_backward_auxk_and_update_ms": round(ours_step_ms - forward_ms, 2),
        "clt_step_ms_median": round(ours_step_ms, 2),
        "plain_step_ms_median": round(plain_step_ms, 2),
        "clt_gemm_floor_fraction": round(gemm_ms / ours_step_ms, 3),
        "plain_gemm_floor_fraction": round(gemm_ms / plain_step_ms, 3),
    }
    result["targets"] = {
        "speedup_at_least_3x": result["speedup"] >= 3,
        "fvu_no_worse_than_plain": statistics.median(val_ours) <= statistics.median(val_plain),
        "step_within_2.5x_of_gemm_floor": gemm_ms / ours_step_ms >= 0.4,
        "topk_under_25%_of_gemm": topk_ms < 0.25 * ms["encoder_gemm_ms"],
        "batchtopk_within_2x_of_topk": batchtopk_ms <= 2 * topk_ms,
    }
    if scaling:
        result.update(multilayer_case(run_dir, tokens // 2))
        result.update(ddp_case(run_dir, tokens // 2))
    click.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
