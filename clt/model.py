"""CrossLayerTranscoder: a sparse, overcomplete map from a source activation to a target one.

    x     = norm_src(x_raw)                                  [batch, d_in]
    pre   = x @ W_enc + b_enc                                [batch, features]
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

The decoder is untied by default, or tied (`W_dec = W_enc^T`, needs d_in == d_out).
Normalisation statistics are buffers of the model, so `encode` takes raw sources and
`decode` returns raw targets. `decode_sparse` decodes from the active features only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from clt.datasets import NORMALIZATIONS, denormalize, normalize
from sae.model import auxk_loss, read_model_files, resolve_k, save_model

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


@dataclass
class TranscoderConfig:
    """Shape, sparsity and options of a transcoder; saved as cfg.json beside model.safetensors."""

    d_in: int
    """Source width."""
    d_out: int
    """Target width."""
    expansion_factor: int = 8
    """Features = expansion_factor * d_in."""
    k: int | None = None
    """Active features per row for topk/batchtopk (default 16 unless k_ratio)."""
    k_ratio: float | None = None
    """Fraction of features active per row, instead of k."""
    activation: str = "topk"
    """topk | batchtopk | jumprelu | relu."""
    tied: bool = False
    """Use W_enc^T as the decoder (needs d_in == d_out)."""
    skip: bool = False
    """Add a linear skip path x @ W_skip (a skip transcoder)."""
    l1_coef: float = 0.0
    """L1 penalty on z * |W_dec row| (the sparsity term of `relu`; optional for the others)."""
    l0_coef: float = 0.0
    """L0 penalty through the straight-through step (jumprelu)."""
    jumprelu_threshold: float = 1e-3
    """Initial threshold of jumprelu features."""
    bandwidth: float = 1e-3
    """Width of the straight-through estimator's rectangle kernel (jumprelu)."""
    aux_k: int | None = None
    """Dead features used by the AuxK loss (topk/batchtopk); default d_out // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 100_000
    """Rows without firing after which a feature counts as dead."""
    normalize_source: str = "none"
    """none | center | standard, from the pair's stored statistics."""
    normalize_target: str = "none"
    """none | center | standard, from the pair's stored statistics."""

    def __post_init__(self):
        if min(self.d_in, self.d_out, self.expansion_factor) < 1:
            raise ValueError("d_in, d_out and expansion_factor must be positive")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        resolve_k(self.k, self.k_ratio, self.n_features)
        if self.tied and self.d_in != self.d_out:
            raise ValueError(f"a tied decoder needs d_in == d_out, got {self.d_in} and {self.d_out}")
        for name in ("normalize_source", "normalize_target"):
            if getattr(self, name) not in NORMALIZATIONS:
                raise ValueError(f"{name} must be one of {NORMALIZATIONS}")
        if min(self.l1_coef, self.l0_coef, self.aux_coef) < 0 or self.bandwidth <= 0:
            raise ValueError("penalty coefficients must be >= 0 and bandwidth > 0")

    @property
    def n_features(self) -> int:
        return self.d_in * self.expansion_factor

    @property
    def active(self) -> int:
        return resolve_k(self.k, self.k_ratio, self.n_features)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dtheta by a rectangle-kernel straight-through estimate."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_theta = -(theta / ctx.bandwidth) * near * grad
        return grad * (pre > theta), grad_theta.sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty; gradient to theta only, by the same estimate."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum(0), None


class TranscoderOutput(NamedTuple):
    y_hat: torch.Tensor  # [batch, d_out] in normalised target space
    z: torch.Tensor  # [batch, features] sparse codes
    pre: torch.Tensor  # [batch, features] pre-activations


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        f = cfg.n_features
        w_dec = torch.randn(f, cfg.d_out)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(torch.randn(cfg.d_in, f) / cfg.d_in**0.5 if not cfg.tied else w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.W_dec = None if cfg.tied else nn.Parameter(w_dec)  # [features, d_out]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out)) if cfg.skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((f,), float(cfg.jumprelu_threshold)).log())
            if cfg.activation == "jumprelu"
            else None
        )
        self.register_buffer("batchtopk_threshold", torch.zeros(()))
        for side, d in (("src", cfg.d_in), ("tgt", cfg.d_out)):
            self.register_buffer(f"{side}_mean", torch.zeros(d))
            self.register_buffer(f"{side}_std", torch.ones(d))

    # normalisation ------------------------------------------------------------------
    def set_statistics(self, src_mean, src_std, tgt_mean, tgt_std) -> None:
        """Store the pair's per-dim statistics and start b_dec at the (normalised) target mean."""
        for name, value in (("src_mean", src_mean), ("src_std", src_std), ("tgt_mean", tgt_mean), ("tgt_std", tgt_std)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))
        self.src_std.clamp_(min=1e-6)
        self.tgt_std.clamp_(min=1e-6)
        with torch.no_grad():
            self.b_dec.copy_(self.tgt_mean if self.cfg.normalize_target == "none" else torch.zeros_like(self.tgt_mean))

    def normalize_source(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.src_mean, self.src_std, self.cfg.normalize_source)

    def normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return normalize(y, self.tgt_mean, self.tgt_std, self.cfg.normalize_target)

    def denormalize_target(self, y: torch.Tensor) -> torch.Tensor:
        return denormalize(y, self.tgt_mean, self.tgt_std, self.cfg.normalize_target)

    # the map ---------------------------------------------------------------------------
    @property
    def decoder(self) -> torch.Tensor:  # [features, d_out]
        return self.W_enc.T if self.cfg.tied else self.W_dec

    def sparsify(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return F.relu(pre)
        if act == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.bandwidth)
        if act == "topk":
            values, indices = torch.topk(pre, self.cfg.active, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
        if self.training:  # batchtopk: k * batch over the whole batch
            flat = F.relu(pre).flatten()
            values, indices = torch.topk(flat, min(self.cfg.active * pre.shape[0], flat.numel()), sorted=False)
            kept = values[values > 0]
            if kept.numel():
                with torch.no_grad():
                    self.batchtopk_threshold.lerp_(kept.min(), 0.01 if self.batchtopk_threshold > 0 else 1.0)
            return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)
        return pre * (pre > self.batchtopk_threshold)

    def forward_normalized(self, x: torch.Tensor) -> TranscoderOutput:
        """The map in normalised spaces: x is a normalised source."""
        pre = x @ self.W_enc + self.b_enc
        z = self.sparsify(pre)
        y = z @ self.decoder + self.b_dec
        if self.W_skip is not None:
            y = y + x @ self.W_skip
        return TranscoderOutput(y, z, pre)

    def encode(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw sources [batch, d_in] -> sparse codes z [batch, features]."""
        x = self.normalize_source(x_raw)
        return self.sparsify(x @ self.W_enc + self.b_enc)

    def decode(self, z: torch.Tensor, x_raw: torch.Tensor | None = None) -> torch.Tensor:
        """Codes -> raw targets; pass the raw sources too when the model has a skip path."""
        y = z @ self.decoder + self.b_dec
        if self.W_skip is not None:
            if x_raw is None:
                raise ValueError("this transcoder has a skip path: decode(z, x_raw) needs the sources")
            y = y + self.normalize_source(x_raw) @ self.W_skip
        return self.denormalize_target(y)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Normalised prediction from the active features only (no skip): sum_j values_j * decoder[indices_j] + b_dec."""
        return F.embedding_bag(indices, self.decoder, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw sources -> (raw target prediction, codes)."""
        out = self.forward_normalized(self.normalize_source(x_raw))
        return self.denormalize_target(out.y_hat), out.z

    # losses -----------------------------------------------------------------------------
    def sparsity_loss(self, out: TranscoderOutput) -> torch.Tensor:
        """L1 on z weighted by decoder row norms, and the jumprelu L0 term, as configured."""
        loss = out.y_hat.new_zeros(())
        if self.cfg.l1_coef:
            loss = loss + self.cfg.l1_coef * (out.z.abs() * self.decoder.norm(dim=1)).sum(-1).mean()
        if self.cfg.l0_coef and self.log_threshold is not None:
            loss = (
                loss
                + self.cfg.l0_coef * _Step.apply(out.pre, self.log_threshold.exp(), self.cfg.bandwidth).sum(-1).mean()
            )
        return loss

    def aux_loss(self, out: TranscoderOutput, y: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK: the top aux_k dead features reconstruct the residual, normalised by y's variance."""
        if self.cfg.activation not in ("topk", "batchtopk"):
            return y.new_zeros(())
        return auxk_loss(out.pre, self.decoder, dead, self.cfg.aux_k or max(1, self.cfg.d_out // 2), y, out.y_hat)

    def save(self, folder: str | Path) -> None:
        save_model(folder, self)


def load_transcoder(folder: str | Path) -> CrossLayerTranscoder:
    """A transcoder from `cfg.json` + `model.safetensors`, in eval mode."""
    cfg, state = read_model_files(folder)
    model = CrossLayerTranscoder(TranscoderConfig(**cfg))
    model.load_state_dict(state)
    return model.eval()
