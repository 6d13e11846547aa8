"""The options every transcoder's config shares, written once: the model configs (saved as cfg.json) and
the trainer's config (and through it the command line, see policy.options) inherit them.

    CodeOptions           the sparse code: width, sparsifier, AuxK, normalisation   (pairwise and multi-layer)
    TranscoderOptions     + what only a pairwise transcoder has: tied, skip, L1/L0, dictionary penalty
"""

from __future__ import annotations

from dataclasses import dataclass

from clt.normalization import NORMALIZATIONS
from policy.checks import check_types
from policy.options import choice
from sae.model import MAX_EXPANSION

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
MULTILAYER_ACTIVATIONS = ("topk", "batchtopk", "jumprelu")
DICTIONARY_PENALTIES = ("none", "l1", "l2")
DECODER_INITS = ("zero", "random")


@dataclass(kw_only=True)
class CodeOptions:
    expansion_factor: int = 8
    """Features = expansion_factor x the source width (per layer for a multi-layer CLT)."""
    k: int | None = None
    """Active features per row for topk/batchtopk [default: 16 unless k_ratio; the multi-layer CLT 32 per layer]."""
    k_ratio: float | None = None
    """Fraction of features active per row, instead of k."""
    activation: str = choice("topk", ACTIVATIONS)
    """Sparsifier: topk, batchtopk, jumprelu (a learned threshold per feature) or relu (made sparse by L1;
    pairwise only)."""
    jumprelu_threshold: float = 0.5
    """jumprelu: initial threshold, in units of the (normalised) pre-activations."""
    bandwidth: float = 0.2
    """jumprelu: width of the straight-through window around each threshold."""
    aux_k: int | None = None
    """Dead features used by the AuxK loss (topk/batchtopk) [default: half the target width]."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss on dead features."""
    aux_rows: int = 512
    """Rows of each batch the AuxK loss is estimated on."""
    dead_tokens: int = 100_000
    """Rows without firing after which a feature counts as dead."""
    normalize_source: str = choice("standard", NORMALIZATIONS)
    """How the model scales sources, from the pair's stored statistics (inside the model)."""
    normalize_target: str = choice("scale", NORMALIZATIONS)
    """How the model scales targets (the loss is measured there); `scale` divides by one number, so the loss is
    still the raw FVU and a learning rate means the same on any pair (bench.quality)."""
    whiten_floor: float = 1e-3
    """whiten: eigenvalues of the side's covariance below this fraction of the largest are raised to it."""
    align_coef: float = 0.0
    """Weight of a cosine-alignment term: the mean over rows of 1 - cos(prediction, target), both in the
    normalised target space (0: off)."""

    def __post_init__(self):
        check_types(self)
        if not 1 <= self.expansion_factor <= MAX_EXPANSION or self.aux_rows < 1:
            raise ValueError(f"expansion_factor must be in [1, {MAX_EXPANSION}] and aux_rows positive")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("normalize_source", "normalize_target"):
            if getattr(self, name) not in NORMALIZATIONS:
                raise ValueError(f"{name} must be one of {NORMALIZATIONS}, got {getattr(self, name)!r}")
        if min(self.aux_coef, self.dead_tokens) < 0:
            raise ValueError("aux_coef and dead_tokens must be >= 0")
        if self.aux_k is not None and self.aux_k < 1:
            raise ValueError(f"aux_k must be at least 1 (or left out for its default), got {self.aux_k}")
        if self.bandwidth <= 0 or self.jumprelu_threshold <= 0:
            raise ValueError("bandwidth and jumprelu_threshold must be > 0")
        if not 0 < self.whiten_floor <= 1 or self.align_coef < 0:
            raise ValueError("whiten_floor must be in (0, 1] and align_coef >= 0")


@dataclass(kw_only=True)
class TranscoderOptions(CodeOptions):
    tied: bool = False
    """Tie the decoder to the encoder (W_dec = W_enc; needs equal source and target widths)."""
    skip: bool = False
    """Add a linear skip path x @ W_skip (a skip transcoder)."""
    l1_coef: float | None = None
    """L1 penalty on codes weighted by decoder row norms [default: 3e-3 for relu, its sparsity term; else 0]."""
    l0_coef: float | None = None
    """L0 penalty through the straight-through step [default: 1e-3 for jumprelu (for the multi-layer CLT the
    paper's tanh penalty); else 0]."""
    dictionary_penalty: str = choice("none", DICTIONARY_PENALTIES)
    """A penalty on the decoder rows: the sum of |w| (l1) or of w^2 (l2), e.g. for a tied decoder."""
    dictionary_coef: float = 0.0
    """Weight of the dictionary penalty."""
    group_size: int | None = None
    """Group lasso: features per group (contiguous blocks of the dictionary) [default: none; --group_heads: one
    group per attention head]."""
    group_coef: float = 0.0
    """Weight of the group lasso: the mean over rows of the sum over groups of ||z_group||_2 (needs group_size)."""
    decoder_init: str = choice("random", DECODER_INITS)
    """random: random unit rows, held at unit norm for topk/batchtopk (Gao et al.; the scale lives in the codes);
    zero: rows start at zero and take any norm (sparsify's transcoder recipe, untied topk/batchtopk only). On
    bench.quality's synthetic pairs zero reaches a lower FVU, on the demo's TSP pairs random does
    (docs/guide/transcoders.md)."""

    def __post_init__(self):
        super().__post_init__()
        if self.l1_coef is None:
            self.l1_coef = 3e-3 if self.activation == "relu" else 0.0
        if self.l0_coef is None:
            self.l0_coef = 1e-3 if self.activation == "jumprelu" else 0.0
        if self.decoder_init not in DECODER_INITS:
            raise ValueError(f"decoder_init must be one of {DECODER_INITS}, got {self.decoder_init!r}")
        if self.decoder_init == "zero" and (self.tied or self.activation not in ("topk", "batchtopk")):
            raise ValueError("decoder_init zero is for untied topk/batchtopk transcoders (an L1 or L0 penalty "
                             "weighted by decoder norms would start at zero)")  # fmt: skip
        if self.dictionary_penalty not in DICTIONARY_PENALTIES:
            raise ValueError(f"dictionary_penalty must be one of {DICTIONARY_PENALTIES}")
        if (self.dictionary_penalty == "none") != (self.dictionary_coef == 0):
            raise ValueError("--dictionary_penalty and --dictionary_coef go together: a penalty (l1, l2) acts only "
                             "with a coefficient > 0, and a coefficient only with a penalty")  # fmt: skip
        unit_rows = self.activation in ("topk", "batchtopk") and not self.tied and self.decoder_init == "random"
        if self.dictionary_penalty == "l2" and unit_rows:
            raise ValueError(
                "--dictionary_penalty l2 cannot act here: topk/batchtopk decoder rows are held at unit norm, so "
                "their sum of w^2 is constant; use l1, --tied or --decoder_init zero"
            )
        if min(self.l1_coef, self.l0_coef, self.dictionary_coef, self.group_coef) < 0:
            raise ValueError("penalty coefficients must be >= 0")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
