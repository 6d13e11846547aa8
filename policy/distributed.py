"""torch.distributed for the trainers: one process per rank under torchrun, DDP for the gradients.

    torchrun --nproc_per_node 2 -m clt.train_transcoder --run_dir R --pair P ...
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \
             -m clt.train_transcoder ...

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it
the process is rank 0 of 1 and nothing is initialised. The backend is NCCL for CUDA, gloo
otherwise. Every rank walks the same global batches and keeps its slice (sae.data.RowStream),
so N ranks see exactly the rows one process would; only rank 0 logs and writes files.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistInfo()


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """(DistInfo, this rank's device): a process group when torchrun started more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info, device


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks, in place (a no-op on one process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value, info: DistInfo):
    """Rank 0's `value` on every rank (any picklable object made by this program)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def synchronize(info: DistInfo) -> None:
    """Wait for every rank (a barrier): ranks then leave together, so none tears the group down early."""
    if info.enabled:
        dist.barrier()


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not under torchrun at all)."""
    return os.environ.get("RANK", "0") == "0"


def shutdown(info: DistInfo) -> None:
    """Destroy the process group, after collecting what still holds it (a DDP wrapper in a reference cycle)."""
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
