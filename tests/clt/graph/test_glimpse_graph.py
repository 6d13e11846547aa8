"""Glimpse-transcoder features in attribution graphs: edges against a brute-force Jacobian of the local model, exact
completeness, removals that the live policy confirms exactly, and the commands end to end."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import train_transcoder as train_cli
from clt.graph import attribute as attribute_cli
from clt.graph import intervene as intervene_cli
from clt.graph.attribution import TraceOptions, attribute, choose_targets
from clt.graph.decision import Decision, decide, greedy_tour
from clt.graph.graph import build_graph
from clt.graph.local import DTYPE, LocalModel
from clt.graph.replacement import GLIMPSE_PAIR, Replacement, load_replacement
from clt.graph.spliced import Change, intervene
from clt.graph.verify import verify_local
from clt.model import CrossLayerTranscoder, TranscoderConfig
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
from policy.env import generate
from policy.model import AttentionModel, PolicyConfig


def glimpse_setup(seed: int = 0):
    """A random policy (d=16, 2 layers, TSP10), a random multi-layer CLT and a random glimpse transcoder."""
    torch.manual_seed(seed)
    policy = AttentionModel(PolicyConfig(embed_dim=16, num_encoder_layers=2, num_heads=4, ff_hidden=32)).eval()
    clt = MultiLayerTranscoder(MultiLayerConfig(n_layers=2, d=16, expansion_factor=2, k=4)).eval()
    clt.set_statistics(torch.randn(2, 16) * 0.1, torch.rand(2, 16) + 0.5, torch.randn(2, 16) * 0.1,
                       torch.rand(2, 16) + 0.5)  # fmt: skip
    glimpse = CrossLayerTranscoder(TranscoderConfig(d_in=16, d_out=16, expansion_factor=4, k=6)).eval()
    glimpse.set_statistics(torch.randn(16) * 0.1, torch.rand(16) + 0.5, torch.randn(16) * 0.1, torch.rand(16) + 0.5)
    with torch.no_grad():
        for model in (clt, glimpse):
            model.b_enc.normal_(0, 0.2)
            model.b_dec.normal_(0, 0.1)
    replacement = Replacement("multilayer", [Path("clt_multilayer/x")], [clt], None, glimpse, Path(f"{GLIMPSE_PAIR}/y"))
    return policy, replacement, generate(1, 10, seed=seed)[0]


def local_at(step: int, against: bool, seed: int = 0):
    policy, replacement, locs = glimpse_setup(seed)
    decision = Decision(locs, greedy_tour(policy, locs)[:step])
    outcome = decide(policy, decision)
    targets = choose_targets(outcome.log_probs, 3, 0.999)
    other = [c for c in range(10) if c not in decision.prefix and c not in targets][: len(targets)]
    local = LocalModel(policy, replacement, decision, targets, other if against else None)
    return policy, replacement, decision, outcome, local, build_graph(local, outcome.log_probs.exp()[targets])


def direct_jacobian(local: LocalModel) -> torch.Tensor:
    """[receiver, source] by autograd, every source (encoder and glimpse features, the errors, the inputs) an input."""
    masks = [f.active for f in local.features]
    sizes = [int(m.sum()) for m in masks] + [len(local.glimpse.index)]
    n, layers = local.decision.n, local.n_layers

    def receivers(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([*sizes, layers * n, 1, n])
        acts = [torch.zeros(m.shape, dtype=DTYPE).masked_scatter(m, p) for m, p in zip(masks, parts, strict=False)]
        pres, targets = local.forward(
            [*acts, parts[layers]], parts[-3].view(layers, n), parts[-1], glimpse_error=parts[-2][0]
        )
        return torch.cat([*(p[m] for p, m in zip(pres, masks, strict=False)), pres[-1], targets])

    point = torch.cat([*(a[m] for a, m in zip(local.activations, masks, strict=True)), local.glimpse.activations,
                       torch.ones(layers * n + 1 + n, dtype=DTYPE)])  # fmt: skip
    return torch.autograd.functional.jacobian(receivers, point)


@pytest.mark.parametrize("against", [False, True])
@pytest.mark.parametrize("step", [1, 4])
def test_glimpse_edges_equal_a_brute_force_jacobian_and_sum_exactly(step, against):
    _, _, decision, outcome, local, graph = local_at(step, against)
    g = len(local.glimpse.index)
    assert g > 0 and graph.n_features == sum(int(f.active.sum()) for f in local.features) + g
    assert graph.n_errors == local.n_layers * decision.n + 1
    glimpse_nodes = [node for node in graph.nodes if node["kind"] == "feature" and node["layer"] == 2]
    assert len(glimpse_nodes) == g and {node["city"] for node in glimpse_nodes} == {decision.current}
    sources = graph.targets.start
    expected = direct_jacobian(local) * graph.activations()[:sources]
    receivers = torch.cat([torch.arange(graph.n_features), torch.arange(graph.targets.start, len(graph.nodes))])
    torch.testing.assert_close(graph.adjacency[receivers][:, :sources], expected, rtol=1e-9, atol=1e-11)
    glimpse_rows = slice(graph.n_features - g, graph.n_features)
    assert graph.adjacency[glimpse_rows].abs().max() > 0  # the context reads encoder features of first and current
    assert graph.adjacency[graph.targets, glimpse_rows].abs().max() > 0  # and the glimpse features write the targets
    completeness = graph.adjacency[receivers].sum(1) + graph.constants[receivers] - graph.values[receivers]
    assert completeness.abs().max() < 1e-12
    live = outcome.scores[local.targets] - (0 if local.against is None else outcome.scores[local.against])
    torch.testing.assert_close(graph.values[graph.targets], live.to(DTYPE), atol=2e-5, rtol=0)


def test_removing_a_glimpse_feature_live_changes_the_targets_as_predicted():
    policy, replacement, decision, _, local, graph = local_at(4, True)
    total = graph.total_effects()
    glimpse_ids = [i for i, node in enumerate(graph.nodes) if node["kind"] == "feature" and node["layer"] == 2]
    assert verify_local(local, graph, glimpse_ids, total)["max_relative_error"] < 1e-9
    for i in glimpse_ids:  # nothing downstream of the glimpse responds: the live change is the graph's, to float32
        node = graph.nodes[i]
        result = intervene(policy, replacement, decision, [Change(2, node["city"], node["feature"])])
        scores = lambda o: o.scores[local.targets] - o.scores[local.against]  # noqa: E731
        assert float((result.spliced.scores - result.original.scores).abs().max()) < 1e-5
        torch.testing.assert_close((scores(result.changed) - scores(result.spliced)).to(DTYPE), -total[:, i],
                                   atol=2e-5, rtol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="sit at the current city"):
        intervene(policy, replacement, decision, [Change(2, (decision.current + 1) % 10, 0)])


def test_glimpse_features_need_a_frozen_glimpse_and_a_step_past_the_first():
    policy, replacement, locs = glimpse_setup()
    with pytest.raises(ValueError, match="step >= 1"):
        LocalModel(policy, replacement, Decision(locs, []), [0])
    with pytest.raises(ValueError, match="use --glimpse frozen"):
        LocalModel(policy, replacement, Decision(locs, [0, 1]), [2], glimpse="tangent")


def test_attribute_with_the_glimpse_features_end_to_end(analysed_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(analysed_run, run_dir)
    args = ["--run_dir", str(run_dir), "--layer_pairs", "decoder.context:decoder.glimpse",
            "--num_instances_per_pair", "60"]  # fmt: skip
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
    train = ["--run_dir", str(run_dir), "--pair", GLIMPSE_PAIR, "--expansion_factor", "2", "--k", "3",
             "--batch_size", "64", "--num_epochs", "2", "--wandb_mode", "disabled"]  # fmt: skip
    assert CliRunner().invoke(train_cli.main, train).exit_code == 0
    out = tmp_path / "graph.json"
    args = ["--run_dir", str(run_dir), "--seed", "3", "--step", "4", "--glimpse_clt", "newest", "--out", str(out),
            "--verify", "40"]  # fmt: skip
    result = CliRunner().invoke(attribute_cli.main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    layers = doc["replacement"]["layers"]
    glimpse = [n for n in doc["nodes"] if n["kind"] == "feature" and n["layer"] == layers]
    assert glimpse and doc["replacement"]["dictionaries"][-1] == f"clt/{GLIMPSE_PAIR}"
    assert all(n["city"] == doc["current"] for n in glimpse)
    assert doc["checks"]["max_completeness_error"] < 1e-9 and doc["checks"]["max_target_error"] < 1e-4
    assert doc["verification"]["local"]["max_relative_error"] < 1e-8
    assert GLIMPSE_PAIR in doc["replacement"]["id"]
    node = glimpse[0]
    change = f"{layers}:{node['city']}:{node['feature']}=zero"
    report = CliRunner().invoke(intervene_cli.main, ["--run_dir", str(run_dir), "--seed", "3", "--step", "4",
                                                     "--glimpse_clt", "newest", "--changes", change])  # fmt: skip
    assert report.exit_code == 0, report.output
    bad = CliRunner().invoke(attribute_cli.main, [*args[:-4], "--glimpse_clt", str(run_dir)])
    assert bad.exit_code == 1 and "not a finished transcoder run" in bad.output
    wrong = sorted((run_dir / "clt" / "clt_runs" / "clt_L0.mlp_in_to_L0.mlp_out").iterdir())[-1]
    with pytest.raises(ValueError, match="not on the glimpse pair"):
        load_replacement(run_dir, glimpse=wrong)
    assert TraceOptions().glimpse is None and doc["options"]["glimpse"] == "frozen"  # resolved: a glimpse transcoder
    assert attribute  # the library entry point the CLI wraps
