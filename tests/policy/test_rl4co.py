"""RL4CO checkpoints load without rl4co and reproduce RL4CO's own outputs."""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from policy.loading import load_policy
from policy.rl4co import load_checkpoint, read_lightning_checkpoint
from policy.torch_files import RestrictedUnpickler, Stub

TOL = 1e-5


def _capture(model):
    """Forward hooks that record every activation the fixture stores, under its names."""
    acts, steps = {}, {"dec.step_context": [], "dec.glimpse": []}
    hooks = [model.hook_init_embedding.register_forward_hook(lambda m, i, o: acts.__setitem__("init_embed", o))]
    for i, layer in enumerate(model.layers):
        points = [("hook_input", "input"), ("hook_attn_out", "mha_out"), ("hook_mlp_in", "norm1"),
                  ("hook_mlp_out", "ff_out"), ("hook_output", "norm2"), ("ff_in", "ff_hidden_preact")]  # fmt: skip
        for point, name in points:
            hooks.append(getattr(layer, point).register_forward_hook(
                lambda m, inp, o, key=f"enc.layer{i}.{name}": acts.__setitem__(key, o)))  # fmt: skip
    hooks.append(model.decoder.hook_context.register_forward_hook(lambda m, i, o: steps["dec.step_context"].append(o)))
    hooks.append(model.decoder.hook_glimpse.register_forward_hook(lambda m, i, o: steps["dec.glimpse"].append(o)))
    return acts, steps, hooks


def _check_against_fixture(model, fx):
    acts, steps, hooks = _capture(model)
    with torch.no_grad():
        out = model(torch.from_numpy(fx["locs"]), return_log_probs=True)
    for h in hooks:
        h.remove()
    for i in range(len(model.layers)):
        acts[f"enc.layer{i}.mha_skip"] = acts[f"enc.layer{i}.input"] + acts[f"enc.layer{i}.mha_out"]
        acts[f"enc.layer{i}.ff_skip"] = acts[f"enc.layer{i}.norm1"] + acts[f"enc.layer{i}.ff_out"]
    acts.update({k: torch.cat(v, dim=1) for k, v in steps.items()})

    np.testing.assert_array_equal(out.actions[:, 0].numpy(), fx["actions"])
    lengths = torch.from_numpy(fx["tour_length"])
    from policy.env import tour_length

    np.testing.assert_allclose(tour_length(torch.from_numpy(fx["locs"]), out.actions[:, 0]), lengths, atol=TOL)
    log_probs = out.log_probs[:, 0].numpy()
    finite = np.isfinite(fx["log_probs"])
    np.testing.assert_array_equal(np.isfinite(log_probs), finite)
    np.testing.assert_array_equal(finite, fx["action_mask"])
    np.testing.assert_allclose(log_probs[finite], fx["log_probs"][finite], atol=TOL)
    compared = [k for k in fx if k.startswith(("enc.", "dec.", "init_embed"))]
    assert len(compared) == 1 + 6 * 2 + 2
    for key in compared:
        np.testing.assert_allclose(acts[key].numpy(), fx[key], atol=TOL, err_msg=key)


def test_lightning_checkpoint_reproduces_rl4co(fixture_dir, rl4co_fixture):
    model = load_checkpoint(fixture_dir / "am_tiny.ckpt")
    assert model.cfg.num_heads == 4  # read from the pickled hyper-parameters, safely
    assert model.cfg.normalization == "batch" and model.cfg.embed_dim == 32
    _check_against_fixture(model, rl4co_fixture)


def test_raw_pointer_logits_match(fixture_dir, rl4co_fixture):
    model = load_checkpoint(fixture_dir / "am_tiny.ckpt")
    logits = []
    model.decoder.hook_logits.register_forward_hook(lambda m, i, o: logits.append(o))
    with torch.no_grad():
        model(torch.from_numpy(rl4co_fixture["locs"]))
    np.testing.assert_allclose(torch.cat(logits, 1).numpy(), rl4co_fixture["logits_raw"], atol=TOL)


def test_policy_state_dict_reproduces_rl4co(fixture_dir, rl4co_fixture):
    model = load_checkpoint(fixture_dir / "policy_state_dict.pt", num_heads=4)
    _check_against_fixture(model, rl4co_fixture)


def test_hyper_parameters_come_back_as_inert_stubs(fixture_dir):
    ckpt = read_lightning_checkpoint(fixture_dir / "am_tiny.ckpt")
    policy = ckpt["hyper_parameters"]["policy"]
    assert isinstance(policy, Stub)
    assert policy.stub_of == "rl4co.models.zoo.am.policy.AttentionModelPolicy"
    assert "rl4co" not in __import__("sys").modules


class RemoveWhenUnpickled:
    """Unpickling this calls shutil.rmtree(folder), unless the unpickler refuses to."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return (shutil.rmtree, (self.folder,))


def test_restricted_unpickler_never_calls_what_it_reads(tmp_path):
    marker = tmp_path / "marker"
    marker.mkdir()
    payload = pickle.dumps({"x": RemoveWhenUnpickled(marker), "n": [1, 2.5, "a"]})
    loaded = RestrictedUnpickler(io.BytesIO(payload)).load()
    assert marker.exists(), "the pickled call must not run"
    assert isinstance(loaded["x"], Stub) and loaded["x"].stub_of == "shutil.rmtree"
    assert loaded["n"] == [1, 2.5, "a"]


def test_malicious_ckpt_file_is_inert(tmp_path):
    marker = tmp_path / "marker"
    marker.mkdir()
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"policy.x": torch.zeros(1)}, "hyper_parameters": {"p": RemoveWhenUnpickled(marker)}}, path
    )
    ckpt = read_lightning_checkpoint(path)
    assert marker.exists()
    assert torch.equal(ckpt["state_dict"]["policy.x"], torch.zeros(1))


def test_garbage_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no known format"):
        load_checkpoint(path)


def test_a_pickled_object_where_a_tensor_belongs_is_a_clear_error(tmp_path):
    marker = tmp_path / "marker"
    marker.mkdir()
    path = tmp_path / "stub.ckpt"
    torch.save({"state_dict": {"policy.encoder.init_embedding.init_embed.weight": RemoveWhenUnpickled(marker)}}, path)
    with pytest.raises(ValueError, match="init_embed.weight' is <stub of shutil.rmtree>.*not a tensor"):
        load_checkpoint(path)
    assert marker.exists()


def test_weights_of_no_known_layout_are_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"policy.net.0.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="fit no known format.*found net.0.weight"):
        load_checkpoint(path)


def test_rl4co_run_directory_loads_like_a_native_run(fixture_dir, tmp_path, rl4co_fixture):
    run = tmp_path / "my_rl4co_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fixture_dir / "am_tiny.ckpt", run / "checkpoints" / "checkpoint_epoch_3.ckpt")
    (run / "config.json").write_text(
        json.dumps({"embed_dim": 32, "n_encoder_layers": 2, "num_heads": 4, "num_loc": 10})
    )
    loaded = load_policy(run)
    assert loaded.epoch == 3 and loaded.config.num_loc == 10
    _check_against_fixture(loaded.model, rl4co_fixture)


def test_rl4co_run_with_wrong_config_says_what_does_not_fit(fixture_dir, tmp_path):
    run = tmp_path / "wrong"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fixture_dir / "am_tiny.ckpt", run / "checkpoints" / "checkpoint_epoch_1.ckpt")
    (run / "config.json").write_text(
        json.dumps({"embed_dim": 64, "n_encoder_layers": 2, "num_heads": 4, "num_loc": 10})
    )
    with pytest.raises(ValueError, match="does not fit"):
        load_policy(run)
