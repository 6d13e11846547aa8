"""Geometric descriptors of TSP instances: what a feature of the policy might respond to.

Pure geometry (numpy and scipy, no model). Every descriptor is a float64 array; boolean ones are 0 / 1.
Three kinds of row, matching the rows a dictionary produces:

- `city_descriptors(locs, tours)`: one row per (instance, city) [batch, node], for encoder-side features.
- `step_descriptors(locs, tours)`: one row per (instance, step t >= 1) [batch, node - 1], for decoder-side
  features (`decoder.*` hooks) at the decision that picks the t-th city of `tours` (t = 0 has no current city).
- `decision_descriptors(locs, prefix)`: one row per city at one decision (the tour so far `prefix`).

`DESCRIPTORS` holds each one's kind (`bool` or `continuous`), category and the phrase a label uses. Notation:
p_i a city, c = mean_i p_i the centroid, s = sqrt(mean_i |p_i - c|^2) the instance's spread, N the number of
cities, d_k(i) the distance from city i to its k-th nearest other city, r_N = 1 / sqrt(N) the radius at which a
uniform instance has about pi neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial import ConvexHull, QhullError


@dataclass(frozen=True)
class Descriptor:
    kind: str
    """`bool` (0 / 1) or `continuous`."""
    category: str
    """boundary, separator, density / cluster, tour structure or decoding state."""
    phrase: str
    """What a feature that fires where the descriptor is high responds to, for labels."""
    low_phrase: str
    """The same where it is low."""


DESCRIPTORS: dict[str, Descriptor] = {
    # per city: absolute and relative position
    "x": Descriptor("continuous", "separator", "cities to the right (large x)", "cities to the left (small x)"),
    "y": Descriptor("continuous", "separator", "cities at the top (large y)", "cities at the bottom (small y)"),
    "rel_x": Descriptor(
        "continuous", "separator", "right of the instance's centroid", "left of the instance's centroid"
    ),
    "rel_y": Descriptor("continuous", "separator", "above the instance's centroid", "below the instance's centroid"),
    "radius": Descriptor("continuous", "boundary", "far from the centroid (periphery)", "near the centroid (centre)"),
    "pc1": Descriptor(
        "continuous", "separator", "one end of the instance's long axis", "the other end of its long axis"
    ),
    "pc2": Descriptor(
        "continuous", "separator", "one side of the instance's short axis", "the other side of its short axis"
    ),
    # convex hull and onion layers
    "on_hull": Descriptor("bool", "boundary", "convex-hull cities", "interior (non-hull) cities"),
    "onion_depth": Descriptor("continuous", "boundary", "deep onion layers (inner cities)", "outer onion layers"),
    "hull_distance": Descriptor("continuous", "boundary", "cities far inside the hull", "cities near the hull"),
    # local density
    "nn1": Descriptor(
        "continuous", "density / cluster", "isolated cities (far 1st neighbour)", "cities with a close neighbour"
    ),
    "nn3": Descriptor(
        "continuous", "density / cluster", "sparse surroundings (far 3rd neighbour)", "dense surroundings"
    ),
    "nn5": Descriptor(
        "continuous", "density / cluster", "sparse surroundings (far 5th neighbour)", "dense surroundings"
    ),
    "neighbours": Descriptor("continuous", "density / cluster", "many neighbours within 1/sqrt(N)", "few neighbours"),
    "relative_density": Descriptor(
        "continuous", "density / cluster", "denser than the instance's average", "sparser than the instance's average"
    ),
    # per-instance clusters
    "cluster_size": Descriptor(
        "continuous", "density / cluster", "cities in large clusters", "cities in small clusters"
    ),
    "cluster_centre_distance": Descriptor(
        "continuous", "density / cluster", "cities far from their cluster's centre", "cities at their cluster's centre"
    ),
    "cluster_boundary": Descriptor(
        "bool", "density / cluster", "cities on their cluster's boundary", "cities inside their cluster"
    ),
    "generator_cluster_size": Descriptor(
        "continuous", "density / cluster", "cities in large generated clusters", "cities in small generated clusters"
    ),
    "generator_centre_distance": Descriptor(
        "continuous",
        "density / cluster",
        "cities far from their generated cluster's centre",
        "cities at their generated cluster's centre",
    ),
    "generator_cluster_boundary": Descriptor(
        "bool",
        "density / cluster",
        "cities on their generated cluster's boundary",
        "cities inside their generated cluster",
    ),
    # place in a near-optimal tour
    "tour_edge_short": Descriptor(
        "continuous", "tour structure", "a long shorter tour edge", "a short shorter tour edge"
    ),
    "tour_edge_long": Descriptor("continuous", "tour structure", "a long longer tour edge", "a short longer tour edge"),
    "tour_to_nn": Descriptor(
        "bool",
        "tour structure",
        "cities whose tour goes to their nearest neighbour",
        "cities whose tour skips their nearest neighbour",
    ),
    "turn_angle": Descriptor("continuous", "tour structure", "sharp turns in the tour", "straight runs of the tour"),
    # per decoding step (decoder rows: the current city and what is left)
    "step_fraction": Descriptor("continuous", "decoding state", "late steps", "early steps"),
    "current_to_first": Descriptor(
        "continuous", "decoding state", "current city far from the start", "current city near the start"
    ),
    "nearest_unvisited": Descriptor(
        "continuous", "decoding state", "a far nearest unvisited city", "a close nearest unvisited city"
    ),
    "unvisited_nearby": Descriptor(
        "continuous",
        "decoding state",
        "many unvisited cities near the current one",
        "few unvisited cities near the current one",
    ),
    "current_on_hull": Descriptor("bool", "decoding state", "current city on the hull", "current city inside the hull"),
    "current_radius": Descriptor(
        "continuous", "decoding state", "current city at the periphery", "current city near the centre"
    ),
    # per city at one decision
    "distance_from_current": Descriptor(
        "continuous", "decoding state", "cities far from the current one", "cities near the current one"
    ),
    "rank_from_current": Descriptor(
        "continuous",
        "decoding state",
        "unvisited cities far down the nearest-first order",
        "the nearest unvisited cities",
    ),
    "visited": Descriptor("bool", "decoding state", "visited cities", "unvisited cities"),
}
CITY = ("x", "y", "rel_x", "rel_y", "radius", "pc1", "pc2", "on_hull", "onion_depth", "hull_distance", "nn1", "nn3",
        "nn5", "neighbours", "relative_density", "cluster_size", "cluster_centre_distance", "cluster_boundary",
        "tour_edge_short", "tour_edge_long", "tour_to_nn", "turn_angle")  # fmt: skip
STEP = ("step_fraction", "current_to_first", "nearest_unvisited", "unvisited_nearby", "current_on_hull",
        "current_radius")  # fmt: skip
DECISION = ("distance_from_current", "rank_from_current", "visited")
GENERATOR = ("generator_cluster_size", "generator_centre_distance", "generator_cluster_boundary")


def check_instances(locs) -> np.ndarray:
    locs = np.asarray(locs, dtype=np.float64)
    if locs.ndim != 3 or locs.shape[2] != 2 or locs.shape[1] < 3:
        raise ValueError(f"instances must be [batch, node >= 3, 2], got shape {list(locs.shape)}")
    if not np.isfinite(locs).all():
        raise ValueError("instances hold NaN or Inf coordinates")
    return locs


def distances(locs: np.ndarray) -> np.ndarray:
    """[batch, node, node] Euclidean distances."""
    return np.linalg.norm(locs[:, :, None] - locs[:, None], axis=-1)


def hull_vertices(points: np.ndarray) -> np.ndarray:
    """Indices of the convex hull's vertices of [n, 2] points (points on an edge between two vertices are not
    vertices); every point when fewer than 3 remain or all are collinear."""
    if len(points) < 3:
        return np.arange(len(points))
    try:
        return np.sort(ConvexHull(points).vertices)
    except QhullError:  # collinear or coincident: all points are on the (degenerate) hull
        return np.arange(len(points))


def onion_layers(points: np.ndarray) -> np.ndarray:
    """[n] onion depth: 0 for the convex hull's vertices, 1 for the hull of what remains, and so on."""
    depth = np.full(len(points), -1)
    left, layer = np.arange(len(points)), 0
    while len(left):
        on = left[hull_vertices(points[left])]
        depth[on] = layer
        left, layer = np.setdiff1d(left, on), layer + 1
    return depth


def distance_to_hull(points: np.ndarray) -> np.ndarray:
    """[n] distance from each point to the boundary of the points' convex hull (0 on it)."""
    try:
        ring = ConvexHull(points).vertices  # counter-clockwise order
    except QhullError:  # collinear or coincident: every point is on the degenerate hull
        return np.zeros(len(points))
    a, b = points[ring], points[np.roll(ring, -1)]  # [edges, 2]
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)  # [n, edges]
    return np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1).min(1)


def clusters(points: np.ndarray, nn1: np.ndarray) -> np.ndarray:
    """[n] cluster ids: single-linkage clustering cut at 2 x the instance's mean nearest-neighbour distance."""
    return fcluster(linkage(points, "single"), t=2.0 * nn1.mean(), criterion="distance")


def cluster_descriptors(p: np.ndarray, ids: np.ndarray, spread: float) -> tuple[np.ndarray, ...]:
    """[n] each: the size of the city's cluster as a share of n, its distance to the cluster's mean / spread, and
    whether it is a vertex of its cluster's hull."""
    n = len(p)
    size, centre_distance, boundary = np.zeros(n), np.zeros(n), np.zeros(n)
    for c in np.unique(ids):
        members = np.flatnonzero(ids == c)
        size[members] = len(members) / n
        centre_distance[members] = np.linalg.norm(p[members] - p[members].mean(0), axis=1) / spread
        boundary[members[hull_vertices(p[members])]] = 1.0
    return size, centre_distance, boundary


def _instance_descriptors(p: np.ndarray, dist: np.ndarray, tour: np.ndarray) -> dict[str, np.ndarray]:
    n = len(p)
    centred = p - p.mean(0)
    spread = np.sqrt((centred**2).sum(1).mean()) + 1e-12
    _, vectors = np.linalg.eigh(centred.T @ centred)
    major = vectors[:, 1] * (1 if vectors[0, 1] >= 0 else -1)  # long axis, pointing to +x
    minor = np.array([-major[1], major[0]])
    nearest = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)  # [n, n] row i: distances to the others, sorted
    depth = onion_layers(p)
    size, centre_distance, boundary = cluster_descriptors(p, clusters(p, nearest[:, 0]), spread)
    position = np.empty(n, dtype=np.int64)
    position[tour] = np.arange(n)
    before, after = tour[(position - 1) % n], tour[(position + 1) % n]
    e_in, e_out = dist[np.arange(n), before], dist[np.arange(n), after]
    v_in, v_out = p - p[before], p[after] - p
    cos = (v_in * v_out).sum(1) / (np.linalg.norm(v_in, axis=1) * np.linalg.norm(v_out, axis=1) + 1e-12)
    nn = (dist + np.diag(np.full(n, np.inf))).argmin(1)
    return {
        "x": p[:, 0],
        "y": p[:, 1],
        "rel_x": centred[:, 0] / spread,
        "rel_y": centred[:, 1] / spread,
        "radius": np.linalg.norm(centred, axis=1) / spread,
        "pc1": centred @ major / spread,
        "pc2": centred @ minor / spread,
        "on_hull": (depth == 0).astype(np.float64),
        "onion_depth": depth.astype(np.float64),
        "hull_distance": distance_to_hull(p),
        "nn1": nearest[:, 0],
        "nn3": nearest[:, min(2, n - 2)],
        "nn5": nearest[:, min(4, n - 2)],
        "neighbours": (nearest[:, : n - 1] <= 1.0 / np.sqrt(n)).sum(1).astype(np.float64),
        "relative_density": nearest[:, min(2, n - 2)].mean() / (nearest[:, min(2, n - 2)] + 1e-12),
        "cluster_size": size,
        "cluster_centre_distance": centre_distance,
        "cluster_boundary": boundary,
        "tour_edge_short": np.minimum(e_in, e_out),
        "tour_edge_long": np.maximum(e_in, e_out),
        "tour_to_nn": ((nn == before) | (nn == after)).astype(np.float64),
        "turn_angle": np.arccos(np.clip(cos, -1.0, 1.0)),
    }


def city_descriptors(locs, tours, generator_clusters=None) -> dict[str, np.ndarray]:
    """Every per-city descriptor, name -> [batch, node].

    - x, y: absolute position. rel_x, rel_y: (p_i - c) / s. radius: |p_i - c| / s.
    - pc1, pc2: (p_i - c) . e / s along the instance's principal axes (e1 the long one, its x-component >= 0;
      e2 = e1 turned by +90 degrees).
    - on_hull: p_i is a vertex of the convex hull. onion_depth: the convex layer p_i is on when hulls are peeled one
      by one (0 = the hull). hull_distance: distance from p_i to the hull's boundary.
    - nn1, nn3, nn5: d_1(i), d_3(i), d_5(i) (capped at the farthest city for small N). neighbours: the number of
      other cities within r_N. relative_density: mean_j d_3(j) / d_3(i) (> 1: denser than the instance's average).
    - cluster_size (a share of N), cluster_centre_distance (|p_i - mean of its cluster| / s), cluster_boundary (a
      vertex of its cluster's hull): single-linkage clusters cut at 2 x mean_j d_1(j).
    - tour_edge_short / tour_edge_long: the shorter / longer of the city's two edges in `tours`; tour_to_nn: one of
      them goes to its nearest neighbour; turn_angle: the angle between the incoming and the outgoing edge
      (0 = straight on, pi = back).
    - With `generator_clusters` [batch, node] (the clustered generator's own labels, policy.env.generate_clusters):
      generator_cluster_size, generator_centre_distance, generator_cluster_boundary, as the cluster_* ones.
    """
    locs = check_instances(locs)
    tours = np.asarray(tours)
    if tours.shape != locs.shape[:2]:
        raise ValueError(f"tours must be [batch, node] = {list(locs.shape[:2])}, got {list(tours.shape)}")
    dist = distances(locs)
    rows = [_instance_descriptors(p, d, t) for p, d, t in zip(locs, dist, tours, strict=True)]
    out = {name: np.stack([r[name] for r in rows]) for name in CITY}
    if generator_clusters is not None:
        centred = locs - locs.mean(1, keepdims=True)
        spreads = np.sqrt((centred**2).sum(-1).mean(1)) + 1e-12
        per = [cluster_descriptors(p, ids, s) for p, ids, s in zip(locs, np.asarray(generator_clusters), spreads,
                                                                   strict=True)]  # fmt: skip
        out.update({name: np.stack([r[i] for r in per]) for i, name in enumerate(GENERATOR)})
    return out


def step_descriptors(locs, tours) -> dict[str, np.ndarray]:
    """Every per-step descriptor for the decisions t = 1 .. N-1 along `tours`, name -> [batch, node - 1].

    At step t the tour so far is tours[:t], the current city q = tours[t-1], the first f = tours[0].
    - step_fraction: t / N. current_to_first: |q - f|.
    - nearest_unvisited: min over unvisited j of |q - p_j|. unvisited_nearby: unvisited cities within r_N of q.
    - current_on_hull: q is a hull vertex. current_radius: |q - c| / s.
    """
    locs = check_instances(locs)
    tours = np.asarray(tours)
    b, n, _ = locs.shape
    dist = distances(locs)
    rows = np.arange(b)[:, None]
    current, first = tours[:, :-1], tours[:, :1]  # [batch, n-1] the current city at steps 1..n-1
    visited = np.zeros((b, n - 1, n), dtype=bool)  # [batch, step, city]
    position = np.argsort(tours, axis=1)  # where each city stands in the tour
    visited[:] = position[:, None, :] < np.arange(1, n)[None, :, None]
    from_current = dist[rows, current]  # [batch, n-1, node]
    unvisited = np.where(visited, np.inf, from_current)
    centred = locs - locs.mean(1, keepdims=True)
    spread = np.sqrt((centred**2).sum(-1).mean(1, keepdims=True)) + 1e-12
    on_hull = np.stack([np.isin(np.arange(n), hull_vertices(p)) for p in locs]).astype(np.float64)
    return {
        "step_fraction": np.broadcast_to(np.arange(1, n) / n, (b, n - 1)).copy(),
        "current_to_first": dist[rows, current, first],
        "nearest_unvisited": unvisited.min(-1),
        "unvisited_nearby": (unvisited <= 1.0 / np.sqrt(n)).sum(-1).astype(np.float64),
        "current_on_hull": on_hull[rows, current],
        "current_radius": np.linalg.norm(centred, axis=-1)[rows, current] / spread,
    }


def decision_descriptors(locs, prefix) -> dict[str, np.ndarray]:
    """Per city at one decision of one instance (locs [node, 2], prefix the tour so far, at least one city),
    name -> [node]: distance_from_current |p_i - q|; rank_from_current 0 for the nearest unvisited city, 1 for the
    next, ... (NaN for visited ones); visited."""
    p = check_instances(np.asarray(locs)[None])[0]
    prefix = [int(c) for c in prefix]
    if not prefix:
        raise ValueError("a decision needs the tour so far (at least its first city)")
    d = np.linalg.norm(p - p[prefix[-1]], axis=1)
    visited = np.zeros(len(p))
    visited[prefix] = 1.0
    rank = np.full(len(p), np.nan)
    left = np.flatnonzero(visited == 0)
    rank[left[np.argsort(d[left], kind="stable")]] = np.arange(len(left))
    return {"distance_from_current": d, "rank_from_current": rank, "visited": visited}
