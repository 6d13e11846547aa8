"""On CUDA the selections and the sparse decode's backward take torch's paths (torch.topk, dense GEMMs), not the
CPU kernels: they must select and differentiate as the CPU does. Skipped without a CUDA device."""

import pytest
import torch

from sae.sparse import select_batchtopk, select_topk, sparse_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_selections_and_gradients_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    x, w_enc, w_dec = (
        torch.randn(512, 32, generator=g),
        torch.randn(256, 32, generator=g),
        torch.randn(256, 24, generator=g),
    )
    b_enc = torch.randn(256, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (x, w_enc, b_enc, w_dec)]
        pre = torch.addmm(leaves[2], leaves[0], leaves[1].T).detach()
        for select in (select_topk, select_batchtopk):
            codes = select(pre, 8)
            y = sparse_decode(*leaves, codes)
            grads = torch.autograd.grad(y.square().sum(), leaves)
            results.append((codes.dense(256).cpu(), [t.cpu() for t in grads]))
    for (z_cpu, g_cpu), (z_cuda, g_cuda) in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(z_cuda, z_cpu, rtol=1e-4, atol=1e-4)
        for a, b in zip(g_cuda, g_cpu, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
