"""clt.eval: splicing (exact with the error term, 100% for a perfect transcoder, 0% for a useless one), edges, CLI."""

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import eval as eval_cli
from clt.graph import edges as edges_cli
from clt.graph.edges import GraphSource, build_edges, read_edges_csv, read_graph, write_graph
from clt.model import CrossLayerTranscoder, TranscoderConfig
from clt.splice import pair_hooks, replacement, splice_metrics
from clt.train_transcoder import TranscoderTrainConfig
from clt.train_transcoder import run as train
from policy.env import generate
from policy.loading import load_policy
from sae import collect_activations
from sae.hooks import HookedPolicy
from sae.model import SAEConfig, TopKSAE
from sae.train_topk import SAETrainConfig
from sae.train_topk import run as train_sae

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"
SOURCE, TARGET = "encoder_layer_0.mlp_in", "encoder_layer_0.mlp_out"


@pytest.fixture(scope="module")
def trained(tiny_source, tmp_path_factory):
    """A copy of the tiny run with the L0 mlp pair collected, a transcoder, and SAEs on both hooks."""
    run_dir = tmp_path_factory.mktemp("clt_eval") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    args = ["--run_dir", str(run_dir), "--layer_pairs", f"{SOURCE}:{TARGET}", "--num_instances_per_pair", "60"]
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
    args = ["--run_dir", str(run_dir), "--hooks", f"{SOURCE},{TARGET}", "--num_instances", "60", "--name", "acts"]
    assert CliRunner().invoke(collect_activations.main, args).exit_code == 0
    clt_dir = train(TranscoderTrainConfig(str(run_dir), PAIR, expansion_factor=4, k=4, batch_size=64, num_epochs=2,
                                          wandb_mode="disabled"))  # fmt: skip
    saes = [train_sae(SAETrainConfig(str(run_dir), hook, expansion_factor=2, k=2, batch_size=64, num_epochs=1,
                                     wandb_mode="disabled")) for hook in (SOURCE, TARGET)]  # fmt: skip
    return run_dir, clt_dir, saes


def _splice(run_dir, model, target_mean, kinds):
    hooked = HookedPolicy(load_policy(run_dir).model)
    fns = {kind: partial(pair_hooks, SOURCE, TARGET, replacement(kind, model, target_mean)) for kind in kinds}
    return splice_metrics(hooked, generate(24, 10, seed=5), fns, batch_size=10)


def test_error_term_reproduces_the_original_tours(trained):
    run_dir, clt_dir, _ = trained
    from clt.model import load_transcoder

    report = _splice(run_dir, load_transcoder(clt_dir), torch.zeros(16), ["transcoder+error", "zero"])
    exact = report["transcoder+error"]
    assert exact["same_tour_fraction"] == 1.0 and exact["action_agreement"] == 1.0 and exact["gap"] == 0.0
    assert exact["mean_kl"] < 1e-6
    assert report["zero"]["mean_kl"] > 1e-5  # the measurement sees a change (the tiny policy is nearly uniform)


def _mlp_as_transcoder(layer, cfg_kw):
    """A relu transcoder that is the layer's feed-forward block itself: the perfect transcoder."""
    d, hidden = layer.ff_in.in_features, layer.ff_in.out_features
    model = CrossLayerTranscoder(TranscoderConfig(d, d, expansion_factor=hidden // d, activation="relu", **cfg_kw))
    with torch.no_grad():
        model.W_enc.copy_(layer.ff_in.weight)
        model.b_enc.copy_(layer.ff_in.bias)
        model.W_dec.copy_(layer.ff_out.weight.T)
        model.b_dec.copy_(layer.ff_out.bias)
    return model.eval()


def test_perfect_transcoder_recovers_everything_and_a_useless_one_nothing(trained):
    run_dir, _, _ = trained
    layer = load_policy(run_dir).model.layers[0]
    perfect = _mlp_as_transcoder(layer, {})
    target_mean = torch.randn(16)
    report = _splice(run_dir, perfect, target_mean, ["transcoder", "mean"])
    assert abs(report["mean"]["gap"]) > 1e-3  # mean ablation changes the tours (the tiny policy is barely trained)
    assert report["transcoder"]["recovered"] == pytest.approx(1.0, abs=1e-6)
    assert report["transcoder"]["same_tour_fraction"] == 1.0
    useless = CrossLayerTranscoder(TranscoderConfig(16, 16, expansion_factor=2, k=2))
    with torch.no_grad():
        useless.W_dec.zero_()
        useless.b_dec.copy_(target_mean)  # predicts the mean whatever the source
    report = _splice(run_dir, useless.eval(), target_mean, ["transcoder", "mean"])
    assert report["transcoder"]["recovered"] == pytest.approx(0.0, abs=1e-6)


def test_cli_writes_metrics_plots_and_edges_with_sae_paths(trained):
    run_dir, clt_dir, (source_sae, target_sae) = trained
    edges = ["--clt_dir", str(clt_dir), "--source_sae", str(source_sae), "--target_sae", str(target_sae),
             "--top_edges", "50"]  # fmt: skip
    fresh = clt_dir.parent / "not_evaluated"
    shutil.copytree(clt_dir, fresh)
    before_eval = CliRunner().invoke(edges_cli.main, ["--clt_dir", str(fresh)])
    assert before_eval.exit_code == 1 and "run python -m clt.eval --clt_dir" in before_eval.output
    shutil.rmtree(fresh)
    args = [
        "--clt_dir",
        str(clt_dir),
        "--num_instances",
        "16",
        "--label_instances",
        "20",
        "--batch_size",
        "8",
        "--json",
    ]
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    labels = json.loads((clt_dir / "eval" / "labels.json").read_text())  # labelled by default (clt.feature_labels)
    assert labels["instances"]["num_instances"] == 20 and report["labels"].keys() == labels["dictionaries"].keys()
    made = CliRunner().invoke(edges_cli.main, edges)
    assert made.exit_code == 0 and "edges" in made.output, made.output
    out = clt_dir / "eval"
    assert {"metrics.json", "features.json", "decoder_heatmap.png", "feature_frequency.png", "edges.json",
            "edges.csv"} <= {p.name for p in out.iterdir()}  # fmt: skip
    assert (out / "decoder_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    rec = report["reconstruction"]
    assert len(rec["r2_per_dim"]) == 16 and 0 <= rec["dead_fraction"] <= 1 and rec["l0"] <= 4
    assert set(report["splice"]) >= {"original", "transcoder", "transcoder+error", "mean", "zero"}
    assert report["splice"]["transcoder+error"]["same_tour_fraction"] == 1.0
    graph = read_graph(out)
    kinds = {e["kind"] for e in graph["edges"]}
    assert kinds == {"encoder", "decoder", "sae_to_clt", "clt_to_sae"}
    assert sum(e["kind"] == "decoder" for e in graph["edges"]) == 50
    assert graph["paths"] and len(graph["paths"][0]["nodes"]) == 3
    feature = next(n for n in graph["nodes"] if n["kind"] == "clt_feature")
    assert feature["id"] == f"tiny/{PAIR}/{clt_dir.name}/feature/0" and len(feature["top_targets"]) == 5
    text = CliRunner().invoke(
        eval_cli.main, ["--run_dir", str(run_dir), "--pair", PAIR, "--num_instances", "8", "--label_instances", "20"]
    )
    assert text.exit_code == 0 and "recovers" in text.output and "transcoder+error" in text.output


def test_several_folders_in_one_process_share_the_policy_and_the_ablations_and_report_as_alone(trained, monkeypatch):
    run_dir, clt_dir, _ = trained
    other = train(TranscoderTrainConfig(str(run_dir), PAIR, expansion_factor=2, k=2, batch_size=64, num_epochs=1,
                                        wandb_mode="disabled"))  # fmt: skip
    alone = []
    for folder in (clt_dir, other):
        result = CliRunner().invoke(
            eval_cli.main, ["--clt_dir", str(folder), "--num_instances", "12", "--label_instances", "20", "--json"]
        )
        assert result.exit_code == 0, result.output
        alone.append(json.loads((folder / "eval" / "metrics.json").read_text()))
    loads, splices = [], []
    monkeypatch.setattr(eval_cli, "load_policy", lambda *args: loads.append(args) or load_policy(*args))
    monkeypatch.setattr(eval_cli, "splice_metrics", lambda *a: splices.append(sorted(a[2])) or splice_metrics(*a))
    result = CliRunner().invoke(
        eval_cli.main, [str(clt_dir), str(other), "--num_instances", "12", "--label_instances", "20"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("recovers") == 2 and len(loads) == 1
    assert splices == [["transcoder", "transcoder+error"], ["mean", "zero"], ["transcoder", "transcoder+error"]]
    together = [json.loads((folder / "eval" / "metrics.json").read_text()) for folder in (clt_dir, other)]
    assert together == alone and alone[0]["splice"]["transcoder"] != alone[1]["splice"]["transcoder"]
    lines = CliRunner().invoke(
        eval_cli.main, [str(clt_dir), str(other), "--num_instances", "12", "--label_instances", "20", "--json"]
    )
    assert [json.loads(line) for line in lines.stdout.splitlines()] == alone  # one JSON line each
    both = CliRunner().invoke(eval_cli.main, [str(other), "--clt_dir", str(clt_dir)])
    assert both.exit_code == 1 and "one of them" in both.output


def test_edges_round_trip_and_bad_files_are_refused(tmp_path):
    torch.manual_seed(0)
    model = CrossLayerTranscoder(TranscoderConfig(6, 5, expansion_factor=2, k=2, normalize_source="standard"))
    model.set_statistics(torch.zeros(6), torch.full((6,), 2.0), torch.zeros(5), torch.ones(5))
    sae_in, sae_out = TopKSAE(SAEConfig(6, expansion_factor=2, k=2)), TopKSAE(SAEConfig(5, expansion_factor=2, k=2))
    source = GraphSource("run", "pair", "t0", "a", "b", model, np.linspace(0, 1, 12), np.linspace(1, 2, 12),
                         np.ones(6), ("s_in", sae_in, np.ones(12)), ("s_out", sae_out))  # fmt: skip
    graph = build_edges(source, top_edges=7, top_paths=3)
    assert [
        sum(e["kind"] == k for e in graph["edges"]) for k in ("encoder", "decoder", "sae_to_clt", "clt_to_sae")
    ] == [7] * 4
    decoder = next(e for e in graph["edges"] if e["kind"] == "decoder")
    j, c = int(decoder["source"].rsplit("/", 1)[1]), int(decoder["target"].rsplit("/", 1)[1])
    assert decoder["weight"] == pytest.approx(model.W_dec[j, c].item())
    encoder = next(e for e in graph["edges"] if e["kind"] == "encoder")
    j, c = int(encoder["target"].rsplit("/", 1)[1]), int(encoder["source"].rsplit("/", 1)[1])
    assert encoder["weight"] == pytest.approx(model.W_enc[j, c].item() / 2)  # raw units: divided by the std
    virtual = next(e for e in graph["edges"] if e["kind"] == "sae_to_clt")
    i, j = int(virtual["source"].rsplit("/", 1)[1]), int(virtual["target"].rsplit("/", 1)[1])
    assert virtual["weight"] == pytest.approx((model.W_enc[j] / 2 @ sae_in.W_dec[i]).item(), rel=1e-5)
    assert len(graph["paths"]) == 3
    write_graph(graph, tmp_path)
    assert read_graph(tmp_path) == graph
    assert read_edges_csv(tmp_path / "edges.csv") == graph["edges"]
    broken = {**graph, "edges": [*graph["edges"], {**graph["edges"][0], "target": "nowhere"}]}
    write_graph(broken, tmp_path)
    with pytest.raises(ValueError, match="unknown nodes"):
        read_graph(tmp_path)
    write_graph({**graph, "schema": "other/9"}, tmp_path)
    with pytest.raises(ValueError, match="is not tsp-interp.edges/1"):
        read_graph(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [([], "give --clt_dir"), (["--run_dir", "x"], "needs --pair"), (["--clt_dir", "/nonexistent"], "not a transcoder")],
)
def test_bad_arguments_are_clear_errors(args, message):
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 1 and message in result.output


def test_another_condition_reports_its_own_ridge_and_the_splice_drift(analysed_run, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(analysed_run, run)
    clt_dir = max((run / "clt" / "clt_runs" / PAIR).iterdir())
    own = json.loads((clt_dir / "eval" / "metrics.json").read_text())  # the fixture's clt.eval on 8 instances
    same = CliRunner().invoke(eval_cli.main, ["--clt_dir", str(clt_dir), "--num_instances", "8", "--num_loc", "10"])
    assert same.exit_code == 0, same.output
    report = json.loads((clt_dir / "eval" / "transfer" / "tiny_e1_uniform_n10.json").read_text())
    for key in ("mean_length", "gap", "action_agreement", "mean_kl"):  # the same instances and code as clt.eval
        assert report["splice"]["transcoder"][key] == own["splice"]["transcoder"][key]
    other = ["--clt_dir", str(clt_dir), "--num_instances", "8", "--num_loc", "13", "--distribution", "clustered"]
    result = CliRunner().invoke(eval_cli.main, other)
    assert result.exit_code == 0 and "on tiny_e1_clustered_n13 (8 instances)" in result.output, result.output
    report = json.loads((clt_dir / "eval" / "transfer" / "tiny_e1_clustered_n13.json").read_text())
    assert report["trained_on"]["num_loc"] == 10 and report["condition"]["num_loc"] == 13
    assert report["ridge_val_fvu"] > 0 and report["reconstruction"]["fvu"] > 0
    assert report["reconstruction"]["l0"] <= 3 and "recovered" in report["splice"]["transcoder"]
    missing = CliRunner().invoke(eval_cli.main, ["--clt_dir", str(clt_dir), "--checkpoint", "7"])
    assert missing.exit_code == 1 and "no checkpoint for epoch 7" in missing.output


def test_recovered_is_no_number_where_mean_ablation_does_no_damage():
    from clt.splice import recovered

    def report(original, mean, transcoder):
        lengths = {"original": original, "mean": mean, "transcoder": transcoder}
        return {name: {"mean_length": value} for name, value in lengths.items()}

    assert recovered(report(4.0, 6.0, 4.5)) == pytest.approx(0.75)
    assert recovered(report(4.0, 4.001, 4.5)) is None  # -49900% would say nothing
    with pytest.raises(ValueError, match="not finite"):
        recovered(report(4.0, 6.0, float("nan")))
