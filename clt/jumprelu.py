"""JumpReLU, pre * H(pre - theta), with a learned threshold per feature (Rajamanoharan et al., 2024).

The step has no useful gradient, so theta learns through a straight-through estimate: the
derivative of H is replaced by a rectangle kernel of width `bandwidth` around theta.
"""

from __future__ import annotations

import torch


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dtheta by a rectangle-kernel straight-through estimate."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_theta = -(theta / ctx.bandwidth) * near * grad
        return grad * (pre > theta), grad_theta.sum_to_size(theta.shape), None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty; gradient to theta only, by the same estimate."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum_to_size(theta.shape), None


def jump_relu(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """pre * H(pre - theta); theta [features] gets straight-through gradients."""
    return _JumpReLU.apply(pre, theta, bandwidth)


def step(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(pre - theta) as floats (for an L0 penalty); gradients only to theta."""
    return _Step.apply(pre, theta, bandwidth)
