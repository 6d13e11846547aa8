"""MultiLayerTranscoder: shapes, the sparse training path against autograd through the dense map, AuxK, save/load."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.nn import functional as F

from clt import collect_pairs as collect_cli
from clt import summarize as summarize_cli
from clt import train_transcoder as train_cli
from clt.model import load_transcoder
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder


def _model(**kw):
    torch.manual_seed(0)
    return MultiLayerTranscoder(MultiLayerConfig(**{"n_layers": 3, "d": 6, "expansion_factor": 4, "k": 3, **kw}))


def _dense(model, xs):
    """The same map with dense codes and autograd through everything."""
    parts = []
    for i in range(model.cfg.n_layers):
        pre = torch.addmm(model.b_enc[i], xs[i], model.W_enc[i].T)
        values, indices = pre.topk(model.cfg.active, dim=-1)
        parts.append(torch.zeros_like(pre).scatter(-1, indices, F.relu(values)) @ model.decoder(i))
    return model._assemble(parts)


def test_layer_m_sums_the_features_of_every_layer_up_to_m():
    model = _model()
    zs = torch.zeros(3, 1, 24)
    zs[2, 0, 5] = 1.0  # a layer-2 feature writes only into layer 2
    y = model.decode(zs) - model.decode(torch.zeros_like(zs))
    assert y[:2].abs().max() == 0 and torch.allclose(y[2, 0], model.W_dec[2][5, 0])
    zs = torch.zeros(3, 1, 24)
    zs[0, 0, 1] = 2.0  # a layer-0 feature writes into layers 0, 1 and 2
    y = model.decode(zs) - model.decode(torch.zeros_like(zs))
    torch.testing.assert_close(y[:, 0], 2 * model.W_dec[0][1])
    norms = torch.stack([w.norm(dim=(1, 2)) for w in model.W_dec])
    torch.testing.assert_close(norms, torch.ones(3, 24))  # unit norm across the layers a feature writes to


def test_sparse_training_path_has_the_dense_gradients():
    model = _model()
    with torch.no_grad():
        model.b_enc.normal_()
    xs, ys = torch.randn(3, 11, 6), torch.randn(3, 11, 6)
    grads = []
    for forward in (lambda x: model.forward_train(x).y_hat, lambda x: _dense(model, x)):
        model.zero_grad()
        (forward(xs) - ys).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)
    out = model.forward_train(xs)
    assert out.l0() == 9.0 and out.fired(24).shape == (72,)
    aux = model.aux_loss(xs, ys, out, torch.ones(72, dtype=torch.bool))
    aux.backward()
    assert aux > 0 and model.W_enc.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path):
    model = _model(normalize_source="standard", normalize_target="center")
    model.set_statistics(torch.randn(3, 6), torch.rand(3, 6) + 0.5, torch.randn(3, 6), torch.rand(3, 6) + 0.5)
    model.save(tmp_path)
    loaded = load_transcoder(tmp_path)
    assert isinstance(loaded, MultiLayerTranscoder) and loaded.cfg == model.cfg
    xs = torch.randn(3, 4, 6)
    torch.testing.assert_close(loaded(xs)[0], model(xs)[0])
    for m in range(3):  # splicing predicts layer m from the mlp_in of layers 0..m only
        torch.testing.assert_close(model.predict_layer(list(xs[: m + 1]), m), model(xs)[0][m])


@pytest.fixture(scope="module")
def layers_run(tiny_source, tmp_path_factory):
    """A copy of the tiny run (2 layers) with both layers' mlp_in -> mlp_out pairs collected in one pass."""
    run_dir = tmp_path_factory.mktemp("multilayer") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    pairs = "encoder_layer_0.mlp_in:encoder_layer_0.mlp_out,encoder_layer_1.mlp_in:encoder_layer_1.mlp_out"
    args = ["--run_dir", str(run_dir), "--layer_pairs", pairs, "--num_instances_per_pair", "60"]
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
    return run_dir


def _cli(run_dir, *extra):
    args = ["--run_dir", str(run_dir), "--multilayer", "--expansion_factor", "2", "--k", "3", "--batch_size", "64",
            "--num_epochs", "2", "--state_every", "2", "--wandb_mode", "disabled", *map(str, extra)]  # fmt: skip
    return CliRunner().invoke(train_cli.main, args)


def test_multilayer_cli_trains_logs_per_layer_and_resumes_exactly(layers_run, monkeypatch, ctrl_c_at_step):
    result = _cli(layers_run)
    assert result.exit_code == 0, result.output
    assert "clt_multilayer: validation FVU" in result.output
    runs = sorted((layers_run / "clt" / "clt_runs" / "clt_multilayer").iterdir())
    full = runs[-1]
    model = load_transcoder(full)
    assert isinstance(model, MultiLayerTranscoder) and model.cfg.n_layers == 2 and model.cfg.k == 3
    assert model.cfg.ks == [6, 3]  # the first layer keeps twice k by default
    summary = json.loads((full / "summary.json").read_text())
    assert summary["val/l0"] == 9 and summary["layer_k"] == [6, 3] and summary["val/l0_L0"] == 6
    assert {"val/fvu_L0", "val/fvu_L1", "ridge_val_fvu_L0", "ridge_val_fvu_L1"} <= set(summary)
    table = CliRunner().invoke(summarize_cli.main, [str(full)])
    assert table.exit_code == 0 and "6/3" in table.output.splitlines()[1]  # the k column, layer by layer
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("val/fvu_L1" in r and "val/dead_fraction_L0" in r for r in records)
    ctrl_c_at_step(5)
    assert _cli(layers_run).exit_code == 130
    monkeypatch.undo()
    assert _cli(layers_run, "--resume").exit_code == 0
    resumed = sorted((layers_run / "clt" / "clt_runs" / "clt_multilayer").iterdir())[-1]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_run_started_before_the_k_schedule_resumes_as_it_started(layers_run, monkeypatch, ctrl_c_at_step):
    ctrl_c_at_step(5)
    assert _cli(layers_run).exit_code == 130
    monkeypatch.undo()
    folder = sorted((layers_run / "clt" / "clt_runs" / "clt_multilayer").iterdir())[-1]
    saved = json.loads((folder / "train_cfg.json").read_text())
    old = {key: value for key, value in saved.items() if key not in ("k_start", "k_anneal", "layer_k")}
    (folder / "train_cfg.json").write_text(json.dumps(old))  # as such a run wrote it
    assert _cli(layers_run, "--resume").exit_code == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["layer_k"] == [3, 3] and summary["val/l0"] == 6  # one k in every layer, as it started
    resumed = json.loads((folder / "train_cfg.json").read_text())
    assert resumed["k_anneal"] == 0 and resumed["layer_k"] == [3, 3]  # and so again on a later resume


def test_both_transcoders_have_the_named_interface_and_log_weights_trains_the_multilayer_clt(layers_run):
    from clt.model import CrossLayerTranscoder, Transcoder, TranscoderConfig

    assert isinstance(_model(), Transcoder) and isinstance(CrossLayerTranscoder(TranscoderConfig(6, 6)), Transcoder)
    encoder, decoder = _model().row_norms()
    assert encoder.shape == decoder.shape == (3 * 24,)
    torch.testing.assert_close(decoder, torch.ones(72))  # unit norm across the layers a feature writes to
    result = _cli(layers_run, "--log_weights")
    assert result.exit_code == 0, result.output
    folder = max((layers_run / "clt" / "clt_runs" / "clt_multilayer").iterdir())  # the run just made
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "weights/decoder_row_norm" in r]
    assert len(logged) == 2 and sum(logged[0]["weights/encoder_row_norm"]["counts"]) == 2 * 16 * 2


def test_multilayer_cli_errors(layers_run):
    result = _cli(layers_run, "--pair", "clt_L0_to_L1")
    assert result.exit_code == 2 and "give --pair, or --multilayer" in result.output
    result = _cli(layers_run, "--activation", "relu")
    assert result.exit_code == 1 and "multi-layer transcoder trains topk" in result.output
    result = _cli(layers_run, "--layer_k", "4,4,4")
    assert result.exit_code == 1 and "layer_k needs 2 values in [1, 32], got [4, 4, 4]" in result.output
    result = _cli(layers_run, "--activation", "jumprelu", "--layer_k", "4,4")
    assert result.exit_code == 1 and "layer_k is for topk and batchtopk" in result.output
    result = CliRunner().invoke(
        train_cli.main, ["--run_dir", str(layers_run), "--pair", "clt_L0_to_L1", "--layer_k", "4"]
    )
    assert result.exit_code == 1 and "--layer_k and --layer_weights are for the multi-layer CLT" in result.output


def test_layer_k_sets_each_layers_active_features(layers_run):
    from clt.train_transcoder import TranscoderTrainConfig, run

    folder = run(TranscoderTrainConfig(str(layers_run), "clt_multilayer", expansion_factor=2, k=3, layer_k=[2, 5],
                                       batch_size=64, num_epochs=1, wandb_mode="disabled"))  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["layer_k"] == [2, 5] and summary["val/l0_L0"] <= 2 and summary["val/l0_L1"] > 3
    xs = torch.randn(2, 10, 16)
    codes = load_transcoder(folder).encode(xs)
    assert ((codes[0] != 0).sum(-1) <= 2).all() and ((codes[1] != 0).sum(-1) <= 5).all()


def test_whole_model_splice_reproduces_tours_with_error_terms(layers_run):
    from clt import eval as eval_cli
    from clt.train_transcoder import TranscoderTrainConfig, run

    folder = run(TranscoderTrainConfig(str(layers_run), "clt_multilayer", expansion_factor=2, k=3, batch_size=64,
                                       num_epochs=1, wandb_mode="disabled"))  # fmt: skip
    args = ["--clt_dir", str(folder), "--num_instances", "12", "--label_instances", "20", "--batch_size", "6", "--json"]
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert set(report["reconstruction"]) == {"L0", "L1"}
    splice = report["splice"]
    exact = splice["transcoder+error"]
    assert exact["same_tour_fraction"] == 1.0 and exact["action_agreement"] == 1.0 and exact["mean_kl"] < 1e-6
    assert {"transcoder", "mean", "zero", "transcoder L0 only", "transcoder L1 only"} <= set(splice)
    assert "recovered" in splice["transcoder"]
    assert (folder / "eval" / "metrics.json").is_file()


def test_two_ranks_train_the_multilayer_clt_like_one_process(layers_run):
    from clt.train_transcoder import TranscoderTrainConfig, run

    single = run(TranscoderTrainConfig(str(layers_run), "clt_multilayer", expansion_factor=2, k=3, batch_size=64,
                                       num_epochs=1, wandb_mode="disabled"))  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "clt.train_transcoder", "--run_dir", str(layers_run), "--multilayer",
               "--expansion_factor", "2", "--k", "3", "--batch_size", "64", "--num_epochs", "1",
               "--wandb_mode", "disabled"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = result.stdout.split("transcoder saved in ")[1].strip()
    a, b = load_file(str(single / "model.safetensors")), load_file(f"{two}/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_batchtopk_per_layer_and_layer_weights():
    from clt.train_transcoder import train_step

    model = _model(activation="batchtopk", layer_weights=[1.0, 0.0, 2.0])
    xs, ys = torch.randn(3, 16, 6), torch.randn(3, 16, 6)
    out = model.forward_train(xs)
    assert all((c.values > 0).sum() <= 3 * 16 for c in out.codes) and (model.batchtopk_threshold > 0).all()
    model.eval()
    for i, codes in enumerate(model.encode_normalized(xs)):
        pre = torch.addmm(model.b_enc[i], xs[i], model.W_enc[i].T)
        assert codes.values.numel() == (pre > model.batchtopk_threshold[i]).sum()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    counters = torch.zeros(model.feature_count, dtype=torch.long)
    assert train_step(model, opt, xs, ys, counters) is not None
    assert model.b_dec.grad[1].abs().sum() == 0 and model.b_dec.grad[2].abs().sum() > 0  # layer 1 weighs 0
    with pytest.raises(ValueError, match="layer_weights"):
        MultiLayerConfig(n_layers=3, d=6, layer_weights=[1.0, 1.0])


def test_jumprelu_learns_thresholds_under_the_cross_layer_penalty():
    from clt.train_transcoder import train_step

    model = _model(activation="jumprelu", jumprelu_threshold=0.3, bandwidth=0.5, sparsity_coef=0.1)
    xs, ys = torch.randn(3, 32, 6), torch.randn(3, 32, 6)
    out = model.forward_train(xs)
    norms = [w.norm(dim=(1, 2)) for w in model.W_dec]
    expected = 0.1 * sum(torch.tanh(z * n).sum(-1).mean() for z, n in zip(out.zs, norms, strict=True))
    torch.testing.assert_close(model.sparsity_loss(out), expected)
    assert all(((z == 0) | (z > 0.3)).all() for z in out.zs)
    before = model.log_threshold.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    counters = torch.zeros(model.feature_count, dtype=torch.long)
    assert train_step(model, opt, xs, ys, counters) is not None
    assert not torch.equal(model.log_threshold, before) and not model.unit_norm_decoder
    model.eval()
    codes = model.encode_normalized(xs)
    assert [c.values.numel() for c in codes] == [int((z != 0).sum()) for z in model.forward_train(xs).zs]


def test_a_multilayer_clt_trains_and_evaluates_on_another_conditions_dumps(layers_run, tmp_path):
    from clt import eval as eval_cli

    run = tmp_path / "tiny"
    shutil.copytree(layers_run, run, ignore=shutil.ignore_patterns("clt_runs"))
    pairs = "encoder_layer_0.mlp_in:encoder_layer_0.mlp_out,encoder_layer_1.mlp_in:encoder_layer_1.mlp_out"
    args = ["--run_dir", str(run), "--layer_pairs", pairs, "--num_instances_per_pair", "60", "--distribution", "mixed"]
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
    result = _cli(run, "--condition", "mixed_n10_e1_seed0")
    assert result.exit_code == 0, result.output
    for own in ("clt_L0.mlp_in_to_L0.mlp_out", "clt_L1.mlp_in_to_L1.mlp_out"):
        shutil.rmtree(run / "clt" / "activations" / own)  # evaluation must read the mixed dumps, not these
    folder = max((run / "clt" / "clt_runs" / "clt_multilayer").iterdir())
    result = CliRunner().invoke(
        eval_cli.main, ["--clt_dir", str(folder), "--num_instances", "4", "--label_instances", "20", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["validation_rows"] > 0
