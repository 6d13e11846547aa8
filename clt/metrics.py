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
    [layer, batch, d] -> [layer, batch, d], its codes [layer, batch, features]. A pairwise topk transcoder
    decodes from its active features only (forward_active: the same metrics without the dense codes).
    """
    was_training = model.training
    model.eval()
    device = model.b_dec.device
    totals = ReconstructionTotals()
    active = isinstance(model, CrossLayerTranscoder) and model.cfg.activation == "topk"
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if active:
            y_hat, values, features = model.forward_active(x)
            totals.add_active(y, y_hat, features, values, model.cfg.n_features)
            continue
        y_hat, z = model(x)
        if y.dim() == 2:  # pairwise: one layer
            y, y_hat, z = y[None], y_hat[None], z[None]
        totals.add(y, y_hat, z)
    model.train(was_training)
    return totals.result()


def reconstruction(model: CrossLayerTranscoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Reconstruction:
    """A pairwise transcoder's reconstruction over raw (x_src, x_tgt) batches."""
    return layer_reconstructions(model, batches)[0]


@torch.no_grad()
def group_activity(model: CrossLayerTranscoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Group-lasso groups (model.cfg.group_size features each) over raw (source, target) batches: `group_l0`, the
    mean number of groups with an active feature per row, and `dead_group_fraction`, the groups never active."""
    size, n_groups = model.cfg.group_size, model.cfg.n_groups
    groups = torch.arange(model.cfg.n_features, device=model.b_dec.device) // size
    active_rows, rows = 0, 0
    fired = torch.zeros(n_groups, dtype=torch.bool, device=groups.device)
    for x, _ in batches:
        z = model.encode(x.to(groups.device))  # [batch, features]
        on = z.new_zeros(len(z), n_groups).index_add(1, groups, (z != 0).float()) > 0  # [batch, groups]
        active_rows, rows = active_rows + on.sum().item(), rows + len(z)
        fired |= on.any(0)
    return {"group_l0": active_rows / max(rows, 1), "dead_group_fraction": 1 - fired.float().mean().item()}
