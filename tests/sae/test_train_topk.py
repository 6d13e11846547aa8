"""sae.train_topk end to end: it learns, writes its folder, and resumes exactly."""

import json
import os
import shutil
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import sae.train_topk as trainer
from policy.signals import Interrupted
from sae import collect_activations
from sae.model import load_sae
from sae.train_topk import SAETrainConfig, SAETrainer, run


@pytest.fixture(scope="module")
def dumped_run(tiny_source, tmp_path_factory):
    """A copy of the tiny run with encoder_layer_1's activations dumped."""
    run_dir = tmp_path_factory.mktemp("sae_train") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    args = ["--run_dir", str(run_dir), "--hooks", "encoder_layer_1", "--num_instances", "60", "--name", "sae_data"]
    result = CliRunner().invoke(collect_activations.main, args)
    assert result.exit_code == 0, result.output
    return run_dir


def _cfg(run_dir, **kw):
    base = dict(run_dir=str(run_dir), hook="encoder_layer_1", dataset="sae_data", expansion_factor=2, k=4,
                batch_size=64, num_epochs=2, wandb_mode="disabled", lr=3e-3)  # fmt: skip
    return SAETrainConfig(**{**base, **kw})


def test_cli_trains_and_writes_the_run_folder(dumped_run):
    args = ["--run_dir", str(dumped_run), "--hook", "encoder_layer_1", "--expansion_factor", "2", "--k", "4",
            "--batch_size", "64", "--num_epochs", "3", "--wandb_mode", "disabled", "--lr", "3e-3"]  # fmt: skip
    result = CliRunner().invoke(trainer.main, args)
    assert result.exit_code == 0, result.output
    out = sorted((dumped_run / "sae" / "sae_runs" / "encoder_layer_1").iterdir())[-1]
    assert {"cfg.json", "model.safetensors", "train_cfg.json", "metrics.jsonl", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/fvu" in r]
    assert len(val) == 3 and val[-1]["val/fvu"] < val[0]["val/fvu"] and val[-1]["val/fvu"] < 0.5
    assert val[-1]["val/l0"] <= 4
    assert load_sae(out).cfg.k == 4


def test_resume_after_interrupt_matches_uninterrupted(dumped_run, monkeypatch):
    full = run(_cfg(dumped_run))
    real, calls = SAETrainer.train_step, {"n": 0}

    def interrupt(self, batch):
        calls["n"] += 1
        if calls["n"] == 12:  # Ctrl-C during a step: the step finishes, then the run stops and saves
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(SAETrainer, "train_step", interrupt)
    with pytest.raises(Interrupted):
        run(_cfg(dumped_run))
    monkeypatch.setattr(SAETrainer, "train_step", real)
    resumed = run(_cfg(dumped_run), resume=True)
    assert resumed != full
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_missing_dump_says_how_to_collect(tiny_run):
    with pytest.raises(FileNotFoundError, match="sae.collect_activations"):
        run(_cfg(tiny_run, hook="encoder_layer_0.attn_out", dataset=None))


def _cli(run_dir, *extra):
    args = ["--run_dir", str(run_dir), "--hook", "encoder_layer_1", "--dataset", "sae_data", *map(str, extra)]
    return CliRunner().invoke(trainer.main, args)


def _hook_runs(run_dir):
    return sorted((run_dir / "sae" / "sae_runs" / "encoder_layer_1").iterdir())


def _epochs_logged(out):
    return [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


def test_resume_reads_the_saved_settings_and_refuses_a_finished_run(dumped_run):
    result = _cli(dumped_run, "--k", 4, "--expansion_factor", 2, "--batch_size", 64, "--num_epochs", 2,
                  "--wandb_mode", "disabled")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = _hook_runs(dumped_run)[-1]
    weights = (out / "model.safetensors").read_bytes()
    finished = _cli(dumped_run, "--resume")  # no --num_epochs: the saved 2, not the CLI default 10
    assert finished.exit_code == 1 and "is finished (num_epochs 2)" in finished.output, finished.output
    assert (out / "model.safetensors").read_bytes() == weights
    changed = _cli(dumped_run, "--resume", "--num_epochs", 3, "--k", 8)
    assert changed.exit_code == 1 and "--k 8 differs from the run being resumed (4)" in changed.output
    longer = _cli(dumped_run, "--resume", "--num_epochs", 3)
    assert longer.exit_code == 0, longer.output
    assert _hook_runs(dumped_run)[-1] == out and _epochs_logged(out) == [1, 2, 3]
    assert json.loads((out / "train_cfg.json").read_text())["num_epochs"] == 3  # the next resume's total
    assert load_sae(out).cfg.k == 4


def test_resume_after_a_kill_before_the_first_save_leaves_older_runs_alone(dumped_run):
    result = _cli(dumped_run, "--k", 4, "--expansion_factor", 2, "--num_epochs", 1, "--wandb_mode", "disabled")
    assert result.exit_code == 0, result.output
    older = _hook_runs(dumped_run)[-1]
    weights = (older / "model.safetensors").read_bytes()
    killed = older.with_name(older.name + "_999")  # a newer run killed before it saved anything
    killed.mkdir()
    (killed / "train_cfg.json").write_text((older / "train_cfg.json").read_text())
    try:
        result = _cli(dumped_run, "--resume", "--num_epochs", 5)
        assert result.exit_code == 1 and "has no saved training state" in result.output, result.output
        assert str(killed) in result.output
        assert (older / "model.safetensors").read_bytes() == weights and _epochs_logged(older) == [1]
    finally:
        shutil.rmtree(killed)


def test_dictionary_adam_steps_like_torchs_adam():
    """sae.trainer.adam (both dictionary trainers' optimizer) is fused where this torch has a fused CPU Adam
    (2.4 on) and takes the steps torch's default Adam takes, to float32 rounding."""
    from sae.trainer import adam

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 16)), torch.nn.Parameter(torch.randn(16))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, reference = adam(params, 1e-2), torch.optim.Adam(twins, lr=1e-2)
    version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    assert ours.defaults.get("fused") is (True if version >= (2, 4) else None)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, grad in zip(params, twins, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        for p, q in zip(params, twins, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step}")
