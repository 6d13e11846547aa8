"""Load policies trained with RL4CO, without importing rl4co and without running pickle code.

An RL4CO Lightning checkpoint (`.ckpt`) pickles RL4CO objects (the env, the
policy) next to its `state_dict`, so `torch.load(weights_only=True)` refuses it.
`read_lightning_checkpoint` reads it through `policy.torch_files.load_torch_file`:
TorchScript and other non-tensor files are refused before torch sees them, tensors
and plain containers are rebuilt, and every other class becomes an inert `Stub`
that only stores the data it was given. Nothing is imported, nothing is called.

`convert_state_dict` renames RL4CO's `AttentionModelPolicy` keys to this
package's `AttentionModel` keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from policy.model import AttentionModel, PolicyConfig
from policy.torch_files import Stub, load_torch_file


def read_lightning_checkpoint(path: str | Path) -> dict:
    """Read a Lightning `.ckpt` safely; other objects in it come back as Stubs."""
    return load_torch_file(path, stub_objects=True)


def policy_tensors(ckpt: dict, source: str) -> dict[str, torch.Tensor]:
    """The `policy.*` tensors of a Lightning checkpoint, prefix removed."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{source}: no state_dict in this checkpoint")
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not policy:
        raise ValueError(f"{source}: the state_dict holds no 'policy.*' tensors")
    return only_tensors(policy, source)


def only_tensors(state: dict, source: str) -> dict[str, torch.Tensor]:
    """`state` if every value is a tensor; else a one-line error naming the first that is not."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {key!r} is {value!r} ({type(value).__name__}), not a tensor")
    return state


def read_policy_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The RL4CO policy tensors (prefix `policy.` removed) from a `.ckpt` or a plain state dict file."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return policy_tensors(read_lightning_checkpoint(path), str(path))
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return only_tensors({str(k).removeprefix("policy."): v for k, v in state.items()}, str(path))


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


def infer_config(
    state: dict[str, torch.Tensor], num_heads: int = 8, source: str = "weights", **settings
) -> PolicyConfig:
    """A PolicyConfig that fits converted weights; heads cannot be read off the weights."""
    if "init_embed.weight" not in state:
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise ValueError(
            f"{source}: the weights fit no known format: expected RL4CO AttentionModelPolicy keys "
            f"(encoder.init_embedding.init_embed.weight, ...), found {sample}"
        )
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
    cfg = infer_config(weights, source=str(path), **{"num_heads": 8, **settings})
    return AttentionModel.from_weights(cfg, weights, source=str(path))
