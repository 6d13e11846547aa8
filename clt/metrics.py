"""Reconstruction metrics of a transcoder over (raw source, raw target) batches, in one streamed pass."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from clt.model import CrossLayerTranscoder

RARE = 1e-3
"""A feature that fires on fewer than this fraction of rows (but some) is rarely firing."""


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
        return float(self.sse.sum() / max(self.sst.sum(), 1e-12))

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
        }


@torch.no_grad()
def layer_reconstructions(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[Reconstruction]:
    """Stream raw (source, target) batches through the model in eval mode; one Reconstruction per target layer.

    A pairwise transcoder maps [batch, d_in] -> [batch, d_out] (one layer); a multi-layer one maps
    [layer, batch, d] -> [layer, batch, d], its codes [layer, batch, features].
    """
    was_training = model.training
    model.eval()
    device = model.b_dec.device
    totals: dict[str, torch.Tensor] = {}
    rows = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        y_hat, z = model(x)
        if y.dim() == 2:  # pairwise: one layer
            y, y_hat, z = y[None], y_hat[None], z[None]
        parts = {
            "sse": (y_hat - y).double().pow(2).sum(1),  # [layer, d]
            "y_sum": y.double().sum(1),
            "y_sq": y.double().pow(2).sum(1),
            "counts": (z != 0).double().sum(1),  # [layer, features]
            "z_sum": z.double().sum(1),
            "cosine": torch.nn.functional.cosine_similarity(y_hat, y, dim=-1).double().sum(1),  # [layer]
        }
        totals = {k: totals[k] + v if k in totals else v for k, v in parts.items()}
        rows += y.shape[1]
    model.train(was_training)
    if rows == 0:
        raise ValueError("no rows to evaluate (is the validation split empty?)")
    t = {k: v.cpu().numpy() for k, v in totals.items()}
    sst = t["y_sq"] - t["y_sum"] ** 2 / rows
    return [
        Reconstruction(
            rows,
            t["sse"][i],
            sst[i],
            float(t["cosine"][i] / rows),
            float(t["counts"][i].sum() / rows),
            t["counts"][i] / rows,
            t["z_sum"][i] / rows,
        )
        for i in range(len(sst))
    ]


def reconstruction(model: CrossLayerTranscoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Reconstruction:
    """A pairwise transcoder's reconstruction over raw (x_src, x_tgt) batches."""
    return layer_reconstructions(model, batches)[0]
