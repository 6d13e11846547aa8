"""Evaluate a trained transcoder: reconstruction and causal splicing into the policy.

    python -m clt.eval --clt_dir runs/tsp20_demo/clt/clt_runs/<pair>/<timestamp> [--num_instances 1000] [--json]
    python -m clt.eval --run_dir tsp20_demo --pair clt_L1.mlp_in_to_L1.mlp_out     # the pair's newest run
    python -m clt.eval FOLDER FOLDER ...      # several runs in one process, e.g. a sweep's (clt.summarize --list)

writes `<clt_dir>/eval/`:

    labels.json             every feature labelled by measured geometry (clt.feature_labels; --no_labels skips it)
    metrics.json            reconstruction on the validation split (FVU, R^2 per target channel, cosine,
                            L0, dead and rare features) and splicing (clt.splice) for each replacement
    features.json           per feature: activation frequency and mean activation (the attribution scores)
    decoder_heatmap.png     raw decoder weights, features (by frequency) x target channels
    feature_frequency.png   histogram of log10 feature frequencies

With `--policy_run`, `--checkpoint`, `--distribution` or `--num_loc`, a pairwise transcoder is evaluated on
that other condition instead (clt.transfer: reconstruction beside the condition's own ridge baseline, splice
drift), written to `<clt_dir>/eval/transfer/<run>_e<epoch>_<distribution>_n<nodes>.json`.

Several transcoders evaluated in one process share the loaded policies, the unmodified policy's rollouts
of the splicing instances and each pair's mean and zero ablations (`Shared`).

Edges and SAE paths from features.json: `python -m clt.graph.edges --clt_dir D` (the graph layer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import click
import numpy as np
import torch

from clt.datasets import (
    MULTILAYER,
    MultiLayerDataset,
    PairDataset,
    dump_name,
    layer_pair_names,
    pair_name,
    training_dump,
)
from clt.feature_labels import Instances, LabelOptions, label_folders
from clt.metrics import layer_reconstructions, reconstruction
from clt.model import CrossLayerTranscoder, load_transcoder
from clt.multilayer import MultiLayerTranscoder, format_k
from clt.splice import (
    ABLATIONS,
    REPLACEMENTS,
    multilayer_hooks,
    original_rollouts,
    pair_hooks,
    recovered,
    replacement,
    splice_metrics,
)
from clt.transfer import Condition, evaluate_on
from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import DISTRIBUTIONS, generate
from policy.io import atomic_write, read_json, write_json
from policy.loading import load_policy
from policy.options import choice, options
from policy.runs import resolve_run_dir
from sae.hooks import HookedPolicy
from sae.metrics import Reconstruction
from sae.runs import newest_finished, owning_run

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EvalConfig:
    clt_dir: str | None = None
    """Transcoder run folder (with cfg.json, model.safetensors, train_cfg.json)."""
    run_dir: str | None = None
    """Instead of clt_dir: a run, with `pair`, for the pair's newest transcoder."""
    pair: str | None = None
    """Pair name or source:target hooks (with run_dir)."""
    num_instances: int = 1000
    """Fresh instances for splicing (0: skip splicing)."""
    seed: int = 2024
    """Seed of the splicing instances (collection and training use other seeds)."""
    batch_size: int = 256
    """Instances per forward pass when splicing."""
    policy_run: str | None = None
    """Evaluate on another condition (clt.transfer): this policy run [default: the transcoder's own]."""
    checkpoint: int | None = None
    """With another condition: the policy's epoch [default: the one the transcoder was trained on, else the latest]."""
    distribution: str | None = choice(None, DISTRIBUTIONS)
    """With another condition: the instance distribution [default: the training dump's]."""
    num_loc: int | None = None
    """With another condition: nodes per instance [default: the training dump's]."""
    labels: bool = True
    """Also label every feature by measured geometry (clt.feature_labels, as python -m clt.label) into
    eval/labels.json; --no_labels skips it."""
    label_instances: int = 2000
    """Fresh instances the labels are measured on."""
    device: str = "cpu"
    """torch device."""

    @property
    def other_condition(self) -> bool:
        return any(v is not None for v in (self.policy_run, self.checkpoint, self.distribution, self.num_loc))

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if (self.clt_dir is None) == (self.run_dir is None):
            raise ValueError("give --clt_dir, or --run_dir with --pair")
        if self.run_dir is not None and self.pair is None:
            raise ValueError("--run_dir needs --pair")
        if self.labels and self.label_instances < 4:
            raise ValueError(f"label_instances must be at least 4, got {self.label_instances}")
        if self.num_instances < 0 or self.batch_size < 1:
            raise ValueError("num_instances must be >= 0 and batch_size positive")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError("num_loc must be at least 3")
        if self.other_condition and self.num_instances < 2:
            raise ValueError("another condition needs --num_instances >= 2")


def find_transcoder(cfg: EvalConfig) -> Path:
    if cfg.clt_dir is not None:
        folder = Path(cfg.clt_dir)
        if not (folder / "train_cfg.json").is_file():
            raise FileNotFoundError(f"{folder} is not a transcoder run folder (no train_cfg.json)")
        return folder
    run_dir = resolve_run_dir(cfg.run_dir)
    return newest_finished(run_dir, "clt", pair_name(run_dir, cfg.pair))


class Shared:
    """What evaluations in one process share: the policies they load (by run, epoch and device), and results
    that do not depend on the transcoder (`once`): the unmodified policy's rollouts of the splicing instances,
    and a pair's ablations (clt.splice.ABLATIONS), which every transcoder of the pair would repeat."""

    def __init__(self):
        self._policies: dict[tuple, HookedPolicy] = {}
        self._results: dict[tuple, object] = {}

    def policy(self, run_dir: Path, epoch: int | None, device: str) -> HookedPolicy:
        key = (str(run_dir), epoch, device)
        if key not in self._policies:
            self._policies[key] = HookedPolicy(load_policy(run_dir, epoch, device).model)
        return self._policies[key]

    def once(self, key: tuple, compute: Callable[[], T]) -> T:
        """compute() the first time `key` is asked for, its result after."""
        if key not in self._results:
            self._results[key] = compute()
        return self._results[key]


def splice_report(cfg: EvalConfig, shared: Shared, run_dir: Path, meta: dict, fns: dict,
                  ablations: tuple[tuple, dict] | None = None) -> dict:  # fmt: skip
    """splice_metrics of `fns` on cfg.num_instances fresh instances like the dump's (`meta`), with the policy
    the dump was collected from. `ablations` (a key naming them, their hooks by name): replacements that do not
    read the transcoder, spliced once per key among the evaluations that share `shared`."""
    hooked = shared.policy(run_dir, meta["checkpoint_epoch"], cfg.device)
    n, nodes, distribution = cfg.num_instances, meta["nodes_per_instance"], meta["distribution"]
    instances = (id(hooked), n, nodes, distribution, cfg.seed, cfg.batch_size)  # what the rollouts depend on
    locs = generate(n, nodes, distribution, seed=cfg.seed).to(cfg.device)
    originals = shared.once(("originals", *instances), lambda: original_rollouts(hooked, locs, cfg.batch_size))
    report = splice_metrics(hooked, locs, fns, cfg.batch_size, originals)
    if ablations is not None:
        key, hooks = ablations
        report.update(shared.once((*key, *instances), lambda: splice_metrics(hooked, locs, hooks, cfg.batch_size,
                                                                             originals)))  # fmt: skip
        if "transcoder" in report:
            report["transcoder"]["recovered"] = recovered(report)
    report["instances"] = cfg.num_instances
    return report


def plot(model: CrossLayerTranscoder, result: Reconstruction, folder: Path) -> None:
    """decoder_heatmap.png and feature_frequency.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    order = np.argsort(-result.frequency, kind="stable")
    weights = model.raw_decoder().cpu().numpy()[order]
    limit = float(np.abs(weights).max()) or 1.0
    fig, ax = plt.subplots(figsize=(8, 6))
    image = ax.imshow(weights, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set(xlabel="target channel", ylabel="feature (most frequent first)", title="decoder weights (raw units)")
    fig.colorbar(image, ax=ax)
    _save(fig, folder / "decoder_heatmap.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    alive = result.frequency[result.frequency > 0]
    ax.hist(np.log10(alive), bins=50)
    ax.set(xlabel="log10 activation frequency", ylabel="features",
           title=f"{len(alive)} of {len(result.frequency)} features fire")  # fmt: skip
    _save(fig, folder / "feature_frequency.png")


def _save(fig, path: Path) -> None:
    from matplotlib import pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def run(cfg: EvalConfig, shared: Shared | None = None) -> dict:
    """Evaluate; writes <clt_dir>/eval/ and returns metrics.json's content. Evaluations that pass one `shared`
    load each policy, roll out its unmodified tours and splice each pair's ablations once."""
    shared = shared or Shared()
    folder = find_transcoder(cfg)
    train_cfg = read_json(folder / "train_cfg.json")
    model = load_transcoder(folder).to(cfg.device)
    if isinstance(model, MultiLayerTranscoder):
        if cfg.other_condition:
            raise ValueError("another condition (--policy_run, --checkpoint, ...) is for pairwise transcoders")
        return run_multilayer(cfg, folder, train_cfg, model, shared)
    if cfg.other_condition:
        return run_other_condition(cfg, folder, train_cfg, model)
    run_dir, dump = training_dump(folder, train_cfg)
    data = PairDataset(dump.path, 4096, train_cfg["val_ratio"], train_cfg["seed"])
    meta = dump.metadata
    result = reconstruction(model, data.val_batches())
    report = {"transcoder": str(folder), "pair": meta["pair"], "source_hook": meta["source_hook"],
              "target_hook": meta["target_hook"], "features": model.cfg.n_features, "k": model.cfg.active,
              "activation": model.cfg.activation, "validation_rows": result.rows,
              "reconstruction": {**result.summary(), "r2_per_dim": result.r2_per_dim.tolist()}}  # fmt: skip
    out = folder / "eval"
    if cfg.num_instances:
        target_mean = torch.from_numpy(dump.stats("targets")[0]).float()
        source, target = meta["source_hook"], meta["target_hook"]
        hooks = {
            kind: partial(pair_hooks, source, target, replacement(kind, model, target_mean)) for kind in REPLACEMENTS
        }
        fns = {kind: make for kind, make in hooks.items() if kind not in ABLATIONS}
        ablations = (("ablations", source, target, target_mean.numpy().tobytes()),
                     {kind: hooks[kind] for kind in ABLATIONS})  # fmt: skip
        report["splice"] = splice_report(cfg, shared, run_dir, meta, fns, ablations)
    write_json(out / "features.json", {"frequency": result.frequency.tolist(),
                                       "mean_activation": result.mean_activation.tolist()})  # fmt: skip
    plot(model, result, out)
    report["labels"] = label_features(cfg, run_dir, folder)
    report["config"] = asdict(cfg)
    write_json(out / "metrics.json", report)
    return report


def label_features(cfg: EvalConfig, run_dir: Path, folder: Path) -> dict | None:
    """With cfg.labels: eval/labels.json (clt.feature_labels) and each dictionary's census, else None."""
    if not cfg.labels:
        return None
    (doc,) = label_folders(
        run_dir, [folder], Instances(cfg.label_instances), LabelOptions(), device=cfg.device
    ).values()
    return {name: section["census"] for name, section in doc["dictionaries"].items()}


def run_other_condition(cfg: EvalConfig, folder: Path, train_cfg: dict, model: CrossLayerTranscoder) -> dict:
    """Writes <clt_dir>/eval/transfer/<condition>.json (clt.transfer) and returns it."""
    own_run, dump = training_dump(folder, train_cfg)
    meta = dump.metadata
    policy_run = resolve_run_dir(cfg.policy_run) if cfg.policy_run else own_run
    epoch = cfg.checkpoint if cfg.checkpoint is not None or cfg.policy_run else meta["checkpoint_epoch"]
    condition = Condition(load_policy(policy_run, epoch, cfg.device), cfg.distribution or meta["distribution"],
                          cfg.num_loc or meta["nodes_per_instance"])  # fmt: skip
    trained_on = {"policy_run": str(own_run), "checkpoint_epoch": meta["checkpoint_epoch"],
                  "distribution": meta["distribution"], "num_loc": meta["nodes_per_instance"]}  # fmt: skip
    result = evaluate_on(model.to(cfg.device), meta["source_hook"], meta["target_hook"], condition,
                         cfg.num_instances, cfg.seed, cfg.batch_size)  # fmt: skip
    report = {"transcoder": str(folder), "pair": meta["pair"], "trained_on": trained_on, **result}
    write_json(folder / "eval" / "transfer" / f"{condition.name}.json", {**report, "config": asdict(cfg)})
    return report


def run_multilayer(cfg: EvalConfig, folder: Path, train_cfg: dict, model: MultiLayerTranscoder,
                   shared: Shared) -> dict:  # fmt: skip
    """A multi-layer CLT: per-layer reconstruction, and splicing of every layer's mlp_out at once and of each alone."""
    n = model.cfg.n_layers
    run_dir = owning_run(folder, train_cfg)
    dumps_dir = (run_dir / train_cfg["dataset_path"]).parent
    paths = [dumps_dir / dump_name(name, train_cfg.get("condition")) for name in layer_pair_names(n)]
    data = MultiLayerDataset(paths, 4096, train_cfg["val_ratio"], train_cfg["seed"])
    layers = layer_reconstructions(model, data.val_batches())
    meta = data.dump.metadata
    report = {"transcoder": str(folder), "pair": MULTILAYER, "layers": n, "features": model.feature_count,
              "k": model.cfg.ks, "activation": model.cfg.activation, "validation_rows": layers[0].rows,
              "reconstruction": {f"L{i}": r.summary() for i, r in enumerate(layers)}}  # fmt: skip
    if cfg.num_instances:
        means = data.statistics()[2]
        fns = {kind: partial(multilayer_hooks, model, kind, means) for kind in REPLACEMENTS}
        fns.update(
            {f"transcoder L{m} only": partial(multilayer_hooks, model, "transcoder", means, [m]) for m in range(n)}
        )
        report["splice"] = splice_report(cfg, shared, run_dir, meta, fns)
    out = folder / "eval"
    write_json(out / "features.json", {f"L{i}": {"frequency": r.frequency.tolist(),
                                                 "mean_activation": r.mean_activation.tolist()}
                                       for i, r in enumerate(layers)})  # fmt: skip
    report["labels"] = label_features(cfg, run_dir, folder)
    report["config"] = asdict(cfg)
    write_json(out / "metrics.json", report)
    return report


def _share(value: float | None) -> str:
    return "n/a (mean ablation does no damage)" if value is None else f"{value:.1%}"


def format_report(report: dict) -> str:
    if "condition" in report:
        c, r, s = report["condition"], report["reconstruction"], report["splice"]
        return (
            f"{report['pair']} on {c['name']} ({c['instances']} instances): FVU {r['fvu']:.4f} vs that "
            f"condition's ridge {report['ridge_val_fvu']:.4f}, L0 {r['l0']:.1f}; splice gap "
            f"{s['transcoder']['gap']:.2%}, agreement {s['transcoder']['action_agreement']:.2%}, KL "
            f"{s['transcoder']['mean_kl']:.4f}, recovered {_share(s['transcoder'].get('recovered'))}"
        )
    if report["pair"] == MULTILAYER:
        lines = [
            f"multi-layer CLT ({report['layers']} layers, {report['features']} features, k={format_k(report['k'])}):"
        ]
        lines += [
            f"  {layer}: FVU {r['fvu']:.4f}, cosine {r['cosine']:.4f}, L0 {r['l0']:.1f}, dead "
            f"{r['dead_fraction']:.1%}, dense {r['dense_fraction']:.1%}, "
            f"effective features {r['effective_features']:.0f}"
            for layer, r in report["reconstruction"].items()
        ]
    else:
        r = report["reconstruction"]
        lines = [
            f"{report['pair']} ({report['activation']}, {report['features']} features, k={report['k']}): "
            f"FVU {r['fvu']:.4f}, mean R^2 per channel {r['r2_per_dim_mean']:.4f}, cosine {r['cosine']:.4f}, "
            f"L0 {r['l0']:.1f}, dead {r['dead_fraction']:.1%}, rare {r['rare_fraction']:.1%}, dense "
            f"{r['dense_fraction']:.1%}, effective features {r['effective_features']:.0f}"
        ]
    splice = report.get("splice")
    if splice:
        lines.append(
            f"splicing on {splice['instances']} instances, "
            f"original mean length {splice['original']['mean_length']:.4f}:"
        )
        lines.append(f"  {'replacement':<22}{'length':>9}{'gap':>9}{'agree':>9}{'KL':>10}{'same tour':>11}")
        for kind, s in splice.items():
            if kind in ("original", "instances"):
                continue
            lines.append(f"  {kind:<22}{s['mean_length']:>9.4f}{s['gap']:>9.2%}{s['action_agreement']:>9.2%}"
                         f"{s['mean_kl']:>10.4f}{s['same_tour_fraction']:>11.1%}")  # fmt: skip
        lines.append(
            f"  transcoder recovers {_share(splice['transcoder'].get('recovered'))} of the mean-ablation damage"
        )
    for name, c in (report.get("labels") or {}).items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in c["shares"].items() if v)
        lines.append(f"labels {name}: {c['live']} live of {c['features']} features; {shares or 'none labelled'}")
    return "\n".join(lines)


@click.command()
@options(EvalConfig)
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print metrics.json instead of the summary (with several FOLDERS, one JSON line each).")  # fmt: skip
def main(folders, as_json, **settings):
    """Evaluate a transcoder: reconstruction on its validation split and splicing into the policy.

    FOLDERS: transcoder run folders to evaluate one after another in this process, each as with --clt_dir
    (instead of --clt_dir or --run_dir/--pair); they share loaded policies, unmodified rollouts and each pair's
    ablations."""
    with command():
        if folders and (settings["clt_dir"] or settings["run_dir"]):
            raise ValueError("give transcoder FOLDERS, or --clt_dir, or --run_dir with --pair: one of them")
        cfgs = [EvalConfig(**{**settings, "clt_dir": folder}) for folder in folders] or [EvalConfig(**settings)]
        shared = Shared()
        for cfg in cfgs:
            report = run(cfg, shared)
            if as_json:
                click.echo(json.dumps(report, indent=None if len(cfgs) > 1 else 1))
            else:
                click.echo(format_report(report))


if __name__ == "__main__":
    main()
