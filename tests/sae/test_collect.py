"""sae.collect_activations end to end: row order, reuse, external root, concurrent collectors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from policy.loading import load_policy
from sae import collect_activations as collect_cli
from sae.hooks import HookedPolicy
from sae.registry import read_registry
from sae.store import open_dump


def _collect(*args, env=None):
    return CliRunner(env=env).invoke(collect_cli.main, [str(a) for a in args])


def test_rows_are_instance_major_and_match_the_hooks(tiny_run, tmp_path):
    root = tmp_path / "external"
    hooks = "encoder_layer_0.mlp_in,encoder_layer_1,decoder.glimpse"
    result = _collect("--run_dir", tiny_run, "--hooks", hooks, "--num_instances", 7, "--batch_size", 3,
                      "--name", "rows", env={"ACTIVATIONS_ROOT": str(root)})  # fmt: skip
    assert result.exit_code == 0, result.output
    path = root / "tiny" / "sae" / "activations" / "rows"
    assert read_registry(tiny_run)["rows"]["path"] == str(path.resolve())
    dump = open_dump(path, verify="always")
    assert dump.metadata["hooks"] == hooks.split(",") and dump.rows == 70 and dump.nodes_per_instance == 10
    locs = torch.from_numpy(np.load(path / "locs.npy"))
    expected = HookedPolicy(load_policy(tiny_run).model).run_with_cache(locs, hooks.split(","))
    for name in hooks.split(","):
        np.testing.assert_allclose(dump.arrays[name], expected[name].reshape(70, -1).numpy(), atol=1e-6)


def test_same_arguments_reuse_and_other_arguments_refuse(tiny_run):
    args = ["--run_dir", tiny_run, "--num_instances", 5, "--name", "reuse"]
    assert _collect(*args).exit_code == 0
    path = tiny_run / "sae" / "activations" / "reuse"
    mtime = (path / "metadata.json").stat().st_mtime_ns
    again = _collect(*args)
    assert again.exit_code == 0 and (path / "metadata.json").stat().st_mtime_ns == mtime
    other = _collect(*args[:-2], "--name", "reuse", "--seed", 1)
    assert other.exit_code == 1 and "--overwrite" in other.output
    assert _collect(*args[:-2], "--name", "reuse", "--seed", 1, "--overwrite").exit_code == 0
    assert open_dump(path).metadata["seed"] == 1


def test_instances_do_not_depend_on_batch_size(tiny_run):
    for name, batch in (("b3", 3), ("b8", 8)):
        assert (
            _collect("--run_dir", tiny_run, "--num_instances", 9, "--batch_size", batch, "--name", name).exit_code == 0
        )
    a = open_dump(tiny_run / "sae" / "activations" / "b3")
    b = open_dump(tiny_run / "sae" / "activations" / "b8")
    np.testing.assert_array_equal(np.load(a.path / "locs.npy"), np.load(b.path / "locs.npy"))
    np.testing.assert_allclose(a.arrays["encoder_layer_1"], b.arrays["encoder_layer_1"], atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hooks", "encoder_layer_7"], "valid names"),
        (["--name", "../escape"], "invalid dataset name"),
        (["--num_instances", "0"], "positive"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_run, args, message):
    result = _collect("--run_dir", tiny_run, *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_two_concurrent_collections_both_register(tiny_run):
    cmd = [sys.executable, "-m", "sae.collect_activations", "--run_dir", str(tiny_run), "--num_instances", "20"]
    env = {**os.environ, "ACTIVATIONS_ROOT": ""}
    procs = [
        subprocess.Popen([*cmd, "--name", f"conc{i}", "--seed", str(i)], env=env, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    registry = json.loads((tiny_run / "sae" / "activation_store.json").read_text())
    assert {"conc0", "conc1"} <= set(registry)


def test_nan_in_a_later_batch_names_its_instances_and_leaves_no_dump(tiny_run, tmp_path, monkeypatch):
    """Batches are written on a worker thread one behind the forward: the error still names the bad batch."""
    real = HookedPolicy.run_with_cache

    def poisoned(self, locs, names, **kw):
        cache = real(self, locs, names, **kw)
        poisoned.calls += 1  # call 1 is hook_dims' probe, then one per batch of 3: call 4 holds instances 6..8
        return {k: v.clone().fill_(float("nan")) for k, v in cache.items()} if poisoned.calls == 4 else cache

    poisoned.calls = 0
    monkeypatch.setattr(HookedPolicy, "run_with_cache", poisoned)
    result = _collect("--run_dir", tiny_run, "--hooks", "encoder_layer_0", "--num_instances", 12, "--batch_size", 3,
                      "--activations_root", tmp_path, "--name", "poisoned")  # fmt: skip
    assert result.exit_code == 1 and "NaN or Inf in encoder_layer_0 activations of instances 6..8" in result.output
    assert not any(tmp_path.rglob("metadata.json")) and not any(tmp_path.rglob("*.partial"))
