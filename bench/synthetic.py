"""Synthetic transcoder pairs that nobody tuned for: known features in superposition behind a nonlinearity.

    s     [rows, n_true]   sparse signed feature magnitudes: feature f is on with probability p_f (a power law
                           in f, scaled to `active` features per row on average), |s_f| ~ Exp(1) + 0.5
    x     = s @ E + noise                     E [n_true, d_in] unit rows: n_true directions in d_in dims
    y     = relu(x @ E^T - t) @ A + noise     A [n_true, d_out] unit rows; t drops the interference of the others
    x_raw = x * x_scale_per_dim + x_offset,   y_raw likewise

so a transcoder with about n_true features can recover y's features from x; a linear map cannot (relu keeps
one sign only, the thresholds cut the rest). `SyntheticSpec` is one data set; `DATA_SETS` is the suite that
`bench.quality` trains every configuration on: scales from 1e-2 to 1e2, per-dim anisotropy, sparser and
denser codes, a wider model, features in a low-rank subspace (as the TSP policy's are). Each data set
reports its noise floor (the FVU of the noise-free y) and the best linear map's FVU (ridge), as references
for the FVUs the configurations reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticSpec:
    name: str
    d: int = 128
    """Source and target width."""
    n_true: int = 1024
    """Ground-truth features."""
    active: float = 12.0
    """Mean active features per row (before the relu keeps about half)."""
    power: float = 0.6
    """Feature f fires with probability proportional to (f + 1)^-power."""
    threshold: float = 1.0
    """t: what the relu subtracts before keeping a feature's read-out."""
    noise: float = 0.02
    """Target noise variance as a fraction of the clean target's variance (the FVU floor)."""
    x_scale: float = 1.0
    y_scale: float = 1.0
    anisotropy: float = 0.0
    """Per-dim scales exp(N(0, anisotropy)) on both sides (0: isotropic)."""
    offset: float = 0.0
    """Per-dim means N(0, offset) added on both sides, in units of the scaled data."""
    rank: int | None = None
    """The feature directions (E's and A's rows) lie in random subspaces of this many dims [default: all d], as
    the TSP policy's activations do (90% of the variance in 8 of 128 dims)."""


DATA_SETS = (
    SyntheticSpec("base"),
    SyntheticSpec("small_x_large_y", x_scale=1e-2, y_scale=1e2, offset=3.0),
    SyntheticSpec("large_x_small_y", x_scale=1e2, y_scale=1e-2, offset=3.0),
    SyntheticSpec("anisotropic", anisotropy=1.5),
    SyntheticSpec("sparse", active=4.0),
    SyntheticSpec("dense", active=40.0),
    SyntheticSpec("wide", d=256, n_true=2048, active=16.0),
    SyntheticSpec("low_rank", rank=16, n_true=256),
)


@dataclass
class SyntheticPairs:
    x: torch.Tensor  # [rows, d] raw sources
    y: torch.Tensor  # [rows, d] raw targets
    x_val: torch.Tensor
    y_val: torch.Tensor
    noise_floor: float  # validation FVU of the noise-free target
    ridge_fvu: float  # validation FVU of the best linear map (fitted on the training rows)


def _sample(spec: SyntheticSpec, rows: int, world: dict, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    index = (torch.rand(rows, spec.n_true, generator=g) < world["p"]).nonzero()  # [nnz, 2] (row, feature)
    magnitude = torch.empty(len(index)).exponential_(1.0, generator=g) + 0.5
    sign = torch.randint(0, 2, (len(index),), generator=g) * 2.0 - 1
    x = torch.zeros(rows, spec.d).index_add_(0, index[:, 0], (sign * magnitude)[:, None] * world["E"][index[:, 1]])
    x = x + 0.01 * torch.randn(rows, spec.d, generator=g)
    clean = torch.relu(x @ world["E"].T - spec.threshold) @ world["A"]
    y = clean + world["noise_std"] * torch.randn(rows, spec.d, generator=g)
    return x * world["x_scale"] + world["x_offset"], y * world["y_scale"] + world["y_offset"], clean


def fvu(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    return ((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def _directions(spec: SyntheticSpec, g: torch.Generator) -> torch.Tensor:
    """[n_true, d] random unit rows, within a random `spec.rank`-dim subspace if one is set."""
    if spec.rank is None:
        return torch.nn.functional.normalize(torch.randn(spec.n_true, spec.d, generator=g), dim=1)
    basis = torch.linalg.qr(torch.randn(spec.d, spec.rank, generator=g))[0].T  # [rank, d] orthonormal rows
    return torch.nn.functional.normalize(torch.randn(spec.n_true, spec.rank, generator=g) @ basis, dim=1)


def make_pairs(spec: SyntheticSpec, rows: int, val_rows: int, seed: int = 0) -> SyntheticPairs:
    """`rows` training and `val_rows` validation pairs of `spec`, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    d = spec.d
    p = (torch.arange(spec.n_true) + 1.0) ** -spec.power
    world = {"E": _directions(spec, g), "A": _directions(spec, g),
             "p": (p * spec.active / p.sum()).clamp(max=1.0),
             "x_scale": spec.x_scale * torch.exp(spec.anisotropy * torch.randn(d, generator=g)),
             "y_scale": spec.y_scale * torch.exp(spec.anisotropy * torch.randn(d, generator=g)),
             "noise_std": torch.zeros(())}  # fmt: skip
    world["x_offset"] = spec.offset * torch.randn(d, generator=g) * world["x_scale"]
    world["y_offset"] = spec.offset * torch.randn(d, generator=g) * world["y_scale"]
    _, _, clean = _sample(spec, 20_000, world, g)
    world["noise_std"] = (spec.noise * clean.var(0).sum() / d).sqrt()
    x, y, _ = _sample(spec, rows, world, g)
    x_val, y_val, clean_val = _sample(spec, val_rows, world, g)
    noise_floor = fvu(clean_val * world["y_scale"] + world["y_offset"], y_val)
    return SyntheticPairs(x, y, x_val, y_val, noise_floor, ridge_fvu(x, y, x_val, y_val))


def ridge_fvu(x, y, x_val, y_val, ridge: float = 1e-3) -> float:
    """Validation FVU of the least-squares affine map x -> y (float64, a small ridge on standardised x)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
    xs = ((x - mean) / std).double()
    gram = xs.T @ xs + ridge * len(xs) * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xs.T @ (y - y.mean(0)).double())
    y_hat = ((x_val - mean) / std).double() @ w + y.mean(0).double()
    return fvu(y_hat.float(), y_val)
