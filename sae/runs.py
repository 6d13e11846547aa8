"""Where every output of a run lives, and which of them are finished: the one module that knows.

    runs/<run>/sae/activation_store.json        dataset name -> resolved path
    runs/<run>/sae/activations/<dataset>/       (or <root>/<run>/sae/activations/<dataset>/)
    runs/<run>/sae/sae_runs/<hook>/<timestamp>/
    runs/<run>/clt/activations/<pair>/          (or <root>/<run>/clt/activations/<pair>/)
    runs/<run>/clt/clt_runs/<pair>/<timestamp>/
    runs/<run>/clt/sweeps/<sweep>.json          the transcoder runs one sweep (train_clt.sh) made
    runs/<run>/clt/attribution/<decision>.json  attribution graphs (clt.graph.attribute), .safetensors beside

A dictionary run (SAE or transcoder) is finished when its `model.safetensors` exists: the trainers
write it last. The policy-run bookkeeping (`resolve_run_dir`, `check_name`, ...) lives in policy.runs and is
importable from here too, as the sae and clt packages share it; like it, this module never imports torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from policy.io import locked, read_json, write_json
from policy.runs import (  # noqa: F401  (re-exported: the run bookkeeping sae and clt share)
    check_name,
    list_checkpoints,
    new_run_folder,
    resolve_run_dir,
    resume_folder,
    resumed_settings,
    stored_path,
)

log = logging.getLogger(__name__)

ACTIVATIONS_ROOT_ENV = "ACTIVATIONS_ROOT"
"""Environment variable that moves activation dumps out of the run folder."""


def activations_root(explicit: str | Path | None = None) -> Path | None:
    """`--activations_root` if given, else $ACTIVATIONS_ROOT, else None (dumps live in the run)."""
    value = explicit or os.environ.get(ACTIVATIONS_ROOT_ENV)
    return Path(value).resolve() if value else None


def _data_base(run_dir: Path, root: Path | None) -> Path:
    return run_dir if root is None else root / run_dir.resolve().name


def registry_path(run_dir: Path) -> Path:
    return run_dir / "sae" / "activation_store.json"


def sae_activations_dir(run_dir: Path, dataset: str, root: Path | None = None) -> Path:
    return _data_base(run_dir, root) / "sae" / "activations" / check_name(dataset, "dataset name")


def clt_activations_dir(run_dir: Path, pair: str, root: Path | None = None) -> Path:
    return _data_base(run_dir, root) / "clt" / "activations" / check_name(pair, "pair name")


def dictionary_root(run_dir: Path, kind: str) -> Path:
    """Where a run's dictionaries of one kind live: `sae` (SAEs, one folder per hook) or `clt` (transcoders,
    one folder per pair)."""
    if kind not in ("sae", "clt"):
        raise ValueError(f"a dictionary kind is 'sae' or 'clt', got {kind!r}")
    return run_dir / kind / f"{kind}_runs"


def sae_runs_dir(run_dir: Path, hook: str) -> Path:
    return dictionary_root(run_dir, "sae") / check_name(hook, "hook name")


def clt_runs_dir(run_dir: Path, pair: str) -> Path:
    return dictionary_root(run_dir, "clt") / check_name(pair, "pair name")


def attribution_dir(run_dir: Path) -> Path:
    """Where attribution graphs of the run's decisions go (clt.graph.attribute)."""
    return run_dir / "clt" / "attribution"


def is_finished(folder: Path) -> bool:
    """Whether a dictionary run folder holds its final weights (`model.safetensors`, written last)."""
    return (Path(folder) / "model.safetensors").is_file()


def finished_runs(run_dir: Path, kind: str) -> dict[str, list[Path]]:
    """Hook (kind "sae") or pair (kind "clt") -> its finished run folders, oldest first."""
    root = dictionary_root(run_dir, kind)
    found = {}
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        runs = sorted(p for p in name_dir.iterdir() if p.is_dir() and is_finished(p))
        if runs:
            found[name_dir.name] = runs
    return found


def newest_runs(run_dir: Path, kind: str) -> list[Path]:
    """The newest finished run of every hook (kind "sae") or pair (kind "clt")."""
    return [runs[-1] for runs in finished_runs(run_dir, kind).values()]


def newest_finished(run_dir: Path, kind: str, name: str) -> Path:
    """The newest finished run of one hook or pair; a FileNotFoundError saying how to train one."""
    runs = finished_runs(run_dir, kind).get(check_name(name, "hook or pair name"))
    if not runs:
        command = "sae.train_topk --hook" if kind == "sae" else "clt.train_transcoder --pair"
        raise FileNotFoundError(f"no finished {kind.upper()} run for {name} in {run_dir}; train one with "
                                f"python -m {command} {name}")  # fmt: skip
    return runs[-1]


def owning_run(folder: Path, train_cfg: dict) -> Path:
    """The run a dictionary folder belongs to: the one it sits in (runs/<run>/{sae/sae_runs,clt/clt_runs}/<name>/
    <timestamp>), so that a copied or moved run uses its own policy and dumps; else the run its train_cfg.json names."""
    parents = Path(folder).resolve().parents
    if len(parents) > 3 and parents[1].name in ("sae_runs", "clt_runs") and (parents[3] / "config.json").is_file():
        return parents[3]
    return resolve_run_dir(train_cfg["run_dir"])


def resume_dictionary_run(runs_folder: Path, cls: type, given: dict, explicit: Iterable[str],
                          may_change: Iterable[str], budget: tuple[str, ...], **extra):  # fmt: skip
    """The run `--resume` continues (the newest under `runs_folder`) and the config it continues with: its
    train_cfg.json with the explicitly `given` settings on top (policy.runs.resumed_settings). A finished run
    continues only when one of its `budget` fields (how long it trains) grows. `extra`: library-only fields."""
    out_dir = resume_folder(runs_folder)
    saved = read_json(out_dir / "train_cfg.json")
    saved.pop("dataset_path", None)  # where the data was: found again
    saved.pop("datasets", None)  # which data it was: the trainer checks it (sae.store.check_resumed_data)
    cfg = cls(**resumed_settings(saved, given, explicit, may_change), **extra)
    longer = any((getattr(cfg, name) or 0) > (saved.get(name) or 0) for name in budget)
    if is_finished(out_dir) and not longer:
        trained = ", ".join(f"{name} {saved.get(name)}" for name in budget if saved.get(name) is not None)
        raise ValueError(f"{out_dir} is finished ({trained}): pass a larger --{' or --'.join(budget)} to train it "
                         "further")  # fmt: skip
    log.info("resuming %s", out_dir)
    return out_dir, cfg


def sweep_path(run_dir: Path, sweep: str) -> Path:
    return run_dir / "clt" / "sweeps" / f"{check_name(sweep, 'sweep name')}.json"


def record_in_sweep(run_dir: Path, sweep: str, folder: Path) -> Path:
    """List a finished run folder in the sweep's record `<run>/clt/sweeps/<sweep>.json` (atomic, file-locked)."""
    path = sweep_path(run_dir, sweep)
    with locked(path.with_name(f".{path.name}.lock")):
        runs = read_json(path)["runs"] if path.is_file() else []
        stored = stored_path(run_dir, folder)
        write_json(path, {"sweep": sweep, "runs": [*runs, stored] if stored not in runs else runs})
    return path


def sweep_runs(run_dir: Path, sweep: str) -> list[Path]:
    """The run folders a sweep recorded, in the order they finished."""
    path = sweep_path(run_dir, sweep)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no sweep {sweep!r} in {run_dir}; sweeps: {', '.join(known) or 'none'}")
    return [run_dir / stored for stored in read_json(path)["runs"]]
