"""A run's policy: what its config says (`read_config`), its checkpoint weights in native key names
(`read_weights`: native safetensors, RL4CO Lightning checkpoints, Kool et al.'s epoch-<N>.pt, all read without
running code from the file, see policy.torch_files) and the model itself (`load_policy`). Where the files are
is policy.runs'.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from policy.env import DISTRIBUTIONS, MAX_NODES, MIN_NODES
from policy.io import file_sha256, read_json_object
from policy.kool import convert_state_dict as convert_kool
from policy.kool import kool_config, read_kool_checkpoint
from policy.model import AttentionModel, PolicyConfig
from policy.rl4co import convert_state_dict, read_policy_state_dict
from policy.runs import KOOL_CHECKPOINT, list_checkpoints, resolve_run_dir
from policy.torch_files import read_safetensors


@dataclass
class RunConfig:
    """What a run's config.json says about the policy and the instances it was trained on."""

    policy: PolicyConfig
    num_loc: int
    distribution: str
    raw: dict


def read_config(run_dir: Path) -> RunConfig:
    """The run's config.json (native or RL4CO) or Kool's args.json, checked: a ValueError naming the file."""
    path = run_dir / "config.json"
    if not path.is_file() and (run_dir / "args.json").is_file():  # attention-learn-to-route
        path = run_dir / "args.json"
        raw = read_json_object(path)
        try:
            return _checked(RunConfig(*kool_config(raw, str(path)), raw))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json (nor a Kool args.json): is it a run directory?")
    raw = read_json_object(path)
    try:
        return _checked(_run_config(raw))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def _run_config(raw: dict) -> RunConfig:
    if "policy" in raw:  # native
        if not isinstance(raw["policy"], dict) or not isinstance(raw.get("env", {}), dict):
            raise ValueError("'policy' and 'env' must be JSON objects")
        env = raw.get("env", {})
        return RunConfig(PolicyConfig.from_dict(raw["policy"]), env.get("num_loc", 20),
                         env.get("distribution", "uniform"), raw)  # fmt: skip
    missing = [k for k in ("embed_dim", "n_encoder_layers", "num_heads", "num_loc") if k not in raw]
    if missing:
        raise ValueError(f"neither a native config (no 'policy' key) nor an RL4CO one (missing {missing})")
    policy = PolicyConfig(
        embed_dim=raw["embed_dim"],
        num_encoder_layers=raw["n_encoder_layers"],
        num_heads=raw["num_heads"],
        normalization=raw.get("normalization", "batch"),
        temperature=raw.get("temperature", 1.0),
    )
    return RunConfig(policy, raw["num_loc"], raw.get("distribution", "uniform"), raw)


def _checked(config: RunConfig) -> RunConfig:
    num_loc = config.num_loc
    if isinstance(num_loc, bool) or not isinstance(num_loc, int) or not MIN_NODES <= num_loc <= MAX_NODES:
        raise ValueError(f"num_loc must be a whole number in [{MIN_NODES}, {MAX_NODES}], got {config.num_loc!r}")
    if config.distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {config.distribution!r}")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Native, RL4CO or Kool weights, with native key names."""
    if KOOL_CHECKPOINT.match(path.name) and (path.parent / "args.json").is_file():
        return convert_kool(read_kool_checkpoint(path))
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return convert_state_dict(read_policy_state_dict(path))


@dataclass
class LoadedPolicy:
    model: AttentionModel
    config: RunConfig
    run_dir: Path
    epoch: int
    checkpoint: Path

    @cached_property
    def checkpoint_sha256(self) -> str:
        return file_sha256(self.checkpoint)


def load_policy(
    run_dir: str | Path, checkpoint: int | None = None, device: str | torch.device = "cpu", num_heads: int | None = None
) -> LoadedPolicy:
    """The policy of a run in eval mode, from epoch `checkpoint` or the latest one.

    `num_heads` overrides the heads the run's config names (Kool's args.json does not record them: 8).
    """
    run = resolve_run_dir(run_dir)
    config = read_config(run)
    if num_heads is not None:
        config.policy = PolicyConfig(**{**config.policy.to_dict(), "num_heads": num_heads})
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(
            f"{run} holds no checkpoint (checkpoints/epoch_<N>.safetensors, checkpoints/checkpoint_epoch_<N>.ckpt, "
            "or a Kool epoch-<N>.pt)"
        )
    epoch = max(checkpoints) if checkpoint is None else checkpoint
    if epoch not in checkpoints:
        raise FileNotFoundError(f"{run} has no checkpoint for epoch {epoch}; available: {list(checkpoints)}")
    path = checkpoints[epoch]
    model = AttentionModel.from_weights(config.policy, read_weights(path), source=str(path))
    return LoadedPolicy(model.to(device), config, run, epoch, path)
