"""clt.feature_labels: planted features come back with the right label, random ones get none, scores are exact."""

import numpy as np
import pytest
from scipy.stats import rankdata

from clt.feature_labels import (
    GRID,
    LabelOptions,
    Rows,
    _cell_events,
    _cell_ranks,
    _cells,
    census,
    city_rows,
    events,
    label_features,
)
from policy.geometry import DECISION, decision_descriptors

INSTANCES, NODES = 300, 20


@pytest.fixture(scope="module")
def instances():
    rng = np.random.default_rng(11)
    locs = rng.random((INSTANCES, NODES, 2))
    tours = np.stack([rng.permutation(NODES) for _ in range(INSTANCES)])
    return locs, tours, city_rows(locs, tours)


def column(rows: Rows, name: str) -> np.ndarray:
    return rows.values[:, rows.names.index(name)]


def planted(rows: Rows, rng) -> dict[str, tuple[np.ndarray, str, str]]:
    """name -> (activation, expected category, expected descriptor): exact functions of a descriptor plus noise."""
    noise = lambda scale: rng.normal(0, scale, len(rows.values))  # noqa: E731
    xy = rows.xy
    return {
        "hull": (np.maximum(column(rows, "on_hull") * (1 + noise(0.1)), 0), "boundary", "on_hull"),
        "knn": (np.maximum(column(rows, "nn3") - 0.25 + noise(0.01), 0), "density / cluster", "nn3"),
        "half-plane": (np.maximum((xy @ [0.6, 0.8] > 0.7) * (1 + noise(0.1)), 0), "separator", "half_plane"),
        "spot": (np.maximum(0.15 - np.linalg.norm(xy - [0.3, 0.7], axis=1), 0), "spot", "spot"),
        "cluster": (np.maximum(column(rows, "cluster_size") - 0.5 + noise(0.01), 0), "density / cluster",
                    "cluster_size"),
    }  # fmt: skip


def test_planted_features_get_their_category_and_a_score_of_at_least_095(instances):
    _, _, rows = instances
    plants = planted(rows, np.random.default_rng(0))
    acts = np.stack([a for a, _, _ in plants.values()], 1)
    labels = label_features(acts, rows, LabelOptions(permutations=50))
    for (name, (_, category, descriptor)), entry in zip(plants.items(), labels, strict=True):
        assert (entry["category"], entry["descriptor"]) == (category, descriptor), (name, entry)
        assert entry["score"] >= 0.95, (name, entry)
        assert entry["score"] > entry["null"]


def test_distance_to_the_current_city_is_found_on_decision_rows(instances):
    locs, tours, _ = instances
    values = []
    for p, tour in zip(locs, tours, strict=True):
        d = decision_descriptors(p, tour[: NODES // 2])
        d["rank_from_current"] = np.nan_to_num(d["rank_from_current"], nan=NODES)  # visited ones rank last
        values.append(np.stack([d[n] for n in DECISION], 1))
    rows = Rows(list(DECISION), np.concatenate(values), locs.reshape(-1, 2), locs.reshape(-1, 2), NODES, "decision")
    near = np.maximum(0.3 - column(rows, "distance_from_current"), 0) * (1 - column(rows, "visited"))
    (entry,) = label_features(near[:, None], rows, LabelOptions(permutations=50))
    assert entry["category"] == "decoding state" and entry["descriptor"] in ("distance_from_current",
                                                                            "rank_from_current")  # fmt: skip
    assert entry["direction"] == "low" and entry["score"] >= 0.95


@pytest.mark.parametrize(("min_auroc", "most"), [(0.8, 5), (0.501, 15)])
def test_random_features_are_almost_never_labelled(instances, min_auroc, most):
    """The null works: of 500 random features (iid per row, and constant within an instance), at most 1% get a
    label with the default minimum effect; with it all but switched off, the null alone lets through about its
    nominal 1% (at most 3%: a 0.99 quantile of 100 permutations, and sampling)."""
    _, _, rows = instances
    rng = np.random.default_rng(5)
    iid = np.maximum(rng.normal(-1.5, 1, (len(rows.values), 250)), 0)
    per_instance = np.repeat(np.maximum(rng.normal(-1, 1, (INSTANCES, 250)), 0), NODES, axis=0)
    acts = np.concatenate([iid, per_instance * rng.lognormal(0, 0.3, per_instance.shape)], 1)
    labels = label_features(acts, rows, LabelOptions(permutations=100, min_auroc=min_auroc))
    labelled = [e for e in labels if e["category"] not in ("unexplained", "rare", "dead")]
    assert len(labelled) <= most, [e["label"] for e in labelled]
    c = census(labels)
    assert c["features"] == 500 and sum(c["counts"].values()) == 500


def test_descriptor_aurocs_are_mann_whitney_with_ties(instances):
    """The reported AUROC of a descriptor equals the brute-force P(descriptor on an event > on a non-event), ties
    counted half."""
    _, _, rows = instances
    rng = np.random.default_rng(2)
    acts = np.maximum(rng.normal(-1, 1, (len(rows.values), 3)), 0)
    labels = label_features(acts, rows, LabelOptions(permutations=2, min_auroc=0.99))
    for f, entry in enumerate(labels):
        fires = acts[:, f] > 0
        for top in entry["top"]:
            if top["descriptor"] in rows.names:
                d = column(rows, top["descriptor"])
                pos, neg = d[fires], d[~fires]
                brute = (pos[:, None] > neg).mean() + 0.5 * (pos[:, None] == neg).mean()
                assert top["auroc"] == pytest.approx(brute, abs=1e-4)


def test_grid_ranks_give_the_exact_auroc_of_a_cell_score():
    rng = np.random.default_rng(3)
    xy = rng.random((500, 2))
    cells = _cells(xy)
    score = rng.normal(size=(2, GRID * GRID))
    fires = rng.random((500, 2)) < 0.3
    ev = events(fires.astype(float))
    sums = (_cell_events(ev, cells) * _cell_ranks(score, cells)).sum(1)
    for f in range(2):
        row_ranks = rankdata(score[f, cells])  # the cell's score for every row, ties averaged
        assert sums[f] == pytest.approx(row_ranks[fires[:, f]].sum())


def test_events_of_a_dense_feature_are_its_upper_half():
    acts = np.stack([np.arange(1.0, 11.0), np.r_[np.zeros(8), 1.0, 2.0]], 1)
    ev = events(acts).toarray()
    assert ev[:, 0].tolist() == [0] * 5 + [1] * 5 and ev[:, 1].tolist() == [0] * 8 + [1, 1]


def test_bad_input_is_refused(instances):
    _, _, rows = instances
    with pytest.raises(ValueError, match="rows"):
        label_features(np.zeros((3, 2)), rows)
    with pytest.raises(ValueError, match="NaN"):
        label_features(np.full((len(rows.values), 1), np.nan), rows)
    holey = Rows(rows.names, np.where(np.arange(len(rows.names)) == 0, np.nan, rows.values), rows.xy, rows.rel,
                 rows.per_instance, rows.kind)  # fmt: skip
    with pytest.raises(ValueError, match=rf"\['{rows.names[0]}'\] hold NaN"):
        label_features(np.zeros((len(rows.values), 1)), holey)
    with pytest.raises(ValueError, match="min_auroc"):
        LabelOptions(min_auroc=0.4)
