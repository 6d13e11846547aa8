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

from collections.abc import Callable

import torch

from clt.model import CrossLayerTranscoder
from policy.env import tour_length
from sae.hooks import HookedPolicy

REPLACEMENTS = ("transcoder", "transcoder+error", "mean", "zero")

Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (source, target) [batch, node, d] -> new target


def replacement(kind: str, transcoder: CrossLayerTranscoder, target_mean: torch.Tensor) -> Replacement:
    """The function that computes a replacement target from the live (source, target)."""

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


def spliced_rollout(
    hooked: HookedPolicy,
    locs: torch.Tensor,
    source_hook: str,
    target_hook: str,
    replace: Replacement,
    **rollout,
):
    """A rollout with the target hook's output replaced by `replace(live source, live target)`."""
    live: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, name: str) -> None:
        live["source"] = x

    def swap(x: torch.Tensor, name: str) -> torch.Tensor:
        return replace(live["source"], x)

    return hooked.run_with_hooks(locs, {source_hook: record, target_hook: swap}, **rollout)


@torch.no_grad()
def splice_metrics(
    hooked: HookedPolicy,
    locs: torch.Tensor,
    source_hook: str,
    target_hook: str,
    replacements: dict[str, Replacement],
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Tour length, gap, action agreement and KL for the original policy and each replacement."""
    sums: dict[str, dict[str, float]] = {name: {} for name in ["original", *replacements]}

    def add(name: str, key: str, value: float) -> None:
        sums[name][key] = sums[name].get(key, 0.0) + value

    steps = 0
    for batch in locs.split(batch_size):
        original = hooked.model(batch, return_log_probs=True)
        add("original", "length", tour_length(batch, original.actions[:, 0]).sum().item())
        log_p = original.log_probs  # [batch, 1, step, node]
        p = log_p.exp()
        steps += log_p.shape[0] * log_p.shape[2]
        for name, replace in replacements.items():
            free = spliced_rollout(hooked, batch, source_hook, target_hook, replace)
            add(name, "length", tour_length(batch, free.actions[:, 0]).sum().item())
            add(name, "same_tour", (free.actions == original.actions).all(-1).sum().item())
            forced = spliced_rollout(hooked, batch, source_hook, target_hook, replace, actions=original.actions,
                                     return_log_probs=True).log_probs  # fmt: skip
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
        damage = report["mean"]["mean_length"] - base
        report["transcoder"]["recovered"] = (
            (report["mean"]["mean_length"] - report["transcoder"]["mean_length"]) / damage if damage else float("nan")
        )
    return report
