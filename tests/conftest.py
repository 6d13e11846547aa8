from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "rl4co_am_tsp10_d32"
"""RL4CO 0.7's own output for a tiny TSP10 Attention Model (see its README)."""
REPO = Path(__file__).resolve().parents[1]


def _repository_state() -> tuple[list, str | None]:
    """Every file under runs/ (path, size, mtime: outputs there are git-ignored) and `git status` (None outside git)."""
    runs = sorted((str(p.relative_to(REPO)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (REPO / "runs").rglob("*") if p.is_file())  # fmt: skip
    import subprocess

    try:
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return runs, None
    return runs, status.stdout if status.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _repository_untouched():
    """The suite works on copies: after it, `git status` is what it was and nothing under runs/ was written."""
    runs_before, status_before = _repository_state()
    yield
    runs_after, status_after = _repository_state()
    assert runs_after == runs_before, f"the tests wrote under {REPO / 'runs'}: " + ", ".join(
        sorted({r[0] for r in set(runs_after) ^ set(runs_before)})[:5]
    )
    assert status_after == status_before, f"the tests changed the repository:\n{status_after}"


class _WritesOnLoad(torch.nn.Module):
    """A hostile checkpoint: torch.jit.load runs its scripted `__setstate__`, and torch.from_file(path, True, n)
    creates `path`. Saved as TorchScript, it is what `torch.load(weights_only=False)` dispatches to jit.load."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.written = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.written = torch.from_file(self.marker, True, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _write_torchscript_payload(path: Path, marker: Path) -> Path:
    """Save the archive at `path`; loading it with torch.jit.load would create `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(_WritesOnLoad(str(marker))), str(path))
    return path


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """Tests never reach W&B: offline at most."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture
def torchscript_payload():
    """torchscript_payload(path, marker): a TorchScript archive at `path` whose loading would create `marker`."""
    return _write_torchscript_payload


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size): a fresh tmpfs of `size` (e.g. "256k") mounted in tmp_path, unmounted afterwards; skips the test
    where mounting is not allowed (not root, or a sandbox without mount). For disk-full and read-only tests:
    `subprocess.run(["mount", "-o", "remount,ro", path])` makes it read-only."""
    import subprocess

    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode != 0:  # fmt: skip
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def reseal():
    """reseal(dump): a dump whose metadata.json takes its files as they are now (their sha256 recomputed), as if
    written so by its collector; for tests of what reading the rows themselves must catch."""
    import hashlib
    import json

    def seal(dump: Path) -> Path:
        meta = json.loads((dump / "metadata.json").read_text())
        meta["sha256"] = {name: hashlib.sha256((dump / name).read_bytes()).hexdigest() for name in meta["sha256"]
                          if (dump / name).is_file()}  # fmt: skip
        for info in meta["arrays"].values():
            if info.get("covariance_file") and not (dump / info["covariance_file"]).is_file():
                del info["covariance_file"]  # as dumps collected before covariances were stored
        (dump / "metadata.json").write_text(json.dumps(meta))
        (dump / "verified.json").unlink(missing_ok=True)
        return dump

    return seal


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
def tiny_source(tmp_path_factory) -> Path:
    """A tiny policy (d=16, TSP10) trained for one epoch through the CLI, once per session. Never written to:
    fixtures copy it, and tests get their own copy as `tiny_run`, so that no test sees another's outputs."""
    from click.testing import CliRunner

    from policy import train

    runs = tmp_path_factory.mktemp("runs")
    args = ["--run_name", "tiny", "--runs_dir", str(runs), "--num_loc", "10", "--embed_dim", "16", "--num_heads", "4",
            "--num_encoder_layers", "2", "--batch_size", "8", "--epochs", "1", "--instances_per_epoch", "16",
            "--val_size", "8", "--wandb_mode", "disabled"]  # fmt: skip
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    return runs / "tiny"


@pytest.fixture
def tiny_run(tiny_source, tmp_path_factory) -> Path:
    """This test's own copy of the tiny run (`runs/tiny` in a fresh folder)."""
    import shutil

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def analysed_run(tiny_source, tmp_path_factory) -> Path:
    """A copy of the tiny run with what the docs site shows: an SAE on encoder_layer_0, mlp transcoders for
    both layers (evaluated, with splicing), a multi-layer CLT, and one generalisation matrix (the L0 mlp
    transcoder on uniform and clustered instances). Every step goes through its CLI."""
    import shutil

    from click.testing import CliRunner

    from clt import collect_pairs, generalize, train_transcoder
    from clt import eval as clt_eval
    from sae import collect_activations, train_topk

    run_dir = tmp_path_factory.mktemp("analysed") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    small = [
        "--expansion_factor",
        "2",
        "--k",
        "3",
        "--batch_size",
        "64",
        "--num_epochs",
        "2",
        "--wandb_mode",
        "disabled",
    ]
    pairs = "encoder_layer_0.mlp_in:encoder_layer_0.mlp_out,encoder_layer_1.mlp_in:encoder_layer_1.mlp_out"
    steps = [
        (collect_activations.main, ["--hooks", "encoder_layer_0", "--num_instances", "60", "--batch_size", "32"]),
        (train_topk.main, ["--hook", "encoder_layer_0", *small]),
        (collect_pairs.main, ["--layer_pairs", pairs, "--num_instances_per_pair", "60", "--batch_size", "32"]),
        (train_transcoder.main, ["--pair", "clt_L0.mlp_in_to_L0.mlp_out", *small]),
        (train_transcoder.main, ["--pair", "clt_L1.mlp_in_to_L1.mlp_out", *small]),
        (train_transcoder.main, ["--multilayer", *small]),
        (clt_eval.main, ["--pair", "clt_L0.mlp_in_to_L0.mlp_out", "--num_instances", "8", "--label_instances", "20"]),
        (
            generalize.main,
            ["--pair", "clt_L0.mlp_in_to_L0.mlp_out", "--conditions", f"{run_dir},:clustered", "--num_instances", "8"],
        ),
    ]
    for cli, args in steps:
        result = CliRunner().invoke(cli, ["--run_dir", str(run_dir), *args])
        assert result.exit_code == 0, f"{cli.name} {args}: {result.output}"
    return run_dir
