"""Solving instances with a trained policy: decoding modes, x8 augmentation, best-of selection."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from policy.env import check_locs, is_valid_tour, symmetric_augment, tour_length
from policy.model import AttentionModel

DECODE_MODES = ("greedy", "sample", "multistart")
AUGMENTS = (1, 8)


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give (CUDA: free memory; CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def trajectories_per_instance(decode: str, augment: int, num_samples: int, num_loc: int) -> int:
    """How many tours one instance costs a forward pass: augmentations x samples (sample) x starts (multistart)."""
    return augment * {"greedy": 1, "sample": num_samples, "multistart": num_loc}[decode]


def check_memory(model: AttentionModel, rows: int, n: int, device: torch.device, num_samples: int | None) -> None:
    """Refuse, before allocating, a forward of `rows` trajectories of `n` nodes that cannot fit in memory.

    The estimate counts the encoder's activations (embeddings, feed-forward hidden, attention scores) and the
    decoder's cached keys, all float32, per trajectory: 4 * n * (8 d + ff_hidden + heads * n) bytes.
    """
    cfg = model.cfg
    needed = 4 * rows * n * (8 * cfg.embed_dim + cfg.ff_hidden + cfg.num_heads * n)
    free = free_memory(device)
    if free is not None and needed > free:
        lower = "--batch_size" + (" or --num_samples" if num_samples else "")
        raise ValueError(f"{rows} trajectories per forward pass (batch x augment x samples) need about "
                         f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free: lower {lower}")  # fmt: skip


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
    rows = min(batch_size, locs.shape[0]) * trajectories_per_instance(decode, augment, num_samples, locs.shape[1])
    check_memory(model, rows, locs.shape[1], device, num_samples if decode == "sample" else None)
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
    tours_out, lengths_out = torch.cat(tours), torch.cat(lengths)
    check_tours(tours_out, lengths_out)
    return tours_out, lengths_out


def check_tours(tours: torch.Tensor, lengths: torch.Tensor) -> None:
    """Every tour a permutation of the cities and every length finite, or a ValueError: a policy whose scores are
    not finite decodes "tours" that revisit city 0, which must never be written as a result."""
    bad = (~is_valid_tour(tours, tours.shape[1]) | ~torch.isfinite(lengths)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the policy decoded no valid tour for instance(s) {bad[:10]} (a city repeated or a length "
                         "not finite): its scores are not finite; check the checkpoint and the instances")  # fmt: skip
