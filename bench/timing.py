"""Devices and wall-clock reads for the benchmarks, right on CUDA too."""

import time

import click
import torch

from policy.checks import check_device


def cli_device(name: str) -> torch.device:
    """The torch device that --device names; a one-line usage error where this machine has none such."""
    try:
        return torch.device(check_device(name))
    except ValueError as err:
        raise click.UsageError(str(err)) from err


def device_name(device: torch.device) -> str:
    """What the JSON reports as the device: the GPU's model on CUDA ("NVIDIA H200"), else cpu, mps, ..."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has done the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
