"""Read TSPLIB `.tsp` files with EUC_2D coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TsplibInstance:
    name: str
    coords: torch.Tensor  # [node, 2] in the file's own units (float64)

    def euc_2d_length(self, tour: list[int]) -> int:
        """Tour length as TSPLIB defines it for EUC_2D: each edge rounded to the nearest integer."""
        pts = self.coords.tolist()
        return sum(math.floor(math.dist(pts[a], pts[b]) + 0.5) for a, b in zip(tour, tour[1:] + tour[:1], strict=True))


def read_tsplib(path: str | Path) -> TsplibInstance:
    """Parse a TSPLIB file; only EDGE_WEIGHT_TYPE EUC_2D with a NODE_COORD_SECTION is supported."""
    path = Path(path)
    header: dict[str, str] = {}
    coords: list[tuple[float, float]] = []
    in_coords = False
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("NODE_COORD_SECTION"):
            in_coords = True
            continue
        if line == "EOF" or (in_coords and not line[0].isdigit() and line[0] not in "+-."):
            if in_coords:
                break
            continue
        if in_coords:
            parts = line.split()
            if len(parts) < 3:
                raise ValueError(f"{path}:{lineno}: expected 'id x y', got {line!r}")
            try:
                coords.append((float(parts[1]), float(parts[2])))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: bad coordinate in {line!r}") from err
        elif ":" in line:
            key, value = line.split(":", 1)
            header[key.strip().upper()] = value.strip()
    kind = header.get("EDGE_WEIGHT_TYPE")
    if kind != "EUC_2D":
        raise ValueError(f"{path}: only EDGE_WEIGHT_TYPE EUC_2D is supported, this file has {kind!r}")
    dimension = int(header.get("DIMENSION", len(coords)))
    if len(coords) != dimension:
        raise ValueError(f"{path}: DIMENSION says {dimension} nodes, NODE_COORD_SECTION has {len(coords)}")
    return TsplibInstance(header.get("NAME", path.stem), torch.tensor(coords, dtype=torch.float64))
