import math

import pytest
import torch

from policy.env import DISTRIBUTIONS, check_locs, generate, is_valid_tour, symmetric_augment, tour_length


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_generation_is_seeded_and_in_the_unit_square(distribution):
    a = generate(8, 20, distribution, seed=3)
    b = generate(8, 20, distribution, seed=3)
    c = generate(8, 20, distribution, seed=4)
    assert a.shape == (8, 20, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_clustered_instances_are_more_concentrated_than_uniform():
    def mean_nn_distance(locs):
        d = torch.cdist(locs, locs) + torch.eye(locs.shape[1]) * 10
        return d.min(dim=-1).values.mean().item()

    assert mean_nn_distance(generate(200, 50, "clustered", seed=0)) < 0.8 * mean_nn_distance(generate(200, 50, seed=0))


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown distribution"):
        generate(2, 10, "spiral", seed=0)
    with pytest.raises(ValueError, match="at least 3"):
        generate(2, 2, seed=0)


def test_tour_length_of_the_unit_square():
    locs = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    assert tour_length(locs, torch.tensor([[0, 1, 2, 3]])).item() == pytest.approx(4.0)
    assert tour_length(locs, torch.tensor([[0, 2, 1, 3]])).item() == pytest.approx(2 + 2 * math.sqrt(2))
    multi = tour_length(locs, torch.tensor([[[0, 1, 2, 3], [0, 2, 1, 3]]]))
    assert multi.shape == (1, 2)


def test_validity():
    tours = torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3], [3, 2, 1, 0]])
    assert is_valid_tour(tours, 4).tolist() == [True, False, True]
    assert not is_valid_tour(tours, 5).any()


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[[0.0, float("nan")], [1, 1], [0, 1]]]), "finite"),
        (torch.tensor([[[0.0, float("inf")], [1, 1], [0, 1]]]), "finite"),
        (torch.zeros(2, 5, 3), "shape"),
        (torch.zeros(2, 2, 2), "at least 3"),
        (torch.zeros(5), "shape"),
        (torch.zeros(2, 5, 2, dtype=torch.long), "floating"),
        (torch.full((1, 5, 2), 1e19), "beyond 1e\\+06"),
    ],
)
def test_bad_instances_are_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        check_locs(bad)


def test_single_instance_gets_a_batch_axis():
    assert check_locs(torch.rand(7, 2)).shape == (1, 7, 2)


def test_augmentation_keeps_tour_lengths():
    locs = generate(3, 12, seed=1)
    tours = torch.stack([torch.randperm(12) for _ in range(3)])
    aug = symmetric_augment(locs)
    assert aug.shape == (24, 12, 2)
    lengths = tour_length(aug, tours.repeat(8, 1)).view(8, 3)
    torch.testing.assert_close(lengths, lengths[:1].expand(8, 3))
