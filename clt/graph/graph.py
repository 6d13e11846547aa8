"""The attribution graph of one decision: every direct effect in the local replacement model (clt.graph.local).

Nodes, in the adjacency's order (as circuit-tracer orders them):

    features   F:<layer>:<city>:<feature>   an active transcoder feature; its activation
    errors     E:<layer>:<city>             the fixed error of mlp_out at (layer, city); activation 1
    inputs     I:<city>                     the city's init_embedding; activation 1
    targets    T:<city>                     a candidate's raw pointer score (its tangent), or minus the runner-up's

With a glimpse transcoder (clt.graph.glimpse) its active features at step t are features of "layer" n_layers at
the current city, after the encoder's, and the glimpse's error is one more error node E:<n_layers>:<current>; the
targets then sit at layer n_layers + 1.

`adjacency[r, s]` is the direct effect of source s on receiver r's input -- a feature's pre-activation, a target's
value -- through the frozen linear paths (norms, attention value paths, the glimpse), not through other features:
the source's activation times the derivative of r's input with respect to it. Each receiver's input is exactly the
sum of its row plus `constants[r]` (what biases contribute: attention and norm biases, decoder and encoder biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clt.graph.local import DTYPE, LocalModel


@dataclass
class Graph:
    nodes: list[dict]  # kind, id, layer, city, feature, activation (adjacency order)
    adjacency: torch.Tensor  # [node, node] float64, rows receive
    constants: torch.Tensor  # [node]: the bias part of each receiver's input (0 for sources)
    values: torch.Tensor  # [node]: a receiver's input (feature pre-activation, target value); sources' activation
    n_features: int
    n_errors: int
    n_inputs: int
    target_weights: torch.Tensor  # [target] the candidates' probabilities

    @property
    def n_targets(self) -> int:
        return len(self.target_weights)

    @property
    def errors(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def inputs(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_inputs)

    @property
    def targets(self) -> slice:
        return slice(len(self.nodes) - self.n_targets, len(self.nodes))

    def activations(self) -> torch.Tensor:
        """[node]: each source's activation (features: z; errors, inputs: 1); 1 for targets."""
        act = torch.ones(len(self.nodes), dtype=DTYPE)
        act[: self.n_features] = self.values[: self.n_features]
        return act

    def direct_derivatives(self) -> torch.Tensor:
        """adjacency / source activation: d(receiver input) / d(source activation)."""
        return self.adjacency / self.activations()

    def paths_from(self, sources: list[int]) -> torch.Tensor:
        """[node, source]: d(receiver input) / d(source activation) along every path of the local model, the
        features in between responding linearly: J (I - J_ff)^-1 e_s, where J is direct_derivatives() (rows of
        sources that receive nothing stay 0)."""
        f = self.n_features
        j = self.direct_derivatives()
        unit = torch.zeros(f, len(sources), dtype=DTYPE)
        unit[sources, torch.arange(len(sources))] = 1.0
        through = torch.linalg.solve_triangular(torch.eye(f, dtype=DTYPE) - j[:f, :f], unit, upper=False)
        return j[:, :f] @ through

    def total_effects(self) -> torch.Tensor:
        """[target, feature]: how much each target changes when a feature is removed (set to 0) and every later
        feature responds in the local model, with the sign of the feature's own contribution: activation x
        d target / d activation along every path, = activation x (J_tf (I - J_ff)^-1)."""
        f = self.n_features
        j = self.direct_derivatives()
        j_ff, j_tf = j[:f, :f], j[self.targets, :f]
        eye = torch.eye(f, dtype=DTYPE)
        through = torch.linalg.solve_triangular(eye - j_ff, j_tf, upper=False, left=False)  # X (I - J_ff) = J_tf
        return through * self.values[:f]


def node_list(local: LocalModel) -> list[dict]:
    """The nodes in the adjacency's order: features (the encoder's, then the glimpse's), errors (likewise), inputs,
    targets."""
    features, errors, glimpse, top = [], [], local.glimpse, local.n_layers
    for layer, active in enumerate(local.features):
        for city, slot in active.active.nonzero().tolist():
            feature = int(active.index[city, slot])
            activation = float(local.activations[layer][city, slot])
            features.append({"kind": "feature", "id": f"F:{layer}:{city}:{feature}", "layer": layer, "city": city,
                             "feature": feature, "activation": activation})  # fmt: skip
    for layer, error in enumerate(local.errors):
        for city in range(local.decision.n):
            errors.append({"kind": "error", "id": f"E:{layer}:{city}", "layer": layer, "city": city,
                           "norm": float(error[city].norm())})  # fmt: skip
    if glimpse is not None:  # "layer" n_layers, at the current city
        for feature, activation in zip(glimpse.index.tolist(), glimpse.activations.tolist(), strict=True):
            features.append({"kind": "feature", "id": f"F:{top}:{glimpse.city}:{feature}", "layer": top,
                             "city": glimpse.city, "feature": feature, "activation": activation})  # fmt: skip
        errors.append({"kind": "error", "id": f"E:{top}:{glimpse.city}", "layer": top, "city": glimpse.city,
                       "norm": float(glimpse.error.norm())})  # fmt: skip
        top += 1
    inputs = [{"kind": "input", "id": f"I:{city}", "city": city} for city in range(local.decision.n)]
    targets = [{"kind": "target", "id": f"T:{city}", "city": city, "layer": top,
                "against": None if local.against is None else local.against[i]}
               for i, city in enumerate(local.targets)]  # fmt: skip
    return features + errors + inputs + targets


@torch.no_grad()
def build_graph(local: LocalModel, target_weights: torch.Tensor, chunk: int = 512) -> Graph:
    """Every direct effect of `local`, computed by batched reverse passes through the frozen model (`chunk`
    receivers at a time; fewer when tangent attention's [receiver, head, node, node] cotangents would pass 128 MB)."""
    n, layers = local.decision.n, local.n_layers
    if local.attention == "tangent":
        chunk = max(8, min(chunk, 2**24 // (local.attn[0].pattern.numel())))
    glimpse = local.glimpse
    counts = [int(f.active.sum()) for f in local.features] + ([len(glimpse.index)] if glimpse is not None else [])
    offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
    n_features, n_errors = offsets[-1], layers * n + (glimpse is not None)
    total = n_features + n_errors + n + len(local.targets)
    adjacency = torch.zeros(total, total, dtype=DTYPE)

    def fill(rows: slice, cotangent: torch.Tensor, layer: int) -> None:
        """Receivers `rows` with cotangents [R, node, d] on mlp_in of `layer` (the encoder output at n_layers)."""
        mlp_out, inputs = local.backward(cotangent, layer)
        row = adjacency[rows]  # a view: filled in place
        for i in range(layer):  # features of layer i write into mlp_out of layers i..layer-1
            derivative = torch.zeros(len(cotangent), n, local.features[i].active.shape[1], dtype=DTYPE)
            for m in range(i, layer):
                writes = local.features[i].writes[m]
                if writes is not None:
                    derivative += torch.einsum("rnd,nkd->rnk", mlp_out[m], writes)
            mask = local.features[i].active
            row[:, offsets[i] : offsets[i + 1]] = derivative[:, mask] * local.activations[i][mask]
        for m in range(layer):
            start = n_features + m * n
            row[:, start : start + n] = torch.einsum("rnd,nd->rn", mlp_out[m], local.errors[m])
        row[:, n_features + n_errors : n_features + n_errors + n] = torch.einsum("rnd,nd->rn", inputs, local.x0)

    for layer, features in enumerate(local.features):
        cities, slots = features.active.nonzero(as_tuple=True)
        for start in range(0, len(cities), chunk):
            c, s = cities[start : start + chunk], slots[start : start + chunk]
            cotangent = torch.zeros(len(c), n, local.d, dtype=DTYPE)
            cotangent[torch.arange(len(c)), c] = features.rows[c, s]
            fill(slice(offsets[layer] + start, offsets[layer] + start + len(c)), cotangent, layer)
    targets = slice(total - len(local.targets), total)
    fill(targets, local.target_cotangents(), layers)
    if glimpse is not None:  # the glimpse features read the context (first, current city), and write the targets
        fill(slice(offsets[layers], offsets[layers + 1]), glimpse.pre_cotangents(), layers)
        adjacency[targets, offsets[layers] : offsets[layers + 1]] = glimpse.feature_edges()
        adjacency[targets, n_features + n_errors - 1] = glimpse.error_edges()

    activations = local.source_activations()
    zeros = [torch.zeros_like(a) for a in activations]
    zero_pres, zero_targets = local.forward(zeros, torch.zeros(layers, n, dtype=DTYPE), torch.zeros(n, dtype=DTYPE),
                                            glimpse_error=0.0)  # fmt: skip
    pres, target_values = local.forward(activations)
    constants, values = torch.zeros(total, dtype=DTYPE), torch.zeros(total, dtype=DTYPE)
    for i, features in enumerate(local.features):
        constants[offsets[i] : offsets[i + 1]] = zero_pres[i][features.active]
        values[offsets[i] : offsets[i + 1]] = pres[i][features.active]
    if glimpse is not None:
        constants[offsets[layers] : offsets[layers + 1]] = zero_pres[layers]
        values[offsets[layers] : offsets[layers + 1]] = pres[layers]
    constants[targets] = zero_targets
    values[targets] = target_values
    values[n_features : n_features + n_errors + n] = 1.0
    return Graph(node_list(local), adjacency, constants, values, n_features, n_errors, n, target_weights.to(DTYPE))
