"""Reconstruction metrics of a transcoder over (raw source, raw target) batches, in one streamed pass
(the metrics themselves: sae.metrics, shared with the SAEs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from clt.model import CrossLayerTranscoder
from sae.metrics import Reconstruction, ReconstructionTotals


@torch.no_grad()
def layer_reconstructions(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[Reconstruction]:
    """Stream raw (source, target) batches through the model in eval mode; one Reconstruction per target layer.

    A pairwise transcoder maps [batch, d_in] -> [batch, d_out] (one layer); a multi-layer one maps
    [layer, batch, d] -> [layer, batch, d], its codes [layer, batch, features].
    """
    was_training = model.training
    model.eval()
    device = model.b_dec.device
    totals = ReconstructionTotals()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        y_hat, z = model(x)
        if y.dim() == 2:  # pairwise: one layer
            y, y_hat, z = y[None], y_hat[None], z[None]
        totals.add(y, y_hat, z)
    model.train(was_training)
    return totals.result()


def reconstruction(model: CrossLayerTranscoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Reconstruction:
    """A pairwise transcoder's reconstruction over raw (x_src, x_tgt) batches."""
    return layer_reconstructions(model, batches)[0]
