"""MultiLayerTranscoder: Anthropic's cross-layer transcoder for the encoder's feed-forward blocks.

Features of layer i read `encoder_layer_i.mlp_in` and write into `encoder_layer_m.mlp_out`
for every m >= i; the prediction for layer m sums over the layers i <= m:

    x_i   = norm_src_i(mlp_in_i)                                   [batch, d]
    z_i   = topk(x_i @ W_enc[i]^T + b_enc[i])                      [batch, features]   (k_i per row)
    y_m   = b_dec[m] + sum_{i <= m} z_i @ W_dec[i][:, m - i]       [batch, d], normalised target space
    mlp_out_m ~ norm_tgt_m^-1(y_m)

W_dec[i] is [features, n_layers - i, d]: each feature's decoder rows into its own and every
later layer. topk and batchtopk keep them at unit norm together and train through the active
entries only (sae.sparse, one call per source layer); jumprelu trains densely, its penalty
weighing each feature by the norm of those rows across the layers it writes to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clt.config import MULTILAYER_ACTIVATIONS, CodeOptions
from clt.jumprelu import jump_relu
from clt.normalization import denormalize, normalize, raw_decoder, raw_encoder, store_statistics
from policy.model import LIMITS
from sae.model import check_width, normalize_rows_, remove_parallel_gradient_, resolve_k, save_model
from sae.sparse import SparseCodes, auxk_loss, select_batchtopk, select_topk, sparse_decode, update_threshold_


@dataclass
class MultiLayerConfig(CodeOptions):
    """Shape and sparsity of a multi-layer CLT (the shared options: clt.config); saved as cfg.json beside
    model.safetensors. Widths, k and AuxK are per layer. One budget across layers is not offered: a layer's
    codes would then depend on later layers' inputs, which splicing into a forward pass cannot provide."""

    n_layers: int
    """Encoder layers: one encoder per layer's mlp_in, decoders into that and every later mlp_out."""
    d: int
    """Width of mlp_in and mlp_out."""
    sparsity_coef: float | None = None
    """jumprelu: weight of sum tanh(c * |decoder row across layers| * z) per row (Anthropic's CLT penalty)
    [default: 1e-3 for jumprelu, else 0]."""
    sparsity_scale: float = 1.0
    """jumprelu: c in that penalty."""
    layer_weights: list[float] | None = None
    """Weights of the per-layer FVUs in the loss (default all 1)."""
    layer_k: list[int] | None = None
    """topk/batchtopk: active features per row in each layer, instead of k in every layer."""

    def __post_init__(self):
        super().__post_init__()
        check_width(d=self.d)
        if not 1 <= self.n_layers <= LIMITS["num_encoder_layers"]:
            raise ValueError(f"n_layers must be in [1, {LIMITS['num_encoder_layers']}], got {self.n_layers}")
        if self.activation not in MULTILAYER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {MULTILAYER_ACTIVATIONS}, got {self.activation!r}")
        if self.layer_weights is not None and (
            len(self.layer_weights) != self.n_layers or min(self.layer_weights) < 0 or not any(self.layer_weights)
        ):
            raise ValueError(f"layer_weights needs {self.n_layers} non-negative weights, not all zero")
        resolve_k(self.k, self.k_ratio, self.n_features)
        if self.layer_k is not None and (
            len(self.layer_k) != self.n_layers or not all(1 <= k <= self.n_features for k in self.layer_k)
        ):
            raise ValueError(f"layer_k needs {self.n_layers} values in [1, {self.n_features}], got {self.layer_k}")
        if self.layer_k is not None and self.activation == "jumprelu":
            raise ValueError("layer_k is for topk and batchtopk (jumprelu learns its thresholds)")
        if self.sparsity_coef is None:
            self.sparsity_coef = 1e-3 if self.activation == "jumprelu" else 0.0
        if min(self.sparsity_coef, self.sparsity_scale) < 0:
            raise ValueError("the sparsity penalty must be >= 0")
        if "whiten" in (self.normalize_source, self.normalize_target):
            raise ValueError("whiten is for pairwise transcoders; the multi-layer CLT scales each layer by its stds")

    @property
    def n_features(self) -> int:  # per layer
        return self.d * self.expansion_factor

    @property
    def active(self) -> int:  # per layer, unless layer_k says otherwise
        return resolve_k(self.k, self.k_ratio, self.n_features)

    @property
    def ks(self) -> list[int]:
        """Active features per row (topk, batchtopk), layer by layer."""
        return list(self.layer_k) if self.layer_k is not None else [self.active] * self.n_layers


def format_k(k: int | list[int]) -> str:
    """k as a report prints it: one number, or a multi-layer CLT's k layer by layer as 64/32/32."""
    return "/".join(map(str, k)) if isinstance(k, list) else str(k)


@dataclass
class MultiLayerOutput:
    y_hat: torch.Tensor  # [layer, batch, d] normalised target space
    codes: list[SparseCodes]  # per source layer
    zs: list[torch.Tensor] | None = None  # jumprelu: dense codes [batch, features] per layer, with gradients

    def fired(self, n_features: int) -> torch.Tensor:
        """[layer * features] bool: which features were non-zero in some row."""
        return torch.cat([torch.bincount(c.features, weights=c.values, minlength=n_features) > 0 for c in self.codes])

    def l0(self) -> float:
        """Mean non-zero codes per row, summed over layers."""
        return sum((c.values != 0).sum().item() for c in self.codes) / self.y_hat.shape[1]


def threshold_codes(pre: torch.Tensor, threshold: torch.Tensor) -> SparseCodes:
    """The entries of pre above a threshold (a scalar, or one per feature), row by row."""
    return dense_codes(pre * (pre > threshold))


def dense_codes(z: torch.Tensor) -> SparseCodes:
    """The non-zero entries of a [batch, features] code matrix, row by row."""
    rows, features = z.nonzero(as_tuple=True)
    offsets = F.pad(torch.bincount(rows, minlength=z.shape[0]).cumsum(0), (1, 0))
    return SparseCodes(z[rows, features], features, offsets)


class MultiLayerTranscoder(nn.Module):
    def __init__(self, cfg: MultiLayerConfig):
        super().__init__()
        self.cfg = cfg
        n, d, f = cfg.n_layers, cfg.d, cfg.n_features
        self.W_enc = nn.Parameter(torch.randn(n, f, d) / d**0.5)  # [layer, features, d]
        self.b_enc = nn.Parameter(torch.zeros(n, f))
        self.W_dec = nn.ParameterList(nn.Parameter(torch.randn(f, n - i, d)) for i in range(n))  # [features, m>=i, d]
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.normalize_decoder()
        self.register_buffer("batchtopk_threshold", torch.zeros(n))  # per layer, for batchtopk at inference
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, f), float(cfg.jumprelu_threshold)).log())
        for side in ("src", "tgt"):
            self.register_buffer(f"{side}_mean", torch.zeros(n, d))
            self.register_buffer(f"{side}_std", torch.ones(n, d))

    def set_statistics(self, src_mean, src_std, tgt_mean, tgt_std) -> None:
        """Per-layer statistics [layer, d]; b_dec starts at the (normalised) target means."""
        store_statistics(self, src_mean, src_std, tgt_mean, tgt_std)

    def normalize_source(self, xs: torch.Tensor) -> torch.Tensor:  # [layer, batch, d], the first len(xs) layers
        n = len(xs)
        return normalize(xs, self.src_mean[:n, None], self.src_std[:n, None], self.cfg.normalize_source)

    def normalize_target(self, ys: torch.Tensor) -> torch.Tensor:
        return normalize(ys, self.tgt_mean[:, None], self.tgt_std[:, None], self.cfg.normalize_target)

    def denormalize_target(self, ys: torch.Tensor) -> torch.Tensor:
        return denormalize(ys, self.tgt_mean[:, None], self.tgt_std[:, None], self.cfg.normalize_target)

    @property
    def unit_norm_decoder(self) -> bool:
        return self.cfg.activation != "jumprelu"  # jumprelu's penalty weighs the decoder norms instead

    @property
    def layer_weights(self) -> torch.Tensor | None:
        """[layer] weights of the per-layer FVUs in the loss (None: all 1)."""
        w = self.cfg.layer_weights
        return None if w is None else torch.tensor(w, dtype=torch.float32, device=self.b_dec.device)

    @property
    def feature_count(self) -> int:
        return self.cfg.n_layers * self.cfg.n_features

    def sparsity_loss(self, out: MultiLayerOutput) -> torch.Tensor:
        """jumprelu: mean over rows of sum_i,f tanh(c * |W_dec[i][f]| * z_i,f), the norm over every layer
        feature f writes to; topk and batchtopk are sparse by construction."""
        if out.zs is None:
            return out.y_hat.new_zeros(())
        c = self.cfg.sparsity_scale
        terms = [torch.tanh(c * z * w.norm(dim=(1, 2))).sum(-1).mean() for z, w in zip(out.zs, self.W_dec, strict=True)]
        return self.cfg.sparsity_coef * torch.stack(terms).sum()

    def dictionary_loss(self) -> torch.Tensor:
        return self.b_dec.new_zeros(())

    def decoder(self, layer: int) -> torch.Tensor:  # [features, (n_layers - layer) * d]
        return self.W_dec[layer].flatten(1)

    def row_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[layer * features] norms of each feature's encoder row and of its decoder rows (all layers together)."""
        decoder = torch.cat([w.detach().norm(dim=(1, 2)) for w in self.W_dec])
        return self.W_enc.detach().norm(dim=-1).flatten(), decoder

    def raw_encoder(self, layer: int) -> torch.Tensor:  # [features, d], reads raw mlp_in of `layer`
        return raw_encoder(self.W_enc[layer], self.src_std[layer], self.cfg.normalize_source)

    def raw_decoder(self, layer: int, target: int) -> torch.Tensor:  # [features, d], raw mlp_out of `target`
        """The decoder rows of `layer`'s features into layer `target` (>= layer), in raw units."""
        w = self.W_dec[layer][:, target - layer]
        return raw_decoder(w, self.tgt_std[target], self.cfg.normalize_target)

    def normalize_decoder(self) -> None:
        """Each feature's decoder rows into all the layers it writes to, together at unit norm."""
        for w in self.W_dec:
            normalize_rows_(w, dims=(1, 2))

    def remove_parallel_gradient(self) -> None:
        for w in self.W_dec:
            remove_parallel_gradient_(w, dims=(1, 2))

    def _assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per source layer l a [batch, (n - l) * d] prediction -> y [layer, batch, d] with b_dec."""
        n, d = self.cfg.n_layers, self.cfg.d
        y = [self.b_dec[m].expand(parts[0].shape[0], d) for m in range(n)]
        for i, part in enumerate(parts):
            for m in range(i, n):
                y[m] = y[m] + part[:, (m - i) * d : (m - i + 1) * d]
        return torch.stack(y)

    @torch.no_grad()
    def encode_normalized(self, xs: torch.Tensor, k: int | None = None) -> list[SparseCodes]:
        """Normalised sources of the first len(xs) layers [layer, batch, d] -> each layer's active entries (k: as in
        `select`)."""
        return [self.select(i, torch.addmm(self.b_enc[i], x, self.W_enc[i].T), k) for i, x in enumerate(xs)]

    @torch.no_grad()
    def select(self, layer: int, pre: torch.Tensor, k: int | None = None) -> SparseCodes:
        """Layer `layer`'s active entries from its pre-activations [batch, features] (training updates batchtopk's
        threshold). topk and batchtopk keep the layer's k per row, or k if that is larger (a training schedule's)."""
        k = max(k or 0, self.cfg.ks[layer])
        if self.cfg.activation == "topk":
            return select_topk(pre, k)
        if self.cfg.activation == "jumprelu":
            return threshold_codes(pre, self.log_threshold[layer].exp())
        if self.training:  # batchtopk
            codes = select_batchtopk(pre, k)
            update_threshold_(self.batchtopk_threshold[layer], codes.values)
            return codes
        return threshold_codes(pre, self.batchtopk_threshold[layer])

    def encode_layer(self, layer: int, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw mlp_in of one layer [batch, d] -> that layer's codes [batch, features]."""
        x = normalize(x_raw, self.src_mean[layer], self.src_std[layer], self.cfg.normalize_source)
        return self.select(layer, torch.addmm(self.b_enc[layer], x, self.W_enc[layer].T)).dense(self.cfg.n_features)

    def forward_train(self, xs: torch.Tensor, k: int | None = None) -> MultiLayerOutput:
        """Normalised sources [layer, batch, d] -> prediction [layer, batch, d], through the active entries (k: as in
        `select`)."""
        if self.cfg.activation == "jumprelu":  # dense: the thresholds learn through the straight-through estimate
            zs = [jump_relu(torch.addmm(self.b_enc[i], xs[i], self.W_enc[i].T), self.log_threshold[i].exp(),
                            self.cfg.bandwidth) for i in range(self.cfg.n_layers)]  # fmt: skip
            codes = [dense_codes(z.detach()) for z in zs]
            return MultiLayerOutput(self._assemble([z @ self.decoder(i) for i, z in enumerate(zs)]), codes, zs)
        codes = self.encode_normalized(xs, k)
        parts = [sparse_decode(xs[i], self.W_enc[i], self.b_enc[i], self.decoder(i), c) for i, c in enumerate(codes)]
        return MultiLayerOutput(self._assemble(parts), codes)

    def encode(self, xs_raw: torch.Tensor) -> torch.Tensor:
        """Raw mlp_in [layer, batch, d] -> codes [layer, batch, features]."""
        codes = self.encode_normalized(self.normalize_source(xs_raw))
        return torch.stack([c.dense(self.cfg.n_features) for c in codes])

    def decode(self, zs: torch.Tensor) -> torch.Tensor:
        """Codes [layer, batch, features] -> raw mlp_out predictions [layer, batch, d]."""
        return self.denormalize_target(self._assemble([zs[i] @ self.decoder(i) for i in range(self.cfg.n_layers)]))

    def forward(self, xs_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw mlp_in [layer, batch, d] -> (raw mlp_out predictions [layer, batch, d], codes)."""
        zs = self.encode(xs_raw)
        return self.decode(zs), zs

    @torch.no_grad()
    def predict_layer(self, xs_raw: list[torch.Tensor], m: int) -> torch.Tensor:
        """Raw mlp_out of layer m [rows, d] from the raw mlp_in of layers 0..m (a list of [rows, d])."""
        rows = xs_raw[0].shape[0]
        codes = self.encode_normalized(self.normalize_source(torch.stack(xs_raw[: m + 1])))
        y = self.b_dec[m].expand(rows, self.cfg.d)
        for i in range(m + 1):
            y = y + codes[i].dense(self.cfg.n_features) @ self.W_dec[i][:, m - i]
        return denormalize(y, self.tgt_mean[m], self.tgt_std[m], self.cfg.normalize_target)

    def aux_loss(self, xs: torch.Tensor, ys: torch.Tensor, out: MultiLayerOutput, dead: torch.Tensor) -> torch.Tensor:
        """AuxK per source layer: its top dead features reconstruct the residuals of every layer they write to."""
        n, f, rows = self.cfg.n_layers, self.cfg.n_features, self.cfg.aux_rows
        dead = dead.view(n, f)
        loss = ys.new_zeros(())
        if self.cfg.activation == "jumprelu":
            return loss
        aux_k = self.cfg.aux_k or self.cfg.d // 2
        for i in range(n):
            y = ys[i:, :rows].transpose(0, 1).flatten(1)  # [rows, (n - i) * d]: every layer i writes to
            y_hat = out.y_hat[i:, :rows].transpose(0, 1).flatten(1)
            decoder = self.decoder(i)
            loss = loss + auxk_loss(xs[i, :rows], self.W_enc[i], self.b_enc[i], decoder, dead[i], aux_k, y, y_hat)
        return loss

    def save(self, folder) -> None:
        save_model(folder, self)
