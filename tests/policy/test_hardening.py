"""What a careless or hostile input meets: one-line errors, files that stay what they were, settings respected."""

import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from policy import eval as eval_cli
from policy import train as train_cli
from policy.checks import check_device, check_types
from policy.io import write_json
from policy.loading import load_policy
from policy.logger import resolve_wandb_mode
from policy.model import PolicyConfig
from policy.runs import check_name
from policy.torch_files import save_tensors


def test_names_with_a_trailing_newline_are_refused():
    with pytest.raises(ValueError, match="invalid run name"):
        check_name("run\n")
    assert check_name("run.v2-a_b") == "run.v2-a_b"


def test_a_fifo_or_folder_is_never_replaced(tmp_path):
    fifo = tmp_path / "tours.npy"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        write_json(fifo, {})
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(ValueError, match="not a regular file"):
        write_json(tmp_path, {})


def test_safetensors_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(1)})
        write_json(tmp_path / "c.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o644


@pytest.mark.parametrize(("value", "message"), [("128", "embed_dim must be an int"), (None, "embed_dim must be")])
def test_string_and_null_config_values_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(embed_dim=value)


def test_a_run_config_with_a_string_value_is_a_one_line_error(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("sae", "clt"))
    config = json.loads((run / "config.json").read_text())
    config["policy"]["num_heads"] = "4"
    (run / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(eval_cli.main, ["--run_dir", str(run), "--num_instances", "2"])
    assert result.exit_code == 1 and "num_heads must be an int, got '4'" in result.output, result.output


def test_cuda_without_cuda_is_a_one_line_error(tiny_run):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda")
    result = CliRunner().invoke(eval_cli.main, ["--run_dir", str(tiny_run), "--device", "cuda"])
    assert result.exit_code == 1 and "CUDA is not available" in result.output and "Traceback" not in result.output
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")


def test_too_many_samples_are_refused_before_any_allocation(tiny_run):
    args = ["--run_dir", str(tiny_run), "--num_instances", "4", "--num_samples", str(10**9)]
    result = CliRunner().invoke(eval_cli.main, args)
    assert result.exit_code == 1 and "GiB are free: lower --batch_size or --num_samples" in result.output


def test_a_corrupt_train_state_is_a_one_line_error(tmp_path):
    args = ["--run_name", "r", "--runs_dir", str(tmp_path), "--num_loc", "6", "--embed_dim", "16", "--num_heads", "4",
            "--num_encoder_layers", "1", "--batch_size", "4", "--epochs", "1", "--instances_per_epoch", "8",
            "--val_size", "4", "--wandb_mode", "disabled"]  # fmt: skip
    assert CliRunner().invoke(train_cli.main, args).exit_code == 0
    state = tmp_path / "r" / "checkpoints" / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    resume = ["--run_name", "r", "--runs_dir", str(tmp_path), "--resume", "--epochs", "2"]
    result = CliRunner().invoke(train_cli.main, resume)
    assert result.exit_code == 1 and "train_state.pt" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2, result.output  # "resuming ..." and the error


def test_read_only_and_file_roots_are_one_line_errors(tiny_run, tmp_path, tmpfs):
    import shutil
    import subprocess

    from sae import collect_activations

    ro = tmpfs("8m")
    shutil.copytree(tiny_run, ro / "run", ignore=shutil.ignore_patterns("sae", "clt"))
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    load_policy(ro / "run")  # reading works
    args = ["--run_dir", str(ro / "run"), "--num_instances", "4"]
    result = CliRunner().invoke(collect_activations.main, args)
    assert result.exit_code == 1 and "Read-only file system" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    root = tmp_path / "writable_root"  # the dump could be written, the registry could not: nothing is written
    result = CliRunner().invoke(collect_activations.main, [*args, "--activations_root", str(root)])
    assert result.exit_code == 1 and "cannot record dumps" in result.output, result.output
    assert "python -m policy.import_run --from" in result.output
    assert not root.exists() or not any(root.rglob("metadata.json"))
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(collect_activations.main, ["--run_dir", str(tiny_run), "--num_instances", "4",
                                                           "--activations_root", str(tmp_path / "a_file")])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output


def test_wandb_mode_in_the_environment_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    for env, expected in [("offline", "offline"), ("disabled", "disabled"), ("online", "online")]:
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_wandb_mode("auto") == expected
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("offline") == "offline"  # an explicit --wandb_mode wins


def test_types_of_optional_fields():
    from dataclasses import dataclass

    @dataclass
    class C:
        a: int | None = None
        b: float = 1.0
        c: bool = False

    check_types(C(a=None, b=2))
    for bad in (C(a="1"), C(b="x"), C(a=True), C(c=1)):
        with pytest.raises(ValueError):
            check_types(bad)


def test_names_too_long_for_the_file_system_are_one_line_errors(tiny_run, tmp_path):
    from sae import collect_activations

    root = tmp_path / ("a" * 300)  # one path component longer than any file system allows
    args = ["--run_dir", str(tiny_run), "--num_instances", "4", "--activations_root", str(root)]
    result = CliRunner().invoke(collect_activations.main, args)
    assert result.exit_code == 1 and "File name too long" in result.output and "Traceback" not in result.output


def test_disk_full_while_saving_weights_is_one_line_and_leaves_no_temp_file(analysed_run, tmp_path, monkeypatch):
    import errno
    import shutil

    import policy.torch_files
    from sae import train_topk

    run = tmp_path / "run"
    shutil.copytree(analysed_run, run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(policy.torch_files, "save_file", full)
    args = ["--run_dir", str(run), "--hook", "encoder_layer_0", "--k", "2", "--expansion_factor", "2",
            "--num_epochs", "1", "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    result = CliRunner().invoke(train_topk.main, args)
    assert result.exit_code == 1 and result.output.strip().endswith("No space left on device"), result.output
    assert not list(run.rglob("*.tmp"))


def test_a_full_disk_while_saving_a_train_state_is_one_line_and_leaves_no_temp_file(tmpfs):
    from policy.torch_files import save_torch

    small = tmpfs("64k")
    with pytest.raises(OSError, match="could not write .*state.pt .*is the disk full"):
        save_torch(small / "state.pt", {"weights": torch.zeros(100_000)})
    assert list(small.iterdir()) == []


def test_tours_that_are_not_permutations_are_never_returned():
    from policy.inference import check_tours

    check_tours(torch.tensor([[0, 2, 1]]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"no valid tour for instance\(s\) \[1\]"):
        check_tours(torch.tensor([[0, 2, 1], [0, 0, 0]]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"instance\(s\) \[0\]"):
        check_tours(torch.tensor([[0, 2, 1]]), torch.tensor([float("nan")]))
