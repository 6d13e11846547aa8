"""The local replacement model of one decision: linear in its sources, exact at the decision's input.

The policy's feed-forward blocks are replaced (clt.graph.replacement) and everything else is frozen at this input:

- each encoder layer's attention pattern A [head, node, node]:  attn(x) = sum_h A_h (x Wv_h + bv_h) Wo_h + bo
  (or, with `attention="tangent"`, the attention's tangent at this input: the pattern responds to first order;
  clt.graph.attention);
- normalisation: BatchNorm in eval mode is affine already; InstanceNorm's per-channel standard deviation over the
  instance's cities is frozen and its mean over cities kept (a linear map, as circuit-tracer keeps LayerNorm's
  centring and freezes its scale);
- the glimpse's attention pattern P [head, node] over the cities still unvisited at step t;
- every mlp_out_m = decoder_bias(m) + sum_{i <= m} z_i @ decoder(i, m) + error_m, where error_m (the policy's
  mlp_out_m minus the replacement's prediction at this input) is held fixed, and z is non-zero only on the
  features the transcoder selects at this input, where it equals their pre-activation.

Its sources are the active features' activations z, one error node per (layer, city) (activation 1: its vector
error_m[city]) and one input node per city (activation 1: the city's init_embedding, bias included). Everything
between them is linear, so a source's direct effect on a later node's input (a feature's pre-activation, a target)
is exact: `edges`. The model runs in float64 and reproduces the policy's activations and pointer scores up to the
float32 rounding of the live forward pass (`reproduction_error`).

Targets: the pointer scores at step t (or their differences against a runner-up), each as its tangent at this
input (clt.graph.pointer): exact here, linear, and with the score's own gradient; the glimpse pattern frozen
(default) or responding to first order. When the replacement has a glimpse transcoder, the glimpse at step t is
its features (sources after the encoder's, one more error node) instead: clt.graph.glimpse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt.graph.attention import DTYPE, attention_at
from clt.graph.decision import Decision
from clt.graph.glimpse import GlimpseFeatures
from clt.graph.pointer import PointerTargets
from clt.graph.replacement import Replacement
from policy.model import AttentionModel, Normalization
from sae.hooks import HookedPolicy


@dataclass
class FrozenNorm:
    """(v - centre) * scale + shift; centre None: the instance's own mean over cities (InstanceNorm)."""

    scale: torch.Tensor  # [d]
    shift: torch.Tensor  # [d]
    centre: torch.Tensor | None  # [d]

    @classmethod
    def of(cls, norm: Normalization, v: torch.Tensor) -> FrozenNorm:
        """Freeze `norm` at its input v [node, d]."""
        bn = norm.norm
        weight, bias = bn.weight.to(DTYPE), bn.bias.to(DTYPE)
        if norm.kind == "batch":
            return cls(weight / torch.sqrt(bn.running_var.to(DTYPE) + bn.eps), bias, bn.running_mean.to(DTYPE))
        return cls(weight / torch.sqrt(v.var(0, unbiased=False) + bn.eps), bias, None)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:  # [..., node, d]
        centre = v.mean(-2, keepdim=True) if self.centre is None else self.centre
        return (v - centre) * self.scale + self.shift

    def back(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of the linear part, applied to a cotangent [..., node, d]."""
        g = g * self.scale
        return g - g.mean(-2, keepdim=True) if self.centre is None else g


@dataclass
class LayerFeatures:
    """The features one layer's transcoder selects at this input, laid out [node, slot] (padded with inactive)."""

    index: torch.Tensor  # [node, slot] long, feature index (0 where inactive)
    active: torch.Tensor  # [node, slot] bool
    rows: torch.Tensor  # [node, slot, d] encoder rows (raw units; zero where inactive)
    bias: torch.Tensor  # [node, slot]
    writes: list[torch.Tensor | None]  # per target layer m: [node, slot, d] decoder rows into mlp_out_m (or None)

    def pre(self, h: torch.Tensor) -> torch.Tensor:  # mlp_in [..., node, d] -> [..., node, slot]
        return (h.unsqueeze(-2) * self.rows).sum(-1) + self.bias


class LocalModel:
    """The frozen local replacement model of `decision` for the target cities `targets`: their scores, or with
    `against` (one city per target) the score differences T_c - T_against; `glimpse`: see clt.graph.pointer,
    `attention`: clt.graph.attention."""

    @torch.no_grad()
    def __init__(
        self,
        policy: AttentionModel,
        replacement: Replacement,
        decision: Decision,
        targets: list[int],
        against: list[int] | None = None,
        glimpse: str = "frozen",
        attention: str = "frozen",
    ):
        if replacement.n_layers != len(policy.layers):
            raise ValueError(
                f"the replacement covers {replacement.n_layers} layers, the policy has {len(policy.layers)}"
            )
        if against is not None and len(against) != len(targets):
            raise ValueError("against needs one city per target")
        self.decision, self.targets, self.n_layers = decision, list(targets), len(policy.layers)
        self.against = None if against is None else list(against)
        self.attention = attention
        self.d = policy.cfg.embed_dim
        live = self._live(policy, decision.locs)
        codes = [replacement.codes(i, live[f"encoder_layer_{i}.mlp_in"][0]) for i in range(self.n_layers)]
        self.features = [self._features(replacement, i, c) for i, c in enumerate(codes)]
        self.x0 = live["init_embedding"][0].to(DTYPE)  # [node, d]
        self.attn, self.norm1, self.norm2, self.errors, self.decoder_bias = [], [], [], [], []
        self.activations = []  # [node, slot] per layer: the active features' pre-activations at this input
        x = self.x0
        for i, layer in enumerate(policy.layers):
            self.attn.append(attention_at(layer.attn, x, attention))
            v = x + self.attn[i](x)
            self.norm1.append(FrozenNorm.of(layer.norm1, v))
            h = self.norm1[i](v)
            self.activations.append(self.features[i].pre(h) * self.features[i].active)
            self.decoder_bias.append(replacement.decoder_bias(i).to(DTYPE))
            predicted = self._predicted(i, self.activations)
            self.errors.append(live[f"encoder_layer_{i}.mlp_out"][0].to(DTYPE) - predicted)
            u = h + self.errors[i] + predicted
            self.norm2.append(FrozenNorm.of(layer.norm2, u))
            x = self.norm2[i](u)
        self.encoder_output = x
        self.pointer = PointerTargets(policy, decision, x, targets, against, glimpse)
        self.glimpse_pattern = self.pointer.pattern  # [head, node]
        self.live_encoder_output = live["encoder_output"][0].to(DTYPE)
        self.glimpse = None  # the glimpse transcoder's features at step t, when the replacement has one
        if replacement.glimpse is not None:
            if glimpse != "frozen":
                raise ValueError("with a glimpse transcoder the glimpse is its features: use --glimpse frozen")
            self.glimpse = GlimpseFeatures.at(replacement, self.pointer)

    # building ---------------------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _live(policy: AttentionModel, locs: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ["init_embedding", "encoder_output"]
        names += [f"encoder_layer_{i}.{p}" for i in range(len(policy.layers)) for p in ("mlp_in", "mlp_out")]
        return HookedPolicy(policy).run_with_cache(locs[None], names)

    def _features(self, replacement: Replacement, layer: int, codes: torch.Tensor) -> LayerFeatures:
        """Layer `layer`'s active features at every city, from its codes [node, features]."""
        active = codes != 0
        slots = max(int(active.sum(1).max()), 1)
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :slots]  # active first, by index
        index = torch.where(torch.gather(active, 1, order), order, 0)
        mask = torch.gather(active, 1, order)
        rows, bias = replacement.encoder(layer)

        def place(table: torch.Tensor) -> torch.Tensor:  # [features, ...] -> [node, slot, ...], zero when inactive
            picked = table.to(DTYPE)[index]
            return picked * mask.view(*mask.shape, *([1] * (picked.dim() - 2)))

        writes = [replacement.decoder(layer, m) for m in range(self.n_layers)]
        return LayerFeatures(index, mask, place(rows), place(bias), [None if w is None else place(w) for w in writes])

    # the linear model -------------------------------------------------------------------------------------------
    def _predicted(self, m: int, acts: list[torch.Tensor]) -> torch.Tensor:
        """The replacement's mlp_out of layer m [node, d] from the activations of layers 0..m."""
        y = self.decoder_bias[m]
        for i in range(m + 1):
            w = self.features[i].writes[m]
            if w is not None:
                y = y + (acts[i].unsqueeze(-1) * w).sum(-2)
        return y

    def _mlp_out(self, m: int, acts: list[torch.Tensor], error_scale: torch.Tensor) -> torch.Tensor:
        """mlp_out of layer m [node, d]: the replacement's prediction plus the error node, scaled."""
        return self._predicted(m, acts) + self.errors[m] * error_scale[m, :, None]

    def target_values(self, h: torch.Tensor, glimpse_acts: torch.Tensor | None = None, glimpse_error: float = 1.0):
        """The targets' values [target] at encoder output h (the tangents of clt.graph.pointer; with a glimpse
        transcoder, of clt.graph.glimpse at the glimpse features' activations `glimpse_acts`)."""
        if self.glimpse is None:
            return self.pointer.values(h)
        return self.glimpse.targets(h, glimpse_acts, glimpse_error)

    def forward(
        self,
        activations: list[torch.Tensor] | None = None,
        error_scale: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        clamp: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        glimpse_error: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(pre-activations [node, slot] per layer, target values [target]).

        `activations` (per layer [node, slot]) are held as given: every source independent, for direct effects.
        Without them each active feature's activation is its pre-activation (the local model's own response),
        except where `clamp` (per layer a (mask, value) pair of [node, slot]) fixes it. `error_scale` [layer, node]
        and `input_scale` [node] scale the error and input nodes (default 1). With a glimpse transcoder the lists
        have one more entry, the glimpse features' [slot] (after the layers'), and `glimpse_error` scales its error.
        """
        n = self.decision.n
        parts = self.n_layers + (self.glimpse is not None)
        if (activations is not None and len(activations) != parts) or (clamp is not None and len(clamp) != parts):
            raise ValueError(f"activations and clamp need {parts} entries (layers, then the glimpse's if any)")
        error_scale = torch.ones(self.n_layers, n, dtype=DTYPE) if error_scale is None else error_scale
        x = self.x0 * (torch.ones(n, dtype=DTYPE) if input_scale is None else input_scale)[:, None]
        pres, acts = [], []
        for i in range(self.n_layers):
            h = self.norm1[i](x + self.attn[i](x))
            pres.append(self.features[i].pre(h))
            act = activations[i] if activations is not None else pres[i] * self.features[i].active
            if clamp is not None:
                act = torch.where(clamp[i][0], clamp[i][1], act)
            acts.append(act)
            x = self.norm2[i](h + self._mlp_out(i, acts, error_scale))
        if self.glimpse is None:
            return pres, self.target_values(x)
        pres.append(self.glimpse.pre(x))
        act = activations[self.n_layers] if activations is not None else pres[-1]
        if clamp is not None:
            act = torch.where(clamp[self.n_layers][0], clamp[self.n_layers][1], act)
        return pres, self.target_values(x, act, glimpse_error)

    def source_activations(self) -> list[torch.Tensor]:
        """The features' activations at this input, as `forward` takes them: per layer [node, slot], then (with a
        glimpse transcoder) the glimpse features' [slot]."""
        return [*self.activations, *([self.glimpse.activations] if self.glimpse is not None else [])]

    def backward(self, g: torch.Tensor, layer: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Cotangents g [R, node, d] on mlp_in of `layer` (on the encoder output when layer == n_layers) ->
        (their cotangents on mlp_out of each layer m < layer, [R, node, d] each; on the input embeddings)."""
        out: list[torch.Tensor] = [None] * layer
        if layer == self.n_layers:
            g = self.norm2[-1].back(g)
            out[-1], layer = g, layer - 1
        for i in range(layer, -1, -1):  # g: the cotangent on mlp_in of layer i
            v = self.norm1[i].back(g)
            x = v + self.attn[i].back(v)
            if i == 0:
                return out, x
            g = out[i - 1] = self.norm2[i - 1].back(x)
        raise AssertionError("unreachable")

    def target_cotangents(self) -> torch.Tensor:
        """[target, node, d]: the gradient of each target's value with respect to the encoder output (the glimpse
        features held, when there are)."""
        return self.pointer.cotangents() if self.glimpse is None else self.glimpse.key_cotangents()

    def reproduction_error(self) -> float:
        """Largest |local - live| over the encoder output's entries (float32 rounding of the live pass)."""
        return float((self.encoder_output - self.live_encoder_output).abs().max())
