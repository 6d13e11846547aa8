"""What the dictionary trainers (sae.train_topk, clt.train_transcoder) share on top of policy.trainer's loop."""

from __future__ import annotations

import torch

from policy.trainer import EpochTrainer


class DictionaryTrainer(EpochTrainer):
    """An EpochTrainer for a sparse dictionary: `model`, `optimizer` and the [latents] counter `rows_since_fired`
    (rows since each latent last fired) are what a checkpoint and a resumed run need."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rows_since_fired: torch.Tensor

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rows_since_fired": self.rows_since_fired}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rows_since_fired = state["rows_since_fired"].to(self.rows_since_fired.device)
