"""sae.sparse.topk_rows (the compiled kernel of sae.topk_kernel on CPU float32) selects what torch.topk selects."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae.sparse import _kernel_lanes, topk_rows


def same_selection(pre: torch.Tensor, k: int) -> None:
    values, indices = topk_rows(pre, k)
    assert values.shape == indices.shape == (pre.shape[0], k)
    assert torch.equal(values, pre.gather(1, indices))
    assert torch.equal(indices.sort(1).values, torch.topk(pre, k).indices.sort(1).values)


@pytest.mark.parametrize(("rows", "n", "k"), [(4096, 1024, 16), (300, 1000, 16), (77, 128, 8), (50, 40, 1),
                                              (33, 513, 3), (20, 256, 32), (9, 1024, 64),
                                              (512, 500, 64), (40, 300, 64), (64, 100, 16)])  # fmt: skip
def test_same_indices_as_torch_topk(rows, n, k):
    assert _kernel_lanes(n, k) is not None  # these shapes take the kernel
    generator = torch.Generator().manual_seed(n + k)
    same_selection(torch.randn(rows, n, generator=generator), k)


def test_structured_rows():
    """Rows that strain the lane bounds: sorted, reversed, the top k in as few lanes as hold them, negatives only,
    +-inf."""
    n, k = 1024, 16
    lanes = _kernel_lanes(n, k)
    blocks, top = n // lanes, torch.arange(k)
    ramp = torch.arange(n, dtype=torch.float32)
    one_lane = torch.randn(n)
    one_lane[5 + top // blocks + (top % blocks) * lanes] = 100 + top.float()  # lanes 5, 6, ... filled
    inf = torch.randn(n)
    inf[[3, 500]] = float("inf")
    inf[[7, 9]] = -float("inf")
    rows = torch.stack([ramp, ramp.flip(0), one_lane, -torch.rand(n) - 1, inf, torch.randn(n) * 1e-30])
    same_selection(rows, k)


SPECIALS = [float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38, 1e-45]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(128, 8), (300, 16), (257, 4), (1024, 16)]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
    rounded=st.booleans(),
    shift=st.sampled_from([0.0, 1e3]),
    specials=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1023), st.sampled_from(SPECIALS)), max_size=24),
)
def test_any_rows_keep_torch_topk_values(shape, seed, scale, rounded, shift, specials):
    """Whatever the rows hold (ties, signed zeros, +-inf, huge and tiny values; rows alike, or far apart so that the
    previous row's bound misleads), the kept values are torch.topk's and the indices distinct."""
    n, k = shape
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(8, n, generator=generator) * scale
    pre = pre.round() if rounded else pre
    pre += shift * torch.randn(8, 1, generator=generator)
    for row, column, value in specials:
        pre[row, column % n] = value
    assert _kernel_lanes(n, k) is not None
    values, indices = topk_rows(pre, k)
    assert torch.equal(values, pre.gather(1, indices))
    assert torch.equal(values.sort(1).values, torch.topk(pre, k).values.sort(1).values)
    assert all(len(set(row.tolist())) == k for row in indices)


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["normal", "integers", "constant", "heavy", "tiny"]),
    specials=st.lists(st.sampled_from(SPECIALS), max_size=4),
    where=st.floats(0, 1),
)
def test_kth_largest_is_the_partitions(size, seed, kind, specials, where):
    """batchtopk's threshold (sae.topk_kernel._kth_largest, a histogram then a partition of one bin) is
    np.partition's value for any rank, with ties, +-inf, huge and subnormal values."""
    from sae.topk_kernel import _kth_largest

    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(size)
    values = {"normal": normal, "integers": rng.integers(-3, 4, size), "constant": np.ones(size),
              "heavy": normal**9 * 1e30, "tiny": normal * 1e-44}[kind]  # fmt: skip
    values = np.concatenate([values.astype(np.float32), np.array(specials, np.float32)])
    rank = 1 + int(where * (len(values) - 1))
    expected = np.partition(values, len(values) - rank)[len(values) - rank]
    assert _kth_largest(values, rank) == expected


def test_ties_keep_the_same_values():
    """Where entries tie at the k-th value any of them may be kept: the values are torch.topk's, indices distinct."""
    generator = torch.Generator().manual_seed(0)
    pre = torch.randint(-3, 4, (200, 512), generator=generator).float()
    pre[0] = 0.0  # a constant row: more ties than the kernel keeps candidates, torch.topk decides
    pre[1, ::2] = -0.0
    values, indices = topk_rows(pre, 16)
    assert torch.equal(values, pre.gather(1, indices))
    assert torch.equal(values.sort(1).values, torch.topk(pre, 16).values.sort(1).values)
    assert all(len(set(row.tolist())) == 16 for row in indices)


def test_nan_rows_go_to_torch_topk():
    pre = torch.randn(10, 256)
    pre[3, 17] = float("nan")
    pre[6, :] = float("nan")
    _, indices = topk_rows(pre, 8)
    expected = torch.topk(pre, 8, sorted=False)
    for r in (3, 6):
        assert torch.equal(indices[r].sort().values, expected.indices[r].sort().values)
    keep = [r for r in range(10) if r not in (3, 6)]
    assert torch.equal(indices[keep].sort(1).values, torch.topk(pre[keep], 8).indices.sort(1).values)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_agree(threads):
    pre = torch.randn(999, 1024, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        same_selection(pre, 16)
    finally:
        torch.set_num_threads(before)


def test_values_carry_the_gradient():
    pre = torch.randn(64, 512, requires_grad=True)
    weight = torch.randn(64, 16)
    values, _ = topk_rows(pre, 16)
    (values.sort(1).values * weight).sum().backward()
    ours = pre.grad.clone()
    pre.grad = None
    (torch.topk(pre, 16).values.flip(1) * weight).sum().backward()
    assert torch.equal(ours, pre.grad)


@pytest.mark.parametrize(("dtype", "n", "k"), [(torch.float64, 1024, 16), (torch.float32, 60, 16)])
def test_torch_topk_where_the_kernel_does_not_apply(dtype, n, k):
    pre = torch.randn(30, n, dtype=dtype)
    if dtype == torch.float32:
        assert _kernel_lanes(n, k) is None  # rows too short for two blocks of 2k lanes
    same_selection(pre, k)


KEEPS_TORCH_THREADS = """
import torch
torch.set_num_threads(1)
from sae.sparse import select_topk, sparse_decode
pre = torch.randn(64, 256)
codes = select_topk(pre, 8)  # the first kernel launches numba's pool of NUMBA_NUM_THREADS = 2
x = torch.randn(64, 32)
w_enc, w_dec = torch.randn(256, 32, requires_grad=True), torch.randn(256, 16, requires_grad=True)
sparse_decode(x, w_enc, torch.zeros(256), w_dec, codes).sum().backward()
print(torch.get_num_threads())
"""


def test_numbas_pool_leaves_torchs_thread_count_alone():
    """numba's OpenMP pool set OpenMP's thread count to its own size when it launched, so a trainer asked for one
    thread ran torch's parallel ops on every core after its first kernel (two such processes side by side ran 2-8x
    slower, two DDP ranks 2.3x)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", KEEPS_TORCH_THREADS], capture_output=True, text=True, env=env,
                         check=True).stdout  # fmt: skip
    assert out.split() == ["1"]
