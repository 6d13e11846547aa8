"""clt.graph.edge_check: a graph's edges against interventions in the live policy."""

import torch

from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import Decision, greedy_tour
from clt.graph.edge_check import check_edges, strongest_edges
from clt.graph.replacement import load_replacement
from policy.env import generate
from policy.loading import load_policy

TANGENT = {"attention": "tangent", "glimpse": "tangent", "verify": 0, "circuit": False}


def traced(run, seed: int, step: int, **options):
    replacement = load_replacement(run)
    policy = load_policy(run, replacement.checkpoint_epoch).model
    locs = generate(1, 10, seed=seed)[0]
    decision = Decision(locs, greedy_tour(policy, locs)[:step])
    result = attribute(policy, replacement, decision, TraceOptions(**options), {})
    return policy, replacement, decision, result


def test_a_small_push_moves_every_receiver_as_its_edges_say(analysed_run):
    """Scaling a source by 1 - 1e-3 is the tangent's own limit: with attention and the glimpse responding to first
    order, each receiver moves by -1e-3 x the source's total effect on it (paths through the features in between
    included), up to second order; the receivers' live inputs before any change are the graph's values."""
    policy, replacement, decision, result = traced(analysed_run, 5, 4, check_edges=0, **TANGENT)
    doc, graph = result.doc, result.graph
    report = check_edges(policy, replacement, decision, graph, result.pruned, doc["targets"], doc["against"], 12,
                         factors=(1 - 1e-3,))  # fmt: skip
    assert report["edges"] == 12 and report["input_error"] < 1e-4
    measured = torch.tensor([e["measured_0.999"] for e in report["checked"]], dtype=torch.float64)
    predicted = -1e-3 * torch.tensor([e["total"] for e in report["checked"]], dtype=torch.float64)
    assert (measured - predicted).abs().max() <= 0.02 * predicted.abs().max()
    assert report["scale_0.999"]["total"]["pearson_r"] > 0.999
    assert report["scale_0.999"]["total"]["sign_agreement"] == 1.0


def test_edges_pointing_at_the_wrong_receivers_fail_the_check(analysed_run):
    """The same check on a graph whose edge weights are shuffled among its kept edges: the measured changes stay,
    the predictions no longer match them."""
    policy, replacement, decision, result = traced(analysed_run, 5, 4, check_edges=0, **TANGENT)
    doc, graph = result.doc, result.graph
    edges = strongest_edges(graph, result.pruned, 12, [0])
    honest = check_edges(policy, replacement, decision, graph, result.pruned, doc["targets"], doc["against"], 12)
    rows, cols = zip(*edges, strict=True)
    weights = graph.adjacency[rows, cols]
    graph.adjacency[rows, cols] = weights[torch.randperm(len(weights), generator=torch.Generator().manual_seed(0))]
    shuffled = check_edges(policy, replacement, decision, graph, result.pruned, doc["targets"], doc["against"], 12)
    assert honest["scale_0.9"]["direct"]["pearson_r"] > 0.9
    assert shuffled["scale_0.9"]["direct"]["pearson_r"] < honest["scale_0.9"]["direct"]["pearson_r"] - 0.3


def test_the_strongest_edges_leave_features_and_reach_kept_receivers(analysed_run):
    _, _, _, result = traced(analysed_run, 6, 3)
    graph, pruned = result.graph, result.pruned
    edges = strongest_edges(graph, pruned, 10, [0])
    weights = [abs(float(graph.adjacency[r, s])) for r, s in edges]
    assert edges and weights == sorted(weights, reverse=True)
    for r, s in edges:
        assert s < graph.n_features and pruned.edge_mask[r, s]
        assert r < graph.n_features or r == graph.targets.start
    report = result.doc["verification"]["edges"]
    assert report["edges"] == min(30, report["edges"]) and set(report) >= {"scale_0.9", "scale_0", "checked"}
