"""Pair streaming benchmark; prints one JSON object.

    python -m bench.datasets [--gb 4.0] [--budget_gb 1.0] [--batch_size 1024] [--dir /tmp]

Writes a synthetic pair dump of `--gb` GB (sources and targets, d=128, float32)
with sae's DumpWriter, then streams one epoch of training batches with
clt.datasets.PairDataset in a fresh process per measurement:
- `disk_cold`: from the files, after asking the kernel to drop them from its page cache;
- `disk_warm`: from the files again (page cache warm);
- `memory`: the same rows copied into RAM first (only the streaming is timed).
Each child reports its batches/s and peak RSS (VmHWM). Target: the disk
runs within the memory budget at 80% or more of the in-memory throughput.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench.peak import peak_rss_gb
from clt.datasets import PairDataset
from sae.store import DumpWriter


def write_dump(path: Path, gigabytes: float, dim: int = 128, nodes: int = 20) -> int:
    rows = int(gigabytes * 1e9 / (2 * dim * 4)) // nodes * nodes
    rng = np.random.default_rng(0)
    chunk = 200_000
    with DumpWriter(path, {"sources": dim, "targets": dim}, rows) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            x = rng.standard_normal((n, dim), dtype=np.float32)
            writer.write({"sources": x, "targets": np.tanh(x)})
        writer.finish({"num_instances": rows // nodes, "nodes_per_instance": nodes, "kind": "clt_pair"})
    return rows


def drop_page_cache(path: Path) -> None:
    for file in path.glob("*.npy"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def stream(path: str, mode: str, batch_size: int) -> dict:
    """One epoch of training batches; runs in a child process."""
    ds = PairDataset(path, batch_size=batch_size, val_ratio=0.0)
    if mode == "memory":
        for reader in ds.train.readers.values():
            reader.array, reader.fd = np.array(reader.array), None
    tic = time.perf_counter()
    batches = rows = 0
    for x, _ in ds.train_batches(0):
        batches += 1
        rows += x.shape[0]
    seconds = time.perf_counter() - tic
    return {
        "batches_per_s": round(batches / seconds, 1),
        "rows_per_s": round(rows / seconds),
        "seconds": round(seconds, 2),
        "peak_rss_gb": peak_rss_gb(),
    }


def run_child(path: Path, mode: str, batch_size: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.datasets",
        "--child",
        mode,
        "--path",
        str(path),
        "--batch_size",
        str(batch_size),
    ]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


@click.command()
@click.option("--gb", default=4.0, help="Size of the synthetic pair dump.")
@click.option("--budget_gb", default=1.0, help="Memory budget the disk streaming must stay within.")
@click.option("--batch_size", default=1024, help="Rows per batch.")
@click.option("--dir", "folder", default=None, help="Where to write the dump [default: a temp folder].")
@click.option("--child", type=click.Choice(["disk", "memory"]), default=None, help="Internal: stream in this process.")
@click.option("--path", default=None, help="Internal: the dump a child streams.")
def main(gb, budget_gb, batch_size, folder, child, path):
    """Streaming throughput from disk vs memory, and peak RSS, for clt.datasets."""
    if child:
        click.echo(json.dumps(stream(path, child, batch_size)))
        return
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        dump = Path(tmp) / "pair"
        tic = time.perf_counter()
        rows = write_dump(dump, gb)
        size = sum(p.stat().st_size for p in dump.glob("*.npy"))
        result = {"dump_gb": round(size / 1e9, 3), "rows": rows, "batch_size": batch_size,
                  "write_seconds": round(time.perf_counter() - tic, 1), "budget_gb": budget_gb}  # fmt: skip
        drop_page_cache(dump)
        result["disk_cold"] = run_child(dump, "disk", batch_size)
        result["disk_warm"] = run_child(dump, "disk", batch_size)
        result["memory"] = run_child(dump, "memory", batch_size)
    memory_rate = result["memory"]["batches_per_s"]
    for key in ("disk_cold", "disk_warm"):
        result[key]["fraction_of_memory_throughput"] = round(result[key]["batches_per_s"] / memory_rate, 3)
        result[key]["within_budget"] = result[key]["peak_rss_gb"] <= budget_gb
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
