"""The backward of sae.sparse's sparse decode as one compiled pass (numba), for CPU float32.

With entry j of the codes at row r_j and feature f_j, value v_j = ReLU(pre[r_j, f_j]) and dy the
gradient of y = codes @ W_dec:

    g_j          = (dy[r_j] . W_dec[f_j]) * [v_j > 0]
    dW_dec[f]    = sum_{j: f_j = f} v_j * dy[r_j]
    dW_enc[f]    = sum_{j: f_j = f} g_j * x[r_j]
    db_enc[f]    = sum_{j: f_j = f} g_j
    dx[r]        = sum_{j: r_j = r} g_j * W_enc[f_j]           (only where x needs a gradient)

The entries are grouped by feature with a counting sort; each thread then owns a range of features
(about equal entry counts) and walks their entries once, reading W_dec[f] from cache and dy[r], x[r]
row by row: the three per-feature sums and g come from one pass, and no two threads write the
same row. sae.sparse uses it for CPU float32 tensors, torch's sparse products for other CPU dtypes (float64)
and dense GEMMs on GPUs; the results agree to float32 rounding (tests).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from sae.topk_kernel import thread_rows, use_threads


@njit(nogil=True, parallel=True, boundscheck=False, cache=True)
def _group_by_feature(features, offsets, n_features, threads):
    """(starts [features + 1], entries, rows): entries[starts[f]:starts[f + 1]] are feature f's, in row order.

    A counting sort on `threads` threads, each counting and then placing the entries of its own range of rows."""
    batch = len(offsets) - 1
    counts = np.zeros((threads, n_features), np.int64)  # counts[t, f]: feature f's entries in thread t's rows
    for t in prange(threads):
        start, stop = thread_rows(t, batch, threads)
        for j in range(offsets[start], offsets[stop]):
            counts[t, features[j]] += 1
    starts = np.empty(n_features + 1, np.int64)
    fill = np.empty((threads, n_features), np.int64)  # where thread t places its next entry of feature f
    total = 0
    for f in range(n_features):
        starts[f] = total
        for t in range(threads):
            fill[t, f] = total
            total += counts[t, f]
    starts[n_features] = total
    entries = np.empty(len(features), np.int64)
    rows = np.empty(len(features), np.int64)
    for t in prange(threads):
        start, stop = thread_rows(t, batch, threads)
        for r in range(start, stop):
            for j in range(offsets[r], offsets[r + 1]):
                q = fill[t, features[j]]
                entries[q] = j
                rows[q] = r
                fill[t, features[j]] = q + 1
    return starts, entries, rows


@njit(nogil=True, parallel=True, boundscheck=False, fastmath=True, cache=True)
def _feature_pass(x, dy, w_dec, values, starts, entries, rows, bounds, g, grad_w_enc, grad_w_dec, grad_b_enc):
    """g and the per-feature gradients; thread t owns features bounds[t]:bounds[t + 1].

    A feature's entries are taken four at a time: one read and write of its two gradient rows serves four entries
    (one at a time, those row updates outnumber the reads of dy and x)."""
    d_in, d_out = x.shape[1], dy.shape[1]
    zero = np.float32(0.0)
    for t in prange(len(bounds) - 1):
        for f in range(bounds[t], bounds[t + 1]):
            acc_enc = grad_w_enc[f]
            acc_dec = grad_w_dec[f]
            acc_enc[:] = 0.0
            acc_dec[:] = 0.0
            w = w_dec[f]
            bias = zero
            q, stop = starts[f], starts[f + 1]
            while q + 4 <= stop:
                j0, j1, j2, j3 = entries[q], entries[q + 1], entries[q + 2], entries[q + 3]
                d0, d1, d2, d3 = dy[rows[q]], dy[rows[q + 1]], dy[rows[q + 2]], dy[rows[q + 3]]
                s0 = s1 = s2 = s3 = zero
                for c in range(d_out):
                    s0 += d0[c] * w[c]
                    s1 += d1[c] * w[c]
                    s2 += d2[c] * w[c]
                    s3 += d3[c] * w[c]
                v0, v1, v2, v3 = values[j0], values[j1], values[j2], values[j3]
                g0 = s0 if v0 > 0 else zero
                g1 = s1 if v1 > 0 else zero
                g2 = s2 if v2 > 0 else zero
                g3 = s3 if v3 > 0 else zero
                g[j0], g[j1], g[j2], g[j3] = g0, g1, g2, g3
                bias += (g0 + g1) + (g2 + g3)
                for c in range(d_out):
                    acc_dec[c] += (v0 * d0[c] + v1 * d1[c]) + (v2 * d2[c] + v3 * d3[c])
                x0, x1, x2, x3 = x[rows[q]], x[rows[q + 1]], x[rows[q + 2]], x[rows[q + 3]]
                for c in range(d_in):
                    acc_enc[c] += (g0 * x0[c] + g1 * x1[c]) + (g2 * x2[c] + g3 * x3[c])
                q += 4
            for e in range(q, stop):  # the last one to three
                j = entries[e]
                v = values[j]
                d = dy[rows[e]]
                dot = zero
                for c in range(d_out):
                    dot += d[c] * w[c]
                gj = dot if v > 0 else zero
                g[j] = gj
                bias += gj
                for c in range(d_out):
                    acc_dec[c] += v * d[c]
                xr = x[rows[e]]
                for c in range(d_in):
                    acc_enc[c] += gj * xr[c]
            grad_b_enc[f] = bias


@njit(nogil=True, parallel=True, boundscheck=False, fastmath=True, cache=True)
def _row_pass(w_enc, g, features, offsets, grad_x):
    """dx[r] = sum over row r's entries of g_j * W_enc[f_j]."""
    for r in prange(len(offsets) - 1):
        acc = grad_x[r]
        acc[:] = 0.0
        for j in range(offsets[r], offsets[r + 1]):
            w = w_enc[features[j]]
            gj = g[j]
            for c in range(len(acc)):
                acc[c] += gj * w[c]


def backward(
    x: torch.Tensor,
    dy: torch.Tensor,
    w_enc: torch.Tensor,
    w_dec: torch.Tensor,
    values: torch.Tensor,
    features: torch.Tensor,
    offsets: torch.Tensor,
    need_x: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx or None, dW_enc, db_enc, dW_dec) for y = codes @ w_dec, codes = ReLU(x @ w_enc^T + b) at the entries."""
    x, dy, w_enc, w_dec, values = (t.detach().contiguous() for t in (x, dy, w_enc, w_dec, values))
    features, offsets = features.contiguous().numpy(), offsets.contiguous().numpy()
    n_features = w_dec.shape[0]
    threads = use_threads(torch.get_num_threads())
    starts, entries, rows = _group_by_feature(features, offsets, n_features, threads)
    bounds = np.searchsorted(starts, np.linspace(0, len(entries), threads + 1)).astype(np.int64)
    bounds[0], bounds[-1] = 0, n_features
    g = torch.empty_like(values)
    grad_w_enc, grad_w_dec = torch.empty(n_features, x.shape[1]), torch.empty(n_features, dy.shape[1])
    grad_b_enc = torch.empty(n_features)
    _feature_pass(x.numpy(), dy.numpy(), w_dec.numpy(), values.numpy(), starts, entries, rows, bounds, g.numpy(),
                  grad_w_enc.numpy(), grad_w_dec.numpy(), grad_b_enc.numpy())  # fmt: skip
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x)
        _row_pass(w_enc.numpy(), g.numpy(), features, offsets, grad_x.numpy())
    return grad_x, grad_w_enc, grad_b_enc, grad_w_dec
