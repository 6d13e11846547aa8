"""The collection loop both collectors share (sae.collect_activations, clt.collect_pairs).

Instances come in fixed seeded chunks, so instance ids never depend on the batch size;
one forward pass per batch feeds every dump that is being written.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from policy.env import generate
from policy.heap import keep_freed_memory, release_free_memory
from policy.loading import LoadedPolicy
from sae.hooks import HookedPolicy
from sae.store import AcceptedRows, DumpWriter, NonFiniteRows

INSTANCE_CHUNK = 1024
"""Instances are drawn in fixed chunks (seeded by seed and chunk index), so ids do not depend on batch size."""

TRIM_BYTES = 256 * 2**20
"""Freed heap goes back to the OS after every this many bytes of activations (a trim is not free): the heap keeps a
batch's freed blocks for the next one (policy.heap), and without trims its resident size creeps up with the dump."""


def collection_request(policy: LoadedPolicy, num_instances: int, num_loc: int, distribution: str, seed: int,
                       dtype: str) -> dict:  # fmt: skip
    """What makes a collection's rows what they are: a complete dump recorded with the same values serves again
    (sae.store.reusable), and every dump's metadata.json holds them."""
    return {"num_instances": num_instances, "nodes_per_instance": num_loc, "distribution": distribution,
            "seed": seed, "dtype": dtype, "checkpoint_sha256": policy.checkpoint_sha256}  # fmt: skip


def provenance(policy: LoadedPolicy, request: dict) -> dict:
    """Where a dump's rows came from, for its metadata.json: the instance ids, the run and its checkpoint."""
    ids = {"first": 0, "count": request["num_instances"], "seed": request["seed"], "chunk": INSTANCE_CHUNK}
    return {"instance_ids": ids, "run_dir": str(policy.run_dir.resolve()), "checkpoint_epoch": policy.epoch}


def instance_batches(
    num_instances: int, num_loc: int, distribution: str, seed: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Instances 0..num_instances-1 in order, `batch_size` at a time, the same for any batch size."""
    buffer = torch.empty(0, num_loc, 2)
    for start in range(0, num_instances, INSTANCE_CHUNK):
        count = min(INSTANCE_CHUNK, num_instances - start)
        chunk = generate(count, num_loc, distribution, seed=seed * 1_000_003 + start // INSTANCE_CHUNK)
        buffer = torch.cat([buffer, chunk])
        while buffer.shape[0] >= batch_size:
            yield buffer[:batch_size]
            buffer = buffer[batch_size:]
    if buffer.shape[0]:
        yield buffer


Route = tuple[DumpWriter, dict[str, str]]
"""A writer and the hooks it takes: {hook name: array name in that dump}."""


def collect(
    hooked: HookedPolicy,
    batches: Iterator[torch.Tensor],
    routes: list[Route],
    total: int,
    tours: np.ndarray | None = None,
) -> np.ndarray:
    """One forward per batch serves every route; returns all instances [N, n, 2].

    Decoder points are read along the policy's greedy tours, or along `tours` [N, n] (teacher forcing) when given.
    Each batch's rows are checked and added to the statistics here (torch's threads), then written to disk with
    their checksums on a worker thread while the next batch's forward runs (at most one batch in flight).
    Non-finite activations stop the collection with a ValueError (the writers refuse them, and then discard their
    dumps). Freed memory stays in the process's heap for the next batch (policy.heap.keep_freed_memory).
    """
    keep_freed_memory()
    device = next(hooked.model.parameters()).device
    names = sorted({hook for _, mapping in routes for hook in mapping})
    locs_seen, done, since_trim = [], 0, 0
    pending: Future | None = None  # the previous batch's write; the pool's exit waits for it, also on errors
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-writer") as pool, \
            tqdm(total=total, desc="collecting", unit="inst") as bar:  # fmt: skip
        for locs in batches:
            follow = {}
            if tours is not None:  # [batch, S=1, node], the tours to teacher-force
                follow["actions"] = torch.as_tensor(tours[done : done + len(locs)], device=device)[:, None]
            cache = hooked.run_with_cache(locs.to(device), names, **follow)
            rows = {hook: value.reshape(-1, value.shape[-1]) for hook, value in cache.items()}  # [batch * node, d]
            accepted = [_accept(writer, mapping, rows, done, done + len(locs) - 1) for writer, mapping in routes]
            if pending is not None:
                pending.result()
            pending = pool.submit(_store, routes, accepted)
            locs_seen.append(locs.numpy())
            done += len(locs)
            since_trim += sum(value.nbytes for value in rows.values())
            if since_trim >= TRIM_BYTES:
                release_free_memory()
                since_trim = 0
            bar.update(len(locs))
        if pending is not None:
            pending.result()
    return np.concatenate(locs_seen)


def _accept(writer: DumpWriter, mapping: dict[str, str], rows: dict[str, torch.Tensor], first: int, last: int):
    """A route's arrays of one batch (instances first..last) checked and counted by its writer."""
    try:
        return writer.accept({array: rows[hook] for hook, array in mapping.items()})
    except NonFiniteRows as err:
        hook = next(h for h, a in mapping.items() if a == err.array)
        raise ValueError(f"NaN or Inf in {hook} activations of instances {first}..{last}") from None


def _store(routes: list[Route], accepted: list[AcceptedRows]) -> None:
    for (writer, _), rows in zip(routes, accepted, strict=True):
        writer.store(rows)


def hook_dims(hooked: HookedPolicy, names: list[str], num_loc: int) -> dict[str, int]:
    """Width of each hook's rows (d, or the node count for decoder.logits), from one tiny forward."""
    device = next(hooked.model.parameters()).device
    probe = hooked.run_with_cache(generate(1, num_loc, seed=0).to(device), names)
    return {name: probe[name].shape[-1] for name in names}
