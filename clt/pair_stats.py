"""A pair's statistics and its linear baseline, in one streamed pass over the dump (float64 moments).

Per pair: rows and instances; row norms of each side (mean, median, p99); ranges of the
per-dimension means and stds; the fraction of near-zero entries (|x| < 1% of the side's RMS);
the effective rank (participation ratio of the covariance eigenvalues); the mean |correlation|
between source and target dimensions; and the validation R^2 and FVU of the best ridge map
source -> target (fitted on the train instances, lambda chosen on the validation instances).
That FVU is the baseline every transcoder must beat (clt.inspect_pairs prints it, the trainer
writes it beside its own).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from sae.data import RowReader, split_instances
from sae.store import Dump

log = logging.getLogger(__name__)

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Ridge strengths, as fractions of the mean eigenvalue of the source covariance."""
BLOCK_ROWS = 65_536


class Moments:
    """Sums for [x, 1] and y: G = X~'X~, H = X~'Y, Y'Y (diagonal), sum of y, count."""

    def __init__(self, d_src: int, d_tgt: int):
        self.G = np.zeros((d_src + 1, d_src + 1))
        self.H = np.zeros((d_src + 1, d_tgt))
        self.yy = np.zeros(d_tgt)
        self.y_sum = np.zeros(d_tgt)
        self.n = 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        xa = np.hstack([x, np.ones((len(x), 1))])
        self.G += xa.T @ xa
        self.H += xa.T @ y
        self.yy += (y * y).sum(0)
        self.y_sum += y.sum(0)
        self.n += len(x)

    def per_dim_sse(self, W: np.ndarray) -> np.ndarray:
        """Sum of squared errors of y_hat = [x, 1] W, per target dimension."""
        return self.yy - 2 * (W * self.H).sum(0) + (W * (self.G @ W)).sum(0)

    def per_dim_sst(self) -> np.ndarray:
        return self.yy - self.y_sum**2 / max(self.n, 1)


def ridge_baseline(train: Moments, val: Moments) -> dict:
    d = train.G.shape[0] - 1
    mean_x = train.G[:d, d] / train.n
    cov = train.G[:d, :d] / train.n - np.outer(mean_x, mean_x)
    scale = max(np.trace(cov) / d, 1e-12) * train.n
    penalty = np.eye(d + 1)
    penalty[d, d] = 0  # the bias is not penalised
    best = None
    sst = val.per_dim_sst()
    for lam in RIDGE_GRID:
        W = np.linalg.solve(train.G + lam * scale * penalty, train.H)
        sse = val.per_dim_sse(W)
        fvu = sse.sum() / max(sst.sum(), 1e-12)
        if best is None or fvu < best["fvu"]:
            r2_dims = 1 - sse / np.maximum(sst, 1e-12)
            best = {"fvu": float(fvu), "r2": float(1 - fvu), "mean_r2_per_dim": float(r2_dims.mean()), "lambda": lam}
    return best


def _norm_summary(norms: np.ndarray) -> dict:
    return {"mean": float(norms.mean()), "median": float(np.median(norms)), "p99": float(np.percentile(norms, 99))}


def _blocks(dump: Dump, val_ratio: float, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The dump's (sources, targets) in float64 blocks of BLOCK_ROWS rows, each with its rows' validation mask
    [rows] (the trainer's split by instance); NaN or Inf is a ValueError naming the first bad row."""
    src, tgt = dump.arrays["sources"], dump.arrays["targets"]
    _, val_ids = split_instances(dump.num_instances, val_ratio, seed)
    is_val = np.zeros(dump.num_instances, dtype=bool)
    is_val[val_ids] = True
    src_reader, tgt_reader = RowReader(src), RowReader(tgt)
    for start in range(0, dump.rows, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, dump.rows)
        x = src_reader.read(start, stop).astype(np.float64)
        y = tgt_reader.read(start, stop).astype(np.float64)
        for side, values in (("sources", x), ("targets", y)):
            if not np.isfinite(values).all():
                bad = start + int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
                raise ValueError(f"{dump.path}: NaN or Inf in {side} (first at row {bad}): the dump is corrupt; "
                                 "collect it again")  # fmt: skip
        yield x, y, is_val[np.arange(start, stop) // dump.nodes_per_instance]


_RIDGES: dict[tuple, dict | None] = {}  # pair_ridge's results in this process


def pair_ridge(dump: Dump, val_ratio: float = 0.1, seed: int = 0) -> dict | None:
    """inspect_pair's "ridge" alone (what the trainer writes beside its FVU), from a pass that computes nothing
    else; None without validation instances. Fitted once per process for a dump's content (its files' sha256)
    and split, so that a worker training several transcoders of one pair (clt.run_queue) pays it once."""
    meta = dump.metadata
    key = (str(dump.path), meta.get("created"), tuple(sorted(meta.get("sha256", {}).items())), val_ratio, seed)
    if key not in _RIDGES:
        _RIDGES[key] = _fit_pair_ridge(dump, val_ratio, seed)
    return dict(_RIDGES[key]) if _RIDGES[key] is not None else None


def _fit_pair_ridge(dump: Dump, val_ratio: float, seed: int) -> dict | None:
    d_src, d_tgt = dump.arrays["sources"].shape[1], dump.arrays["targets"].shape[1]
    train_m, val_m = Moments(d_src, d_tgt), Moments(d_src, d_tgt)
    for x, y, val_rows in _blocks(dump, val_ratio, seed):
        train_m.update(x[~val_rows], y[~val_rows])
        val_m.update(x[val_rows], y[val_rows])
    return ridge_baseline(train_m, val_m) if val_m.n else None


def inspect_pair(dump: Dump, val_ratio: float = 0.1, seed: int = 0) -> dict:
    src, tgt = dump.arrays["sources"], dump.arrays["targets"]
    n = dump.nodes_per_instance
    train_m, val_m = Moments(src.shape[1], tgt.shape[1]), Moments(src.shape[1], tgt.shape[1])
    rms = {}  # each side's root mean square entry, from the stored per-dim mean and std
    for side in ("sources", "targets"):
        mean, std = (np.asarray(v, np.float64) for v in dump.stats(side))
        rms[side] = float(np.sqrt((mean**2 + std**2).mean()))
    norms = {"sources": [], "targets": []}
    near_zero = {"sources": 0, "targets": 0}
    cross = np.zeros((src.shape[1], tgt.shape[1]))
    ss = {"sources": np.zeros((src.shape[1], src.shape[1])), "targets": np.zeros((tgt.shape[1], tgt.shape[1]))}
    for x, y, val_rows in _blocks(dump, val_ratio, seed):
        train_m.update(x[~val_rows], y[~val_rows])
        val_m.update(x[val_rows], y[val_rows])
        cross += x.T @ y
        for side, values in (("sources", x), ("targets", y)):
            norms[side].append(np.linalg.norm(values, axis=1))
            near_zero[side] += int((np.abs(values) < 0.01 * rms[side]).sum())
            ss[side] += values.T @ values
    report = {"pair": dump.path.name, "hooks": dump.metadata.get("hooks"),  # the dump name: pair and condition
              "rows": dump.rows, "instances": dump.num_instances, "nodes_per_instance": n}  # fmt: skip
    for side, array in (("sources", src), ("targets", tgt)):
        mean, std = (np.asarray(v, np.float64) for v in dump.stats(side))
        cov = ss[side] / dump.rows - np.outer(mean, mean)
        eig = np.clip(np.linalg.eigvalsh(cov), 0, None)
        report[side] = {
            "dim": array.shape[1],
            "norm": _norm_summary(np.concatenate(norms[side])),
            "dim_mean_range": [float(mean.min()), float(mean.max())],
            "dim_std_range": [float(std.min()), float(std.max())],
            "near_zero_fraction": near_zero[side] / (dump.rows * array.shape[1]),
            "effective_rank": float(eig.sum() ** 2 / max((eig**2).sum(), 1e-30)),
        }
    mx, sx = (np.asarray(v, np.float64) for v in dump.stats("sources"))
    my, sy = (np.asarray(v, np.float64) for v in dump.stats("targets"))
    corr = (cross / dump.rows - np.outer(mx, my)) / np.maximum(np.outer(sx, sy), 1e-12)
    report["mean_abs_correlation"] = float(np.abs(corr).mean())
    report["ridge"] = ridge_baseline(train_m, val_m) if val_m.n else None
    return report
