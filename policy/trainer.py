"""The epoch loop every trainer shares (policy.train, sae.train_topk, clt.train_transcoder).

    trainer = MyTrainer(...)            # an EpochTrainer: batches, train_step, validate, weights, state
    trainer.resume()                    # optional: continue from checkpoints/train_state.pt
    trainer.fit(logger)

Epochs of steps; training metrics every `log_every` steps; validation, an
`epoch_<N>.safetensors` every `save_freq` epochs and `train_state.pt` at every
epoch end (and every `state_every` steps). With `max_steps` the last epoch stops
early (a token budget). Ctrl-C or SIGTERM stops between two
steps, saves the exact position and raises `Interrupted`. Data order depends only
on (seed, epoch, step), so a resumed run, even after `kill -9`, ends with the weights
an uninterrupted one ends with. All files are written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from policy.io import error_reason
from policy.logger import RunLogger, truncate_metrics
from policy.signals import GracefulStop, Interrupted
from policy.torch_files import load_torch_file, save_tensors, save_torch

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: `step` batches of epoch `epoch` are done, `global_step` in all."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


class EpochTrainer:
    """Subclasses provide the data, one optimisation step, validation and what to save."""

    steps_per_epoch: int
    progress_keys: tuple[str, ...] = ("fvu", "l0")
    """Training scalars shown beside the progress bar."""

    def __init__(
        self,
        out_dir: Path,
        num_epochs: int,
        save_freq: int = 1,
        log_every: int = 20,
        state_every: int = 0,
        max_steps: int | None = None,
        desc: str = "train",
    ):
        self.out_dir = Path(out_dir)
        self.num_epochs, self.save_freq, self.log_every, self.state_every = (
            num_epochs,
            save_freq,
            log_every,
            state_every,
        )
        self.max_steps = max_steps
        self.is_main = True  # under DDP only rank 0 logs and writes
        self.desc = desc
        self.position = Position()
        self.wandb_run_id: str | None = None
        self.weights_artifact: str | None = None  # set: every checkpoint is also logged as this W&B artifact

    # provided by the subclass ------------------------------------------------------------
    def batches(self, epoch: int, start_step: int) -> Iterator:
        """The training batches of `epoch`, from batch `start_step` on."""
        raise NotImplementedError

    def train_step(self, batch) -> dict[str, float]:
        """One optimisation step; returns scalars to log under train/."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation scalars (keys as they are logged, e.g. val/fvu)."""
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's tensors, for checkpoints/epoch_<N>.safetensors."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything besides the position that a resumed run needs (model, optimizer, counters)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    # the loop ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out_dir / "checkpoints" / "train_state.pt"

    def save_state(self, logger: RunLogger | None = None) -> None:
        if not self.is_main:
            return
        run_id = (logger.run_id if logger else None) or self.wandb_run_id or ""
        save_torch(self.state_path, {**self.state_dict(), "position": asdict(self.position), "wandb_run_id": run_id})

    def resume(self, device: torch.device | str = "cpu") -> None:
        """Load train_state.pt and drop metrics logged after it (they are logged again)."""
        if not self.state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: no {self.state_path}")
        state = load_torch_file(self.state_path, map_location=device)
        try:
            self.load_state_dict(state)
            self.position = self.saved_position(state)
            self.wandb_run_id = state["wandb_run_id"] or None
            if not all(isinstance(v, int) and v >= 0 for v in asdict(self.position).values()):
                raise ValueError(f"position {self.position}")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
            raise ValueError(
                f"{self.state_path} is not a training state of this run ({type(err).__name__}: "
                f"{error_reason(err, 'unreadable')})"
            ) from err
        truncate_metrics(self.out_dir / "metrics.jsonl", self.position.global_step)

    def saved_position(self, state: dict) -> Position:
        """Where a saved state stands (a subclass may also read an older layout of its own)."""
        return Position(**state["position"])

    def fit(self, logger: RunLogger | None) -> None:
        """Train to the end; `logger` is None on ranks that do not log."""
        p = self.position
        try:
            with GracefulStop() as stop:
                while p.epoch < self.num_epochs:
                    self._epoch(logger, stop)
                    metrics = {"epoch": p.epoch + 1, **self.validate()}
                    if logger is not None:
                        logger.log(metrics, step=p.global_step)
                        log.info("epoch %d: %s", p.epoch + 1, {k: round(v, 5) for k, v in metrics.items()})
                    p.epoch, p.step = p.epoch + 1, 0
                    if self.is_main and (p.epoch % self.save_freq == 0 or p.epoch == self.num_epochs):
                        path = self.out_dir / "checkpoints" / f"epoch_{p.epoch}.safetensors"
                        save_tensors(path, self.weights(), {"epoch": str(p.epoch)})
                        if logger is not None and self.weights_artifact:
                            logger.log_artifact(path, self.weights_artifact, f"epoch_{p.epoch}", p.global_step)
                    self.save_state(logger)
        except Interrupted as err:
            self.save_state(logger)
            log.warning("interrupted (%s) at epoch %d, step %d: state saved, continue with --resume",
                        err, p.epoch + 1, p.step)  # fmt: skip
            raise

    def _epoch(self, logger: RunLogger | None, stop: GracefulStop) -> None:
        p = self.position
        bar = tqdm(self.batches(p.epoch, p.step), desc=f"{self.desc} epoch {p.epoch + 1}/{self.num_epochs}",
                   initial=p.step, total=self.steps_per_epoch, disable=not self.is_main)  # fmt: skip
        for batch in bar:
            if self.max_steps is not None and p.global_step >= self.max_steps:
                break
            stop.check()
            stats = self.train_step(batch)
            p.step, p.global_step = p.step + 1, p.global_step + 1
            if logger is not None and p.global_step % self.log_every == 0:
                logger.log({f"train/{k}": v for k, v in stats.items()}, step=p.global_step)
            if self.state_every and p.global_step % self.state_every == 0:
                self.save_state(logger)
            bar.set_postfix({k: f"{stats[k]:.4g}" for k in self.progress_keys if k in stats})
