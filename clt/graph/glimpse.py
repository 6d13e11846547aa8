"""The glimpse at a decision's step, replaced by a decoder-side transcoder: its features become graph nodes.

At step t the glimpse reads the step's context q(H) = W_first h_first + W_current h_current (`decoder.context`;
the learned placeholder at step 0). With a `decoder.context -> decoder.glimpse` transcoder
(clt.graph.replacement.Replacement.glimpse) the local model's glimpse is

    g = b + sum_j z_j D_j + e      z_j = E_j . q(H) + c_j on the features the transcoder selects at this input,
                                   e = g* - (b + sum_j z*_j D_j): the glimpse's error node, held fixed

and each target is the score's tangent in (g, H):

    T_c = (g . k_c* + g* . (k_c(H) - k_c*)) / sqrt(d)          (minus the same for the runner-up)

linear in the glimpse features' activations and in H, and exact at this input (g = g*). H reaches a target through
the glimpse features' pre-activations (the first and the current city's embeddings, via the context) and through
the candidates' logit keys; the frozen glimpse's value path is what the features replace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clt.graph.attention import DTYPE
from clt.graph.decision import Decision
from clt.graph.pointer import PointerTargets
from clt.graph.replacement import Replacement


@dataclass
class GlimpseFeatures:
    """The glimpse transcoder's features active at this step, and the linear maps around them."""

    index: torch.Tensor  # [slot] feature ids
    rows: torch.Tensor  # [slot, d] encoder rows (raw context units)
    bias: torch.Tensor  # [slot] encoder biases (the context mean folded in)
    writes: torch.Tensor  # [slot, d] decoder rows into the raw glimpse
    decoder_bias: torch.Tensor  # [d]
    error: torch.Tensor  # [d] the glimpse at this input (pattern frozen, at h*) minus the transcoder's prediction
    activations: torch.Tensor  # [slot] z at this input (= the pre-activations)
    g_star: torch.Tensor  # [d] the glimpse at this input
    directions: torch.Tensor  # [target, d] (k_c* - k_against*) / sqrt(d): what a unit of glimpse adds to each target
    decision: Decision
    pointer: PointerTargets

    @classmethod
    @torch.no_grad()
    def at(cls, replacement: Replacement, pointer: PointerTargets) -> GlimpseFeatures:
        """The glimpse features of pointer's decision, selected by the transcoder from the context at h*."""
        decision = pointer.decision
        if not decision.prefix:
            raise ValueError("glimpse features need step >= 1: at step 0 the context is the learned placeholder")
        context = pointer.context(pointer.h_star)  # [d]
        codes = replacement.glimpse_codes(context.float()[None])[0]
        index = (codes != 0).nonzero().flatten()
        rows, bias = (t.to(DTYPE)[index] for t in replacement.glimpse_encoder())
        writes = replacement.glimpse_decoder().to(DTYPE)[index]
        decoder_bias = replacement.glimpse_bias().to(DTYPE)
        activations = rows @ context + bias
        g_star = pointer.glimpse_at(pointer.h_star)
        directions = pointer.delta() @ (pointer.h_star @ pointer.w_logit.T) / math.sqrt(pointer.d)
        error = g_star - (decoder_bias + activations @ writes)
        return cls(index, rows, bias, writes, decoder_bias, error, activations, g_star, directions, decision, pointer)

    @property
    def city(self) -> int:
        """Where the glimpse features sit in a graph: the current city (the one the step's context leaves from)."""
        return self.decision.current

    def pre(self, h: torch.Tensor) -> torch.Tensor:  # encoder output [node, d] -> [slot]
        return self.rows @ self.pointer.context(h) + self.bias

    def pre_cotangents(self) -> torch.Tensor:
        """[slot, node, d]: each pre-activation's gradient with respect to the encoder output (first, current)."""
        p, d = self.pointer, self.decision
        cot = torch.zeros(len(self.index), d.n, p.d, dtype=DTYPE)
        cot[:, d.first] += self.rows @ p.w_first
        cot[:, d.current] += self.rows @ p.w_current
        return cot

    def glimpse(self, activations: torch.Tensor, error_scale: float = 1.0) -> torch.Tensor:  # [d]
        return self.decoder_bias + activations @ self.writes + self.error * error_scale

    def targets(self, h: torch.Tensor, activations: torch.Tensor, error_scale: float = 1.0) -> torch.Tensor:
        """T [target] at encoder output h with the glimpse features at `activations`."""
        p = self.pointer
        keys = (h - p.h_star) @ p.w_logit.T  # [node, d]: the logit keys' change
        key_part = p.delta() @ keys @ self.g_star / math.sqrt(p.d)
        return self.directions @ self.glimpse(activations, error_scale) + key_part

    def key_cotangents(self) -> torch.Tensor:
        """[target, node, d]: each target's gradient with respect to the encoder output, the features held."""
        p = self.pointer
        through_key = self.g_star @ p.w_logit / math.sqrt(p.d)  # [d]
        return p.delta()[:, :, None] * through_key

    def feature_edges(self) -> torch.Tensor:
        """[target, slot]: each glimpse feature's direct effect on each target (activation x derivative)."""
        return (self.directions @ self.writes.T) * self.activations

    def error_edges(self) -> torch.Tensor:
        """[target]: the glimpse error node's direct effect on each target."""
        return self.directions @ self.error
