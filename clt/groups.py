"""Feature groups tied to attention heads, for the group lasso of transcoders whose target is an attention output.

An attention output is a sum over heads, attn_out = sum_h head_h @ W_o[:, block h]^T (+ bias): head h writes
only into the column space of its block of W_o. With `--group_heads` a transcoder into `encoder_layer_<i>.attn_out`
(W_o: that layer's out_proj) or into `decoder.glimpse` (W_o: the decoder's project_out) gets one feature group
per head, and the decoder rows of group h start inside head h's output space, so that switching a group off
(the group lasso) reads as switching a head's share of the computation off.
"""

from __future__ import annotations

import torch

from clt.model import CrossLayerTranscoder
from policy.model import AttentionModel
from sae.hook_names import parse_layer_hook


def head_blocks(policy: AttentionModel, target_hook: str) -> list[torch.Tensor]:
    """Per head, the [d, d_head] block of the output projection that writes the head into `target_hook`."""
    parsed = parse_layer_hook(target_hook)
    if target_hook == "decoder.glimpse":
        weight, heads = policy.decoder.project_out.weight, policy.decoder.num_heads
    elif parsed is not None and parsed.point == "attn_out":
        attn = policy.layers[parsed.layer].attn
        weight, heads = attn.out_proj.weight, attn.num_heads
    else:
        raise ValueError(f"--group_heads needs a pair whose target is an attention output (encoder_layer_<i>.attn_out "
                         f"or decoder.glimpse), not {target_hook}")  # fmt: skip
    return list(weight.detach().float().chunk(heads, dim=1))


@torch.no_grad()
def init_head_groups_(model: CrossLayerTranscoder, blocks: list[torch.Tensor]) -> None:
    """Project the decoder rows of group h onto head h's output space (raw target units, then into the model's
    normalised target space), keeping their norms (unit rows stay unit rows)."""
    if model.cfg.tied or model.cfg.decoder_init != "random":
        raise ValueError("--group_heads places random decoder rows: untied, --decoder_init random")
    if model.cfg.group_size * len(blocks) != model.cfg.n_features:
        raise ValueError(f"{model.cfg.n_features} features do not split into {len(blocks)} heads")
    rows = model.W_dec.view(len(blocks), model.cfg.group_size, -1)  # [head, features per head, d]
    for h, block in enumerate(blocks):
        basis, _ = torch.linalg.qr(block.to(rows))  # [d, d_head] orthonormal columns spanning head h's outputs
        raw = model.raw_decoder()[h * model.cfg.group_size : (h + 1) * model.cfg.group_size] @ basis @ basis.T
        normalised = model.normalize_target(raw + model.tgt_mean) - model.normalize_target(model.tgt_mean[None])
        norms = rows[h].norm(dim=1, keepdim=True)
        rows[h].copy_(normalised / normalised.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms)
