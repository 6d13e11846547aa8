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
def reconstruction(model: CrossLayerTranscoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Reconstruction:
    """Stream raw (x_src, x_tgt) batches through the model in eval mode."""
    was_training = model.training
    model.eval()
    device = model.b_dec.device
    d_out, f = model.cfg.d_out, model.cfg.n_features
    sse, y_sum, y_sq = (torch.zeros(d_out, dtype=torch.float64, device=device) for _ in range(3))
    counts, z_sum = (
        torch.zeros(f, dtype=torch.float64, device=device),
        torch.zeros(f, dtype=torch.float64, device=device),
    )
    rows, cosine, active = 0, 0.0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        y_hat, z = model(x)
        sse += (y_hat - y).double().pow(2).sum(0)
        y_sum += y.double().sum(0)
        y_sq += y.double().pow(2).sum(0)
        counts += (z != 0).sum(0)
        z_sum += z.double().sum(0)
        cosine += torch.nn.functional.cosine_similarity(y_hat, y, dim=-1).sum().item()
        active += (z != 0).sum().item()
        rows += x.shape[0]
    model.train(was_training)
    if rows == 0:
        raise ValueError("no rows to evaluate (is the validation split empty?)")
    sst = y_sq - y_sum.pow(2) / rows
    return Reconstruction(rows, sse.cpu().numpy(), sst.cpu().numpy(), cosine / rows, active / rows,
                          (counts / rows).cpu().numpy(), (z_sum / rows).cpu().numpy())  # fmt: skip
