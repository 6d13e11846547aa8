from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "rl4co_am_tsp10_d32"
"""RL4CO 0.7's own output for a tiny TSP10 Attention Model (see its README)."""


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """Tests never reach W&B: offline at most."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture
def rl4co_fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE_DIR / "fixture.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def tiny_cfg():
    from policy.model import PolicyConfig

    return PolicyConfig(embed_dim=16, num_encoder_layers=2, num_heads=4, ff_hidden=32)


@pytest.fixture
def tiny_model(tiny_cfg):
    from policy.model import AttentionModel

    torch.manual_seed(0)
    return AttentionModel(tiny_cfg).eval()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny policy (d=16, TSP10) trained for one epoch through the CLI."""
    from click.testing import CliRunner

    from policy import train

    runs = tmp_path_factory.mktemp("runs")
    args = ["--run_name", "tiny", "--runs_dir", str(runs), "--num_loc", "10", "--embed_dim", "16", "--num_heads", "4",
            "--num_encoder_layers", "2", "--batch_size", "8", "--epochs", "1", "--instances_per_epoch", "16",
            "--val_size", "8", "--wandb_mode", "disabled"]  # fmt: skip
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    return runs / "tiny"
