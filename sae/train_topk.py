"""Train a TopK SAE on one hook's activation dump.

    python -m sae.train_topk --run_dir tsp20_demo --hook encoder_layer_1 --expansion_factor 8 --k 16

Reads the newest registered dump that holds the hook (or `--dataset`), splits
it by instance into train and validation, and writes

    runs/<run>/sae/sae_runs/<hook>/<timestamp>/
        cfg.json  model.safetensors      the SAE (load with sae.model.load_sae)
        train_cfg.json                   these settings, and the dataset used
        metrics.jsonl                    train and validation MSE, FVU, L0, dead fraction (also W&B)
        checkpoints/epoch_<N>.safetensors, checkpoints/train_state.pt

Ctrl-C or SIGTERM saves the exact position; `--resume` continues the newest run of the hook
(sae.runs.resume_folder) with the settings it was started with.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch

from policy.checks import check_device, check_types
from policy.cli import command, explicit_options
from policy.io import write_json
from policy.logger import WANDB_MODES, RunLogger
from policy.options import choice, fields_of, options, resume_option
from policy.runs import lock_run, new_run_folder, release_run, resolve_run_dir, stored_path
from sae.data import RowStream, split_instances
from sae.metrics import ReconstructionTotals
from sae.model import SAEConfig, SAEOptions, TopKSAE, init_seed
from sae.registry import read_registry, registered_dump
from sae.runs import resume_dictionary_run, sae_runs_dir
from sae.store import Dump, check_resumed_data, data_identity
from sae.trainer import DictionaryTrainer, adam

log = logging.getLogger(__name__)


@dataclass
class SAETrainConfig(SAEOptions):
    """How to train a TopK SAE: the model's options (sae.model.SAEOptions) and the training's."""

    run_dir: str
    """Run folder, or a run name under runs/."""
    hook: str
    """Hook whose activations the SAE reconstructs (e.g. encoder_layer_1)."""
    dataset: str | None = None
    """Registered dump to read [default: the newest one holding the hook]."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 1024
    """Rows per step."""
    num_epochs: int = 10
    """Passes over the training split (with --resume: the new total)."""
    val_ratio: float = 0.1
    """Fraction of instances held out for validation."""
    save_freq: int = 1
    """Save a checkpoint every this many epochs."""
    log_every: int = 20
    """Log the training metrics (loss, FVU, L0) every this many steps; validation is logged every epoch."""
    seed: int = 0
    """Seeds the weights, the split and the batch order."""
    device: str = "cpu"
    """torch device (cpu, cuda, ...)."""
    wandb_project: str = "tsp-sae"
    """W&B project."""
    wandb_run_name: str | None = None
    """W&B run name [default: <run>/<hook>/<timestamp>]."""
    wandb_mode: str = choice("auto", WANDB_MODES)
    """W&B mode; auto = offline without credentials."""

    def __post_init__(self):
        super().__post_init__()
        check_types(self)
        check_device(self.device)
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}")
        if self.lr <= 0 or self.batch_size < 1 or self.num_epochs < 1 or self.save_freq < 1:
            raise ValueError("lr, batch_size, num_epochs and save_freq must be positive")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}")

    def sae_config(self, d_in: int) -> SAEConfig:
        return SAEConfig(d_in=d_in, **fields_of(self, SAEOptions))


def find_dump(run_dir: Path, hook: str, dataset: str | None) -> tuple[str, Dump]:
    """The named dump, or the newest registered one that holds `hook`."""
    registry = read_registry(run_dir)
    if dataset is not None:
        if dataset not in registry:
            raise FileNotFoundError(
                f"no dataset {dataset!r} in {run_dir}'s registry; known: {sorted(registry) or 'none'}"
            )
        candidates = [dataset]
    else:
        candidates = [n for n, e in registry.items() if e.get("kind") == "sae"]
    found = []
    for name in candidates:
        if dataset is None and not Path(registry[name]["path"]).exists():
            log.warning("skipping the registry entry %r: its dump %s no longer exists", name, registry[name]["path"])
            continue
        dump = registered_dump(run_dir, name, registry[name])
        if hook in dump.arrays:
            found.append((dump.metadata["created"], name, dump))
    if not found:
        raise FileNotFoundError(
            f"no registered activation dump of {run_dir} holds {hook!r}; collect one with "
            f"python -m sae.collect_activations --run_dir {run_dir} --hooks {hook}"
        )
    _, name, dump = max(found, key=lambda item: item[:2])
    return name, dump


@torch.no_grad()
def evaluate(model: TopKSAE, stream: RowStream, hook: str) -> dict:
    """Validation MSE, FVU, L0 and the fraction of latents that never fire (sae.metrics: FVU against the
    validation rows' own mean, as for transcoders)."""
    totals = ReconstructionTotals()
    device = model.b_dec.device
    for batch in stream.epoch(0):
        x = batch[hook].to(device)
        out = model(x)
        z = torch.zeros_like(out.pre).scatter_(1, out.indices, out.values)
        totals.add(x[None], out.x_hat[None], z[None])
    result = totals.result()[0]
    summary = result.summary()
    health = ("dead_fraction", "dense_fraction", "effective_features")
    return {f"val/{k}": summary[k] for k in ("mse", "fvu", "l0", *health)}


class SAETrainer(DictionaryTrainer):
    """TopK SAE steps on one hook's row stream."""

    def __init__(self, cfg: SAETrainConfig, out_dir: Path, model: TopKSAE, train: RowStream, val: RowStream | None):
        super().__init__(out_dir, cfg.num_epochs, cfg.save_freq, log_every=cfg.log_every, desc="SAE")
        self.cfg, self.model, self.train, self.val = cfg, model, train, val
        self.steps_per_epoch = train.steps_per_epoch
        self.device = model.b_dec.device
        self.optimizer = adam(model.parameters(), cfg.lr)
        self.rows_since_fired = torch.zeros(model.cfg.n_latents, dtype=torch.long, device=self.device)

    def batches(self, epoch: int, start_step: int):
        return (batch[self.cfg.hook].to(self.device) for batch in self.train.epoch(epoch, start_step))

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        model = self.model
        out = model(x)
        err = (out.x_hat - x).pow(2).sum(-1).mean()
        fvu = err / (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        dead = self.rows_since_fired > model.cfg.dead_tokens
        aux = model.aux_loss(x, out, dead)
        loss = fvu + model.cfg.aux_coef * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.remove_parallel_gradient()
        self.optimizer.step()
        model.normalize_decoder()
        fired = torch.zeros_like(dead)
        fired[out.indices[out.values > 0]] = True
        self.rows_since_fired += x.shape[0]
        self.rows_since_fired[fired] = 0
        return {
            "mse": err.item() / x.shape[1],
            "fvu": fvu.item(),
            "aux_loss": aux.item(),
            "l0": (out.values > 0).sum(-1).float().mean().item(),
            "dead_fraction": dead.float().mean().item(),
        }

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.val, self.cfg.hook) if self.val else {}


RESUMABLE = ("num_epochs", "save_freq", "log_every", "device", "wandb_project", "wandb_run_name", "wandb_mode")
"""What a resumed SAE run may change; everything else is read from its train_cfg.json."""


def run(cfg: SAETrainConfig, resume: bool = False, explicit: tuple[str, ...] = ()) -> Path:
    """Train (or resume) an SAE; returns its run folder.

    With `resume`, the newest run of the hook continues with its saved settings; the fields of `cfg` named in
    `explicit` (only those in RESUMABLE) replace them. A finished run continues only to a larger num_epochs.
    """
    run_dir = resolve_run_dir(cfg.run_dir)
    hook_dir = sae_runs_dir(run_dir, cfg.hook)
    out_dir = None
    if resume:
        out_dir, cfg = resume_dictionary_run(hook_dir, SAETrainConfig, asdict(cfg), explicit, RESUMABLE,
                                             budget=("num_epochs",))  # fmt: skip
        lock_run(out_dir)
    name, dump = find_dump(run_dir, cfg.hook, cfg.dataset)
    log.info("training on %s", dump.describe())
    if resume:
        check_resumed_data(out_dir, [dump])
    cfg.dataset = name
    train_ids, val_ids = split_instances(dump.num_instances, cfg.val_ratio, cfg.seed)
    arrays = {cfg.hook: dump.arrays[cfg.hook]}
    train = RowStream(arrays, dump.nodes_per_instance, train_ids, cfg.batch_size, cfg.seed)
    val = RowStream(arrays, dump.nodes_per_instance, val_ids, cfg.batch_size, cfg.seed) if len(val_ids) else None

    sae_cfg = cfg.sae_config(dump.arrays[cfg.hook].shape[1])
    torch.manual_seed(init_seed(f"sae/{cfg.hook}/{sae_cfg}", cfg.seed))
    model = TopKSAE(sae_cfg, torch.from_numpy(dump.stats(cfg.hook)[0])).to(cfg.device)
    out_dir = out_dir or lock_run(new_run_folder(hook_dir))  # made only now: a run that cannot start leaves none
    trainer = SAETrainer(cfg, out_dir, model, train, val)
    if resume:
        trainer.resume(cfg.device)
    saved = {**asdict(cfg), "dataset_path": stored_path(run_dir, dump.path), "datasets": [data_identity(dump)]}
    write_json(out_dir / "train_cfg.json", saved)
    run_name = cfg.wandb_run_name or f"{run_dir.name}/{cfg.hook}/{out_dir.name}"
    logger = RunLogger(out_dir, cfg.wandb_project, run_name, asdict(cfg), cfg.wandb_mode, run_id=trainer.wandb_run_id)
    try:
        trainer.fit(logger)
    finally:
        logger.finish()
    model.save(out_dir)
    release_run(out_dir)
    return out_dir


@click.command()
@options(SAETrainConfig)
@resume_option("the newest run of --hook", "--num_epochs")
def main(resume, **settings):
    """Train a TopK sparse autoencoder on a hook's activations."""
    with command():
        if resume:
            click.echo(f"resuming the newest run of {settings['hook']} with its saved settings")
        out_dir = run(SAETrainConfig(**settings), resume=resume, explicit=tuple(explicit_options()))
    click.echo(f"SAE saved in {out_dir}")


if __name__ == "__main__":
    main()
