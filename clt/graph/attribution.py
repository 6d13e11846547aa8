"""The attribution algorithm of one decision: why the policy picks its city at step t, and how far to trust it.

    attribute(policy, replacement, decision, TraceOptions(), source) -> Attribution(doc, graph, pruned, local)

1. Decide: the policy along the tour so far to step t (clt.graph.decision): scores, probabilities, its tour.
2. Targets: the most probable candidates until `target_prob` (at most `max_targets`), as score differences against
   each one's runner-up (`target difference`) or raw scores.
3. The local replacement model (clt.graph.local): the replacement's active features at this input, error nodes
   fixed, attention and glimpse patterns responding to first order (`tangent`) or held (`frozen`).
4. The graph (clt.graph.graph.build_graph): every direct effect, exact at this input, with constants and values.
5. Prune and score (clt.graph.prune): node influence, the kept nodes and edges, replacement and completeness
   scores; the features' total effects on the targets.
6. Check by removal (clt.graph.verify): the `verify` most influential features removed in the local model (exact)
   and in the live policy, against the graph's prediction, gradient x activation and the patched removal effects;
   the decision the replacement makes alone.
7. Check by intervention: the `check_edges` strongest edges (clt.graph.edge_check) and the pruned circuit's
   faithfulness (clt.graph.circuit).
8. The document (schema `tsp-interp.attribution/1`, docs/guide/attribution-graphs.md "What it writes"), which
   `python -m clt.graph.attribute` writes and the site's Decisions tab draws; the full graph goes beside it as
   safetensors (`Attribution.tensors`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

import torch

from clt.graph.attention import ATTENTIONS
from clt.graph.circuit import circuit_faithfulness
from clt.graph.decision import Decision, Outcome, decide
from clt.graph.edge_check import check_edges
from clt.graph.graph import Graph, build_graph
from clt.graph.local import LocalModel
from clt.graph.pointer import GLIMPSES
from clt.graph.prune import Pruned, prune, scores
from clt.graph.replacement import Replacement
from clt.graph.spliced import spliced_state
from clt.graph.verify import replacement_fidelity, verify_live, verify_local
from policy.checks import check_types
from policy.model import AttentionModel
from policy.options import choice

log = logging.getLogger(__name__)

SCHEMA = "tsp-interp.attribution/1"
TARGETS = ("score", "difference")
RULES = {
    "frozen": "the score's tangent with the glimpse pattern frozen: s_c ~ (g(H) . k_c* + g* . k_c(H) - g* . k_c*) "
    "/ sqrt(d); each source's effect through the glimpse's values plus its effect through the candidate's logit key",
    "tangent": "the score's tangent, s_c ~ s_c* + grad s_c* . (H - H*), the glimpse pattern responding to first "
    "order: each source's effect through the glimpse's values, its query and keys, and the candidate's logit key",
}


@dataclass
class TraceOptions:
    """What a graph covers and how it is pruned and checked."""

    max_targets: int = 5
    """At most this many target candidates."""
    attention: str = choice("tangent", ATTENTIONS)
    """tangent: every encoder layer's attention pattern responds to first order (the QK paths too), so that edges
    hold for small changes in the live policy; frozen: the patterns held (cities interact through value paths
    only). bench.faithfulness compares them."""
    glimpse: str | None = choice(None, GLIMPSES)
    """tangent: the glimpse's attention pattern responds to first order, so that the current and first city's
    features get edges; frozen: the pattern held (the step context then only selects what the glimpse reads)
    [default: tangent; frozen with a glimpse transcoder, whose features are the glimpse]."""
    target: str = choice("difference", TARGETS)
    """score: each target's raw pointer score; difference: its score minus the runner-up's (the most probable
    other candidate), i.e. why this city and not that one."""
    target_prob: float = 0.95
    """Targets: the most probable candidates until their probabilities sum to this."""
    node_threshold: float = 0.8
    """Pruning: keep the fewest feature and error nodes carrying this share of the influence on the targets."""
    edge_threshold: float = 0.98
    """Pruning: keep the fewest edges carrying this share of the edge influence."""
    verify: int = 20
    """Check the N most influential features by removal, in the local model and in the live policy (0: skip)."""
    top_features: int = 20
    """Report the predicted total effect on each target of this many most influential features."""
    check_edges: int = 30
    """Check the N strongest edges leaving feature nodes by intervention in the live policy: their source scaled
    by 0.9 and by 0, the change at the receiving node against the edge's prediction (clt.graph.edge_check; 0:
    skip)."""
    circuit: bool = True
    """Measure the pruned graph's circuit faithfulness in the live policy: the share of the decision's margin its
    kept features carry with every other feature ablated, over a curve of node thresholds (clt.graph.circuit;
    --no_circuit to skip)."""

    def __post_init__(self):
        check_types(self)
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.glimpse is not None and self.glimpse not in GLIMPSES:
            raise ValueError(f"glimpse must be one of {GLIMPSES}, got {self.glimpse!r}")
        if self.max_targets < 1 or min(self.verify, self.top_features, self.check_edges) < 0:
            raise ValueError("max_targets must be >= 1, verify, top_features and check_edges >= 0")
        for name in ("target_prob", "node_threshold", "edge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


def choose_targets(log_probs: torch.Tensor, max_targets: int, target_prob: float) -> list[int]:
    """The most probable cities until their probabilities reach `target_prob`, at most `max_targets`."""
    probs = log_probs.exp()
    order = torch.argsort(probs, descending=True, stable=True)
    chosen, mass = [], 0.0
    for city in order.tolist():
        if len(chosen) == max_targets or mass >= target_prob or probs[city] <= 0:
            break
        chosen.append(city)
        mass += float(probs[city])
    return chosen


@dataclass
class Attribution:
    doc: dict  # the JSON document
    graph: Graph
    pruned: Pruned
    local: LocalModel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The full graph in float32: adjacency [node, node] (rows receive), constants, values, influence; masks."""
        full = {"adjacency": self.graph.adjacency, "constants": self.graph.constants, "values": self.graph.values,
                "node_influence": self.pruned.node_influence}  # fmt: skip
        return {**{k: v.float() for k, v in full.items()}, "node_mask": self.pruned.node_mask,
                "edge_mask": self.pruned.edge_mask}  # fmt: skip


def attribute(
    policy: AttentionModel, replacement: Replacement, decision: Decision, options: TraceOptions, source: dict
) -> Attribution:
    """The attribution graph of `decision`; `source` (run, checkpoint, instance provenance) goes into the doc."""
    start = time.perf_counter()
    if options.glimpse is None:  # the default: tangent, unless a glimpse transcoder's features are the glimpse
        options = replace(options, glimpse="frozen" if replacement.glimpse is not None else "tangent")
    outcome = decide(policy, decision)
    targets = choose_targets(outcome.log_probs, options.max_targets, options.target_prob)
    against = runner_ups(outcome.log_probs, targets) if options.target == "difference" else None
    local = LocalModel(policy, replacement, decision, targets, against, options.glimpse, options.attention)
    graph = build_graph(local, outcome.log_probs.exp()[targets])
    receivers = torch.cat([torch.arange(graph.n_features), torch.arange(graph.targets.start, len(graph.nodes))])
    completeness_error = graph.adjacency[receivers].sum(1) + graph.constants[receivers] - graph.values[receivers]
    pruned = prune(graph, options.node_threshold, options.edge_threshold)
    total = graph.total_effects()
    ranked = torch.argsort(pruned.node_influence[: graph.n_features], descending=True, stable=True).tolist()
    checked = ranked[: options.verify]
    state = spliced_state(policy, replacement, decision)  # the errors and live selection every live check uses
    errors = state[0]
    verification = {"fidelity": replacement_fidelity(policy, replacement, decision, outcome.log_probs,
                                                     outcome.tour[decision.step], errors)}  # fmt: skip
    if checked:
        verification["local"] = verify_local(local, graph, checked, total)
        verification["live"] = verify_live(policy, replacement, decision, graph, checked, total, targets, against,
                                           state)  # fmt: skip
    if options.check_edges:
        verification["edges"] = check_edges(policy, replacement, decision, graph, pruned, targets, against,
                                            options.check_edges, errors=errors)  # fmt: skip
    if options.circuit:
        verification["circuit"] = circuit_faithfulness(policy, replacement, decision, graph, pruned, targets, against,
                                                       errors)  # fmt: skip
    doc = {
        "schema": SCHEMA,
        **source,
        "replacement": {
            "id": replacement.id,
            "kind": replacement.kind,
            "layers": replacement.n_layers,
            "features_per_layer": replacement.n_features,
            "dictionaries": replacement.dictionary_ids(),
        },
        "instance": {**source.get("instance", {}), "locs": decision.locs.tolist()},
        "step": decision.step,
        "tour": decision.prefix,
        "first": decision.first,
        "current": decision.current,
        "policy_tour": outcome.tour,
        "candidates": candidates(outcome),
        "targets": targets,
        "against": against,
        "attribution_rule": RULES[options.glimpse],
        "glimpse_pattern": local.glimpse_pattern.tolist(),
        "options": asdict(options),
        **document_graph(graph, pruned, total, ranked[: options.top_features]),
        "verification": verification,
        "checks": {
            "max_completeness_error": float(completeness_error.abs().max()),
            "reproduction_error": local.reproduction_error(),
            "max_target_error": float(
                (graph.values[graph.targets] - target_scores(outcome, targets, against)).abs().max()
            ),
        },
    }
    patched = {r["id"]: r["patched"] for r in verification.get("live", {}).get("removals", [])}
    for feature in doc["top_features"]:  # beside the graph's linear total effect, the patched removal's
        if feature["id"] in patched:
            feature["removal_effect"] = dict(zip(feature["total_effect"], patched[feature["id"]], strict=True))
    doc["seconds"] = time.perf_counter() - start
    return Attribution(doc, graph, pruned, local)


def runner_ups(log_probs: torch.Tensor, targets: list[int]) -> list[int]:
    """For each target, the most probable other candidate (a ValueError when there is none)."""
    order = [c for c in torch.argsort(log_probs, descending=True, stable=True).tolist() if log_probs[c] > -torch.inf]
    if len(order) < 2:
        raise ValueError("this step has one candidate left: a score difference needs two (use --target score)")
    return [order[1] if c == order[0] else order[0] for c in targets]


def target_scores(outcome: Outcome, targets: list[int], against: list[int] | None) -> torch.Tensor:
    """The live values of the targets: raw scores, or score differences against `against`."""
    scores = outcome.scores[targets]
    return scores if against is None else scores - outcome.scores[against]


def candidates(outcome: Outcome) -> list[dict]:
    probs = outcome.log_probs.exp()
    order = [c for c in torch.argsort(probs, descending=True, stable=True).tolist() if probs[c] > 0]
    return [{"city": c, "probability": float(probs[c]), "score": float(outcome.scores[c])} for c in order]


def document_graph(graph: Graph, pruned: Pruned, total: torch.Tensor, top: list[int]) -> dict:
    """Nodes (all, with influence and the node mask), the kept edges, scores and the top features' total effects."""
    target_ids = [graph.nodes[t]["id"] for t in range(graph.targets.start, len(graph.nodes))]
    receiving = graph.n_features, graph.targets.start
    nodes = []
    for i, node in enumerate(graph.nodes):
        entry = {**node, "influence": float(pruned.node_influence[i]), "kept": bool(pruned.node_mask[i])}
        if i < receiving[0] or i >= receiving[1]:
            entry.update(value=float(graph.values[i]), constant=float(graph.constants[i]))
        nodes.append(entry)
    rows, cols = pruned.edge_mask.nonzero(as_tuple=True)
    ids = [node["id"] for node in graph.nodes]
    weights, edge_scores = graph.adjacency[rows, cols].tolist(), pruned.edge_scores[rows, cols].tolist()
    edges = [
        {"source": ids[s], "target": ids[r], "weight": w, "score": e}
        for r, s, w, e in zip(rows.tolist(), cols.tolist(), weights, edge_scores, strict=True)
    ]
    prunable = slice(0, graph.n_features + graph.n_errors)
    return {
        "nodes": nodes,
        "edges": edges,
        "influence_total": float(pruned.node_influence[prunable].sum()),
        "edge_score_total": float(pruned.edge_scores.sum()),
        "scores": {
            "graph": scores(graph),
            "pruned": scores(graph, graph.adjacency * pruned.edge_mask),
            "kept_nodes": int(pruned.node_mask.sum()),
            "kept_edges": len(edges),
        },
        "top_features": [
            {
                "id": graph.nodes[s]["id"],
                "influence": float(pruned.node_influence[s]),
                "total_effect": dict(zip(target_ids, total[:, s].tolist(), strict=True)),
            }
            for s in top
        ],
    }
