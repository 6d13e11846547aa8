import pytest
import torch

from policy.env import generate, is_valid_tour, tour_length
from policy.reference import has_lkh, lkh, nearest_neighbour, reference_tours, two_opt


def test_two_opt_improves_nearest_neighbour_to_a_local_optimum():
    locs = generate(32, 20, seed=0)
    nn = nearest_neighbour(locs)
    opt = two_opt(locs, nn)
    assert is_valid_tour(nn, 20).all() and is_valid_tour(opt, 20).all()
    assert (tour_length(locs, opt) <= tour_length(locs, nn) + 1e-6).all()
    assert torch.equal(two_opt(locs, opt), opt), "no improving move is left"


def test_two_opt_solves_points_on_a_circle():
    angles = torch.randperm(16).float() / 16 * 2 * torch.pi
    locs = torch.stack([angles.cos(), angles.sin()], dim=-1)[None] * 0.5 + 0.5
    length = tour_length(locs, two_opt(locs, torch.arange(16)[None]))
    assert length.item() == pytest.approx(16 * 2 * 0.5 * torch.sin(torch.tensor(torch.pi / 16)).item(), rel=1e-5)


@pytest.mark.skipif(not has_lkh(), reason="elkai (the solvers extra) is not installed")
def test_lkh_is_at_least_as_good_as_two_opt():
    locs = generate(10, 20, seed=1)
    lkh_tours = lkh(locs)
    assert is_valid_tour(lkh_tours, 20).all()
    two, name = reference_tours(locs, "2opt")
    assert name == "nearest neighbour + 2-opt"
    assert (tour_length(locs, lkh_tours) <= tour_length(locs, two) + 1e-5).all()
