"""The registry of a run's activation dumps, `sae/activation_store.json`: name -> where the dump is.

`register_datasets` records dumps in the run's `sae/activation_store.json` under
a file lock, so concurrent collectors lose nothing; a dump inside the run is
recorded by its path relative to the run (a copied or moved run finds its own),
one under an external root by its absolute path. Every entry carries the
`collection_id` of the collection that wrote it: `registered_dump` refuses a
dump whose id differs (an `--overwrite` killed half-way through publishing
several dumps) and names an entry whose folder is gone.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from policy.io import locked, read_json, write_json
from policy.runs import stored_path
from sae.runs import registry_path
from sae.store import METADATA, Dump, open_dump

log = logging.getLogger(__name__)


def _registry_lock(run_dir: Path) -> Path:
    registry = registry_path(run_dir)
    return registry.with_name(registry.name + ".lock")


def check_registry_writable(run_dir: Path) -> None:
    """Fail before collecting, not after: a dump the registry cannot record would be complete but unfindable."""
    lock = _registry_lock(run_dir)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a"):
            pass
    except OSError as err:
        raise OSError(err.errno, f"cannot record dumps in {registry_path(run_dir)} ({err.strerror}): the run "
                                 "folder must be writable; to analyse a folder you cannot write, import it with "
                                 f"python -m policy.import_run --from {run_dir} --run_name NAME",
                      str(lock.parent)) from err  # fmt: skip


def new_collection_id() -> str:
    """One id for every dump one collection writes (in their metadata and their registry entries)."""
    return uuid.uuid4().hex


def read_registry(run_dir: Path) -> dict:
    """Name -> entry; each entry's `path` resolved (relative paths are relative to the run folder)."""
    path = registry_path(run_dir)
    if not path.is_file():
        return {}
    entries = read_json(path)
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]
        and isinstance(e.get("collection_id"), str | None) for e in entries.values()
    ):  # fmt: skip
        raise ValueError(f"{path} is not an activation registry (expected name -> {{'path': '...', "
                         "'collection_id': '...'}})")  # fmt: skip
    return {name: {**entry, "path": str(run_dir / entry["path"])} for name, entry in entries.items()}


def register_datasets(run_dir: Path, entries: dict[str, tuple[Path, dict]]) -> None:
    """Record `name -> (path, info)` for several dumps in one atomic write of activation_store.json (file-locked),
    each with the collection_id its metadata.json holds."""
    registry = registry_path(run_dir)
    with locked(_registry_lock(run_dir)):
        stored = read_json(registry) if registry.is_file() else {}
        for name, (path, info) in entries.items():
            meta = Path(path) / METADATA
            collection = read_json(meta).get("collection_id") if meta.is_file() else None
            new = stored_path(run_dir, path)
            old = stored.get(name, {}).get("path")
            if old is not None and (run_dir / old).absolute() != (run_dir / new).absolute():
                log.warning("the registry entry %r now points to %s (was %s): trainers read the new dump", name,
                            run_dir / new, run_dir / old)  # fmt: skip
            stored[name] = {"path": new, **info, "collection_id": collection}
        write_json(registry, stored)


def register_dataset(run_dir: Path, name: str, path: Path, info: dict | None = None) -> None:
    """Record one dump; see `register_datasets`."""
    register_datasets(run_dir, {name: (path, info or {})})


def registered_dump(run_dir: Path, name: str, entry: dict, verify: str = "cached") -> Dump:
    """Open a registry entry's dump: a clear error for a dangling entry or one another collection half-replaced."""
    path = Path(entry["path"])
    if not path.exists() and not path.with_name(path.name + ".partial").exists():
        raise FileNotFoundError(
            f"the registry of {run_dir} lists {name!r} at {path}, which no longer exists (a deleted activations "
            "root?); collect it again (the new collection replaces the entry)"
        )
    dump = open_dump(path, verify)
    expected, found = entry.get("collection_id"), dump.metadata.get("collection_id")
    if expected is not None and found != expected:
        raise ValueError(
            f"{path} was written by another collection ({found}) than the registry records ({expected}): "
            "an --overwrite was interrupted while publishing its dumps; collect again"
        )
    return dump
