"""Export what a run has produced into the docs site's data: `python -m clt.site.export --run_dir R`.

Gathers the policy (size, gap to the reference solver), every SAE run and transcoder run (the
newest finished one per hook or pair, with its summary.json and clt.eval's eval/metrics.json),
and, on fresh instances run through the policy, for each dictionary's most active features:
- their top-activating instances (coordinates, the greedy tour, the feature's activation at each node);
- their activation histogram, strongest decoder channels, and up- and downstream features by
  direct-path virtual weight (clt.graph.weights), SAE features upstream of transcoder features included;
- the generalisation matrices clt.generalize wrote (`<run>/clt/generalize/<pair>/<name>.json`), when present;
- the layer-to-layer graphs the site draws: `sae` (the SAEs), `mlp` (per-layer mlp_in -> mlp_out
  transcoders), `residual` (the other pairwise transcoders), `multilayer` (the multi-layer CLT's layers);
- attribution graphs (clt.graph.attribution) of an early, a middle and a late decision of `--decisions` fresh instances,
  through the run's multi-layer CLT (else its per-layer mlp transcoders), for the Decisions tab; their most
  influential features get feature pages;
- every feature's label (clt.label's `eval/labels.json`, where the dictionary has one) and its receptive field (mean
  activation on a 6 x 6 grid of the unit square), so that every feature is found by the Features tab's search and has
  a page, with maps and histograms for the shown ones.

Writes `<out>/site.json` and `<out>/site.js` (the same object as `window.SITE_DATA = ...;`, so that
docs/index.html also works from the file system, where browsers refuse fetch). Schema `tsp-interp.site/1`.
The decisions go to `<out>/decisions.{json,js}` (clt.graph.gallery), beside those `clt.graph.attribute --export`
added for the same run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from clt.dictionaries import Dictionary, find_dictionaries
from clt.feature_labels import CATEGORIES, read_labels
from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import Decision, greedy_tour
from clt.graph.explain import attach_labels, in_words
from clt.graph.gallery import add_to_gallery, for_site
from clt.graph.replacement import load_replacement
from clt.graph.weights import norm_scales, stream_position, virtual_weights
from policy.checks import check_device, check_types
from policy.cli import command
from policy.env import generate, tour_length
from policy.io import atomic_write, read_json
from policy.loading import load_policy
from policy.options import options
from policy.runs import resolve_run_dir
from sae.hook_names import parse_layer_hook
from sae.hooks import HookedPolicy
from sae.model import SAEConfig
from sae.runs import newest_runs, sweep_runs

log = logging.getLogger(__name__)

SCHEMA = "tsp-interp.site/1"
VIEWS = {"sae": "SAE features", "mlp": "MLP transcoders (per layer)", "residual": "Residual-stream transcoders",
         "multilayer": "Multi-layer CLT"}  # fmt: skip
NEIGHBOURS = 6  # up- and downstream features listed on a feature page


@dataclass
class ExportConfig:
    run_dir: str
    """Run folder, or a run name under runs/."""
    out: str = "docs/data"
    """Folder for site.json and site.js (docs/index.html reads docs/data/site.js)."""
    num_instances: int = 256
    """Fresh instances on which features are measured and their top instances chosen."""
    seed: int = 4321
    """Seed of those instances (collection, training and splicing use others)."""
    features: int = 24
    """Features shown per dictionary: the most active ones (by mean activation)."""
    top_instances: int = 4
    """Maps per feature page: the instances where the feature peaks highest."""
    edges: int = 300
    """Edges kept per graph, by |attribution|."""
    checkpoint: int | None = None
    """Policy checkpoint epoch [default: the latest]."""
    dictionaries: tuple[str, ...] = ()
    """SAE / transcoder run folders to show [default: the newest finished one of every hook and pair]."""
    sweep: str | None = None
    """Show the transcoders this sweep made (train_clt.sh --sweep), beside the newest SAE of every hook."""
    decisions: int = 2
    """Instances whose early, middle and late decisions get attribution graphs for the Decisions tab (0: none)."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        self.dictionaries = tuple(self.dictionaries)
        if min(self.num_instances, self.features, self.top_instances, self.edges) < 1:
            raise ValueError("num_instances, features, top_instances and edges must be positive")
        if self.decisions < 0:
            raise ValueError("decisions must be >= 0")
        if self.top_instances > self.num_instances:
            raise ValueError("top_instances cannot exceed num_instances")


def view_of(d: Dictionary) -> str:
    if d.kind == "sae":
        return "sae"
    if d.kind == "clt_layer":
        return "multilayer"
    (target,) = d.writes
    read, write = parse_layer_hook(d.read_hook), parse_layer_hook(target)
    mlp = read and write and read.layer == write.layer and (read.point, write.point) == ("mlp_in", "mlp_out")
    return "mlp" if mlp else "residual"


def sig4(x) -> float:
    """A float to 4 significant digits (the JSON stays small)."""
    return float(f"{float(x):.4g}")


def r4(values) -> list[float]:
    return [sig4(v) for v in np.asarray(values, dtype=np.float64).ravel()]


@torch.no_grad()
def measure(
    d: Dictionary, cache: dict[str, torch.Tensor], cfg: ExportConfig, n_nodes: int, cells: torch.Tensor, also=()
) -> dict:
    """Frequency, mean activation and receptive field (rows' grid `cells`) of every feature, and the shown
    features' activations [n, node]: the most active ones, and the live ones among `also` (features the decisions'
    graphs name)."""
    z = d.codes(cache).float().cpu()  # [instances * node, features]
    frequency, mean = (z > 0).float().mean(0).numpy(), z.mean(0).numpy()
    alive = np.flatnonzero(frequency > 0)
    shown = alive[np.argsort(-mean[alive], kind="stable")][: cfg.features]
    shown = np.concatenate([shown, [j for j in sorted(set(also) - set(shown.tolist())) if frequency[j] > 0]])
    shown = shown.astype(np.int64)
    acts = z[:, shown].T.reshape(len(shown), -1, n_nodes).numpy()  # [shown, instances, node]
    return {"frequency": frequency, "mean": mean, "shown": shown, "acts": acts, "field": receptive_field(z, cells)}


FIELD = 6  # cells per side of the receptive-field maps


def receptive_field(z: torch.Tensor, cells: torch.Tensor) -> np.ndarray:
    """[features, FIELD * FIELD] every feature's mean activation over the rows whose city lies in each cell of a
    FIELD x FIELD grid of the unit square (row-major from the bottom left; 0 where no city fell)."""
    total = torch.zeros(FIELD * FIELD, z.shape[1]).index_add_(0, cells, z)
    count = torch.bincount(cells, minlength=FIELD * FIELD).clamp(min=1)
    return (total / count[:, None]).T.numpy()


def label_table(labels: dict[int, dict] | None, stats: dict) -> dict | None:
    """Every feature's label for the search and the label-only pages: [category index, label, score, null,
    frequency, the three best candidates as [descriptor, AUROC]], and each feature's receptive field."""
    if labels is None:
        return None
    categories = [*CATEGORIES, "rare", "dead"]
    rows = [[categories.index(e["category"]), e["label"], e["score"], e["null"], sig4(stats["frequency"][j]),
             [[t["descriptor"], t["auroc"]] for t in e["top"][:3]]] for j, e in sorted(labels.items())]  # fmt: skip
    fields = [r4(f) if stats["frequency"][j] > 0 else [] for j, f in enumerate(stats["field"])]  # [] never fired
    return {"categories": categories, "features": rows, "field": fields}


def feature_page(d: Dictionary, j: int, acts: np.ndarray, stats: dict, cfg: ExportConfig) -> dict:
    """One feature: statistics, histogram, top instances with per-node activations, decoder channels."""
    peak = acts.max(1)  # [instances]
    top = np.argsort(-peak, kind="stable")[: cfg.top_instances]
    nonzero = acts[acts > 0]
    counts, edges = np.histogram(nonzero, bins=20) if nonzero.size else (np.zeros(0), np.zeros(0))
    (hook, decoder), *_ = d.writes.items()
    row = decoder[j].cpu().numpy()
    channels = np.argsort(-np.abs(row), kind="stable")[:8]
    return {"index": int(j), "frequency": sig4(stats["frequency"][j]), "mean": sig4(stats["mean"][j]),
            "max": sig4(acts.max()), "histogram": {"counts": counts.astype(int).tolist(), "edges": r4(edges)},
            "top_instances": [{"instance": int(i), "activations": r4(acts[i])} for i in top],
            "channels": {"hook": hook, "top": [[int(c), sig4(row[c])] for c in channels]},
            "upstream": [], "downstream": [], "upstream_sae": []}  # fmt: skip


def link(pages: dict, stats: dict, dicts: list[Dictionary], scales, cfg: ExportConfig) -> dict[str, list]:
    """Graph edges per view (between shown features), and each page's up/downstream lists."""
    graphs: dict[str, list] = {view: [] for view in VIEWS}
    for up in dicts:
        for down in dicts:
            v = virtual_weights(up, down, scales)
            if v is None:
                continue
            attr = v.cpu().numpy() * stats[up.id]["mean"][:, None]  # weight x the upstream mean activation
            same_view = view_of(up) == view_of(down)
            if down.kind != "sae" and up.kind == "sae":
                for j in stats[down.id]["shown"]:
                    best = np.argsort(-np.abs(attr[:, j]), kind="stable")[:NEIGHBOURS]
                    pages[down.id][int(j)]["upstream_sae"] += [[up.id, int(i), sig4(attr[i, j])] for i in best]
            if not same_view:
                continue
            src, dst = stats[up.id]["shown"], stats[down.id]["shown"]
            sub = attr[np.ix_(src, dst)]
            for a, i in enumerate(src):
                best = np.argsort(-np.abs(sub[a]), kind="stable")[:NEIGHBOURS]
                pages[up.id][int(i)]["downstream"] += [[down.id, int(dst[b]), sig4(sub[a, b])] for b in best]
            for b, j in enumerate(dst):
                best = np.argsort(-np.abs(sub[:, b]), kind="stable")[:NEIGHBOURS]
                pages[down.id][int(j)]["upstream"] += [[up.id, int(src[a]), sig4(sub[a, b])] for a in best]
            graphs[view_of(up)] += [[up.id, int(src[a]), down.id, int(dst[b]), sig4(sub[a, b])]
                                    for a, b in zip(*np.nonzero(sub), strict=True)]  # fmt: skip
    for page_set in pages.values():
        for page in page_set.values():
            for key in ("upstream", "downstream", "upstream_sae"):
                page[key] = sorted(page[key], key=lambda e: -abs(e[2]))[:NEIGHBOURS]
    return {view: sorted(edges, key=lambda e: -abs(e[4]))[: cfg.edges] for view, edges in graphs.items()}


def overview(run_dir: Path, policy, dicts: list[Dictionary]) -> dict:
    """The policy, and a table row per SAE and transcoder run."""
    evaluation = read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    rows, kinds = [], {d.folder: "sae" if d.kind == "sae" else "transcoder" for d in dicts}
    for folder, kind in sorted(kinds.items()):
        row = {"kind": kind, "name": folder.parent.name, "folder": str(folder.relative_to(run_dir)),
               **_summary(folder)}  # fmt: skip
        if (folder / "eval" / "metrics.json").is_file():
            splice = read_json(folder / "eval" / "metrics.json").get("splice", {})
            row["splice"] = {k: v for k, v in splice.items() if isinstance(v, dict) and k != "original"}
        rows.append(row)
    size = {**asdict(policy.config.policy), "parameters": sum(p.numel() for p in policy.model.parameters())}
    generalization = [{k: v for k, v in read_json(path).items() if k != "config"}
                      for path in sorted((run_dir / "clt" / "generalize").glob("*/*.json"))]  # fmt: skip
    return {"run": run_dir.name, "policy": {**size, "checkpoint_epoch": policy.epoch},
            "env": {"num_loc": policy.config.num_loc, "distribution": policy.config.distribution},
            "evaluation": evaluation, "dictionaries": rows, "generalization": generalization}  # fmt: skip


def _summary(folder: Path) -> dict:
    """summary.json (transcoders) or the last validation line of metrics.jsonl (SAEs)."""
    if (folder / "summary.json").is_file():
        return {"summary": read_json(folder / "summary.json")}
    last = {}
    if (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "val/fvu" in record:
                last = record
    cfg = SAEConfig(**read_json(folder / "cfg.json"))
    return {"summary": {**last, "features": cfg.n_latents, "k": cfg.active}}


def decision_graphs(run_dir: Path, cfg: ExportConfig) -> list[dict]:
    """Site entries (clt.graph.gallery) for an early, a middle and a late decision of `cfg.decisions` instances."""
    if not cfg.decisions:
        return []
    try:
        replacement = load_replacement(run_dir)
    except FileNotFoundError as err:
        log.info("no Decisions tab: %s", err)
        return []
    policy = load_policy(run_dir, replacement.checkpoint_epoch, cfg.device)
    replacement.to(cfg.device)
    n, distribution = policy.config.num_loc, policy.config.distribution
    entries = []
    for i in tqdm(range(cfg.decisions), desc="decisions"):
        seed = cfg.seed + 1 + i
        locs = generate(1, n, distribution, seed=seed)[0].to(cfg.device)
        tour = greedy_tour(policy.model, locs)
        for step in sorted({1, n // 2, n - 2}):
            source = {"run": run_dir.name, "checkpoint_epoch": policy.epoch,
                      "checkpoint_sha256": policy.checkpoint_sha256,
                      "instance": {"seed": seed, "num_loc": n, "distribution": distribution}}  # fmt: skip
            doc = attribute(policy.model, replacement, Decision(locs, tour[:step]), TraceOptions(), source).doc
            attach_labels(doc, replacement)
            doc["in_words"] = in_words(doc)
            entries.append(for_site(doc, f"seed{seed}_step{step}"))
    return entries


def graph_features(entries: list[dict], per_decision: int = 12) -> dict[str, set[int]]:
    """Dictionary id -> the features the decisions' graphs rank most influential (they get feature pages)."""
    wanted: dict[str, set[int]] = {}
    for entry in entries:
        for top in entry["top_features"][:per_decision]:
            _, layer, _, feature = top["id"].split(":")
            wanted.setdefault(entry["replacement"]["dictionaries"][int(layer)], set()).add(int(feature))
    return wanted


def run(cfg: ExportConfig) -> Path:
    """Export; returns the path of site.json."""
    run_dir = resolve_run_dir(cfg.run_dir)
    policy = load_policy(run_dir, cfg.checkpoint, cfg.device)
    n_layers = policy.config.policy.num_encoder_layers
    dicts, position = [], {}
    chosen = list(cfg.dictionaries)
    if cfg.sweep:
        chosen += [*newest_runs(run_dir, "sae"), *sweep_runs(run_dir, cfg.sweep)]
    for d in find_dictionaries(run_dir, chosen):
        position[d.id] = stream_position(d.read_hook, n_layers, write=False)
        if position[d.id] is None:
            log.warning("skipping %s: it reads %s, which is not on the residual stream the site draws", d.id,
                        d.read_hook)  # fmt: skip
        else:
            dicts.append(d)
    if not dicts:
        raise ValueError("none of the dictionaries reads the residual stream; nothing to export")
    dicts.sort(key=lambda d: (position[d.id], max(stream_position(h, n_layers, write=True) or 0 for h in d.writes)))
    n_nodes = policy.config.num_loc
    locs = generate(cfg.num_instances, n_nodes, policy.config.distribution, seed=cfg.seed).to(cfg.device)
    cache = {}  # hook -> [instances * node, d], recorded during the greedy rollout (the encoder runs once)

    def record(x: torch.Tensor, name: str) -> None:
        cache[name] = x.reshape(-1, x.shape[-1])

    with torch.no_grad(), HookedPolicy(policy.model).hooks({h: record for d in dicts for h in d.hooks}):
        tours = policy.model(locs).actions[:, 0]  # [instances, node] greedy
    decisions = decision_graphs(run_dir, cfg)
    wanted = graph_features(decisions)
    ij = (locs.reshape(-1, 2).cpu() * FIELD).long().clamp(0, FIELD - 1)
    cells = ij[:, 1] * FIELD + ij[:, 0]  # row-major from the bottom left
    stats, pages, labels, read = {}, {}, {}, {}
    for d in tqdm(dicts, desc="features"):
        stats[d.id] = measure(d, cache, cfg, n_nodes, cells, wanted.get(d.id, ()))
        if d.folder not in read:
            read[d.folder] = read_labels(d.folder)  # clt.label's eval/labels.json; a multi-layer CLT's layers share it
        labels[d.id] = read[d.folder].get(d.id)
        pages[d.id] = {int(j): feature_page(d, j, a, stats[d.id], cfg)
                       for j, a in zip(stats[d.id]["shown"], stats[d.id]["acts"], strict=True)}  # fmt: skip
    scales = [s.cpu() for s in norm_scales(policy.model, locs)]
    graphs = link(pages, stats, dicts, scales, cfg)
    used = sorted({i["instance"] for p in pages.values() for f in p.values() for i in f["top_instances"]})
    lengths = tour_length(locs, tours).cpu().numpy()
    site = {
        "schema": SCHEMA,
        "overview": overview(run_dir, policy, dicts),
        "views": [
            {"id": v, "title": t, "dictionaries": [d.id for d in dicts if view_of(d) == v], "edges": graphs[v]}
            for v, t in VIEWS.items()
            if any(view_of(d) == v for d in dicts)
        ],
        "dictionaries": {
            d.id: {
                "kind": d.kind,
                "label": d.label,
                "read_hook": d.read_hook,
                "position": position[d.id],
                "writes": list(d.writes),
                "features": d.n_features,
                "alive_fraction": float((stats[d.id]["frequency"] > 0).mean()),
                "feature_pages": list(pages[d.id].values()),
                "labels": label_table(labels[d.id], stats[d.id]),
            }
            for d in dicts
        },
        "instances": {
            str(i): {"locs": r4(locs[i].cpu()), "tour": tours[i].tolist(), "length": sig4(lengths[i])} for i in used
        },
        "export": asdict(cfg),
    }
    text = json.dumps(site, separators=(",", ":"))
    out = Path(cfg.out)
    add_to_gallery(out, decisions, only_run=run_dir.name)
    atomic_write(out / "site.js", lambda tmp: tmp.write_text(f"window.SITE_DATA = {text};\n"))
    return atomic_write(out / "site.json", lambda tmp: tmp.write_text(text + "\n"))


@click.command()
@options(ExportConfig)
def main(**settings):
    """Export a run's SAEs, transcoders, metrics, graphs and feature pages as the docs site's data."""
    with command():
        path = run(ExportConfig(**settings))
    click.echo(f"site data written to {path} ({path.stat().st_size / 1e6:.1f} MB); view with python -m clt.site.viewer")


if __name__ == "__main__":
    main()
