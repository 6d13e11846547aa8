"""The Attention Model (Kool et al., 2019) for TSP, computed as RL4CO 0.7's AttentionModelPolicy.

    locs [batch, node, 2]
      -> init_embed: Linear(2, d)
      -> N post-norm encoder layers:  h = Norm(x + MHA(x));  out = Norm(h + FF(h))
      -> pointer decoder, one node per step:
           query   = project_context([h_first, h_current]) + project_fixed_context(mean_node h)
           glimpse = project_out(MHA(query, K, V, mask = unvisited nodes))
           logits  = glimpse . L / sqrt(d)  ->  10 * tanh  ->  mask  ->  / temperature

Every intermediate the interpretability tools read passes through a `HookPoint`
(an identity module, as in TransformerLens); `sae.hooks.HookedPolicy` gives them
their public dotted names. The decoder carries a `starts` axis S throughout
(`[batch, S, ...]`): S = 1 for one trajectory per instance, S = node for
multi-start decoding (every node as a first node, as POMO does), with the
encoder run once per instance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from policy.checks import check_types
from policy.options import choice
from policy.torch_files import build_checked

NORMALIZATIONS = ("batch", "instance")
DECODE_TYPES = ("greedy", "sample")


LIMITS = {"embed_dim": 1 << 14, "num_encoder_layers": 64, "num_heads": 256, "ff_hidden": 1 << 16}
"""The largest values a config may hold: far beyond any published TSP model, small enough that a hostile
config.json cannot ask for unbounded memory before its weights are compared with it."""


@dataclass
class PolicyConfig:
    """Hyper-parameters of the Attention Model; saved as part of a run's config.json."""

    embed_dim: int = 128
    """Width d of node embeddings."""
    num_encoder_layers: int = 3
    """Number of post-norm encoder layers."""
    num_heads: int = 8
    """Attention heads, in the encoder and in the decoder's glimpse; must divide embed_dim."""
    ff_hidden: int = 512
    """Hidden width of each encoder layer's feed-forward block."""
    normalization: str = choice("batch", NORMALIZATIONS)
    """Encoder normalisation: `batch` (BatchNorm1d over the [batch*node, d] view) or `instance` (InstanceNorm1d)."""
    tanh_clipping: float = 10.0
    """Pointer logits are squashed to C * tanh(logits)."""
    temperature: float = 1.0
    """Clipped logits are divided by this before the softmax."""

    def __post_init__(self):
        check_types(self)
        for name, most in LIMITS.items():
            if not 1 <= getattr(self, name) <= most:
                raise ValueError(f"{name} must be a whole number in [1, {most}], got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim})")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not 0 < self.temperature < math.inf or not 0 < self.tanh_clipping < math.inf:
            raise ValueError(f"temperature and tanh_clipping must be positive and finite, got {self.temperature} "
                             f"and {self.tanh_clipping}")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PolicyConfig:
        """Build from a dict, ignoring keys that are not fields (e.g. env settings)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class HookPoint(nn.Module):
    """Identity; a named place where forward hooks read or replace an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Normalization(nn.Module):
    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = nn.BatchNorm1d(d, affine=True) if kind == "batch" else nn.InstanceNorm1d(d, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, node, d]
        if self.kind == "batch":
            return self.norm(x.reshape(-1, x.size(-1))).view(x.shape)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused Wqkv (laid out as (three, head, d_head)) and an out_proj."""

    def __init__(self, d: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.Wqkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, node, d]
        b, n, d = x.shape
        qkv = self.Wqkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, head, node, d_head]
        out = F.scaled_dot_product_attention(q, k, v)  # [batch, head, node, d_head]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        d = cfg.embed_dim
        self.attn = MultiHeadAttention(d, cfg.num_heads)
        self.norm1 = Normalization(d, cfg.normalization)
        self.ff_in = nn.Linear(d, cfg.ff_hidden)
        self.ff_out = nn.Linear(cfg.ff_hidden, d)
        self.norm2 = Normalization(d, cfg.normalization)
        self.hook_input = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_output = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, node, d]
        x = self.hook_input(x)
        attn = self.hook_attn_out(self.attn(x))
        h = self.hook_mlp_in(self.norm1(x + attn))
        ff = self.hook_mlp_out(self.ff_out(F.relu(self.ff_in(h))))
        return self.hook_output(self.norm2(h + ff))


class DecoderCache(NamedTuple):
    """What the decoder computes once per instance and reuses at every step."""

    context_first: torch.Tensor  # [batch, node, d], project_context's h_first half applied to every node
    context_current: torch.Tensor  # [batch, node, d], its h_current half
    graph_context: torch.Tensor  # [batch, 1, d]
    glimpse_key: torch.Tensor  # [batch, head, node, d_head]
    glimpse_val: torch.Tensor  # [batch, head, node, d_head]
    logit_key: torch.Tensor  # [batch, node, d]


def _gather_nodes(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [batch, node, d], index [batch, S] -> x[b, index[b, s]] as [batch, S, d]."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.size(-1)))


class Decoder(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.W_placeholder = nn.Parameter(torch.empty(2 * d).uniform_(-1, 1))
        self.project_context = nn.Linear(2 * d, d, bias=False)
        self.project_fixed_context = nn.Linear(d, d, bias=False)
        self.project_node_embeddings = nn.Linear(d, 3 * d, bias=False)
        self.project_out = nn.Linear(d, d, bias=False)
        self.hook_context = HookPoint()
        self.hook_glimpse = HookPoint()
        self.hook_logits = HookPoint()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [batch, len, d] -> [batch, head, len, d_head]
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def precompute(self, h: torch.Tensor) -> DecoderCache:
        """Per-node projections used at every step.

        project_context([h_first, h_current]) = W_first h_first + W_current h_current, so
        both halves are applied to every node once here and gathered per step.
        """
        w_first, w_current = self.project_context.weight.chunk(2, dim=1)  # each [d, d]
        key, val, logit_key = self.project_node_embeddings(h).chunk(3, dim=-1)
        graph_context = self.project_fixed_context(h.mean(dim=1))[:, None]  # [batch, 1, d]
        return DecoderCache(
            h @ w_first.T, h @ w_current.T, graph_context, self._heads(key), self._heads(val), logit_key
        )

    def forward(
        self,
        cache: DecoderCache,
        first: torch.Tensor | None,  # [batch, S] first node, None before the first step
        current: torch.Tensor | None,  # [batch, S] last visited node
        visited: torch.Tensor,  # [batch, S, node] bool
    ) -> torch.Tensor:
        """Raw pointer scores (before tanh clipping and masking) -> [batch, S, node]."""
        b, s, _ = visited.shape
        d = cache.logit_key.size(-1)
        if first is None:
            context = self.project_context(self.W_placeholder).expand(b, s, d)
        else:
            context = _gather_nodes(cache.context_first, first) + _gather_nodes(cache.context_current, current)
        context = self.hook_context(context)  # [batch, S, d] = project_context([h_first, h_current])
        query = self._heads(context + cache.graph_context)  # [batch, head, S, d_head]
        heads = F.scaled_dot_product_attention(
            query, cache.glimpse_key, cache.glimpse_val, attn_mask=~visited[:, None]
        )  # [batch, head, S, d_head]
        glimpse = self.hook_glimpse(self.project_out(heads.transpose(1, 2).reshape(b, s, d)))
        logits = torch.bmm(glimpse, cache.logit_key.transpose(1, 2)) / math.sqrt(d)  # [batch, S, node]
        return self.hook_logits(logits)


class Rollout(NamedTuple):
    actions: torch.Tensor  # [batch, S, node] int64, the tours
    log_likelihood: torch.Tensor  # [batch, S], sum of the chosen actions' log-probabilities
    log_probs: torch.Tensor | None  # [batch, S, step, node] when asked for


class AttentionModel(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.init_embed = nn.Linear(2, cfg.embed_dim)
        self.hook_init_embedding = HookPoint()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.hook_encoder_output = HookPoint()
        self.decoder = Decoder(cfg)

    @classmethod
    def from_weights(
        cls, cfg: PolicyConfig, weights: dict[str, torch.Tensor], source: str = "weights"
    ) -> AttentionModel:
        """A model in eval mode holding `weights`, or a ValueError that says what does not fit `cfg`."""
        return build_checked(lambda: cls(cfg), weights, source).eval()

    def encode(self, locs: torch.Tensor) -> torch.Tensor:  # [batch, node, 2] -> [batch, node, d]
        x = self.hook_init_embedding(self.init_embed(locs))
        for layer in self.layers:
            x = layer(x)
        return self.hook_encoder_output(x)

    def log_probs(self, logits: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
        """Tanh clipping, masking of visited nodes, temperature, log-softmax (as RL4CO does)."""
        logits = self.cfg.tanh_clipping * torch.tanh(logits)
        logits = logits.masked_fill(visited, float("-inf")) / self.cfg.temperature
        return F.log_softmax(logits, dim=-1)

    def forward(
        self,
        locs: torch.Tensor,
        decode: str = "greedy",
        multistart: bool = False,
        generator: torch.Generator | None = None,
        return_log_probs: bool = False,
        actions: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> Rollout:
        """Build one tour per instance (S=1), or one per start node with `multistart` (S=node).

        With `multistart` the first node is forced (its log-probability is not counted).
        `decode` is `greedy` (argmax) or `sample` (from the softmax, using `generator`).
        `actions` ([batch, S, node]) are tours to follow instead (teacher forcing): the
        log-probabilities are then the policy's at every step of those tours. `embeddings`
        ([batch, node, d]): `encode(locs)`, already computed, for several rollouts of one encoding.
        """
        if decode not in DECODE_TYPES:
            raise ValueError(f"decode must be one of {DECODE_TYPES}, got {decode!r}")
        b, n, _ = locs.shape
        cache = self.decoder.precompute(self.encode(locs) if embeddings is None else embeddings)
        s = n if multistart else 1
        visited = torch.zeros(b, s, n, dtype=torch.bool, device=locs.device)
        log_likelihood = torch.zeros(b, s, device=locs.device)
        step_log_probs = []
        first = current = None
        if multistart:
            first = current = torch.arange(n, device=locs.device).expand(b, n)
            visited = visited.scatter(2, first[..., None], True)
        if actions is not None and actions.shape != (b, s, n):
            raise ValueError(f"actions to follow must be [batch, S, node] = {[b, s, n]}, got {list(actions.shape)}")
        forced, actions = actions, [first] if multistart else []
        while len(actions) < n:
            log_p = self.log_probs(self.decoder(cache, first, current, visited), visited)  # [batch, S, node]
            if forced is not None:
                action = forced[..., len(actions)]
            elif decode == "greedy":
                action = log_p.argmax(dim=-1)
            else:
                probs = log_p.detach().exp().view(b * s, n)
                action = torch.multinomial(probs, 1, generator=generator).view(b, s)
            log_likelihood = log_likelihood + log_p.gather(-1, action[..., None]).squeeze(-1)
            first = action if first is None else first
            current = action
            visited = visited.scatter(2, action[..., None], True)
            actions.append(action)
            if return_log_probs:
                step_log_probs.append(log_p)
        log_probs = torch.stack(step_log_probs, dim=2) if return_log_probs else None
        return Rollout(torch.stack(actions, dim=-1), log_likelihood, log_probs)
