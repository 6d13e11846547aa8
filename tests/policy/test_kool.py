"""Kool et al.'s attention-learn-to-route models: a folder of theirs loads like a run and computes what their code
computes (tests/fixtures/kool_am_tsp20, made by their code; see its README), imports as a native run, and the
shipped runs/kool_tsp20 is that model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from policy import eval as eval_cli
from policy import import_run
from policy.env import tour_length
from policy.loading import load_policy
from sae import collect_activations

KOOL = Path(__file__).resolve().parents[1] / "fixtures" / "kool_am_tsp20"
RL4CO = Path(__file__).resolve().parents[1] / "fixtures" / "rl4co_am_tsp10_d32"


@pytest.fixture(scope="module")
def reference():
    with np.load(KOOL / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def kool_run(tmp_path):
    run = tmp_path / "tsp_20"
    run.mkdir()
    for name in ("args.json", "epoch-99.pt"):
        shutil.copy(KOOL / name, run / name)
    return run


def _check_against_kool(model, reference):
    """Tours identical; encoder outputs within 1e-5; log-likelihoods within 1e-4.

    The log-likelihood bound: Kool's float32 reference itself is that far from the same model run in float64
    (largest 4.5e-5 over these 80 instances, mean 7e-7: noise, not a bias), so 1e-5 would test float32 rounding.
    """
    for n in (20, 50):
        locs = torch.from_numpy(reference[f"locs_n{n}"])
        with torch.no_grad():
            out, h = model(locs), model.encode(locs)
        np.testing.assert_array_equal(out.actions[:, 0].numpy(), reference[f"greedy_tours_n{n}"])
        np.testing.assert_allclose(h.numpy(), reference[f"encoder_output_n{n}"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(out.log_likelihood[:, 0].numpy(), reference[f"greedy_log_likelihood_n{n}"],
                                   rtol=0, atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(tour_length(locs, out.actions[:, 0]).numpy(), reference[f"greedy_cost_n{n}"],
                                   rtol=1e-6)  # fmt: skip


def test_a_kool_folder_loads_and_computes_what_their_code_computes(kool_run, reference):
    loaded = load_policy(kool_run)
    assert loaded.epoch == 99 and loaded.config.num_loc == 20 and loaded.model.cfg.num_heads == 8
    _check_against_kool(loaded.model, reference)


def test_the_shipped_kool_run_is_that_model(reference):
    loaded = load_policy("kool_tsp20")
    assert json.loads((loaded.run_dir / "config.json").read_text())["imported"]["epoch"] == 99
    _check_against_kool(loaded.model, reference)


class _WritesWhenUnpickled:
    """Stands for the model and dataset objects Kool's baseline pickles; unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_full_training_checkpoint_loads_weights_only(kool_run, reference, tmp_path):
    marker = tmp_path / "MARKER"
    weights = torch.load(kool_run / "epoch-99.pt", weights_only=True)["model"]
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    full = {"model": weights, "optimizer": optimizer.state_dict(), "rng_state": torch.get_rng_state(),
            "cuda_rng_state": [], "baseline": {"model": _WritesWhenUnpickled(marker),
                                               "dataset": _WritesWhenUnpickled(marker), "epoch": 99}}  # fmt: skip
    (kool_run / "epoch-99.pt").unlink()
    torch.save(full, kool_run / "epoch-100.pt", _use_new_zipfile_serialization=False)
    loaded = load_policy(kool_run)
    assert loaded.epoch == 100 and not marker.exists()
    _check_against_kool(loaded.model, reference)


def test_commands_run_on_a_kool_folder(kool_run, tmp_path):
    result = CliRunner().invoke(eval_cli.main, ["--run_dir", str(kool_run), "--num_instances", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["checkpoint_epoch"] == 99
    args = ["--run_dir", str(kool_run), "--num_instances", "4", "--hooks", "encoder_layer_2"]
    assert CliRunner().invoke(collect_activations.main, args).exit_code == 0


def test_import_kool_and_rl4co_as_native_runs(kool_run, reference, tmp_path):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        import_run.main, ["--from", str(kool_run), "--run_name", "kool", "--runs_dir", str(runs)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (runs / "kool" / "checkpoints").iterdir()) == ["epoch_99.safetensors"]
    imported = json.loads((runs / "kool" / "config.json").read_text())["imported"]
    assert imported["epoch"] == 99 and len(imported["checkpoint_sha256"]) == 64
    _check_against_kool(load_policy(runs / "kool").model, reference)
    again = CliRunner().invoke(
        import_run.main, ["--from", str(kool_run), "--run_name", "kool", "--runs_dir", str(runs)]
    )
    assert again.exit_code == 1 and "already exists" in again.output
    ckpt = ["--from", str(RL4CO / "am_tiny.ckpt"), "--run_name", "rl4co", "--runs_dir", str(runs)]
    no_size = CliRunner().invoke(import_run.main, ckpt)
    assert no_size.exit_code == 1 and "--num_loc" in no_size.output
    assert CliRunner().invoke(import_run.main, [*ckpt, "--num_loc", "10"]).exit_code == 0
    assert load_policy(runs / "rl4co").model.cfg.num_heads == 4  # read from the checkpoint's hyper-parameters


def test_a_folder_that_is_no_run_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json .nor a Kool args.json."):
        load_policy(tmp_path / "empty")
