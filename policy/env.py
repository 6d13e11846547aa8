"""The TSP environment: instance distributions, tour length and validity.

Kept apart from the policy (as rl4co does): nothing here knows about the model.
Instances are float32 tensors of shape [batch, node, 2] with coordinates in the
unit square; a tour is an int64 tensor [batch, node] that visits every node once
and returns to its first node.
"""

from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("uniform", "clustered", "mixed")
MIN_NODES = 3
MAX_NODES = 10_000
"""The largest instance a config or file may ask for: attention over n cities holds heads x n^2 scores."""
MAX_COORDINATE = 1e6
"""Coordinates are refused beyond this magnitude: the policy works in the unit square, where it was trained, and
squared distances of huge coordinates overflow float32 (tours of 1e19 came back all zeros)."""


def generate(
    num_instances: int,
    num_loc: int,
    distribution: str = "uniform",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample `num_instances` TSP instances of `num_loc` nodes -> [batch, node, 2].

    - `uniform`: every node uniform in the unit square.
    - `clustered`: 3 to 7 Gaussian clusters (std 0.05 to 0.1), clipped into the square.
    - `mixed`: half of each instance's nodes uniform, half clustered.

    The same `seed` always gives the same instances. Pass `generator` instead to
    draw from a stream the caller owns.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if num_loc < MIN_NODES:
        raise ValueError(f"a TSP instance needs at least {MIN_NODES} nodes, got num_loc={num_loc}")
    if num_instances < 1:
        raise ValueError(f"num_instances must be positive, got {num_instances}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    if distribution == "uniform":
        return torch.rand(num_instances, num_loc, 2, generator=generator)
    if distribution == "clustered":
        return _clustered(num_instances, num_loc, generator)[0]
    locs = torch.rand(num_instances, num_loc, 2, generator=generator)
    half = num_loc // 2
    locs[:, :half] = _clustered(num_instances, half, generator)[0]
    return locs[:, torch.randperm(num_loc, generator=generator)]


def generate_clusters(num_instances: int, num_loc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate(num_instances, num_loc, "clustered", seed)` and the generator's own cluster of each node ->
    ([batch, node, 2], [batch, node] cluster ids)."""
    if num_loc < MIN_NODES or num_instances < 1:
        raise ValueError(f"need num_loc >= {MIN_NODES} and num_instances >= 1, got {num_loc}, {num_instances}")
    return _clustered(num_instances, num_loc, torch.Generator().manual_seed(seed))


def _clustered(num_instances: int, num_loc: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: each node picks one of 3..7 centres and a per-cluster std -> (locs, each node's centre)."""
    num_clusters = torch.randint(3, 8, (num_instances, 1), generator=generator)
    centres = torch.rand(num_instances, 7, 2, generator=generator) * 0.8 + 0.1  # [batch, 7, 2]
    stds = torch.rand(num_instances, 7, 1, generator=generator) * 0.05 + 0.05  # [batch, 7, 1]
    which = (torch.rand(num_instances, num_loc, generator=generator) * num_clusters).long()  # [batch, node]
    centre = torch.gather(centres, 1, which[..., None].expand(-1, -1, 2))
    std = torch.gather(stds, 1, which[..., None])
    noise = torch.randn(num_instances, num_loc, 2, generator=generator)
    return (centre + std * noise).clamp(0.0, 1.0), which


def check_locs(locs: torch.Tensor) -> torch.Tensor:
    """Return `locs` as float32 [batch, node, 2]; raise ValueError on bad input.

    Accepts one instance [node, 2] too (a batch of one is added).
    """
    locs = torch.as_tensor(locs)
    if locs.dim() == 2:
        locs = locs[None]
    if locs.dim() != 3 or locs.shape[-1] != 2:
        raise ValueError(f"instances must have shape [batch, node, 2] or [node, 2], got {list(locs.shape)}")
    if not (locs.is_floating_point()):
        raise ValueError(f"coordinates must be floating point, got dtype {locs.dtype}")
    if locs.shape[0] == 0:
        raise ValueError("got an empty batch of instances")
    if locs.shape[1] < MIN_NODES:
        raise ValueError(f"a TSP instance needs at least {MIN_NODES} nodes, got {locs.shape[1]}")
    if locs.shape[1] > MAX_NODES:
        raise ValueError(f"instances of {locs.shape[1]} nodes are beyond this toolkit's {MAX_NODES}")
    if not torch.isfinite(locs).all():
        bad = (~torch.isfinite(locs)).any(-1).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"coordinates must be finite; NaN or infinite values in instance(s) {bad[:10]}")
    largest = float(locs.abs().max())
    if largest > MAX_COORDINATE:
        raise ValueError(
            f"coordinates up to {largest:.3g} are beyond {MAX_COORDINATE:.0e}: the policy works in the unit square; "
            "scale the instances into [0, 1]^2 (TSPLIB files are scaled on reading)"
        )
    return locs.float()


def is_valid_tour(tours: torch.Tensor, num_loc: int) -> torch.Tensor:
    """True per row where the tour is a permutation of 0..num_loc-1 -> [batch] bool."""
    tours = torch.as_tensor(tours)
    if tours.dim() != 2 or tours.shape[1] != num_loc:
        return torch.zeros(tours.shape[0] if tours.dim() else 0, dtype=torch.bool)
    expected = torch.arange(num_loc, device=tours.device)
    return (tours.sort(dim=1).values == expected).all(dim=1)


def tour_length(locs: torch.Tensor, tours: torch.Tensor) -> torch.Tensor:
    """Length of each closed tour (back to its first node).

    locs: [batch, node, 2]; tours: [batch, node] -> [batch], or [batch, S, node] -> [batch, S].
    """
    b = locs.shape[0]
    flat = tours.reshape(b, -1)  # [batch, S * node]
    ordered = torch.gather(locs, 1, flat[..., None].expand(-1, -1, 2)).view(*tours.shape, 2)
    rolled = torch.roll(ordered, shifts=-1, dims=-2)
    return (ordered - rolled).norm(p=2, dim=-1).sum(dim=-1)


def symmetric_augment(locs: torch.Tensor) -> torch.Tensor:
    """The 8 symmetries of the unit square (POMO's x8 augmentation) -> [8 * batch, node, 2].

    Row `a * batch + b` is instance b under transform a; transform 0 is the identity.
    Tour lengths are unchanged by every transform.
    """
    x, y = locs[..., :1], locs[..., 1:]
    variants = [
        (x, y), (y, x), (1 - x, y), (y, 1 - x),
        (x, 1 - y), (1 - y, x), (1 - x, 1 - y), (1 - y, 1 - x),
    ]  # fmt: skip
    return torch.cat([torch.cat(v, dim=-1) for v in variants], dim=0)


def scale_to_unit_square(coords: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Shift and scale [node, 2] coordinates into the unit square, keeping aspect ratio.

    Returns the scaled coordinates and the factor: length_in_file_units = length * factor.
    """
    lo = coords.min(dim=0).values
    span = float((coords.max(dim=0).values - lo).max())
    factor = span if span > 0 and math.isfinite(span) else 1.0
    return (coords - lo) / factor, factor
