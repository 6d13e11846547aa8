"""Reference tours to measure a policy against.

- `lkh`: LKH-3 through the optional `elkai` package (`pip install -e .[solvers]`).
  LKH rounds edge lengths to integers, so coordinates are scaled by 1e6 first;
  on the raw unit square it would return poor tours.
- `2opt`: a built-in nearest-neighbour tour improved by 2-opt until no move helps,
  batched in torch. A local optimum, not an optimal tour: gaps measured against
  it are labelled as such.
"""

from __future__ import annotations

import importlib.util

import torch
from tqdm import tqdm

from policy.env import tour_length

SOLVERS = ("auto", "lkh", "2opt")
LKH_SCALE = 1e6


def has_lkh() -> bool:
    return importlib.util.find_spec("elkai") is not None


def lkh(locs: torch.Tensor, runs: int = 10, progress: bool = False) -> torch.Tensor:
    """LKH-3 tours [batch, node] for instances [batch, node, 2]."""
    import elkai

    tours = []
    for inst in tqdm(locs.cpu().double() * LKH_SCALE, desc="LKH-3", disable=not progress):
        coords = {i: (float(x), float(y)) for i, (x, y) in enumerate(inst.tolist())}
        tours.append(elkai.Coordinates2D(coords).solve_tsp(runs=runs)[:-1])
    return torch.tensor(tours, dtype=torch.long)


def nearest_neighbour(locs: torch.Tensor) -> torch.Tensor:
    """Greedy nearest-neighbour tours from node 0 -> [batch, node]."""
    b, n, _ = locs.shape
    dist = torch.cdist(locs, locs)  # [batch, node, node]
    visited = torch.zeros(b, n, dtype=torch.bool)
    current = torch.zeros(b, dtype=torch.long)
    rows = torch.arange(b)
    tour = [current]
    visited[rows, current] = True
    for _ in range(n - 1):
        d = dist[rows, current].masked_fill(visited, float("inf"))
        current = d.argmin(dim=1)
        visited[rows, current] = True
        tour.append(current)
    return torch.stack(tour, dim=1)


def two_opt(locs: torch.Tensor, tours: torch.Tensor, max_iterations: int = 10_000) -> torch.Tensor:
    """Apply the best improving 2-opt move per instance until none improves -> [batch, node]."""
    b, n, _ = locs.shape
    tours = tours.clone()
    rows = torch.arange(b)
    positions = torch.arange(n)
    i_idx, j_idx = torch.triu_indices(n, n, offset=2)
    keep = ~((i_idx == 0) & (j_idx == n - 1))  # that pair shares an edge
    i_idx, j_idx = i_idx[keep], j_idx[keep]
    dist = torch.cdist(locs.double(), locs.double())  # [batch, node, node]

    def edge(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [batch, moves] node ids -> lengths
        return dist[rows[:, None], u, v]

    for _ in range(max_iterations):
        a, a_next = tours[:, i_idx], tours[:, (i_idx + 1) % n]  # [batch, moves]
        c, c_next = tours[:, j_idx], tours[:, (j_idx + 1) % n]
        delta = edge(a, c) + edge(a_next, c_next) - edge(a, a_next) - edge(c, c_next)  # [batch, moves]
        best, move = delta.min(dim=1)
        improving = best < -1e-10
        if not improving.any():
            break
        i, j = i_idx[move][:, None], j_idx[move][:, None]  # reverse tour[i+1 .. j]
        inside = (positions > i) & (positions <= j) & improving[:, None]
        index = torch.where(inside, i + 1 + j - positions, positions)
        tours = torch.gather(tours, 1, index)
    return tours


def reference_tours(locs: torch.Tensor, solver: str = "auto", progress: bool = False) -> tuple[torch.Tensor, str]:
    """Tours and the solver's label: `LKH-3` or `nearest neighbour + 2-opt`."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "lkh" and not has_lkh():
        raise ValueError("LKH-3 needs the optional elkai package: pip install -e '.[solvers]'")
    if solver == "lkh" or (solver == "auto" and has_lkh()):
        return lkh(locs, progress=progress), "LKH-3"
    tours = torch.cat([two_opt(chunk, nearest_neighbour(chunk)) for chunk in locs.cpu().split(256)])
    return tours, "nearest neighbour + 2-opt"


def reference_lengths(locs: torch.Tensor, solver: str = "auto", progress: bool = False) -> tuple[torch.Tensor, str]:
    tours, name = reference_tours(locs, solver, progress)
    return tour_length(locs.cpu(), tours), name
