"""clt.graph.circuit: circuit faithfulness of a pruned graph in the live policy."""

import pytest
import torch

from clt.graph.attribution import TraceOptions, attribute
from clt.graph.circuit import CURVE, circuit_faithfulness, kept_masks
from clt.graph.decision import Decision, decide, greedy_tour
from clt.graph.replacement import load_replacement
from clt.graph.spliced import Change, run_spliced, spliced_errors, spliced_scores
from policy.env import generate
from policy.loading import load_policy


def traced(run, seed: int, step: int):
    replacement = load_replacement(run)
    policy = load_policy(run, replacement.checkpoint_epoch).model
    locs = generate(1, 10, seed=seed)[0]
    decision = Decision(locs, greedy_tour(policy, locs)[:step])
    result = attribute(policy, replacement, decision, TraceOptions(verify=0, check_edges=0), {})
    return policy, replacement, decision, result


def test_the_margins_are_the_policys_and_the_ablated_policys(analysed_run):
    """margin(all) is the live policy's own margin (the replacement plus its errors reproduces it); margin(none)
    equals every layer's features zeroed by interventions at every city, an independent path; the document holds
    the same report."""
    policy, replacement, decision, result = traced(analysed_run, 21, 4)
    doc = result.doc
    (t, *_), (a, *_) = doc["targets"], doc["against"]
    report = circuit_faithfulness(policy, replacement, decision, result.graph, result.pruned, doc["targets"],
                                  doc["against"])  # fmt: skip
    scores = decide(policy, decision, finish=False).scores
    assert report["margin_all"] == pytest.approx(float(scores[t] - scores[a]), abs=1e-4)
    errors = spliced_errors(policy, replacement, decision)
    zeroed = [Change(layer, city, None) for layer in range(replacement.n_layers) for city in range(decision.n)]
    scores = run_spliced(policy, replacement, decision, errors, zeroed, False).scores
    assert report["margin_none"] == pytest.approx(float(scores[t] - scores[a]), abs=1e-4)
    assert [c["node_threshold"] for c in report["curve"]] == list(CURVE)
    assert report["features"] == int(result.pruned.node_mask[: result.graph.n_features].sum())
    assert doc["verification"]["circuit"] == report  # the same passes, the same numbers


def test_a_circuit_without_one_feature_is_that_features_removal(analysed_run):
    """Keeping every feature but one is removing that one: the masked pass's scores equal the live removal by an
    intervention (clt.graph.spliced), and the masks hold each node at its own (layer, city, feature)."""
    policy, replacement, decision, result = traced(analysed_run, 22, 5)
    graph = result.graph
    circuits = torch.ones(2, graph.n_features, dtype=torch.bool)
    circuits[0, 0] = False
    masks = kept_masks(graph, replacement, decision.n, circuits)
    node = graph.nodes[0]
    assert not masks[node["layer"]][0, node["city"], node["feature"]]
    assert [int(m[1].sum() - m[0].sum()) for m in masks] == [int(i == node["layer"]) for i in range(len(masks))]
    errors = spliced_errors(policy, replacement, decision)
    masked = spliced_scores(policy, replacement, decision, errors, [[], []],
                            edit=lambda layer, z, rows: z * masks[layer][rows])  # fmt: skip
    removed = run_spliced(policy, replacement, decision, errors, [Change(node["layer"], node["city"], node["feature"])],
                          False).scores  # fmt: skip
    assert torch.allclose(masked[0], removed, atol=1e-5)
    assert torch.allclose(masked[1], decide(policy, decision, finish=False).scores, atol=1e-4)
    assert not torch.allclose(masked[0], masked[1], atol=1e-7)


def test_keeping_every_feature_is_faithful_and_its_complement_is_not(analysed_run):
    """At the curve's highest threshold the circuit holds nearly every influential feature: nearly all of the
    features' joint effect, and its complement nearly none."""
    policy, replacement, decision, result = traced(analysed_run, 23, 5)
    doc = result.doc
    report = circuit_faithfulness(policy, replacement, decision, result.graph, result.pruned, doc["targets"],
                                  doc["against"])  # fmt: skip
    last = report["curve"][-1]
    assert last["node_threshold"] == 0.99 and last["features"] <= result.graph.n_features
    assert last["faithfulness"] == pytest.approx(1.0, abs=0.25)
    assert abs(last["complement"]) < 0.25
