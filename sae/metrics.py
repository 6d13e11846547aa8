"""Reconstruction metrics, streamed: FVU, MSE, R^2 per channel, cosine, L0, and the dictionary's health: dead, rare
and dense features and the effective number of features in use.

The one definition every dictionary's `val/fvu` uses (SAEs here, transcoders in clt.metrics): the squared
error over the squared deviation of the evaluated rows from their own mean, 1 - R^2 of the whole target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

RARE = 1e-3
"""A feature that fires on fewer than this fraction of rows (but some) is rarely firing."""
DENSE = 0.5
"""A feature that fires on more than this fraction of rows is dense (it carries little that is specific)."""


def effective_features(frequency: np.ndarray) -> float:
    """exp of the entropy of the firing frequencies normalised to a distribution: how many features are in use, as
    if equally often (n when n fire equally, 1 when one does all the firing; 0 when none fires)."""
    total = float(frequency.sum())
    if total <= 0:
        return 0.0
    p = frequency[frequency > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


@dataclass
class Reconstruction:
    rows: int
    sse: np.ndarray  # [d_out] squared error per target channel
    sst: np.ndarray  # [d_out] squared deviation from the rows' own mean per target channel
    cosine: float  # mean cosine(y_hat, y) per row
    l0: float  # mean active features per row
    frequency: np.ndarray  # [features] fraction of rows where each fires
    mean_activation: np.ndarray  # [features] mean over all rows

    @property
    def fvu(self) -> float:
        """A ValueError where it would be no number: non-finite inputs, or rows that do not vary at all."""
        sse, sst = float(self.sse.sum()), float(self.sst.sum())
        if not (math.isfinite(sse) and math.isfinite(sst)):
            raise ValueError("FVU of non-finite values: the data or the reconstruction holds NaN or Inf")
        if sst <= 1e-12 * max(1, self.rows):
            raise ValueError(f"FVU is undefined: the {self.rows} evaluated rows do not vary (total variance {sst:.3g})")
        return sse / sst

    @property
    def r2_per_dim(self) -> np.ndarray:
        return 1 - self.sse / np.maximum(self.sst, 1e-12)

    def summary(self, prefix: str = "") -> dict[str, float]:
        r2 = self.r2_per_dim
        rare = (self.frequency > 0) & (self.frequency < RARE)
        return {
            f"{prefix}fvu": self.fvu,
            f"{prefix}mse": float(self.sse.sum() / (self.rows * len(self.sse))),
            f"{prefix}r2_per_dim_mean": float(r2.mean()),
            f"{prefix}r2_per_dim_min": float(r2.min()),
            f"{prefix}cosine": self.cosine,
            f"{prefix}l0": self.l0,
            f"{prefix}dead_fraction": float((self.frequency == 0).mean()),
            f"{prefix}rare_fraction": float(rare.mean()),
            f"{prefix}dense_fraction": float((self.frequency > DENSE).mean()),
            f"{prefix}effective_features": effective_features(self.frequency),
        }


class ReconstructionTotals:
    """Float64 sums over batches of targets y [layer, batch, d], predictions y_hat (same) and codes z
    [layer, batch, features]; `result()` gives one Reconstruction per layer (a pair or an SAE: one layer)."""

    def __init__(self):
        self.totals: dict[str, torch.Tensor] = {}
        self.rows = 0

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, z: torch.Tensor) -> None:
        self._add(y, y_hat, counts=(z != 0).double().sum(1), z_sum=z.double().sum(1))  # [layer, features]

    def add_active(self, y: torch.Tensor, y_hat: torch.Tensor, features: torch.Tensor, values: torch.Tensor,
                   n_features: int) -> None:  # fmt: skip
        """`add` for one layer ([batch, d]) whose codes are given as their active entries (`features`, `values`,
        any shape): the same totals without the dense [batch, features] matrix."""
        features, values = features.flatten(), values.flatten().double()
        counts = torch.bincount(features[values != 0], minlength=n_features).double()
        z_sum = values.new_zeros(n_features).index_add_(0, features, values)
        self._add(y[None], y_hat[None], counts=counts[None], z_sum=z_sum[None])

    def _add(self, y: torch.Tensor, y_hat: torch.Tensor, counts: torch.Tensor, z_sum: torch.Tensor) -> None:
        parts = {
            "sse": (y_hat - y).double().pow(2).sum(1),  # [layer, d]
            "y_sum": y.double().sum(1),
            "y_sq": y.double().pow(2).sum(1),
            "counts": counts,  # [layer, features]
            "z_sum": z_sum,
            "cosine": torch.nn.functional.cosine_similarity(y_hat, y, dim=-1).double().sum(1),  # [layer]
        }
        self.totals = {k: self.totals[k] + v if k in self.totals else v for k, v in parts.items()}
        self.rows += y.shape[1]

    def result(self) -> list[Reconstruction]:
        if self.rows == 0:
            raise ValueError("no rows to evaluate (is the validation split empty?)")
        t, rows = {k: v.cpu().numpy() for k, v in self.totals.items()}, self.rows
        sst = t["y_sq"] - t["y_sum"] ** 2 / rows  # deviation from the evaluated rows' own mean
        return [
            Reconstruction(
                rows=rows,
                sse=t["sse"][i],
                sst=sst[i],
                cosine=float(t["cosine"][i] / rows),
                l0=float(t["counts"][i].sum() / rows),
                frequency=t["counts"][i] / rows,
                mean_activation=t["z_sum"][i] / rows,
            )
            for i in range(len(sst))
        ]
