"""Sparse codes and the training kernel for dictionaries with a few active features per row.

A TopK or BatchTopK transcoder (or a TopK SAE) keeps k of its (say) 1024 features per row, so
everything after the encoder GEMM can skip the features that did not fire:

    forward    y[r]       = sum_j  v_j * W_dec[f_j]             embedding_bag over the active entries
    backward   g_j        = (dy[r] . W_dec[f_j]) * [v_j > 0]     sampled dense-dense product (SDDMM)
               dW_dec[f]  = sum_{j: f_j = f} v_j * dy[r_j]      CSR (features x rows) @ dy
               dW_enc[f]  = sum_{j: f_j = f} g_j * x[r_j]       CSR (features x rows) @ x
               db_enc[f]  = sum_{j: f_j = f} g_j

where entry j sits in row r_j and v_j = ReLU(x[r_j] . W_enc[f_j] + b_enc[f_j]); W_enc and
W_dec are [features, d].
Only the encoder GEMM and the selection of the active entries touch every feature;
a dense implementation also pays a dense decoder GEMM forward and three dense GEMMs
backward. The gradients are those of the dense map (tests compare them).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch.nn import functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseCodes(NamedTuple):
    """The active entries of a [batch, features] code matrix, row by row (CSR)."""

    values: torch.Tensor  # [nnz] ReLU'd pre-activations (zeros possible)
    features: torch.Tensor  # [nnz] feature ids
    offsets: torch.Tensor  # [batch + 1] entries of row r are offsets[r]:offsets[r + 1]

    @property
    def rows(self) -> torch.Tensor:  # [nnz] row of each entry
        counts = self.offsets.diff()
        rows = torch.arange(len(counts), device=counts.device)
        return torch.repeat_interleave(rows, counts, output_size=len(self.values))  # the size given: no GPU sync

    def dense(self, n_features: int) -> torch.Tensor:
        """The [batch, features] matrix."""
        z = self.values.new_zeros(len(self.offsets) - 1, n_features)
        z[self.rows, self.features] = self.values
        return z


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [batch, k]: each row's k largest entries, in no particular order (torch.topk's selection).

    For CPU float32 rows the compiled kernel of sae.topk_kernel selects (at 4096 x 1024, k=16, 2 threads, 4.2-4.5x
    faster than torch.topk on the rows' bits read as int32, 4.3-5.7x than on the floats); where entries tie at the
    k-th value, which of them is kept may differ from torch.topk. Where `pre` needs a gradient the values are
    gathered from it, so they carry that gradient. Elsewhere (CUDA, other dtypes, rows too short for the kernel),
    and for the rows the kernel leaves (NaN, many ties), torch.topk.
    """
    lanes = _kernel_lanes(pre.shape[-1], k)
    if pre.device.type != "cpu" or pre.dtype != torch.float32 or pre.dim() != 2 or lanes is None:
        return torch.topk(pre, k, dim=-1, sorted=False)
    from sae import topk_kernel  # numba: imported (and compiled, or read from its cache) on first use

    values, indices, redo = topk_kernel.topk(pre.detach().contiguous(), k, lanes, torch.get_num_threads())
    if redo.any():
        values[redo], indices[redo] = torch.topk(pre.detach()[redo], k, dim=-1, sorted=False)
    return (pre.gather(-1, indices) if pre.requires_grad else values), indices


def _kernel_lanes(n: int, k: int) -> int | None:
    """sae.topk_kernel's lane count for rows of n, k kept: the first of 8k and 4k (rounded up to 16) of which a
    row holds two blocks, else the most (a multiple of 16) that two blocks fill, if at least 2k; None where none
    fits: there torch.topk selects. More lanes mean fewer values per lane to gather from: 8k lanes took 0.75-0.85
    of 4k's time at n = 1024-4096, k = 8-64; half-row lanes (AuxK's few hundred dead features, k = 64) 0.3-0.5
    of torch.topk's."""
    if k < 1:
        return None
    for lanes in (-(-8 * k // 16) * 16, -(-4 * k // 16) * 16, n // 32 * 16):
        if 2 * lanes <= n and lanes >= 2 * k:
            return lanes
    return None


def select_topk(pre: torch.Tensor, k: int) -> SparseCodes:
    """The k largest of ReLU(pre) in every row, values unchanged."""
    values, features = topk_rows(pre, k)  # [batch, k]
    offsets = torch.arange(0, pre.shape[0] * k + 1, k, device=pre.device)
    return SparseCodes(F.relu(values).flatten(), features.flatten(), offsets)


def select_batchtopk(pre: torch.Tensor, k: int) -> SparseCodes:
    """The k * batch largest of ReLU(pre) over the whole batch (rows keep different counts), values unchanged.

    On CPU float32 (`_batchtopk_from_bound`) a bound a little below the (k * batch)-th largest value is read
    off a sample of the entries, the entries at or above it are gathered row by row, and the exact
    (k * batch)-th largest among them decides, far faster than one torch.topk over the flattened batch
    (bench.train measures both). Where the sample misjudges (fewer than k * batch reach the bound) or a
    row holds a NaN, and on other devices and dtypes, that torch.topk.
    """
    batch, n_features = pre.shape
    total = min(k * batch, pre.numel())
    if pre.device.type == "cpu" and pre.dtype == torch.float32 and total < pre.numel():
        codes = _batchtopk_from_bound(pre, total)
        if codes is not None:
            return codes
    values, flat = torch.topk(pre.flatten(), total, sorted=False)
    flat, order = flat.sort()  # row-major: entries grouped by row
    return _row_codes(values[order], flat % n_features, flat // n_features, batch)


def _batchtopk_from_bound(pre: torch.Tensor, total: int) -> SparseCodes | None:
    """select_batchtopk on CPU float32 through sae.topk_kernel.batch_top; None where it cannot decide."""
    from sae import topk_kernel  # numba: imported (and compiled, or read from its cache) on first use

    found = topk_kernel.batch_top(pre.detach().contiguous(), total, torch.get_num_threads())
    if found is None:
        return None
    values, columns, counts = found
    offsets = F.pad(counts.cumsum(0), (1, 0))
    if pre.requires_grad:  # gathered from pre: they carry its gradient
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        values = pre.reshape(-1).index_select(0, rows * pre.shape[1] + columns)
    return SparseCodes(F.relu(values), columns, offsets)


def _row_codes(values: torch.Tensor, features: torch.Tensor, rows: torch.Tensor, batch: int) -> SparseCodes:
    """Codes from entries already grouped by row (ReLU applied to the values)."""
    offsets = F.pad(torch.bincount(rows, minlength=batch).cumsum(0), (1, 0))
    return SparseCodes(F.relu(values), features, offsets)


@torch.no_grad()
def update_threshold_(threshold: torch.Tensor, kept: torch.Tensor) -> None:
    """batchtopk's inference threshold: a running mean (rate 0.01) of the smallest positive value it kept."""
    kept = kept[kept > 0]
    if kept.numel():
        threshold.lerp_(kept.min(), 0.01 if threshold > 0 else 1.0)


def _index_dtype(size: int) -> torch.dtype:
    """The narrowest index type for values below `size` (int32 indices make CPU sparse products faster)."""
    return torch.int32 if size < 2**31 else torch.int64


def _transpose(codes: SparseCodes, n_features: int, *values: torch.Tensor) -> list[torch.Tensor]:
    """CSR matrices [features, batch] holding `values` (per entry) at the codes' positions."""
    batch = len(codes.offsets) - 1
    keys = codes.features.to(torch.int16 if n_features < 2**15 else torch.int32)  # narrow keys sort faster
    order = torch.argsort(keys, stable=True)
    index = _index_dtype(max(batch, len(codes.values)) + 1)
    crow = F.pad(torch.bincount(codes.features, minlength=n_features).cumsum(0), (1, 0)).to(index)
    cols = codes.rows.to(index)[order]
    return [torch.sparse_csr_tensor(crow, cols, v[order], (n_features, batch), check_invariants=False) for v in values]


class _SparseDecode(torch.autograd.Function):
    """y = codes @ W_dec, with gradients to x, W_enc, b_enc through the active entries only."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, values, features, offsets):
        ctx.save_for_backward(x, w_enc, w_dec, values, features, offsets)
        return F.embedding_bag(features, w_dec, offsets[:-1], mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, dy):
        x, w_enc, w_dec, values, features, offsets = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, dy, w_enc, w_dec)):
            from sae import decode_kernel  # numba: imported (and compiled, or read from its cache) on first use

            grads = decode_kernel.backward(x, dy, w_enc, w_dec, values, features, offsets, needs[0])
        elif x.device.type == "cpu":
            grads = sparse_products_backward(x, dy, w_enc, w_dec, values, features, offsets, needs[:4])
        else:
            grads = dense_products_backward(x, dy, w_enc, w_dec, values, features, offsets, needs[:4])
        return *grads, None, None, None


def sparse_products_backward(x, dy, w_enc, w_dec, values, features, offsets, needs: tuple[bool, ...]):
    """(dx, dW_enc, db_enc, dW_dec) of the sparse decode by torch's sparse products (any device, dtype; used on the
    CPU for dtypes the compiled kernel does not take): a sampled dense-dense product for g, CSR (features x rows)
    products for the weights; None where `needs` (whether x, w_enc, b_enc, w_dec need a gradient) says no."""
    codes = SparseCodes(values, features, offsets)
    n_features = w_dec.shape[0]
    index = _index_dtype(max(n_features, len(values)) + 1)
    pattern = torch.sparse_csr_tensor(offsets.to(index), features.to(index), values,
                                      (len(offsets) - 1, n_features), check_invariants=False)  # fmt: skip
    g = torch.sparse.sampled_addmm(pattern, dy.contiguous(), w_dec.T, beta=0.0).values()
    g = g * (values > 0)  # ReLU
    z_t, g_t = _transpose(codes, n_features, values, g)  # [features, batch]
    grad_b_enc = torch.zeros(n_features, dtype=g.dtype, device=g.device).index_add_(0, features, g)
    grad_x = None
    if needs[0]:
        g_rows = torch.sparse_csr_tensor(pattern.crow_indices(), pattern.col_indices(), g, pattern.shape,
                                         check_invariants=False)  # fmt: skip
        grad_x = g_rows @ w_enc
    return grad_x, g_t @ x if needs[1] else None, grad_b_enc, z_t @ dy if needs[3] else None


def dense_products_backward(x, dy, w_enc, w_dec, values, features, offsets, needs: tuple[bool, ...]):
    """sparse_products_backward's gradients by dense GEMMs: g gathered entry by entry, then g and the codes scattered
    into [batch, features] matrices. On a GPU these GEMMs cost less than cuSPARSE's sparse products and the sort
    that transposes the codes (bench.train --device cuda), so every device but the CPU takes this path."""
    rows = SparseCodes(values, features, offsets).rows
    g = (dy[rows] * w_dec[features]).sum(-1) * (values > 0)  # [nnz] dL/dpre at the active entries (ReLU)
    shape = (len(offsets) - 1, w_dec.shape[0])  # [batch, features]
    g_dense = g.new_zeros(shape).index_put_((rows, features), g)
    grad_x = g_dense @ w_enc if needs[0] else None
    grad_w_enc = g_dense.T @ x if needs[1] else None
    grad_w_dec = values.new_zeros(shape).index_put_((rows, features), values).T @ dy if needs[3] else None
    return grad_x, grad_w_enc, g_dense.sum(0), grad_w_dec


def sparse_decode(
    x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, codes: SparseCodes
) -> torch.Tensor:
    """codes @ w_dec [batch, d_out], differentiable as if codes = ReLU(x @ w_enc^T + b_enc) at the active entries."""
    return _SparseDecode.apply(x, w_enc, b_enc, w_dec, codes.values, codes.features, codes.offsets)


def auxk_loss(
    x: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
    y: torch.Tensor,
    y_hat: torch.Tensor,
) -> torch.Tensor:
    """AuxK (Gao et al., 2024): the top `aux_k` dead features reconstruct the residual y - y_hat, over y's variance.

    x [rows, d_in] is what the encoder reads (pre = x @ w_enc^T + b_enc), w_enc and w_dec [features, d] the
    dictionary, dead [features] bool, y and y_hat [rows, d_out]. Only the dead features' pre-activations are
    computed and the reconstruction is decoded sparsely: the gradients are those of the dense AuxK. The one
    AuxK of every dictionary (TopK SAE, transcoder, each source layer of a multi-layer CLT).
    """
    ids = dead.nonzero().squeeze(1)
    if not len(ids):
        return y.new_zeros(())
    with torch.no_grad():
        pre = torch.addmm(b_enc[ids], x, w_enc[ids].T)  # [rows, dead]
        codes = select_topk(pre, min(aux_k, len(ids)))
    codes = codes._replace(features=ids[codes.features])  # back to feature ids: no gathered weight copies
    residual_hat = sparse_decode(x, w_enc, b_enc, w_dec, codes)
    variance = (y - y.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (residual_hat - (y - y_hat).detach()).pow(2).sum(-1).mean() / variance
