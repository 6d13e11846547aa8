"""The shipped demo run: present, small, loadable, and a good TSP20 policy."""

import json

import torch

from policy.env import generate, is_valid_tour
from policy.inference import solve
from policy.loading import load_policy
from policy.reference import reference_lengths
from policy.runs import PACKAGED_RUNS_DIR

DEMO = PACKAGED_RUNS_DIR / "tsp20_demo"


def test_demo_run_is_small_and_safetensors_only():
    outputs = (DEMO / "sae", DEMO / "clt")  # what users generate there (git-ignored), not what ships
    files = [p for p in DEMO.rglob("*") if p.is_file() and not any(o in p.parents for o in outputs)]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    assert not [p for p in files if p.suffix in (".pt", ".ckpt", ".pkl")]
    config = json.loads((DEMO / "config.json").read_text())
    assert config["policy"]["embed_dim"] == 128 and config["policy"]["num_encoder_layers"] == 3
    assert config["policy"]["num_heads"] == 8 and config["env"]["num_loc"] == 20


def test_demo_policy_is_close_to_two_opt_or_better():
    loaded = load_policy("tsp20_demo")
    locs = generate(100, 20, seed=42)
    tours, lengths = solve(loaded.model, locs, "multistart")
    assert is_valid_tour(tours, 20).all()
    ref, _ = reference_lengths(locs, "2opt")
    # nearest neighbour + 2-opt is about 5% above optimal on TSP20; the trained policy beats it
    assert lengths.mean() < ref.mean()
    _, greedy = solve(loaded.model, locs, "greedy")
    assert greedy.mean() < 1.03 * ref.mean()


def test_demo_policy_runs_on_other_sizes():
    loaded = load_policy("tsp20_demo")
    for n in (5, 50):
        tours, _ = solve(loaded.model, generate(3, n, seed=0), "greedy")
        assert is_valid_tour(tours, n).all() and tours.dtype == torch.long
