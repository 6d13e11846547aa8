"""Every `torch.load` of the project goes through `load_torch_file`; tensors are written by `save_tensors`
(safetensors) and `save_torch` (torch.save of plain containers), atomically (policy.io).

`torch.load` is more than an unpickler: a zip archive that holds `constants.pkl`
is handed to `torch.jit.load`, which runs the TorchScript code stored in the file
(a scripted `__setstate__` can write any file), whatever `pickle_module` is given.
So a file is identified by its first bytes and its zip records before any torch
loader sees it, and only the two plain tensor-pickle formats pass:

- `zip`: `torch.save` since PyTorch 1.6. One top-level folder holding `data.pkl`,
  the storages `data/<n>` and torch's small bookkeeping records; nothing else
  (no `code/`, no `constants.pkl`, no extra files).
- `legacy`: `torch.save` before 1.6 (Kool et al.'s checkpoints): a pickle stream
  that starts with torch's magic number, and is not a tar archive (torch's oldest
  loader would extract one, following its links).

Then the pickle itself is read either by torch's weights-only unpickler, or (for
Lightning checkpoints, which pickle whole objects) by `RestrictedUnpickler`, which
rebuilds tensors and plain containers and turns every other class into an inert
`Stub`: nothing is imported, nothing is called.
"""

from __future__ import annotations

import collections
import errno
import pickle
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from policy.io import atomic_write, error_reason

ACCEPTED = "a torch.save zip of tensors, or torch's legacy (pre-1.6) tensor pickle"

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number torch's legacy format pickles first
_LEGACY_PREFIX = re.compile(rb"\x80[\x02-\x05]\x8a\x0a" + re.escape(_LEGACY_MAGIC.to_bytes(10, "little")))
_ZIP_RECORDS = re.compile(
    r"data\.pkl|version|byteorder|\.format_version|\.storage_alignment|\.data/version|\.data/serialization_id|data/\d+"
)


class UnsafeFileError(ValueError):
    """A file that is not a plain tensor pickle; it is never handed to torch."""


def identify(path: str | Path) -> str:
    """`zip` or `legacy` for a plain tensor pickle; UnsafeFileError (one line) for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from err
    if head.startswith(_ZIP_MAGIC):
        _check_zip_records(path)
        return "zip"
    if _LEGACY_PREFIX.match(head):
        if _is_tar(path):
            raise UnsafeFileError(f"{path} is a tar archive whose first member is named like torch's legacy "
                                  f"format; refused. Expected {ACCEPTED}")  # fmt: skip
        return "legacy"
    kind = "a safetensors file (not loaded with torch.load)" if _looks_like_safetensors(head) else "of no known format"
    raise UnsafeFileError(f"{path} is {kind}; expected {ACCEPTED}")


def _check_zip_records(path: Path) -> None:
    """Refuse a zip that holds anything but data.pkl, storages and bookkeeping (TorchScript: code/, constants.pkl)."""
    try:
        records = torch._C.PyTorchFileReader(str(path)).get_all_records()  # the reader torch.load itself uses
    except RuntimeError as err:
        raise UnsafeFileError(
            f"{path} is a zip archive torch cannot read (corrupt, truncated or compressed); expected {ACCEPTED}"
        ) from err
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        raise UnsafeFileError(
            f"{path} is a TorchScript archive (it holds code); refused: loading it would run that code. "
            f"Expected {ACCEPTED}"
        )
    foreign = sorted(r for r in records if not _ZIP_RECORDS.fullmatch(r))
    if foreign or "data.pkl" not in records:
        what = f"holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}" if foreign else "has no data.pkl"
        raise UnsafeFileError(f"{path} is a zip archive that is not a torch.save tensor file (it {what}); refused")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)  # reads the first header block only
    except OSError:
        return False


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) > 9 and head[8:9] == b"{"


# Everything RestrictedUnpickler resolves by name: the functions torch uses to rebuild
# tensors, and plain data types. Anything else becomes a Stub.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,  # legacy (pre-1.6) files
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    **{("torch", str(dt).removeprefix("torch.")): dt for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )},
}  # fmt: skip


class Stub:
    """Stands in for a class the checkpoint names but we refuse to import.

    Calling it, constructing it or restoring its state only records the data.
    Using it where a tensor belongs is a one-line error, not a traceback.
    """

    stub_of = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return type(self)(*args, **kwargs)

    def __repr__(self):
        return f"<stub of {self.stub_of}>"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that never imports: allow-listed names or an inert Stub subclass."""

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return type(name, (Stub,), {"stub_of": f"{module}.{name}"})


class _RestrictedPickleModule:
    """The `pickle_module` handed to torch.load: its Unpickler is the restricted one."""

    Unpickler = RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def load_torch_file(path: str | Path, map_location="cpu", stub_objects: bool = False):
    """Read a torch.save file after `identify` has passed it.

    `stub_objects=False`: torch's weights-only unpickler (tensors, plain containers; anything else
    is refused). `stub_objects=True`: RestrictedUnpickler, for files that pickle whole objects
    (Lightning checkpoints); those objects come back as Stubs. Either way a file torch cannot read
    is a one-line ValueError.
    """
    identify(path)
    try:
        if stub_objects:
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=_RestrictedPickleModule)  # fmt: skip
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: not a readable PyTorch file ({error_reason(err)})") from err


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors (contiguous, detached, on CPU)."""
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def save_torch(path: str | Path, obj) -> Path:
    """torch.save for tensors and plain containers only; read back with weights_only=True. A failed write (a full
    disk: torch says only "unexpected pos") is an OSError naming the file, and leaves no temp file."""

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            reason = error_reason(err, "write failed")
            raise OSError(errno.EIO, f"could not write {path} ({reason}): is the disk full?") from err

    return atomic_write(path, write)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an unreadable one (truncated, lying header) is a ValueError. Their values are
    checked where they meet their model (`build_checked`)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({error_reason(err)})") from err


def build_checked(make: Callable[[], torch.nn.Module], weights: dict[str, torch.Tensor], source: str):
    """`make()` holding `weights`, after checking names and shapes against a skeleton built on the meta device
    (so a config that asks for far more than the file holds allocates nothing), and finiteness: every set of
    weights the toolkit loads (policies in all three formats, every dictionary) passes here, once."""
    with torch.device("meta"):
        skeleton = make()
    expected = skeleton.state_dict()
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k}: shape {list(weights[k].shape)}, the config wants {list(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if problems:
        more = " ..." if len(problems) > 4 else ""
        raise ValueError(f"{source} does not fit its config: " + "; ".join(problems[:4]) + more)
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: {name} holds NaN or Inf values; the weights are corrupt")
    model = make()
    model.load_state_dict(weights)
    return model
