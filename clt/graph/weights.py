"""The virtual weights between dictionaries (clt.dictionaries: SAEs, transcoders, multi-layer CLT layers).

Virtual weights between features follow the residual stream only (the direct path of the
transcoder-circuit and CLT attribution-graph papers): feature a of an upstream dictionary
writes its decoder row, which reaches a downstream reader through the normalisations in
between; in eval mode each scales channel c by gamma_c / sigma_c. Attention and the MLPs along
the way are left out. The weight of a -> b is `encoder_b . (scale * decoder_a)`, its attribution
that weight times a's mean activation (the edge export's convention, clt.graph.edges).

Stream positions in the post-norm layer i (h = Norm1(x + MHA(x)); out = Norm2(h + FF(h))):

    2i        x_i (encoder_layer_{i}.input, the output of layer i - 1)
    2i + 0.5  attn_out is added          2i + 0.75  Norm1
    2i + 1    mlp_in = h                 2i + 1.5   mlp_out is added
    2i + 1.75 Norm2                      2i + 2     encoder_layer_{i} (= x_{i+1})
"""

from __future__ import annotations

import torch

from clt.dictionaries import Dictionary
from policy.model import AttentionModel
from sae.hook_names import parse_layer_hook

_READ = {"input": 0.0, "mlp_in": 1.0, None: 2.0}  # points a dictionary can read (attn_out, mlp_out are not streams)
_WRITE = {"input": 0.0, "attn_out": 0.5, "mlp_in": 1.0, "mlp_out": 1.5, None: 2.0}


def stream_position(hook: str, n_layers: int, write: bool) -> float | None:
    """Where a hook reads (write=False) or writes (write=True) the residual stream; None: not on the stream."""
    if hook == "init_embedding":
        return 0.0
    if hook == "encoder_output":
        return 2.0 * n_layers
    parsed = parse_layer_hook(hook)
    if parsed is None:
        return None
    offset = (_WRITE if write else _READ).get(parsed.point)
    return None if offset is None else 2 * parsed.layer + offset


@torch.no_grad()
def norm_scales(model: AttentionModel, locs: torch.Tensor) -> list[torch.Tensor]:
    """Per normalisation, in stream order (Norm1, Norm2 of layer 0, then layer 1, ...): its [d] channel scale.

    BatchNorm in eval mode: gamma / sqrt(running_var + eps), exactly. InstanceNorm divides by each
    instance's own std: gamma / (that std averaged over `locs`), an average.
    """
    norms = [n for layer in model.layers for n in (layer.norm1.norm, layer.norm2.norm)]
    if all(isinstance(n, torch.nn.BatchNorm1d) for n in norms):
        return [n.weight / (n.running_var + n.eps).sqrt() for n in norms]
    stds: dict[int, torch.Tensor] = {}

    def record(i: int):
        def hook(module, inputs):  # InstanceNorm1d input [batch, d, node]
            stds[i] = (inputs[0].var(dim=-1, unbiased=False) + module.eps).sqrt().mean(0)

        return hook

    handles = [n.register_forward_pre_hook(record(i)) for i, n in enumerate(norms)]
    try:
        model.encode(locs)
    finally:
        for handle in handles:
            handle.remove()
    return [n.weight / stds[i] for i, n in enumerate(norms)]


def path_scale(scales: list[torch.Tensor], write_hook: str, read_hook: str) -> torch.Tensor | None:
    """[d] channel scale from a write to a later read along the residual stream; None when there is no path.

    A read of the very hook that is written (an SAE on a transcoder's source or target) is the identity."""
    if write_hook == read_hook:
        return torch.ones(())
    n_layers = len(scales) // 2
    w = stream_position(write_hook, n_layers, write=True)
    r = stream_position(read_hook, n_layers, write=False)
    if w is None or r is None or w > r:
        return None
    scale = torch.ones_like(scales[0])
    for k, s in enumerate(scales):  # norm k sits at 2 (k // 2) + 0.75 (Norm1) or + 1.75 (Norm2)
        if w < 2 * (k // 2) + 0.75 + (k % 2) < r:
            scale = scale * s
    return scale


def virtual_weights(up: Dictionary, down: Dictionary, scales: list[torch.Tensor]) -> torch.Tensor | None:
    """[up features, down features]: the direct-path weight of each upstream feature on each downstream
    feature's pre-activation, summed over every hook `up` writes; None when nothing of `up` reaches `down`."""
    if up.id == down.id:
        return None
    total = None
    for hook, decoder in up.writes.items():
        scale = path_scale(scales, hook, down.read_hook)
        if scale is not None:
            w = (decoder * scale) @ down.encoder.T
            total = w if total is None else total + w
    return total
