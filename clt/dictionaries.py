"""SAEs, pairwise transcoders and multi-layer CLT layers as one shape: a `Dictionary`.

A `Dictionary` is a set of features with a raw-unit encoder on the hook it reads and raw-unit
decoders into the hooks it writes:
- a TopK SAE on hook h reads h and writes h (its reconstruction);
- a pairwise transcoder reads its source hook and writes its target hook;
- layer i of a multi-layer CLT reads encoder_layer_i.mlp_in and writes every mlp_out from layer i on.

`find_dictionaries` loads the ones a run has; feature labels (clt.feature_labels), the virtual weights
between dictionaries (clt.graph.weights) and the site (clt.site.export) all read them through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clt.model import CrossLayerTranscoder, load_transcoder
from clt.multilayer import MultiLayerTranscoder
from clt.pairs import LayerPair
from sae.hook_names import parse_layer_hook
from sae.model import TopKSAE, load_sae
from sae.runs import is_finished, newest_runs

Codes = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # cache {hook: [rows, d]} -> codes [rows, features]


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
