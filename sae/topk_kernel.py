"""A compiled top-k selection for rows of CPU float32 values (numba): torch.topk's selection, about 3x faster.

Each row of n values is read as blocks of `lanes` consecutive values, lane j holding the row's
entries j, j + lanes, j + 2 lanes, ...:

1. m[j], the maximum of lane j (elementwise maxima of the blocks: vectorised);
2. t0 = the smallest of k group maxima, lane j in group j mod k: every group holds a value >= t0,
   so at least k lane maxima are >= t0;
3. t1 = the k-th largest lane maximum, among those >= t0 (for each, count the maxima above it):
   k lanes hold a value >= t1, so the row's k-th largest value is >= t1;
4. the candidates, every value >= t1 (they sit in the lanes whose maximum is >= t1): usually k and a few;
5. the smallest candidates are dropped one at a time until k are left.

The k kept are those torch.topk keeps; where several entries tie at the k-th value, which of them
is kept may differ (the values are the same). A row with a NaN, or with `4 k` or more
candidates (many ties: a constant row), is flagged for the caller to select with torch.topk.
sae.sparse.topk_rows picks the lanes (4k rounded up to a multiple of 16, two blocks a row at least) and
falls back to torch.topk where the kernel does not apply.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange


@njit(inline="always")
def _kth_largest(values, count, k):
    """The k-th largest of values[:count] (count >= k): the smallest value with fewer than k values above it."""
    out = np.float32(np.inf)
    for i in range(count):
        v = values[i]
        above = np.int32(0)
        for j in range(count):
            above += np.int32(values[j] > v)
        if above < k and v < out:
            out = v
    return out


@njit(nogil=True, boundscheck=False, cache=True)
def _select_rows(pre, k, lanes, indices, redo, start, stop):
    """Rows start:stop of pre [rows, n] -> indices [rows, k]; redo[r] = 1 where torch.topk must decide."""
    n = pre.shape[1]
    blocks = n // lanes
    cap = 4 * k
    lane_max = np.empty(lanes, np.float32)
    above_t0 = np.empty(lanes, np.float32)
    cand = np.empty(cap, np.float32)
    cand_index = np.empty(cap, np.int64)
    for r in range(start, stop):
        row = pre[r]
        view = row[: blocks * lanes].reshape(blocks, lanes)
        lane_max[:] = view[0]
        for b in range(1, blocks):
            np.maximum(lane_max, view[b], lane_max)  # NaN propagates
        for e in range(blocks * lanes, n):
            x = row[e]
            if not x <= lane_max[e - blocks * lanes]:
                lane_max[e - blocks * lanes] = x
        nan = False
        for j in range(lanes):
            nan |= lane_max[j] != lane_max[j]
        if nan:
            redo[r] = 1
            continue
        t0 = np.float32(np.inf)
        for g in range(k):
            group = lane_max[g]
            for j in range(g + k, lanes, k):
                group = max(group, lane_max[j])
            t0 = min(t0, group)
        count = 0
        for j in range(lanes):
            above_t0[count] = lane_max[j]
            count += lane_max[j] >= t0
        t1 = _kth_largest(above_t0, count, k)
        count = 0
        for j in range(lanes):
            if lane_max[j] >= t1:
                e = j
                while e < n and count < cap:  # a scalar loop: vectorised, these strided loads become slow gathers
                    x = row[e]
                    if x >= t1:
                        cand[count] = x
                        cand_index[count] = e
                        count += 1
                    e += lanes
        if count == cap:
            redo[r] = 1
            continue
        for _ in range(count - k):  # drop the smallest
            low = 0
            for q in range(1, count):
                if cand[q] < cand[low]:
                    low = q
            count -= 1
            cand[low] = cand[count]
            cand_index[low] = cand_index[count]
        indices[r, :] = cand_index[:k]


@njit(nogil=True, parallel=True, boundscheck=False, cache=True)
def _select_parallel(pre, k, lanes, indices, redo, threads):
    rows = pre.shape[0]
    per = (rows + threads - 1) // threads
    for t in prange(threads):
        _select_rows(pre, k, lanes, indices, redo, t * per, min(rows, (t + 1) * per))


def topk(pre: torch.Tensor, k: int, lanes: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [rows, k], redo [rows] bool) for a contiguous CPU float32 [rows, n] with n >= 2 lanes."""
    rows = pre.shape[0]
    indices = torch.empty(rows, k, dtype=torch.int64)
    redo = np.zeros(rows, np.uint8)
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS, rows))
    numba.set_num_threads(threads)
    args = (pre.numpy(), k, lanes, indices.numpy(), redo)
    if threads == 1:
        _select_rows(*args, 0, rows)
    else:
        _select_parallel(*args, threads)
    return indices, torch.from_numpy(redo.view(np.bool_))
