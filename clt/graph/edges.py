"""Edges for attribution graphs: a transcoder's weights (and SAEs' around it) as scored, exportable edges.

    python -m clt.eval --clt_dir D                 # first: eval/features.json (frequency, mean activation)
    python -m clt.graph.edges --clt_dir D [--source_sae S [--target_sae T]] [--top_edges 2000]

writes `<clt_dir>/eval/edges.json` and `edges.csv`.

All weights are taken to raw activation units, undoing the normalisation inside the
transcoder: the raw encoder is W_enc / src_std (per source channel) and the raw decoder
W_dec * tgt_std (per target channel) when that side is standardised.

Virtual weights through SAEs (clt.graph.weights.virtual_weights, the site's too):
- source SAE feature i -> transcoder feature j:  W_enc_raw[j] . W_dec_sae[i]
- transcoder feature j -> target SAE feature k:  W_dec_raw[j] . W_enc_sae[:, k]
- a path i -> j -> k scores  mean_act(i) * v(i, j) * v(j, k).

Schema (`edges.json`, "schema": "tsp-interp.edges/1"):

    {"schema", "run", "pair", "transcoder", "source_hook", "target_hook",
     "nodes": [{"id", "kind", "index", "hook", "frequency"?, "mean_activation"?, "top_targets"?}],
     "edges": [{"source", "target", "kind", "weight", "attribution"}],
     "paths": [{"nodes": [id, id, id], "score"}]}

Node ids are stable strings: `<run>/<pair>/<transcoder>/feature/<j>` for transcoder
features, `<run>/<hook>/channel/<c>` for activation channels and
`<run>/<hook>/sae/<sae run>/feature/<i>` for SAE features. Node kinds: `clt_feature`,
`source_channel`, `target_channel`, `source_sae_feature`, `target_sae_feature`. Edge kinds:
`encoder` (source channel -> feature), `decoder` (feature -> target channel),
`sae_to_clt`, `clt_to_sae`. `attribution` = weight x the upstream node's typical size
(a channel's std, a feature's mean activation): the expected contribution, by which
the strongest edges are kept. `edges.csv` holds the edges with the same columns.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from clt.datasets import PairDataset, training_dump
from clt.dictionaries import sae_dictionary, transcoder_dictionary
from clt.graph.weights import virtual_weights
from clt.model import CrossLayerTranscoder, load_transcoder
from clt.pairs import LayerPair
from policy.checks import check_device, check_types
from policy.cli import command
from policy.io import atomic_write, read_json, write_json
from policy.options import options
from sae.model import TopKSAE, load_sae

SCHEMA = "tsp-interp.edges/1"
EDGE_COLUMNS = ("source", "target", "kind", "weight", "attribution")


def sae_to_clt(sae: TopKSAE, model: CrossLayerTranscoder, hooks: LayerPair) -> torch.Tensor:
    """[features, sae latents]: how much a unit of each source-SAE feature drives each transcoder feature."""
    return virtual_weights(sae_dictionary(sae, hooks.source), transcoder_dictionary(model, "", hooks=hooks), []).T


def clt_to_sae(model: CrossLayerTranscoder, sae: TopKSAE, hooks: LayerPair) -> torch.Tensor:
    """[features, sae latents]: how much a unit of each transcoder feature drives each target-SAE feature."""
    return virtual_weights(transcoder_dictionary(model, "", hooks=hooks), sae_dictionary(sae, hooks.target), [])


@dataclass
class GraphSource:
    """What the export needs: ids, the transcoder, its feature statistics, and optional SAEs."""

    run: str
    pair: str
    transcoder_id: str
    source_hook: str
    target_hook: str
    model: CrossLayerTranscoder
    frequency: np.ndarray  # [features] fraction of rows where each feature fires
    mean_activation: np.ndarray  # [features] mean over all rows
    source_std: np.ndarray  # [d_in] raw source channel stds
    source_sae: tuple[str, TopKSAE, np.ndarray] | None = None  # (run name, SAE, mean latent activations)
    target_sae: tuple[str, TopKSAE] | None = None


def _top(matrix: np.ndarray, count: int) -> list[tuple[int, int]]:
    """(row, column) of the `count` largest |entries|."""
    flat = np.abs(matrix).ravel()
    count = min(count, flat.size)
    best = np.argpartition(-flat, count - 1)[:count]
    best = best[np.argsort(-flat[best])]
    return [divmod(int(i), matrix.shape[1]) for i in best]


def build_edges(g: GraphSource, top_edges: int = 2000, top_paths: int = 200) -> dict:
    """The nodes, the strongest edges of every kind and the strongest SAE paths, as the schema says."""
    feature = [f"{g.run}/{g.pair}/{g.transcoder_id}/feature/{j}" for j in range(g.model.cfg.n_features)]
    src = [f"{g.run}/{g.source_hook}/channel/{c}" for c in range(g.model.cfg.d_in)]
    tgt = [f"{g.run}/{g.target_hook}/channel/{c}" for c in range(g.model.cfg.d_out)]
    dec = g.model.raw_decoder().numpy()  # [features, d_out]
    enc = g.model.raw_encoder().numpy()  # [features, d_in]
    nodes = [
        {"id": feature[j], "kind": "clt_feature", "index": j, "hook": g.pair,
         "frequency": float(g.frequency[j]), "mean_activation": float(g.mean_activation[j]),
         "top_targets": [[int(c), float(dec[j, c])] for c in np.argsort(-np.abs(dec[j]))[:5]]}
        for j in range(len(feature))
    ]  # fmt: skip
    nodes += [{"id": i, "kind": "source_channel", "index": c, "hook": g.source_hook} for c, i in enumerate(src)]
    nodes += [{"id": i, "kind": "target_channel", "index": c, "hook": g.target_hook} for c, i in enumerate(tgt)]
    edges = []
    decoder_attr = dec * g.mean_activation[:, None]
    edges += [
        _edge(feature[j], tgt[c], "decoder", dec[j, c], decoder_attr[j, c]) for j, c in _top(decoder_attr, top_edges)
    ]
    encoder_attr = enc * g.source_std[None, :]
    edges += [
        _edge(src[c], feature[j], "encoder", enc[j, c], encoder_attr[j, c]) for j, c in _top(encoder_attr, top_edges)
    ]
    paths = []
    if g.source_sae is not None:
        name, sae, sae_mean = g.source_sae
        ids = [f"{g.run}/{g.source_hook}/sae/{name}/feature/{i}" for i in range(sae.cfg.n_latents)]
        nodes += [{"id": i, "kind": "source_sae_feature", "index": n, "hook": g.source_hook,
                   "mean_activation": float(sae_mean[n])} for n, i in enumerate(ids)]  # fmt: skip
        v_in = sae_to_clt(sae, g.model, LayerPair(g.source_hook, g.target_hook)).numpy()  # [features, latents]
        attr = v_in * sae_mean[None, :]
        edges += [_edge(ids[i], feature[j], "sae_to_clt", v_in[j, i], attr[j, i]) for j, i in _top(attr, top_edges)]
        if g.target_sae is not None:
            out_name, out_sae = g.target_sae
            out_ids = [f"{g.run}/{g.target_hook}/sae/{out_name}/feature/{k}" for k in range(out_sae.cfg.n_latents)]
            nodes += [{"id": i, "kind": "target_sae_feature", "index": k, "hook": g.target_hook}
                      for k, i in enumerate(out_ids)]  # fmt: skip
            v_out = clt_to_sae(g.model, out_sae, LayerPair(g.source_hook, g.target_hook)).numpy()  # [features, latents]
            out_attr = v_out * g.mean_activation[:, None]
            edges += [_edge(feature[j], out_ids[k], "clt_to_sae", v_out[j, k], out_attr[j, k])
                      for j, k in _top(out_attr, top_edges)]  # fmt: skip
            paths = _paths(attr, v_out, ids, feature, out_ids, top_paths)
    return {"schema": SCHEMA, "run": g.run, "pair": g.pair, "transcoder": g.transcoder_id,
            "source_hook": g.source_hook, "target_hook": g.target_hook,
            "nodes": nodes, "edges": edges, "paths": paths}  # fmt: skip


def _paths(attr_in: np.ndarray, v_out: np.ndarray, ids, feature, out_ids, count: int) -> list[dict]:
    """Strongest source SAE feature -> transcoder feature -> target SAE feature paths."""
    best = []
    for j in range(attr_in.shape[0]):  # per transcoder feature: its strongest input x output pair
        i, k = int(np.abs(attr_in[j]).argmax()), int(np.abs(v_out[j]).argmax())
        best.append((float(attr_in[j, i] * v_out[j, k]), i, j, k))
    best.sort(key=lambda item: -abs(item[0]))
    return [{"nodes": [ids[i], feature[j], out_ids[k]], "score": s} for s, i, j, k in best[:count]]


def _edge(source: str, target: str, kind: str, weight: float, attribution: float) -> dict:
    return {
        "source": source,
        "target": target,
        "kind": kind,
        "weight": float(weight),
        "attribution": float(attribution),
    }


def write_graph(graph: dict, folder: str | Path) -> None:
    """edges.json (everything) and edges.csv (the edges), atomically."""
    folder = Path(folder)
    write_json(folder / "edges.json", graph)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EDGE_COLUMNS)
    writer.writeheader()
    writer.writerows(graph["edges"])
    atomic_write(folder / "edges.csv", lambda tmp: tmp.write_text(buffer.getvalue()))


def read_graph(folder: str | Path) -> dict:
    """edges.json, checked against the schema; a ValueError that names what is wrong."""
    graph = read_json(Path(folder) / "edges.json")
    if graph.get("schema") != SCHEMA:
        raise ValueError(f"{folder}/edges.json is not {SCHEMA} (schema {graph.get('schema')!r})")
    ids = {node["id"] for node in graph["nodes"]}
    dangling = [e for e in graph["edges"] if e["source"] not in ids or e["target"] not in ids]
    if dangling:
        raise ValueError(f"{folder}/edges.json: {len(dangling)} edges name unknown nodes, e.g. {dangling[0]}")
    return graph


def read_edges_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [
            {**row, "weight": float(row["weight"]), "attribution": float(row["attribution"])}
            for row in csv.DictReader(f)
        ]


@dataclass
class EdgesConfig:
    clt_dir: str
    """Transcoder run folder, evaluated by clt.eval (its eval/features.json holds the feature statistics)."""
    source_sae: str | None = None
    """SAE run folder on the source hook: SAE feature -> transcoder feature edges."""
    target_sae: str | None = None
    """SAE run folder on the target hook (needs source_sae): whole SAE -> transcoder -> SAE paths."""
    top_edges: int = 2000
    """Edges kept per kind, by |attribution|."""
    device: str = "cpu"
    """torch device (for the SAEs' mean activations)."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if self.top_edges < 1:
            raise ValueError("top_edges must be positive")
        if self.target_sae and not self.source_sae:
            raise ValueError("--target_sae needs --source_sae (paths run source SAE -> transcoder -> target SAE)")


def sae_mean_activations(sae: TopKSAE, data: PairDataset) -> np.ndarray:
    """Mean activation of each SAE latent over the validation sources."""
    total, rows = torch.zeros(sae.cfg.n_latents, dtype=torch.float64), 0
    with torch.no_grad():
        for x, _ in data.val_batches():
            out = sae(x.to(sae.b_dec.device))
            total.index_add_(0, out.indices.flatten().cpu(), out.values.flatten().double().cpu())
            rows += x.shape[0]
    return (total / max(rows, 1)).numpy()


def run(cfg: EdgesConfig) -> dict:
    """Build the graph of one pairwise transcoder and write <clt_dir>/eval/edges.json and edges.csv."""
    folder = Path(cfg.clt_dir)
    features_path = folder / "eval" / "features.json"
    if not features_path.is_file():
        raise FileNotFoundError(f"{features_path} is missing: run python -m clt.eval --clt_dir {folder} first")
    features = read_json(features_path)
    if "frequency" not in features:
        raise ValueError(f"{folder} is a multi-layer transcoder: edges are exported for pairwise ones")
    train_cfg = read_json(folder / "train_cfg.json")
    model = load_transcoder(folder)
    run_dir, dump = training_dump(folder, train_cfg)
    meta = dump.metadata
    source_sae = target_sae = None
    if cfg.source_sae:
        sae = load_sae(cfg.source_sae).to(cfg.device)
        data = PairDataset(dump.path, 4096, train_cfg["val_ratio"], train_cfg["seed"])
        source_sae = (Path(cfg.source_sae).name, sae, sae_mean_activations(sae, data))
    if cfg.target_sae:
        target_sae = (Path(cfg.target_sae).name, load_sae(cfg.target_sae))
    for side, width, sae in (("source", model.cfg.d_in, source_sae), ("target", model.cfg.d_out, target_sae)):
        if sae and sae[1].cfg.d_in != width:
            raise ValueError(f"the {side} SAE reads width {sae[1].cfg.d_in}, the transcoder's {side} is {width} wide")
    source = GraphSource(
        run_dir.name, meta["pair"], folder.name, meta["source_hook"], meta["target_hook"], model,
        np.asarray(features["frequency"]), np.asarray(features["mean_activation"]), dump.stats("sources")[1],
        source_sae and (source_sae[0], source_sae[1].cpu(), source_sae[2]), target_sae,
    )  # fmt: skip
    graph = build_edges(source, cfg.top_edges)
    write_graph(graph, folder / "eval")
    return graph


@click.command()
@options(EdgesConfig)
def main(**options):
    """Export a transcoder's strongest edges (and SAE paths) as edges.json and edges.csv beside its evaluation."""
    with command():
        graph = run(EdgesConfig(**options))
    click.echo(
        f"{len(graph['edges'])} edges, {len(graph['paths'])} paths written to {Path(options['clt_dir']) / 'eval'}"
    )


if __name__ == "__main__":
    main()
