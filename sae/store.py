"""Activation dumps on disk: writing them, reading them back, checking them.

A dump is a folder of `.npy` arrays, one per hook (or per side of a pair):

    <dump>/<array>.npy     [rows, dim] float32|float16; row i is (instance i // nodes, node i % nodes)
    <dump>/locs.npy        [instances, nodes, 2] the instances themselves
    <dump>/<array>_covariance.npy   [dim, dim] float64 covariance of the rows (for whitening)
    <dump>/metadata.json   written last: shapes, dtype, per-dim mean/std, sha256 per file, ...

`DumpWriter` streams rows into `<dump>.partial/` with bounded memory (each batch
goes to its place in the file by one positional write, and is hashed and added
to the running statistics as it goes) and renames the folder into place only
when every row and metadata.json are written, so an interrupted collection
never leaves a dump that looks complete. A writer owns its dump: it holds
`dump_lock` (an flock on `.<dump>.lock` beside it) from before it looks at the
dump until it has published it, so a second collector of the same dump waits
instead of writing into the first one's files. The space the arrays need is
allocated up front, so a full disk is a one-line error before any row is
computed, never a SIGBUS in the middle.

`open_dump` reads a dump back through memory maps (`mmap_mode='r'`, no pickle)
and says exactly what is wrong with a truncated or corrupted dump: metadata.json
is checked field by field (`check_metadata`), and every file against its sha256.
Checksums are verified once per file version: `verified.json` beside the arrays
records each verified file's (size, mtime, inode, sha256), written by the
collector itself and refreshed by the first reader after a change, so a file
modified in place is hashed again on its next read; `verify="always"` hashes
everything regardless. The registry that finds dumps is `sae.registry`'s.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from policy import __version__
from policy.io import file_sha256, locked, read_json, read_json_object, write_json
from sae.model import MAX_WIDTH

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
METADATA = "metadata.json"
VERIFIED = "verified.json"
MAX_ROWS = 1 << 40
COVARIANCE_SUFFIX = "_covariance.npy"


class RunningStats:
    """Per-dimension mean and std, and the covariance, over streamed rows (Chan et al.'s pairwise merge, float64).

    Each batch's own mean (float64) and centred co-moment x_c^T x_c (one GEMM in the rows' precision, float32 for
    the dumps' rows; its diagonal is the batch's spread) come from torch, multi-threaded, and are merged in
    float64; NaN or Inf in a batch makes them non-finite, which `update` reports by returning False.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)
        self.comoment = np.zeros((dim, dim))

    def update(self, x: np.ndarray | torch.Tensor) -> bool:  # [rows, dim]; False: the batch holds NaN or Inf
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(x, requirements="W"))
        n = x.shape[0]
        if n == 0:
            return True
        x = x if x.dtype == torch.float64 else x.float()  # float64 rows keep their precision
        mean = x.mean(0, dtype=torch.float64)
        centred = x - mean.to(x.dtype)
        batch_mean, batch_comoment = mean.numpy(), (centred.T @ centred).double().numpy()
        if not (np.isfinite(batch_mean).all() and np.isfinite(batch_comoment).all()):
            return False
        batch_m2 = np.diag(batch_comoment).copy()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.comoment = self.comoment + batch_comoment + np.outer(delta, delta) * self.count * n / total
        self.count = total
        return True

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))

    @property
    def covariance(self) -> np.ndarray:  # [dim, dim], population (divided by the row count)
        return self.comoment / max(self.count, 1)


def dump_path(path: str | Path) -> Path:
    """The folder a dump really lives in: a symlinked dump is written where its link points."""
    path = Path(path).absolute()
    return path.resolve() if path.is_symlink() else path


def dump_lock(path: str | Path):
    """Own the dump at `path` (an flock on `.<name>.lock` beside it); waits while another process does."""
    path = dump_path(path)
    return locked(path.with_name(f".{path.name}.lock"), f"another collection is writing {path}; waiting for it")


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space for the dump: it needs {needed / 2**20:.1f} MiB, "
                                    f"{free / 2**20:.1f} MiB are free", str(folder))  # fmt: skip


class NonFiniteRows(ValueError):
    """DumpWriter.write refused rows of `array` that hold NaN or Inf."""

    def __init__(self, array: str):
        super().__init__(f"NaN or Inf in the rows of {array}")
        self.array = array


@dataclass(frozen=True)
class AcceptedRows:
    """A batch DumpWriter.accept checked and placed at rows start..start+count-1, waiting for DumpWriter.store."""

    start: int
    count: int
    blocks: dict[str, np.ndarray]  # array name -> [count, dim] contiguous rows in the dump's dtype


class DumpWriter:
    """Writes arrays of a known row count into `<path>.partial/`, then moves them to `path`.

    Holds the dump's `dump_lock` from construction to `finish`/`abort`. Use as a context manager: an exception
    (Ctrl-C, a full disk included) removes the partial folder.
    """

    def __init__(self, path: Path, dims: dict[str, int], rows: int, dtype: str = "float32", overwrite: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if rows < 1:
            raise ValueError("a dump needs at least one row")
        self.path = dump_path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.dims, self.rows, self.dtype = dict(dims), rows, np.dtype(dtype)
        self.files: dict[str, int] = {}  # array name -> open file descriptor, until finish/abort
        self.offsets: dict[str, int] = {}  # array name -> where its rows start (after the .npy header)
        self.digests = {}  # array name -> sha256 of the bytes written so far
        self._lock = ExitStack()
        self._lock.enter_context(dump_lock(self.path))
        try:
            if self.path.exists() and not overwrite:
                raise FileExistsError(f"{self.path} already exists; pass --overwrite to replace it")
            shutil.rmtree(self.partial, ignore_errors=True)  # left by an interrupted run (we hold the lock)
            self.partial.mkdir(parents=True)
            _check_space(self.partial, sum(rows * d * self.dtype.itemsize for d in self.dims.values()))
            for name, dim in self.dims.items():
                self._allocate(name, dim)
        except BaseException:
            self.abort()
            raise
        self.stats = {name: RunningStats(dim) for name, dim in self.dims.items()}
        self.accepted = 0  # rows checked and placed (accept)
        self.cursor = 0  # rows on disk (store)

    def _allocate(self, name: str, dim: int) -> None:
        """Create `<name>.npy` (header, then its blocks reserved on disk so that a full disk fails here, not mid-way),
        keep it open for positional writes, and start its sha256 with the header's bytes."""
        file = self.partial / f"{name}.npy"
        header = open_memmap(file, mode="w+", dtype=self.dtype, shape=(self.rows, dim))  # writes the .npy header
        self.offsets[name] = offset = header.offset
        del header
        self.files[name] = fd = os.open(file, os.O_RDWR)
        self.digests[name] = hashlib.sha256(os.pread(fd, offset, 0))
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, offset + self.rows * dim * self.dtype.itemsize)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise OSError(errno.ENOSPC, "disk full while reserving the dump's space", str(file)) from err
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot preallocate
                    raise

    def _close_files(self, sync: bool) -> None:
        """Close the arrays' files, each after an fsync when `sync`."""
        while self.files:
            _, fd = self.files.popitem()
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Append the same number of rows to every array; NaN or Inf in them is refused (NonFiniteRows)."""
        self.store(self.accept(arrays))

    def accept(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> AcceptedRows:
        """The checking half of `write`: names, widths, room and NaN/Inf checked, the rows added to the statistics
        and given their place after every row accepted before; `store` writes them. (sae.collection_loop stores batch i
        on a worker thread while the policy computes batch i+1.)"""
        if set(arrays) != set(self.dims):
            raise ValueError(f"expected arrays {sorted(self.dims)}, got {sorted(arrays)}")
        arrays = {
            k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()
        }
        counts = {v.shape[0] for v in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"arrays have different row counts: { {k: v.shape for k, v in arrays.items()} }")
        n = counts.pop()
        if self.accepted + n > self.rows:
            raise ValueError(f"writing {n} rows at row {self.accepted} overflows the dump's {self.rows} rows")
        for name, values in arrays.items():
            if values.shape[1:] != (self.dims[name],):
                raise ValueError(f"{name}: rows of width {values.shape[1:]}, expected ({self.dims[name]},)")
            if not self.stats[name].update(values):
                raise NonFiniteRows(name)
        blocks = {name: np.ascontiguousarray(values, dtype=self.dtype) for name, values in arrays.items()}
        self.accepted += n
        return AcceptedRows(self.accepted - n, n, blocks)

    def store(self, rows: AcceptedRows) -> None:
        """The writing half of `write`: accepted rows to their files (and checksums), in the order accepted."""
        if rows.start != self.cursor:
            raise ValueError(f"rows accepted at row {rows.start} stored at row {self.cursor}: store them in order")
        for name, block in rows.blocks.items():
            self.digests[name].update(block)
            data, position = memoryview(block).cast("B"), self.offsets[name] + self.cursor * block.strides[0]
            while data:  # the blocks were reserved by _allocate, so this cannot hit a full disk
                written = os.pwrite(self.files[name], data, position)
                data, position = data[written:], position + written
        self.cursor += rows.count

    def add_file(self, name: str, array: np.ndarray) -> None:
        """A small extra array saved whole (e.g. the instances)."""
        np.save(self.partial / f"{name}.npy", array, allow_pickle=False)

    def finish(self, metadata: dict, publish: bool = True) -> Path:
        """Checksum and write metadata.json; then (unless `publish=False`, see `publish`) move the dump into place."""
        if self.cursor != self.rows:
            raise ValueError(f"dump incomplete: {self.cursor} of {self.rows} rows written")
        arrays = {
            name: {
                "file": f"{name}.npy",
                "shape": [self.rows, dim],
                "mean": self.stats[name].mean.tolist(),
                "std": self.stats[name].std.tolist(),
                "covariance_file": f"{name}{COVARIANCE_SUFFIX}",
            }
            for name, dim in self.dims.items()
        }
        for name in self.dims:
            np.save(self.partial / arrays[name]["covariance_file"], self.stats[name].covariance, allow_pickle=False)
        self._close_files(sync=True)  # every row on disk before metadata.json says the dump is complete
        hashed = {f"{name}.npy": digest.hexdigest() for name, digest in self.digests.items()}  # as written
        files = {p.name: hashed.get(p.name) or file_sha256(p) for p in sorted(self.partial.glob("*.npy"))}
        meta = {
            **metadata,
            "dtype": self.dtype.name,
            "rows": self.rows,
            "arrays": arrays,
            "sha256": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "package_version": __version__,
        }
        write_json(self.partial / METADATA, meta)
        _record_verified(self.partial, files)
        if publish:
            self.publish()
        return self.path

    def publish(self) -> Path:
        """Move the finished dump into place (replacing an old one) and release the lock."""
        if self.path.exists():
            old = self.path.with_name(self.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            shutil.rmtree(old)
        os.replace(self.partial, self.path)
        self._lock.close()
        return self.path

    def abort(self) -> None:
        self._close_files(sync=False)
        shutil.rmtree(self.partial, ignore_errors=True)
        self._lock.close()


@dataclass
class Dump:
    """A complete dump opened read-only: arrays are memory maps."""

    path: Path
    metadata: dict
    arrays: dict[str, np.ndarray]

    def describe(self) -> str:
        """Where the dump is and what it was collected from, for a trainer's log."""
        m = self.metadata
        return (f"{self.path} ({m.get('num_instances')} {m.get('distribution')} instances of "
                f"{m.get('nodes_per_instance')} nodes, seed {m.get('seed')}, checkpoint epoch "
                f"{m.get('checkpoint_epoch')}, collected {m.get('created')})")  # fmt: skip

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

    def covariance(self, name: str) -> np.ndarray:
        """[dim, dim] float64 covariance of the array's rows, as the collector measured it while writing."""
        file = self.metadata["arrays"][name].get("covariance_file")
        if file is None or not (self.path / file).is_file():
            raise ValueError(f"{self.path} has no covariance of {name} (collected before dumps stored one): "
                             "collect it again with --overwrite to whiten")  # fmt: skip
        covariance = np.load(self.path / file, allow_pickle=False)
        dim = self.metadata["arrays"][name]["shape"][1]
        if covariance.shape != (dim, dim) or not np.isfinite(covariance).all():
            raise ValueError(f"{self.path / file}: expected a finite [{dim}, {dim}] covariance")
        return covariance


def open_dump(path: str | Path, verify: str = "cached") -> Dump:
    """Open a dump, checking its metadata, every array's shape, dtype and size, and every file's sha256
    (`verify`: "cached", once per file version; "always"; "never", for a writer that just made it)."""
    path = Path(path)
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        if partial.exists():
            raise ValueError(f"{path} is incomplete: an interrupted collection left {partial.name}; collect again")
        raise FileNotFoundError(f"no activation dump at {path}")
    meta_path = path / METADATA
    if not meta_path.is_file():
        raise ValueError(f"{path} has no {METADATA}: not a complete dump (interrupted, or not a dump)")
    meta = read_json_object(meta_path)
    try:
        check_metadata(meta)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{meta_path}: {err}") from err
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
        shape, fortran, file_dtype, offset = header
        if fortran:
            raise ValueError(f"{file} is stored in Fortran (column-major) order; dumps are row-major: collect again")
        if list(shape) != [rows, dim] or file_dtype != dtype:
            raise ValueError(f"{file} holds {file_dtype} {list(shape)}, metadata.json says {dtype} [{rows}, {dim}]")
        expected = offset + rows * dim * dtype.itemsize
        size = file.stat().st_size
        if size != expected:
            raise ValueError(
                f"{file} is truncated or padded: {size} bytes, expected {expected} ({rows} x {dim} {dtype} + header)"
            )
        arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
    if verify != "never":
        verify_checksums(path, meta["sha256"], cached=verify == "cached")
    return Dump(path, meta, arrays)


def check_metadata(meta: dict) -> None:
    """A dump's metadata.json, field by field: a ValueError saying what is wrong."""

    def whole(name: str, value, low: int = 1, high: int = MAX_ROWS) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
        return value

    def plain_name(name: str, value) -> None:
        if not isinstance(value, str) or not value or value != Path(value).name or value.startswith("."):
            raise ValueError(f"{name} must be a plain file name in the dump, got {value!r}")

    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {meta.get('dtype')!r}")
    rows = whole("rows", meta.get("rows"))
    if "num_instances" in meta or "nodes_per_instance" in meta:  # every collector's dumps: rows grouped by instance
        num_instances = whole("num_instances", meta.get("num_instances"))
        nodes = whole("nodes_per_instance", meta.get("nodes_per_instance"))
        if rows != num_instances * nodes:
            raise ValueError(f"rows ({rows}) must be num_instances x nodes_per_instance ({num_instances} x {nodes})")
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError("arrays must be a non-empty object: array name -> {file, shape, mean, std}")
    for name, info in arrays.items():
        if not isinstance(info, dict):
            raise ValueError(f"arrays.{name} must be an object")
        plain_name(f"arrays.{name}.file", info.get("file"))
        if info.get("covariance_file") is not None:
            plain_name(f"arrays.{name}.covariance_file", info["covariance_file"])
        shape = info.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise ValueError(f"arrays.{name}.shape must be [rows, dim], got {shape!r}")
        if whole(f"arrays.{name}.shape[0]", shape[0]) != rows:
            raise ValueError(f"arrays.{name} has {shape[0]} rows, the dump {rows}")
        dim = whole(f"arrays.{name}.shape[1]", shape[1], high=MAX_WIDTH)
        for stat in ("mean", "std"):
            values = info.get(stat)
            if not isinstance(values, list) or len(values) != dim:
                raise ValueError(f"arrays.{name}.{stat} must be a list of {dim} numbers")
            numbers = np.asarray(values, dtype=np.float64) if all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values) else None  # fmt: skip
            if numbers is None or not np.isfinite(numbers).all() or (stat == "std" and (numbers < 0).any()):
                raise ValueError(f"arrays.{name}.{stat} must hold {dim} finite numbers"
                                 f"{' >= 0' if stat == 'std' else ''}")  # fmt: skip
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(d, str) for d in digests.values()):
        raise ValueError("sha256 must be an object: file name -> hex digest")
    for file in digests:
        plain_name("a sha256 entry", file)
    missing = sorted({info["file"] for info in arrays.values()} - set(digests))
    if missing:
        raise ValueError(f"sha256 has no digest of {', '.join(missing)}")


def verify_checksums(path: Path, digests: dict[str, str], cached: bool = True) -> None:
    """Every file of `digests` against its sha256 (a ValueError naming the first that differs), skipping those
    `verified.json` records as verified in their present version (size, mtime, inode) when `cached`."""
    record = _read_verified(path) if cached else {}
    changed = False
    for name, digest in digests.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{path}: {name} is missing")
        if record.get(name) == [*_version(file), digest]:
            continue
        if file_sha256(file) != digest:
            raise ValueError(f"{file}: sha256 differs from metadata.json: the file is corrupted or was modified")
        record[name] = [*_version(file), digest]
        changed = True
    if changed:
        with contextlib.suppress(OSError):  # a read-only dump is verified again next time
            write_json(path / VERIFIED, record)


def _version(file: Path) -> list[int]:
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_verified(path: Path) -> dict:
    try:
        record = read_json(path / VERIFIED)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _record_verified(path: Path, digests: dict[str, str]) -> None:
    write_json(path / VERIFIED, {name: [*_version(path / name), digest] for name, digest in digests.items()})


def data_identity(dump: Dump) -> dict:
    """What a dictionary run records of each dump it trains on (train_cfg.json's `datasets`): the collection that
    wrote it and the sha256 of its metadata.json, which holds every array's own sha256."""
    return {"path": str(dump.path), "collection_id": dump.metadata.get("collection_id"),
            "created": dump.metadata.get("created"), "metadata_sha256": file_sha256(dump.path / METADATA)}  # fmt: skip


def check_resumed_data(out_dir: Path, dumps: list[Dump]) -> None:
    """A resumed run continues on the data it started on: a ValueError naming both when a dump changed (collected
    again, or edited). Runs that recorded no `datasets` are resumed with a warning."""
    recorded = read_json_object(out_dir / "train_cfg.json").get("datasets")
    if not isinstance(recorded, list) or len(recorded) != len(dumps):
        log.warning("%s records no data identity: cannot check that it resumes on the data it started on", out_dir)
        return
    for old, dump in zip(recorded, dumps, strict=True):
        new = data_identity(dump)
        if not isinstance(old, dict) or old.get("metadata_sha256") != new["metadata_sha256"]:
            old = old if isinstance(old, dict) else {}
            raise ValueError(
                f"--resume of {out_dir} refused: it trained on {old.get('path')} as collected "
                f"{old.get('created')} (collection {old.get('collection_id')}), but {dump.path} now holds the "
                f"collection of {new['created']} ({new['collection_id']}); finishing on other data would mix two "
                "datasets: start a new run instead"
            )


def reusable(path: Path, request: dict, overwrite: bool, hint: str = "pass --overwrite") -> bool:
    """Whether the complete dump at `path` can serve `request` (call it under `dump_lock`).

    False when there is none or `overwrite` replaces it; a FileExistsError (with `hint`) when it was made with
    other arguments: a metadata value differs from the request's.
    """
    if overwrite or not path.exists():
        return False
    existing = open_dump(path, verify="never").metadata
    if any(existing.get(k) != v for k, v in request.items()):
        raise FileExistsError(f"{path} holds a dump made with other arguments; {hint}")
    log.info("reusing the complete dump %s (pass --overwrite to collect again)", path)
    return True


def _npy_header(file: Path):
    """(shape, fortran order, dtype, data offset) from a .npy header, or None if it is not one."""
    try:
        with open(file, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            return shape, fortran, dtype, f.tell()
    except (ValueError, OSError):
        return None
