"""sae.sparse's selections: top-k per row and the batch-wide top k * batch, against torch.topk."""

import pytest
import torch

from sae.sparse import select_batchtopk, select_topk


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_select_topk_is_relu_of_the_top_k(sign):
    pre = sign * torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    codes = select_topk(pre, 8)
    top = torch.topk(pre, 8)
    assert torch.equal(codes.dense(64), torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()))


@pytest.mark.parametrize("spread", [0.0, 3.0, 12.0])
def test_batchtopk_is_the_batch_wide_top(spread):
    """Rows of very different scales put many more than 4k entries of some rows into the batch-wide top:
    the candidate search must widen (or fall back) and still select exactly."""
    g = torch.Generator().manual_seed(int(spread))
    pre = torch.randn(512, 256, generator=g) * torch.exp(spread * torch.rand(512, 1, generator=g))
    codes = select_batchtopk(pre, 8)
    flat = torch.topk(pre.flatten(), 8 * 512).indices
    ref = torch.zeros(pre.numel()).index_put_((flat,), pre.flatten()[flat].relu())
    assert torch.equal(codes.dense(256).flatten(), ref)
    assert codes.offsets[-1] == 8 * 512 and torch.equal(codes.offsets.diff().sum(), torch.tensor(8 * 512))
