"""Load policies trained with RL4CO, without importing rl4co and without running pickle code.

An RL4CO Lightning checkpoint (`.ckpt`) pickles RL4CO objects (the env, the
policy) next to its `state_dict`, so `torch.load(weights_only=True)` refuses it.
`read_lightning_checkpoint` unpickles it with `RestrictedUnpickler`: tensors and
plain containers are rebuilt, and every other class becomes an inert `Stub` that
only stores the data it was given. Nothing is imported, nothing is called.

`convert_state_dict` renames RL4CO's `AttentionModelPolicy` keys to this
package's `AttentionModel` keys.
"""

from __future__ import annotations

import collections
import pickle
import re
from pathlib import Path

import torch

from policy.model import AttentionModel, PolicyConfig

# Everything a checkpoint may resolve by name: the functions torch uses to rebuild
# tensors, and plain data types. Anything else becomes a Stub.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
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


def read_lightning_checkpoint(path: str | Path) -> dict:
    """Read a Lightning `.ckpt` safely; other objects in it come back as Stubs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: not a readable PyTorch/Lightning checkpoint ({err})") from err


def policy_tensors(ckpt: dict, source: str) -> dict[str, torch.Tensor]:
    """The `policy.*` tensors of a Lightning checkpoint, prefix removed."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{source}: no state_dict in this checkpoint")
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not policy:
        raise ValueError(f"{source}: the state_dict holds no 'policy.*' tensors")
    return policy


def read_policy_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The RL4CO policy tensors (prefix `policy.` removed) from a `.ckpt` or a plain state dict file."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return policy_tensors(read_lightning_checkpoint(path), str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a state dict that loads with weights_only=True ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("policy."): v for k, v in state.items()}


_RENAMES = [
    (r"^encoder\.init_embedding\.init_embed\.", "init_embed."),
    (r"^encoder\.net\.layers\.(\d+)\.0\.module\.", r"layers.\1.attn."),
    (r"^encoder\.net\.layers\.(\d+)\.1\.normalizer\.", r"layers.\1.norm1.norm."),
    (r"^encoder\.net\.layers\.(\d+)\.2\.module\.lins\.0\.", r"layers.\1.ff_in."),
    (r"^encoder\.net\.layers\.(\d+)\.2\.module\.lins\.1\.", r"layers.\1.ff_out."),
    (r"^encoder\.net\.layers\.(\d+)\.3\.normalizer\.", r"layers.\1.norm2.norm."),
    (r"^decoder\.context_embedding\.", "decoder."),
    (r"^decoder\.pointer\.", "decoder."),
]


def convert_state_dict(rl4co_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RL4CO AttentionModelPolicy keys -> AttentionModel keys."""
    converted = {}
    for key, value in rl4co_state.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        converted[key] = value
    return converted


def settings_from_checkpoint(ckpt: dict) -> dict:
    """Policy settings RL4CO pickled in `hyper_parameters` (num_heads, temperature, tanh_clipping).

    Read from the inert stubs' recorded state; whatever is missing is left out.
    """
    policy = ckpt.get("hyper_parameters", {}).get("policy")
    state = policy.state if isinstance(policy, Stub) and isinstance(policy.state, dict) else {}
    decoder = state.get("_modules", {}).get("decoder")
    decoder_state = decoder.state if isinstance(decoder, Stub) and isinstance(decoder.state, dict) else {}
    found = {"num_heads": decoder_state.get("num_heads")}
    found.update({k: state.get(k) for k in ("temperature", "tanh_clipping")})
    return {k: v for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def infer_config(state: dict[str, torch.Tensor], num_heads: int = 8, **settings) -> PolicyConfig:
    """A PolicyConfig that fits converted weights; heads cannot be read off the weights."""
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    return PolicyConfig(
        embed_dim=state["init_embed.weight"].shape[0],
        num_encoder_layers=len(layers),
        num_heads=num_heads,
        ff_hidden=state["layers.0.ff_in.weight"].shape[0] if layers else 512,
        normalization="batch" if "layers.0.norm1.norm.running_mean" in state else "instance",
        **settings,
    )


def load_checkpoint(path: str | Path, num_heads: int | None = None) -> AttentionModel:
    """An AttentionModel (eval mode) from an RL4CO `.ckpt` or policy state dict file.

    A `.ckpt` records num_heads, temperature and tanh clipping; a bare state dict
    does not, so pass `num_heads` for one (default 8, RL4CO's default).
    """
    path = Path(path)
    if path.suffix == ".ckpt":
        ckpt = read_lightning_checkpoint(path)
        weights, settings = convert_state_dict(policy_tensors(ckpt, str(path))), settings_from_checkpoint(ckpt)
    else:
        weights, settings = convert_state_dict(read_policy_state_dict(path)), {}
    if num_heads is not None:
        settings["num_heads"] = num_heads
    cfg = infer_config(weights, **{"num_heads": 8, **settings})
    return AttentionModel.from_weights(cfg, weights, source=str(path))
