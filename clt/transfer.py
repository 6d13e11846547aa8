"""A pairwise transcoder evaluated on another condition than it was trained on: another policy run or
checkpoint, another instance distribution, another size (`python -m clt.eval --clt_dir D --policy_run R2
--checkpoint N --distribution D --num_loc N`).

The condition's activations are computed on the fly (no dump): fresh seeded instances go through the policy,
the first half of the instances fits that condition's own ridge baseline (source -> target, as
clt.inspect_pairs fits it on a dump), the second half scores both the transcoder and the ridge map, FVU against
those rows' own mean. Splicing (clt.splice) replaces the target hook inside that policy on the same instances;
mean ablation uses the condition's own target mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from clt.metrics import reconstruction
from clt.model import CrossLayerTranscoder
from clt.pair_stats import Moments, ridge_baseline
from clt.splice import REPLACEMENTS, pair_hooks, replacement, splice_metrics
from policy.env import generate
from policy.runs import LoadedPolicy
from sae.hooks import HookedPolicy


@dataclass
class Condition:
    """Where a transcoder is evaluated: a policy (run and checkpoint) and the instances it is run on."""

    policy: LoadedPolicy
    distribution: str
    num_loc: int

    @property
    def name(self) -> str:
        return f"{self.policy.run_dir.resolve().name}_e{self.policy.epoch}_{self.distribution}_n{self.num_loc}"


@torch.no_grad()
def _activations(hooked: HookedPolicy, locs: torch.Tensor, hooks: list[str], batch_size: int) -> list[torch.Tensor]:
    device = next(hooked.model.parameters()).device
    parts = [hooked.run_with_cache(chunk.to(device), hooks) for chunk in locs.split(batch_size)]
    return [torch.cat([p[h].reshape(-1, p[h].shape[-1]).cpu() for p in parts]) for h in hooks]  # [rows, d] each


def evaluate_on(model: CrossLayerTranscoder, source: str, target: str, condition: Condition, num_instances: int,
                seed: int, batch_size: int = 256) -> dict:  # fmt: skip
    """Reconstruction beside the condition's ridge baseline, and splice drift, on `num_instances` fresh instances."""
    if num_instances < 2:
        raise ValueError("cross-condition evaluation needs at least 2 instances (half fit the ridge baseline)")
    hooked = HookedPolicy(condition.policy.model)
    hooked.check_names([source, target])
    if model.cfg.d_in != hooked.model.cfg.embed_dim or model.cfg.d_out != hooked.model.cfg.embed_dim:
        raise ValueError(f"the transcoder maps width {model.cfg.d_in} -> {model.cfg.d_out}; "
                         f"{condition.policy.run_dir} has width {hooked.model.cfg.embed_dim}")  # fmt: skip
    locs = generate(num_instances, condition.num_loc, condition.distribution, seed=seed)
    x, y = _activations(hooked, locs, [source, target], batch_size)
    split = (num_instances // 2) * condition.num_loc  # rows of the first half of the instances
    fit, val = Moments(x.shape[1], y.shape[1]), Moments(x.shape[1], y.shape[1])
    fit.update(x[:split].double().numpy(), y[:split].double().numpy())
    val.update(x[split:].double().numpy(), y[split:].double().numpy())
    device = model.b_dec.device
    batches = ((a.to(device), b.to(device)) for a, b in zip(x[split:].split(4096), y[split:].split(4096), strict=True))
    result = reconstruction(model, batches)
    target_mean = y[:split].mean(0).to(device)
    fns = {kind: partial(pair_hooks, source, target, replacement(kind, model, target_mean)) for kind in REPLACEMENTS}
    splice = splice_metrics(hooked, locs.to(next(hooked.model.parameters()).device), fns, batch_size)
    ridge = ridge_baseline(fit, val)
    return {
        "condition": {
            "name": condition.name,
            "policy_run": str(condition.policy.run_dir),
            "checkpoint_epoch": condition.policy.epoch,
            "distribution": condition.distribution,
            "num_loc": condition.num_loc,
            "instances": num_instances,
            "seed": seed,
        },
        "reconstruction": result.summary(),
        "ridge_val_fvu": ridge["fvu"],
        "splice": {**splice, "instances": num_instances},
    }
