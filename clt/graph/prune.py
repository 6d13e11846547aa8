"""Influence, pruning and graph scores of an attribution graph, as circuit-tracer (Ameisen et al., 2025) computes
them.

- Normalised graph: |adjacency| with every receiver's row divided by its sum, so a row says which share of a
  node's direct input each source provides.
- Influence of a node: the target-weighted (by the candidates' probabilities) sum over all paths to the targets of
  the products of normalised edges: w^T (A + A^2 + ...), exact on the graph's DAG.
- Pruning: keep the fewest feature and error nodes that carry `node_threshold` of the total influence (inputs and
  targets always stay); on what is left, score each edge by its normalised weight times its receiver's influence
  (plus the receiver's target weight) and keep the fewest edges carrying `edge_threshold` of the total; then drop
  feature and error nodes left without an outgoing edge, and features left without an incoming one, until none
  changes.
- Replacement score: the share of the targets' end-to-end influence that starts at input nodes rather than error
  nodes. Completeness score: the influence-weighted share of each node's normalised input that comes from
  non-error nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt.graph.graph import Graph


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows without input stay zero)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def influence(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[node]: weights^T (A + A^2 + ...) for a DAG's normalised adjacency A (the powers vanish past its depth)."""
    total = torch.zeros_like(weights)
    x = weights
    for _ in range(len(weights)):
        x = x @ a
        if not x.any():
            return total
        total = total + x
    raise ValueError("the graph has a cycle")


def cumulative_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The fewest entries, largest first, whose scores sum to `threshold` of the total (ties by position)."""
    positive = (scores > 0).nonzero().flatten()  # most edge scores are 0: sort only the others
    values = scores[positive]
    order = torch.sort(values, descending=True, stable=True).indices
    ranked = values[order]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[positive[order]] = torch.cumsum(ranked, 0) - ranked < threshold * values.sum()
    return keep


@dataclass
class Pruned:
    node_influence: torch.Tensor  # [node] on the full graph
    node_mask: torch.Tensor  # [node] bool
    edge_mask: torch.Tensor  # [node, node] bool
    edge_scores: torch.Tensor  # [node, node] on the node-pruned graph


def target_weights(graph: Graph) -> torch.Tensor:
    """[node]: the candidates' probabilities on the target nodes, 0 elsewhere."""
    w = torch.zeros(len(graph.nodes), dtype=graph.adjacency.dtype)
    w[graph.targets] = graph.target_weights
    return w


def prune(
    graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, node_influence: torch.Tensor | None = None
) -> Pruned:
    """The pruned graph (module docstring); `node_influence`: the full graph's, when already computed."""
    weights = target_weights(graph)
    if node_influence is None:
        node_influence = influence(normalized(graph.adjacency), weights)
    prunable = slice(0, graph.n_features + graph.n_errors)
    node_mask = torch.ones(len(graph.nodes), dtype=torch.bool)
    node_mask[prunable] = cumulative_mask(node_influence[prunable], node_threshold)
    a = graph.adjacency.clone()
    a[~node_mask] = 0
    a[:, ~node_mask] = 0
    a = normalized(a)
    edge_scores = a * (influence(a, weights) + weights)[:, None]
    edge_mask = cumulative_mask(edge_scores.flatten(), edge_threshold).view_as(edge_scores)
    while True:
        before = node_mask.clone()
        node_mask[prunable] &= edge_mask[:, prunable].any(0)  # an outgoing edge
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)  # features: an incoming edge too
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        if torch.equal(node_mask, before):
            return Pruned(node_influence, node_mask, edge_mask, edge_scores)


def scores(graph: Graph, adjacency: torch.Tensor | None = None) -> dict[str, float]:
    """Replacement and completeness scores of the graph (or of `adjacency`, e.g. its pruned edges)."""
    a = normalized(graph.adjacency if adjacency is None else adjacency)
    weights = target_weights(graph)
    node_influence = influence(a, weights)
    from_inputs, from_errors = node_influence[graph.inputs].sum(), node_influence[graph.errors].sum()
    non_error = 1 - a[:, graph.errors].sum(1)
    output_influence = node_influence + weights
    receives = a.sum(1) > 0  # nodes with an input (features, targets)
    completeness = (non_error * output_influence)[receives].sum() / output_influence[receives].sum()
    return {"replacement": float(from_inputs / (from_inputs + from_errors)), "completeness": float(completeness)}
