"""The replacement of every encoder feed-forward block that an attribution graph is traced through.

Either a multi-layer CLT (clt.multilayer: layer i's features read mlp_in_i and write into mlp_out_m for every
m >= i) or one `mlp_in -> mlp_out` transcoder per layer (features write into their own layer only). Both are
seen through one interface, in raw activation units:

    pre_i  = mlp_in_i @ encoder(i)[0].T + encoder(i)[1]          [node, features]  (a feature's pre-activation)
    z_i    = codes(i, mlp_in_i)                                  the transcoder's own selection: z = pre where active
    y_m    = decoder_bias(m) + sum_{i <= m} z_i @ decoder(i, m)  the prediction of mlp_out_m

and, optionally, the decoder's glimpse at the decision's step: a `decoder.context -> decoder.glimpse` transcoder
(clt.collect_pairs' decoder pair), whose features read the step's context and write the glimpse
(`glimpse_encoder`, `glimpse_codes`, `glimpse_decoder`, `glimpse_bias`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from clt.datasets import MULTILAYER, pair_name, training_dump
from clt.model import CrossLayerTranscoder, load_transcoder
from clt.multilayer import MultiLayerTranscoder
from clt.normalization import denormalize
from policy.io import read_json
from policy.loading import read_config
from sae.runs import newest_finished

log = logging.getLogger(__name__)

GLIMPSE_PAIR = "clt_dec.context_to_dec.glimpse"
"""The pair a glimpse transcoder is trained on (decoder.context -> decoder.glimpse)."""


@dataclass
class Replacement:
    """Every encoder layer's feed-forward replacement: a multi-layer CLT (`multilayer`) or per-layer transcoders."""

    kind: str  # "multilayer" or "per_layer"
    folders: list[Path]  # the transcoder run folder(s)
    models: list[CrossLayerTranscoder | MultiLayerTranscoder]  # one multi-layer CLT, or one transcoder per layer
    checkpoint_epoch: int | None  # the policy epoch the transcoders were trained on, when their dumps say
    glimpse: CrossLayerTranscoder | None = None  # decoder.context -> decoder.glimpse, when the graph includes it
    glimpse_folder: Path | None = None

    def __post_init__(self):
        for model in [*self.models, *([self.glimpse] if self.glimpse is not None else [])]:
            if isinstance(model, CrossLayerTranscoder) and model.W_skip is not None:
                raise ValueError("attribution through a transcoder with a skip path is not supported")

    @property
    def n_layers(self) -> int:
        return self.models[0].cfg.n_layers if self.kind == "multilayer" else len(self.models)

    @property
    def n_features(self) -> int:  # per layer
        return self.models[0].cfg.n_features

    def dictionary_ids(self) -> list[str]:
        """Per layer, the id its features have on the site (clt.dictionaries.Dictionary.id)."""
        if self.kind == "multilayer":
            ids = [f"clt/{self.folders[0].parent.name}/L{i}" for i in range(self.n_layers)]
        else:
            ids = [f"clt/{f.parent.name}" for f in self.folders]
        return ids + ([f"clt/{GLIMPSE_PAIR}"] if self.glimpse is not None else [])  # the glimpse: "layer" n_layers

    @property
    def id(self) -> str:
        """What identifies the replacement in a graph: its run folder(s), relative to the runs folder."""
        folders = [*self.folders, *([self.glimpse_folder] if self.glimpse_folder is not None else [])]
        return "+".join("/".join(f.parts[-5:]) for f in folders)

    def _model(self, layer: int) -> CrossLayerTranscoder | MultiLayerTranscoder:
        return self.models[0] if self.kind == "multilayer" else self.models[layer]

    @torch.no_grad()
    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [features, d], bias [features]) with pre-activation = raw mlp_in @ rows.T + bias."""
        model = self._model(layer)
        if self.kind == "multilayer":
            return _reading_raw(model.raw_encoder(layer), model.b_enc[layer], model.src_mean[layer], model.cfg)
        return _reading_raw(model.raw_encoder(), model.b_enc, model.src_mean, model.cfg)

    @torch.no_grad()
    def decoder(self, source: int, target: int) -> torch.Tensor | None:
        """[features, d]: what layer `source`'s features write into raw mlp_out of `target` (None: nothing)."""
        if target < source or (self.kind == "per_layer" and target != source):
            return None
        if self.kind == "multilayer":
            return self.models[0].raw_decoder(source, target)
        return self.models[source].raw_decoder()

    @torch.no_grad()
    def decoder_bias(self, target: int) -> torch.Tensor:
        """[d]: the prediction of raw mlp_out of `target` when no feature is active."""
        model = self._model(target)
        if self.kind == "multilayer":
            b, mean, std = model.b_dec[target], model.tgt_mean[target], model.tgt_std[target]
            return denormalize(b.detach(), mean, std, model.cfg.normalize_target)
        return model.denormalize_target(model.b_dec.detach())  # (whitening included)

    @torch.no_grad()
    def codes(self, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
        """Raw mlp_in of `layer` [node, d] -> that layer's codes [node, features] (the transcoder's own selection)."""
        model = self._model(layer)
        if self.kind == "multilayer":
            return model.encode_layer(layer, mlp_in)
        return model.encode(mlp_in)

    def predict(self, target: int, codes: list[torch.Tensor]) -> torch.Tensor:
        """Raw mlp_out of `target` [..., node, d] from the codes of layers 0..target (a list of [..., node,
        features]); differentiable in the codes (the weights are constants)."""
        y = self.decoder_bias(target).expand(*codes[0].shape[:-1], -1)
        for i in range(target + 1):
            w = self.decoder(i, target)
            if w is not None:
                y = y + codes[i] @ w
        return y

    # the glimpse ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def glimpse_encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [features, d], bias [features]) with pre-activation = raw decoder.context @ rows.T + bias."""
        model = self.glimpse
        return _reading_raw(model.raw_encoder(), model.b_enc, model.src_mean, model.cfg)

    @torch.no_grad()
    def glimpse_codes(self, context: torch.Tensor) -> torch.Tensor:
        """Raw decoder.context [rows, d] -> the glimpse transcoder's codes [rows, features]."""
        return self.glimpse.encode(context)

    @torch.no_grad()
    def glimpse_decoder(self) -> torch.Tensor:
        """[features, d]: what each glimpse feature writes into the raw glimpse."""
        return self.glimpse.raw_decoder()

    @torch.no_grad()
    def glimpse_bias(self) -> torch.Tensor:
        """[d]: the predicted raw glimpse when no feature is active."""
        return self.glimpse.denormalize_target(self.glimpse.b_dec.detach())

    def to(self, device: str | torch.device) -> Replacement:
        self.models = [m.to(device) for m in self.models]
        self.glimpse = self.glimpse.to(device) if self.glimpse is not None else None
        return self


def _reading_raw(rows: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, cfg) -> tuple[torch.Tensor, ...]:
    """(rows, bias) with pre-activation = raw source @ rows.T + bias: a normalised source's mean moves into the
    bias ((x - mean) @ rows.T)."""
    if cfg.normalize_source != "none":
        bias = bias - rows @ mean
    return rows, bias.detach()


def load_replacement(
    run_dir: Path, clt_dir: str | Path | None = None, glimpse: str | Path | None = None
) -> Replacement:
    """The replacement to trace a run's decisions through.

    `clt_dir`: a multi-layer CLT run folder. Without it, the run's newest finished multi-layer CLT when it has one,
    else the newest `encoder_layer_i.mlp_in -> encoder_layer_i.mlp_out` transcoder of every layer. `glimpse`: a
    `decoder.context -> decoder.glimpse` transcoder folder, or `newest` for the run's newest (None: no glimpse).
    """
    if clt_dir is not None:
        folders = [Path(clt_dir)]
    else:
        try:
            folders = [newest_finished(run_dir, "clt", MULTILAYER)]
        except FileNotFoundError:
            n = read_config(run_dir).policy.num_encoder_layers
            pairs = [pair_name(run_dir, f"encoder_layer_{i}.mlp_in:encoder_layer_{i}.mlp_out") for i in range(n)]
            try:
                folders = [newest_finished(run_dir, "clt", p) for p in pairs]
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"{run_dir} has no multi-layer CLT (python -m clt.train_transcoder --run_dir {run_dir} "
                    f"--multilayer) and not every layer's mlp_in -> mlp_out transcoder ({err})"
                ) from None
    for folder in folders:
        if not (folder / "cfg.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} is not a finished transcoder run (cfg.json, model.safetensors)")
    models = [load_transcoder(f) for f in folders]
    if clt_dir is not None and not isinstance(models[0], MultiLayerTranscoder):
        raise ValueError(f"{clt_dir} is a pairwise transcoder: --clt takes a multi-layer CLT run folder")
    kind = "multilayer" if isinstance(models[0], MultiLayerTranscoder) else "per_layer"
    glimpse_folder = _glimpse_folder(run_dir, glimpse) if glimpse is not None else None
    glimpse_model = load_transcoder(glimpse_folder) if glimpse_folder is not None else None
    return Replacement(kind, folders, models, _trained_epoch(folders[0]), glimpse_model, glimpse_folder)


def _glimpse_folder(run_dir: Path, glimpse: str | Path) -> Path:
    """The glimpse transcoder's folder, checked to be one: finished, and trained on the decoder's glimpse pair."""
    folder = newest_finished(run_dir, "clt", GLIMPSE_PAIR) if str(glimpse) == "newest" else Path(glimpse)
    if not (folder / "model.safetensors").is_file() or not (folder / "train_cfg.json").is_file():
        raise FileNotFoundError(f"{folder} is not a finished transcoder run (train_cfg.json, model.safetensors)")
    pair = read_json(folder / "train_cfg.json").get("pair")
    if pair != GLIMPSE_PAIR:
        raise ValueError(f"{folder} was trained on {pair}, not on the glimpse pair {GLIMPSE_PAIR} "
                         "(python -m clt.collect_pairs --layer_pairs decoder.context:decoder.glimpse)")  # fmt: skip
    return folder


def _trained_epoch(folder: Path) -> int | None:
    """The policy epoch a transcoder's training dump was collected from; None when the dump is gone."""
    try:
        return training_dump(folder, read_json(folder / "train_cfg.json"))[1].metadata["checkpoint_epoch"]
    except (FileNotFoundError, KeyError, ValueError) as err:
        log.warning(
            "cannot read the policy epoch %s was trained on (%s): using the run's latest checkpoint", folder, err
        )
        return None
