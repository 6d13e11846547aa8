"""policy.geometry: each descriptor against brute force or a hand-made instance."""

import itertools

import numpy as np
import pytest

from policy.geometry import (
    CITY,
    DESCRIPTORS,
    STEP,
    city_descriptors,
    decision_descriptors,
    distance_to_hull,
    onion_layers,
    step_descriptors,
)


def hull_by_scanning_lines(points: np.ndarray) -> set[int]:
    """Vertices of the hull: a pair (i, j) is a hull edge when every other point lies strictly on one side."""
    on = set()
    for i, j in itertools.combinations(range(len(points)), 2):
        d = points[j] - points[i]
        side = d[0] * (points[:, 1] - points[i, 1]) - d[1] * (points[:, 0] - points[i, 0])
        side = np.delete(side, [i, j])
        if (side > 0).all() or (side < 0).all():
            on |= {i, j}
    return on


@pytest.mark.parametrize("seed", range(5))
def test_hull_membership_matches_a_scan_of_all_lines(seed):
    locs = np.random.default_rng(seed).random((3, 15, 2))
    tours = np.tile(np.arange(15), (3, 1))
    on_hull = city_descriptors(locs, tours)["on_hull"]
    for points, row in zip(locs, on_hull, strict=True):
        assert set(np.flatnonzero(row)) == hull_by_scanning_lines(points)


def test_onion_layers_of_nested_squares():
    outer = [(0, 0), (1, 0), (1, 1), (0, 1)]
    inner = [(0.3, 0.3), (0.7, 0.3), (0.7, 0.7), (0.3, 0.7)]
    points = np.array([*inner, (0.5, 0.52), *outer], dtype=float)
    assert onion_layers(points).tolist() == [1, 1, 1, 1, 2, 0, 0, 0, 0]
    # distance to the hull: 0.3 for the inner square's corners, 0.48 for the centre point (nearest: the bottom side
    # is 0.52 away, the top 0.48)
    assert distance_to_hull(points) == pytest.approx([0.3, 0.3, 0.3, 0.3, 0.48, 0, 0, 0, 0])


def test_nearest_neighbour_distances_match_sorting_every_distance():
    rng = np.random.default_rng(1)
    locs = rng.random((4, 12, 2))
    d = city_descriptors(locs, np.tile(np.arange(12), (4, 1)))
    for b, i in itertools.product(range(4), range(12)):
        others = sorted(np.linalg.norm(locs[b, i] - locs[b, j]) for j in range(12) if j != i)
        assert [d["nn1"][b, i], d["nn3"][b, i], d["nn5"][b, i]] == pytest.approx([others[0], others[2], others[4]])
        assert d["neighbours"][b, i] == sum(o <= 1 / np.sqrt(12) for o in others)


def test_tour_descriptors_on_a_square():
    locs = np.array([[[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.1]]], dtype=float)
    d = city_descriptors(locs, np.array([[0, 4, 1, 2, 3]]))
    # city 4 sits between 0 and 1: two edges of length sqrt(0.26), a turn of 2 * atan(0.1 / 0.5)
    assert d["tour_edge_short"][0, 4] == pytest.approx(np.sqrt(0.26))
    assert d["turn_angle"][0, 4] == pytest.approx(2 * np.arctan(0.2))
    assert d["turn_angle"][0, 2] == pytest.approx(np.pi / 2)
    assert d["on_hull"][0].tolist() == [1, 1, 1, 1, 0]
    assert d["tour_to_nn"][0, 4] == 1.0


def test_step_descriptors_follow_the_tour():
    locs = np.array([[[0, 0], [1, 0], [1, 1], [0, 1]]], dtype=float)
    d = step_descriptors(locs, np.array([[0, 1, 2, 3]]))
    assert d["step_fraction"][0].tolist() == pytest.approx([0.25, 0.5, 0.75])
    assert d["current_to_first"][0].tolist() == pytest.approx([0, 1, np.sqrt(2)])
    assert d["nearest_unvisited"][0].tolist() == pytest.approx([1, 1, 1])  # from 0: city 1; from 1: 2; from 2: 3
    assert set(d) == set(STEP)


def test_decision_descriptors_rank_the_unvisited_by_distance():
    locs = np.array([[0, 0], [0.1, 0], [0.5, 0], [0.3, 0]], dtype=float)
    d = decision_descriptors(locs, [1, 0])  # at city 0, 1 visited
    assert d["distance_from_current"].tolist() == pytest.approx([0, 0.1, 0.5, 0.3])
    assert np.isnan(d["rank_from_current"][:2]).all() and d["rank_from_current"][2:].tolist() == [1, 0]
    assert d["visited"].tolist() == [1, 1, 0, 0]


def test_every_descriptor_is_described_and_degenerate_instances_work():
    assert set(CITY) | set(STEP) <= set(DESCRIPTORS)
    collinear = np.array([[[0, 0], [0.5, 0.5], [1, 1], [0.25, 0.25]]], dtype=float)
    d = city_descriptors(collinear, np.array([[0, 1, 2, 3]]))
    assert all(np.isfinite(v).all() for v in d.values())


@pytest.mark.parametrize("bad", [np.zeros((2, 5)), np.zeros((1, 2, 2)), np.full((1, 5, 2), np.nan)])
def test_bad_instances_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="instances"):
        city_descriptors(bad, np.zeros(bad.shape[:2], dtype=int))


def test_the_generators_own_clusters_come_with_its_instances():
    import torch

    from policy.env import generate, generate_clusters

    locs, ids = generate_clusters(6, 30, seed=4)
    assert torch.equal(locs, generate(6, 30, "clustered", seed=4))
    d = city_descriptors(locs.numpy(), np.tile(np.arange(30), (6, 1)), ids.numpy())
    for b in range(6):
        sizes = np.bincount(ids[b].numpy())[ids[b].numpy()] / 30
        assert d["generator_cluster_size"][b] == pytest.approx(sizes)
    assert set(d) - set(CITY) == {"generator_cluster_size", "generator_centre_distance", "generator_cluster_boundary"}
