"""Checks every config dataclass runs in `__post_init__`: field types and the torch device.

A config may come from a JSON file a user edited (`config.json`, `train_cfg.json`,
a pairs config), where `"embed_dim": "128"` or `null` would otherwise surface as a
TypeError deep inside torch. `check_types` turns that into one ValueError naming the field; a float field
holding NaN or Inf (`--lr nan`, `"aux_coef": NaN`) is one too.
"""

from __future__ import annotations

import dataclasses
import math

_SIMPLE = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_types(cfg) -> None:
    """Each field annotated int / float / str / bool (optionally `| None`) holds a value of that type; floats are
    finite."""
    for f in dataclasses.fields(cfg):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)
        parts = [p.strip() for p in annotation.split("|")]
        optional = "None" in parts
        kinds = [p for p in parts if p != "None"]
        if len(kinds) != 1 or kinds[0] not in _SIMPLE:
            continue
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        wrong_bool = isinstance(value, bool) and kinds[0] != "bool"
        if wrong_bool or not isinstance(value, _SIMPLE[kinds[0]]):
            raise ValueError(
                f"{f.name} must be {'a' if kinds[0] != 'int' else 'an'} {kinds[0]}"
                f"{' or null' if optional else ''}, got {value!r} ({type(value).__name__})"
            )
        if kinds[0] == "float" and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def check_device(device: str) -> str:
    """A torch device this machine has: `--device cuda` without CUDA is a one-line error, not a torch assert."""
    import torch  # here, not at the top: check_types serves the torch-free bookkeeping modules (clt.pairs)

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")  # fmt: skip
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    return device
