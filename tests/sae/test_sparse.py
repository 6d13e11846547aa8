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


@pytest.mark.parametrize(("rows", "n", "threads"), [(256, 512, 2), (64, 300, 2), (77, 1000, 1), (40, 129, 2),
                                                    (33, 3, 2)])  # fmt: skip
def test_batchtopk_kernel_decides_on_cpu_float32(rows, n, threads):
    """The compiled path (sae.topk_kernel.batch_top) is what selects on CPU float32, not its torch fallback, and
    keeps the batch-wide top entries, rows whose width is no multiple of its lanes included."""
    from sae import topk_kernel

    pre = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    total = min(8, n - 1) * rows
    values, columns, counts = topk_kernel.batch_top(pre, total, threads=threads)
    assert counts.sum() == len(values) == total
    kept_rows = torch.repeat_interleave(torch.arange(rows), counts)
    assert torch.equal(values, pre[kept_rows, columns])
    expected = torch.topk(pre.flatten(), total).indices
    assert torch.equal((kept_rows * n + columns).sort().values, expected.sort().values)


def test_batchtopk_ties_nan_and_gradient():
    g = torch.Generator().manual_seed(2)
    ties = torch.randint(-4, 5, (300, 128), generator=g).float()  # thousands tie at the threshold
    codes = select_batchtopk(ties, 5)
    entries = set(zip(codes.rows.tolist(), codes.features.tolist(), strict=True))
    assert codes.offsets[-1] == len(codes.values) == len(entries) == 1500
    assert torch.equal(codes.values.sort().values, torch.topk(ties.flatten(), 1500).values.relu().sort().values)
    nan = torch.randn(64, 128, generator=g)
    nan[5, 7] = float("nan")
    codes = select_batchtopk(nan, 4)  # torch.topk decides (NaN ranks above everything)
    assert codes.rows[torch.isnan(codes.values)].tolist() == [5]
    pre = torch.randn(64, 128, generator=g, requires_grad=True)
    codes = select_batchtopk(pre, 4)
    codes.values.sum().backward()
    assert torch.equal(pre.grad, codes.dense(128).detach().gt(0).float())
