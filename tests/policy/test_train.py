"""Training: resuming after a kill or an interrupt gives the weights of an uninterrupted run."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import policy.train as train_mod
from policy.logger import RunLogger
from policy.model import PolicyConfig
from policy.signals import Interrupted
from policy.train import TrainConfig, run


def _cfg(tmp_path, name, **kw):
    policy = PolicyConfig(embed_dim=16, num_encoder_layers=2, num_heads=4, ff_hidden=32)
    base = dict(run_name=name, runs_dir=str(tmp_path), num_loc=8, policy=policy, batch_size=4, epochs=2,
                instances_per_epoch=12, val_size=8, wandb_mode="disabled", seed=7)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _weights(run_dir, epoch):
    return load_file(str(run_dir / "checkpoints" / f"epoch_{epoch}.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_run_layout_and_metrics(tmp_path):
    run_dir = run(_cfg(tmp_path, "full"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch_1.safetensors",
        "epoch_2.safetensors",
        "train_state.pt",
    ]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["policy"]["embed_dim"] == 16 and config["env"] == {"num_loc": 8, "distribution": "uniform"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val/greedy_length" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert (run_dir / "val_locs.npy").is_file()


def test_resume_after_a_kill_between_epochs_matches_uninterrupted(tmp_path):
    full = run(_cfg(tmp_path, "full"))
    run(_cfg(tmp_path, "killed", epochs=1))  # as if killed right after epoch 1
    resumed = run(_cfg(tmp_path, "killed", epochs=2), resume=True, explicit=("epochs",))
    _assert_same(_weights(full, 2), _weights(resumed, 2))
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "a resumed run does not log a step twice"


def _sigint_during_step(monkeypatch, n: int) -> None:
    """SIGINT arrives during the n-th training step (which finishes; the loop stops before the next)."""
    real_step, calls = train_mod.train_step, {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupt)


def test_interrupt_mid_epoch_saves_and_resumes_exactly(tmp_path, monkeypatch):
    full = run(_cfg(tmp_path, "full"))
    _sigint_during_step(monkeypatch, 5)  # epoch 2, step 2 of 3
    with pytest.raises(Interrupted):
        run(_cfg(tmp_path, "ctrl_c"))
    state = torch.load(tmp_path / "ctrl_c" / "checkpoints" / "train_state.pt", weights_only=True)
    assert state["position"] == {"epoch": 1, "step": 2, "global_step": 5}
    monkeypatch.undo()
    resumed = run(_cfg(tmp_path, "ctrl_c"), resume=True)
    _assert_same(_weights(full, 2), _weights(resumed, 2))


def test_a_train_state_saved_before_the_shared_trainer_still_resumes(tmp_path, monkeypatch):
    full = run(_cfg(tmp_path, "full"))
    _sigint_during_step(monkeypatch, 5)
    with pytest.raises(Interrupted):
        run(_cfg(tmp_path, "old"))
    monkeypatch.undo()
    path = tmp_path / "old" / "checkpoints" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    position = state.pop("position")  # the layout policy.train wrote with its own loop
    torch.save({**state, "epoch": position["epoch"], "step_in_epoch": position["step"],
                "global_step": position["global_step"]}, path)  # fmt: skip
    resumed = run(_cfg(tmp_path, "old"), resume=True)
    _assert_same(_weights(full, 2), _weights(resumed, 2))


def test_existing_run_needs_resume(tmp_path):
    run(_cfg(tmp_path, "once", epochs=1))
    with pytest.raises(FileExistsError, match="--resume"):
        run(_cfg(tmp_path, "once", epochs=1))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(_cfg(tmp_path, "never"), resume=True)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs", ""])
def test_run_names_that_escape_are_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="invalid run name"):
        _cfg(tmp_path, name)


def test_a_broken_wandb_never_fails_the_run(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = RunLogger(tmp_path, "p", "r", {}, mode="offline")
    assert logger.wandb_run is None
    logger.log({"x": 1.0}, step=1)
    logger.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "x": 1.0}


def test_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    from policy.logger import resolve_wandb_mode

    monkeypatch.delenv("WANDB_MODE")  # set by the suite's fixture, and auto defers to it
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"


def test_ctrl_c_on_the_cli_saves_then_resume_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "policy.train", "--run_name", "sig", "--runs_dir", str(tmp_path), "--num_loc", "6",
            "--embed_dim", "16", "--num_heads", "4", "--num_encoder_layers", "1", "--batch_size", "2", "--epochs", "1",
            "--instances_per_epoch", "100000", "--val_size", "4", "--wandb_mode", "disabled"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "state saved" in err and "Traceback" not in err
    state = torch.load(tmp_path / "sig" / "checkpoints" / "train_state.pt", weights_only=True)
    assert state["position"]["epoch"] == 0 and state["position"]["step"] >= 50


def test_resume_can_lower_the_learning_rate(tmp_path):
    run(_cfg(tmp_path, "anneal", epochs=1))
    run_dir = run(_cfg(tmp_path, "anneal", epochs=2), resume=True, new_lr=5e-5, explicit=("epochs",))
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 5e-5
    lrs = [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == [1e-4, 5e-5]


def test_resume_keeps_the_saved_epochs_and_refuses_a_finished_run(tmp_path):
    from click.testing import CliRunner

    run(_cfg(tmp_path, "done", epochs=1))
    weights = (tmp_path / "done" / "checkpoints" / "epoch_1.safetensors").read_bytes()
    args = ["--run_name", "done", "--runs_dir", str(tmp_path), "--resume"]
    result = CliRunner().invoke(train_mod.main, args)  # no --epochs: the saved 1, not the CLI default 100
    assert result.exit_code == 1 and "is finished (1 epochs)" in result.output, result.output
    assert (tmp_path / "done" / "checkpoints" / "epoch_1.safetensors").read_bytes() == weights
    result = CliRunner().invoke(train_mod.main, [*args, "--epochs", "2", "--embed_dim", "32"])
    assert result.exit_code == 2 and "shape is fixed by the run" in result.output, result.output
    result = CliRunner().invoke(train_mod.main, [*args, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "done" / "config.json").read_text())["train"]["epochs"] == 2
    _assert_same(_weights(run(_cfg(tmp_path, "straight")), 2), _weights(tmp_path / "done", 2))
