import json

import pytest
import torch
from safetensors.torch import save_file

from policy.loading import load_policy
from policy.runs import list_checkpoints, resolve_run_dir
from sae.runs import activations_root, clt_activations_dir, sae_activations_dir, sae_runs_dir


@pytest.mark.parametrize("name", ["../outside", "..", "a/../../b"])
def test_run_names_that_escape_runs_are_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)):
        resolve_run_dir(name)


def test_bare_names_resolve_under_runs_and_the_packaged_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    assert resolve_run_dir("mine").resolve() == (tmp_path / "runs" / "mine").resolve()
    assert resolve_run_dir("tsp20_demo").name == "tsp20_demo"
    with pytest.raises(FileNotFoundError, match="runs found: .*mine"):
        resolve_run_dir("absent")


def test_output_paths_and_external_root(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r"
    assert sae_activations_dir(run, "d") == run / "sae" / "activations" / "d"
    assert sae_runs_dir(run, "encoder_layer_1.mlp_in") == run / "sae" / "sae_runs" / "encoder_layer_1.mlp_in"
    assert (
        clt_activations_dir(run, "clt_L0_to_L2", tmp_path / "ext")
        == tmp_path / "ext" / "r" / "clt" / "activations" / "clt_L0_to_L2"
    )
    with pytest.raises(ValueError, match="invalid pair name"):
        clt_activations_dir(run, "../x")
    monkeypatch.setenv("ACTIVATIONS_ROOT", str(tmp_path / "env"))
    assert activations_root() == (tmp_path / "env").resolve()
    assert activations_root(tmp_path / "flag") == (tmp_path / "flag").resolve()
    monkeypatch.delenv("ACTIVATIONS_ROOT")
    assert activations_root() is None


def test_native_checkpoints_are_listed_and_bad_weights_explained(tiny_run, tmp_path):
    assert list(list_checkpoints(tiny_run)) == [1]
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.json").write_text((tiny_run / "config.json").read_text())
    save_file({"init_embed.weight": torch.zeros(3, 2)}, str(broken / "checkpoints" / "epoch_2.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        load_policy(broken)
    (broken / "checkpoints" / "epoch_2.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_policy(broken)
    (broken / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="neither a native config"):
        load_policy(broken)
