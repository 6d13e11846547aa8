"""clt.train_transcoder end to end: the CLI's folder and report, exact resume after Ctrl-C and kill -9, clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from clt import summarize as summarize_cli
from clt import train_transcoder as train_cli
from clt.model import load_transcoder
from clt.site import export as export_cli
from clt.train_transcoder import TranscoderTrainConfig, k_at, k_schedule_start, lr_factor, run
from policy.signals import Interrupted

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"


def _args(run_dir, *extra):
    return ["--run_dir", str(run_dir), "--pair", PAIR, "--expansion_factor", "4", "--k", "4", "--batch_size", "64",
            "--num_epochs", "3", "--wandb_mode", "disabled", *map(str, extra)]  # fmt: skip


def _cfg(run_dir, **kw):
    base = dict(run_dir=str(run_dir), pair=PAIR, expansion_factor=4, k=4, batch_size=64, num_epochs=3,
                state_every=2, wandb_mode="disabled")  # fmt: skip
    return TranscoderTrainConfig(**{**base, **kw})


def _runs(run_dir):
    return sorted((run_dir / "clt" / "clt_runs" / PAIR).iterdir())


def test_cli_writes_the_run_folder_and_reports_against_ridge(pair_run):
    result = CliRunner().invoke(train_cli.main, _args(pair_run, "--log_weights"))
    assert result.exit_code == 0, result.output
    assert f"{PAIR}: validation FVU" in result.output and "vs ridge baseline" in result.output
    out = _runs(pair_run)[-1]
    assert {"cfg.json", "model.safetensors", "train_cfg.json", "metrics.jsonl", "summary.json"} <= {
        p.name for p in out.iterdir()
    }
    assert {"epoch_1.safetensors", "epoch_3.safetensors", "train_state.pt"} <= {
        p.name for p in (out / "checkpoints").iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/fvu" in r]
    assert len(val) == 3 and {"val/l0", "val/dead_fraction", "val/cosine", "val/mse"} <= set(val[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["val/dense_fraction"] <= 1 and 1 <= summary["val/effective_features"] <= 4 * 16
    assert val[-1]["val/l0"] <= 4 and val[-1]["val/fvu"] < val[0]["val/fvu"]
    histogram = next(r for r in records if "val/log10_feature_frequency" in r)
    assert sum(histogram["val/log10_feature_frequency"]["counts"]) == 4 * 16
    assert "weights/decoder_row_norm" in histogram
    model = load_transcoder(out)
    assert model.cfg.k == 4 and model.cfg.normalize_source == "standard"
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64))  # unit-norm rows (topk)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ridge_val_fvu"] > 0 and summary["val/fvu"] == pytest.approx(val[-1]["val/fvu"], rel=1e-4)


def test_learning_rate_defaults_and_schedule(pair_run):
    assert _cfg(pair_run).lr == 32e-3 and _cfg(pair_run, decoder_init="zero").lr == 8e-3
    assert _cfg(pair_run, activation="jumprelu").lr == 4e-3 and _cfg(pair_run, pair="clt_multilayer").lr == 4e-3
    assert [lr_factor(step, 10, 0.3) for step in range(10)] == pytest.approx([1] * 7 + [1, 2 / 3, 1 / 3])
    assert lr_factor(9, 10, 0.0) == 1.0
    out = run(_cfg(pair_run, lr_decay=0.5))  # 3 epochs of 9 steps
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/lr" in r]
    assert logged and logged[-1]["train/lr"] < 32e-3 * 0.7  # into the decay
    for record in logged:  # logged after the step
        assert record["train/lr"] == pytest.approx(32e-3 * lr_factor(record["step"] - 1, 27, 0.5))
    with pytest.raises(ValueError, match="lr_decay must be in"):
        _cfg(pair_run, lr_decay=1.5)


def test_k_falls_from_k_start_to_k(pair_run):
    assert [k_at(step, 10, 4, 16, 0.5) for step in range(10)] == [16, 14, 11, 9, 6, 4, 4, 4, 4, 4]
    assert k_at(0, 10, 4, 16, 0.0) == 4
    cfg = _cfg(pair_run, k_anneal=0.3)
    assert k_schedule_start(cfg, cfg.model_config(16, 16)) == 16  # 4 x k
    assert _cfg(pair_run).k_anneal == 0 and _cfg(pair_run, pair="clt_multilayer").k_anneal == 0.3
    assert k_schedule_start(_cfg(pair_run), cfg.model_config(16, 16)) is None
    jumprelu = _cfg(pair_run, activation="jumprelu", k_anneal=0.3)
    assert k_schedule_start(jumprelu, jumprelu.model_config(16, 16)) is None
    out = run(_cfg(pair_run, k_start=32, k_anneal=0.5, log_every=1))  # 27 steps, k falls over the first 13.5
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/k" in r]
    assert [r["train/k"] for r in logged] == [k_at(r["step"] - 1, 27, 4, 32, 0.5) for r in logged]
    assert logged[0]["train/k"] == 32 and logged[0]["train/l0"] > 8 and logged[-1]["train/l0"] <= 4
    assert json.loads((out / "train_cfg.json").read_text())["k_start"] == 32
    before = _runs(pair_run)
    with pytest.raises(ValueError, match="k_start must be in"):
        run(_cfg(pair_run, k_start=2, k_anneal=0.3))
    assert _runs(pair_run) == before  # no run folder for a run that cannot start
    with pytest.raises(ValueError, match="k_anneal must be in"):
        _cfg(pair_run, k_anneal=1.0)


def test_pair_given_as_hooks_and_token_budget(pair_run):
    out = run(_cfg(pair_run, pair="encoder_layer_0.mlp_in:encoder_layer_0.mlp_out", num_tokens=200, init="data"))
    assert out.parent.name == PAIR
    assert json.loads((out / "summary.json").read_text())["steps"] == 4  # ceil(200 / 64)


def test_ctrl_c_saves_and_resume_matches_uninterrupted(pair_run, monkeypatch, ctrl_c_at_step):
    full = run(_cfg(pair_run))
    ctrl_c_at_step(5)
    with pytest.raises(Interrupted):
        run(_cfg(pair_run))
    monkeypatch.undo()
    state = torch.load(_runs(pair_run)[-1] / "checkpoints" / "train_state.pt", weights_only=True)
    assert state["position"] == {"epoch": 0, "step": 5, "global_step": 5}
    resumed = run(_cfg(pair_run), resume=True)
    _assert_same_weights(full, resumed)


def test_kill_9_then_resume_matches_uninterrupted(pair_run):
    full = run(_cfg(pair_run, num_epochs=40, batch_size=16, state_every=3))
    before = set(_runs(pair_run))
    command = [sys.executable, "-m", "clt.train_transcoder",
               *_args(pair_run, "--num_epochs", 40, "--batch_size", 16, "--state_every", 3)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(
            (p / "checkpoints" / "train_state.pt").exists() for p in set(_runs(pair_run)) - before
        ):
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    killed = (set(_runs(pair_run)) - before).pop()
    assert not (killed / "model.safetensors").exists(), "the run ended before it could be killed"
    resume = ["--run_dir", str(pair_run), "--pair", PAIR, "--resume"]  # every setting comes from the run itself
    result = CliRunner().invoke(train_cli.main, resume)
    assert result.exit_code == 0, result.output
    _assert_same_weights(full, killed)


def _assert_same_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "pair, message",
    [("../escape", "invalid pair name"), ("clt_L5_to_L6", "pairs collected for tiny: " + PAIR),
     ("encoder_layer_0:encoder_layer_9", "unknown hook")],
)  # fmt: skip
def test_bad_pair_is_a_clear_error(pair_run, pair, message):
    runs = pair_run / "clt" / "clt_runs"
    before = sorted(runs.rglob("*"))
    result = CliRunner().invoke(train_cli.main, [*_args(pair_run)[:2], "--pair", pair, "--wandb_mode", "disabled"])
    assert result.exit_code == 1 and message in result.output
    assert sorted(runs.rglob("*")) == before  # a run that cannot start leaves no (empty) run folder


def test_nan_in_a_batch_is_a_clear_error(pair_run, tmp_path, reseal):
    broken = tmp_path / "tiny"
    shutil.copytree(pair_run, broken)
    sources = np.load(broken / "clt" / "activations" / PAIR / "sources.npy", mmap_mode="r+")
    sources[7, 3] = np.nan  # stats stay finite: only the stream meets it
    sources.flush()
    reseal(broken / "clt" / "activations" / PAIR)  # checksums match too
    registry = broken / "sae" / "activation_store.json"
    registry.write_text(registry.read_text().replace(str(pair_run), str(broken)))
    result = CliRunner().invoke(train_cli.main, _args(broken))
    assert result.exit_code == 1 and "NaN or Inf in the pair's sources at epoch 1" in result.output


def test_train_clt_sh_sweeps_a_grid_records_it_and_prints_the_table(pair_run):
    script = Path(__file__).resolve().parents[2] / "train_clt.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    other = run(_cfg(pair_run, num_epochs=1))  # a run of the same pair outside the sweep
    command = ["bash", str(script), "--run_dir", str(pair_run), "--no_collect", "--pairs", PAIR, "--expansion", "2",
               "--k", "2 4 3", "--epochs", "1", "--eval", "8", "--no_labels", "--jobs", "2", "--sweep", "grid", "--",
               "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    table = lines[-5:-1]
    assert table[0].split()[:5] == ["pair", "act", "features", "k", "lr"]
    assert [line.split()[:4] for line in table[1:]] == [[PAIR, "topk", "32", k] for k in "234"]
    assert all(line.split()[-2].endswith("%") for line in table[1:])  # the splice gap from clt.eval
    assert "--sweep grid --list" in lines[-1]
    assert result.stderr.count("== evaluating") == 2  # three transcoders dealt out to two processes
    record = json.loads((pair_run / "clt" / "sweeps" / "grid.json").read_text())
    swept = [pair_run / p for p in record["runs"]]
    assert len(swept) == 3 and other not in swept and all((f / "eval" / "metrics.json").is_file() for f in swept)
    assert not any((f / "eval" / "labels.json").exists() for f in swept)  # --no_labels reached clt.eval
    listed = CliRunner().invoke(summarize_cli.main, ["--run_dir", str(pair_run), "--sweep", "grid", "--list"])
    assert listed.output.split() == [str(f) for f in swept]
    site = pair_run / "site"
    export = ["--run_dir", str(pair_run), "--sweep", "grid", "--out", str(site), "--num_instances", "8",
              "--features", "2", "--top_instances", "1"]  # fmt: skip
    assert CliRunner().invoke(export_cli.main, export).exit_code == 0
    shown = json.loads((site / "site.json").read_text())["overview"]["dictionaries"]
    transcoders = sorted(row["folder"] for row in shown if row["kind"] == "transcoder")
    assert transcoders == sorted(record["runs"])  # the sweep's, not `other` (SAEs: the newest of each hook)
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--expansion" in usage and "--no_collect" in usage and "--sweep NAME" in usage
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    missing = CliRunner().invoke(summarize_cli.main, ["--run_dir", str(pair_run), "--sweep", "nope"])
    assert missing.exit_code == 1 and "no sweep 'nope'" in missing.output and "grid" in missing.output


def test_train_clt_sh_sweeps_the_config_sparsity_block(pair_run, tmp_path):
    script = Path(__file__).resolve().parents[2] / "train_clt.sh"
    config = tmp_path / "grid.json"
    config.write_text(
        json.dumps(
            {
                "layer_pairs": ["encoder_layer_0.mlp_in:encoder_layer_0.mlp_out"],
                "sparsity": {"expansion_factors": [2], "k_ratio": [0.25, 0.5]},
                "sampling": {},
            }
        )
    )
    command = ["bash", str(script), "--run_dir", str(pair_run), "--no_collect", "--config", str(config),
               "--epochs", "1", "--eval", "0", "--sweep", "from_config",
               "--", "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    swept = json.loads((pair_run / "clt" / "sweeps" / "from_config.json").read_text())["runs"]
    shapes = sorted((load_transcoder(pair_run / f).cfg.n_features, load_transcoder(pair_run / f).cfg.active)
                    for f in swept)  # fmt: skip
    assert shapes == [(32, 8), (32, 16)]  # 2x of d=16, a quarter and a half of them active
    both = subprocess.run([*command[:2], "--k", "4", "--k_ratio", "0.5", *command[2:]], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert both.returncode == 2 and "give --k or --k_ratio, not both" in both.stderr


def test_train_clt_sh_passes_overwrite_to_the_collector(pair_run, tmp_path):
    """A config asking for other collection settings than the existing dump's: refused with the collector's hint,
    collected again with --overwrite."""
    script = Path(__file__).resolve().parents[2] / "train_clt.sh"
    run_dir = tmp_path / "tiny"
    shutil.copytree(pair_run, run_dir, ignore=shutil.ignore_patterns("clt_runs", "sweeps"))
    config = tmp_path / "fewer.json"
    config.write_text(json.dumps({"layer_pairs": ["encoder_layer_0.mlp_in:encoder_layer_0.mlp_out"],
                                  "sparsity": {"expansion_factors": [2], "k": [2]},
                                  "sampling": {"num_instances_per_pair": 40}}))  # fmt: skip
    command = ["bash", str(script), "--run_dir", str(run_dir), "--config", str(config), "--epochs", "1", "--eval", "0",
               "--sweep", "again", "--", "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
    done = subprocess.run([*command[:4], "--overwrite", *command[4:]], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metadata = json.loads((run_dir / "clt" / "activations" / PAIR / "metadata.json").read_text())
    assert metadata["num_instances"] == 40


def test_train_clt_sh_reports_a_failed_parallel_job_and_refuses_zero_jobs(pair_run):
    """With --jobs 2 a failing run's log tail reaches the terminal and the script fails; its sibling still ran."""
    script = Path(__file__).resolve().parents[2] / "train_clt.sh"
    command = ["bash", str(script), "--run_dir", str(pair_run), "--no_collect", "--pairs", PAIR, "--expansion", "2",
               "--k", "2 64", "--epochs", "1", "--eval", "0", "--jobs", "2", "--sweep", "half_bad",
               "--", "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                            timeout=300)  # fmt: skip
    assert result.returncode == 1 and "a job failed" in result.stderr and "64" in result.stderr, result.stderr[-2000:]
    record = json.loads((pair_run / "clt" / "sweeps" / "half_bad.json").read_text())
    assert len(record["runs"]) == 1 and load_transcoder(pair_run / record["runs"][0]).cfg.active == 2
    zero = subprocess.run([*command[:2], "--jobs", "0"], capture_output=True, text=True)
    assert zero.returncode == 2 and "--jobs must be at least 1" in zero.stderr


def test_resume_of_a_finished_run_needs_a_longer_budget(pair_run):
    out = run(_cfg(pair_run, num_epochs=1))
    weights = (out / "model.safetensors").read_bytes()
    resume = ["--run_dir", str(pair_run), "--pair", PAIR, "--resume"]
    result = CliRunner().invoke(train_cli.main, resume)
    assert result.exit_code == 1 and "is finished" in result.output, result.output
    assert (out / "model.safetensors").read_bytes() == weights
    result = CliRunner().invoke(train_cli.main, [*resume, "--num_epochs", "2"])
    assert result.exit_code == 0, result.output
    assert _runs(pair_run)[-1] == out and json.loads((out / "summary.json").read_text())["steps"] == 2 * 9


@pytest.mark.parametrize("option", ["--eval", "--epochs"])
def test_train_clt_sh_never_evaluates_an_option_as_code(tmp_path, option):
    script = Path(__file__).resolve().parents[2] / "train_clt.sh"
    marker = tmp_path / "MARKER"
    command = ["bash", str(script), "--no_collect", "--pairs", PAIR, option, f"K[$(touch {marker})]"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2 and "must be a whole number" in result.stderr, result.stderr
    assert not marker.exists()


def test_a_second_resume_of_a_run_in_training_is_refused(pair_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(pair_run, run_dir)
    first = CliRunner().invoke(train_cli.main, _args(run_dir, "--num_epochs", "1"))
    assert first.exit_code == 0, first.output
    folder = _runs(run_dir)[-1]
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", hold + "; time.sleep(60)", str(folder / ".training.lock")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        holder.stdout.readline()
        second = CliRunner().invoke(train_cli.main, _args(run_dir, "--resume", "--num_epochs", "2"))
    finally:
        holder.kill()
        holder.wait()
    assert second.exit_code == 1 and "is being trained by another process" in second.output, second.output
    metrics = (folder / "metrics.jsonl").read_text()
    assert CliRunner().invoke(train_cli.main, _args(run_dir, "--resume", "--num_epochs", "2")).exit_code == 0
    assert (folder / "metrics.jsonl").read_text().startswith(metrics)  # the refused resume wrote nothing


def test_resume_on_a_dump_collected_again_is_refused_naming_both(pair_run, tmp_path):
    from clt import collect_pairs as collect_cli

    run_dir = tmp_path / "tiny"
    shutil.copytree(pair_run, run_dir)
    assert CliRunner().invoke(train_cli.main, _args(run_dir, "--num_epochs", "1")).exit_code == 0
    saved = json.loads((_runs(run_dir)[-1] / "train_cfg.json").read_text())["datasets"][0]
    args = ["--run_dir", str(run_dir), "--layer_pairs", "encoder_layer_0.mlp_in:encoder_layer_0.mlp_out",
            "--num_instances_per_pair", "40", "--batch_size", "32", "--overwrite"]  # fmt: skip
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0
    result = CliRunner().invoke(train_cli.main, _args(run_dir, "--resume", "--num_epochs", "2"))
    assert result.exit_code == 1 and "--resume of" in result.output and saved["collection_id"] in result.output
    assert "start a new run instead" in result.output, result.output


def test_a_bad_sweep_name_is_refused_before_training_and_leaves_no_folder(pair_run, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(pair_run, run_dir)
    before = sorted((run_dir / "clt").rglob("*"))
    for bad in (["--sweep", "../../x"], ["--lr", "nan"]):
        result = CliRunner().invoke(train_cli.main, _args(run_dir, *bad))
        assert result.exit_code != 0 and ("invalid sweep name" in result.output or "finite" in result.output)
    assert sorted((run_dir / "clt").rglob("*")) == before


def test_train_clt_sh_takes_an_imported_kool_model_with_no_config(tmp_path):
    from policy import import_run

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "kool_am_tsp20"
    args = ["--from", str(fixture), "--run_name", "kool", "--runs_dir", str(tmp_path)]
    assert CliRunner().invoke(import_run.main, args).exit_code == 0
    script = Path(__file__).resolve().parents[2] / "train_clt.sh"
    command = ["bash", str(script), "--run_dir", str(tmp_path / "kool"), "--instances", "24", "--epochs", "1",
               "--eval", "4", "--no_labels", "--jobs", "1", "--sweep", "all", "--", "--batch_size", "128",
               "--wandb_mode", "disabled"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "kool" / "clt" / "sweeps" / "all.json").read_text())
    trained = sorted(Path(p).parent.name for p in record["runs"])
    assert trained == sorted(["clt_multilayer", "clt_L0_to_L1", "clt_L1_to_L2"]
                             + [f"clt_L{i}.mlp_in_to_L{i}.mlp_out" for i in range(3)])  # fmt: skip
    assert all((tmp_path / "kool" / p / "eval" / "metrics.json").is_file() for p in record["runs"])
