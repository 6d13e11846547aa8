"""SAEs, transcoders and multi-layer CLT layers as one shape, and the virtual weights between them.

A `Dictionary` is a set of features with a raw-unit encoder on the hook it reads and raw-unit
decoders into the hooks it writes:
- a TopK SAE on hook h reads h and writes h (its reconstruction);
- a pairwise transcoder reads its source hook and writes its target hook;
- layer i of a multi-layer CLT reads encoder_layer_i.mlp_in and writes every mlp_out from layer i on.

Virtual weights between features follow the residual stream only (the direct path of the
transcoder-circuit and CLT attribution-graph papers): feature a of an upstream dictionary
writes its decoder row, which reaches a downstream reader through the normalisations in
between; in eval mode each scales channel c by gamma_c / sigma_c. Attention and the MLPs along
the way are left out. The weight of a -> b is `encoder_b . (scale * decoder_a)`, its attribution
that weight times a's mean activation (the edge export's convention, clt.graph.edges).

Stream positions in the post-norm layer i (h = Norm1(x + MHA(x)); out = Norm2(h + FF(h))):

    2i        x_i (encoder_layer_{i}.input, the output of layer i - 1)
    2i + 0.5  attn_out is added          2i + 0.75  Norm1
    2i + 1    mlp_in = h                 2i + 1.5   mlp_out is added
    2i + 1.75 Norm2                      2i + 2     encoder_layer_{i} (= x_{i+1})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clt.model import CrossLayerTranscoder, load_transcoder
from clt.multilayer import MultiLayerTranscoder
from clt.pairs import LayerPair
from policy.model import AttentionModel
from sae.hook_names import parse_layer_hook
from sae.model import TopKSAE, load_sae
from sae.runs import is_finished, newest_runs

_READ = {"input": 0.0, "mlp_in": 1.0, None: 2.0}  # points a dictionary can read (attn_out, mlp_out are not streams)
_WRITE = {"input": 0.0, "attn_out": 0.5, "mlp_in": 1.0, "mlp_out": 1.5, None: 2.0}

Codes = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # cache {hook: [rows, d]} -> codes [rows, features]


def stream_position(hook: str, n_layers: int, write: bool) -> float | None:
    """Where a hook reads (write=False) or writes (write=True) the residual stream; None: not on the stream."""
    if hook == "init_embedding":
        return 0.0
    if hook == "encoder_output":
        return 2.0 * n_layers
    parsed = parse_layer_hook(hook)
    if parsed is None:
        return None
    offset = (_WRITE if write else _READ).get(parsed.point)
    return None if offset is None else 2 * parsed.layer + offset


@dataclass
class Dictionary:
    id: str
    """Unique and stable, e.g. `sae/encoder_layer_0`, `clt/clt_L0.mlp_in_to_L0.mlp_out`, `clt/clt_multilayer/L1`."""
    kind: str
    """`sae`, `transcoder` or `clt_layer` (one layer of a multi-layer CLT)."""
    label: str
    """Short name for a graph column."""
    folder: Path
    """The run folder it was loaded from."""
    read_hook: str
    encoder: torch.Tensor
    """[features, d] raw units: pre-activation = x @ encoder.T + a constant."""
    writes: dict[str, torch.Tensor]
    """hook -> [features, d] raw decoder rows."""
    codes: Codes = field(repr=False)
    """Feature activations from a cache of raw activations."""

    @property
    def n_features(self) -> int:
        return self.encoder.shape[0]

    @property
    def hooks(self) -> list[str]:
        """Every hook `codes` reads from the cache."""
        if self.kind == "clt_layer":
            return [f"encoder_layer_{i}.mlp_in" for i in range(parse_layer_hook(self.read_hook).layer + 1)]
        return [self.read_hook]


def sae_dictionary(sae: TopKSAE, hook: str, folder: str | Path = "") -> Dictionary:
    """A TopK SAE on `hook`: reads it, writes its reconstruction back to it."""
    return Dictionary(
        f"sae/{hook}", "sae", f"SAE {hook}", Path(folder), hook, sae.W_enc.detach().T, {hook: sae.W_dec.detach()},
        lambda cache: sae.encode(cache[hook]),
    )  # fmt: skip


def transcoder_dictionary(
    model: CrossLayerTranscoder, pair: str, folder: str | Path = "", hooks: LayerPair | None = None
) -> Dictionary:
    """A pairwise transcoder: reads its source hook, writes its target hook (`hooks`, default: the pair's name's)."""
    hooks = hooks or LayerPair.from_name(pair)
    return Dictionary(
        f"clt/{pair}", "transcoder", pair.removeprefix("clt_"), Path(folder), hooks.source,
        model.raw_encoder(), {hooks.target: model.raw_decoder()}, lambda cache: model.encode(cache[hooks.source]),
    )  # fmt: skip


def load_sae_dictionary(folder: str | Path, hook: str) -> Dictionary:
    return sae_dictionary(load_sae(folder), hook, folder)


def load_transcoder_dictionaries(folder: str | Path, pair: str) -> list[Dictionary]:
    """One dictionary for a pairwise transcoder, one per layer for a multi-layer CLT."""
    model = load_transcoder(folder)
    if isinstance(model, MultiLayerTranscoder):
        return [_clt_layer(model, Path(folder), pair, i) for i in range(model.cfg.n_layers)]
    return [transcoder_dictionary(model, pair, folder)]


def _clt_layer(model: MultiLayerTranscoder, folder: Path, pair: str, i: int) -> Dictionary:
    cfg, mlp_in = model.cfg, [f"encoder_layer_{j}.mlp_in" for j in range(i + 1)]
    writes = {f"encoder_layer_{m}.mlp_out": model.raw_decoder(i, m) for m in range(i, cfg.n_layers)}

    def codes(cache: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode(torch.stack([cache[h] for h in mlp_in]))[i]

    return Dictionary(f"clt/{pair}/L{i}", "clt_layer", f"CLT L{i}", folder, mlp_in[-1], model.raw_encoder(i), writes,
                      codes)  # fmt: skip


def find_dictionaries(run_dir: Path, folders: Iterable[str | Path] = ()) -> list[Dictionary]:
    """The dictionaries of the given SAE / transcoder run folders; when none are given, the newest finished SAE
    of every hook, then the newest finished transcoder of every pair (sae.runs.newest_runs)."""
    chosen = [Path(f) for f in folders] or [*newest_runs(run_dir, "sae"), *newest_runs(run_dir, "clt")]
    found = []
    for folder in chosen:
        kind = folder.resolve().parent.parent.name
        if kind not in ("sae_runs", "clt_runs") or not is_finished(folder):
            raise ValueError(
                f"{folder} is not a finished SAE or transcoder run folder (<run>/sae/sae_runs/<hook>/<timestamp> "
                "or <run>/clt/clt_runs/<pair>/<timestamp>, with model.safetensors)"
            )
        name = folder.resolve().parent.name
        found += (
            [load_sae_dictionary(folder, name)] if kind == "sae_runs" else load_transcoder_dictionaries(folder, name)
        )
    if not found:
        raise FileNotFoundError(
            f"no trained SAE or transcoder in {run_dir}: train one (sae.train_topk, clt.train_transcoder)"
        )
    return found


@torch.no_grad()
def norm_scales(model: AttentionModel, locs: torch.Tensor) -> list[torch.Tensor]:
    """Per normalisation, in stream order (Norm1, Norm2 of layer 0, then layer 1, ...): its [d] channel scale.

    BatchNorm in eval mode: gamma / sqrt(running_var + eps), exactly. InstanceNorm divides by each
    instance's own std: gamma / (that std averaged over `locs`), an average.
    """
    norms = [n for layer in model.layers for n in (layer.norm1.norm, layer.norm2.norm)]
    if all(isinstance(n, torch.nn.BatchNorm1d) for n in norms):
        return [n.weight / (n.running_var + n.eps).sqrt() for n in norms]
    stds: dict[int, torch.Tensor] = {}

    def record(i: int):
        def hook(module, inputs):  # InstanceNorm1d input [batch, d, node]
            stds[i] = (inputs[0].var(dim=-1, unbiased=False) + module.eps).sqrt().mean(0)

        return hook

    handles = [n.register_forward_pre_hook(record(i)) for i, n in enumerate(norms)]
    try:
        model.encode(locs)
    finally:
        for handle in handles:
            handle.remove()
    return [n.weight / stds[i] for i, n in enumerate(norms)]


def path_scale(scales: list[torch.Tensor], write_hook: str, read_hook: str) -> torch.Tensor | None:
    """[d] channel scale from a write to a later read along the residual stream; None when there is no path.

    A read of the very hook that is written (an SAE on a transcoder's source or target) is the identity."""
    if write_hook == read_hook:
        return torch.ones(())
    n_layers = len(scales) // 2
    w = stream_position(write_hook, n_layers, write=True)
    r = stream_position(read_hook, n_layers, write=False)
    if w is None or r is None or w > r:
        return None
    scale = torch.ones_like(scales[0])
    for k, s in enumerate(scales):  # norm k sits at 2 (k // 2) + 0.75 (Norm1) or + 1.75 (Norm2)
        if w < 2 * (k // 2) + 0.75 + (k % 2) < r:
            scale = scale * s
    return scale


def virtual_weights(up: Dictionary, down: Dictionary, scales: list[torch.Tensor]) -> torch.Tensor | None:
    """[up features, down features]: the direct-path weight of each upstream feature on each downstream
    feature's pre-activation, summed over every hook `up` writes; None when nothing of `up` reaches `down`."""
    if up.id == down.id:
        return None
    total = None
    for hook, decoder in up.writes.items():
        scale = path_scale(scales, hook, down.read_hook)
        if scale is not None:
            w = (decoder * scale) @ down.encoder.T
            total = w if total is None else total + w
    return total
