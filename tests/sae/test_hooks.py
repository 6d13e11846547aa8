"""HookedPolicy: names, values against RL4CO's fixture, cleanup, replacement."""

import pytest
import torch

from policy.env import generate
from policy.rl4co import load_checkpoint
from sae.hooks import HookedPolicy

TOL = 1e-5


@pytest.fixture
def hooked(fixture_dir):
    return HookedPolicy(load_checkpoint(fixture_dir / "am_tiny.ckpt"))


def test_hook_names_follow_the_architecture(hooked):
    names = hooked.hook_names()
    assert names[0] == "init_embedding" and "encoder_output" in names
    for i in range(2):
        for suffix in ("", ".input", ".attn_out", ".mlp_in", ".mlp_out"):
            assert f"encoder_layer_{i}{suffix}" in names
    assert names[-3:] == ["decoder.context", "decoder.glimpse", "decoder.logits"]


def test_cached_values_match_rl4co(hooked, rl4co_fixture):
    locs = torch.from_numpy(rl4co_fixture["locs"])
    cache = hooked.run_with_cache(locs, hooked.hook_names())
    expected = {
        "init_embedding": "init_embed",
        "encoder_layer_0.attn_out": "enc.layer0.mha_out",
        "encoder_layer_0.mlp_in": "enc.layer0.norm1",
        "encoder_layer_0": "enc.layer0.norm2",
        "encoder_layer_1.mlp_in": "enc.layer1.norm1",
        "encoder_layer_1": "enc.layer1.norm2",
        "encoder_output": "enc.layer1.norm2",
        "decoder.context": "dec.step_context",
        "decoder.glimpse": "dec.glimpse",
        "decoder.logits": "logits_raw",
    }
    for name, key in expected.items():
        torch.testing.assert_close(cache[name], torch.from_numpy(rl4co_fixture[key]), atol=TOL, rtol=0, msg=name)
    for i in range(2):  # the skip connections the fixture stores
        skip = cache[f"encoder_layer_{i}.mlp_in"] + cache[f"encoder_layer_{i}.mlp_out"]
        torch.testing.assert_close(skip, torch.from_numpy(rl4co_fixture[f"enc.layer{i}.ff_skip"]), atol=TOL, rtol=0)
    assert cache["decoder.context"].shape == (8, 10, 32)


def test_encoder_points_run_only_the_encoder(hooked):
    calls = []
    with hooked.hooks({"decoder.logits": lambda x, name: calls.append(name)}):
        cache = hooked.run_with_cache(generate(2, 10, seed=0), ["encoder_layer_1.mlp_out"])
    assert not calls and cache["encoder_layer_1.mlp_out"].shape == (2, 10, 32)


def test_unknown_names_list_the_valid_ones(hooked):
    with pytest.raises(ValueError, match="valid names: init_embedding"):
        hooked.run_with_cache(generate(1, 5, seed=0), ["encoder_layer_9"])


def test_hooks_are_removed_after_an_exception(hooked):
    def boom(x, name):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"), hooked.hooks({"encoder_layer_0": boom}):
        hooked.model(generate(1, 5, seed=0))
    assert all(not m._forward_hooks for m in hooked.model.modules())


def test_replacing_an_activation_changes_the_tours(hooked):
    locs = generate(16, 10, seed=3)
    original = hooked.model(locs).actions
    spliced = hooked.run_with_hooks(locs, {"encoder_layer_1": lambda x, name: torch.zeros_like(x)}).actions
    assert not torch.equal(original, spliced)
    identity = hooked.run_with_hooks(locs, {"encoder_layer_1": lambda x, name: None}).actions
    assert torch.equal(original, identity)
    assert all(not m._forward_hooks for m in hooked.model.modules())
