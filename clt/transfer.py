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
from clt.splice import pair_hooks, recovered, replacement, splice_metrics
from policy.env import generate
from policy.loading import LoadedPolicy
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


@dataclass
class Evaluation:
    """What evaluating any transcoder of one pair on one condition shares, computed once: the instances, their
    activations split into the ridge-fitting and the scoring half, the ridge baseline, and the splices that do not
    depend on the transcoder (mean and zero ablation)."""

    condition: Condition
    source: str
    target: str
    seed: int
    batch_size: int
    hooked: HookedPolicy
    locs: torch.Tensor  # [instances, node, 2]
    x_val: torch.Tensor  # [rows of the second half, d] sources
    y_val: torch.Tensor  # the targets
    target_mean: torch.Tensor  # [d] of the first half: what mean ablation writes
    ridge_fvu: float
    ablations: dict  # splice_metrics of `mean` and `zero`


@torch.no_grad()
def prepare(source: str, target: str, condition: Condition, num_instances: int, seed: int,
            batch_size: int = 256) -> Evaluation:  # fmt: skip
    """The shared part of evaluating a pair's transcoders on `condition` (`score` adds one transcoder)."""
    if num_instances < 2:
        raise ValueError("cross-condition evaluation needs at least 2 instances (half fit the ridge baseline)")
    hooked = HookedPolicy(condition.policy.model)
    hooked.check_names([source, target])
    locs = generate(num_instances, condition.num_loc, condition.distribution, seed=seed)
    x, y = _activations(hooked, locs, [source, target], batch_size)
    split = (num_instances // 2) * condition.num_loc  # rows of the first half of the instances
    fit, val = Moments(x.shape[1], y.shape[1]), Moments(x.shape[1], y.shape[1])
    fit.update(x[:split].double().numpy(), y[:split].double().numpy())
    val.update(x[split:].double().numpy(), y[split:].double().numpy())
    target_mean = y[:split].mean(0)
    device = next(hooked.model.parameters()).device
    fns = {kind: partial(pair_hooks, source, target, replacement(kind, None, target_mean.to(device)))
           for kind in ("mean", "zero")}  # fmt: skip
    ablations = splice_metrics(hooked, locs.to(device), fns, batch_size)
    return Evaluation(condition, source, target, seed, batch_size, hooked, locs, x[split:], y[split:], target_mean,
                      ridge_baseline(fit, val)["fvu"], ablations)  # fmt: skip


def score(model: CrossLayerTranscoder, evaluation: Evaluation) -> dict:
    """One transcoder on a prepared condition: reconstruction beside the ridge baseline, and splice drift."""
    e, width = evaluation, evaluation.hooked.model.cfg.embed_dim
    if model.cfg.d_in != width or model.cfg.d_out != width:
        raise ValueError(f"the transcoder maps width {model.cfg.d_in} -> {model.cfg.d_out}; "
                         f"{e.condition.policy.run_dir} has width {width}")  # fmt: skip
    device = model.b_dec.device
    pairs = zip(e.x_val.split(4096), e.y_val.split(4096), strict=True)
    result = reconstruction(model, ((a.to(device), b.to(device)) for a, b in pairs))
    fns = {kind: partial(pair_hooks, e.source, e.target, replacement(kind, model, e.target_mean.to(device)))
           for kind in ("transcoder", "transcoder+error")}  # fmt: skip
    own = splice_metrics(e.hooked, e.locs.to(next(e.hooked.model.parameters()).device), fns, e.batch_size)
    splice = {**own, **{kind: e.ablations[kind] for kind in ("mean", "zero")}}
    splice["transcoder"] = {**splice["transcoder"], "recovered": recovered(splice)}
    c = e.condition
    return {
        "condition": {
            "name": c.name,
            "policy_run": str(c.policy.run_dir),
            "checkpoint_epoch": c.policy.epoch,
            "distribution": c.distribution,
            "num_loc": c.num_loc,
            "instances": len(e.locs),
            "seed": e.seed,
        },
        "reconstruction": result.summary(),
        "ridge_val_fvu": e.ridge_fvu,
        "splice": {**splice, "instances": len(e.locs)},
    }


def evaluate_on(model: CrossLayerTranscoder, source: str, target: str, condition: Condition, num_instances: int,
                seed: int, batch_size: int = 256) -> dict:  # fmt: skip
    """Reconstruction beside the condition's ridge baseline, and splice drift, on `num_instances` fresh instances."""
    return score(model, prepare(source, target, condition, num_instances, seed, batch_size))
