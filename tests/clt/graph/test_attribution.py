"""Attribution graphs of single decisions: edges against a brute-force Jacobian of the frozen local replacement model,
exact completeness, removal checks, interventions, and the two commands end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from clt.graph import attribute as attribute_cli
from clt.graph import intervene as intervene_cli
from clt.graph.attribution import TraceOptions, attribute, choose_targets
from clt.graph.decision import Decision, decide, greedy_tour
from clt.graph.graph import build_graph
from clt.graph.local import DTYPE, LocalModel
from clt.graph.prune import cumulative_mask, influence, normalized, prune, scores
from clt.graph.replacement import Replacement, load_replacement
from clt.graph.spliced import Change, intervene
from clt.graph.verify import verify_local
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
from policy.env import generate
from policy.loading import load_policy
from policy.model import AttentionModel, PolicyConfig


def random_setup(normalization: str, seed: int = 0):
    """A random policy (d=16, 2 layers, TSP10) and a random multi-layer CLT with statistics."""
    torch.manual_seed(seed)
    policy = AttentionModel(PolicyConfig(embed_dim=16, num_encoder_layers=2, num_heads=4, ff_hidden=32,
                                         normalization=normalization)).eval()  # fmt: skip
    if normalization == "batch":
        for layer in policy.layers:
            for norm in (layer.norm1.norm, layer.norm2.norm):
                norm.running_mean.normal_(0, 0.3)
                norm.running_var.uniform_(0.5, 2.0)
    clt = MultiLayerTranscoder(MultiLayerConfig(n_layers=2, d=16, expansion_factor=2, k=4)).eval()
    clt.set_statistics(torch.randn(2, 16) * 0.1, torch.rand(2, 16) + 0.5, torch.randn(2, 16) * 0.1,
                       torch.rand(2, 16) + 0.5)  # fmt: skip
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.1)
    replacement = Replacement("multilayer", [Path("clt_multilayer/x")], [clt], None)
    locs = generate(1, 10, seed=seed)[0]
    return policy, replacement, locs


def direct_jacobian(local: LocalModel) -> torch.Tensor:
    """[receiver, source]: d(receiver input) / d(source activation) by autograd through the frozen model, with every
    source held as an independent input (features at their activations, errors and inputs at scale 1)."""
    masks = [f.active for f in local.features]
    sizes = [int(m.sum()) for m in masks]
    n, layers = local.decision.n, local.n_layers

    def receivers(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([*sizes, layers * n, n])
        acts = []
        for mask, part in zip(masks, parts, strict=False):
            acts.append(torch.zeros(mask.shape, dtype=DTYPE).masked_scatter(mask, part))
        pres, targets = local.forward(acts, parts[-2].view(layers, n), parts[-1])
        return torch.cat([*(p[m] for p, m in zip(pres, masks, strict=True)), targets])

    ones = torch.ones(layers * n + n, dtype=DTYPE)
    point = torch.cat([*(a[m] for a, m in zip(local.activations, masks, strict=True)), ones])
    return torch.autograd.functional.jacobian(receivers, point)


def receiver_rows(graph) -> torch.Tensor:
    return torch.cat([torch.arange(graph.n_features), torch.arange(graph.targets.start, len(graph.nodes))])


@pytest.mark.parametrize("normalization", ["batch", "instance"])
@pytest.mark.parametrize(
    ("against", "glimpse", "attention"),
    [(False, "frozen", "frozen"), (True, "frozen", "frozen"), (True, "tangent", "tangent")],
)
def test_edges_equal_a_brute_force_jacobian_of_the_frozen_model(normalization, against, glimpse, attention):
    policy, replacement, locs = random_setup(normalization)
    decision = Decision(locs, greedy_tour(policy, locs)[:4])
    outcome = decide(policy, decision)
    targets = choose_targets(outcome.log_probs, 3, 0.999)
    other = [c for c in range(10) if c not in decision.prefix and c not in targets][: len(targets)]
    local = LocalModel(policy, replacement, decision, targets, other if against else None, glimpse, attention)
    graph = build_graph(local, outcome.log_probs.exp()[targets])
    jacobian = direct_jacobian(local)  # [receivers, sources]
    sources = graph.targets.start
    expected = jacobian * graph.activations()[:sources]
    actual = graph.adjacency[receiver_rows(graph)][:, :sources]
    assert graph.n_features > 0 and expected.abs().max() > 0.01
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)
    assert graph.adjacency[graph.n_features : graph.targets.start].abs().max() == 0  # errors, inputs receive nothing


@pytest.mark.parametrize("normalization", ["batch", "instance"])
def test_the_local_model_reproduces_the_policy_and_each_input_is_its_contributions_plus_constants(normalization):
    policy, replacement, locs = random_setup(normalization, seed=1)
    decision = Decision(locs, greedy_tour(policy, locs)[:3])
    outcome = decide(policy, decision)
    targets = choose_targets(outcome.log_probs, 4, 0.99)
    local = LocalModel(policy, replacement, decision, targets)
    graph = build_graph(local, outcome.log_probs.exp()[targets])
    rows = receiver_rows(graph)
    total = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(total, graph.values[rows], rtol=0, atol=1e-10)
    torch.testing.assert_close(graph.values[graph.targets], outcome.scores[targets].to(DTYPE), rtol=0, atol=1e-5)
    assert local.reproduction_error() < 1e-5
    assert graph.constants[rows].abs().max() > 0  # biases do contribute, and are accounted for


def test_removing_a_feature_in_the_local_model_changes_each_target_by_its_total_effect():
    policy, replacement, locs = random_setup("instance", seed=2)
    decision = Decision(locs, greedy_tour(policy, locs)[:5])
    outcome = decide(policy, decision)
    targets = choose_targets(outcome.log_probs, 3, 0.99)
    local = LocalModel(policy, replacement, decision, targets)
    graph = build_graph(local, outcome.log_probs.exp()[targets])
    total = graph.total_effects()
    layer1 = [i for i, n in enumerate(graph.nodes[: graph.n_features]) if n["layer"] == 0]
    assert verify_local(local, graph, layer1, total)["max_relative_error"] < 1e-9
    # a layer-0 feature acts directly and through layer-1 features: the total differs from the direct edge
    direct = graph.adjacency[graph.targets][:, layer1]
    assert (total[:, layer1] - direct).abs().max() > 1e-6


def test_pruning_keeps_the_influential_nodes_and_scores_are_shares():
    a = torch.zeros(5, 5, dtype=DTYPE)  # 0, 1 features; 2 error; 3 input; 4 target
    a[4, 0], a[4, 1], a[4, 2], a[0, 3], a[1, 3], a[1, 2] = 3.0, -1.0, 1.0, 2.0, 1.0, 1.0
    norm = normalized(a)
    torch.testing.assert_close(norm[4, :3], torch.tensor([0.6, 0.2, 0.2], dtype=DTYPE))
    weights = torch.tensor([0, 0, 0, 0, 1.0], dtype=DTYPE)
    torch.testing.assert_close(influence(norm, weights), torch.tensor([0.6, 0.2, 0.3, 0.7, 0], dtype=DTYPE))
    assert cumulative_mask(torch.tensor([0.1, 0.5, 0.4]), 0.8).tolist() == [False, True, True]
    assert cumulative_mask(torch.tensor([0.1, 0.5, 0.4]), 0.95).tolist() == [True, True, True]


def test_a_decision_on_the_analysed_run_is_traced_scored_and_checked(analysed_run):
    replacement = load_replacement(analysed_run)
    assert replacement.kind == "multilayer"
    policy = load_policy(analysed_run, replacement.checkpoint_epoch).model
    locs = generate(1, 10, seed=5)[0]
    result = attribute(policy, replacement, Decision(locs, greedy_tour(policy, locs)[:4]), TraceOptions(verify=6), {})
    doc = result.doc
    assert doc["checks"]["max_completeness_error"] < 1e-9 and doc["checks"]["max_target_error"] < 1e-4
    assert doc["verification"]["local"]["max_relative_error"] < 1e-8
    assert -1 <= doc["verification"]["live"]["pearson_r"] <= 1 and doc["verification"]["live"]["features"] == 6
    for key in ("replacement", "completeness"):
        assert 0 < doc["scores"]["graph"][key] <= 1 and 0 < doc["scores"]["pruned"][key] <= 1
    kept = {n["id"] for n in doc["nodes"] if n["kept"]}
    assert all(e["source"] in kept and e["target"] in kept for e in doc["edges"])
    assert {f"I:{c}" for c in range(10)} <= kept and {f"T:{c}" for c in doc["targets"]} <= kept
    assert len(kept) < len(doc["nodes"])


def test_per_layer_transcoders_serve_when_the_run_has_no_multilayer_clt(analysed_run, tmp_path):
    import shutil

    run_dir = tmp_path / "tiny"
    shutil.copytree(analysed_run, run_dir, ignore=shutil.ignore_patterns("activations", "clt_multilayer"))
    replacement = load_replacement(run_dir)
    assert replacement.kind == "per_layer" and replacement.dictionary_ids() == [
        "clt/clt_L0.mlp_in_to_L0.mlp_out", "clt/clt_L1.mlp_in_to_L1.mlp_out"]  # fmt: skip
    policy = load_policy(run_dir).model
    locs = generate(1, 10, seed=6)[0]
    decision = Decision(locs, greedy_tour(policy, locs)[:2])
    outcome = decide(policy, decision)
    targets = choose_targets(outcome.log_probs, 2, 0.99)
    local = LocalModel(policy, replacement, decision, targets)
    graph = build_graph(local, outcome.log_probs.exp()[targets])
    expected = direct_jacobian(local) * graph.activations()[: graph.targets.start]
    torch.testing.assert_close(graph.adjacency[receiver_rows(graph)][:, : graph.targets.start], expected,
                               rtol=1e-9, atol=1e-11)  # fmt: skip


def test_an_intervention_against_the_graph_flips_the_decision(analysed_run):
    replacement = load_replacement(analysed_run)
    policy = load_policy(analysed_run, replacement.checkpoint_epoch).model
    locs = generate(1, 10, seed=7)[0]
    decision = Decision(locs, greedy_tour(policy, locs)[:3])
    result = attribute(policy, replacement, decision, TraceOptions(max_targets=1, verify=0), {})
    chosen, margin = result.doc["targets"][0], float(result.graph.values[result.graph.targets][0])
    unchanged = intervene(policy, replacement, decision, [Change(0, 0, None, "scale", 1.0)])
    assert not unchanged.summary()["tour_changed"] and unchanged.summary()["splice_max_score_error"] < 1e-4
    # push the margin (chosen minus runner-up) through zero along the strongest feature's predicted total effect
    top = result.doc["top_features"][0]
    effect = top["total_effect"][f"T:{chosen}"]
    _, layer, city, feature = top["id"].split(":")
    factor = 1 - 3 * margin / effect
    changed = intervene(policy, replacement, decision, [Change(int(layer), int(city), int(feature), "scale", factor)])
    summary = changed.summary()
    assert summary["tour_changed"] and changed.changed.tour[decision.step] != chosen


def test_attribute_and_intervene_from_the_command_line(analysed_run, tmp_path):
    out, site = tmp_path / "graph.json", tmp_path / "site"
    args = ["--run_dir", str(analysed_run), "--seed", "3", "--step", "2", "--out", str(out), "--verify", "4",
            "--export", str(site)]  # fmt: skip
    result = CliRunner().invoke(attribute_cli.main, args)
    assert result.exit_code == 0, result.output
    assert "replacement" in result.output and "sign agreement" in result.output
    for line in ("patched removal effects", "edges: the", "circuit: the margin"):
        assert line in result.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "tsp-interp.attribution/1" and doc["step"] == 2 and len(doc["tour"]) == 2
    assert doc["instance"]["seed"] == 3 and len(doc["checkpoint_sha256"]) == 64
    tensors = load_file(out.with_suffix(".safetensors"))
    assert (
        tensors["adjacency"].shape == (len(doc["nodes"]), len(doc["nodes"]))
        and tensors["adjacency"].dtype == torch.float32
    )
    kept = [i for i, n in enumerate(doc["nodes"]) if n["kept"]]
    assert tensors["node_mask"].nonzero().flatten().tolist() == kept and int(tensors["edge_mask"].sum()) == len(
        doc["edges"]
    )
    gallery = json.loads((site / "decisions.json").read_text())
    assert [g["name"] for g in gallery] == ["graph"] and (site / "decisions.js").read_text().startswith("window.")
    # a tour file and an instance file, as policy.solve reads and writes them
    locs = generate(2, 10, seed=9).numpy()
    np.save(tmp_path / "x.npy", locs)
    np.save(tmp_path / "t.npy", np.stack([np.arange(10), np.arange(10)[::-1]]).astype(np.int64))
    args = ["--run_dir", str(analysed_run), "--locs", str(tmp_path / "x.npy"), "--index", "1", "--tour",
            str(tmp_path / "t.npy"), "--step", "3", "--verify", "0", "--target", "score",
            "--no_full_graph"]  # fmt: skip
    result = CliRunner().invoke(attribute_cli.main, args)
    assert result.exit_code == 0, result.output
    default = analysed_run / "clt" / "attribution" / "x_1_n10_t_step3_attention-tangent_glimpse-tangent.json"
    assert json.loads(default.read_text())["tour"] == [9, 8, 7] and not default.with_suffix(".safetensors").exists()
    result = CliRunner().invoke(attribute_cli.main, [*args, "--attention", "frozen", "--glimpse", "frozen"])
    assert result.exit_code == 0, result.output  # the other mode has its own file: the first is still there
    frozen = default.with_name("x_1_n10_t_step3_attention-frozen_glimpse-frozen.json")
    assert json.loads(frozen.read_text())["options"]["attention"] == "frozen" and default.is_file()
    args = ["--run_dir", str(analysed_run), "--seed", "3", "--step", "2", "--changes", "0:4:*=zero,1:4:*=zero",
            "--json"]  # fmt: skip
    result = CliRunner().invoke(intervene_cli.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tour_before"][:2] == doc["tour"] and len(report["tour_after"]) == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--step", "2"], "say which instance"),
        (["--seed", "1"], "say which step"),
        (["--seed", "1", "--step", "10"], "past the last decision"),
        (["--seed", "1", "--step", "2", "--tour", "missing.npy"], "no such tour file"),
        (["--seed", "1", "--step", "2", "--node_threshold", "1.5"], "node_threshold must be in (0, 1]"),
        (["--seed", "1", "--step", "9", "--target", "difference"], "one candidate left"),
    ],
)
def test_bad_decisions_are_one_line_errors(analysed_run, args, message):
    result = CliRunner().invoke(attribute_cli.main, ["--run_dir", str(analysed_run), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_clt_must_name_a_multilayer_clt(analysed_run):
    from sae.runs import newest_finished

    pairwise = newest_finished(analysed_run, "clt", "clt_L0.mlp_in_to_L0.mlp_out")
    args = ["--run_dir", str(analysed_run), "--seed", "1", "--step", "2", "--clt", str(pairwise)]
    result = CliRunner().invoke(attribute_cli.main, args)
    assert result.exit_code == 1 and "takes a multi-layer CLT run folder" in result.output


@pytest.mark.parametrize("spec", ["0:1", "0:1:2=scale", "0:1:*=set:3", "0:1:2=zero:4", "a:1:2=zero", "0:1:2=scale:x",
                                  "0:1:2=scale:nan", "0:1:2=set:inf"])  # fmt: skip
def test_bad_changes_are_refused(spec):
    with pytest.raises(ValueError, match="cannot read the change|set needs one feature|must be a finite number"):
        Change.parse(spec)


def test_changes_are_checked_against_the_replacement(analysed_run):
    replacement = load_replacement(analysed_run)
    policy = load_policy(analysed_run).model
    locs = generate(1, 10, seed=1)[0]
    with pytest.raises(ValueError, match="features are 0.."):
        intervene(policy, replacement, Decision(locs, [0]), [Change(0, 1, 10_000, "zero")])


def test_graph_scores_are_one_without_error_influence():
    from clt.graph.graph import Graph

    a = torch.zeros(4, 4, dtype=DTYPE)  # feature, error, input, target
    a[0, 2], a[3, 0] = 1.0, 2.0
    nodes = [{"kind": k} for k in ("feature", "error", "input", "target")]
    zeros, ones = torch.zeros(4, dtype=DTYPE), torch.ones(4, dtype=DTYPE)
    graph = Graph(nodes, a, zeros, ones, 1, 1, 1, torch.ones(1, dtype=DTYPE))
    assert scores(graph) == {"replacement": 1.0, "completeness": 1.0}
    a[3, 1] = 2.0
    assert scores(graph)["replacement"] == pytest.approx(0.5) and scores(graph)["completeness"] < 1
    pruned = prune(graph, 0.5, 0.9)
    assert pruned.node_mask[2] and pruned.node_mask[3]


@pytest.mark.parametrize("glimpse", ["frozen", "tangent"])
def test_the_targets_have_the_pointer_scores_own_gradient(glimpse):
    """The targets are tangents: at this input they equal the policy's scores, and their gradient with respect to
    the encoder output is the score's (autograd through the policy's own decoder; with the glimpse pattern held
    when frozen)."""
    policy, replacement, locs = random_setup("batch", seed=3)
    decision = Decision(locs, greedy_tour(policy, locs)[:2])
    unvisited = [c for c in range(10) if c not in decision.prefix][:3]
    local = LocalModel(policy, replacement, decision, unvisited, glimpse=glimpse)
    dec = policy.double().decoder
    h = local.encoder_output.clone().requires_grad_(True)
    if glimpse == "tangent":
        visited = decision.visited()[None, None]
        first, current = torch.tensor([[decision.first]]), torch.tensor([[decision.current]])
        scores = dec(dec.precompute(h[None]), first, current, visited)[0, 0, local.targets]
    else:  # g = W_out (P V(h)) with P as the policy computed it, then g . k_c / sqrt(d)
        value = dec.project_node_embeddings.weight.chunk(3)[1]
        v = (h @ value.T).view(10, 4, 4)  # [node, head, dh]
        glimpse_vector = dec.project_out((v * local.glimpse_pattern.T[..., None]).sum(0).flatten())
        keys = h[local.targets] @ dec.project_node_embeddings.weight.chunk(3)[2].T
        scores = keys @ glimpse_vector / 16**0.5
    grads = torch.stack([torch.autograd.grad(scores[i], h, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(local.target_cotangents(), grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(local.target_values(local.encoder_output), scores.detach(), rtol=1e-10, atol=1e-12)
    if glimpse == "tangent":  # the current city's embedding reaches the targets through the query
        assert local.target_cotangents()[:, decision.current].abs().max() > 1e-6
    else:
        assert local.target_cotangents()[:, decision.current].abs().max() == 0


def test_tangent_attention_is_the_attentions_own_first_order_change():
    """TangentAttention(x) = attn(x*) + J (x - x*), J (x - x*) by autograd through the layer's real attention."""
    from clt.graph.attention import attention_at

    policy = random_setup("batch", seed=4)[0]
    attn = policy.layers[1].attn.double()
    x_star, delta = torch.randn(10, 16, dtype=DTYPE), torch.randn(10, 16, dtype=DTYPE)
    tangent = attention_at(attn, x_star, "tangent")
    value = attn(x_star[None])[0]
    jacobian = torch.autograd.functional.jacobian(lambda x: attn(x[None])[0], x_star)  # [node, d, node, d]
    jvp = torch.einsum("ijkl,kl->ij", jacobian, delta)
    torch.testing.assert_close(tangent(x_star), value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent(x_star + delta) - tangent(x_star), jvp, rtol=1e-10, atol=1e-12)
    frozen = attention_at(attn, x_star, "frozen")
    assert (frozen(x_star + delta) - frozen(x_star) - jvp).abs().max() > 1e-3  # the frozen pattern leaves QK out


def test_many_decisions_in_one_process_with_a_summary_table(analysed_run, tmp_path):
    import shutil

    run_dir = tmp_path / "tiny"
    shutil.copytree(analysed_run, run_dir)
    args = ["--run_dir", str(run_dir), "--seed", "1", "--instances", "4-5", "--steps", "all", "--verify", "3",
            "--no_full_graph"]  # with --steps, no --step  # fmt: skip
    result = CliRunner().invoke(attribute_cli.main, args)
    assert result.exit_code == 0, result.output
    written = sorted((run_dir / "clt" / "attribution").glob("seed[45]_*.json"))  # other tests' graphs may be there
    assert len(written) == 2 * 8  # steps 1..8 of two 10-city instances (step 9 has one candidate left)
    assert {json.loads(p.read_text())["instance"]["seed"] for p in written} == {4, 5}
    table = result.stdout.strip().splitlines()
    assert table[0].split()[:3] == ["decision", "picks", "live"] and len(table) == 1 + 16 + 2
    assert table[-2].startswith("16 decisions: live r mean") and "beats gradient x activation in" in table[-2]
    assert table[-1].startswith("patched removal effects: r mean")
    bad = CliRunner().invoke(attribute_cli.main, [*args[:4], "--steps", "3-x"])
    assert bad.exit_code == 1 and "--steps takes A-B or a comma list" in bad.output
    out = CliRunner().invoke(attribute_cli.main, [*args, "--out", str(tmp_path / "one.json")])
    assert out.exit_code == 1 and "--out names one graph" in out.output
