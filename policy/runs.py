"""Policy run folders: resolving `--run_dir`, reading its config, listing and loading checkpoints,
and the bookkeeping every trainer shares (safe names, new timestamped folders, resumed settings).

A native run (written by `python -m policy.train`):

    runs/<run>/config.json                      {"policy": {...}, "env": {...}, "train": {...}}
    runs/<run>/checkpoints/epoch_<N>.safetensors

A run laid out as RL4CO users have it loads the same way:

    runs/<run>/config.json                      {"embed_dim", "n_encoder_layers", "num_heads", "num_loc",
                                                 optional "normalization", "temperature"}
    runs/<run>/checkpoints/checkpoint_epoch_<N>.ckpt

and so does one of Kool et al.'s attention-learn-to-route (see policy.kool):

    <run>/args.json                             {"embedding_dim", "n_encode_layers", "graph_size", ...;
                                                 optional "num_heads" (default 8)}
    <run>/epoch-<N>.pt

What the sae and clt packages write inside a run is named by sae.runs.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from policy.io import file_sha256, read_json
from policy.kool import convert_state_dict as convert_kool
from policy.kool import kool_config, read_kool_checkpoint
from policy.model import AttentionModel, PolicyConfig
from policy.rl4co import convert_state_dict, read_policy_state_dict

log = logging.getLogger(__name__)

RUNS_DIR = Path("runs")
"""Where run names are looked up first (relative to the working directory)."""
PACKAGED_RUNS_DIR = Path(__file__).resolve().parents[1] / "runs"
"""Where the shipped demo run lives (the repository's, or the installed package's, runs/)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_NATIVE_CKPT = re.compile(r"^epoch_(\d+)\.safetensors$")
_RL4CO_CKPT = re.compile(r"^checkpoint_epoch_(\d+)\.ckpt$")
_KOOL_CKPT = re.compile(r"^epoch-(\d+)\.pt$")


def check_name(name: str, what: str = "run name") -> str:
    """A name that stays inside its parent folder: letters, digits, `_`, `-`, `.`; no `..`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits, '_', '-' and '.', "
            "start with a letter or digit, and do not use '..' or path separators"
        )
    return name


def resolve_run_dir(run_dir: str | Path) -> Path:
    """A run folder from a path (`runs/x`, `/abs/x`) or a bare name (`x`: ./runs/x, then the packaged runs/x)."""
    path = Path(run_dir)
    if len(path.parts) == 1 and not path.is_absolute():
        check_name(str(run_dir))
        for candidate in (RUNS_DIR / path, PACKAGED_RUNS_DIR / path, path):
            if candidate.is_dir():
                return candidate
    elif path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{run_dir} is a file, not a run directory")
    known = sorted(
        {p.name for root in (RUNS_DIR, PACKAGED_RUNS_DIR) if root.is_dir() for p in root.iterdir() if p.is_dir()}
    )
    raise FileNotFoundError(f"no run directory {str(run_dir)!r}; runs found: {', '.join(known) or 'none'}")


@dataclass
class RunConfig:
    """What a run's config.json says about the policy and the instances it was trained on."""

    policy: PolicyConfig
    num_loc: int
    distribution: str
    raw: dict


def read_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file() and (run_dir / "args.json").is_file():  # attention-learn-to-route
        raw = read_json(run_dir / "args.json")
        if not isinstance(raw, dict):
            raise ValueError(f"{run_dir / 'args.json'}: expected a JSON object")
        return RunConfig(*kool_config(raw, str(run_dir / "args.json")), raw)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json (nor a Kool args.json): is it a run directory?")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "policy" in raw:  # native
        policy = PolicyConfig.from_dict(raw["policy"])
        env = raw.get("env", {})
        return RunConfig(policy, int(env.get("num_loc", 20)), env.get("distribution", "uniform"), raw)
    missing = [k for k in ("embed_dim", "n_encoder_layers", "num_heads", "num_loc") if k not in raw]
    if missing:
        raise ValueError(f"{path}: neither a native config (no 'policy' key) nor an RL4CO one (missing {missing})")
    policy = PolicyConfig(
        embed_dim=raw["embed_dim"],
        num_encoder_layers=raw["n_encoder_layers"],
        num_heads=raw["num_heads"],
        normalization=raw.get("normalization", "batch"),
        temperature=raw.get("temperature", 1.0),
    )
    return RunConfig(policy, int(raw["num_loc"]), raw.get("distribution", "uniform"), raw)


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Epoch -> checkpoint file: native `checkpoints/epoch_<N>.safetensors`, RL4CO
    `checkpoints/checkpoint_epoch_<N>.ckpt`, Kool `epoch-<N>.pt` (in the run folder itself)."""
    found = {}
    folder = run_dir / "checkpoints"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _NATIVE_CKPT.match(path.name) or _RL4CO_CKPT.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if (run_dir / "args.json").is_file():
        for path in sorted(run_dir.glob("epoch-*.pt")):
            match = _KOOL_CKPT.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Native, RL4CO or Kool weights, with native key names."""
    if _KOOL_CKPT.match(path.name) and (path.parent / "args.json").is_file():
        return convert_kool(read_kool_checkpoint(path))
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
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


def stored_path(run_dir: Path, path: Path) -> str:
    """How a config or registry records `path`: relative to the run folder when inside it (a copied or moved run
    finds its own files), else absolute. Read back with `run_dir / stored` (an absolute stored path wins)."""
    path, run = Path(path).absolute(), Path(run_dir).absolute()
    return str(path.relative_to(run)) if path.is_relative_to(run) else str(path.resolve())


def new_run_folder(folder: Path) -> Path:
    """folder/<timestamp>, created here and now: when another process took the name, a suffix (_001, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        out_dir = folder / (stamp if i == 0 else f"{stamp}_{i:03d}")
        try:
            out_dir.mkdir()  # exclusive: exactly one process creates each name
            return out_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run folder under {folder}")


def resume_folder(folder: Path) -> Path:
    """The run `--resume` continues: the newest folder under `folder`, which must hold a saved training state.

    Never an older run: a newest run killed before its first save is an error, not a reason to continue another.
    """
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"nothing to resume under {folder}")
    newest = runs[-1]
    if not (newest / "checkpoints" / "train_state.pt").is_file():
        raise FileNotFoundError(
            f"the newest run {newest} has no saved training state (stopped before its first save): start it again "
            "without --resume; older runs are left as they are"
        )
    return newest


def resumed_settings(
    saved: dict, given: dict, explicit: Iterable[str], may_change: Iterable[str], where: Iterable[str] = ("run_dir",)
) -> dict:
    """The settings a resumed run continues with: `saved`, with the explicitly `given` ones on top.

    Only fields in `may_change` (how long, on which device, how it logs) may differ from the saved run; changing
    any other (what is trained) is a ValueError. Every change is logged. The `where` fields (how the run was
    found, e.g. a moved run's new path) always come from `given`.
    """
    settings, may_change = dict(saved), set(may_change)
    settings.update({name: given[name] for name in where if name in given})
    for name in set(explicit) - set(where):
        if name not in given or given[name] == saved.get(name):
            continue
        if name not in may_change:
            raise ValueError(
                f"--{name} {given[name]} differs from the run being resumed ({saved.get(name)}); a resumed run "
                f"keeps what it trains (may change: {', '.join(sorted(may_change))})"
            )
        log.info("resume: %s %s -> %s (given on the command line)", name, saved.get(name), given[name])
        settings[name] = given[name]
    return settings
