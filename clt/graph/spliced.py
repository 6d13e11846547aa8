"""Interventions on features in the live policy, with the replacement spliced in and the error terms held fixed.

Every encoder layer's mlp_out becomes the replacement's prediction from the live mlp_in (clt.graph.replacement)
plus that (layer, city)'s error at the unmodified input (the policy's mlp_out minus the prediction), so that
without a change the policy computes what it always does. A change sets, scales or zeroes one feature's code at
one (layer, city), or every feature of the layer there; attention, normalisation, the transcoder's own selection
of the other features and the glimpse all respond. With a glimpse transcoder, step t's glimpse is its prediction
from the live context plus the glimpse's error, and a change at layer n_layers (the current city) acts on its
features.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from clt.graph.decision import Decision, Outcome, decide, step_scores
from clt.graph.replacement import Replacement
from policy.model import AttentionModel
from sae.hook_names import parse_layer_hook
from sae.hooks import HookedPolicy, HookFn

OPS = ("zero", "scale", "set")
Edit = Callable[[int, torch.Tensor, slice], torch.Tensor]
"""(layer, codes, rows) -> the codes the layer passes on (spliced_hooks)."""
_CHANGE = re.compile(r"^(\d+):(\d+):(\d+|\*)=(zero|scale|set)(?::(.+))?$")


@dataclass(frozen=True)
class Change:
    """Set, scale or zero feature `feature` (None: every feature) of layer `layer` at city `city`."""

    layer: int
    city: int
    feature: int | None
    op: str = "zero"
    value: float = 0.0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"a change is one of {OPS}, got {self.op!r}")
        if not math.isfinite(self.value):
            raise ValueError(f"a change's value must be a finite number, got {self.value}")
        if self.op == "set" and self.feature is None:
            raise ValueError("set needs one feature (LAYER:CITY:FEATURE=set:VALUE), not every feature of a layer")

    @classmethod
    def at(cls, node: dict, op: str = "zero", value: float = 0.0) -> Change:
        """The change of a graph's feature node (its layer, city and feature)."""
        return cls(node["layer"], node["city"], node["feature"], op, value)

    @classmethod
    def parse(cls, spec: str) -> Change:
        """`LAYER:CITY:FEATURE=zero`, `...=scale:FACTOR`, `...=set:VALUE`; FEATURE `*` means every feature."""
        match = _CHANGE.match(spec.strip())
        try:
            if not match or (match.group(4) == "zero") != (match.group(5) is None):
                raise ValueError
            layer, city, feature, op, value = match.groups()
            return cls(int(layer), int(city), None if feature == "*" else int(feature), op, float(value or 0))
        except ValueError as err:
            raise ValueError(
                f"cannot read the change {spec!r}{f' ({err})' if str(err) else ''}: write "
                "LAYER:CITY:FEATURE=zero, LAYER:CITY:FEATURE=scale:FACTOR or "
                "LAYER:CITY:FEATURE=set:VALUE (FEATURE * for every feature)"
            ) from None

    def apply(self, codes: torch.Tensor, city: int | None = None) -> None:
        """Change a layer's codes [node, features] in place (at row `city`, default the change's own)."""
        where = (self.city if city is None else city, slice(None) if self.feature is None else self.feature)
        if self.op == "zero":
            codes[where] = 0
        elif self.op == "scale":
            codes[where] *= self.value
        else:
            codes[where] = self.value

    def check(self, n_layers: int, n_cities: int, n_features: int) -> None:
        if not (0 <= self.layer < n_layers and 0 <= self.city < n_cities):
            raise ValueError(f"change {self}: layers are 0..{n_layers - 1}, cities 0..{n_cities - 1}")
        if self.feature is not None and not 0 <= self.feature < n_features:
            raise ValueError(f"change {self}: features are 0..{n_features - 1}")


@torch.no_grad()
def live_codes(policy: AttentionModel, replacement: Replacement, locs: torch.Tensor) -> tuple[list, list]:
    """(codes [node, features], errors [node, d]) per layer on instance locs [node, 2]: the replacement's codes from
    the policy's mlp_in, and the policy's mlp_out minus the replacement's prediction."""
    n = len(policy.layers)
    names = [f"encoder_layer_{i}.{p}" for i in range(n) for p in ("mlp_in", "mlp_out")]
    cache = HookedPolicy(policy).run_with_cache(locs[None], names)
    codes = [replacement.codes(i, cache[f"encoder_layer_{i}.mlp_in"][0]) for i in range(n)]
    return codes, [cache[f"encoder_layer_{m}.mlp_out"][0] - replacement.predict(m, codes) for m in range(n)]


@torch.no_grad()
def live_glimpse(policy: AttentionModel, replacement: Replacement, decision: Decision) -> tuple[torch.Tensor, ...]:
    """(codes [features], error [d]) of the glimpse transcoder at the decision's step: its codes from the policy's
    context there, and the policy's glimpse minus the transcoder's prediction."""
    seen: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, name: str) -> None:
        seen.setdefault(name, x[0, 0])  # the first decoder call of decide is step t

    with HookedPolicy(policy).hooks({"decoder.context": record, "decoder.glimpse": record}):
        decide(policy, decision, finish=False)
    codes = replacement.glimpse_codes(seen["decoder.context"][None])[0]
    return codes, seen["decoder.glimpse"] - replacement.glimpse.decode(codes[None])[0]


def spliced_hooks(
    replacement: Replacement,
    errors: list[torch.Tensor],
    variants: list[list[Change]],
    selection: list[torch.Tensor] | None = None,
    edit: Edit | None = None,
    inputs: dict[int, torch.Tensor] | None = None,
    rows: slice | None = None,
) -> dict[str, HookFn]:
    """Hooks for one forward pass of a batch of copies of one instance, copy b with the changes `variants[b]`: each
    mlp_out is the (changed) replacement plus its error, and (with a glimpse transcoder, `errors` then ending with
    the glimpse's [d] error) the first glimpse is the glimpse transcoder's (changed) prediction plus its error.

    `selection` (per layer a [node, features] bool mask, then the glimpse's [features]) holds which features are
    active, each at ReLU of its live pre-activation, instead of the transcoder choosing them afresh: the top-k
    choice is the one discontinuity of the replacement (clt.graph.verify's patched removal effects hold it).
    `edit(layer, codes, rows)` returns the codes a layer passes on ([batch, node, features]; the glimpse's are
    "layer" n_layers, [batch, features]), after the selection and the changes; `rows` (default: the whole batch)
    says which of the caller's variants the batch holds. Multiplying by gains that require grad gives gradient x
    activation (clt.graph.verify's baseline); zeroing features ablates them (clt.graph.circuit).
    `inputs`, when given, receives what each transcoder reads: layer i's live mlp_in [batch, node, d] at key i and
    (with a glimpse transcoder) step t's context [batch, d] at key n_layers (clt.graph.edge_check reads receivers'
    inputs there)."""
    codes: dict[int, torch.Tensor] = {}
    n = replacement.n_layers
    rows = slice(0, len(variants)) if rows is None else rows

    def changed(layer: int, z: torch.Tensor) -> torch.Tensor:
        for b, changes in enumerate(variants):
            for change in changes:
                if change.layer == layer:
                    change.apply(z[b] if layer < n else z[b][None], city=None if layer < n else 0)
        return z if edit is None else edit(layer, z, rows)

    def encode(x: torch.Tensor, name: str) -> None:
        layer = parse_layer_hook(name).layer
        if inputs is not None:
            inputs[layer] = x
        if selection is None:
            z = replacement.codes(layer, x.flatten(0, 1)).view(*x.shape[:2], -1).clone()
        else:
            encoder_rows, bias = replacement.encoder(layer)
            z = torch.relu(x @ encoder_rows.T + bias) * selection[layer]
        codes[layer] = changed(layer, z)

    def swap(y: torch.Tensor, name: str) -> torch.Tensor:
        layer = parse_layer_hook(name).layer
        return replacement.predict(layer, [codes[i] for i in range(layer + 1)]) + errors[layer]

    hooks = {
        **{f"encoder_layer_{i}.mlp_in": encode for i in range(n)},
        **{f"encoder_layer_{i}.mlp_out": swap for i in range(n)},
    }
    if replacement.glimpse is None:
        return hooks

    def encode_context(x: torch.Tensor, name: str) -> None:
        if n in codes:  # step t is the first decoder call; later steps keep the policy's own glimpse
            return
        if inputs is not None:
            inputs[n] = x[:, 0]
        if selection is None:
            z = replacement.glimpse_codes(x[:, 0]).clone()
        else:
            encoder_rows, bias = replacement.glimpse_encoder()
            z = torch.relu(x[:, 0] @ encoder_rows.T + bias) * selection[n]
        codes[n] = changed(n, z)

    def swap_glimpse(g: torch.Tensor, name: str) -> torch.Tensor | None:
        if "glimpse" in codes:
            return None
        codes["glimpse"] = replaced = replacement.glimpse.decode(codes[n]) + errors[n]
        return replaced.view_as(g)

    return {**hooks, "decoder.context": encode_context, "decoder.glimpse": swap_glimpse}


def spliced_state(policy: AttentionModel, replacement: Replacement, decision: Decision) -> tuple[list, list]:
    """(errors, selection) at the decision: the errors spliced_hooks holds fixed (every layer's [node, d], then with
    a glimpse transcoder the glimpse's [d]) and the transcoders' live selection as spliced_hooks' `selection` takes
    it (per layer [node, features] bool, then the glimpse's [features])."""
    codes, errors = live_codes(policy, replacement, decision.locs)
    selection = [c != 0 for c in codes]
    if replacement.glimpse is not None:
        glimpse_codes, glimpse_error = live_glimpse(policy, replacement, decision)
        errors, selection = [*errors, glimpse_error], [*selection, glimpse_codes != 0]
    return errors, selection


def spliced_errors(policy: AttentionModel, replacement: Replacement, decision: Decision) -> list[torch.Tensor]:
    """The errors spliced_hooks holds fixed (spliced_state's first half)."""
    return spliced_state(policy, replacement, decision)[0]


def run_spliced(
    policy: AttentionModel,
    replacement: Replacement,
    decision: Decision,
    errors: list[torch.Tensor],
    changes: list[Change],
    finish: bool = True,
    selection: list[torch.Tensor] | None = None,
    edit: Edit | None = None,
    grad: bool = False,
) -> Outcome:
    """The decision in the policy with the replacement spliced in, the errors fixed and `changes` applied
    (`selection`, `edit`: see spliced_hooks); autograd records the pass when `grad`."""
    with HookedPolicy(policy).hooks(spliced_hooks(replacement, errors, [changes], selection, edit)):
        return decide(policy, decision, finish, grad=grad)


@torch.no_grad()
def spliced_scores(
    policy: AttentionModel,
    replacement: Replacement,
    decision: Decision,
    errors: list[torch.Tensor],
    variants: list[list[Change]],
    selection: list[torch.Tensor] | None = None,
    edit: Edit | None = None,
    inputs: dict[int, torch.Tensor] | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """[variant, node]: step t's raw pointer scores in the spliced policy, once per variant (a list of changes),
    `chunk` variants to a batched forward pass; `inputs` receives what every variant's transcoders read
    (spliced_hooks), concatenated over the chunks."""
    scores, seen = [], []
    for start in range(0, len(variants), chunk):
        rows = slice(start, min(start + chunk, len(variants)))
        read: dict[int, torch.Tensor] | None = {} if inputs is not None else None  # recorded only when asked for
        hooks = spliced_hooks(replacement, errors, variants[rows], selection, edit, read, rows)
        with HookedPolicy(policy).hooks(hooks):
            scores.append(step_scores(policy, decision, rows.stop - rows.start))
        seen.append(read)
    if inputs is not None and seen:
        inputs.update({key: torch.cat([read[key] for read in seen]) for key in seen[0]})
    return torch.cat(scores)


@dataclass
class Intervention:
    original: Outcome  # the unmodified policy
    spliced: Outcome  # replacement + errors, no change (equal to the original up to rounding)
    changed: Outcome  # with the changes

    def summary(self, top: int = 5) -> dict:
        """The candidates' probabilities before and after, and the tours."""
        before, after = self.spliced.log_probs.exp(), self.changed.log_probs.exp()
        cities = sorted(
            set(before.topk(min(top, len(before))).indices.tolist())
            | set(after.topk(min(top, len(after))).indices.tolist()),
            key=lambda c: -float(before[c]),
        )
        return {
            "candidates": [
                {
                    "city": c,
                    "probability_before": float(before[c]),
                    "probability_after": float(after[c]),
                    "score_before": float(self.spliced.scores[c]),
                    "score_after": float(self.changed.scores[c]),
                }
                for c in cities
                if before[c] > 0
            ],
            "tour_before": self.original.tour,
            "tour_after": self.changed.tour,
            "tour_changed": self.changed.tour != self.original.tour,
            "splice_max_score_error": float((self.spliced.scores - self.original.scores).abs().max()),
        }


def intervene(
    policy: AttentionModel, replacement: Replacement, decision: Decision, changes: list[Change]
) -> Intervention:
    """Apply `changes` at the decision and report what the policy then does."""
    for change in changes:
        if replacement.glimpse is not None and change.layer == replacement.n_layers:  # the glimpse's features
            if change.city != decision.current:
                raise ValueError(f"change {change}: the glimpse's features sit at the current city {decision.current}")
            change.check(replacement.n_layers + 1, decision.n, replacement.glimpse.cfg.n_features)
        else:
            change.check(replacement.n_layers, decision.n, replacement.n_features)
    errors = spliced_errors(policy, replacement, decision)
    return Intervention(
        decide(policy, decision),
        run_spliced(policy, replacement, decision, errors, []),
        run_spliced(policy, replacement, decision, errors, changes),
    )
