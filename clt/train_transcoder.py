"""Train a transcoder on one layer pair's paired activations.

    python -m clt.train_transcoder --run_dir tsp20_demo --pair clt_L1.mlp_in_to_L1.mlp_out --k 16

Streams the pair dump (train/validation split by instance), trains
`clt.model.CrossLayerTranscoder` (topk and batchtopk through the sparse kernel
of sae.sparse) and writes

    runs/<run>/clt/clt_runs/<pair>/<timestamp>/
        cfg.json  model.safetensors     the transcoder (load with clt.model.load_transcoder)
        train_cfg.json                  these settings and the dump used
        metrics.jsonl                   train/val loss, FVU, L0, dead features, cosine, usage histograms (also W&B)
        summary.json                    final validation metrics beside the pair's ridge baseline
        checkpoints/epoch_<N>.safetensors, checkpoints/train_state.pt

Validation FVU is measured on raw targets against the validation rows' own mean,
as clt.inspect_pairs measures the ridge baseline, and the two are printed side by side.
Ctrl-C or SIGTERM saves the exact position; `--resume` continues the newest run
of the pair (also after kill -9, from the last saved state) with the settings it
was started with, and ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from clt.config import MULTILAYER_ACTIVATIONS, CodeOptions, TranscoderOptions
from clt.datasets import (
    MULTILAYER,
    MultiLayerDataset,
    PairDataset,
    dump_name,
    layer_pair_names,
    pair_name,
    pair_path,
)
from clt.groups import head_blocks, init_head_groups_
from clt.metrics import group_activity, layer_reconstructions
from clt.model import CrossLayerTranscoder, Penalty, Transcoder, TranscoderConfig
from clt.multilayer import MultiLayerConfig, MultiLayerTranscoder
from clt.pair_stats import pair_ridge
from policy.checks import check_device, check_types
from policy.cli import command, explicit_options
from policy.distributed import (
    SINGLE_PROCESS,
    DistInfo,
    all_reduce_sum,
    broadcast_from_main,
    init_distributed,
    is_main_process,
    shutdown,
    synchronize,
)
from policy.io import read_json, write_json
from policy.loading import load_policy, read_config
from policy.logger import WANDB_MODES, RunLogger
from policy.options import choice, fields_of, options, resume_option
from policy.runs import check_name, lock_run, new_run_folder, release_run, resolve_run_dir, stored_path
from sae.model import init_seed, resolve_k
from sae.runs import clt_runs_dir, record_in_sweep, resume_dictionary_run
from sae.store import check_resumed_data, data_identity
from sae.trainer import DictionaryTrainer, adam

log = logging.getLogger(__name__)

INITS = ("random", "data")


MULTILAYER_BATCH, MULTILAYER_K, MULTILAYER_EXPANSION = 1024, 32, 4
"""The multi-layer CLT's defaults: rows per step, active features per layer and the expansion factor."""
K_START_FACTOR = 4
"""k at the first step is this many times k by default (with k_anneal > 0)."""
MULTILAYER_K_ANNEAL = 0.3
"""The multi-layer CLT's default k_anneal (a pairwise transcoder's is 0)."""
FIRST_LAYER_K_FACTOR = 2
"""The multi-layer CLT's first layer keeps this many times k by default: it reads the coordinate embedding, a
near-affine image of the two coordinates, and a quarter to a half of its k places go to dense features that carry
that affine part, leaving too few for the rest (docs/guide/transcoders.md, "Dead features")."""


@dataclass
class TranscoderTrainConfig(TranscoderOptions):
    """How to train a transcoder: the model's options (clt.config.TranscoderOptions) and the training's."""

    run_dir: str
    """Run folder, or a run name under runs/."""
    pair: str
    """Pair name (clt_L0_to_L1) or source:target hooks, as collected by clt.collect_pairs; `clt_multilayer`
    (or --multilayer) for a multi-layer CLT over every layer's mlp_in -> mlp_out pair."""
    condition: str | None = None
    """Train on the pair's dump collected under this condition (`<distribution>_n<nodes>_e<epoch>_seed<seed>`, the
    part after `__` of the names clt.collect_pairs prints) [default: the run's own condition]."""
    layer_weights: list[float] | None = None
    """Multi-layer only: weights of the per-layer FVUs in the loss [default: all 1]."""
    layer_k: list[int] | None = None
    """Multi-layer topk/batchtopk only: active features per row in each layer [default: k in every layer but the
    first, which keeps 2 x k]."""
    init: str = choice("random", INITS)
    """Encoder rows random, or pointed at source rows (data: fewer dead features, higher FVU)."""
    group_heads: bool = False
    """Group lasso with one feature group per attention head, for a pair whose target is an attention output
    (encoder_layer_<i>.attn_out, decoder.glimpse): group_size = features / heads, and group h's decoder rows
    start in head h's output space (clt.groups)."""
    lr: float | None = None
    """Adam learning rate, the peak (see lr_decay) [default: 32e-3 for a pairwise topk/batchtopk transcoder with
    unit decoder rows, the best of 8e-3 to 64e-3 on bench.quality's data sets taken together; 8e-3 with
    --decoder_init zero; 4e-3 otherwise (tied, relu, jumprelu, multi-layer: as before)]."""
    lr_decay: float = 0.3
    """Fraction of the training steps, at the end, over which the learning rate falls linearly to 0 (0: constant;
    the step count comes from num_epochs or num_tokens)."""
    k_start: int | None = None
    """topk/batchtopk: active features per row at the first step, falling linearly to k over the first k_anneal of
    the steps, so that every feature learns before the competition for the k places begins [default: 4 x k]."""
    k_anneal: float | None = None
    """Fraction of the training steps, at the start, over which k falls from k_start to k (0: k from the first
    step) [default: 0.3 for the multi-layer CLT, where it keeps nearly every feature alive; 0 for a pairwise
    transcoder, whose FVU it costs more (docs/guide/transcoders.md, "Dead features")]."""
    expansion_factor: int | None = field(default=None, kw_only=True)
    """Features = expansion_factor x the source width (per layer for a multi-layer CLT) [default: 8; 4 for the
    multi-layer CLT]."""
    batch_size: int | None = None
    """Rows per step [default: 4096; 1024 for the multi-layer CLT, which needs more steps than its dumps give at
    4096 (docs/guide/transcoders.md, "Defaults on real models")]."""
    num_epochs: int = 10
    """Passes over the training split (with --resume: the new total); ignored when num_tokens is set."""
    num_tokens: int | None = None
    """Training rows in all: a token budget instead of num_epochs."""
    val_ratio: float = 0.1
    """Fraction of instances held out for validation."""
    save_freq: int = 1
    """Checkpoint the weights every N epochs."""
    state_every: int = 50
    """Save the resumable training state every N steps too (0: at epoch ends only)."""
    log_weights: bool = False
    """Also log histograms of encoder/decoder row norms at every epoch end, and the weights themselves (each
    checkpoint, every save_freq epochs) as versions of the W&B model artifact `<pair>-weights` (offline: kept for
    `wandb sync`)."""
    log_every: int = 20
    """Log the training metrics (loss, FVU, L0, dead features) every this many steps; validation is logged every
    epoch."""
    seed: int = 0
    """Seeds the weights, the split and the batch order."""
    device: str = "cpu"
    """torch device (cpu, cuda, ...)."""
    activations_root: str | None = field(default=None, metadata={"envvar": "ACTIVATIONS_ROOT"})
    """Where pair dumps live if not in the run's registry."""
    sweep: str | None = None
    """Also list the finished run in <run>/clt/sweeps/<sweep>.json (train_clt.sh names one per call; clt.summarize
    and clt.site.export read it back with --sweep)."""
    wandb_project: str = "tsp-clt"
    """W&B project."""
    wandb_run_name: str | None = None
    """W&B run name [default: <run>/<pair>/<timestamp>]."""
    wandb_mode: str = choice("auto", WANDB_MODES)
    """W&B mode; auto = offline without credentials."""
    penalties: list[Penalty] = field(default_factory=list, repr=False, compare=False, metadata={"cli": False})
    """Extra loss terms penalty(model, output) (orthogonality, energy, ...); not saved, library use only."""

    def __post_init__(self):
        if self.expansion_factor is None:
            self.expansion_factor = MULTILAYER_EXPANSION if self.pair == MULTILAYER else 8
        super().__post_init__()
        if self.lr is None:
            topk = self.activation in ("topk", "batchtopk") and not self.tied and self.pair != MULTILAYER
            self.lr = 4e-3 if not topk else 32e-3 if self.decoder_init == "random" else 8e-3
        if self.batch_size is None:
            self.batch_size = MULTILAYER_BATCH if self.pair == MULTILAYER else 4096
        if self.k_anneal is None:
            self.k_anneal = MULTILAYER_K_ANNEAL if self.pair == MULTILAYER else 0.0
        check_types(self)
        check_device(self.device)
        if not 0 <= self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in [0, 1], got {self.lr_decay}")
        if not 0 <= self.k_anneal < 1 or (self.k_start is not None and self.k_start < 1):
            raise ValueError("k_anneal must be in [0, 1) and k_start positive")
        if self.lr <= 0 or self.batch_size < 1 or self.num_epochs < 1 or self.save_freq < 1 or self.state_every < 0:
            raise ValueError("lr, batch_size, num_epochs and save_freq must be positive, state_every >= 0")
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}")
        if self.sweep is not None:
            check_name(self.sweep, "sweep name")  # before training, not when the finished run is recorded
        if self.num_tokens is not None and self.num_tokens < 1:
            raise ValueError("num_tokens must be positive")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.group_coef and self.group_size is None and not self.group_heads:
            raise ValueError("--group_coef needs --group_size or --group_heads")
        if self.pair != MULTILAYER and (self.layer_k is not None or self.layer_weights is not None):
            raise ValueError("--layer_k and --layer_weights are for the multi-layer CLT (--multilayer)")
        if self.group_heads and self.pair == MULTILAYER:
            raise ValueError("--group_heads is for a pair whose target is an attention output")

    def model_config(self, d_in: int, d_out: int) -> TranscoderConfig:
        return TranscoderConfig(d_in, d_out, **fields_of(self, TranscoderOptions))

    def multilayer_config(self, n_layers: int, d: int) -> MultiLayerConfig:
        pairwise_only = (self.tied or self.skip or self.init != "random" or self.l1_coef or self.dictionary_coef
                         or self.group_coef or self.group_size)  # fmt: skip
        if self.activation not in MULTILAYER_ACTIVATIONS or pairwise_only:
            raise ValueError(f"the multi-layer transcoder trains {' or '.join(MULTILAYER_ACTIVATIONS)} features, "
                             "untied, without skip, --init data, L1, group lasso or a dictionary penalty")  # fmt: skip
        code = fields_of(self, CodeOptions)
        features = d * self.expansion_factor
        layer_k = self.layer_k
        if self.activation in ("topk", "batchtopk"):
            if self.k is None and self.k_ratio is None:
                code["k"] = min(MULTILAYER_K, features)
            if layer_k is None:
                k = resolve_k(code["k"], code["k_ratio"], features)
                layer_k = [min(FIRST_LAYER_K_FACTOR * k, features)] + [k] * (n_layers - 1)
        return MultiLayerConfig(n_layers=n_layers, d=d, layer_weights=self.layer_weights, layer_k=layer_k,
                                sparsity_coef=self.l0_coef, **code)  # fmt: skip

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "penalties"}


def evaluate(model: Transcoder, data: PairDataset | MultiLayerDataset) -> tuple[dict, np.ndarray]:
    """Validation metrics on raw targets (val/fvu, val/l0, ...; per layer val/fvu_L<i>, ... for a multi-layer
    transcoder, whose val/fvu is the mean over layers and val/l0 the sum), and how often each feature fired."""
    if data.val is None:
        return {}, np.zeros(0)
    layers = layer_reconstructions(model, data.val_batches())
    keep = ("fvu", "mse", "l0", "dead_fraction", "dense_fraction", "effective_features", "cosine", "r2_per_dim_mean")
    per_layer = [{k: v for k, v in r.summary().items() if k in keep} for r in layers]
    frequency = np.concatenate([r.frequency for r in layers])
    if len(layers) == 1:
        metrics = {f"val/{k}": v for k, v in per_layer[0].items()}
        if getattr(model.cfg, "group_size", None):
            metrics.update({f"val/{k}": v for k, v in group_activity(model, data.val_batches()).items()})
        return metrics, frequency
    metrics = {f"val/{k}": float(np.mean([m[k] for m in per_layer])) for k in keep}
    metrics["val/l0"] = sum(m["l0"] for m in per_layer)
    metrics.update({f"val/{k}_L{i}": m[k] for i, m in enumerate(per_layer)
                    for k in ("fvu", "l0", "dead_fraction", "dense_fraction", "effective_features")})  # fmt: skip
    return metrics, frequency


class TranscoderTrainer(DictionaryTrainer):
    """Transcoder steps on one pair's stream."""

    def __init__(
        self,
        cfg: TranscoderTrainConfig,
        out_dir: Path,
        model: Transcoder,
        data: PairDataset,
        val_data: PairDataset | None = None,
        dist: DistInfo = SINGLE_PROCESS,
    ):
        steps = data.train.steps_per_epoch
        max_steps = math.ceil(cfg.num_tokens / cfg.batch_size) if cfg.num_tokens else None
        num_epochs = math.ceil(max_steps / steps) if max_steps else cfg.num_epochs
        super().__init__(out_dir, num_epochs, cfg.save_freq, log_every=cfg.log_every, state_every=cfg.state_every,
                         max_steps=max_steps, desc=cfg.pair)  # fmt: skip
        self.cfg, self.model, self.data, self.val_data, self.dist = cfg, model, data, val_data or data, dist
        self.is_main = dist.is_main
        self.forward = None
        if dist.enabled:
            device_ids = [model.b_dec.device.index] if model.b_dec.device.type == "cuda" else None
            self.forward = DistributedDataParallel(TrainingForward(model), device_ids=device_ids)
        self.steps_per_epoch = steps
        self.device = model.b_dec.device
        self.optimizer = adam(model.parameters(), cfg.lr)
        self.total_steps = max_steps or num_epochs * steps
        self.rows_since_fired = torch.zeros(model.feature_count, dtype=torch.long, device=self.device)
        self.k_start = k_schedule_start(cfg, model.cfg)
        self.logger: RunLogger | None = None
        self.weights_artifact = f"{cfg.pair}-weights" if cfg.log_weights else None

    def batches(self, epoch: int, start_step: int):
        return ((x.to(self.device), y.to(self.device)) for x, y in self.data.train_batches(epoch, start_step))

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        step = self.position.global_step
        lr = self.cfg.lr * lr_factor(step, self.total_steps, self.cfg.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        k = None
        if self.k_start is not None:
            k = k_at(step, self.total_steps, self.model.cfg.active, self.k_start, self.cfg.k_anneal)
        stats = train_step(self.model, self.optimizer, *batch, self.rows_since_fired, self.cfg.penalties, self.dist,
                           self.forward, k)  # fmt: skip
        if stats is None:
            self._raise_not_finite(batch)
        return {**stats, "lr": lr} if k is None else {**stats, "lr": lr, "k": k}

    def _raise_not_finite(self, batch) -> None:
        p = self.position
        where = f"epoch {p.epoch + 1}, step {p.step + 1}"
        for side, tensor in zip(("sources", "targets"), batch, strict=True):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"NaN or Inf in the pair's {side} at {where}: the dump is corrupt; collect it again")
        raise ValueError(f"the loss became NaN or Inf at {where}: lower --lr (now {self.cfg.lr})")

    def validate(self) -> dict[str, float]:
        if not self.is_main:
            return {}
        metrics, frequency = evaluate(self.model, self.val_data)
        if self.logger is not None and len(frequency):
            histograms = {"val/log10_feature_frequency": np.log10(frequency + 1e-7)}
            if self.cfg.log_weights:
                encoder, decoder = self.model.row_norms()
                histograms["weights/encoder_row_norm"] = encoder.cpu().numpy()
                histograms["weights/decoder_row_norm"] = decoder.cpu().numpy()
            self.logger.log_histograms(histograms, step=self.position.global_step)
        return metrics


def k_schedule_start(cfg: TranscoderTrainConfig, model_cfg) -> int | None:
    """The k of the first step (None: no schedule, for jumprelu, relu or k_anneal 0)."""
    if model_cfg.activation not in ("topk", "batchtopk") or cfg.k_anneal == 0:
        return None
    k, features = model_cfg.active, model_cfg.n_features
    start = min(K_START_FACTOR * k, features) if cfg.k_start is None else cfg.k_start
    if not k <= start <= features:
        raise ValueError(f"k_start must be in [k, features] = [{k}, {features}], got {start}")
    return start


def k_at(step: int, total_steps: int, k: int, k_start: int, anneal: float) -> int:
    """Active features per row at `step` (0-based) of `total_steps`: k_start, falling linearly to k over the first
    `anneal` of the steps, then k."""
    steps = anneal * total_steps
    done = 1.0 if steps <= 0 else min(1.0, step / steps)
    return round(k_start + (k - k_start) * done)


def lr_factor(step: int, total_steps: int, decay: float) -> float:
    """The learning rate at `step` (0-based) of `total_steps`, as a fraction of the peak: 1, then a linear fall
    over the last `decay` of the steps (warmup-stable-decay without the warmup, which bench.quality did not need)."""
    decay_steps = decay * total_steps
    if decay_steps <= 0:
        return 1.0
    return min(1.0, (total_steps - step) / decay_steps)


class TrainingForward(nn.Module):
    """The training forward pass (sparse codes, prediction, AuxK) as a module, so that DDP can wrap it."""

    def __init__(self, model: Transcoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor, with_aux: bool = True,
                k: int | None = None):  # fmt: skip
        out = self.model.forward_train(x, k=k)
        aux = self.model.aux_loss(x, y, out, dead) if with_aux else x.new_zeros(())
        return out, aux


def train_step(
    model: Transcoder,
    optimizer: torch.optim.Optimizer,
    x_raw: torch.Tensor,
    y_raw: torch.Tensor,
    rows_since_fired: torch.Tensor,
    penalties: list[Penalty] | tuple = (),
    dist: DistInfo = SINGLE_PROCESS,
    forward: nn.Module | None = None,
    k: int | None = None,
) -> dict[str, float] | None:
    """One step on raw (x_src, x_tgt): FVU + AuxK + sparsity (+ penalties); None if the loss is not finite.
    topk and batchtopk keep k features per row (default the model's k; the trainer's schedule passes its own).

    The loss is measured in the model's normalised target space; `rows_since_fired` [features]
    is updated in place; unit-norm decoder rows get their parallel gradient removed and are renormalised.
    Under DDP (`forward` is the DDP-wrapped TrainingForward, `dist` this rank) each rank holds a slice
    of the global batch: the variance comes from the whole batch, each rank's terms are weighted so
    that DDP's gradient average equals the one-process gradient, and AuxK runs on rank 0's rows
    (the first rows of the global batch, as in one process). `penalties` are added on every rank.
    """
    x, y = model.normalize_source(x_raw), model.normalize_target(y_raw)
    layered = y.dim() == 3  # a multi-layer transcoder: [layer, batch, d], one FVU per layer, summed
    y3 = y if layered else y[None]
    local_rows = y3.shape[1]
    dead = rows_since_fired > model.cfg.dead_tokens
    moments = torch.cat([y3.new_full((len(y3), 1), local_rows), y3.sum(1), y3.pow(2).sum((1, 2))[:, None]], dim=1)
    moments = all_reduce_sum(moments.double(), dist)  # [layer, 1 + d + 1] over the global batch
    rows = moments[0, 0].item()
    variance = ((moments[:, -1] - moments[:, 1:-1].pow(2).sum(1) / rows) / rows).clamp_min(1e-12).float()  # [layer]
    out, aux = (forward or TrainingForward(model))(x, y, dead, with_aux=dist.is_main, k=k)
    err_sum = ((out.y_hat if layered else out.y_hat[None]) - y3).pow(2).sum((1, 2))  # [layer]
    weight = dist.world_size / rows  # DDP averages gradients over ranks
    fvu_terms = err_sum / variance if model.layer_weights is None else model.layer_weights * err_sum / variance
    loss = weight * fvu_terms.sum() + weight * local_rows * model.sparsity_loss(out) + model.dictionary_loss()
    if model.cfg.align_coef:  # 1 - cos(prediction, target) per row, in the normalised target space
        cos = F.cosine_similarity(out.y_hat if layered else out.y_hat[None], y3, dim=-1)  # [layer, batch]
        loss = loss + weight * model.cfg.align_coef * (1 - cos).sum()
    loss = loss + dist.world_size * model.cfg.aux_coef * aux
    for penalty in penalties:
        loss = loss + penalty(model, out)
    if not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if model.unit_norm_decoder:
        model.remove_parallel_gradient()  # keep the step tangent to the unit rows
    optimizer.step()
    if model.unit_norm_decoder:
        model.normalize_decoder()
    fired = out.fired(model.cfg.n_features).double()
    counts = torch.cat([err_sum.detach().double(), fired.new_tensor([out.l0() * local_rows]), fired])
    counts = all_reduce_sum(counts, dist)
    rows_since_fired += int(rows)
    rows_since_fired[counts[len(y3) + 1 :] > 0] = 0
    fvu = (counts[: len(y3)] / rows / variance.double()).tolist()
    stats = {"loss": loss.item(), "fvu": sum(fvu) / len(fvu), "aux_loss": aux.item(),
             "l0": counts[len(y3)].item() / rows, "dead_fraction": dead.float().mean().item()}  # fmt: skip
    if layered:
        stats.update({f"fvu_L{i}": v for i, v in enumerate(fvu)})
    if getattr(model.cfg, "group_size", None):  # this rank's rows
        active = out.group_energy(model.cfg.group_size, model.cfg.n_groups) > 0  # [batch, groups]
        stats["group_l0"] = active.sum(1).float().mean().item()
    return stats


RESUMABLE = ("num_epochs", "num_tokens", "save_freq", "state_every", "log_every", "log_weights", "device", "sweep",
             "wandb_project", "wandb_run_name", "wandb_mode")  # fmt: skip
"""What a resumed transcoder run may change; everything else is read from its train_cfg.json."""


def run(cfg: TranscoderTrainConfig, resume: bool = False, explicit: tuple[str, ...] = ()) -> Path:
    """Train (or resume) a transcoder on one pair; returns its run folder. Under torchrun, one rank of DDP.

    With `resume`, the newest run of the pair continues with its saved settings; the fields of `cfg` named in
    `explicit` (only those in RESUMABLE) replace them. A finished run continues only to a longer budget.
    """
    info, cfg.device = init_distributed(cfg.device)
    try:
        out_dir = _run(cfg, resume, info, explicit)
        synchronize(info)  # rank 0 writes its files after training; the others wait for it before leaving
        return out_dir
    finally:
        shutdown(info)


def _run(cfg: TranscoderTrainConfig, resume: bool, info: DistInfo, explicit: tuple[str, ...]) -> Path:
    run_dir = resolve_run_dir(cfg.run_dir)
    cfg.pair = pair_name(run_dir, cfg.pair)
    pair_dir = clt_runs_dir(run_dir, cfg.pair)
    out_dir, legacy = None, False
    if resume:
        out_dir, cfg = resume_dictionary_run(pair_dir, TranscoderTrainConfig, cfg.to_json(), explicit, RESUMABLE,
                                             budget=("num_epochs", "num_tokens"), penalties=cfg.penalties)  # fmt: skip
        legacy = "k_anneal" not in read_json(out_dir / "train_cfg.json")
        if legacy:  # started before the k schedule and per-layer k: it goes on as it started
            cfg.k_anneal = 0.0
        if info.is_main:
            lock_run(out_dir)
    root = Path(cfg.activations_root) if cfg.activations_root else None
    split = (cfg.batch_size, cfg.val_ratio, cfg.seed)
    if cfg.pair == MULTILAYER:
        n_layers = read_config(run_dir).policy.num_encoder_layers
        paths = [pair_path(run_dir, dump_name(name, cfg.condition), root) for name in layer_pair_names(n_layers)]
        data = MultiLayerDataset(paths, *split, rank=info.rank, world_size=info.world_size)
        val_data = MultiLayerDataset(paths, *split) if info.enabled else data
        if legacy and cfg.layer_k is None and cfg.activation in ("topk", "batchtopk"):
            cfg.layer_k = [cfg.multilayer_config(n_layers, data.d).active] * n_layers  # one k in every layer
        model_cfg = cfg.multilayer_config(n_layers, data.d)
        torch.manual_seed(init_seed(f"clt/{cfg.pair}/{model_cfg}", cfg.seed))
        model = MultiLayerTranscoder(model_cfg)
        model.set_statistics(*data.statistics())
    else:
        path = pair_path(run_dir, dump_name(cfg.pair, cfg.condition), root)
        data = PairDataset(path, *split, rank=info.rank, world_size=info.world_size)
        val_data = PairDataset(path, *split) if info.enabled else data
        blocks = None
        if cfg.group_heads:
            blocks = head_blocks(load_policy(run_dir, data.dump.metadata["checkpoint_epoch"]).model,
                                 data.dump.metadata["target_hook"])  # fmt: skip
            cfg.group_size = data.d_src * cfg.expansion_factor // len(blocks)
        model_cfg = cfg.model_config(data.d_src, data.d_tgt)
        seed = init_seed(f"clt/{cfg.pair}/{model_cfg}", cfg.seed)
        torch.manual_seed(seed)
        model = CrossLayerTranscoder(model_cfg)
        sides = (("src_cov", "sources", model_cfg.normalize_source), ("tgt_cov", "targets", model_cfg.normalize_target))
        covariances = {key: data.dump.covariance(side) for key, side, mode in sides if mode == "whiten"}
        model.set_statistics(*data.dump.stats("sources"), *data.dump.stats("targets"), **covariances)
        if blocks is not None and not resume:
            init_head_groups_(model, blocks)
        if cfg.init == "data" and not resume:
            model.init_encoder_from(next(val_data.train_batches(0))[0], torch.Generator().manual_seed(seed))
    k_schedule_start(cfg, model.cfg)  # a k_start out of range stops here, before a run folder is made
    dumps = val_data.dumps if isinstance(val_data, MultiLayerDataset) else [val_data.dump]
    if info.is_main:
        for dump in dumps:
            log.info("training on %s", dump.describe())
        if resume:
            check_resumed_data(out_dir, dumps)
    if out_dir is None:  # made once the data and the model are ready: a run that cannot start leaves no folder
        out_dir = broadcast_from_main(lock_run(new_run_folder(pair_dir)) if info.is_main else None, info)
    model.to(cfg.device)
    trainer = TranscoderTrainer(cfg, out_dir, model, data, val_data, info)
    if resume:
        trainer.resume(cfg.device)
    if info.is_main:
        datasets = [data_identity(dump) for dump in dumps]
        saved = {**cfg.to_json(), "dataset_path": stored_path(run_dir, data.dump.path), "datasets": datasets}
        write_json(out_dir / "train_cfg.json", saved)
    logger = None
    if info.is_main:
        run_name = cfg.wandb_run_name or f"{run_dir.name}/{cfg.pair}/{out_dir.name}"
        logger = RunLogger(out_dir, cfg.wandb_project, run_name, cfg.to_json(), cfg.wandb_mode, trainer.wandb_run_id)
        trainer.logger = logger
    try:
        trainer.fit(logger)
    finally:
        trainer.forward = None  # the DDP wrapper goes before its process group does
        if logger is not None:
            logger.finish()
    if info.is_main:
        metrics, _ = evaluate(model, val_data)
        ridges = [(pair_ridge(d, cfg.val_ratio, cfg.seed) or {}).get("fvu") for d in dumps]
        summary = {"pair": cfg.pair, "features": model.feature_count, "k": model.cfg.active,
                   **({"layer_k": model.cfg.ks} if cfg.pair == MULTILAYER else {}),
                   "activation": cfg.activation, "steps": trainer.position.global_step, "ranks": info.world_size,
                   **metrics, "ridge_val_fvu": float(np.mean(ridges)) if None not in ridges else None}  # fmt: skip
        if len(ridges) > 1:
            summary.update({f"ridge_val_fvu_L{i}": r for i, r in enumerate(ridges)})
        summary["wandb"] = logger.info  # which W&B run this is (also in wandb.json)
        write_json(out_dir / "summary.json", summary)
        model.save(out_dir)  # last: model.safetensors marks a finished run (sae.runs.is_finished)
        if cfg.sweep:
            record_in_sweep(run_dir, cfg.sweep, out_dir)
        release_run(out_dir)
    return out_dir


def format_summary(summary: dict) -> str:
    ridge = summary.get("ridge_val_fvu")
    line = f"{summary['pair']}: validation FVU {summary.get('val/fvu', float('nan')):.4f}"
    line += f" (L0 {summary.get('val/l0', 0):.1f}, dead {summary.get('val/dead_fraction', 0):.1%})"
    if ridge is not None:
        line += f" vs ridge baseline {ridge:.4f}"
    return line


@click.command()
@options(TranscoderTrainConfig, pair={"required": False, "default": None})
@click.option("--multilayer", is_flag=True, help="Train a multi-layer CLT on every layer's mlp_in -> mlp_out pair.")
@resume_option("the newest run of --pair", "--num_epochs or --num_tokens")
def main(resume, multilayer, **settings):
    """Train a sparse transcoder from a pair's source activations to its target activations,
    or (--multilayer) a cross-layer transcoder over every layer's feed-forward block."""
    with command():
        if multilayer == (settings["pair"] is not None):
            raise click.UsageError("give --pair, or --multilayer")
        cfg = TranscoderTrainConfig(**{**settings, "pair": settings["pair"] or MULTILAYER})
        out_dir = run(cfg, resume=resume, explicit=tuple(explicit_options() - {"multilayer"}))
    if is_main_process():
        click.echo(format_summary(read_json(out_dir / "summary.json")))
        click.echo(f"transcoder saved in {out_dir}")


if __name__ == "__main__":
    main()
