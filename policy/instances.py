"""Reading instances a user gives: a .npy of coordinates in the unit square, or a TSPLIB EUC_2D .tsp file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from policy.env import check_locs, scale_to_unit_square
from policy.tsplib import TsplibInstance, read_tsplib

log = logging.getLogger(__name__)


def read_instances(path: Path) -> tuple[torch.Tensor, float, TsplibInstance | None]:
    """(locs [B, n, 2], scale to the input's units, TSPLIB instance or None)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such instances file: {path}")
    if path.suffix == ".tsp":
        inst = read_tsplib(path)
        scaled, factor = scale_to_unit_square(inst.coords)
        return check_locs(scaled.float()), factor, inst
    if path.suffix != ".npy":
        raise ValueError(f"{path}: expected a .npy array or a TSPLIB .tsp file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a plain numeric .npy array ({err})") from err
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: expected float coordinates, got dtype {array.dtype}")
    locs = check_locs(torch.from_numpy(array.astype(np.float32)))
    if locs.min() < 0 or locs.max() > 1:
        log.warning("coordinates outside the unit square: the policy was trained on [0, 1]^2")
    return locs, 1.0, None
