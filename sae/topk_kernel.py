"""A compiled top-k selection for rows of CPU float32 values (numba): torch.topk's selection, faster (bench.train).

Each row of n values is read as blocks of `lanes` consecutive values, lane j holding the row's
entries j, j + lanes, j + 2 lanes, ...:

1. m[j], the maximum of lane j (elementwise maxima of the blocks: vectorised);
2. a bound t with at least k lane maxima >= t, and at most k + 2 where a few halvings of the interval
   [min m, max m] find one (each halving counts the maxima above a value: vectorised; the previous row's
   bound is tried first, which saves about one halving). k lanes hold a value >= t, so the row's k-th
   largest value is >= t;
3. the candidates, every value >= t (they sit in the lanes whose maximum is >= t): usually k and a few;
4. the smallest candidates are dropped one at a time until k are left.

The k kept are those torch.topk keeps; where several entries tie at the k-th value, which of them
is kept may differ (the values are the same). A row with a NaN, or with `4 k` or more
candidates (many ties: a constant row), is flagged for the caller to select with torch.topk.
sae.sparse.topk_rows picks the lanes (8k or 4k rounded up to a multiple of 16, or half a row; two blocks a row) and
falls back to torch.topk where the kernel does not apply.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange


@njit(nogil=True, boundscheck=False, fastmath={"nnan"}, inline="always", cache=True)
def _min_max(values):
    """(min, max) of values holding no NaN: the NaN-free promise lets the reduction vectorise."""
    low = high = values[0]
    for j in range(1, len(values)):
        low = min(low, values[j])
        high = max(high, values[j])
    return low, high


@njit(nogil=True, boundscheck=False, inline="always", cache=True)
def _lanes_at_least(values, bound):
    """How many values are >= bound, counted in int32 (vectorises wider than int64 counts)."""
    count = np.int32(0)
    for j in range(len(values)):
        count += np.int32(values[j] >= bound)
    return count


@njit(nogil=True, boundscheck=False, inline="always", cache=True)
def _lane_maxima(row, lanes, lane_max):
    """lane_max[j] = the largest of row[j], row[j + lanes], ... (vectorised; a NaN in a lane makes its maximum NaN)."""
    blocks = len(row) // lanes
    view = row[: blocks * lanes].reshape(blocks, lanes)
    lane_max[:] = view[0]
    for b in range(1, blocks):
        np.maximum(lane_max, view[b], lane_max)  # NaN propagates
    for e in range(blocks * lanes, len(row)):
        x = row[e]
        if not x <= lane_max[e - blocks * lanes]:
            lane_max[e - blocks * lanes] = x


@njit(nogil=True, boundscheck=False, inline="always", cache=True)
def _append_at_least(row, lanes, lane_max, bound, chosen, out_values, out_columns, cap):
    """The values >= bound (and their columns) of the lanes whose maximum reaches it, into out_values and out_columns,
    lane by lane; stops after the lane that brings their count to `cap`. Returns the count.

    Each value is stored and the count advanced by the comparison, without a branch: which values pass is
    unpredictable, and a mispredicted branch costs more than a store (out_* hold one lane more than `cap`).
    """
    blocks = len(row) // lanes
    view = row[: blocks * lanes].reshape(blocks, lanes)
    chosen_count = 0
    for j in range(lanes):
        chosen[chosen_count] = j
        chosen_count += lane_max[j] >= bound
    count = 0
    for c in range(chosen_count):
        j = chosen[c]
        for b in range(blocks):  # a fixed trip count: unrolled
            x = view[b, j]
            out_values[count] = x
            out_columns[count] = b * lanes + j
            count += x >= bound
        for e in range(blocks * lanes + j, len(row), lanes):  # the row's tail (n not a multiple of lanes)
            x = row[e]
            out_values[count] = x
            out_columns[count] = e
            count += x >= bound
        if count >= cap:
            break
    return count


@njit(nogil=True, inline="always", cache=True)
def thread_rows(t, rows, threads):
    """(start, stop): the rows thread t of `threads` takes, ceil(rows / threads) each (the last ones may get fewer, or
    none)."""
    per = (rows + threads - 1) // threads
    return min(rows, t * per), min(rows, (t + 1) * per)


@njit(nogil=True, boundscheck=False, cache=True)
def _select_rows(pre, k, lanes, values, indices, redo, start, stop):
    """Rows start:stop of pre [rows, n] -> values, indices [rows, k]; redo[r] = 1 where torch.topk must decide."""
    cap = 4 * k
    lane_max = np.empty(lanes, np.float32)
    chosen = np.empty(lanes, np.int64)
    cand = np.empty(cap + pre.shape[1] // lanes + 1, np.float32)  # room for one more lane past the cap
    cand_index = np.empty(len(cand), np.int32)
    guess = np.float32(np.nan)
    for r in range(start, stop):
        row = pre[r]
        _lane_maxima(row, lanes, lane_max)
        nan = False
        for j in range(lanes):
            nan |= lane_max[j] != lane_max[j]
        if nan:
            redo[r] = 1
            continue
        bound, above = _min_max(lane_max)  # >= k lane maxima reach `bound`, fewer than k pass `above`
        reached = lanes  # lane maxima >= bound
        if bound < guess < above:  # the previous row's bound, tried first: rows alike need fewer halvings
            count = _lanes_at_least(lane_max, guess)
            if count >= k:
                bound, reached = guess, count
            else:
                above = guess
        for _ in range(16):
            if reached <= k + 2:
                break
            middle = bound + (above - bound) * np.float32(0.5)
            count = _lanes_at_least(lane_max, middle)
            if count >= k:
                bound, reached = middle, count
            else:
                above = middle
        count = _append_at_least(row, lanes, lane_max, bound, chosen, cand, cand_index, cap)
        if count >= cap:
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
        values[r, :] = cand[:k]
        indices[r, :] = cand_index[:k]
        guess = bound


@njit(nogil=True, parallel=True, boundscheck=False, cache=True)
def _select_parallel(pre, k, lanes, values, indices, redo, threads):
    for t in prange(threads):
        start, stop = thread_rows(t, pre.shape[0], threads)
        _select_rows(pre, k, lanes, values, indices, redo, start, stop)


def use_threads(threads: int) -> int:
    """Have numba's parallel loops run on `threads` threads (at least 1, at most its pool); the count used.

    The first call launches numba's OpenMP pool, which sets OpenMP's thread count to the pool's size
    (NUMBA_NUM_THREADS: every core unless set) in the OpenMP runtime torch's parallel ops use as well; torch's own count
    (torch.set_num_threads, OMP_NUM_THREADS) is put back. Left changed, a trainer asked for one thread ran torch's
    elementwise ops on every core, and two such processes side by side (or two DDP ranks) ran 2-8x slower on 2 cores."""
    torch_threads = torch.get_num_threads()
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return threads


def topk(pre: torch.Tensor, k: int, lanes: int, threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices [rows, k], redo [rows] bool) for a contiguous CPU float32 [rows, n] with n >= 2 lanes; the
    rows marked redo hold no selection."""
    rows = pre.shape[0]
    values, indices = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64)
    redo = np.zeros(rows, np.uint8)
    threads = use_threads(min(threads, rows))
    args = (pre.numpy(), k, lanes, values.numpy(), indices.numpy(), redo)
    if threads == 1:
        _select_rows(*args, 0, rows)
    else:
        _select_parallel(*args, threads)
    return values, indices, torch.from_numpy(redo.view(np.bool_))


@njit(nogil=True, parallel=True, boundscheck=False, cache=True)
def _count_at_least(pre, bound, counts):
    """counts[r] = how many of row r's values are >= bound; -1 for a row holding a NaN."""
    for r in prange(pre.shape[0]):
        row = pre[r]
        count = 0
        nan = False
        for e in range(pre.shape[1]):
            x = row[e]
            count += x >= bound
            nan |= x != x
        counts[r] = -1 if nan else count


@njit(nogil=True, boundscheck=False, cache=True)
def _gather_rows(pre, bound, lanes, starts, values, indices, start, stop):
    """Rows start:stop's values >= bound, and their columns, into values[starts[r]:], indices[starts[r]:] (a row's
    entries in lane order). The rows hold no NaN. As in _select_rows, only the lanes whose maximum reaches the bound
    are read again: a branch on each value would be mispredicted at every hit."""
    n = pre.shape[1]
    lane_max = np.empty(lanes, np.float32)
    chosen = np.empty(lanes, np.int64)
    hit_values = np.empty(n + n // lanes + 1, np.float32)
    hit_columns = np.empty(len(hit_values), np.int64)
    for r in range(start, stop):
        row = pre[r]
        _lane_maxima(row, lanes, lane_max)
        hits = _append_at_least(row, lanes, lane_max, bound, chosen, hit_values, hit_columns, n)  # a cap never passed
        q = starts[r]
        values[q : q + hits] = hit_values[:hits]
        indices[q : q + hits] = hit_columns[:hits]


@njit(nogil=True, parallel=True, boundscheck=False, cache=True)
def _gather_parallel(pre, bound, lanes, starts, values, indices, threads):
    for t in prange(threads):
        start, stop = thread_rows(t, pre.shape[0], threads)
        _gather_rows(pre, bound, lanes, starts, values, indices, start, stop)


@njit(nogil=True, boundscheck=False, cache=True)
def _kth_largest(values, rank):
    """The rank-th largest (1-based) of float32 values holding no NaN: a histogram of 4096 equal bins between the
    smallest and the largest value finds the bin that holds it (the bins keep the values' order), a partition of that
    bin's values the value (cheaper than np.partition over all the gathered values)."""
    low, high = values.min(), values.max()
    if not (high > low and np.isfinite(high - low)):  # one value, or +-inf among them
        return np.partition(values, len(values) - rank)[len(values) - rank]
    bins = 4096
    scale = bins / (np.float64(high) - np.float64(low))
    counts = np.zeros(bins + 1, np.int64)  # the largest value falls in bin `bins`
    for v in values:
        counts[int((np.float64(v) - low) * scale)] += 1
    above, b = 0, bins  # values in the bins above bin b
    while above + counts[b] < rank:
        above += counts[b]
        b -= 1
    members = np.empty(counts[b], np.float32)
    q = 0
    for v in values:
        if int((np.float64(v) - low) * scale) == b:
            members[q] = v
            q += 1
    within = rank - above  # its rank among bin b's values
    return np.partition(members, len(members) - within)[len(members) - within]


@njit(nogil=True, boundscheck=False, cache=True)
def _keep_largest(values, columns, counts, threshold, ties):
    """Of the gathered entries, those > threshold and the first `ties` equal to it: (values, columns, counts)."""
    kept_values = np.empty(len(values), np.float32)
    kept_columns = np.empty(len(values), np.int64)
    kept_counts = np.zeros(len(counts), np.int64)
    j = 0
    q = 0
    for r in range(len(counts)):
        for _ in range(counts[r]):
            v = values[j]
            take = v > threshold or (v == threshold and ties > 0)
            ties -= v == threshold and take
            if take:
                kept_values[q] = v
                kept_columns[q] = columns[j]
                kept_counts[r] += 1
                q += 1
            j += 1
    return kept_values[:q], kept_columns[:q], kept_counts


def batch_top(pre: torch.Tensor, total: int, threads: int) -> tuple[torch.Tensor, ...] | None:
    """(values, columns, counts [rows]): the `total` largest entries of a contiguous CPU float32 [rows, n], row by
    row (within a row in no particular order); None where a row holds a NaN or the sampled bound lets fewer than
    `total` through.

    A bound a little below the total-th largest value is read off a strided sample of 2^15 entries (the
    stride visits every column; 4 standard deviations of margin), the entries at or above it are gathered
    row by row, and the exact total-th largest among them decides (ties: the first gathered).
    """
    rows, n = pre.shape
    step = max(1, pre.numel() // 2**15)
    while math.gcd(step, n) != 1:
        step += 1
    sample = pre.reshape(-1)[::step].numpy()
    expected = total * len(sample) / pre.numel()  # sampled values among the top `total`
    rank = min(len(sample), math.ceil(expected + 4 * math.sqrt(expected) + 8))
    bound = np.partition(sample, len(sample) - rank)[len(sample) - rank]  # the rank-th largest sampled value
    threads = use_threads(min(threads, rows))
    array = pre.numpy()
    counts = np.empty(rows, np.int64)
    _count_at_least(array, bound, counts)
    reached = int(counts.sum())
    if (counts < 0).any() or reached < total:
        return None
    starts = np.zeros(rows, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    values, columns = np.empty(reached, np.float32), np.empty(reached, np.int64)
    _gather_parallel(array, bound, max(1, min(128, n // 2)), starts, values, columns, threads)
    threshold = _kth_largest(values, total)
    ties = total - int((values > threshold).sum())
    return tuple(torch.from_numpy(a) for a in _keep_largest(values, columns, counts, threshold, ties))
