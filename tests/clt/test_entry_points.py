"""`python -m clt.describe model|dump`, also reached as `python -m clt.model` (a transcoder's summary) and `python -m
clt.datasets` (a dump's statistics and throughput)."""

import json
import subprocess
import sys

from clt.train_transcoder import TranscoderTrainConfig, run

PAIR = "clt_L0.mlp_in_to_L0.mlp_out"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_clt_model_summarises_a_transcoder(pair_run):
    folder = run(TranscoderTrainConfig(run_dir=str(pair_run), pair=PAIR, expansion_factor=4, k=4, batch_size=64,
                                       num_epochs=1, wandb_mode="disabled"))  # fmt: skip
    shown = _cli("clt.model", "--clt_dir", folder)
    assert shown.returncode == 0, shown.stderr
    assert "pairwise transcoder" in shown.stdout and "d_in=16 -> d_out=16, 64 features" in shown.stdout
    assert "validation FVU" in shown.stdout and "decoder row norms: min 1, median 1, max 1" in shown.stdout
    summary = json.loads(_cli("clt.model", "--run_dir", pair_run, "--pair", PAIR, "--json").stdout)
    assert summary["folder"] == str(folder) and summary["k"] == 4 and summary["parameters"] == 64 * 16 * 2 + 64 + 16
    assert json.loads(_cli("clt.describe", "model", "--run_dir", pair_run, "--pair", PAIR, "--json").stdout) == summary
    missing = _cli("clt.model", "--clt_dir", pair_run / "nowhere")
    assert missing.returncode == 1 and "needs cfg.json and model.safetensors" in missing.stderr


def test_clt_datasets_reports_statistics_and_throughput(pair_run):
    shown = _cli("clt.datasets", "--run_dir", pair_run, "--pair", PAIR, "--batch_size", "64", "--batches", "3")
    assert shown.returncode == 0, shown.stderr
    assert "600 rows = 60 instances x 10" in shown.stdout and "rows/s" in shown.stdout
    summary = json.loads(
        _cli("clt.datasets", "--run_dir", pair_run, "--pair", PAIR, "--batch_size", "64", "--json").stdout
    )
    assert summary["train_instances"] + summary["val_instances"] == 60 and summary["sources"]["dim"] == 16
    assert summary["stream"]["rows"] == 20 * 64 or summary["stream"]["batches"] <= 20
    assert summary["stream"]["rows_per_s"] > 0
    again = _cli("clt.describe", "dump", "--run_dir", pair_run, "--pair", PAIR, "--batch_size", "64", "--batches", "0")
    assert again.returncode == 0 and "600 rows = 60 instances x 10" in again.stdout
    bad = _cli("clt.datasets", "--run_dir", pair_run, "--pair", "clt_L1_to_L2")
    assert bad.returncode == 1 and "no data for pair 'clt_L1_to_L2'" in bad.stderr
