"""One decision of the policy: an instance, the tour so far, and the step t at which the next city is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from policy.checks import check_types
from policy.env import DISTRIBUTIONS, generate
from policy.instances import read_instances
from policy.model import AttentionModel
from policy.options import choice


@dataclass
class Decision:
    locs: torch.Tensor  # [node, 2]
    prefix: list[int]  # the cities visited before step t, in order (t = len(prefix))

    def __post_init__(self):
        n = len(self.locs)
        if self.locs.dim() != 2 or self.locs.shape[1] != 2:
            raise ValueError(f"an instance is [node, 2] coordinates, got {list(self.locs.shape)}")
        if len(self.prefix) >= n:
            raise ValueError(f"step {len(self.prefix)} is past the last decision of a {n}-city tour (steps 0..{n - 1})")
        if len(set(self.prefix)) != len(self.prefix) or any(not 0 <= c < n for c in self.prefix):
            raise ValueError(f"the tour so far must visit distinct cities of 0..{n - 1}, got {self.prefix}")

    @property
    def step(self) -> int:
        return len(self.prefix)

    @property
    def n(self) -> int:
        return len(self.locs)

    @property
    def first(self) -> int | None:
        return self.prefix[0] if self.prefix else None

    @property
    def current(self) -> int | None:
        return self.prefix[-1] if self.prefix else None

    def visited(self) -> torch.Tensor:  # [node] bool
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.locs.device)
        mask[self.prefix] = True
        return mask


class Outcome(NamedTuple):
    """What the policy does at a decision: its raw pointer scores and log-probabilities there, and the tour it
    builds greedily from that step on."""

    scores: torch.Tensor  # [node] raw pointer scores at step t (decoder.logits)
    log_probs: torch.Tensor  # [node], -inf on visited cities
    tour: list[int]  # the whole tour: the prefix, then the policy's greedy choices from step t on

    def tour_tensor(self) -> torch.Tensor:  # [1, node]
        return torch.tensor([self.tour], device=self.scores.device)


def decide(model: AttentionModel, decision: Decision, finish: bool = True, grad: bool = False) -> Outcome:
    """Run the policy (with whatever hooks are attached) along the decision's prefix, then greedily to the end
    (with `finish` False: only step t, and the tour is the prefix and the choice there). Without autograd unless
    `grad`."""
    with torch.set_grad_enabled(grad):
        return _decide(model, decision, finish)


def _decide(model: AttentionModel, decision: Decision, finish: bool) -> Outcome:
    locs = decision.locs[None]
    cache = model.decoder.precompute(model.encode(locs))
    visited = decision.visited()[None, None]  # [batch=1, S=1, node]
    tour = list(decision.prefix)
    scores = log_probs = None
    while len(tour) < decision.n:
        first = torch.tensor([[tour[0]]], device=locs.device) if tour else None
        current = torch.tensor([[tour[-1]]], device=locs.device) if tour else None
        raw = model.decoder(cache, first, current, visited)
        if not torch.isfinite(raw).all():
            raise ValueError(f"the policy's scores at step {len(tour)} are not finite (an intervention too large, "
                             "or non-finite weights): no choice can be read from them")  # fmt: skip
        log_p = model.log_probs(raw, visited)[0, 0]
        if scores is None:
            scores, log_probs = raw[0, 0], log_p
        tour.append(int(log_p.argmax()))
        if not finish:
            break
        visited = visited.clone()
        visited[..., tour[-1]] = True
    return Outcome(scores, log_probs, tour)


def step_scores(model: AttentionModel, decision: Decision, batch: int = 1) -> torch.Tensor:
    """[batch, node]: the raw pointer scores at step t of `batch` copies of the decision's instance, in one batched
    pass (hooks attached may make the copies differ; clt.graph.spliced.spliced_scores). Without autograd."""
    with torch.no_grad():
        locs = decision.locs[None].repeat(batch, 1, 1)
        cache = model.decoder.precompute(model.encode(locs))
        visited = decision.visited()[None, None].repeat(batch, 1, 1)
        first, current = (
            (torch.full((batch, 1), city, device=locs.device) for city in (decision.first, decision.current))
            if decision.prefix
            else (None, None)
        )
        return model.decoder(cache, first, current, visited)[:, 0]


def greedy_tour(model: AttentionModel, locs: torch.Tensor) -> list[int]:
    """The policy's own greedy tour of one instance [node, 2]."""
    return decide(model, Decision(locs, [])).tour


@dataclass
class DecisionOptions:
    """Which decision: an instance (from a file, or generated from a seed), a tour, and the step."""

    step: int | None = None
    """The step t whose choice is explained (0: the first city; the tour's first t cities come before it);
    required unless clt.graph.attribute's --steps names several."""
    locs: str | None = None
    """Instances file: a .npy of [B, n, 2] (or [n, 2]) coordinates in the unit square, or a TSPLIB .tsp file."""
    index: int = 0
    """Which instance of --locs (or of --tour)."""
    seed: int | None = None
    """Instead of --locs: generate one instance from this seed."""
    num_loc: int | None = None
    """With --seed: cities per instance [default: the run's]."""
    distribution: str = choice("uniform", DISTRIBUTIONS)
    """With --seed: the instance distribution."""
    tour: str = "greedy"
    """The tour whose first t cities come before the step: greedy (the policy's own), or a .npy of int tours
    [B, n] or [n] (row --index), e.g. what policy.solve writes."""

    def __post_init__(self):
        check_types(self)
        if (self.locs is None) == (self.seed is None):
            raise ValueError("say which instance: --locs FILE [--index I], or --seed S [--num_loc N]")
        if (self.step is not None and self.step < 0) or self.index < 0:
            raise ValueError("step and index must be >= 0")
        if self.num_loc is not None and self.num_loc < 3:
            raise ValueError("num_loc must be at least 3")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}")

    def name(self, n: int) -> str:
        """A file name for the decision on an n-city instance: <instance>_n<n>[_<tour file>]_step<t>."""
        source = f"{Path(self.locs).stem}_{self.index}" if self.locs else f"seed{self.seed}_{self.distribution}"
        tour = "" if self.tour == "greedy" else f"_{Path(self.tour).stem}"
        return f"{source}_n{n}{tour}_step{self.step}"

    def instance(self, default_num_loc: int) -> tuple[torch.Tensor, dict]:
        """(locs [node, 2], where they came from)."""
        if self.seed is not None:
            n = self.num_loc or default_num_loc
            return generate(1, n, self.distribution, seed=self.seed)[0], {
                "seed": self.seed,
                "num_loc": n,
                "distribution": self.distribution,
            }
        locs = read_instances(Path(self.locs))[0]
        if self.index >= len(locs):
            raise ValueError(f"{self.locs} holds {len(locs)} instance(s); --index {self.index} is past the end")
        return locs[self.index], {"file": str(self.locs), "index": self.index}

    def decision(self, model: AttentionModel, default_num_loc: int) -> tuple[Decision, dict, str]:
        """(the decision, its instance's provenance, its file name)."""
        if self.step is None:
            raise ValueError("say which step: --step T")
        locs, source = self.instance(default_num_loc)
        locs = locs.to(next(model.parameters()).device)
        tour = greedy_tour(model, locs) if self.tour == "greedy" else read_tour(Path(self.tour), self.index, len(locs))
        if self.step >= len(locs):
            raise ValueError(f"step {self.step} is past the last decision of a {len(locs)}-city tour")
        return Decision(locs, tour[: self.step]), {**source, "tour": self.tour}, self.name(len(locs))


def read_tour(path: Path, index: int, n: int) -> list[int]:
    """Row `index` of a .npy of int tours [B, n] (or one tour [n]), checked to visit each of n cities once."""
    if not path.is_file():
        raise FileNotFoundError(f"no such tour file: {path} (or pass --tour greedy)")
    try:
        tours = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a plain .npy array of tours ({err})") from err
    tours = tours[None] if tours.ndim == 1 else tours
    if tours.ndim != 2 or not np.issubdtype(tours.dtype, np.integer):
        raise ValueError(f"{path}: expected int tours [B, n] or [n], got {tours.dtype} {list(tours.shape)}")
    if index >= len(tours):
        raise ValueError(f"{path} holds {len(tours)} tour(s); --index {index} is past the end")
    tour = tours[index].tolist()
    if sorted(tour) != list(range(n)):
        raise ValueError(f"{path} row {index} is not a tour of the instance's {n} cities (each once)")
    return tour
