"""CrossLayerTranscoder: a sparse, overcomplete map from a source activation to a target one.

    x     = norm_src(x_raw)                                  [batch, d_in]
    pre   = x @ W_enc^T + b_enc                              [batch, features]
    z     = sparsify(pre)                                    topk | batchtopk | jumprelu | relu
    y     = z @ W_dec + b_dec (+ x @ W_skip)                 [batch, d_out], normalised target space
    y_raw = norm_tgt^-1(y)

Sparsifiers:
- `topk`: the k largest of ReLU(pre), values unchanged;
- `batchtopk`: the k * batch largest of ReLU(pre) over the whole batch while training; at
  inference a threshold (a running mean of the smallest kept value) replaces the top-k;
- `jumprelu`: pre * H(pre - theta) with a learned theta per feature, trained with a
  straight-through estimator (rectangle kernel of width `bandwidth`);
- `relu`: ReLU(pre), made sparse by an L1 penalty weighted by the decoder row norms.

W_enc and W_dec are both [features, d] (one row per feature). The decoder is untied
by default, or tied (W_dec = W_enc, needs d_in == d_out). Decoder rows start as random unit
rows, which the trainer keeps at unit norm for topk/batchtopk (`unit_norm_decoder`), or, for an
untied topk/batchtopk decoder, at zero with free row norms (`decoder_init` zero). Normalisation statistics
are buffers of the model, so `encode` takes raw sources and `decode` returns raw
targets. `decode_sparse` decodes from the active features only, and `forward_train`
trains topk/batchtopk through them (sae.sparse) with the dense map's gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from clt.config import TranscoderOptions
from clt.jumprelu import jump_relu, step
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
from clt.normalization import denormalize, normalize, raw_decoder, raw_encoder, store_statistics
from sae.model import check_width, load_model, normalize_rows_, remove_parallel_gradient_, resolve_k, save_model
from sae.sparse import (
    SparseCodes,
    auxk_loss,
    select_batchtopk,
    select_topk,
    sparse_decode,
    topk_rows,
    update_threshold_,
)


@dataclass
class TranscoderConfig(TranscoderOptions):
    """Shape, sparsity and options of a pairwise transcoder (clt.config); saved as cfg.json beside
    model.safetensors."""

    d_in: int
    """Source width."""
    d_out: int
    """Target width."""

    def __post_init__(self):
        super().__post_init__()
        check_width(d_in=self.d_in, d_out=self.d_out)
        resolve_k(self.k, self.k_ratio, self.n_features)
        if self.tied and self.d_in != self.d_out:
            raise ValueError(f"a tied decoder needs d_in == d_out, got {self.d_in} and {self.d_out}")
        if self.group_coef and self.group_size is None:
            raise ValueError("group_coef needs group_size (or --group_heads)")
        if self.group_size is not None and self.group_size > self.n_features:
            raise ValueError(f"group_size {self.group_size} is more than the {self.n_features} features")

    @property
    def n_features(self) -> int:
        return self.d_in * self.expansion_factor

    @property
    def active(self) -> int:
        return resolve_k(self.k, self.k_ratio, self.n_features)

    @property
    def n_groups(self) -> int:
        """Feature groups of the group lasso (the last one may be smaller); 0 without groups."""
        return -(-self.n_features // self.group_size) if self.group_size else 0


@dataclass
class TranscoderOutput:
    """What one forward pass produced; the sparse training path keeps only the active entries."""

    y_hat: torch.Tensor  # [batch, d_out] in normalised target space
    z: torch.Tensor | None = None  # [batch, features] codes (dense path)
    pre: torch.Tensor | None = None  # [batch, features] pre-activations (dense path)
    codes: SparseCodes | None = None  # active entries (sparse path)
    energy: torch.Tensor | None = None  # [batch, groups] group_energy's result, kept for the step's other uses

    def fired(self, n_features: int) -> torch.Tensor:
        """[features] bool: which features were non-zero in some row."""
        if self.codes is None:
            return (self.z != 0).any(0)
        nonzero = (self.codes.values != 0).to(self.codes.values.dtype)
        # index_add_, not bincount: no GPU sync to size the output
        return nonzero.new_zeros(n_features).index_add_(0, self.codes.features, nonzero) > 0

    def l0(self) -> float:
        """Mean number of non-zero codes per row."""
        nonzero = (self.z != 0).sum() if self.codes is None else (self.codes.values != 0).sum()
        return nonzero.item() / self.y_hat.shape[0]

    def group_energy(self, group_size: int, n_groups: int) -> torch.Tensor:
        """[batch, groups]: the sum of z^2 over each group's features (differentiable; computed once per output)."""
        if self.energy is not None:
            return self.energy
        rows = self.y_hat.shape[0]
        if self.codes is None:
            groups = torch.arange(self.z.shape[1], device=self.z.device) // group_size
            self.energy = self.z.new_zeros(rows, n_groups).index_add(1, groups, self.z.pow(2))
        else:
            flat = self.codes.rows * n_groups + self.codes.features // group_size
            energy = self.codes.values.new_zeros(rows * n_groups).index_add(0, flat, self.codes.values.pow(2))
            self.energy = energy.view(rows, n_groups)
        return self.energy


SPARSE_DENSITY = 1 / 16
"""relu and jumprelu train through their non-zero entries only while at most this fraction of them is non-zero."""

Penalty = Callable[["CrossLayerTranscoder", TranscoderOutput], torch.Tensor]
"""An extra loss term (e.g. orthogonality or energy) a trainer adds: penalty(model, output) -> scalar."""


@runtime_checkable
class Transcoder(Protocol):
    """What training, evaluation and splicing use of a transcoder: CrossLayerTranscoder (one source, one target)
    and MultiLayerTranscoder (every layer's mlp_in -> that and every later mlp_out) both provide it. Sources and
    targets are [batch, d] for the one, [layer, batch, d] for the other."""

    cfg: TranscoderConfig | MultiLayerConfig
    layer_weights: torch.Tensor | None  # weights of the per-layer FVUs in the loss (None: one target, or all 1)

    @property
    def feature_count(self) -> int: ...  # all features (over every layer)
    @property
    def unit_norm_decoder(self) -> bool: ...  # the trainer keeps decoder rows at unit norm
    def set_statistics(self, src_mean, src_std, tgt_mean, tgt_std) -> None: ...
    def normalize_source(self, x: torch.Tensor) -> torch.Tensor: ...
    def normalize_target(self, y: torch.Tensor) -> torch.Tensor: ...
    def denormalize_target(self, y: torch.Tensor) -> torch.Tensor: ...
    def forward_train(self, x: torch.Tensor, k: int | None = None): ...  # normalised x, k -> y_hat, fired(), l0()
    def aux_loss(self, x: torch.Tensor, y: torch.Tensor, out, dead: torch.Tensor) -> torch.Tensor: ...
    def sparsity_loss(self, out) -> torch.Tensor: ...  # per row
    def dictionary_loss(self) -> torch.Tensor: ...
    def remove_parallel_gradient(self) -> None: ...
    def normalize_decoder(self) -> None: ...
    def row_norms(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # [features] encoder and decoder row norms
    def encode(self, x_raw: torch.Tensor) -> torch.Tensor: ...
    def forward(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # raw y_hat, codes
    def save(self, folder: str | Path) -> None: ...


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        f = cfg.n_features
        w_dec = torch.randn(f, cfg.d_out)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w_dec.clone() if cfg.tied else torch.randn(f, cfg.d_in) / cfg.d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(f))
        if cfg.decoder_init == "zero":
            w_dec = torch.zeros_like(w_dec)
        self.W_dec = None if cfg.tied else nn.Parameter(w_dec)  # [features, d_out]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out)) if cfg.skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((f,), float(cfg.jumprelu_threshold)).log())
            if cfg.activation == "jumprelu"
            else None
        )
        self.register_buffer("batchtopk_threshold", torch.zeros(()))
        self._workspace: torch.Tensor | None = None  # forward_train's pre-activations, kept between steps
        for side, d, mode in (("src", cfg.d_in, cfg.normalize_source), ("tgt", cfg.d_out, cfg.normalize_target)):
            self.register_buffer(f"{side}_mean", torch.zeros(d))
            self.register_buffer(f"{side}_std", torch.ones(d))
            if mode == "whiten":  # [d, d] C^-1/2 and C^1/2 of the side's covariance
                self.register_buffer(f"{side}_whitener", torch.eye(d))
                self.register_buffer(f"{side}_unwhitener", torch.eye(d))

    # normalisation ------------------------------------------------------------------
    def set_statistics(self, src_mean, src_std, tgt_mean, tgt_std, src_cov=None, tgt_cov=None) -> None:
        """Store the pair's per-dim statistics (and covariances, for whitening) and start b_dec at the
        (normalised) target mean."""
        store_statistics(self, src_mean, src_std, tgt_mean, tgt_std, src_cov, tgt_cov)

    @torch.no_grad()
    def init_encoder_from(self, x_raw: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Point each encoder row at a (normalised) source row drawn from `x_raw`, so every feature
        starts out firing on the data: far fewer dead features, at some cost in FVU (docs/guide/transcoders.md)."""
        if self.cfg.tied:
            raise ValueError("a tied transcoder's encoder is its decoder: init from data is for untied ones")
        x = self.normalize_source(x_raw)
        rows = x[torch.randint(len(x), (self.cfg.n_features,), generator=generator)]
        self.W_enc.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def normalize_source(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.src_mean, self.src_std, self.cfg.normalize_source, getattr(self, "src_whitener", None))

    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return normalize(y, self.tgt_mean, self.tgt_std, self.cfg.normalize_target, getattr(self, "tgt_whitener", None))

    def denormalize_target(self, y: torch.Tensor) -> torch.Tensor:
        unwhitener = getattr(self, "tgt_unwhitener", None)
        return denormalize(y, self.tgt_mean, self.tgt_std, self.cfg.normalize_target, unwhitener)

    # the map ---------------------------------------------------------------------------
    @property
    def decoder(self) -> torch.Tensor:  # [features, d_out]
        return self.W_enc if self.cfg.tied else self.W_dec

    def raw_encoder(self) -> torch.Tensor:  # [features, d_in], reads raw sources
        return raw_encoder(self.W_enc, self.src_std, self.cfg.normalize_source, getattr(self, "src_whitener", None))

    def raw_decoder(self) -> torch.Tensor:  # [features, d_out], writes raw targets
        return raw_decoder(self.decoder, self.tgt_std, self.cfg.normalize_target, getattr(self, "tgt_unwhitener", None))

    def row_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[features] norms of each feature's encoder row and decoder row."""
        return self.W_enc.detach().norm(dim=1), self.decoder.detach().norm(dim=1)

    @property
    def feature_count(self) -> int:
        return self.cfg.n_features

    layer_weights = None  # one target layer

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether decoder rows are held at unit norm (topk/batchtopk, untied, random decoder_init: the scale lives
        in z)."""
        return self.cfg.activation in ("topk", "batchtopk") and not self.cfg.tied and self.cfg.decoder_init == "random"

    @property
    def sparse_training(self) -> bool:
        """Whether `forward_train` takes the sparse path (topk/batchtopk without an L1 or group term on z)."""
        return self.cfg.activation in ("topk", "batchtopk") and self.cfg.l1_coef == 0 and self.cfg.group_coef == 0

    def normalize_decoder(self) -> None:
        """Decoder rows back to unit norm (after an optimizer step)."""
        normalize_rows_(self.W_dec)

    def remove_parallel_gradient(self) -> None:
        """Project out the part of W_dec's gradient that would change its row norms."""
        remove_parallel_gradient_(self.W_dec)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:  # [batch, features]
        return torch.addmm(self.b_enc, x, self.W_enc.T)

    def sparsify(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Dense codes from pre-activations; topk and batchtopk keep k per row (default the configured k)."""
        act, k = self.cfg.activation, k or self.cfg.active
        if act == "relu":
            return F.relu(pre)
        if act == "jumprelu":
            return jump_relu(pre, self.log_threshold.exp(), self.cfg.bandwidth)
        if act == "topk":
            values, indices = topk_rows(pre, k)
            return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
        if self.training:  # batchtopk: k * batch over the whole batch
            codes = select_batchtopk(pre, k)
            update_threshold_(self.batchtopk_threshold, codes.values.detach())
            return codes.dense(self.cfg.n_features)
        return pre * (pre > self.batchtopk_threshold)

    def add_skip(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y plus the skip path's x @ W_skip, if the transcoder has one (normalised spaces)."""
        return y if self.W_skip is None else y + x @ self.W_skip

    def forward_normalized(self, x: torch.Tensor, k: int | None = None) -> TranscoderOutput:
        """The map in normalised spaces: x is a normalised source (k: as in `sparsify`)."""
        return self._dense_from(x, self.pre_activations(x), k)

    def _dense_from(self, x: torch.Tensor, pre: torch.Tensor, k: int | None = None) -> TranscoderOutput:
        z = self.sparsify(pre, k)
        y = self.add_skip(z @ self.decoder + self.b_dec, x)
        return TranscoderOutput(y, z=z, pre=pre)

    def forward_train(self, x: torch.Tensor, chunk: int | None = None, k: int | None = None) -> TranscoderOutput:
        """`forward_normalized` with the same gradients; topk/batchtopk decode from the active entries only, k per
        row (default the configured k; a training schedule passes its own).

        On the sparse path the pre-activations are never kept: topk computes them `chunk` rows
        at a time (default: as many rows as fit 64 MB) into one buffer, reused from step to step. relu and jumprelu take
        `_forward_thresholded` while their codes are sparse.
        """
        if self.cfg.activation in ("relu", "jumprelu"):
            return self._forward_thresholded(x)
        if not self.sparse_training:
            return self.forward_normalized(x, k)
        k = k or self.cfg.active
        with torch.no_grad():
            if self.cfg.activation == "topk":
                chunk = chunk or max(1, 2**24 // self.cfg.n_features)
                pre = self._pre_workspace(min(chunk, x.shape[0]), x)
                parts = []
                for rows in x.split(chunk):
                    torch.addmm(self.b_enc, rows, self.W_enc.T, out=pre[: len(rows)])
                    parts.append(select_topk(pre[: len(rows)], k))
                codes = SparseCodes(
                    torch.cat([p.values for p in parts]),
                    torch.cat([p.features for p in parts]),
                    torch.arange(0, x.shape[0] * k + 1, k, device=x.device),
                )
            else:
                codes = select_batchtopk(self.pre_activations(x), k)
                update_threshold_(self.batchtopk_threshold, codes.values)
        y = self.add_skip(sparse_decode(x, self.W_enc, self.b_enc, self.decoder, codes) + self.b_dec, x)
        return TranscoderOutput(y, codes=codes)

    def _pre_workspace(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A [rows, features] buffer reused by every chunk and every step: fresh memory of this size would
        be new pages, and faulting them in costs about a tenth of the encoder GEMM."""
        w = self._workspace
        if w is None or w.shape[0] < rows or w.device != like.device or w.dtype != like.dtype:
            w = self._workspace = like.new_empty(rows, self.cfg.n_features)
        return w[:rows]

    def _forward_thresholded(self, x: torch.Tensor) -> TranscoderOutput:
        """relu / jumprelu through the entries whose gradient is not zero: pre above 0 (relu) or above
        theta - bandwidth / 2 (jumprelu: the active ones and those in the threshold's straight-through window).
        Their pre-activations are recomputed differentiably from gathered rows, decoded by embedding_bag and
        differentiated by autograd: the dense map's gradients (tests). Dense while more than SPARSE_DENSITY of
        the entries qualify (early in training)."""
        pre = self.pre_activations(x)  # [batch, features]
        theta = self.log_threshold.exp() if self.log_threshold is not None else None
        with torch.no_grad():
            mask = pre > (0.0 if theta is None else theta - self.cfg.bandwidth / 2)
        if mask.sum().item() > SPARSE_DENSITY * mask.numel():
            return self._dense_from(x, pre)
        pre = pre.detach()  # the sparse path differentiates through the gathered entries below only
        with torch.no_grad():
            rows, features = mask.nonzero(as_tuple=True)  # row-major: grouped by row
            offsets = F.pad(torch.bincount(rows, minlength=x.shape[0]).cumsum(0), (1, 0))
        pre_s = (x[rows] * self.W_enc[features]).sum(-1) + self.b_enc[features]  # [entries]
        values = F.relu(pre_s) if theta is None else jump_relu(pre_s, theta[features], self.cfg.bandwidth)
        y = F.embedding_bag(features, self.decoder, offsets[:-1], mode="sum", per_sample_weights=values) + self.b_dec
        y = self.add_skip(y, x)
        return TranscoderOutput(y, pre=pre, codes=SparseCodes(values, features, offsets))

    def encode(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw sources [batch, d_in] -> sparse codes z [batch, features]."""
        x = self.normalize_source(x_raw)
        return self.sparsify(self.pre_activations(x))

    def decode(self, z: torch.Tensor, x_raw: torch.Tensor | None = None) -> torch.Tensor:
        """Codes -> raw targets; pass the raw sources too when the model has a skip path."""
        y = z @ self.decoder + self.b_dec
        if self.W_skip is not None:
            if x_raw is None:
                raise ValueError("this transcoder has a skip path: decode(z, x_raw) needs the sources")
            y = y + self.normalize_source(x_raw) @ self.W_skip
        return self.denormalize_target(y)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Normalised prediction from the active features only (no skip path).

        values, indices [batch, k] -> sum_j values_j * decoder[indices_j] + b_dec [batch, d_out].
        """
        return F.embedding_bag(indices, self.decoder, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw sources -> (raw target prediction, codes)."""
        out = self.forward_normalized(self.normalize_source(x_raw))
        return self.denormalize_target(out.y_hat), out.z

    def forward_active(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` of a topk transcoder without the dense codes: raw sources -> (raw target prediction,
        values [batch, k], features [batch, k]), the ReLU'd values of each row's selected features, decoded
        from those features only."""
        if self.cfg.activation != "topk":
            raise ValueError(f"forward_active is for topk transcoders, this one is {self.cfg.activation}")
        x = self.normalize_source(x_raw)
        values, features = topk_rows(self.pre_activations(x), self.cfg.active)
        values = F.relu(values)
        return self.denormalize_target(self.add_skip(self.decode_sparse(values, features), x)), values, features

    # losses -----------------------------------------------------------------------------
    def dictionary_loss(self) -> torch.Tensor:
        """The penalty on the decoder rows (sum of |w| or w^2), as configured; it does not depend on the data."""
        if not self.cfg.dictionary_coef or self.cfg.dictionary_penalty == "none":
            return self.b_dec.new_zeros(())
        rows = self.decoder.abs() if self.cfg.dictionary_penalty == "l1" else self.decoder.pow(2)
        return self.cfg.dictionary_coef * rows.sum()

    def sparsity_loss(self, out: TranscoderOutput) -> torch.Tensor:
        """Mean over rows of the L1 term on z (weighted by decoder row norms) and the jumprelu L0 term."""
        loss = out.y_hat.new_zeros(())
        if self.cfg.l1_coef and out.z is not None:
            loss = loss + self.cfg.l1_coef * (out.z.abs() * self.decoder.norm(dim=1)).sum(-1).mean()
        elif self.cfg.l1_coef and out.codes is not None:
            weighted = out.codes.values.abs() * self.decoder.norm(dim=1)[out.codes.features]
            loss = loss + self.cfg.l1_coef * weighted.sum() / out.y_hat.shape[0]
        if self.cfg.l0_coef and self.log_threshold is not None and out.pre is not None:
            loss = loss + self.cfg.l0_coef * step(out.pre, self.log_threshold.exp(), self.cfg.bandwidth).sum(-1).mean()
        if self.cfg.group_coef:  # group lasso: sum_g ||z_g||_2 (the square root's gradient taken where z_g != 0)
            energy = out.group_energy(self.cfg.group_size, self.cfg.n_groups)
            on = energy > 0
            norms = torch.where(on, energy, torch.ones_like(energy)).sqrt() * on
            loss = loss + self.cfg.group_coef * norms.sum(-1).mean()
        return loss

    def aux_loss(self, x: torch.Tensor, y: torch.Tensor, out: TranscoderOutput, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (sae.sparse.auxk_loss) in the normalised spaces, estimated on the first `aux_rows` rows of the
        (shuffled) batch: the gradients of the dense AuxK on those rows, at a fraction of a step's cost."""
        if self.cfg.activation not in ("topk", "batchtopk"):
            return y.new_zeros(())
        rows, aux_k = self.cfg.aux_rows, self.cfg.aux_k or self.cfg.d_out // 2
        return auxk_loss(x[:rows], self.W_enc, self.b_enc, self.decoder, dead, aux_k, y[:rows], out.y_hat[:rows])

    def save(self, folder: str | Path) -> None:
        save_model(folder, self)


def load_transcoder(folder: str | Path) -> CrossLayerTranscoder | MultiLayerTranscoder:
    """A pairwise or multi-layer transcoder from `cfg.json` + `model.safetensors`, in eval mode."""

    def config(raw: dict) -> TranscoderConfig | MultiLayerConfig:
        if "n_layers" in raw:
            return MultiLayerConfig(**raw)
        return TranscoderConfig(**{"decoder_init": "random", **raw})  # saved before decoder_init: random unit rows

    def model(cfg):
        return MultiLayerTranscoder(cfg) if isinstance(cfg, MultiLayerConfig) else CrossLayerTranscoder(cfg)

    return load_model(folder, config, model)


if __name__ == "__main__":  # python -m clt.model: a transcoder's summary, as python -m clt.describe model
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "clt.describe", "model", *sys.argv[1:]])  # imports this module once
