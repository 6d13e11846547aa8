"""No file the project reads may run code: a TorchScript archive in place of a checkpoint is refused by every
command that loads a policy or a training state, with a one-line error, and its payload never runs."""

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs, train_transcoder
from clt.site import export as export_docs
from policy import eval as policy_eval
from policy import solve
from policy.loading import load_policy
from policy.rl4co import load_checkpoint
from policy.torch_files import UnsafeFileError, identify, load_torch_file
from sae import collect_activations, train_topk


@pytest.fixture
def hostile_run(tmp_path, torchscript_payload):
    """An RL4CO-style run whose only checkpoint is a TorchScript archive; returns (run, marker)."""
    run, marker = tmp_path / "hostile", tmp_path / "MARKER"
    torchscript_payload(run / "checkpoints" / "checkpoint_epoch_1.ckpt", marker)
    (run / "config.json").write_text(json.dumps({"embed_dim": 16, "n_encoder_layers": 2, "num_heads": 4,
                                                 "num_loc": 10}))  # fmt: skip
    return run, marker


def test_the_payload_is_live(tmp_path, torchscript_payload):
    """The test payload really writes its marker when TorchScript loads it (so the tests below can fail)."""
    marker = tmp_path / "MARKER"
    torch.jit.load(str(torchscript_payload(tmp_path / "x.pt", marker)))
    assert marker.exists()


CLIS = [
    (policy_eval.main, ["--num_instances", "4"]),
    (solve.main, ["--instances", "{tmp}/x.npy", "--out", "{tmp}/tours.npy"]),
    (collect_activations.main, ["--num_instances", "4"]),
    (collect_pairs.main, ["--layer_pairs", "encoder_layer_0:encoder_layer_1", "--num_instances_per_pair", "4"]),
]


@pytest.mark.parametrize(("cli", "args"), CLIS, ids=lambda c: getattr(c, "name", ""))
def test_every_policy_cli_refuses_torchscript(hostile_run, tmp_path, cli, args):
    run, marker = hostile_run
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((2, 10, 2)))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, ["--run_dir", str(run), *args])
    assert result.exit_code == 1, result.output
    assert "TorchScript archive" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not marker.exists()


def test_export_docs_refuses_a_torchscript_checkpoint(analysed_run, tmp_path, torchscript_payload):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(analysed_run, run)
    torchscript_payload(run / "checkpoints" / "checkpoint_epoch_9.ckpt", marker)  # the newest epoch
    result = CliRunner().invoke(export_docs.main, ["--run_dir", str(run), "--out", str(tmp_path / "site")])
    assert result.exit_code == 1 and "TorchScript archive" in result.output, result.output
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint_epoch_1.ckpt", "policy.pt"])
def test_library_loaders_refuse_torchscript(hostile_run, tmp_path, torchscript_payload, name):
    run, marker = hostile_run
    path = torchscript_payload(tmp_path / name, marker)
    with pytest.raises(UnsafeFileError, match="TorchScript archive"):
        load_checkpoint(path)
    with pytest.raises(UnsafeFileError):
        load_policy(run)
    for stub_objects in (False, True):
        with pytest.raises(UnsafeFileError):
            load_torch_file(path, stub_objects=stub_objects)
    assert not marker.exists()


@pytest.mark.parametrize("trainer", ["sae", "clt"])
def test_resume_refuses_a_torchscript_train_state(analysed_run, tmp_path, torchscript_payload, trainer):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(analysed_run, run)
    if trainer == "sae":
        cli, args, folder = train_topk.main, ["--hook", "encoder_layer_0"], run / "sae" / "sae_runs" / "encoder_layer_0"
    else:
        pair = "clt_L0.mlp_in_to_L0.mlp_out"
        cli, args, folder = train_transcoder.main, ["--pair", pair], run / "clt" / "clt_runs" / pair
    state = max(folder.glob("*/checkpoints/train_state.pt"))
    state.unlink()
    torchscript_payload(state, marker)
    result = CliRunner().invoke(cli, ["--run_dir", str(run), *args, "--resume", "--num_epochs", "5"])
    assert result.exit_code == 1 and "TorchScript archive" in result.output, result.output
    assert not marker.exists()


def test_identify_accepts_plain_tensor_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "new.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert identify(tmp_path / "new.pt") == "zip" and identify(tmp_path / "old.pt") == "legacy"
    assert torch.equal(load_torch_file(tmp_path / "old.pt")["w"], torch.ones(2))


def test_identify_refuses_other_files_in_one_line(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "junk").write_bytes(b"not a checkpoint at all")
    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "other.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "a") as archive:  # a torch.save file with one more record
        archive.writestr("other/extra.py", "print('hello')")
    shutil.make_archive(str(tmp_path / "deflated"), "zip", tmp_path, "junk")
    for name, expected in [("junk", "of no known format"), ("w.safetensors", "a safetensors file"),
                           ("other.zip", "not a torch.save tensor file .it holds extra.py"),
                           ("deflated.zip", "a zip archive torch cannot read")]:  # fmt: skip
        with pytest.raises(UnsafeFileError, match=expected) as err:
            identify(tmp_path / name)
        assert "\n" not in str(err.value)
        if name != "other.zip":
            assert "legacy" in str(err.value)  # names the formats it accepts


def test_a_tar_named_like_the_legacy_format_is_refused(tmp_path):
    import io
    import tarfile

    from policy.torch_files import _LEGACY_MAGIC

    name = (b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") + b".").decode("latin-1")
    path = tmp_path / "checkpoint.pt"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert path.read_bytes().startswith(b"\x80\x02\x8a\x0a")  # what passed the legacy check
    with pytest.raises(UnsafeFileError, match="tar archive"):
        identify(path)
