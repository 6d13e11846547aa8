"""TopK sparse autoencoder (Gao et al., 2024, "Scaling and evaluating sparse autoencoders").

    pre   = (x - b_dec) @ W_enc + b_enc              [batch, latents]
    z     = the k largest of ReLU(pre), values kept   (not shifted by the k-th value)
    x_hat = z @ W_dec + b_dec                         [batch, d_in]

Decoder rows have unit norm (renormalised after every step, and the gradient
component along each row is removed before it). `b_dec` starts at the data mean.
Dead latents (no activation for `dead_tokens` rows) get the AuxK loss: the
top `aux_k` dead latents reconstruct the residual x - x_hat.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from policy.checks import check_types
from policy.io import read_json_object, write_json
from policy.torch_files import build_checked, read_safetensors, save_tensors
from sae.sparse import auxk_loss, topk_rows


def init_seed(identity: str, seed: int) -> int:
    """The seed a dictionary's initial weights are drawn with: from what it is (e.g. `clt/<pair>` and its config)
    and the run's seed, so that two dictionaries trained with the same seed never start from the same vectors
    (attribution across dictionaries would otherwise inherit their shared random directions)."""
    digest = hashlib.sha256(f"{identity}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def resolve_k(k: int | None, k_ratio: float | None, units: int) -> int:
    """Active units per row: k, else round(k_ratio * units), else 16; a ValueError when invalid."""
    if k is not None and k_ratio is not None:
        raise ValueError("give k or k_ratio, not both")
    if k_ratio is not None and not 0 < k_ratio <= 1:
        raise ValueError(f"k_ratio must be in (0, 1], got {k_ratio}")
    active = k if k is not None else max(1, round(k_ratio * units)) if k_ratio is not None else min(16, units)
    if not 1 <= active <= units:
        raise ValueError(f"k must be in [1, {units}], got {active}")
    return active


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, dims: tuple[int, ...] = (1,)) -> None:
    """Scale each row (the slices along `dims`) of a dictionary to unit norm, in place."""
    weight.div_(weight.norm(dim=dims, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_gradient_(weight: torch.Tensor, dims: tuple[int, ...] = (1,)) -> None:
    """Project out the part of a unit-row weight's gradient that would change its row norms, in place."""
    if weight.grad is not None:
        weight.grad.sub_((weight.grad * weight).sum(dim=dims, keepdim=True) * weight)


def save_model(folder: str | Path, module: nn.Module) -> None:
    """`cfg.json` (the module's dataclass `cfg`) + `model.safetensors`, both written atomically."""
    folder = Path(folder)
    write_json(folder / "cfg.json", asdict(module.cfg))
    save_tensors(folder / "model.safetensors", module.state_dict())


def read_model_files(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg dict, state dict) from a folder written by `save_model`; an unreadable file is a ValueError naming it."""
    folder = Path(folder)
    if not (folder / "cfg.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} needs cfg.json and model.safetensors")
    return read_json_object(folder / "cfg.json"), read_safetensors(folder / "model.safetensors")


def load_model(folder: str | Path, make_config, make_model) -> nn.Module:
    """A dictionary from `save_model`'s files in eval mode: `make_model(make_config(cfg dict))` holding the weights,
    every problem (a config field of the wrong type or out of range, weights that do not fit it or are not finite)
    a ValueError naming the file."""
    folder = Path(folder)
    raw, state = read_model_files(folder)
    try:
        cfg = make_config(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'cfg.json'}: {err}") from err
    return build_checked(lambda: make_model(cfg), state, str(folder / "model.safetensors")).eval()


MAX_WIDTH = 1 << 16
"""The widest activation a dictionary config may name (a hostile cfg.json cannot ask for unbounded memory)."""
MAX_EXPANSION = 1 << 10


def check_width(**widths: int) -> None:
    for name, value in widths.items():
        if not 1 <= value <= MAX_WIDTH:
            raise ValueError(f"{name} must be in [1, {MAX_WIDTH}], got {value}")


@dataclass(kw_only=True)
class SAEOptions:
    """Everything about a TopK SAE but its width: what SAEConfig (cfg.json) and sae.train_topk share."""

    expansion_factor: int = 8
    """Latents = expansion_factor x the hook's width."""
    k: int | None = None
    """Active latents per row [default: 16 unless k_ratio]."""
    k_ratio: float | None = None
    """Fraction of latents active per row, instead of k."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss [default: half the hook's width]."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 100_000
    """A latent that has not fired for this many training rows counts as dead (and gets the AuxK loss)."""

    def __post_init__(self):
        check_types(self)
        if not 1 <= self.expansion_factor <= MAX_EXPANSION:
            raise ValueError(f"expansion_factor must be in [1, {MAX_EXPANSION}], got {self.expansion_factor}")
        if min(self.aux_coef, self.dead_tokens) < 0:
            raise ValueError("aux_coef and dead_tokens must be >= 0")
        if self.aux_k is not None and self.aux_k < 1:
            raise ValueError(f"aux_k must be at least 1 (or left out for its default), got {self.aux_k}")


@dataclass
class SAEConfig(SAEOptions):
    """Shape and sparsity of a TopK SAE; saved as cfg.json beside model.safetensors."""

    d_in: int
    """Width of the hooked activation."""

    def __post_init__(self):
        super().__post_init__()
        check_width(d_in=self.d_in)
        resolve_k(self.k, self.k_ratio, self.n_latents)

    @property
    def n_latents(self) -> int:
        return self.d_in * self.expansion_factor

    @property
    def active(self) -> int:
        return resolve_k(self.k, self.k_ratio, self.n_latents)

    @property
    def auxiliary(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.n_latents)


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # [batch, d_in]
    values: torch.Tensor  # [batch, k] the active latents' values
    indices: torch.Tensor  # [batch, k] their ids
    pre: torch.Tensor  # [batch, latents] pre-activations (for AuxK)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, data_mean: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        w_dec = torch.randn(cfg.n_latents, cfg.d_in)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)  # [latents, d_in], unit rows
        self.W_enc = nn.Parameter(w_dec.T.clone())  # [d_in, latents]
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in) if data_mean is None else data_mean.clone().float())

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense sparse codes z [batch, latents]."""
        out = self(x)
        return torch.zeros_like(out.pre).scatter(1, out.indices, out.values)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat from the k active latents only: sum_j values_j * W_dec[indices_j] + b_dec."""
        return nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        values, indices = topk_rows(pre, self.cfg.active)
        values = torch.relu(values)
        return SAEOutput(self.decode_sparse(values, indices), values, indices, pre)

    def aux_loss(self, x: torch.Tensor, out: SAEOutput, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (sae.sparse.auxk_loss): the top aux_k dead latents reconstruct the residual, over x's variance."""
        return auxk_loss(x - self.b_dec, self.W_enc.T, self.b_enc, self.W_dec, dead, self.cfg.auxiliary, x, out.x_hat)

    def normalize_decoder(self) -> None:
        normalize_rows_(self.W_dec)

    def remove_parallel_gradient(self) -> None:
        remove_parallel_gradient_(self.W_dec)

    def save(self, folder: str | Path) -> None:
        save_model(folder, self)


def load_sae(folder: str | Path) -> TopKSAE:
    """A TopKSAE from `cfg.json` + `model.safetensors`."""
    return load_model(folder, lambda raw: SAEConfig(**raw), TopKSAE)
