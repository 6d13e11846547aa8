"""How a transcoder scales its two sides: `none`, `center`, `scale`, `standard` or `whiten` from the pair's stored
statistics.

    normalize(x)   = (x - mean) @ W      whiten     W = C^-1/2 (ZCA) of the stored covariance C, its eigenvalues
                                                    floored at whiten_floor x the largest (rank-deficient data)
                   = (x - mean) / std    standard   std per dim
                   = (x - mean) / s      scale      one s for every dim: the root mean square of the dims' stds
                   =  x - mean           center
                   =  x                  none
    denormalize(y) = the inverse         (whiten: y @ W^-1 + mean)

`scale` leaves the shape of the data (and so the FVU a loss measures there) as it is and only brings it to
unit size, so a learning rate means the same on any pair; it is the targets' default. With `scale` the std
buffers hold s in every dim, so everything downstream treats it as `standard`.

The statistics live in the model as buffers, so a transcoder takes raw sources and returns raw
targets. `raw_encoder` / `raw_decoder` undo the scaling of its weights: weights in raw activation
units, for virtual weights and attribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMALIZATIONS = ("none", "center", "scale", "standard", "whiten")
SCALED = ("scale", "standard")


def whitening(covariance, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, W^-1) [d, d], float32: the symmetric (ZCA) whitener C^-1/2 of a covariance and its inverse C^1/2, with
    eigenvalues below `floor` x the largest raised to it (so null directions are scaled up at most 1/sqrt(floor))."""
    values, vectors = torch.linalg.eigh(torch.as_tensor(covariance, dtype=torch.float64))
    values = values.clamp_min(floor * values.max().clamp_min(1e-12))
    w = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    w_inv = vectors @ torch.diag(values.sqrt()) @ vectors.T
    return w.float(), w_inv.float()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mode: str, whitener=None) -> torch.Tensor:
    """(x - mean) @ whitener for `whiten`, (x - mean) / std for `standard` and `scale`, x - mean for `center`,
    x for `none`."""
    if mode == "none":
        return x
    x = x - mean.to(x.device)
    if mode == "whiten":
        return x @ whitener.to(x.device)
    return x / std.to(x.device) if mode in SCALED else x


def denormalize(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mode: str, unwhitener=None) -> torch.Tensor:
    """The inverse of `normalize` (`unwhitener`: the whitener's inverse)."""
    if mode == "none":
        return y
    if mode == "whiten":
        y = y @ unwhitener.to(y.device)
    elif mode in SCALED:
        y = y * std.to(y.device)
    return y + mean.to(y.device)


@torch.no_grad()
def store_statistics(model: torch.nn.Module, src_mean, src_std, tgt_mean, tgt_std, src_cov=None, tgt_cov=None):
    """Copy a pair's statistics into a transcoder's buffers (stds floored at 1e-6) and start its b_dec at the
    target mean in the space it predicts in (the mean itself with normalize_target none, zero otherwise).
    With `scale` a side's std buffer gets that side's one scale (per layer for a multi-layer transcoder); with
    `whiten` its whitener and unwhitener buffers come from that side's covariance (`src_cov`, `tgt_cov`)."""
    for name, value in (("src_mean", src_mean), ("src_std", src_std), ("tgt_mean", tgt_mean), ("tgt_std", tgt_std)):
        getattr(model, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    for side, mode, cov in (("src", model.cfg.normalize_source, src_cov), ("tgt", model.cfg.normalize_target, tgt_cov)):
        std = getattr(model, f"{side}_std")
        if mode == "scale":
            std.copy_(std.pow(2).mean(-1, keepdim=True).sqrt().expand_as(std))
        std.clamp_(min=1e-6)
        if mode == "whiten":
            if cov is None:
                raise ValueError(f"normalize_{'source' if side == 'src' else 'target'} whiten needs the covariance")
            w, w_inv = whitening(cov, model.cfg.whiten_floor)
            getattr(model, f"{side}_whitener").copy_(w)
            getattr(model, f"{side}_unwhitener").copy_(w_inv)
    none = model.cfg.normalize_target == "none"
    model.b_dec.copy_(model.tgt_mean if none else torch.zeros_like(model.tgt_mean))


@dataclass
class Normalizer:
    """x -> (x - mean) / std (standard; scale: one std for all dims), x - mean (center) or x (none); and back.
    Whitening is the transcoders' own (their buffers); a Normalizer refuses it."""

    mode: str
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    def __post_init__(self):
        if self.mode not in NORMALIZATIONS or self.mode == "whiten":
            raise ValueError(f"normalisation must be one of {NORMALIZATIONS[:-1]}, got {self.mode!r}")
        if self.mode == "scale":
            self.std = self.std.pow(2).mean(-1, keepdim=True).sqrt().expand_as(self.std)
        self.std = self.std.clamp_min(1e-6)

    @classmethod
    def from_dump(cls, dump, array: str, mode: str) -> Normalizer:
        """From a dump's stored per-dim statistics of `array` (sae.store.Dump)."""
        mean, std = dump.stats(array)
        return cls(mode, torch.from_numpy(mean), torch.from_numpy(std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std, self.mode)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return denormalize(y, self.mean, self.std, self.mode)


def raw_encoder(w_enc: torch.Tensor, src_std: torch.Tensor, mode: str, whitener=None) -> torch.Tensor:
    """Encoder rows [features, d] that read raw sources: W_enc / std when the source is standardised, W_enc @ W
    when it is whitened (W symmetric).

    (A centred source only shifts the bias, which raw-unit weights leave out.)"""
    w = w_enc.detach()
    if mode == "whiten":
        return w @ whitener
    return w / src_std if mode in SCALED else w


def raw_decoder(w_dec: torch.Tensor, tgt_std: torch.Tensor, mode: str, unwhitener=None) -> torch.Tensor:
    """Decoder rows [features, d] in raw target units: W_dec * std when the target is standardised, W_dec @ W^-1
    when it is whitened."""
    w = w_dec.detach()
    if mode == "whiten":
        return w @ unwhitener
    return w * tgt_std if mode in SCALED else w
