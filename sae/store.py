"""Activation dumps on disk, and the registry that finds them.

A dump is a folder of `.npy` arrays, one per hook (or per side of a pair):

    <dump>/<array>.npy     [rows, dim] float32|float16; row i is (instance i // nodes, node i % nodes)
    <dump>/locs.npy        [instances, nodes, 2] the instances themselves
    <dump>/metadata.json   written last: shapes, dtype, per-dim mean/std, sha256 per file, ...

`DumpWriter` streams rows into `<dump>.partial/` with bounded memory (a memory
map over just the rows being written) and renames the folder into place only
when every row and metadata.json are written, so an interrupted collection
never leaves a dump that looks complete. `open_dump` reads one back through
memory maps (`mmap_mode='r'`, no pickle) and says exactly what is wrong with a
truncated or corrupted dump. `register_dataset` records a dump in the run's
`sae/activation_store.json` under a file lock, so concurrent collectors lose nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from policy.io import file_sha256, read_json, write_json
from sae.runs import registry_path

DTYPES = ("float32", "float16")
METADATA = "metadata.json"


class RunningStats:
    """Per-dimension mean and std over streamed rows (Chan et al.'s pairwise merge, float64)."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, x: np.ndarray) -> None:  # [rows, dim]
        x = x.astype(np.float64, copy=False)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(axis=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


def package_version() -> str:
    try:
        return version("tsp-interp")
    except PackageNotFoundError:
        return "unknown"


class DumpWriter:
    """Writes arrays of a known row count into `<path>.partial/`, then moves them to `path`.

    Use as a context manager: an exception (Ctrl-C included) removes the partial folder.
    """

    def __init__(self, path: Path, dims: dict[str, int], rows: int, dtype: str = "float32", overwrite: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if rows < 1:
            raise ValueError("a dump needs at least one row")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass --overwrite to replace it")
        self.partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)  # left by an earlier interrupted run
        self.partial.mkdir(parents=True)
        self.dims, self.rows, self.dtype = dict(dims), rows, np.dtype(dtype)
        self.offsets = {}
        for name, dim in self.dims.items():
            mm = open_memmap(self.partial / f"{name}.npy", mode="w+", dtype=self.dtype, shape=(rows, dim))
            self.offsets[name] = mm.offset
            del mm
        self.stats = {name: RunningStats(dim) for name, dim in self.dims.items()}
        self.cursor = 0

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Append the same number of rows to every array."""
        if set(arrays) != set(self.dims):
            raise ValueError(f"expected arrays {sorted(self.dims)}, got {sorted(arrays)}")
        arrays = {
            k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()
        }
        counts = {v.shape[0] for v in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"arrays have different row counts: { {k: v.shape for k, v in arrays.items()} }")
        n = counts.pop()
        if self.cursor + n > self.rows:
            raise ValueError(f"writing {n} rows at row {self.cursor} overflows the dump's {self.rows} rows")
        for name, values in arrays.items():
            if values.shape[1:] != (self.dims[name],):
                raise ValueError(f"{name}: rows of width {values.shape[1:]}, expected ({self.dims[name]},)")
            self.stats[name].update(values)
            window = np.memmap(
                self.partial / f"{name}.npy",
                dtype=self.dtype,
                mode="r+",
                offset=self.offsets[name] + self.cursor * self.dims[name] * self.dtype.itemsize,
                shape=(n, self.dims[name]),
            )  # only these rows are mapped, so memory stays bounded
            window[:] = values
            window.flush()
            del window
        self.cursor += n

    def add_file(self, name: str, array: np.ndarray) -> None:
        """A small extra array saved whole (e.g. the instances)."""
        np.save(self.partial / f"{name}.npy", array, allow_pickle=False)

    def finish(self, metadata: dict) -> Path:
        """Checksum, write metadata.json, and move the dump into place."""
        if self.cursor != self.rows:
            raise ValueError(f"dump incomplete: {self.cursor} of {self.rows} rows written")
        arrays = {
            name: {
                "file": f"{name}.npy",
                "shape": [self.rows, dim],
                "mean": self.stats[name].mean.tolist(),
                "std": self.stats[name].std.tolist(),
            }
            for name, dim in self.dims.items()
        }
        files = {p.name: file_sha256(p) for p in sorted(self.partial.glob("*.npy"))}
        meta = {
            **metadata,
            "dtype": self.dtype.name,
            "rows": self.rows,
            "arrays": arrays,
            "sha256": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "package_version": package_version(),
        }
        write_json(self.partial / METADATA, meta)
        if self.path.exists():
            old = self.path.with_name(self.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            shutil.rmtree(old)
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


@dataclass
class Dump:
    """A complete dump opened read-only: arrays are memory maps."""

    path: Path
    metadata: dict
    arrays: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return self.metadata["rows"]

    @property
    def nodes_per_instance(self) -> int:
        return self.metadata["nodes_per_instance"]

    @property
    def num_instances(self) -> int:
        return self.metadata["num_instances"]

    def stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        info = self.metadata["arrays"][name]
        return np.asarray(info["mean"], dtype=np.float32), np.asarray(info["std"], dtype=np.float32)


def open_dump(path: str | Path, verify: bool = False) -> Dump:
    """Open a dump, checking every array's shape, dtype and size (and sha256 when `verify`)."""
    path = Path(path)
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        if partial.exists():
            raise ValueError(f"{path} is incomplete: an interrupted collection left {partial.name}; collect again")
        raise FileNotFoundError(f"no activation dump at {path}")
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise ValueError(f"{path} has no {METADATA}: not a complete dump (interrupted, or not a dump)")
    meta = read_json(meta_path)
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for name, info in meta["arrays"].items():
        file = path / info["file"]
        rows, dim = info["shape"]
        if not file.is_file():
            raise ValueError(f"{path}: {info['file']} is missing")
        header = _npy_header(file)
        if header is None:
            raise ValueError(f"{file} is corrupted: not a .npy file")
        shape, file_dtype, offset = header
        if list(shape) != [rows, dim] or file_dtype != dtype:
            raise ValueError(f"{file} holds {file_dtype} {list(shape)}, metadata.json says {dtype} [{rows}, {dim}]")
        expected = offset + rows * dim * dtype.itemsize
        size = file.stat().st_size
        if size != expected:
            raise ValueError(
                f"{file} is truncated or padded: {size} bytes, expected {expected} ({rows} x {dim} {dtype} + header)"
            )
        arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
    if verify:
        for name, digest in meta["sha256"].items():
            if not (path / name).is_file():
                raise ValueError(f"{path}: {name} is missing")
            if file_sha256(path / name) != digest:
                raise ValueError(
                    f"{path / name}: sha256 differs from metadata.json: the file is corrupted or was modified"
                )
    return Dump(path, meta, arrays)


def _npy_header(file: Path):
    """(shape, dtype, data offset) from a .npy header, or None if it is not one."""
    try:
        with open(file, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            return shape, dtype, f.tell()
    except (ValueError, OSError):
        return None


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_registry(run_dir: Path) -> dict:
    path = registry_path(run_dir)
    if not path.is_file():
        return {}
    return read_json(path)


def register_dataset(run_dir: Path, name: str, path: Path, info: dict | None = None) -> None:
    """Record `name -> path` in the run's activation_store.json (atomic, under a file lock)."""
    registry = registry_path(run_dir)
    with _locked(registry.with_name(registry.name + ".lock")):
        entries = read_registry(run_dir)
        entries[name] = {"path": str(Path(path).resolve()), **(info or {})}
        write_json(registry, entries)
