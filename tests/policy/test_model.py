import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.env import generate, is_valid_tour
from policy.inference import solve
from policy.model import AttentionModel, PolicyConfig


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_loc=st.integers(3, 60),
    batch=st.integers(1, 5),
    decode=st.sampled_from(["greedy", "sample"]),
    multistart=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_decoded_tour_is_a_permutation(tiny_model, num_loc, batch, decode, multistart, seed):
    locs = generate(batch, num_loc, seed=seed)
    out = tiny_model(locs, decode=decode, multistart=multistart, generator=torch.Generator().manual_seed(seed))
    starts = num_loc if multistart else 1
    assert out.actions.shape == (batch, starts, num_loc)
    assert is_valid_tour(out.actions.reshape(-1, num_loc), num_loc).all()
    if multistart:  # every node is a start exactly once
        assert torch.equal(out.actions[:, :, 0], torch.arange(num_loc).expand(batch, -1))
    assert torch.isfinite(out.log_likelihood).all() and (out.log_likelihood <= 0).all()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_loc=st.integers(3, 40),
    decode=st.sampled_from(["greedy", "sample", "multistart"]),
    augment=st.sampled_from([1, 8]),
)
def test_solve_returns_valid_tours_and_their_lengths(tiny_model, num_loc, decode, augment):
    locs = generate(3, num_loc, seed=num_loc)
    tours, lengths = solve(tiny_model, locs, decode, augment, num_samples=2, batch_size=2)
    assert tours.dtype == torch.long and tours.shape == (3, num_loc)
    assert is_valid_tour(tours, num_loc).all()
    assert lengths.shape == (3,)


def test_best_of_more_candidates_is_never_worse(tiny_model):
    locs = generate(16, 20, seed=5)
    _, greedy = solve(tiny_model, locs, "greedy")
    _, multi = solve(tiny_model, locs, "multistart")
    _, multi8 = solve(tiny_model, locs, "multistart", augment=8)
    assert (multi8 <= multi + 1e-5).all()
    assert multi.mean() <= greedy.mean() + 1e-5


def test_log_likelihood_matches_log_probs(tiny_model):
    locs = generate(4, 10, seed=0)
    out = tiny_model(locs, decode="sample", generator=torch.Generator().manual_seed(1), return_log_probs=True)
    chosen = out.log_probs.gather(-1, out.actions[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(chosen, out.log_likelihood)


def test_gradients_flow_through_the_rollout(tiny_cfg):
    model = AttentionModel(tiny_cfg).train()
    out = model(generate(4, 8, seed=0), decode="sample", multistart=True)
    out.log_likelihood.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "decoder.W_placeholder")


def test_instance_normalization_runs(tiny_cfg):
    cfg = PolicyConfig(**{**tiny_cfg.to_dict(), "normalization": "instance"})
    out = AttentionModel(cfg).eval()(generate(2, 9, seed=0))
    assert is_valid_tour(out.actions[:, 0], 9).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"embed_dim": 30, "num_heads": 4}, "divide"),
        ({"normalization": "layer"}, "normalization"),
        ({"temperature": 0}, "temperature"),
        ({"num_encoder_layers": 0}, "whole number in \\[1, 64\\]"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**kwargs)


def test_weights_that_do_not_fit_say_why(tiny_model, tiny_cfg):
    weights = tiny_model.state_dict()
    bigger = PolicyConfig(**{**tiny_cfg.to_dict(), "ff_hidden": 64})
    with pytest.raises(ValueError, match="ff_in.weight"):
        AttentionModel.from_weights(bigger, weights)
    del weights["init_embed.bias"]
    with pytest.raises(ValueError, match="missing init_embed.bias"):
        AttentionModel.from_weights(tiny_cfg, weights)


def test_teacher_forcing_follows_given_tours(tiny_model):
    locs = generate(6, 9, seed=3)
    sampled = tiny_model(locs, decode="sample", generator=torch.Generator().manual_seed(0), return_log_probs=True)
    forced = tiny_model(locs, actions=sampled.actions, return_log_probs=True)
    assert torch.equal(forced.actions, sampled.actions)
    torch.testing.assert_close(forced.log_probs, sampled.log_probs)
    torch.testing.assert_close(forced.log_likelihood, sampled.log_likelihood)
    starts = tiny_model(locs, multistart=True)
    assert torch.equal(tiny_model(locs, multistart=True, actions=starts.actions).actions, starts.actions)
    with pytest.raises(ValueError, match="actions to follow"):
        tiny_model(locs, actions=sampled.actions[:, 0])


def test_a_rollout_from_given_embeddings_is_the_rollout_from_the_locations(tiny_model):
    locs = generate(5, 8, seed=4)
    with torch.no_grad():
        embeddings = tiny_model.encode(locs)
        plain = tiny_model(locs, return_log_probs=True)
        given = tiny_model(locs, return_log_probs=True, embeddings=embeddings)
        other = tiny_model(locs, return_log_probs=True, embeddings=tiny_model.encode(generate(5, 8, seed=5)))
    assert torch.equal(given.actions, plain.actions) and torch.equal(given.log_probs, plain.log_probs)
    assert not torch.equal(other.log_probs, plain.log_probs)  # the embeddings, not the locations, were decoded
