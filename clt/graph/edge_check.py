"""Checks of a graph's edges by intervention in the live policy: does a feature move what the graph says it moves?

A graph claims more than its features' total effects on the targets (which a gradient also gives): every edge says
how much one feature's activation feeds another feature's pre-activation, or a target's value. The check, for the
strongest edges that leave feature nodes:

1. Rank the pruned graph's kept edges whose source is a feature by |weight| and keep the first `n_edges`
   (receivers: features and targets; of two mirrored margins, only the first).
2. For each source and each factor a in FACTORS (0.9: a small push, where the tangent should hold; 0: removal),
   scale the source's code by a at its (layer, city) in the live policy with the replacement spliced in and the
   errors held (clt.graph.spliced): attention, normalisation, the transcoders' selection and the glimpse all
   respond. Record every receiver's input: a feature's pre-activation, from the live mlp_in (or the step's
   context) at its layer and city, or a target's value.
3. Predict each receiver's change two ways: direct, (a - 1) x the edge's weight (what the edge alone claims), and
   total, (a - 1) x the source's activation x its derivative along every path of the local model
   (Graph.paths_from), which adds the paths through the features in between.
4. Per factor, Pearson r and sign agreement of predicted against measured changes over the edges, for both
   predictions. Beside them, `input_error`: the largest gap between a receiver's live input before any change and
   the graph's value for it (the local model reproduces the live policy, so this is rounding).
"""

from __future__ import annotations

import torch

from clt.graph.decision import Decision
from clt.graph.graph import Graph
from clt.graph.local import DTYPE
from clt.graph.prune import Pruned
from clt.graph.replacement import Replacement
from clt.graph.spliced import Change, spliced_errors, spliced_scores
from clt.graph.verify import agreement, distinct_margins
from policy.model import AttentionModel

FACTORS = (0.9, 0.0)
"""The factors each edge's source is scaled by: a small push, and removal."""


def strongest_edges(graph: Graph, pruned: Pruned, n_edges: int, targets_kept: list[int]) -> list[tuple[int, int]]:
    """(receiver, source) node indices of the `n_edges` kept edges with the largest |weight| whose source is a
    feature and whose receiver is a feature or one of the targets `targets_kept` (indices into the targets)."""
    mask = pruned.edge_mask.clone()
    mask[:, graph.n_features :] = False
    receives = torch.zeros(len(graph.nodes), dtype=torch.bool)
    receives[: graph.n_features] = True
    receives[[graph.targets.start + j for j in targets_kept]] = True
    mask[~receives] = False
    rows, cols = mask.nonzero(as_tuple=True)
    order = torch.argsort(graph.adjacency[rows, cols].abs(), descending=True, stable=True)[:n_edges]
    return [(int(rows[i]), int(cols[i])) for i in order]


class Receivers:
    """Reads the receivers' inputs from one live pass: pre-activations of feature nodes, values of target nodes."""

    def __init__(self, graph: Graph, replacement: Replacement, nodes: list[int], targets: list[int],
                 against: list[int] | None):  # fmt: skip
        self.graph, self.nodes, self.targets, self.against = graph, nodes, targets, against
        layers = {graph.nodes[r]["layer"] for r in nodes if graph.nodes[r]["kind"] == "feature"}
        self.encoders = {
            layer: replacement.glimpse_encoder() if layer == replacement.n_layers else replacement.encoder(layer)
            for layer in layers
        }

    def read(self, scores: torch.Tensor, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """[variant, receiver]: each receiver's input in every variant of a batched pass (scores [variant, node],
        inputs as spliced_hooks records them)."""
        out = torch.zeros(len(scores), len(self.nodes), dtype=DTYPE)
        for i, r in enumerate(self.nodes):
            node = self.graph.nodes[r]
            if node["kind"] == "target":
                j = r - self.graph.targets.start
                value = scores[:, self.targets[j]] - (scores[:, self.against[j]] if self.against is not None else 0)
            else:
                rows, bias = self.encoders[node["layer"]]
                x = inputs[node["layer"]]
                x = x if x.dim() == 2 else x[:, node["city"]]  # the glimpse's context is one vector per variant
                value = x @ rows[node["feature"]] + bias[node["feature"]]
            out[:, i] = value.to(DTYPE)
        return out


@torch.no_grad()
def check_edges(
    policy: AttentionModel,
    replacement: Replacement,
    decision: Decision,
    graph: Graph,
    pruned: Pruned,
    targets: list[int],
    against: list[int] | None,
    n_edges: int,
    factors: tuple[float, ...] = FACTORS,
    errors: list[torch.Tensor] | None = None,
) -> dict:
    """Steps 1-4 of the module docstring: the report, and every checked edge's numbers (`errors`: spliced_errors's,
    when the caller has them)."""
    edges = strongest_edges(graph, pruned, n_edges, distinct_margins(targets, against))
    if not edges:
        return {"edges": 0}
    receivers = sorted({r for r, _ in edges})
    sources = sorted({s for _, s in edges})
    reader = Receivers(graph, replacement, receivers, targets, against)
    errors = spliced_errors(policy, replacement, decision) if errors is None else errors
    variants = [[]] + [[Change.at(graph.nodes[s], "scale", a)] for s in sources for a in factors]
    inputs: dict[int, torch.Tensor] = {}
    scores = spliced_scores(policy, replacement, decision, errors, variants, inputs=inputs).to(DTYPE)
    read = reader.read(scores, inputs)  # [variant, receiver]
    base = read[0]
    row = {r: i for i, r in enumerate(receivers)}
    measured = {(a, s): read[1 + i * len(factors) + j] - base
                for i, s in enumerate(sources) for j, a in enumerate(factors)}  # fmt: skip
    paths = graph.paths_from(sources) * graph.values[sources]  # [node, source]: total effect of a unit factor
    column = {s: i for i, s in enumerate(sources)}
    direct = torch.tensor([float(graph.adjacency[r, s]) for r, s in edges], dtype=DTYPE)
    total = torch.tensor([float(paths[r, column[s]]) for r, s in edges], dtype=DTYPE)
    report = {"edges": len(edges), "sources": len(sources),
              "input_error": float((base - graph.values[receivers]).abs().max())}  # fmt: skip
    changes = {}
    for a in factors:
        changes[a] = torch.stack([measured[a, s][row[r]] for r, s in edges])
        report[f"scale_{a:g}"] = {"direct": agreement((a - 1) * direct, changes[a]),
                                  "total": agreement((a - 1) * total, changes[a])}  # fmt: skip
    report["checked"] = [
        {"source": graph.nodes[s]["id"], "receiver": graph.nodes[r]["id"], "weight": float(direct[i]),
         "total": float(total[i]), **{f"measured_{a:g}": float(changes[a][i]) for a in factors}}
        for i, (r, s) in enumerate(edges)
    ]  # fmt: skip
    return report
