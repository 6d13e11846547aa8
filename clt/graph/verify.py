"""Checks of a graph's predicted total effects, by removing features one at a time.

(a) In the frozen local replacement model (clt.graph.local, later features responding linearly): the change of
    each target must equal minus the graph's total effect; a correctness test, relative error ~1e-12 in float64.
(b) In the live policy with the replacement spliced in and the errors fixed (clt.graph.spliced): attention,
    normalisation, the transcoders' selection and the glimpse all respond. Pearson r and sign agreement between
    predicted and measured target changes say how far the linear explanation holds. Measured again with the
    transcoders' selection held (`selection_held`), they separate what top-k's re-selection costs from what the
    attention patterns' response costs. Beside them, the same r and sign agreement for gradient x activation in
    that live policy (`gradient_x_activation`): the one-line baseline a graph has to beat; and for the `patched`
    removal effects: each feature removed in the replacement with the transcoders' selection held, exact through
    attention, normalisation and the pointer (activation patching of the replacement, one batched pass), which
    leaves out only what top-k's re-selection does.
(c) `replacement_fidelity`: the decision made by the replacement alone, its error terms dropped.
"""

from __future__ import annotations

import torch

from clt.graph.decision import Decision
from clt.graph.graph import Graph
from clt.graph.local import DTYPE, LocalModel
from clt.graph.replacement import Replacement
from clt.graph.spliced import Change, run_spliced, spliced_errors, spliced_scores, spliced_state
from policy.model import AttentionModel


def removal_clamp(local: LocalModel, node: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A clamp (LocalModel.forward) that holds one feature node at 0."""
    clamp = [(torch.zeros_like(a, dtype=torch.bool), torch.zeros_like(a)) for a in local.source_activations()]
    if node["layer"] == local.n_layers:  # a glimpse feature
        clamp[-1][0][:] = local.glimpse.index == node["feature"]
        return clamp
    features = local.features[node["layer"]]
    clamp[node["layer"]][0][node["city"]] = features.active[node["city"]] & (
        features.index[node["city"]] == node["feature"]
    )
    return clamp


@torch.no_grad()
def verify_local(local: LocalModel, graph: Graph, features: list[int], total: torch.Tensor) -> dict:
    """(a): the largest relative error |measured - predicted| / max |predicted| over the features removed."""
    _, base = local.forward()
    worst = 0.0
    for s in features:
        _, removed = local.forward(clamp=removal_clamp(local, graph.nodes[s]))
        predicted = -total[:, s]
        scale = float(predicted.abs().max())
        if scale > 0:
            worst = max(worst, float((removed - base - predicted).abs().max()) / scale)
    return {"features": len(features), "max_relative_error": worst}


@torch.no_grad()
def replacement_fidelity(
    policy: AttentionModel,
    replacement: Replacement,
    decision: Decision,
    policy_log_probs: torch.Tensor,
    policy_choice: int,
    errors: list[torch.Tensor] | None = None,
) -> dict:
    """How the replacement alone decides this step: the policy with every feed-forward block (and glimpse) replaced
    and the error terms dropped. Its choice, whether it is the policy's, the probability it gives the policy's
    choice, and KL(policy || replacement) over the unvisited cities. A graph's error nodes carry whatever this
    misses: a poor replacement cannot look good here."""
    errors = spliced_errors(policy, replacement, decision) if errors is None else errors
    errors = [torch.zeros_like(e) for e in errors]  # dropped: only their shapes are used
    log_q = run_spliced(policy, replacement, decision, errors, [], False).log_probs.to(DTYPE)
    log_p = policy_log_probs.to(DTYPE)
    open_ = torch.isfinite(log_p)
    kl = float((log_p[open_].exp() * (log_p[open_] - log_q[open_])).sum())
    choice = int(log_q.argmax())
    return {"choice": choice, "same_choice": choice == policy_choice,
            "probability_of_policy_choice": float(log_q[policy_choice].exp()), "kl": kl}  # fmt: skip


def distinct_margins(targets: list[int], against: list[int] | None) -> list[int]:
    """The target columns that are not another's mirror: with targets [A, B] against [B, A], score A - score B and
    score B - score A are one margin with two signs, and would count every removal twice (and pull Pearson's r
    toward 1); the first of each such pair is kept."""
    if against is None:
        return list(range(len(targets)))
    seen, keep = set(), []
    for i, pair in enumerate(zip(targets, against, strict=True)):
        if frozenset(pair) not in seen:
            seen.add(frozenset(pair))
            keep.append(i)
    return keep


def gradient_x_activation(policy: AttentionModel, replacement: Replacement, decision: Decision,
                          errors: list[torch.Tensor], held: list[torch.Tensor], nodes: list[dict], targets: list[int],
                          against: list[int] | None) -> torch.Tensor:  # fmt: skip
    """[node, target] the one-line baseline a graph must beat: gradient x activation of each target value (score,
    or score difference) with respect to each feature node, in the live policy with the replacement spliced in and
    the errors held, attention and normalisation free (plain autograd). `held` is the transcoders' live selection
    (per layer [node, features], then the glimpse's [features]): the gradient of top-k holds it. The removal effect
    it predicts is minus this."""
    gains = [torch.ones(h.shape, dtype=errors[0].dtype, requires_grad=True) for h in held]
    with torch.enable_grad():  # callers may run without autograd
        scores = run_spliced(policy, replacement, decision, errors, [], False, held,
                             lambda layer, z, rows: z * gains[layer], grad=True).scores  # fmt: skip
        values = scores[targets] if against is None else scores[targets] - scores[against]
        grads_per_target = [torch.autograd.grad(values[j], gains, retain_graph=j + 1 < len(targets), allow_unused=True)
                            for j in range(len(targets))]  # fmt: skip
    out = torch.zeros(len(nodes), len(targets), dtype=DTYPE)
    for j, grads in enumerate(grads_per_target):
        for i, node in enumerate(nodes):
            g = grads[node["layer"]]
            if g is not None:
                glimpse = node["layer"] == replacement.n_layers  # its gains are [features]
                at = node["feature"] if glimpse else (node["city"], node["feature"])
                out[i, j] = float(g[at])
    return out


def agreement(predicted: torch.Tensor, measured: torch.Tensor, signed: torch.Tensor | None = None) -> dict:
    """Pearson r of two same-shaped tensors (flattened), and their sign agreement over the entries `signed` (a bool
    mask; default: where the prediction is not zero)."""
    signed = predicted != 0 if signed is None else signed
    agree = torch.sign(predicted[signed]) == torch.sign(measured[signed])
    return {"pearson_r": pearson(predicted.flatten(), measured.flatten()),
            "sign_agreement": float(agree.to(DTYPE).mean()) if agree.numel() else float("nan")}  # fmt: skip


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(DTYPE) - x.to(DTYPE).mean(), y.to(DTYPE) - y.to(DTYPE).mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else float("nan")


@torch.no_grad()
def verify_live(
    policy: AttentionModel,
    replacement: Replacement,
    decision: Decision,
    graph: Graph,
    features: list[int],
    total: torch.Tensor,
    targets: list[int],
    against: list[int] | None = None,
    state: tuple[list, list] | None = None,
) -> dict:
    """(b): Pearson r and sign agreement between predicted (-total effect) and measured target changes (score
    differences against `against` when given; a margin and its mirror count once), with the selection free and with
    it held. Signs are compared on the (feature, target) pairs the graph predicts an effect for: a feature with no
    path to a target in the local model (at a visited city, say, the glimpse does not read) has no sign to agree
    with. `state`: spliced_state's
    (errors, selection), when the caller has them."""
    errors, held = spliced_state(policy, replacement, decision) if state is None else state

    def removed(selection) -> torch.Tensor:
        """[feature, target]: each feature's removal's change of the targets, one batched pass for all."""
        changes = [[Change.at(graph.nodes[s])] for s in features]
        scores = spliced_scores(policy, replacement, decision, errors, [[], *changes], selection).to(DTYPE)
        values = scores[:, targets] if against is None else scores[:, targets] - scores[:, against]
        return values[1:] - values[0]

    if not features:
        return {"features": 0, "pearson_r": float("nan"), "sign_agreement": float("nan"), "removals": []}
    distinct = distinct_margins(targets, against)  # each margin once
    predicted = torch.stack([-total[:, s] for s in features])  # [feature, target]
    baseline = -gradient_x_activation(policy, replacement, decision, errors, held, [graph.nodes[s] for s in features],
                                      targets, against)  # fmt: skip
    measured, patched = removed(None), removed(held)
    p = predicted[:, distinct]
    signed = p.abs() > 1e-12 * p.abs().max()  # pairs the graph gives an effect (a path) at all

    def margins_agree(prediction: torch.Tensor, truth: torch.Tensor) -> dict:
        return agreement(prediction[:, distinct], truth[:, distinct], signed)

    report = {"features": len(features), **margins_agree(predicted, measured), "pairs": int(signed.sum()),
              "selection_held": margins_agree(predicted, patched),
              "gradient_x_activation": margins_agree(baseline, measured),
              "patched": margins_agree(patched, measured)}  # fmt: skip
    report["removals"] = [
        {"id": graph.nodes[s]["id"], "predicted": p.tolist(), "measured": m.tolist(), "patched": q.tolist(),
         "gradient_x_activation": b.tolist()}
        for s, p, m, q, b in zip(features, predicted, measured, patched, baseline, strict=True)
    ]  # fmt: skip
    return report
