"""What the dictionary trainers (sae.train_topk, clt.train_transcoder) share on top of policy.trainer's loop."""

from __future__ import annotations

import torch

from policy.heap import keep_freed_memory
from policy.logger import RunLogger
from policy.trainer import EpochTrainer


def adam(params, lr: float) -> torch.optim.Adam:
    """The dictionary trainers' Adam: torch's fused one (one pass over each tensor instead of several) where this
    torch has it for the parameters' device (CPU since torch 2.4), else its default. Resuming needs a torch that
    has it too (the flag is in the optimizer's state)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused Adam for this device in this torch
        return torch.optim.Adam(params, lr=lr)


class DictionaryTrainer(EpochTrainer):
    """An EpochTrainer for a sparse dictionary: `model`, `optimizer` and the [latents] counter `rows_since_fired`
    (rows since each latent last fired) are what a checkpoint and a resumed run need."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rows_since_fired: torch.Tensor

    def fit(self, logger: RunLogger | None) -> None:
        """EpochTrainer.fit, with each step's freed tensors kept in the process's heap for the next step
        (policy.heap.keep_freed_memory: otherwise every step faults its pages in again)."""
        keep_freed_memory()
        super().fit(logger)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rows_since_fired": self.rows_since_fired}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rows_since_fired = state["rows_since_fired"].to(self.rows_since_fired.device)
