"""Describe a trained transcoder or a pair dump: a transcoder's summary, a dump's statistics and streaming rate.

    python -m clt.describe model --clt_dir runs/tsp20_demo/clt/clt_runs/<pair>/<timestamp>  (or --run_dir R --pair P)
    python -m clt.describe dump --run_dir tsp20_demo --pair clt_L0_to_L1 [--batches 50]

`python -m clt.model` and `python -m clt.datasets` are the same two commands (their modules hand over to this one
in a fresh interpreter, so that nothing is imported twice).

The transcoder's summary: its shape and options, parameter count, row norms of encoder and decoder, and the
validation metrics its training left in summary.json. The dump's: rows, split, per-side statistics, and how
fast PairDataset streams training batches from disk (rows/s over `--batches` batches).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from clt.datasets import PairDataset, dump_name, pair_name, pair_path
from clt.model import load_transcoder
from clt.multilayer import format_k
from policy.checks import check_types
from policy.cli import command
from policy.io import read_json
from policy.options import options
from policy.runs import resolve_run_dir
from sae.runs import newest_finished


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


def model_summary(folder: Path) -> dict:
    """A transcoder folder's config, parameter count, row norms and (when trained) validation metrics."""
    model = load_transcoder(folder)
    encoder, decoder = (norms.cpu().numpy() for norms in model.row_norms())
    summary = {
        "folder": str(folder),
        "kind": "multi-layer" if hasattr(model.cfg, "n_layers") else "pairwise",
        "features": model.feature_count,
        "k": model.cfg.ks if hasattr(model.cfg, "ks") else model.cfg.active,  # multi-layer: one k per layer
        "parameters": sum(p.numel() for p in model.parameters()),
        "cfg": asdict(model.cfg),
        "encoder_row_norm": _spread(encoder),
        "decoder_row_norm": _spread(decoder),
    }
    if (folder / "summary.json").is_file():
        summary["trained"] = read_json(folder / "summary.json")
    return summary


def format_model(summary: dict) -> str:
    cfg = summary["cfg"]
    shape = (
        f"{cfg['n_layers']} layers x d={cfg['d']}"
        if "n_layers" in cfg
        else f"d_in={cfg['d_in']} -> d_out={cfg['d_out']}"
    )
    lines = [
        f"{summary['kind']} transcoder in {summary['folder']}",
        f"  {shape}, {summary['features']} features, {summary['parameters']:,} parameters",
        f"  {cfg['activation']}, k={format_k(summary['k'])}; normalise source "
        f"{cfg['normalize_source']}, target {cfg['normalize_target']}",
    ]
    for side in ("encoder", "decoder"):
        s = summary[f"{side}_row_norm"]
        lines.append(f"  {side} row norms: min {s['min']:.4g}, median {s['median']:.4g}, max {s['max']:.4g}")
    trained = summary.get("trained")
    if trained:
        lines.append(f"  trained {trained.get('steps')} steps on {trained.get('pair')}: validation FVU "
                     f"{trained.get('val/fvu', float('nan')):.4f}, L0 {trained.get('val/l0', float('nan')):.2f}, "
                     f"dead {trained.get('val/dead_fraction', float('nan')):.1%}")  # fmt: skip
    return "\n".join(lines)


@dataclass
class DescribeModelConfig:
    clt_dir: str | None = None
    """Transcoder folder (cfg.json + model.safetensors)."""
    run_dir: str | None = None
    """Instead of clt_dir: a run, with `pair`, for that pair's newest finished transcoder."""
    pair: str | None = None
    """Pair name, source:target hooks or clt_multilayer (with run_dir)."""
    json: bool = False
    """Print the summary as JSON."""

    def __post_init__(self):
        check_types(self)
        if (self.clt_dir is None) == (self.run_dir is None) or (self.run_dir is not None) != (self.pair is not None):
            raise ValueError("give --clt_dir, or --run_dir with --pair")


def run_model(cfg: DescribeModelConfig) -> dict:
    if cfg.clt_dir is not None:
        return model_summary(Path(cfg.clt_dir))
    run_dir = resolve_run_dir(cfg.run_dir)
    return model_summary(newest_finished(run_dir, "clt", pair_name(run_dir, cfg.pair)))


@click.command("model")
@options(DescribeModelConfig)
def model_main(**settings):
    """Summarise a trained transcoder: shape, options, parameters, row norms, validation metrics."""
    with command():
        summary = run_model(DescribeModelConfig(**settings))
    click.echo(json.dumps(summary, indent=1) if settings["json"] else format_model(summary))


@dataclass
class DescribeDataConfig:
    run_dir: str
    """Run folder or name under runs/."""
    pair: str
    """Pair name or source:target hooks, as collected by clt.collect_pairs."""
    condition: str | None = None
    """The pair's dump under this collection condition (clt.train_transcoder --condition) [default: the run's]."""
    batch_size: int = 4096
    """Rows per batch."""
    batches: int = 20
    """Training batches to stream for the throughput figure (0: none)."""
    val_ratio: float = 0.1
    """Fraction of instances held out for validation, as the trainer splits them."""
    activations_root: str | None = None
    """Where pair dumps live if not in the run's registry."""
    json: bool = False
    """Print the statistics as JSON."""

    def __post_init__(self):
        check_types(self)
        if self.batch_size < 1 or self.batches < 0 or not 0 <= self.val_ratio < 1:
            raise ValueError("batch_size must be positive, batches >= 0 and val_ratio in [0, 1)")


def data_summary(cfg: DescribeDataConfig) -> dict:
    """The pair dump's size, split and per-side statistics, and the streaming rate of its training batches."""
    run_dir = resolve_run_dir(cfg.run_dir)
    name = pair_name(run_dir, cfg.pair)
    root = Path(cfg.activations_root) if cfg.activations_root else None
    data = PairDataset(pair_path(run_dir, dump_name(name, cfg.condition), root), cfg.batch_size, cfg.val_ratio)
    summary = {
        "pair": name,
        "dump": str(data.dump.path),
        "rows": data.dump.rows,
        "instances": data.dump.num_instances,
        "rows_per_instance": data.dump.nodes_per_instance,
        "train_instances": len(data.train_ids),
        "val_instances": len(data.val_ids),
        "steps_per_epoch": data.train.steps_per_epoch,
    }
    for side in ("sources", "targets"):
        mean, std = data.dump.stats(side)
        summary[side] = {"dim": int(mean.shape[0]), "mean_norm": float(np.linalg.norm(mean)),
                         "std": _spread(std), "total_variance": float((std**2).sum())}  # fmt: skip
    if cfg.batches:
        rows, start = 0, time.perf_counter()
        for i, (x, _) in enumerate(data.train_batches(0)):
            rows += len(x)
            if i + 1 == cfg.batches:
                break
        seconds = time.perf_counter() - start
        summary["stream"] = {"batches": i + 1, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}
    return summary


def format_data(summary: dict) -> str:
    lines = [
        f"{summary['pair']}: {summary['dump']}",
        f"  {summary['rows']:,} rows = {summary['instances']:,} instances x {summary['rows_per_instance']}; "
        f"{summary['train_instances']:,} train / {summary['val_instances']:,} validation instances, "
        f"{summary['steps_per_epoch']} steps per epoch",
    ]
    for side in ("sources", "targets"):
        s = summary[side]
        lines.append(f"  {side}: d={s['dim']}, |mean| {s['mean_norm']:.4g}, std min {s['std']['min']:.4g} "
                     f"median {s['std']['median']:.4g} max {s['std']['max']:.4g}, "
                     f"total variance {s['total_variance']:.4g}")  # fmt: skip
    if "stream" in summary:
        s = summary["stream"]
        lines.append(f"  streamed {s['batches']} training batches ({s['rows']:,} rows) in {s['seconds']:.3f} s: "
                     f"{s['rows_per_s']:,.0f} rows/s")  # fmt: skip
    return "\n".join(lines)


@click.command("dump")
@options(DescribeDataConfig)
def datasets_main(**settings):
    """A pair dump's statistics (rows, split, per-side means and stds) and its streaming throughput."""
    with command():
        summary = data_summary(DescribeDataConfig(**settings))
    click.echo(json.dumps(summary, indent=1) if settings["json"] else format_data(summary))


@click.group()
def main():
    """Describe a trained transcoder (model) or a pair dump (dump)."""


main.add_command(model_main)
main.add_command(datasets_main)


if __name__ == "__main__":
    main()
