"""Feature labels: every feature of a dictionary explained by measured geometry, with a score and a null control.

The algorithm (`label_features`, on rows a dictionary produced for fresh instances):

1. Rows and descriptors. One row per (instance, city) for encoder-side dictionaries, per (instance, step t >= 1)
   for decoder-side ones; policy.geometry's descriptors for the same rows (`rows_of`).
2. Events. A feature's events are the rows where it fires (activation > 0); for a feature that fires on more than
   half of the rows, the rows where it exceeds its median. A feature with fewer than `min_events` events is `rare`
   (too rare to score); one that never fires is `dead`; the others are live.
3. Candidates, each scored by its AUROC as a detector of the feature's events (the explanation as a classifier,
   as delphi's detection scoring does; 0.5 is chance, below 0.5 the descriptor's low end detects them):
   - every descriptor, from rank sums (ties averaged), on all rows;
   - a spot: distance to the activation-weighted centre of the feature's positions (x, y of the city, or of the
     current city for decoder rows), fitted on half of the instances and scored on the other half;
   - a half-plane: the projection of (x, y) on the direction of a least-squares fit of the activation, fitted and
     scored likewise. Both are scored on a 32 x 32 grid of the unit square (cell centres).
4. Null. The same scores with the descriptors' (and positions') instances permuted `permutations` times, cities
   kept in place, so that each feature keeps its firing pattern and each instance its geometry. The feature's
   threshold is the `null_quantile` quantile, over permutations, of its best candidate's folded AUROC
   (max(a, 1 - a)): the best of all candidates, so picking the best is paid for.
5. Label. The best candidate when its folded AUROC is at least `min_auroc` and above the threshold; otherwise the
   feature is `unexplained`. A second descriptor joins it ("A & B", the sum of both descriptors' oriented
   standardised ranks) when that detects the events better by at least `conjunction_gain` (scored on the feature's
   events and 8192 other rows; the three descriptors that score best alone are tried).
   The category is the descriptor's (policy.geometry.DESCRIPTORS); a spot is `spot`, a half-plane `separator`.
6. Beside the label: Spearman's rho of activation and the label's descriptor over all rows and over the firing
   rows; for a boolean descriptor, the AUROC of the activation as a detector of the descriptor and the best
   threshold's precision, recall and F1 of "the feature fires above t"; spatial receptive fields, the held-out R^2
   of the activation from absolute and from relative position (ridge on Gaussian bumps, as the prior art's kernel
   ridge fit); `explained_r2`, the held-out R^2 of a ridge fit on every descriptor and the absolute bumps.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import rankdata
from tqdm import tqdm

from clt.dictionaries import Dictionary, find_dictionaries
from policy.env import generate, generate_clusters
from policy.geometry import DESCRIPTORS, STEP, city_descriptors, step_descriptors
from policy.io import read_json, write_json
from policy.loading import load_policy
from policy.model import AttentionModel
from policy.reference import two_opt
from sae.hooks import HookedPolicy

log = logging.getLogger(__name__)

SCHEMA = "tsp-interp.labels/1"

CATEGORIES = ("boundary", "spot", "separator", "density / cluster", "tour structure", "decoding state", "unexplained")
GRID = 32  # cells per side of the unit square on which spatial candidates are scored


@dataclass
class LabelOptions:
    min_auroc: float = 0.8
    """Smallest folded AUROC (max(a, 1 - a)) a label needs, whatever the null says."""
    permutations: int = 100
    """Instance permutations of the null."""
    null_quantile: float = 0.99
    """A label's score must exceed this quantile of the feature's null."""
    min_events: int = 10
    """Fewer events than this: unexplained (too rare to score)."""
    conjunction_gain: float = 0.05
    """AUROC a second descriptor must add to join the label."""
    seed: int = 0
    """Seed of the permutations and of the fit / held-out split of the instances."""

    def __post_init__(self):
        if not 0.5 < self.min_auroc <= 1:
            raise ValueError(f"min_auroc must be in (0.5, 1], got {self.min_auroc}")
        if not 0 < self.null_quantile < 1:
            raise ValueError(f"null_quantile must be in (0, 1), got {self.null_quantile}")
        if self.permutations < 1 or self.min_events < 1:
            raise ValueError("permutations and min_events must be positive")
        if self.conjunction_gain < 0:
            raise ValueError(f"conjunction_gain must be >= 0, got {self.conjunction_gain}")


@dataclass
class Rows:
    """The rows a dictionary's activations were measured on, with their descriptors."""

    names: list[str]
    """Descriptor names (policy.geometry.DESCRIPTORS)."""
    values: np.ndarray
    """[rows, descriptors] float64."""
    xy: np.ndarray
    """[rows, 2] the absolute position of the row's city (decoder rows: the current city)."""
    rel: np.ndarray
    """[rows, 2] the same relative to the instance: (p - centroid) / spread."""
    per_instance: int
    """Rows per instance; rows are instance-major (row = instance * per_instance + j)."""
    kind: str
    """`city` or `step`."""

    @property
    def instances(self) -> int:
        return len(self.values) // self.per_instance


def events(acts: np.ndarray) -> sp.csc_matrix:
    """[rows, features] 0/1: where each feature fires, or exceeds its median when it fires on most rows."""
    fires = acts > 0
    dense = np.flatnonzero(fires.mean(0) > 0.5)
    if len(dense):
        fires[:, dense] = acts[:, dense] > np.median(acts[:, dense], axis=0)
    return sp.csc_matrix(fires, dtype=np.float64)


def _auroc(rank_sums: np.ndarray, n_pos: np.ndarray, n_rows: int) -> np.ndarray:
    """AUROC from the sum of the positives' ranks (Mann-Whitney); n_pos broadcasts over the leading axis."""
    n_neg = np.maximum(n_rows - n_pos, 1)
    return (rank_sums - n_pos * (n_pos + 1) / 2) / (np.maximum(n_pos, 1) * n_neg)


def _permuted(rows: Rows, rng: np.random.Generator) -> np.ndarray:
    """Row indices with the instances permuted (cities kept in place)."""
    order = rng.permutation(rows.instances)
    return (order[:, None] * rows.per_instance + np.arange(rows.per_instance)).ravel()


def _cells(xy: np.ndarray) -> np.ndarray:
    ij = np.clip((xy * GRID).astype(np.int64), 0, GRID - 1)
    return ij[:, 0] * GRID + ij[:, 1]


def _cell_events(ev: sp.csc_matrix, cells: np.ndarray) -> np.ndarray:
    """[features, cells]: each feature's events per grid cell, on rows whose cells are `cells`."""
    n_features = ev.shape[1]
    feature = np.repeat(np.arange(n_features), np.diff(ev.indptr))  # CSC: the entries column by column
    flat = np.bincount(feature * GRID * GRID + cells[ev.indices], minlength=n_features * GRID * GRID)
    return flat.reshape(n_features, GRID * GRID).astype(np.float64)


def _cell_ranks(score: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """[features, cells]: the average rank a row in each cell has when rows are ranked by the per-feature cell
    score [features, cells] (rows in one cell tie; cells of equal score are ordered by index). A permutation of
    the rows leaves it unchanged: it depends on how many rows each cell holds, not on which."""
    order = np.argsort(score, axis=1, kind="stable")
    totals = np.bincount(cells, minlength=GRID * GRID).astype(np.float64)[order]
    ranks = np.empty_like(score)
    np.put_along_axis(ranks, order, np.cumsum(totals, axis=1) - totals + (totals + 1) / 2, axis=1)
    return ranks


def _spatial_fits(acts: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, a spot centre [features, 2] (activation-weighted mean position) and a half-plane normal
    [features, 2] (least-squares fit of the activation on x, y), fitted on these rows."""
    weight = acts.sum(0)
    centre = (acts.T @ xy) / np.maximum(weight, 1e-12)[:, None]
    xc = xy - xy.mean(0)
    normal = np.linalg.solve(xc.T @ xc + 1e-9 * np.eye(2), xc.T @ (acts - acts.mean(0))).T  # [features, 2]
    return centre, normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)


def _bumps(points: np.ndarray, low: float, high: float, per_side: int = 6) -> np.ndarray:
    """[rows, per_side^2 + 1] Gaussian bumps on a grid over [low, high]^2 and a constant."""
    g = np.linspace(low, high, per_side)
    centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    width = (high - low) / (per_side - 1)
    d2 = ((points[:, None] - centres[None]) ** 2).sum(-1)
    return np.concatenate([np.exp(-d2 / (2 * width**2)), np.ones((len(points), 1))], axis=1)


def heldout_r2(features: np.ndarray, acts: np.ndarray, fit: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """[features of acts] R^2 on the rows not in `fit` of a ridge fit of each activation on `features` [rows, p]."""
    a, b = features[fit], features[~fit]
    w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ acts[fit])
    residual = ((acts[~fit] - b @ w) ** 2).sum(0)
    total = ((acts[~fit] - acts[~fit].mean(0)) ** 2).sum(0)
    return np.where(total > 0, 1 - residual / np.maximum(total, 1e-30), 0.0)


def label_features(acts: np.ndarray, rows: Rows, opts: LabelOptions | None = None) -> list[dict]:
    """One entry per feature of acts [rows, features] (module docstring): its label, category, score and null."""
    opts = opts or LabelOptions()
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or len(acts) != len(rows.values):
        raise ValueError(f"activations [rows, features] must have {len(rows.values)} rows, got {list(acts.shape)}")
    if not np.isfinite(acts).all():
        raise ValueError("activations hold NaN or Inf")
    if not np.isfinite(rows.values).all():
        bad = [n for n, ok in zip(rows.names, np.isfinite(rows.values).all(0), strict=True) if not ok]
        raise ValueError(f"descriptors {bad} hold NaN or Inf (give every row a value)")
    rng = np.random.default_rng(opts.seed)
    n_rows, n_features = acts.shape
    ev = events(acts)
    n_pos = np.asarray(ev.sum(0)).ravel()
    scorable = n_pos >= opts.min_events
    ranks = rankdata(rows.values, axis=0)  # [rows, descriptors]

    # 3-4. descriptor AUROCs, real and permuted
    def descriptor_aurocs(index: np.ndarray | None) -> np.ndarray:
        r = ranks if index is None else ranks[index]
        return _auroc(np.asarray(ev.T @ r), n_pos[:, None], n_rows)  # [features, descriptors]

    plain = descriptor_aurocs(None)
    fit_instances = rng.random(rows.instances) < 0.5
    fit = np.repeat(fit_instances, rows.per_instance)
    held = np.flatnonzero(~fit)
    centre, normal = _spatial_fits(acts[fit], rows.xy[fit])
    cell_xy = (np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij"), -1).reshape(-1, 2) + 0.5) / GRID
    ev_held, cells_held = sp.csc_matrix(ev[held]), _cells(rows.xy[held])
    spot_ranks = _cell_ranks(-((cell_xy[None] - centre[:, None]) ** 2).sum(-1), cells_held)  # score: -distance^2
    plane_ranks = _cell_ranks(normal @ cell_xy.T, cells_held)
    n_held = np.asarray(ev_held.sum(0)).ravel()

    def spatial_aurocs(cells: np.ndarray) -> np.ndarray:
        per_cell = _cell_events(ev_held, cells)
        sums = np.stack([(per_cell * spot_ranks).sum(1), (per_cell * plane_ranks).sum(1)], 1)
        return _auroc(sums, n_held[:, None], len(cells))

    spatial = spatial_aurocs(cells_held)
    held_rows = Rows(rows.names, rows.values[held], rows.xy[held], rows.rel[held], rows.per_instance, rows.kind)
    null = np.empty((opts.permutations, n_features))
    for k in range(opts.permutations):
        permuted = np.concatenate([descriptor_aurocs(_permuted(rows, rng)),
                                   spatial_aurocs(cells_held[_permuted(held_rows, rng)])], axis=1)  # fmt: skip
        null[k] = np.abs(permuted - 0.5).max(1) + 0.5
    threshold = np.quantile(null, opts.null_quantile, axis=0)

    # 5-6. labels and what comes beside them
    candidates = np.concatenate([plain, spatial], axis=1)  # [features, descriptors + 2]
    names = [*rows.names, "spot", "half_plane"]
    fire_rate = (acts > 0).mean(0)
    r2_abs = heldout_r2(_bumps(rows.xy, 0, 1), acts, fit)
    r2_rel = heldout_r2(_bumps(np.clip(rows.rel, -2.5, 2.5), -2.5, 2.5), acts, fit)
    standard = (rows.values - rows.values.mean(0)) / np.maximum(rows.values.std(0), 1e-12)
    explained = heldout_r2(np.concatenate([standard, _bumps(rows.xy, 0, 1)], axis=1), acts, fit)
    sample = rng.choice(n_rows, min(n_rows, 8192), replace=False)  # the rows conjunctions are scored on
    out = []
    for f in range(n_features):
        entry = {"index": f, "frequency": round(float(fire_rate[f]), 6), "events": int(n_pos[f]),
                 "null": round(float(threshold[f]), 4), "r2_absolute": round(float(r2_abs[f]), 4),
                 "r2_relative": round(float(r2_rel[f]), 4), "explained_r2": round(float(explained[f]), 4)}  # fmt: skip
        folded = np.abs(candidates[f] - 0.5) + 0.5
        top = np.argsort(-folded, kind="stable")[:5]
        entry["top"] = [{"descriptor": names[j], "auroc": round(float(candidates[f, j]), 4)} for j in top]
        best = int(top[0])
        if n_pos[f] == 0:
            entry.update(category="dead", label="dead (never fires on these instances)", score=None)
        elif not scorable[f]:
            entry.update(category="rare", label=f"rare ({n_pos[f]} events, fewer than {opts.min_events})", score=None)
        elif folded[best] < opts.min_auroc or folded[best] <= threshold[f]:
            best_text = f"best: {names[best]}, AUROC {folded[best]:.2f}, null {threshold[f]:.2f}"
            entry.update(category="unexplained", label=f"unexplained ({best_text})")
            entry["score"] = round(float(folded[best]), 4)
        else:
            entry.update(_label(f, names[best], candidates[f, best], ranks, ev, sample, plain[f], opts, rows))
            high, where = candidates[f, best] >= 0.5, "current city in " if rows.kind == "step" else ""
            if names[best] == "spot":
                entry["spot"] = {"centre": [round(float(c), 4) for c in centre[f]]}
                at = f"a spot at ({centre[f, 0]:.2f}, {centre[f, 1]:.2f})"
                entry["label"] = f"{where}{at if high else 'away from ' + at}, AUROC {entry['score']:.2f}"
            elif names[best] == "half_plane":
                line = entry["half_plane"] = _line(normal[f] if high else -normal[f], rows.xy, ev, f)
                (a, b), c = line["normal"], line["offset"]
                entry["label"] = f"{where}the half-plane {a:.2f} x {b:+.2f} y > {c:.2f}, AUROC {entry['score']:.2f}"
            else:
                entry.update(_beside(acts[:, f], rows.values[:, rows.names.index(names[best])], names[best]))
        out.append(entry)
    return out


def _label(
    f: int,
    name: str,
    auroc: float,
    ranks: np.ndarray,
    ev: sp.csc_matrix,
    sample: np.ndarray,
    plain_f: np.ndarray,
    opts: LabelOptions,
    rows: Rows,
) -> dict:
    """The label of a feature whose best candidate passed: phrase, category, and a conjunction where it helps."""
    high = auroc >= 0.5
    score = auroc if high else 1 - auroc
    if name in ("spot", "half_plane"):  # the phrase names the fitted spot or line (label_features)
        return {"category": "spot" if name == "spot" else "separator", "descriptor": name,
                "direction": "high" if high else "low", "score": round(float(score), 4)}  # fmt: skip
    d = DESCRIPTORS[name]
    phrase = d.phrase if high else d.low_phrase
    result = {"category": d.category, "descriptor": name, "direction": "high" if high else "low",
              "label": f"{phrase}, AUROC {score:.2f}", "score": round(float(score), 4)}  # fmt: skip
    j = rows.names.index(name)
    fired = ev.indices[ev.indptr[f] : ev.indptr[f + 1]]  # this feature's event rows (CSC)
    sample = np.union1d(fired[:4096], sample)  # every event (up to 4096) and the shared sample of rows
    y = np.isin(sample, fired)
    z = (ranks[sample] - ranks.mean(0)) / np.maximum(ranks.std(0), 1e-12)
    z = z * np.where(plain_f >= 0.5, 1.0, -1.0)  # oriented: high means the events' side
    alone = _sample_auroc(z[:, j], y)
    partners = [k for k in np.argsort(-np.abs(plain_f - 0.5)) if k != j][:3]
    together, k = max((_sample_auroc(z[:, j] + z[:, k], y), k) for k in partners)
    if together - alone >= opts.conjunction_gain and together > score:
        other = DESCRIPTORS[rows.names[k]]
        other_phrase = other.phrase if plain_f[k] >= 0.5 else other.low_phrase
        result.update(label=f"{phrase} & {other_phrase}, AUROC {together:.2f}", conjunction=rows.names[k],
                      conjunction_score=round(float(together), 4), score=round(float(together), 4))  # fmt: skip
    return result


def _sample_auroc(score: np.ndarray, y: np.ndarray) -> float:
    r = rankdata(score)
    return float(_auroc(r[y].sum(), y.sum(), len(y)))


def _line(normal: np.ndarray, xy: np.ndarray, ev: sp.spmatrix, f: int) -> dict:
    """The half-plane as a line: normal . (x, y) > offset, the offset halfway between the events' and the other
    rows' mean projections."""
    y = np.asarray(ev[:, f].todense()).ravel() > 0
    p = xy @ normal
    offset = (p[y].mean() + p[~y].mean()) / 2
    return {"normal": [round(float(v), 4) for v in normal], "offset": round(float(offset), 4)}


def _beside(a: np.ndarray, d: np.ndarray, name: str) -> dict:
    """Spearman over all rows and over firing rows; for a boolean descriptor, the activation as its detector."""
    out = {"spearman": round(_spearman(a, d), 4)}
    firing = a > 0
    out["spearman_firing"] = round(_spearman(a[firing], d[firing]), 4) if firing.sum() > 2 else None
    if DESCRIPTORS[name].kind == "bool":
        truth = d > 0.5
        out["activation_auroc"] = round(_sample_auroc(a, truth), 4) if 0 < truth.sum() < len(truth) else None
        best = (0.0, 0.0, 0.0, 0.0)
        for t in np.unique(np.quantile(a[firing], [0.0, 0.25, 0.5, 0.75])) if firing.any() else ():
            predicted = a >= t if t > 0 else firing
            tp = (predicted & truth).sum()
            precision, recall = tp / max(predicted.sum(), 1), tp / max(truth.sum(), 1)
            f1 = 2 * precision * recall / max(precision + recall, 1e-12)
            best = max(best, (f1, precision, recall, t))
        out.update(f1=round(float(best[0]), 4), precision=round(float(best[1]), 4), recall=round(float(best[2]), 4),
                   threshold=round(float(best[3]), 6))  # fmt: skip
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def census(entries: list[dict]) -> dict:
    """Counts per category; the shares are among live features (those with at least `min_events` events: neither
    dead nor rare)."""
    counts = {c: sum(e["category"] == c for e in entries) for c in (*CATEGORIES, "rare", "dead")}
    live = len(entries) - counts["dead"] - counts["rare"]
    return {"features": len(entries), "live": live, "counts": counts,
            "shares": {c: round(counts[c] / max(live, 1), 4) for c in CATEGORIES}}  # fmt: skip


def city_rows(locs: np.ndarray, tours: np.ndarray, generator_clusters: np.ndarray | None = None) -> Rows:
    """Rows (instance, city) of instances [batch, node, 2], with `tours` [batch, node] for the tour descriptors (and
    the generator's cluster labels [batch, node] for clustered instances, when known)."""
    values = city_descriptors(locs, tours, generator_clusters)
    return Rows(list(values), np.stack([v.ravel() for v in values.values()], 1), locs.reshape(-1, 2),
                _relative(locs).reshape(-1, 2), locs.shape[1], "city")  # fmt: skip


def step_rows(locs: np.ndarray, tours: np.ndarray) -> Rows:
    """Rows (instance, step t = 1 .. N-1) of the decisions along `tours`; positions are the current city's."""
    values = step_descriptors(locs, tours)
    current = tours[:, :-1]
    at = np.arange(len(locs))[:, None]
    return Rows(list(STEP), np.stack([values[n].ravel() for n in STEP], 1), locs[at, current].reshape(-1, 2),
                _relative(locs)[at, current].reshape(-1, 2), locs.shape[1] - 1, "step")  # fmt: skip


def _relative(locs: np.ndarray) -> np.ndarray:
    centred = locs - locs.mean(1, keepdims=True)
    return centred / np.sqrt((centred**2).sum(-1).mean(1))[:, None, None]


@torch.no_grad()
def measure(model: AttentionModel, locs: torch.Tensor, hooks: list[str], batch_size: int = 500):
    """Greedy rollouts of `locs` with `hooks` recorded -> (cache {hook: [rows, d]}, greedy tours [batch, node]).
    Encoder hooks give rows (instance, city); decoder hooks rows (instance, step t >= 1)."""
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    steps: dict[str, list[torch.Tensor]] = {}  # this batch's recordings (decoder hooks: one per step)
    tours = []

    def record(x: torch.Tensor, name: str) -> None:
        steps.setdefault(name, []).append(x)

    for start in range(0, len(locs), batch_size):
        steps.clear()
        with HookedPolicy(model).hooks(dict.fromkeys(hooks, record)):
            tours.append(model(locs[start : start + batch_size]).actions[:, 0].cpu())
        for h, xs in steps.items():
            x = torch.cat(xs, dim=1)[:, 1:] if HookedPolicy.is_decoder_point(h) else xs[0]  # drop step 0's row
            parts[h].append(x.reshape(-1, x.shape[-1]).float().cpu())
    return {h: torch.cat(v) for h, v in parts.items()}, torch.cat(tours)


def label_dictionary(d: Dictionary, cache: dict[str, torch.Tensor], rows: Rows, opts: LabelOptions) -> dict:
    """The labels of one dictionary's features on the rows of `cache` (module docstring), and their census."""
    with torch.no_grad():
        acts = d.codes(cache).float().cpu().numpy()
    labels = label_features(acts, rows, opts)
    return {"kind": d.kind, "read_hook": d.read_hook, "rows": rows.kind, "features": d.n_features,
            "census": census(labels), "labels": labels}  # fmt: skip


@dataclass
class Instances:
    """The fresh instances features are labelled on."""

    num_instances: int = 2000
    num_loc: int | None = None
    """[default: the run's]"""
    distribution: str | None = None
    """[default: the run's]"""
    seed: int = 97531


def read_labels(folder: str | Path) -> dict[str, dict[int, dict]]:
    """The labels clt.label wrote into `<folder>/eval/labels.json`: dictionary id -> feature -> its entry ({} when the
    folder has none)."""
    path = Path(folder) / "eval" / "labels.json"
    if not path.is_file():
        return {}
    sections = read_json(path)["dictionaries"]
    return {name: {int(e["index"]): e for e in section["labels"]} for name, section in sections.items()}


def label_folders(run_dir: Path, folders, instances: Instances, opts: LabelOptions, checkpoint: int | None = None,
                  device: str = "cpu") -> dict[str, dict]:  # fmt: skip
    """Label the dictionaries of the given run folders (none: the newest finished of every hook and pair) on fresh
    instances; writes `<folder>/eval/labels.json` for each (schema: clt.label) and returns {path: document}."""
    policy = load_policy(run_dir, checkpoint, device)
    dicts = find_dictionaries(run_dir, folders)
    num_loc = instances.num_loc or policy.config.num_loc
    distribution = instances.distribution or policy.config.distribution
    clusters = None  # the generator's own cluster labels, for clustered instances
    if distribution == "clustered":
        locs, clusters = generate_clusters(instances.num_instances, num_loc, seed=instances.seed)
    else:
        locs = generate(instances.num_instances, num_loc, distribution, seed=instances.seed)
    log.info("labelling %d dictionaries on %d fresh %s instances of %d cities", len(dicts), len(locs), distribution,
             num_loc)  # fmt: skip
    cache, greedy = measure(policy.model, locs.to(device), sorted({h for d in dicts for h in d.hooks}))
    rows = {}
    if any(not HookedPolicy.is_decoder_point(d.read_hook) for d in dicts):
        rows["city"] = city_rows(locs.numpy().astype(np.float64), two_opt(locs, greedy).numpy(),
                                 None if clusters is None else clusters.numpy())  # fmt: skip
    if any(HookedPolicy.is_decoder_point(d.read_hook) for d in dicts):
        rows["step"] = step_rows(locs.numpy().astype(np.float64), greedy.numpy())
    documents: dict[Path, dict] = {}
    for d in tqdm(dicts, desc="labelling"):
        kind = "step" if HookedPolicy.is_decoder_point(d.read_hook) else "city"
        doc = documents.setdefault(d.folder / "eval" / "labels.json", {
            "schema": SCHEMA, "folder": str(d.folder), "run_dir": str(run_dir),
            "instances": {"num_instances": len(locs), "num_loc": num_loc, "distribution": distribution,
                          "seed": instances.seed, "checkpoint_epoch": policy.epoch,
                          "tours": "2-opt from the policy's greedy tours (city rows); the greedy tours (step rows)"},
            "options": asdict(opts), "dictionaries": {},
        })  # fmt: skip
        doc["dictionaries"][d.id] = label_dictionary(d, {h: cache[h] for h in d.hooks}, rows[kind], opts)
    for path, doc in documents.items():
        write_json(path, doc)
    return {str(p): doc for p, doc in documents.items()}
