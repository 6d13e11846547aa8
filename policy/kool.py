"""Load the Attention Models of Kool et al.'s attention-learn-to-route (the pretrained TSP20/50/100 models).

A run folder as that code base writes it:

    <run>/args.json        {"embedding_dim", "n_encode_layers", "normalization", "tanh_clipping", "graph_size", ...}
    <run>/epoch-<N>.pt     torch's legacy (pre-1.6) serialization: {"model": state_dict, ...}

A training checkpoint of that code also holds `optimizer`, `rng_state`, `cuda_rng_state` and `baseline`, which
pickles a whole model object and a dataset object. The file is read through `policy.torch_files` with every
object turned into an inert Stub, and only the `model` tensors are kept.

`convert_state_dict` maps Kool's per-head attention matrices onto this package's fused `Wqkv` / `out_proj`
(Kool's attention has no biases: they become zeros) and renames the rest; the computation is the same, so tours,
log-likelihoods and encoder outputs match Kool's own code (tests/policy/test_kool.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from policy.model import PolicyConfig
from policy.rl4co import only_tensors
from policy.torch_files import load_torch_file

DEFAULT_HEADS = 8
"""attention-learn-to-route's default; args.json does not record it."""


def read_kool_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a Kool `epoch-<N>.pt` (pickled objects in it stay inert and are dropped)."""
    ckpt = load_torch_file(path, stub_objects=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected {{'model': state_dict}} (attention-learn-to-route), got {type(ckpt)}")
    return only_tensors(state, str(path))


_RENAMES = [
    (r"^embedder\.layers\.(\d+)\.1\.normalizer\.", r"layers.\1.norm1.norm."),
    (r"^embedder\.layers\.(\d+)\.2\.module\.0\.", r"layers.\1.ff_in."),
    (r"^embedder\.layers\.(\d+)\.2\.module\.2\.", r"layers.\1.ff_out."),
    (r"^embedder\.layers\.(\d+)\.3\.normalizer\.", r"layers.\1.norm2.norm."),
    (r"^project_step_context\.", "decoder.project_context."),
    (r"^(W_placeholder|project_node_embeddings\.|project_fixed_context\.|project_out\.)", r"decoder.\1"),
]
_ATTENTION = re.compile(r"^embedder\.layers\.(\d+)\.0\.module\.(W_query|W_key|W_val|W_out)$")


def convert_state_dict(kool: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kool AttentionModel keys -> AttentionModel keys.

    Kool's head h computes Q_h = x @ W_query[h] ([d, d_head]); the fused Wqkv's rows are laid out as
    (q/k/v, head, d_head), so its q block is W_query transposed per head. Kool's output is
    concat_h(heads) @ W_out.view(heads * d_head, d), i.e. out_proj.weight = that matrix transposed.
    """
    converted, attention = {}, {}
    for key, value in kool.items():
        match = _ATTENTION.match(key)
        if match:
            attention.setdefault(int(match.group(1)), {})[match.group(2)] = value
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        converted[key] = value
    for i, w in sorted(attention.items()):
        missing = {"W_query", "W_key", "W_val", "W_out"} - set(w)
        if missing:
            raise ValueError(f"encoder layer {i}: missing attention weights {sorted(missing)}")
        heads, d, d_head = w["W_query"].shape
        per_head = [w[name].permute(0, 2, 1).reshape(heads * d_head, d) for name in ("W_query", "W_key", "W_val")]
        converted[f"layers.{i}.attn.Wqkv.weight"] = torch.cat(per_head)  # [3 d, d]
        converted[f"layers.{i}.attn.Wqkv.bias"] = torch.zeros(3 * heads * d_head)
        converted[f"layers.{i}.attn.out_proj.weight"] = w["W_out"].reshape(heads * d_head, d).T.contiguous()
        converted[f"layers.{i}.attn.out_proj.bias"] = torch.zeros(d)
        for norm in ("norm1", "norm2"):  # saved before BatchNorm counted its batches
            converted.setdefault(f"layers.{i}.{norm}.norm.num_batches_tracked", torch.tensor(0))
    return converted


def kool_config(args: dict, source: str, num_heads: int | None = None) -> tuple[PolicyConfig, int, str]:
    """(PolicyConfig, training size, distribution) from a Kool `args.json`."""
    if args.get("problem", "tsp") != "tsp" or args.get("model", "attention") != "attention":
        raise ValueError(f"{source}: a {args.get('model')} model for {args.get('problem')}; only the TSP "
                         "Attention Model loads")  # fmt: skip
    missing = [k for k in ("embedding_dim", "n_encode_layers", "graph_size") if k not in args]
    if missing:
        raise ValueError(f"{source}: not an attention-learn-to-route args.json (missing {missing})")
    policy = PolicyConfig(
        embed_dim=args["embedding_dim"],
        num_encoder_layers=args["n_encode_layers"],
        num_heads=num_heads or args.get("num_heads", DEFAULT_HEADS),
        ff_hidden=args.get("feed_forward_hidden", 512),
        normalization=args.get("normalization", "batch"),
        tanh_clipping=float(args.get("tanh_clipping", 10.0)),
    )
    return policy, args["graph_size"], "uniform"
