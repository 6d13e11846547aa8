"""SAE features -> transcoder features -> the transcoder's target: the strongest paths, scored two ways.

    python examples/sae_to_clt.py --run_dir tsp20_demo --sae_hook encoder_layer_0 --pair clt_L1.mlp_in_to_L1.mlp_out

Needs an SAE on a hook upstream of the transcoder's source (sae.train_topk) and the transcoder.
1. By weights: path i -> j -> target scores mean_act(SAE i) x v(i, j) x |decoder row of j|, where
   v is the direct-path virtual weight (clt.graph.weights: SAE decoder row -> residual
   normalisations -> transcoder encoder row). The strongest paths are listed.
2. By intervention: for each listed SAE feature, the policy runs with that feature's contribution
   (activation x decoder row) removed at the SAE's hook; the transcoder's features are re-read
   downstream (attention included, which the weights leave out) and the change of feature j is
   set beside the weights' prediction, -mean_act(i) x v(i, j).
"""

from __future__ import annotations

import click
import numpy as np
import torch

from clt.dictionaries import find_dictionaries
from clt.graph.weights import norm_scales, virtual_weights
from policy.env import generate
from policy.loading import load_policy
from policy.runs import resolve_run_dir
from sae.hooks import HookedPolicy


@click.command(context_settings={"show_default": True})
@click.option("--run_dir", default="tsp20_demo", help="Run folder, or a run name under runs/.")
@click.option("--sae_hook", default="encoder_layer_0", help="Hook of the SAE (its newest run).")
@click.option("--pair", default="clt_L1.mlp_in_to_L1.mlp_out", help="Pair of the transcoder (its newest run).")
@click.option("--paths", default=8, help="Paths listed.")
@click.option("--num_instances", default=300, help="Fresh instances to measure on.")
@click.option("--seed", default=7, help="Seed of the instances.")
def main(run_dir, sae_hook, pair, paths, num_instances, seed):
    """The strongest SAE feature -> CLT feature -> target paths, by weights and by intervention."""
    run_dir = resolve_run_dir(run_dir)
    dicts = {d.id: d for d in find_dictionaries(run_dir)}
    for wanted in (f"sae/{sae_hook}", f"clt/{pair}"):
        if wanted not in dicts:
            raise click.UsageError(f"no trained {wanted}; trained: {', '.join(sorted(dicts))}")
    sae, clt = dicts[f"sae/{sae_hook}"], dicts[f"clt/{pair}"]
    policy = load_policy(run_dir)
    hooked = HookedPolicy(policy.model)
    locs = generate(num_instances, policy.config.num_loc, policy.config.distribution, seed=seed)
    v = virtual_weights(sae, clt, norm_scales(policy.model, locs))
    if v is None:
        raise click.UsageError(f"{sae_hook} is not upstream of {clt.read_hook}: no path from the SAE to the transcoder")

    def clt_codes(cache: dict[str, torch.Tensor]) -> torch.Tensor:
        return clt.codes({clt.read_hook: cache[clt.read_hook].reshape(-1, cache[clt.read_hook].shape[-1])})

    with torch.no_grad():
        cache = hooked.run_with_cache(locs, [sae_hook, clt.read_hook])
        a = sae.codes({sae_hook: cache[sae_hook].reshape(-1, cache[sae_hook].shape[-1])})  # [rows, SAE features]
        z = clt_codes(cache)  # [rows, CLT features]
    (target, decoder), *_ = clt.writes.items()
    score = a.mean(0)[:, None] * v * decoder.norm(dim=1)[None, :]  # [SAE features, CLT features]
    best = score.flatten().abs().argsort(descending=True)[:paths].tolist()
    click.echo(f"SAE {sae_hook} -> {pair} -> {target}, on {num_instances} fresh instances")
    click.echo(
        f"{'SAE':>6}{'CLT':>6}{'path score':>12}{'weight':>9}{'predicted dz':>14}{'measured dz':>13}  top channel"
    )
    predicted, measured = [], []
    for flat in best:
        i, j = divmod(flat, v.shape[1])

        def remove(x: torch.Tensor, name: str, i=i) -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1])
            return (rows - sae.codes({sae_hook: rows})[:, i : i + 1] * sae.writes[sae_hook][i]).reshape(x.shape)

        with torch.no_grad(), hooked.hooks({sae_hook: remove}):
            z_removed = clt_codes(hooked.run_with_cache(locs, [clt.read_hook]))
        predicted.append(-(a[:, i].mean() * v[i, j]).item())
        measured.append((z_removed[:, j] - z[:, j]).mean().item())
        c = int(decoder[j].abs().argmax())
        click.echo(f"{i:>6}{j:>6}{score[i, j]:>12.4f}{v[i, j]:>9.3f}{predicted[-1]:>14.4f}{measured[-1]:>13.4f}"
                   f"  {c} ({decoder[j, c]:+.3f})")  # fmt: skip
    agree = np.mean(np.sign(predicted) == np.sign(measured))
    click.echo(f"the weights predict the sign of the measured change on {agree:.0%} of these paths")


if __name__ == "__main__":
    main()
