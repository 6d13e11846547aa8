"""clt.graph.verify: the live check counts each margin once."""

import pytest
import torch

from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import Decision, greedy_tour
from clt.graph.replacement import load_replacement
from clt.graph.verify import distinct_margins, pearson
from policy.env import generate
from policy.loading import load_policy


def test_mirrored_margins_are_counted_once():
    assert distinct_margins([3, 5], [5, 3]) == [0]
    assert distinct_margins([3, 5, 7], [5, 3, 3]) == [0, 2]
    assert distinct_margins([3, 5], None) == [0, 1]


def test_the_live_r_of_two_mirrored_targets_is_the_r_of_one_margin(analysed_run):
    """Two targets A, B against their runner-ups B, A: the live check's r is that of the margin A - B alone (with both
    columns every removal would count twice, with opposite signs)."""
    replacement = load_replacement(analysed_run)
    policy = load_policy(analysed_run, replacement.checkpoint_epoch).model
    locs = generate(1, 10, seed=7)[0]
    options = TraceOptions(verify=6, max_targets=2, target_prob=1.0)
    doc = attribute(policy, replacement, Decision(locs, greedy_tour(policy, locs)[:3]), options, {}).doc
    (a, b), against = doc["targets"], doc["against"]
    assert against == [b, a]
    live = doc["verification"]["live"]
    first = [torch.tensor([r[k][0] for r in live["removals"]], dtype=torch.float64) for k in ("predicted", "measured")]
    assert live["pearson_r"] == pytest.approx(pearson(*first), abs=1e-12)
    both = [
        torch.tensor([r[k] for r in live["removals"]], dtype=torch.float64).flatten() for k in ("predicted", "measured")
    ]
    assert abs(live["pearson_r"] - pearson(*both)) > 1e-9


def test_gradient_x_activation_equals_the_tangent_graphs_total_effects(analysed_run):
    """The baseline is plain autograd in the live policy; the tangent graph (attention and glimpse patterns
    responding to first order, BatchNorm affine) is the same first-order model, so their removal predictions agree:
    a check of both."""
    replacement = load_replacement(analysed_run)
    policy = load_policy(analysed_run, replacement.checkpoint_epoch).model
    assert policy.cfg.normalization == "batch"
    locs = generate(1, 10, seed=11)[0]
    options = TraceOptions(verify=8, attention="tangent", glimpse="tangent")
    doc = attribute(policy, replacement, Decision(locs, greedy_tour(policy, locs)[:4]), options, {}).doc
    live = doc["verification"]["live"]
    predicted = torch.tensor([r["predicted"] for r in live["removals"]], dtype=torch.float64)
    baseline = torch.tensor([r["gradient_x_activation"] for r in live["removals"]], dtype=torch.float64)
    assert (predicted - baseline).abs().max() <= 1e-4 * predicted.abs().max()
    assert live["gradient_x_activation"]["pearson_r"] == pytest.approx(live["pearson_r"], abs=1e-4)


def test_replacement_fidelity_is_the_decision_with_the_error_nodes_dropped(analysed_run):
    from clt.graph.decision import decide
    from clt.graph.spliced import run_spliced, spliced_errors
    from clt.graph.verify import replacement_fidelity

    replacement = load_replacement(analysed_run)
    policy = load_policy(analysed_run, replacement.checkpoint_epoch).model
    locs = generate(1, 10, seed=13)[0]
    decision = Decision(locs, greedy_tour(policy, locs)[:5])
    outcome = decide(policy, decision)
    fidelity = replacement_fidelity(policy, replacement, decision, outcome.log_probs, outcome.tour[5])
    errors = spliced_errors(policy, replacement, decision)
    held = run_spliced(policy, replacement, decision, errors, [], False).log_probs  # errors held: the policy itself
    dropped = run_spliced(policy, replacement, decision, [e * 0 for e in errors], [], False).log_probs
    p = outcome.log_probs.exp()
    open_ = p > 0
    kl = lambda q: float((p[open_] * (outcome.log_probs[open_] - q[open_])).sum())  # noqa: E731
    assert abs(kl(held)) < 1e-5 and fidelity["kl"] == pytest.approx(kl(dropped), abs=1e-6)
    assert fidelity["choice"] == int(dropped.argmax()) and fidelity["same_choice"] == (
        fidelity["choice"] == outcome.tour[5]
    )
    assert fidelity["probability_of_policy_choice"] == pytest.approx(float(dropped[outcome.tour[5]].exp()), abs=1e-6)
    doc = attribute(policy, replacement, decision, TraceOptions(verify=0), {}).doc
    assert doc["verification"]["fidelity"] == fidelity


def test_patched_removals_are_the_true_removals_of_a_one_layer_model():
    """With one encoder layer nothing can re-select after a removal (a removed feature is zeroed after the top-k,
    and no later transcoder layer selects), so the patched removal effects equal the live ones, exactly through the
    attention's softmax, the norms and the pointer; the linear graph's predictions (attention frozen) do not."""
    from pathlib import Path

    from clt.graph.replacement import Replacement
    from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
    from policy.model import AttentionModel, PolicyConfig

    torch.manual_seed(0)
    policy = AttentionModel(PolicyConfig(embed_dim=16, num_encoder_layers=1, num_heads=4, ff_hidden=32)).eval()
    clt = MultiLayerTranscoder(MultiLayerConfig(n_layers=1, d=16, expansion_factor=2, k=4)).eval()
    clt.set_statistics(torch.zeros(1, 16), torch.ones(1, 16), torch.zeros(1, 16), torch.ones(1, 16))
    with torch.no_grad():
        clt.W_dec[0].mul_(3.0)  # effects large enough for the softmax's curvature to show
    replacement = Replacement("multilayer", [Path("clt_multilayer/x")], [clt], None)
    locs = generate(1, 10, seed=3)[0]
    decision = Decision(locs, greedy_tour(policy, locs)[:4])
    options = TraceOptions(verify=12, check_edges=0, circuit=False, attention="frozen", glimpse="frozen")
    live = attribute(policy, replacement, decision, options, {}).doc["verification"]["live"]
    patched = torch.tensor([r["patched"] for r in live["removals"]], dtype=torch.float64)
    measured = torch.tensor([r["measured"] for r in live["removals"]], dtype=torch.float64)
    predicted = torch.tensor([r["predicted"] for r in live["removals"]], dtype=torch.float64)
    scale = measured.abs().max()
    assert scale > 0 and (patched - measured).abs().max() <= 1e-5 * scale
    assert live["patched"]["pearson_r"] > 1 - 1e-9 and live["patched"]["sign_agreement"] == 1.0
    assert (predicted - measured).abs().max() > 1e-3 * scale  # the linear graph misses the curvature
