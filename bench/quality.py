"""Training quality on data nobody tuned for: validation FVU per configuration per synthetic data set.

    python -m bench.quality [--steps 300] [--datasets base,dense] [--lr_sweep "4e-3 16e-3"]

Every configuration trains a 8x transcoder (k=16) on the same rows of each data set of bench.synthetic
(the same batches, `--steps` x `--batch_size` rows) and is scored on the same validation rows:

- default          clt.train_transcoder's defaults, through its own train_step and lr schedule: random unit
                   decoder rows held at unit norm, targets divided by one scale, Adam at 32e-3 falling to 0
                   over the last 30% of the steps
- zero_decoder     the same with `decoder_init zero` (free decoder norms) at lr 8e-3 (its default)
- previous_default the defaults before bench.quality existed: centred (unscaled) targets, constant lr 4e-3
- plain_adam       a dense TopK transcoder with autograd (bench.train's), previous_default's init,
                   normalisation and lr
- sparsify_adam    EleutherAI sparsify's transcoder recipe: nn.Linear encoder with centred
                   pre-activations, zero decoder with free norms, b_dec at the target mean, raw data,
                   Adam at 2e-4 / sqrt(features / 2^14) falling linearly to 0, AuxK scaled by the dead count
- sparsify_signum  the same with sparsify's other optimizer: schedule-free sign descent, lr 5e-3 / sqrt(
                   features / 2^14), momentum 0.95 (Defazio et al.'s wrapper, written out below)

Prints JSON: per data set its noise floor, the best linear map's FVU, each configuration's FVU and
dead fraction, the best one, and how far the default is from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import click
import torch
from torch import nn

from bench.synthetic import DATA_SETS, SyntheticPairs, fvu, make_pairs
from bench.train import DenseTopK
from clt.model import CrossLayerTranscoder
from clt.train_transcoder import TranscoderTrainConfig, lr_factor, train_step
from sae.sparse import auxk_loss

Trainer = Callable[[SyntheticPairs, list[torch.Tensor]], tuple[float, float]]  # -> (val FVU, dead fraction)


def ours(**overrides) -> Trainer:
    """clt's trainer with its defaults, or with `overrides` of TranscoderTrainConfig's fields."""

    def train(pairs: SyntheticPairs, batches: list[torch.Tensor]) -> tuple[float, float]:
        cfg = TranscoderTrainConfig(run_dir="synthetic", pair="synthetic", **overrides)
        model = CrossLayerTranscoder(cfg.model_config(pairs.x.shape[1], pairs.y.shape[1]))
        model.set_statistics(pairs.x.mean(0), pairs.x.std(0), pairs.y.mean(0), pairs.y.std(0))
        if cfg.init == "data":  # as clt.train_transcoder does: from the first batch's source rows
            model.init_encoder_from(pairs.x[batches[0]], torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        counters = torch.zeros(model.feature_count, dtype=torch.long)
        for step, rows in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, len(batches), cfg.lr_decay)
            train_step(model, optimizer, pairs.x[rows], pairs.y[rows], counters)
        model.eval()
        with torch.no_grad():
            y_hat = torch.cat([model(x)[0] for x in pairs.x_val.split(8192)])
        return fvu(y_hat, pairs.y_val), (counters > model.cfg.dead_tokens).float().mean().item()

    return train


def plain_adam(pairs: SyntheticPairs, batches: list[torch.Tensor]) -> tuple[float, float]:
    cfg = TranscoderTrainConfig(run_dir="synthetic", pair="synthetic", decoder_init="random", normalize_target="center")
    reference = CrossLayerTranscoder(cfg.model_config(pairs.x.shape[1], pairs.y.shape[1]))
    reference.set_statistics(pairs.x.mean(0), pairs.x.std(0), pairs.y.mean(0), pairs.y.std(0))
    model = DenseTopK(reference)
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
    fired = torch.zeros(reference.feature_count, dtype=torch.long)
    for rows in batches:
        x, y = reference.normalize_source(pairs.x[rows]), reference.normalize_target(pairs.y[rows])
        y_hat = model(x)
        loss = (y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            fired += len(rows)
            fired[(x @ model.W_enc.T + model.b_enc).topk(model.k, dim=-1).indices.unique()] = 0
    with torch.no_grad():
        y_hat = reference.denormalize_target(model(reference.normalize_source(pairs.x_val)))
    return fvu(y_hat, pairs.y_val), (fired > 100_000).float().mean().item()


class SparsifyTranscoder(nn.Module):
    """sparsify's SparseCoder with transcode=True, as its trainer initialises and trains it (dense autograd)."""

    def __init__(self, d_in: int, d_out: int, features: int, k: int, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        self.k = k
        self.encoder = nn.Linear(d_in, features)
        with torch.no_grad():
            self.encoder.bias.copy_(-x.mean(0) @ self.encoder.weight.T)  # centred pre-activations
        self.W_dec = nn.Parameter(torch.zeros(features, d_out))
        self.b_dec = nn.Parameter(y.mean(0).clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = torch.relu(self.encoder(x))
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec, pre


class ScheduleFreeSignum(torch.optim.Optimizer):
    """Schedule-free sign descent: z steps by -lr * sign(grad at y), x is the running average of z (weights
    lr^2), and the parameters hold y = momentum * x + (1 - momentum) * z; `use_average` puts x in them."""

    def __init__(self, params, lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.weight_sum = 0.0
        for p in self.param_groups[0]["params"]:
            self.state[p].update(z=p.detach().clone(), x=p.detach().clone())

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        self.weight_sum += group["lr"] ** 2
        c = group["lr"] ** 2 / self.weight_sum
        for p in group["params"]:
            if p.grad is not None:
                z, x = self.state[p]["z"], self.state[p]["x"]
                z.add_(p.grad.sign(), alpha=-group["lr"])
                x.lerp_(z, c)
                torch.add(x * group["momentum"], z, alpha=1 - group["momentum"], out=p)

    @torch.no_grad()
    def use_average(self):
        for p in self.param_groups[0]["params"]:
            p.copy_(self.state[p]["x"])


def sparsify(optimizer_name: str) -> Trainer:
    def train(pairs: SyntheticPairs, batches: list[torch.Tensor]) -> tuple[float, float]:
        d_in, d_out = pairs.x.shape[1], pairs.y.shape[1]
        features = 8 * d_in
        model = SparsifyTranscoder(d_in, d_out, features, 16, pairs.x[batches[0]], pairs.y[batches[0]])
        scale = (features / 2**14) ** 0.5
        if optimizer_name == "adam":
            optimizer, peak = torch.optim.Adam(model.parameters(), lr=2e-4 / scale), 2e-4 / scale
        else:
            optimizer, peak = ScheduleFreeSignum(model.parameters(), lr=5e-3 / scale), None
        since_fired = torch.zeros(features, dtype=torch.long)
        for step, rows in enumerate(batches):
            x, y = pairs.x[rows], pairs.y[rows]
            y_hat, pre = model(x)
            variance = (y - y.mean(0)).pow(2).sum()
            loss = (y_hat - y).pow(2).sum() / variance
            dead = since_fired > 100_000  # our dead_tokens (sparsify's 10M would never trigger in so few rows)
            if dead.any():
                k_aux = min(d_out // 2, int(dead.sum()))
                aux = auxk_loss(x, model.encoder.weight, model.encoder.bias, model.W_dec, dead, k_aux, y, y_hat)
                loss = loss + min(int(dead.sum()) / (d_out // 2), 1.0) * aux / 32
            if peak is not None:
                optimizer.param_groups[0]["lr"] = peak * (1 - step / len(batches))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                since_fired += len(rows)
                since_fired[pre.topk(16, dim=-1).indices.unique()] = 0
        if isinstance(optimizer, ScheduleFreeSignum):
            optimizer.use_average()
        with torch.no_grad():
            y_hat = torch.cat([model(x)[0] for x in pairs.x_val.split(8192)])
        return fvu(y_hat, pairs.y_val), (since_fired > 100_000).float().mean().item()

    return train


CONFIGS: dict[str, Trainer] = {
    "default": ours(),
    "zero_decoder": ours(decoder_init="zero", lr=8e-3),
    "previous_default": ours(decoder_init="random", normalize_target="center", lr=4e-3, lr_decay=0.0),
    "plain_adam": plain_adam,
    "sparsify_adam": sparsify("adam"),
    "sparsify_signum": sparsify("signum"),
}


@click.command()
@click.option("--steps", default=300, help="Training steps per configuration.")
@click.option("--batch_size", default=4096, help="Rows per step.")
@click.option("--rows", default=200_000, help="Training rows per data set (cycled).")
@click.option("--val_rows", default=20_000, help="Validation rows per data set.")
@click.option("--datasets", default=",".join(s.name for s in DATA_SETS), help="Comma-separated data set names.")
@click.option("--configs", default=",".join(CONFIGS), help="Comma-separated configurations.")
@click.option("--lr_sweep", default="", help="Also the default at these learning rates (space-separated).")
@click.option("--threads", default=2, help="torch threads.")
def main(steps, batch_size, rows, val_rows, datasets, configs, lr_sweep, threads):
    """Print JSON: validation FVU of each training configuration on each synthetic data set, at equal rows."""
    torch.set_num_threads(threads)
    specs = {s.name: s for s in DATA_SETS}
    unknown = [n for n in datasets.split(",") if n not in specs] + [c for c in configs.split(",") if c not in CONFIGS]
    if unknown:
        raise click.BadParameter(f"unknown data sets or configurations: {unknown}")
    trainers = {name: CONFIGS[name] for name in configs.split(",")}
    trainers.update({f"default_lr{lr}": ours(lr=float(lr)) for lr in lr_sweep.split()})
    result = {"steps": steps, "batch_size": batch_size, "rows_seen": steps * batch_size, "datasets": {}}
    for name in datasets.split(","):
        pairs = make_pairs(specs[name], rows, val_rows)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
        batches = [order[(i * batch_size) % rows :][:batch_size] for i in range(steps)]
        batches = [b if len(b) == batch_size else order[:batch_size] for b in batches]
        entry = {"noise_floor": round(pairs.noise_floor, 4), "ridge_fvu": round(pairs.ridge_fvu, 4), "fvu": {},
                 "dead_fraction": {}, "seconds": {}}  # fmt: skip
        for label, trainer in trainers.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            value, dead = trainer(pairs, batches)
            entry["fvu"][label] = round(value, 4) if math.isfinite(value) else None
            entry["dead_fraction"][label] = round(dead, 4)
            entry["seconds"][label] = round(time.perf_counter() - start, 1)
        finite = {k: v for k, v in entry["fvu"].items() if v is not None}
        entry["best"] = min(finite, key=finite.get)
        if "default" in finite:
            entry["default_minus_best"] = round(finite["default"] - finite[entry["best"]], 4)
        result["datasets"][name] = entry
    gaps = [e["default_minus_best"] for e in result["datasets"].values() if "default_minus_best" in e]
    if gaps:
        result["default_worst_gap_to_best"] = max(gaps)
    click.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
