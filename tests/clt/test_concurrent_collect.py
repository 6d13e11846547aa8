"""Stress: two collectors of the same dumps at once, as two processes, with the same and with different arguments.
Each ends with a correct dump or a clear failure; a complete dump always holds the rows its metadata describes.
And an --overwrite of several pairs killed half-way through publishing is never read as one set."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from policy.loading import load_policy
from sae.collection_loop import instance_batches
from sae.hooks import HookedPolicy
from sae.registry import read_registry
from sae.store import open_dump

INSTANCES = 3000  # enough rows that the two collections overlap in time
PAIRS = "encoder_layer_0:encoder_layer_1,encoder_layer_1.mlp_in:encoder_layer_1.mlp_out"


def _start(module, run_dir, *args):
    command = [sys.executable, "-m", module, "--run_dir", str(run_dir), "--batch_size", "500", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _both(*processes):
    return [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in processes]


def _assert_matches_its_metadata(run_dir, path, arrays):
    """Every file checksums, and the rows are the policy's activations on the instances the metadata names."""
    path = Path(path)
    dump = open_dump(path, verify="always")
    meta = dump.metadata
    locs = torch.cat(list(instance_batches(meta["num_instances"], meta["nodes_per_instance"], meta["distribution"],
                                           meta["seed"], 1024)))  # fmt: skip
    np.testing.assert_array_equal(np.load(path / "locs.npy"), locs.numpy())
    picked = [0, meta["num_instances"] // 2, meta["num_instances"] - 1]
    cache = HookedPolicy(load_policy(run_dir).model).run_with_cache(locs[picked], list(arrays.values()))
    n = meta["nodes_per_instance"]
    for array, hook in arrays.items():
        rows = np.concatenate([dump.arrays[array][i * n : (i + 1) * n] for i in picked])
        np.testing.assert_allclose(rows, cache[hook].reshape(len(picked) * n, -1).numpy(), atol=1e-5)
    return meta


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "tiny", ignore=shutil.ignore_patterns("sae", "clt"))
    return tmp_path / "tiny"


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_pair_collections_of_one_dump_with_different_counts(run_copy, overwrite):
    """The count is not part of a dump's name (its condition is, clt.datasets.condition_tag): both write one dump."""
    extra = ["--overwrite"] if overwrite else []
    common = ["--layer_pairs", PAIRS, *extra]
    counts = (INSTANCES, str(int(INSTANCES) + 500))
    results = _both(*(_start("clt.collect_pairs", run_copy, *common, "--num_instances_per_pair", n) for n in counts))
    codes = sorted(code for code, _, _ in results)
    if overwrite:
        assert codes == [0, 0], results  # they took turns; the second replaced the first
    else:
        assert codes == [0, 1], results  # the second found the first one's dump and said so
        failed = next(err for code, _, err in results if code == 1)
        assert "made with other arguments" in failed and "Traceback" not in failed
    made = set()
    hooks = {"clt_L0_to_L1": ("encoder_layer_0", "encoder_layer_1"),
             "clt_L1.mlp_in_to_L1.mlp_out": ("encoder_layer_1.mlp_in", "encoder_layer_1.mlp_out")}  # fmt: skip
    for pair, (src, tgt) in hooks.items():
        path = read_registry(run_copy)[pair]["path"]
        made.add(_assert_matches_its_metadata(run_copy, path, {"sources": src, "targets": tgt})["num_instances"])
    assert len(made) == 1, "both pairs come from one collection"


def test_two_pair_collections_with_the_same_arguments_both_succeed(run_copy):
    common = ["--layer_pairs", PAIRS, "--num_instances_per_pair", INSTANCES]
    results = _both(_start("clt.collect_pairs", run_copy, *common), _start("clt.collect_pairs", run_copy, *common))
    assert [code for code, _, _ in results] == [0, 0], results
    path = read_registry(run_copy)["clt_L0_to_L1"]["path"]
    assert _assert_matches_its_metadata(run_copy, path, {"sources": "encoder_layer_0", "targets": "encoder_layer_1"})


@pytest.mark.parametrize("seeds", [(1, 1), (1, 2)])
def test_two_activation_collections_of_one_name(run_copy, seeds):
    common = ["--hooks", "encoder_layer_0,encoder_output", "--num_instances", INSTANCES, "--name", "shared",
              "--overwrite"]  # fmt: skip
    results = _both(*(_start("sae.collect_activations", run_copy, *common, "--seed", s) for s in seeds))
    assert [code for code, _, _ in results] == [0, 0], results
    path = read_registry(run_copy)["shared"]["path"]
    meta = _assert_matches_its_metadata(run_copy, path, {h: h for h in ("encoder_layer_0", "encoder_output")})
    assert meta["seed"] in seeds


def test_an_overwrite_killed_while_publishing_is_never_read_as_one_set(run_copy, monkeypatch):
    """--overwrite of two pairs stops after the first is published: that pair is refused by name, the untouched
    one still reads, and collecting again mends both."""
    from click.testing import CliRunner

    from clt import collect_pairs, train_transcoder
    from sae.store import DumpWriter

    args = ["--run_dir", str(run_copy), "--layer_pairs", PAIRS]
    assert CliRunner().invoke(collect_pairs.main, [*args, "--num_instances_per_pair", "40"]).exit_code == 0
    real, published = DumpWriter.publish, []

    def killed_after_one(self):
        if published:
            raise KeyboardInterrupt
        published.append(real(self))
        return published[-1]

    monkeypatch.setattr(DumpWriter, "publish", killed_after_one)
    result = CliRunner().invoke(collect_pairs.main, [*args, "--num_instances_per_pair", "50", "--overwrite"])
    assert result.exit_code != 0
    monkeypatch.setattr(DumpWriter, "publish", real)
    assert not list(run_copy.glob("clt/activations/*.partial"))
    new, old = published[0].name, ({"clt_L0_to_L1", "clt_L1.mlp_in_to_L1.mlp_out"} - {published[0].name}).pop()
    train = ["--run_dir", str(run_copy), "--k", "2", "--expansion_factor", "2", "--num_epochs", "1",
             "--batch_size", "64", "--wandb_mode", "disabled"]  # fmt: skip
    refused = CliRunner().invoke(train_transcoder.main, [*train, "--pair", new])
    assert refused.exit_code == 1 and "an --overwrite was interrupted" in refused.output, refused.output
    assert CliRunner().invoke(train_transcoder.main, [*train, "--pair", old]).exit_code == 0
    assert (
        CliRunner().invoke(collect_pairs.main, [*args, "--num_instances_per_pair", "50", "--overwrite"]).exit_code == 0
    )
    for pair in (new, old):
        assert CliRunner().invoke(train_transcoder.main, [*train, "--pair", pair]).exit_code == 0
