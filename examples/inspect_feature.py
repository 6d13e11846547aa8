"""Inspect one transcoder feature: where it fires, what it writes to, and what removing it does to the tours.

    python examples/inspect_feature.py --run_dir tsp20_demo --pair clt_L1.mlp_in_to_L1.mlp_out [--feature 12]

Without --feature, the feature with the highest mean activation is taken. On fresh instances:
1. where it fires: how often, and how its activation relates to simple properties of the city
   (its coordinates, distance to the instance's centre, to its nearest neighbour, and when the
   greedy tour visits it), as Pearson correlations over the nodes where it fires;
2. what it writes to: its strongest target channels (raw units) and, when other transcoders
   are trained, the downstream features it drives most (direct-path virtual weights);
3. removing it: the policy runs with the feature's contribution (activation x decoder row)
   subtracted from the real target activation, and the tours are compared with the original
   (tour length, greedy actions along the original tours, KL, identical tours).
"""

from __future__ import annotations

import click
import numpy as np
import torch

from clt.dictionaries import Dictionary, find_dictionaries
from clt.graph.weights import norm_scales, virtual_weights
from clt.splice import pair_hooks, splice_metrics
from policy.env import generate
from policy.loading import load_policy
from policy.runs import resolve_run_dir
from sae.hooks import HookedPolicy


def node_properties(locs: torch.Tensor, tours: torch.Tensor) -> dict[str, np.ndarray]:
    """[instances, node] properties of every city."""
    dist = torch.cdist(locs, locs) + torch.eye(locs.shape[1]) * 1e9
    visit = torch.empty_like(tours)
    visit.scatter_(1, tours, torch.arange(tours.shape[1]).expand_as(tours))
    centre = locs.mean(1, keepdim=True)
    return {"x": locs[..., 0], "y": locs[..., 1], "distance to centre": (locs - centre).norm(dim=-1),
            "nearest neighbour": dist.min(-1).values, "visit step": visit.float()}  # fmt: skip


def report_firing(acts: np.ndarray, props: dict[str, np.ndarray]) -> None:
    fires = acts > 0
    click.echo(f"fires on {fires.mean():.1%} of nodes, in {fires.any(1).mean():.1%} of instances; "
               f"mean activation where it fires {acts[fires].mean():.3f}, max {acts.max():.3f}")  # fmt: skip
    for name, values in props.items():
        v = values.numpy()[fires]
        r = np.corrcoef(v, acts[fires])[0, 1] if fires.sum() > 2 and v.std() > 0 else float("nan")
        click.echo(f"  correlation with {name:<20} {r:+.3f}")
    top = np.dstack(np.unravel_index(np.argsort(-acts, axis=None)[:3], acts.shape))[0]
    click.echo("  strongest at (instance, city): " + ", ".join(f"({i}, {n}) {acts[i, n]:.3f}" for i, n in top))


def report_writes(d: Dictionary, j: int, others: list[Dictionary], scales) -> None:
    (hook, decoder), *_ = d.writes.items()
    row = decoder[j]
    best = row.abs().argsort(descending=True)[:5].tolist()
    click.echo(f"writes to {hook} (decoder norm {row.norm():.3f}); strongest channels: "
               + ", ".join(f"{c} ({row[c]:+.3f})" for c in best))  # fmt: skip
    for other in others:
        v = virtual_weights(d, other, scales)
        if v is not None:
            top = v[j].abs().argsort(descending=True)[:3].tolist()
            click.echo(f"  drives {other.id}: " + ", ".join(f"#{k} ({v[j, k]:+.3f})" for k in top))


@click.command(context_settings={"show_default": True})
@click.option("--run_dir", default="tsp20_demo", help="Run folder, or a run name under runs/.")
@click.option("--pair", default="clt_L1.mlp_in_to_L1.mlp_out", help="Pair of the transcoder (its newest run).")
@click.option("--feature", default=None, type=int, help="Feature index [default: the most active feature].")
@click.option("--num_instances", default=500, help="Fresh instances to measure on.")
@click.option("--seed", default=99, help="Seed of the instances.")
def main(run_dir, pair, feature, num_instances, seed):
    """Where one transcoder feature fires, what it writes, and what removing it does to the tours."""
    run_dir = resolve_run_dir(run_dir)
    dicts = {d.id: d for d in find_dictionaries(run_dir)}
    if f"clt/{pair}" not in dicts:
        raise click.UsageError(f"no trained transcoder for {pair}; trained: {', '.join(sorted(dicts))}")
    d = dicts[f"clt/{pair}"]
    (target_hook,) = d.writes
    policy = load_policy(run_dir)
    hooked = HookedPolicy(policy.model)
    locs = generate(num_instances, policy.config.num_loc, policy.config.distribution, seed=seed)
    with torch.no_grad():
        tours = policy.model(locs).actions[:, 0]
        x = hooked.run_with_cache(locs, [d.read_hook])[d.read_hook]
        z = d.codes({d.read_hook: x.reshape(-1, x.shape[-1])})  # [instances * node, features]
    j = int(z.mean(0).argmax()) if feature is None else feature
    if not 0 <= j < d.n_features:
        raise click.UsageError(f"--feature must be in [0, {d.n_features})")
    click.echo(f"{pair} feature #{j} on {num_instances} fresh instances")
    acts = z[:, j].reshape(num_instances, -1).numpy()
    report_firing(acts, node_properties(locs, tours))
    report_writes(d, j, [o for o in dicts.values() if o.id != d.id], norm_scales(policy.model, locs))

    decoder_row = d.writes[target_hook][j]

    def remove(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = d.codes({d.read_hook: source.reshape(-1, source.shape[-1])})[:, j]
        return target - (a[:, None] * decoder_row).reshape(target.shape)

    result = splice_metrics(hooked, locs, {"removed": lambda: pair_hooks(d.read_hook, target_hook, remove)})
    r = result["removed"]
    click.echo(f"removing it: mean tour {result['original']['mean_length']:.4f} -> {r['mean_length']:.4f} "
               f"({r['gap']:+.3%}); greedy actions kept {r['action_agreement']:.2%}; KL {r['mean_kl']:.4f}; "
               f"identical tours {r['same_tour_fraction']:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
