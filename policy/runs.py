"""Policy run folders, without torch: resolving `--run_dir`, listing its checkpoints, and the bookkeeping every
trainer shares (safe names, new timestamped folders, resumed settings). Reading the policy itself (its config,
weights and model) is policy.loading's; this module stays free of torch so that the commands that only keep
the books (clt.summarize, clt.list_pairs) start in a fraction of a second (tests/test_layers.py).

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

import fcntl
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

RUNS_DIR = Path("runs")
"""Where run names are looked up first (relative to the working directory)."""
PACKAGED_RUNS_DIR = Path(__file__).resolve().parents[1] / "runs"
"""Where the shipped demo run lives (the repository's, or the installed package's, runs/)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_NATIVE_CKPT = re.compile(r"^epoch_(\d+)\.safetensors$")
_RL4CO_CKPT = re.compile(r"^checkpoint_epoch_(\d+)\.ckpt$")
KOOL_CHECKPOINT = re.compile(r"^epoch-(\d+)\.pt$")


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
            match = KOOL_CHECKPOINT.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


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
    An empty folder (a start refused before it wrote anything) is passed over.
    """
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.iterdir())) if folder.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"nothing to resume under {folder}")
    newest = runs[-1]
    if not (newest / "checkpoints" / "train_state.pt").is_file():
        raise FileNotFoundError(
            f"the newest run {newest} has no saved training state (stopped before its first save): start it again "
            "without --resume; older runs are left as they are"
        )
    return newest


TRAINING_LOCK = ".training.lock"
_held_runs: dict[Path, object] = {}
"""The run folders this process trains in, and their open lock files (a lock lives as long as its file)."""


def lock_run(folder: Path) -> Path:
    """Claim `folder` for training for the rest of this process: an exclusive flock on `folder/.training.lock`,
    which the kernel drops when the process ends (even by kill -9). A folder another process trains in is a
    ValueError naming it and that process."""
    folder = Path(folder)
    if folder in _held_runs:
        return folder
    f = open(folder / TRAINING_LOCK, "a+")  # noqa: SIM115 (held open past this call: the lock lives with the file)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise ValueError(
            f"{folder} is being trained by another process{f' (pid {holder})' if holder.isdigit() else ''}: wait for "
            "it to finish or stop it (two trainers in one folder would interleave their checkpoints and metrics)"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _held_runs[folder] = f
    return folder


def release_run(folder: Path) -> None:
    """Give up the claim `lock_run` took (when training ends within a longer-lived process)."""
    f = _held_runs.pop(Path(folder), None)
    if f is not None:
        f.close()


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
