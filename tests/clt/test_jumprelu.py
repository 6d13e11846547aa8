"""clt.jumprelu: the threshold activation's forward and its straight-through backward against brute force."""

import torch

from clt.jumprelu import jump_relu, step


def brute_force(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float, grad: torch.Tensor):
    """The documented rule entry by entry: d/dpre = H(pre - theta); d/dtheta = -(theta / bandwidth) on the window
    |pre - theta| < bandwidth / 2, summed over rows."""
    g_pre, g_theta = torch.zeros_like(pre), torch.zeros_like(theta)
    for i in range(pre.shape[0]):
        for f in range(pre.shape[1]):
            if pre[i, f] > theta[f]:
                g_pre[i, f] = grad[i, f]
            if abs(pre[i, f] - theta[f]) < bandwidth / 2:
                g_theta[f] += -(theta[f] / bandwidth) * grad[i, f]
    return g_pre, g_theta


def test_forward_and_backward_match_the_rule_entry_by_entry():
    torch.manual_seed(0)
    pre = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(6, dtype=torch.float64) + 0.2).requires_grad_()
    grad = torch.randn(40, 6, dtype=torch.float64)
    out = jump_relu(pre, theta, 0.5)
    assert torch.equal(out, torch.where(pre > theta, pre, torch.zeros_like(pre)))
    out.backward(grad)
    g_pre, g_theta = brute_force(pre.detach(), theta.detach(), 0.5, grad)
    torch.testing.assert_close(pre.grad, g_pre)
    torch.testing.assert_close(theta.grad, g_theta)
    assert theta.grad.abs().sum() > 0  # some entries sit in the window


def test_the_threshold_gradient_is_the_derivative_of_a_smoothed_step():
    """The pseudo-derivative approximates the derivative, in theta, of the step averaged over a bandwidth-wide
    uniform jitter of the threshold: -(1 / bandwidth) on the window. For step() the rule is that kernel exactly;
    a finite difference of the smoothed step, computed by brute force on a fine grid, agrees."""
    bandwidth, theta0 = 0.4, 0.7
    pre = torch.linspace(0.3, 1.1, 17, dtype=torch.float64)[:, None]
    theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    step(pre, theta, bandwidth).sum().backward()
    jitter = torch.linspace(-bandwidth / 2, bandwidth / 2, 20001, dtype=torch.float64)

    def smoothed(t: float) -> torch.Tensor:  # [row]: the step averaged over the jittered thresholds
        return (pre > t + jitter).to(torch.float64).mean(1)

    h = 1e-3
    numeric = ((smoothed(theta0 + h) - smoothed(theta0 - h)) / (2 * h)).sum()
    torch.testing.assert_close(theta.grad.sum(), numeric, atol=0.15 / bandwidth, rtol=0.05)
