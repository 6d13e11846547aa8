"""Train a TSP Attention Model with REINFORCE and POMO's multi-start shared baseline.

    python -m policy.train --run_name tsp20 --num_loc 20 --epochs 100

Every instance is decoded once from each of its nodes (sampling); the baseline
of a tour is the mean reward of the instance's tours. Writes:

    runs/<run>/config.json                       policy, env and training settings
    runs/<run>/val_locs.npy                      the fixed validation instances
    runs/<run>/checkpoints/epoch_<N>.safetensors weights after epoch N
    runs/<run>/checkpoints/train_state.pt        what --resume needs (weights_only-safe)
    runs/<run>/metrics.jsonl                     (and W&B, see policy.logger)

Ctrl-C or SIGTERM saves the exact place in the epoch and exits; `--resume`
continues from it, batch for batch, as if nothing had happened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import click
import torch

from policy.checks import check_device, check_types
from policy.cli import command, explicit_options
from policy.env import DISTRIBUTIONS, generate, tour_length
from policy.io import read_json, save_npy, write_json
from policy.logger import WANDB_MODES, RunLogger
from policy.model import AttentionModel, PolicyConfig
from policy.options import choice, options, resume_option, split_nested
from policy.runs import check_name, lock_run, release_run, resumed_settings
from policy.trainer import EpochTrainer, Position

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything one training run needs; saved in the run's config.json under `train`."""

    run_name: str = "tsp20"
    """Folder name of the run under `runs_dir`."""
    runs_dir: str = "runs"
    """Where run folders are created."""
    num_loc: int = 20
    """Nodes per training instance."""
    distribution: str = choice("uniform", DISTRIBUTIONS)
    """Training instance distribution."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Model hyper-parameters (on the command line, each of PolicyConfig's fields is an option)."""
    batch_size: int = 64
    """Instances per gradient step (each decoded num_loc times)."""
    epochs: int = 100
    """Epochs to train (with --resume: the new total, to train a finished run longer)."""
    instances_per_epoch: int = 100_000
    """Fresh instances drawn per epoch."""
    lr: float = 1e-4
    """Adam learning rate (with --resume, given explicitly: the rate from here on)."""
    weight_decay: float = 1e-6
    """Adam weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    val_size: int = 1000
    """Size of the fixed validation set."""
    seed: int = 1234
    """Seeds the weights, the instances of every epoch and the sampling."""
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:1, ..."""
    wandb_project: str = "tsp-policy"
    """W&B project name."""
    wandb_mode: str = choice("auto", WANDB_MODES)
    """W&B mode; auto = offline without credentials."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        check_name(self.run_name)
        if isinstance(self.policy, dict):
            self.policy = PolicyConfig.from_dict(self.policy)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        for name in ("num_loc", "batch_size", "epochs", "instances_per_epoch", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_loc < 3:
            raise ValueError(f"num_loc must be at least 3, got {self.num_loc}")
        if self.instances_per_epoch < self.batch_size:
            raise ValueError("instances_per_epoch must be at least batch_size")
        if not self.lr > 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    @property
    def steps_per_epoch(self) -> int:
        return self.instances_per_epoch // self.batch_size

    def run_config(self) -> dict:
        """The run's config.json: what loading the policy needs, plus the training settings."""
        train = {k: v for k, v in asdict(self).items() if k != "policy"}
        return {
            "policy": self.policy.to_dict(),
            "env": {"num_loc": self.num_loc, "distribution": self.distribution},
            "train": train,
        }


def epoch_instances(cfg: TrainConfig, epoch: int) -> torch.Tensor:
    return generate(cfg.instances_per_epoch, cfg.num_loc, cfg.distribution, seed=cfg.seed * 1_000_003 + epoch)


def validation_instances(cfg: TrainConfig) -> torch.Tensor:
    return generate(cfg.val_size, cfg.num_loc, cfg.distribution, seed=cfg.seed * 1_000_003 - 1)


def train_step(model, optimizer, locs: torch.Tensor, generator: torch.Generator, grad_clip: float) -> dict:
    """One REINFORCE step with the multi-start shared baseline; returns scalars to log."""
    out = model(locs, decode="sample", multistart=True, generator=generator)
    reward = -tour_length(locs, out.actions)  # [batch, S]
    advantage = reward - reward.mean(dim=1, keepdim=True)
    loss = -(advantage * out.log_likelihood).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "tour_length": -reward.mean().item(), "grad_norm": grad_norm.item()}


@torch.no_grad()
def validate(model, locs: torch.Tensor, batch_size: int = 500) -> dict:
    model.eval()
    greedy, multi = [], []
    for chunk in locs.split(batch_size):
        greedy.append(tour_length(chunk, model(chunk).actions[:, 0]))
        multi.append(tour_length(chunk, model(chunk, multistart=True).actions).min(dim=1).values)
    model.train()
    return {
        "val/greedy_length": torch.cat(greedy).mean().item(),
        "val/multistart_length": torch.cat(multi).mean().item(),
    }


class PolicyTrainer(EpochTrainer):
    """REINFORCE steps on each epoch's fresh instances (policy.trainer's loop: resume, Ctrl-C, checkpoints)."""

    progress_keys = ("tour_length",)

    def __init__(self, cfg: TrainConfig, model: AttentionModel, val_locs: torch.Tensor):
        super().__init__(cfg.run_dir, cfg.epochs, save_freq=1, log_every=50, desc="policy")
        self.cfg, self.model, self.val_locs = cfg, model, val_locs
        self.steps_per_epoch = cfg.steps_per_epoch
        self.device = val_locs.device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(device=self.device)
        self._sums, self._first, self._tic = {}, 0, 0.0

    def batches(self, epoch: int, start_step: int):
        data = epoch_instances(self.cfg, epoch).to(self.device)
        if start_step == 0:  # mid-epoch, the generator goes on from the saved state
            self.generator.manual_seed(self.cfg.seed * 7919 + epoch)
        self._sums, self._first, self._tic = {}, start_step, time.perf_counter()
        size = self.cfg.batch_size
        return (data[step * size : (step + 1) * size] for step in range(start_step, self.steps_per_epoch))

    def train_step(self, locs: torch.Tensor) -> dict[str, float]:
        stats = train_step(self.model, self.optimizer, locs, self.generator, self.cfg.grad_clip)
        self._sums = {k: self._sums.get(k, 0.0) + v for k, v in stats.items()}
        return stats

    def validate(self) -> dict[str, float]:
        seconds = time.perf_counter() - self._tic
        done = self.steps_per_epoch - self._first
        metrics = {f"epoch/{k}": v / max(done, 1) for k, v in self._sums.items()}
        metrics.update(validate(self.model, self.val_locs))
        metrics.update({"lr": self.optimizer.param_groups[0]["lr"], "epoch/seconds": seconds,
                        "epoch/instances_per_s": done * self.cfg.batch_size / seconds})  # fmt: skip
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def saved_position(self, state: dict) -> Position:
        if "position" not in state:  # written before policy.train used policy.trainer
            return Position(state["epoch"], state["step_in_epoch"], state["global_step"])
        return super().saved_position(state)


RESUMABLE = ("epochs", "device", "wandb_project", "wandb_mode")
"""What a resumed run may change (besides `new_lr`); everything else is read from its config.json."""


def run(cfg: TrainConfig, resume: bool = False, new_lr: float | None = None, explicit: tuple[str, ...] = ()) -> Path:
    """Train (or resume) the run `cfg.run_dir`; returns the run folder.

    A resumed run keeps its saved settings; the fields of `cfg` named in `explicit` (only those in RESUMABLE)
    replace them, and `new_lr` the learning rate (e.g. to anneal a long run). A finished run continues only to
    a larger `epochs`.
    """
    run_dir = cfg.run_dir
    state_path = run_dir / "checkpoints" / "train_state.pt"
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        run_config = read_json(run_dir / "config.json")
        saved = {**run_config["train"], "policy": run_config["policy"]}
        settings = resumed_settings(saved, asdict(cfg), explicit, RESUMABLE, where=("runs_dir", "run_name"))
        cfg = TrainConfig(**{**settings, "lr": new_lr or saved["lr"]})
        log.info("resuming %s", run_dir)
    else:
        try:
            (run_dir / "checkpoints").mkdir(parents=True)  # exclusive: two runs of one name cannot both start
        except FileExistsError:
            if not state_path.is_file():
                raise FileExistsError(
                    f"{run_dir} was started but holds no saved state (another process is training it, or it was "
                    f"stopped before its first save): remove {run_dir} to start it over"
                ) from None
            raise FileExistsError(
                f"{run_dir} already holds checkpoints: pass --resume to continue it, or pick another --run_name"
            ) from None

    lock_run(run_dir)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = AttentionModel(cfg.policy).to(device).train()
    val_locs = validation_instances(cfg)
    trainer = PolicyTrainer(cfg, model, val_locs.to(device))
    if resume:
        trainer.resume(device)
        if trainer.position.epoch >= cfg.epochs:
            raise ValueError(f"{run_dir} is finished ({trainer.position.epoch} epochs): pass --epochs larger than "
                             "that to train it further")  # fmt: skip
        if new_lr:
            for group in trainer.optimizer.param_groups:
                group["lr"] = new_lr
            log.info("learning rate set to %g from epoch %d on", new_lr, trainer.position.epoch + 1)
        log.info("resuming %s at epoch %d, step %d", run_dir, trainer.position.epoch, trainer.position.step)
    write_json(run_dir / "config.json", cfg.run_config())  # on resume: the new total of epochs (and lr)
    if not (run_dir / "val_locs.npy").exists():
        save_npy(run_dir / "val_locs.npy", val_locs.numpy())
    logger = RunLogger(run_dir, cfg.wandb_project, cfg.run_name, cfg.run_config(), cfg.wandb_mode,
                       run_id=trainer.wandb_run_id)  # fmt: skip
    try:
        trainer.fit(logger)
    finally:
        logger.finish()
    release_run(run_dir)
    return run_dir


@click.command()
@options(TrainConfig, flatten=("policy",))
@resume_option("the run --run_name", "--epochs")
def main(resume, **settings):
    """Train a TSP Attention Model with REINFORCE and the POMO multi-start baseline."""
    with command():
        given = explicit_options()
        if resume:
            fixed = sorted(given & {f.name for f in fields(PolicyConfig)})
            if fixed:
                raise click.UsageError(f"--{', --'.join(fixed)}: the policy's shape is fixed by the run being resumed")
            click.echo(f"resuming {Path(settings['runs_dir']) / settings['run_name']} with its saved settings")
        cfg = TrainConfig(**split_nested(TrainConfig, settings, "policy"))
        new_lr = cfg.lr if resume and "lr" in given else None
        run_dir = run(cfg, resume=resume, new_lr=new_lr, explicit=tuple(given - {"lr"}))
    click.echo(f"trained policy in {run_dir}")


if __name__ == "__main__":
    main()
