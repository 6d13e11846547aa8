"""Causal splicing: run the policy with a pair's target activation replaced, and measure the tours.

Inside one forward pass (sae.hooks.HookedPolicy.run_with_hooks) the source hook records
the live source activation and the target hook returns a replacement for the target:

- `transcoder`: the transcoder's prediction from the live source;
- `transcoder+error`: the prediction plus the error term (y - y_hat): the original, up to
  rounding (a check that splicing itself changes nothing);
- `mean`: the target's dataset mean (mean ablation);
- `zero`: zeros (zero ablation).

Against the unmodified policy on the same instances, with greedy decoding:
- mean tour length and its relative gap to the original;
- per decoding step along the original tours (teacher forcing): how often the spliced
  policy's greedy action is the original one, and KL(original || spliced) of the action
  distributions;
- `recovered = (L_mean - L_splice) / (L_mean - L_orig)`: the fraction of the
  mean-ablation damage to tour length that the transcoder recovers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from clt.model import CrossLayerTranscoder
from clt.multilayer import MultiLayerTranscoder
from policy.env import tour_length
from policy.model import Rollout
from sae.hook_names import parse_layer_hook
from sae.hooks import HookedPolicy, HookFn

REPLACEMENTS = ("transcoder", "transcoder+error", "mean", "zero")
ABLATIONS = ("mean", "zero")
"""The replacements that do not read the transcoder: one splice serves every transcoder of a pair."""

Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (source, target) [batch, node, d] -> new target


def replacement(kind: str, transcoder: CrossLayerTranscoder | None, target_mean: torch.Tensor) -> Replacement:
    """The function that computes a replacement target from the live (source, target) (mean and zero ablation
    need no transcoder)."""

    def predict(source: torch.Tensor) -> torch.Tensor:
        rows = source.reshape(-1, source.shape[-1])
        return transcoder(rows)[0].reshape(*source.shape[:-1], -1)

    if kind == "transcoder":
        return lambda source, target: predict(source)
    if kind == "transcoder+error":
        return lambda source, target: (y_hat := predict(source)) + (target - y_hat)
    if kind == "mean":
        return lambda source, target: target_mean.to(target).expand_as(target)
    if kind == "zero":
        return lambda source, target: torch.zeros_like(target)
    raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {kind!r}")


def pair_hooks(source_hook: str, target_hook: str, replace: Replacement) -> dict[str, HookFn]:
    """Hooks for one rollout: the source hook records, the target hook returns `replace(live source, live target)`."""
    live: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, name: str) -> None:
        live["source"] = x

    def swap(x: torch.Tensor, name: str) -> torch.Tensor:
        return replace(live["source"], x)

    return {source_hook: record, target_hook: swap}


def multilayer_hooks(
    model: MultiLayerTranscoder, kind: str, target_means: torch.Tensor, layers: list[int] | None = None
) -> dict[str, HookFn]:
    """Hooks for one rollout that replace every layer's mlp_out (or only `layers`) at once.

    Each mlp_in is recorded as the forward pass reaches it, so layer m's prediction reads the
    live mlp_in of layers 0..m. `kind` as for pairs; `mean` uses each layer's target mean.
    """
    if kind not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {kind!r}")
    live: dict[int, torch.Tensor] = {}
    n = model.cfg.n_layers

    def record(x: torch.Tensor, name: str) -> None:
        live[parse_layer_hook(name).layer] = x

    def swap(y: torch.Tensor, name: str) -> torch.Tensor | None:
        m = parse_layer_hook(name).layer
        if layers is not None and m not in layers:
            return None
        if kind == "mean":
            return target_means[m].to(y).expand_as(y)
        if kind == "zero":
            return torch.zeros_like(y)
        rows = [live[i].reshape(-1, y.shape[-1]) for i in range(m + 1)]
        y_hat = model.predict_layer(rows, m).reshape(y.shape)
        return y_hat if kind == "transcoder" else y_hat + (y - y_hat)

    return {**{f"encoder_layer_{i}.mlp_in": record for i in range(n)},
            **{f"encoder_layer_{i}.mlp_out": swap for i in range(n)}}  # fmt: skip


@torch.no_grad()
def original_rollouts(hooked: HookedPolicy, locs: torch.Tensor, batch_size: int = 256) -> list[Rollout]:
    """The unmodified policy's greedy rollouts (with log-probabilities), one per batch of `batch_size` instances:
    what splice_metrics compares against, reusable for every replacement on the same instances."""
    return [hooked.model(batch, return_log_probs=True) for batch in locs.split(batch_size)]


@torch.no_grad()
def splice_metrics(
    hooked: HookedPolicy,
    locs: torch.Tensor,
    replacements: dict[str, Callable[[], dict[str, HookFn]]],
    batch_size: int = 256,
    originals: list[Rollout] | None = None,
) -> dict[str, dict[str, float]]:
    """Tour length, gap, action agreement and KL for the original policy and each replacement.

    `replacements` maps a name to a function that makes one rollout's hooks (pair_hooks,
    multilayer_hooks); `recovered` is reported for `transcoder` when `mean` is there too. `originals`:
    original_rollouts(hooked, locs, batch_size), if already computed. A replacement's encoder runs once
    per batch: its greedy rollout and the one that follows the original tours decode the same encoding.
    """
    sums: dict[str, dict[str, float]] = {name: {} for name in ["original", *replacements]}

    def add(name: str, key: str, value: float) -> None:
        sums[name][key] = sums[name].get(key, 0.0) + value

    model = hooked.model
    steps = 0
    originals = originals if originals is not None else original_rollouts(hooked, locs, batch_size)
    for batch, original in zip(locs.split(batch_size), originals, strict=True):
        add("original", "length", tour_length(batch, original.actions[:, 0]).sum().item())
        log_p = original.log_probs  # [batch, 1, step, node]
        p = log_p.exp()
        steps += log_p.shape[0] * log_p.shape[2]
        for name, make_hooks in replacements.items():
            with hooked.hooks(make_hooks()):
                embeddings = model.encode(batch)
                free = model(batch, embeddings=embeddings)
                forced = model(batch, actions=original.actions, return_log_probs=True, embeddings=embeddings).log_probs
            add(name, "length", tour_length(batch, free.actions[:, 0]).sum().item())
            add(name, "same_tour", (free.actions == original.actions).all(-1).sum().item())
            add(name, "agreement", (forced.argmax(-1) == log_p.argmax(-1)).sum().item())
            kl = torch.where(p > 0, p * (log_p - forced), torch.zeros_like(p)).sum(-1)  # [batch, 1, step]
            add(name, "kl", kl.sum().item())
    n = len(locs)
    base = sums["original"]["length"] / n
    report = {"original": {"mean_length": base}}
    for name in replacements:
        length = sums[name]["length"] / n
        report[name] = {
            "mean_length": length,
            "gap": length / base - 1,
            "same_tour_fraction": sums[name]["same_tour"] / n,
            "action_agreement": sums[name]["agreement"] / steps,
            "mean_kl": sums[name]["kl"] / steps,
        }
    if "mean" in report and "transcoder" in report:
        report["transcoder"]["recovered"] = recovered(report)
    return report


def recovered(report: dict) -> float | None:
    """The share of the mean-ablation damage the transcoder undoes: (mean - transcoder) / (mean - original) lengths;
    None where mean ablation does no damage worth a ratio (under 0.1% of the tour length)."""
    lengths = {name: report[name]["mean_length"] for name in ("original", "mean", "transcoder")}
    if not all(math.isfinite(v) for v in lengths.values()):
        raise ValueError(f"splice lengths are not finite ({lengths}): the transcoder or the data is corrupt")
    damage = lengths["mean"] - lengths["original"]
    if abs(damage) <= 1e-3 * lengths["original"]:
        return None
    return (lengths["mean"] - lengths["transcoder"]) / damage
