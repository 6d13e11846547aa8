"""sae.decode_kernel (the compiled backward of sae.sparse.sparse_decode on CPU float32) against autograd through
the dense map in float64."""

import pytest
import torch

from sae.sparse import SparseCodes, dense_products_backward, select_topk, sparse_decode, sparse_products_backward


def dense_grads(x, w_enc, b_enc, w_dec, mask, dy):
    """Gradients of sum(dy * (ReLU(x w_enc^T + b) * mask) @ w_dec) by autograd, in float64."""
    params = [t.detach().double().requires_grad_() for t in (x, w_enc, b_enc, w_dec)]
    xd, we, be, wd = params
    y = (torch.relu(xd @ we.T + be) * mask) @ wd
    return torch.autograd.grad((y * dy.double()).sum(), params)


def uneven_codes(pre: torch.Tensor, generator: torch.Generator) -> SparseCodes:
    """0 to 12 entries a row (rows without any included), features from 40 up, values ReLU(pre) there."""
    counts = torch.randint(0, 13, (len(pre),), generator=generator)
    counts[:3] = 0
    features = [40 + torch.randperm(pre.shape[1] - 40, generator=generator)[:c] for c in counts.tolist()]
    rows = torch.repeat_interleave(torch.arange(len(pre)), counts)
    flat = torch.cat(features)
    return SparseCodes(pre[rows, flat].relu(), flat, torch.nn.functional.pad(counts.cumsum(0), (1, 0)))


def hard_case(seed: int, select: str):
    """(x, w_enc, b_enc, w_dec, codes, mask, dy) with features never selected, rows with no entries (uneven) and
    negative pre-activations kept (their ReLU value is 0: no gradient to the encoder)."""
    g = torch.Generator().manual_seed(seed)
    rows, d_in, d_out, n_features = 300, 24, 20, 256
    x = torch.randn(rows, d_in, generator=g)
    w_enc, w_dec = torch.randn(n_features, d_in, generator=g) * 0.1, torch.randn(n_features, d_out, generator=g)
    b_enc = torch.randn(n_features, generator=g) - 2.5  # many kept pre-activations are negative
    w_enc[:40], b_enc[:40] = 0.0, -100.0  # features 0..39 are never selected
    pre = torch.addmm(b_enc, x, w_enc.T)
    codes = select_topk(pre, 8) if select == "topk" else uneven_codes(pre, g)
    assert (codes.values == 0).any() and (codes.values > 0).any() and not (codes.features < 40).any()
    mask = torch.zeros(rows, n_features)
    mask[codes.rows, codes.features] = 1.0
    dy = torch.randn(rows, d_out, generator=g)
    return x, w_enc, b_enc, w_dec, codes, mask, dy


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("select", ["topk", "uneven"])
def test_kernel_gradients_are_the_dense_maps(threads, select):
    """Every gradient (x included), in hard_case's cases."""
    x, w_enc, b_enc, w_dec, codes, mask, dy = hard_case(threads, select)
    leaves = [t.clone().requires_grad_() for t in (x, w_enc, b_enc, w_dec)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = sparse_decode(*leaves, codes)
        got = torch.autograd.grad((y * dy).sum(), leaves)
    finally:
        torch.set_num_threads(previous)
    want = dense_grads(x, w_enc, b_enc, w_dec, mask, dy)
    for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec"), got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backward", [sparse_products_backward, dense_products_backward])
@pytest.mark.parametrize("select", ["topk", "uneven"])
def test_torch_paths_give_the_dense_maps_gradients(backward, select):
    """The backwards that other dtypes (sparse products) and devices (dense products: GPUs) take, called on the
    CPU in float64 on hard_case's cases."""
    x, w_enc, b_enc, w_dec, codes, mask, dy = hard_case(3, select)
    got = backward(x.double(), dy.double(), w_enc.double(), w_dec.double(), codes.values.double(), codes.features,
                   codes.offsets, (True, True, True, True))  # fmt: skip
    want = dense_grads(x, w_enc, b_enc, w_dec, mask, dy)
    for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)  # codes.values were computed in float32


def test_kernel_and_torch_paths_agree():
    """The float32 kernel and the sparse products torch runs for float64 give the same gradients."""
    g = torch.Generator().manual_seed(0)
    x, w_enc = torch.randn(64, 16, generator=g), torch.randn(128, 16, generator=g)
    w_dec = torch.randn(128, 12, generator=g)
    b_enc = torch.zeros(128)
    codes = select_topk(torch.addmm(b_enc, x, w_enc.T), 4)
    dy = torch.randn(64, 12, generator=g)
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w_enc, b_enc, w_dec)]
        typed = SparseCodes(codes.values.to(dtype), codes.features, codes.offsets)
        y = sparse_decode(*leaves, typed)
        results.append(torch.autograd.grad((y * dy.to(dtype)).sum(), leaves))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_grouping_is_a_stable_sort_by_feature(threads):
    """The counting sort that orders the entries by feature (each thread placing its own rows) keeps row order
    within a feature, for any thread count: a stable argsort's order; rows without entries included."""
    from sae.decode_kernel import _group_by_feature

    g = torch.Generator().manual_seed(threads)
    counts = torch.randint(0, 6, (50,), generator=g)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).numpy()
    features = torch.randint(0, 20, (int(counts.sum()),), generator=g).numpy()
    starts, entries, rows = _group_by_feature(features, offsets, 20, threads)
    want = features.argsort(kind="stable")
    assert (entries == want).all()
    assert (rows == torch.repeat_interleave(torch.arange(50), counts).numpy()[want]).all()
    assert (
        starts
        == torch.nn.functional.pad(torch.bincount(torch.from_numpy(features), minlength=20).cumsum(0), (1, 0)).numpy()
    ).all()
