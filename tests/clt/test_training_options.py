"""The trainer's structured and geometric options through the CLI: group lasso (fixed groups and one per attention
head), whitening from the dump's covariance, the cosine-alignment term, dictionary penalties, weight artifacts."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import train_transcoder as train_cli
from clt.groups import head_blocks, init_head_groups_
from clt.model import CrossLayerTranscoder, TranscoderConfig, load_transcoder
from clt.normalization import whitening
from clt.train_transcoder import train_step
from policy.loading import load_policy
from sae.store import open_dump

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"
ATTN = "clt_L1.input_to_L1.attn_out"


def _train(run_dir, *extra, pair=PAIR):
    args = ["--run_dir", str(run_dir), "--pair", pair, "--expansion_factor", "4", "--k", "4", "--batch_size", "64",
            "--num_epochs", "3", "--wandb_mode", "disabled", *map(str, extra)]  # fmt: skip
    result = CliRunner().invoke(train_cli.main, args)
    assert result.exit_code == 0, result.output
    folder = sorted((run_dir / "clt" / "clt_runs" / pair).iterdir())[-1]
    return folder, json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def attn_run(pair_run, tmp_path_factory):
    """The tiny run with an attention-output pair (layer 1's input -> its attn_out) collected too."""
    run_dir = tmp_path_factory.mktemp("attn_pair") / "tiny"
    shutil.copytree(pair_run, run_dir)
    args = ["--run_dir", str(run_dir), "--layer_pairs", "encoder_layer_1.input:encoder_layer_1.attn_out",
            "--num_instances_per_pair", "60"]  # fmt: skip
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
    return run_dir


def test_group_lasso_switches_whole_groups_off(pair_run):
    """At about the same L0, the group lasso's active features sit in whole groups (~3.5 per active group of 8),
    an L1 penalty's are scattered (~1.4 per group): the groups it leaves active are fewer."""
    common = ("--activation", "relu", "--group_size", "8", "--num_epochs", "30")
    _, scattered = _train(pair_run, *common, "--l1_coef", "0.05")
    _, grouped = _train(pair_run, *common, "--group_coef", "0.3")
    assert grouped["val/l0"] < 1.5 * scattered["val/l0"]
    assert grouped["val/group_l0"] < 0.7 * scattered["val/group_l0"]
    per_group = {name: r["val/l0"] / r["val/group_l0"] for name, r in (("l1", scattered), ("group", grouped))}
    assert per_group["group"] > 2 * per_group["l1"]
    records = (sorted((pair_run / "clt" / "clt_runs" / PAIR).iterdir())[-1] / "metrics.jsonl").read_text()
    assert "train/group_l0" in records
    bad = CliRunner().invoke(train_cli.main, ["--run_dir", str(pair_run), "--pair", PAIR, "--group_coef", "0.1"])
    assert bad.exit_code == 1 and "--group_coef needs --group_size or --group_heads" in bad.output
    records = (sorted((pair_run / "clt" / "clt_runs" / PAIR).iterdir())[-1] / "metrics.jsonl").read_text()
    assert "train/group_l0" in records
    bad = CliRunner().invoke(train_cli.main, ["--run_dir", str(pair_run), "--pair", PAIR, "--group_coef", "0.1"])
    assert bad.exit_code == 1 and "--group_coef needs --group_size or --group_heads" in bad.output


def test_group_penalty_is_the_sum_of_group_norms():
    model = CrossLayerTranscoder(TranscoderConfig(d_in=4, d_out=4, expansion_factor=2, activation="relu",
                                                  l1_coef=0.0, group_size=3, group_coef=0.5))  # fmt: skip
    out = model.forward_normalized(torch.randn(5, 4))
    z = out.z.detach()
    groups = [z[:, i : i + 3] for i in range(0, 8, 3)]  # 8 features: groups of 3, 3 and 2
    expected = 0.5 * sum(g.norm(dim=1) for g in groups).mean()
    torch.testing.assert_close(model.sparsity_loss(out), expected)


def test_head_groups_start_in_their_head_output_space(attn_run):
    folder, summary = _train(attn_run, "--group_heads", "--group_coef", "0.01", "--num_epochs", "1", pair=ATTN)
    model = load_transcoder(folder)
    assert model.cfg.group_size == 16 and "val/group_l0" in summary  # 64 features, 4 heads
    blocks = head_blocks(load_policy(attn_run).model, "encoder_layer_1.attn_out")
    assert len(blocks) == 4
    fresh = CrossLayerTranscoder(model.cfg)
    fresh.set_statistics(*(getattr(model, n) for n in ("src_mean", "src_std", "tgt_mean", "tgt_std")))
    init_head_groups_(fresh, blocks)
    raw = fresh.raw_decoder()
    for h, block in enumerate(blocks):
        basis, _ = torch.linalg.qr(block)
        rows = raw[16 * h : 16 * (h + 1)]
        torch.testing.assert_close(rows @ basis @ basis.T, rows, atol=1e-5, rtol=1e-4)  # inside head h's space
    torch.testing.assert_close(fresh.W_dec.norm(dim=1), torch.ones(64))
    bad = CliRunner().invoke(train_cli.main, ["--run_dir", str(attn_run), "--pair", PAIR, "--group_heads",
                                              "--wandb_mode", "disabled"])  # fmt: skip
    assert bad.exit_code == 1 and "needs a pair whose target is an attention output" in bad.output


def test_whitening_from_the_stored_covariance(pair_run, tmp_path, reseal):
    folder, summary = _train(pair_run, "--normalize_source", "whiten", "--normalize_target", "whiten")
    model = load_transcoder(folder)
    dump = open_dump(pair_run / "clt" / "activations" / PAIR)
    x = torch.from_numpy(np.array(dump.arrays["sources"])).float()
    white = model.normalize_source(x)
    cov = torch.cov(white.T.double(), correction=0)
    values = torch.linalg.eigvalsh(torch.from_numpy(dump.covariance("sources")))
    full = (values > 1e-3 * values.max()).sum().item()  # directions above the floor come out with unit variance
    assert torch.linalg.eigvalsh(cov)[-full:].sub(1).abs().max() < 1e-3
    y = torch.from_numpy(np.array(dump.arrays["targets"][:50])).float()
    torch.testing.assert_close(model.denormalize_target(model.normalize_target(y)), y, atol=1e-4, rtol=1e-4)
    pre = model.pre_activations(white[:7])  # raw_encoder reads raw sources
    torch.testing.assert_close(pre, (x[:7] - model.src_mean) @ model.raw_encoder().T + model.b_enc, atol=1e-4, rtol=0)
    assert np.isfinite(summary["val/fvu"])
    w, w_inv = whitening(dump.covariance("sources"), 1e-3)
    torch.testing.assert_close(w @ w_inv, torch.eye(16), atol=1e-4, rtol=0)
    old = tmp_path / "tiny"
    shutil.copytree(pair_run, old)
    (old / "clt" / "activations" / PAIR / "sources_covariance.npy").unlink()
    reseal(old / "clt" / "activations" / PAIR)
    bad = CliRunner().invoke(train_cli.main, ["--run_dir", str(old), "--pair", PAIR, "--normalize_source", "whiten",
                                              "--wandb_mode", "disabled"])  # fmt: skip
    assert bad.exit_code == 1 and "collect it again with --overwrite to whiten" in bad.output


def test_alignment_term_adds_the_mean_cosine_gap():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 6)
    losses = []
    for coef in (0.0, 2.0):
        model = CrossLayerTranscoder(TranscoderConfig(d_in=6, d_out=6, expansion_factor=2, k=3, align_coef=coef,
                                                      normalize_source="none", normalize_target="none"))  # fmt: skip
        torch.manual_seed(1)
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        y_hat = model.forward_normalized(x).y_hat.detach()
        stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, torch.zeros(12, dtype=torch.long))
        losses.append(stats["loss"])
    gap = (1 - torch.nn.functional.cosine_similarity(y_hat, y, dim=-1)).mean().item()
    assert losses[1] - losses[0] == pytest.approx(2.0 * gap, rel=1e-4)


def test_alignment_through_the_cli(pair_run):
    folder, summary = _train(pair_run, "--align_coef", "0.5")
    assert load_transcoder(folder).cfg.align_coef == 0.5 and np.isfinite(summary["val/fvu"])


def test_dictionary_penalty_through_the_cli(pair_run):
    sums = {}
    for penalty, coef in (("none", "0"), ("l1", "0.05")):
        folder, _ = _train(pair_run, "--activation", "relu", "--dictionary_penalty", penalty, "--dictionary_coef", coef)
        sums[penalty] = load_transcoder(folder).W_dec.abs().sum().item()
    assert sums["l1"] < 0.8 * sums["none"]


def test_log_weights_logs_each_checkpoint_as_an_artifact(pair_run, monkeypatch, tmp_path):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    args = ["--run_dir", str(pair_run), "--pair", PAIR, "--expansion_factor", "4", "--k", "4", "--batch_size", "64",
            "--num_epochs", "2", "--log_weights", "--wandb_mode", "offline"]  # fmt: skip
    result = CliRunner().invoke(train_cli.main, args)
    assert result.exit_code == 0, result.output
    folder = sorted((pair_run / "clt" / "clt_runs" / PAIR).iterdir())[-1]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [r["artifact"] for r in records if "artifact" in r]
    assert [(a["name"], a["alias"], a["file"]) for a in logged] == [
        (f"{PAIR}-weights", f"epoch_{e}", f"epoch_{e}.safetensors") for e in (1, 2)
    ]
    offline = list((tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb"))  # $WANDB_DIR is respected
    assert offline and f"{PAIR}-weights".encode() in offline[0].read_bytes() and not (folder / "wandb").exists()
    which = json.loads((folder / "wandb.json").read_text())  # which W&B run this is, readable without W&B
    assert which["mode"] == "offline" and which["id"] in offline[0].name
    assert json.loads((folder / "summary.json").read_text())["wandb"] == which


def test_log_every_sets_how_often_training_metrics_are_logged(pair_run):
    """The tiny pair has a few steps an epoch: logging every step gives one training record per step."""
    folder, summary = _train(pair_run, "--log_every", "1")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if any(key.startswith("train/") for key in r)]
    assert steps == list(range(1, summary["steps"] + 1))
    assert json.loads((folder / "wandb.json").read_text()) == {"mode": "disabled"}
    bad = CliRunner().invoke(train_cli.main, ["--run_dir", str(pair_run), "--pair", PAIR, "--log_every", "0"])
    assert bad.exit_code == 1 and "log_every must be at least 1" in bad.output
