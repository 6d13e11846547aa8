"""Atomic file writes (a temp file in the same folder, fsync, then rename over the target) and file locks.

A crash leaves either the old file or the new one, never half of one. Files get
the usual permissions (0666 less the umask), and a target that is not a regular
file (a folder, a FIFO, a device node) is never replaced. `locked` serialises
read-modify-write updates (registries, sweep records) across processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)

_HELD = threading.local()
"""The locks this thread holds, `_HELD.locks`: lock file -> [open file, depth] (`locked` is re-entrant)."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then move the finished file to `path`."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file (a folder, FIFO or device); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # after `write`: mkstemp makes 0600, and writers that recreate the file too
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def error_reason(err: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, for a one-line error; `default` (else the exception's type name)
    when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else default or type(err).__name__


MAX_JSON_BYTES = 1 << 30
"""The largest JSON file read (a graph of many decisions stays far below it)."""


def read_json(path: str | Path):
    """Parse a JSON file; a broken one (bad syntax or encoding, nesting too deep, over MAX_JSON_BYTES) is a
    ValueError that names the file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size / 2**30:.1f} GiB: too large for a JSON file of this toolkit")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (corrupted?): {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (corrupted?): {err.reason} at byte {err.start}") from err
    except RecursionError as err:
        raise ValueError(f"{path} is nested too deeply to be one of this toolkit's JSON files") from err


def read_json_object(path: str | Path) -> dict:
    """`read_json` of a file that must hold a JSON object (a config, metadata)."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """`obj` as JSON, atomically (indent None: compact, and much faster for big documents)."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent) + "\n"))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def locked(lock_path: Path, busy: str | None = None) -> Iterator[None]:
    """An exclusive flock on `lock_path`, waiting while another process holds it (logging `busy` if given).

    Re-entrant within a thread; other threads and processes wait. The kernel drops the lock when its holder
    dies, even by kill -9.
    """
    locks = _HELD.__dict__.setdefault("locks", {})
    held = locks.get(lock_path)
    if held is not None:
        held[1] += 1
    else:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")  # noqa: SIM115 (held open past this block: the lock lives as long as the file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy:
                log.warning(busy)
            fcntl.flock(f, fcntl.LOCK_EX)
        held = locks[lock_path] = [f, 1]
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            del locks[lock_path]
            held[0].close()  # closing the file releases the flock
