"""An encoder layer's multi-head attention in the local replacement model: linear in its input x [node, d].

- `frozen` (default): the pattern A held at this input, attn(x) = sum_h A_h (x Wv_h + bv_h) Wo_h + bo. Cities
  affect each other only through the value path, as in circuit-tracer's frozen-attention graphs.
- `tangent`: attn's tangent at this input x*, attn(x*) + J (x - x*): the value path plus the pattern's first-order
  response through the queries and keys (dA = A * (dS - rowsum(A * dS)), dS = (dQ K*^T + Q* dK^T) / sqrt(dh)).
  Exact at this input and linear; it adds the QK paths that a frozen pattern leaves out, to first order.

Each has `back(g)`, the transpose of its linear part, for the graph's reverse passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from policy.model import MultiHeadAttention

ATTENTIONS = ("frozen", "tangent")
DTYPE = torch.float64  # the local replacement model and its targets run in float64


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [..., node, d] -> [..., head, node, dh]
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [..., head, node, dh] -> [..., node, d]
    return x.transpose(-3, -2).flatten(-2)


@dataclass
class FrozenAttention:
    pattern: torch.Tensor  # [head, node, node]
    w_v: torch.Tensor  # [d, d]
    b_v: torch.Tensor  # [d]
    w_o: torch.Tensor  # [d, d]
    b_o: torch.Tensor  # [d]

    def _mix(self, v: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:  # [..., node, d] per-head mixing
        heads = pattern.shape[0]
        return torch.einsum("hij,...jhd->...ihd", pattern, v.unflatten(-1, (heads, -1))).flatten(-2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., node, d]
        return self._mix(x @ self.w_v.T + self.b_v, self.pattern) @ self.w_o.T + self.b_o

    def back(self, g: torch.Tensor) -> torch.Tensor:
        return self._mix(g @ self.w_o, self.pattern.transpose(-1, -2)) @ self.w_v


@dataclass
class TangentAttention(FrozenAttention):
    w_q: torch.Tensor  # [d, d]
    w_k: torch.Tensor  # [d, d]
    x_star: torch.Tensor  # [node, d]
    q_star: torch.Tensor  # [head, node, dh]
    k_star: torch.Tensor  # [head, node, dh]
    v_star: torch.Tensor  # [head, node, dh]

    @property
    def scale(self) -> float:
        return 1 / math.sqrt(self.q_star.shape[-1])

    def _softmax_back(self, g: torch.Tensor) -> torch.Tensor:
        """d(pattern) -> d(scores), [..., head, node, node]: P * (g - sum_j g P), in place (g is a temporary)."""
        along = torch.einsum("...hij,hij->...hi", g, self.pattern)
        return g.sub_(along[..., None]).mul_(self.pattern)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        heads, delta = self.pattern.shape[0], x - self.x_star
        q, k, v = (_heads(delta @ w.T, heads) for w in (self.w_q, self.w_k, self.w_v))
        d_scores = (q @ self.k_star.transpose(-1, -2) + self.q_star @ k.transpose(-1, -2)) * self.scale
        d_pattern = self._softmax_back(d_scores)  # the softmax's Jacobian is symmetric
        out_star = _merge(self.pattern @ self.v_star) @ self.w_o.T + self.b_o
        return out_star + _merge(self.pattern @ v + d_pattern @ self.v_star) @ self.w_o.T

    def back(self, g: torch.Tensor) -> torch.Tensor:
        heads = self.pattern.shape[0]
        g_out = _heads(g @ self.w_o, heads)  # [..., head, node, dh]
        g_v = torch.einsum("hji,...hjd->...hid", self.pattern, g_out)
        g_scores = self._softmax_back(torch.einsum("...hid,hjd->...hij", g_out, self.v_star)).mul_(self.scale)
        g_q, g_k = g_scores @ self.k_star, g_scores.transpose(-1, -2) @ self.q_star
        return _merge(g_v) @ self.w_v + _merge(g_q) @ self.w_q + _merge(g_k) @ self.w_k


def attention_at(attn: MultiHeadAttention, x: torch.Tensor, mode: str = "frozen") -> FrozenAttention:
    """The layer's attention in the local model at its input x [node, d] (float64)."""
    if mode not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {mode!r}")
    w, b = attn.Wqkv.weight.detach().to(DTYPE), attn.Wqkv.bias.detach().to(DTYPE)
    d, heads = x.shape[-1], attn.num_heads
    q, k, v = (_heads(x @ w[i * d : (i + 1) * d].T + b[i * d : (i + 1) * d], heads) for i in range(3))
    pattern = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    frozen = (pattern, w[2 * d :], b[2 * d :], attn.out_proj.weight.detach().to(DTYPE),
              attn.out_proj.bias.detach().to(DTYPE))  # fmt: skip
    if mode == "frozen":
        return FrozenAttention(*frozen)
    return TangentAttention(*frozen, w[:d], w[d : 2 * d], x, q, k, v)
