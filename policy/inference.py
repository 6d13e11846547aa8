"""Solving instances with a trained policy: decoding modes, x8 augmentation, best-of selection."""

from __future__ import annotations

import torch
from tqdm import tqdm

from policy.env import check_locs, symmetric_augment, tour_length
from policy.model import AttentionModel

DECODE_MODES = ("greedy", "sample", "multistart")
AUGMENTS = (1, 8)


@torch.no_grad()
def solve(
    model: AttentionModel,
    locs: torch.Tensor,
    decode: str = "greedy",
    augment: int = 1,
    num_samples: int = 16,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best tour per instance -> (tours [batch, node] int64, lengths [batch]).

    - `greedy`: one greedy trajectory (the policy picks the first node too);
    - `sample`: the best of `num_samples` sampled trajectories;
    - `multistart`: one greedy trajectory from every node, the best kept.
    `augment=8` runs each of the 8 symmetries of the unit square and keeps the best.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be positive")
    locs = check_locs(locs)
    device = next(model.parameters()).device
    model.eval()
    tours, lengths = [], []
    for chunk in tqdm(locs.split(batch_size), desc=f"solving ({decode}, x{augment})", disable=not progress):
        chunk = chunk.to(device)
        b = chunk.shape[0]
        variants = symmetric_augment(chunk) if augment == 8 else chunk  # [A * batch, node, 2]
        if decode == "sample":
            variants = variants.repeat(num_samples, 1, 1)
        out = model(
            variants,
            decode="sample" if decode == "sample" else "greedy",
            multistart=decode == "multistart",
            generator=generator,
        )
        candidates = out.actions.view(-1, b, *out.actions.shape[1:]).transpose(0, 1)  # [batch, A, S, node]
        candidates = candidates.reshape(b, -1, chunk.shape[1])  # [batch, A * S, node]
        cand_lengths = tour_length(chunk, candidates)  # [batch, A * S]
        best = cand_lengths.argmin(dim=1)
        tours.append(candidates[torch.arange(b), best].cpu())
        lengths.append(cand_lengths[torch.arange(b), best].cpu())
    return torch.cat(tours), torch.cat(lengths)
