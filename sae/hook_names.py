"""The Attention Model's hook names (sae.hooks reads and replaces the activations they name), without torch.

Hook names mirror the module tree (TransformerLens style) and are stable across runs:

    init_embedding                    [batch, node, d]  Linear(2, d) of the coordinates
    encoder_layer_{i}.input           [batch, node, d]  input of encoder layer i
    encoder_layer_{i}.attn_out        [batch, node, d]  MHA(x)
    encoder_layer_{i}.mlp_in          [batch, node, d]  h = Norm(x + MHA(x))
    encoder_layer_{i}.mlp_out         [batch, node, d]  FF(h)
    encoder_layer_{i}                 [batch, node, d]  output Norm(h + FF(h))
    encoder_output                    [batch, node, d]  final node embeddings
    decoder.context                   [batch, step, d]  project_context([h_first, h_current]) per step
    decoder.glimpse                   [batch, step, d]  glimpse after project_out, per step
    decoder.logits                    [batch, step, node] raw pointer scores, before tanh clipping

`parse_layer_hook` and `hook_names` need no model, so the pair bookkeeping (clt.pairs) uses them without torch.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DECODER_POINTS = ("decoder.context", "decoder.glimpse", "decoder.logits")
LAYER_POINTS = {"input": "hook_input", "attn_out": "hook_attn_out", "mlp_in": "hook_mlp_in", "mlp_out": "hook_mlp_out"}

_LAYER_HOOK = re.compile(r"^encoder_layer_(\d+)(?:\.([a-z_]+))?$")


class LayerHook(NamedTuple):
    """An encoder-layer hook name, parsed: `encoder_layer_1.mlp_in` -> (1, "mlp_in"); `encoder_layer_2` -> (2, None)."""

    layer: int
    point: str | None


def parse_layer_hook(name: str) -> LayerHook | None:
    """The layer and point of an `encoder_layer_<i>[.<point>]` name; None for any other name."""
    match = _LAYER_HOOK.match(name)
    if not match or (match.group(2) is not None and match.group(2) not in LAYER_POINTS):
        return None
    return LayerHook(int(match.group(1)), match.group(2))


def hook_names(n_layers: int) -> list[str]:
    """Every hook name of a policy with `n_layers` encoder layers, in forward order (no model needed)."""
    layers = [
        f"encoder_layer_{i}{suffix}" for i in range(n_layers) for suffix in (*(f".{p}" for p in LAYER_POINTS), "")
    ]
    return ["init_embedding", *layers, "encoder_output", *DECODER_POINTS]
