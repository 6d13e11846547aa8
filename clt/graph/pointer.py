"""The targets of a decision's graph: the pointer scores at step t, as linear functions of the encoder output.

The score of candidate c is s_c(H) = g(H) . k_c(H) / sqrt(d): the glimpse g = W_out sum_j P_j V_j (P the glimpse's
attention over the unvisited cities, from the step query q = W_first h_first + W_current h_current (the learned
placeholder at step 0) + W_fixed mean(H)) against the candidate's logit key k_c. The graph uses its tangent at the
decision's input H*,

    T_c(H) = s_c(H*) + grad s_c(H*) . (H - H*),

which equals the score there, is linear in H, and has the score's own gradient: removing a source changes T_c by
the score's first-order change, and contributions plus constants sum exactly to the score. Two glimpses:

- `frozen` (the default, the local model's frozen glimpse pattern): P held at its value, so g is a fixed
  mixture of the unvisited cities' value vectors and s_c is bilinear; T_c is then
  (g(H) . k_c* + g* . k_c(H) - g* . k_c*) / sqrt(d): each source acts through the glimpse's values and through the
  candidate's key. The step context (first and current city, graph mean, placeholder) only sets P, and is no
  source. (The symmetric split (g(H) . k* + g* . k(H)) / 2 also sums exactly, but has half the score's gradient.)
- `tangent`: P responds to first order too: the query side (the current and first city's embeddings, the graph
  mean) and the glimpse keys become paths, so the current city's features get edges. The model stays linear and
  exact at this input; away from it, it is the glimpse's first-order response instead of none.
"""

from __future__ import annotations

import math

import torch

from clt.graph.attention import DTYPE
from clt.graph.decision import Decision
from policy.model import AttentionModel

GLIMPSES = ("frozen", "tangent")


class PointerTargets:
    """Target values as tangents of the pointer scores of `targets` (minus those of `against`, when given)."""

    def __init__(
        self,
        policy: AttentionModel,
        decision: Decision,
        h_star: torch.Tensor,  # [node, d] the encoder output at this input (float64)
        targets: list[int],
        against: list[int] | None = None,
        glimpse: str = "frozen",
    ):
        if glimpse not in GLIMPSES:
            raise ValueError(f"glimpse must be one of {GLIMPSES}, got {glimpse!r}")
        dec = policy.decoder
        self.decision, self.targets, self.against, self.glimpse = decision, list(targets), against, glimpse
        self.heads, self.d = dec.num_heads, h_star.shape[-1]
        self.w_first, self.w_current = dec.project_context.weight.detach().to(DTYPE).chunk(2, dim=1)
        self.w_key, self.w_val, self.w_logit = dec.project_node_embeddings.weight.detach().to(DTYPE).chunk(3, dim=0)
        self.w_fixed = dec.project_fixed_context.weight.detach().to(DTYPE)
        self.w_out = dec.project_out.weight.detach().to(DTYPE)
        self.placeholder = dec.project_context.weight.detach().to(DTYPE) @ dec.W_placeholder.detach().to(DTYPE)
        self.h_star = h_star
        self.pattern = self._pattern(h_star).detach()  # [head, node]
        with torch.enable_grad():
            h = h_star.detach().clone().requires_grad_(True)
            values = self.scores(h)
            grads = [torch.autograd.grad(v, h, retain_graph=True)[0] for v in values]
        self.value_star = values.detach()  # [target]
        self.gradients = torch.stack(grads)  # [target, node, d]

    def context(self, h: torch.Tensor) -> torch.Tensor:
        """The step's context [d] at h (decoder.context): W_first h_first + W_current h_current, or the placeholder."""
        d = self.decision
        return self.w_first @ h[d.first] + self.w_current @ h[d.current] if d.prefix else self.placeholder

    def _pattern(self, h: torch.Tensor) -> torch.Tensor:
        """The glimpse's attention [head, node] over the unvisited cities, from the step query at h."""
        d = self.decision
        query = (self.context(h) + self.w_fixed @ h.mean(0)).view(self.heads, -1)  # [head, dh]
        keys = (h @ self.w_key.T).view(len(h), self.heads, -1).transpose(0, 1)  # [head, node, dh]
        logits = (keys @ query[:, :, None]).squeeze(-1) / math.sqrt(self.d // self.heads)
        return torch.softmax(logits.masked_fill(d.visited(), float("-inf")), dim=-1)

    def glimpse_at(self, h: torch.Tensor) -> torch.Tensor:
        """The glimpse [d] at h (decoder.glimpse), with the pattern frozen or responding."""
        pattern = self.pattern if self.glimpse == "frozen" else self._pattern(h)
        v = (h @ self.w_val.T).unflatten(-1, (self.heads, -1))  # [node, head, dh]
        return (v * pattern.T.unsqueeze(-1)).sum(0).flatten() @ self.w_out.T

    def raw_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Every city's pointer score [node] at h, with the glimpse pattern frozen or responding."""
        return (h @ self.w_logit.T) @ self.glimpse_at(h) / math.sqrt(self.d)

    def delta(self) -> torch.Tensor:
        """[target, node]: each target as a combination of cities' scores (1 at the target, -1 at its runner-up)."""
        delta = torch.zeros(len(self.targets), len(self.h_star), dtype=DTYPE)
        delta[torch.arange(len(self.targets)), self.targets] = 1.0
        if self.against is not None:
            delta[torch.arange(len(self.targets)), self.against] -= 1.0
        return delta

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """The targets' true (nonlinear) values at h: scores, or score differences."""
        s = self.raw_scores(h)
        return s[self.targets] if self.against is None else s[self.targets] - s[self.against]

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """T(h) [target]: the tangent at h*."""
        return self.value_star + ((h - self.h_star) * self.gradients).sum((-2, -1))

    def cotangents(self) -> torch.Tensor:
        """[target, node, d]: each target's gradient with respect to the encoder output."""
        return self.gradients
