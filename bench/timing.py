"""Wall-clock reads that are right on CUDA too, for the benchmarks."""

import time

import torch


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has done the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
