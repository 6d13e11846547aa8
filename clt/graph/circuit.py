"""Circuit faithfulness of a pruned graph (Marks et al., 2024, "Sparse Feature Circuits"): does the live policy,
left with only the features a graph keeps, still make its decision, and without them does it not?

1. The margin m: the decision's first target value (the chosen city's score minus the runner-up's; its raw score
   with `--target score`), in the live policy with the replacement spliced in and the errors held
   (clt.graph.spliced). Ablated features are set to zero after the transcoders' selection, the value a
   sparse feature has when it does not fire (Marks et al. use the mean over a dataset; the mean over the instance's
   cities was measured too, and gave a lower median faithfulness); later layers respond.
2. m(all): every feature as the transcoders give it; m(none): every feature of every layer ablated.
3. The circuits: the features the pruned graph keeps, and for each node threshold of the curve the features among
   the fewest nodes carrying that share of the influence on the targets (pruning's node pass; its edge pass drops a
   few more). For each circuit C: m(C) with every other feature ablated, and m(not C) with C's ablated.
4. Faithfulness f(X) = (m(X) - m(none)) / (m(all) - m(none)): 1 when X carries what the features carry of the
   decision, 0 when it carries none of it. A faithful circuit has f(C) near 1 and f(not C) near 0. When the
   features' joint effect m(all) - m(none) is small against the margin, the shares swing widely: the margins are
   reported beside them.
"""

from __future__ import annotations

import torch

from clt.graph.decision import Decision
from clt.graph.graph import Graph
from clt.graph.prune import Pruned, cumulative_mask
from clt.graph.replacement import Replacement
from clt.graph.spliced import spliced_errors, spliced_scores
from policy.model import AttentionModel

CURVE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
"""The node thresholds of the faithfulness curve (shares of the influence on the targets the kept nodes carry)."""


def kept_masks(graph: Graph, replacement: Replacement, n: int, circuits: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [circuit, node, features] bool (the glimpse's [circuit, features]): True at the feature nodes each
    circuit (a row of `circuits` [circuit, feature node] bool) keeps."""
    nodes = graph.nodes[: graph.n_features]
    layer = torch.tensor([node["layer"] for node in nodes], dtype=torch.long)
    city = torch.tensor([node["city"] for node in nodes], dtype=torch.long)
    feature = torch.tensor([node["feature"] for node in nodes], dtype=torch.long)
    masks = []
    for i in range(replacement.n_layers + (replacement.glimpse is not None)):
        on = layer == i
        if i < replacement.n_layers:
            mask = torch.zeros(len(circuits), n, replacement.n_features, dtype=torch.bool)
            mask[:, city[on], feature[on]] = circuits[:, on]
        else:  # the glimpse's features, at the current city
            mask = torch.zeros(len(circuits), replacement.glimpse.cfg.n_features, dtype=torch.bool)
            mask[:, feature[on]] = circuits[:, on]
        masks.append(mask)
    return masks


@torch.no_grad()
def circuit_faithfulness(
    policy: AttentionModel,
    replacement: Replacement,
    decision: Decision,
    graph: Graph,
    pruned: Pruned,
    targets: list[int],
    against: list[int] | None,
    errors: list[torch.Tensor] | None = None,
) -> dict:
    """Steps 1-4 of the module docstring: the margins, the pruned graph's faithfulness and its complement's, and
    the curve (per node threshold: the features kept and both faithfulnesses); `errors`: spliced_errors's, when
    the caller has them."""
    f, prunable = graph.n_features, slice(0, graph.n_features + graph.n_errors)
    by_influence = [cumulative_mask(pruned.node_influence[prunable], t)[:f] for t in CURVE]
    kept = [pruned.node_mask[:f], *by_influence]
    every = torch.ones(f, dtype=torch.bool)
    circuits = torch.stack([every, ~every] + [c for k in kept for c in (k, ~k)])
    masks = kept_masks(graph, replacement, decision.n, circuits)

    def edit(layer: int, z: torch.Tensor, rows: slice) -> torch.Tensor:
        return z * masks[layer][rows]

    errors = spliced_errors(policy, replacement, decision) if errors is None else errors
    scores = spliced_scores(policy, replacement, decision, errors, [[] for _ in circuits], edit=edit)
    margins = (scores[:, targets[0]] - (scores[:, against[0]] if against is not None else 0)).tolist()
    whole, none, *rest = margins
    span = whole - none

    def share(m: float) -> float:
        return (m - none) / span if span != 0 else float("nan")

    inside, outside = [share(m) for m in rest[::2]], [share(m) for m in rest[1::2]]
    curve = [{"node_threshold": t, "features": int(k.sum()), "faithfulness": a, "complement": b}
             for t, k, a, b in zip(CURVE, by_influence, inside[1:], outside[1:], strict=True)]  # fmt: skip
    return {"margin_all": whole, "margin_none": none, "features": int(kept[0].sum()),
            "faithfulness": inside[0], "complement": outside[0], "curve": curve}  # fmt: skip
