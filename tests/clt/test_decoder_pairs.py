"""Decoder-side transcoders end to end: the glimpse pair collected per decoding step (greedy or given tours), row
for row the live policy's, trained, and spliced back into decoding through clt.eval."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clt import collect_pairs as collect_cli
from clt import eval as eval_cli
from clt import train_transcoder as train_cli
from clt.pairs import LayerPair, parse_pairs
from policy.loading import load_policy
from sae.hook_names import hook_names
from sae.hooks import HookedPolicy
from sae.store import open_dump

GLIMPSE = "clt_dec.context_to_dec.glimpse"
SPEC = "decoder.context:decoder.glimpse"
INSTANCES = 40


@pytest.fixture(scope="module")
def decoder_run(tiny_source, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("decoder_pairs") / "tiny"
    shutil.copytree(tiny_source, run_dir)
    args = ["--run_dir", str(run_dir), "--layer_pairs", f"{SPEC},encoder_layer_0.mlp_in:encoder_layer_0.mlp_out",
            "--num_instances_per_pair", str(INSTANCES), "--batch_size", "16"]  # fmt: skip
    result = CliRunner().invoke(collect_cli.main, args)
    assert result.exit_code == 0, result.output
    return run_dir


def test_pair_names_of_decoder_points():
    pair = parse_pairs(SPEC, hook_names(2))[0]
    assert pair.name == GLIMPSE and LayerPair.from_name(GLIMPSE) == pair and pair.on_decoder
    with pytest.raises(ValueError, match="mixes an encoder point"):
        parse_pairs("encoder_output:decoder.glimpse", hook_names(2))
    with pytest.raises(ValueError, match="not downstream"):
        parse_pairs("decoder.glimpse:decoder.context", hook_names(2))


def test_rows_are_the_live_policy_steps_along_its_greedy_tours(decoder_run):
    dump = open_dump(decoder_run / "clt" / "activations" / GLIMPSE, verify="always")
    n = dump.nodes_per_instance
    assert dump.arrays["sources"].shape == (INSTANCES * n, 16) and dump.metadata["tours"] == "greedy"
    assert dump.metadata["row_meaning"] == "(instance, decoding step)"
    hooked = HookedPolicy(load_policy(decoder_run).model)
    locs = torch.from_numpy(np.load(dump.path / "locs.npy"))
    cache = hooked.run_with_cache(locs, ["decoder.context", "decoder.glimpse"])  # [instance, step, d]
    for side, hook in (("sources", "decoder.context"), ("targets", "decoder.glimpse")):
        np.testing.assert_allclose(dump.arrays[side], cache[hook].reshape(-1, 16).numpy(), rtol=1e-5, atol=1e-6)
    encoder_dump = open_dump(decoder_run / "clt" / "activations" / "clt_L0.mlp_in_to_L0.mlp_out")
    np.testing.assert_array_equal(np.load(encoder_dump.path / "locs.npy"), locs.numpy())  # the same instances


def test_given_tours_are_followed_and_checked(decoder_run, tmp_path):
    locs = torch.from_numpy(np.load(decoder_run / "clt" / "activations" / GLIMPSE / "locs.npy"))
    rng = np.random.default_rng(0)
    tours = np.stack([rng.permutation(locs.shape[1]) for _ in range(INSTANCES)])
    np.save(tmp_path / "tours.npy", tours)
    args = ["--run_dir", str(decoder_run), "--layer_pairs", SPEC, "--num_instances_per_pair", str(INSTANCES),
            "--tours", str(tmp_path / "tours.npy"), "--overwrite"]  # fmt: skip
    result = CliRunner().invoke(collect_cli.main, args)
    assert result.exit_code == 0, result.output
    dump = open_dump(decoder_run / "clt" / "activations" / GLIMPSE)
    assert dump.metadata["tours"].startswith("file sha256 ")
    hooked = HookedPolicy(load_policy(decoder_run).model)
    cache = hooked.run_with_cache(locs, ["decoder.glimpse"], actions=torch.from_numpy(tours)[:, None])
    np.testing.assert_allclose(dump.arrays["targets"], cache["decoder.glimpse"].reshape(-1, 16), rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros_like(tours))
    bad = CliRunner().invoke(collect_cli.main, [*args[:-2], str(tmp_path / "bad.npy"), "--overwrite"])
    assert bad.exit_code == 1 and "must visit each of the 10 cities once" in bad.output
    args[-3:] = ["--tours", "greedy", "--overwrite"]  # back to the policy's own tours for the other tests
    assert CliRunner().invoke(collect_cli.main, args).exit_code == 0


def test_train_and_splice_a_glimpse_transcoder(decoder_run):
    train = ["--run_dir", str(decoder_run), "--pair", SPEC, "--expansion_factor", "4", "--k", "4",
             "--batch_size", "64", "--num_epochs", "3", "--wandb_mode", "disabled"]  # fmt: skip
    result = CliRunner().invoke(train_cli.main, train)
    assert result.exit_code == 0, result.output
    assert f"{GLIMPSE}: validation FVU" in result.output
    folder = sorted((decoder_run / "clt" / "clt_runs" / GLIMPSE).iterdir())[-1]
    result = CliRunner().invoke(
        eval_cli.main, ["--clt_dir", str(folder), "--num_instances", "16", "--label_instances", "20"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    splice = metrics["splice"]
    assert abs(splice["transcoder+error"]["gap"]) < 1e-6 and splice["transcoder+error"]["action_agreement"] == 1.0
    assert splice["mean"]["action_agreement"] < 1  # the glimpse's mean instead changes the policy's choices
    assert 0 < splice["transcoder"]["action_agreement"] <= 1 and metrics["reconstruction"]["l0"] <= 4
