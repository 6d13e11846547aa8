"""HookedPolicy: read and replace the Attention Model's activations by name.

Hook names (sae.hook_names) mirror the module tree, TransformerLens style.

A hook function is called as `fn(activation, name)`; returning a tensor replaces
the activation downstream, returning None leaves it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from policy.model import AttentionModel, Rollout
from sae.hook_names import DECODER_POINTS, LAYER_POINTS

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


class HookedPolicy:
    """Wraps an AttentionModel; the model itself is not changed."""

    def __init__(self, model: AttentionModel):
        self.model = model
        self._points: dict[str, nn.Module] = {"init_embedding": model.hook_init_embedding}
        for i, layer in enumerate(model.layers):
            for suffix, attr in LAYER_POINTS.items():
                self._points[f"encoder_layer_{i}.{suffix}"] = getattr(layer, attr)
            self._points[f"encoder_layer_{i}"] = layer.hook_output
        self._points["encoder_output"] = model.hook_encoder_output
        self._points.update(
            zip(
                DECODER_POINTS,
                (model.decoder.hook_context, model.decoder.hook_glimpse, model.decoder.hook_logits),
                strict=True,
            )
        )

    def hook_names(self) -> list[str]:
        return list(self._points)  # the same list as hook_names(len(model.layers))

    def check_names(self, names) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self._points]
        if unknown:
            raise ValueError(f"unknown hook name(s) {unknown}; valid names: {', '.join(self._points)}")
        return names

    @staticmethod
    def is_decoder_point(name: str) -> bool:
        return name.startswith("decoder.")

    @contextmanager
    def hooks(self, fns: dict[str, HookFn]) -> Iterator[HookedPolicy]:
        """Attach `fns` for the duration of the block; they are removed even on an exception."""
        self.check_names(fns)
        handles = []
        try:
            for name, fn in fns.items():
                handles.append(self._points[name].register_forward_hook(_adapter(fn, name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_hooks(self, locs: torch.Tensor, fns: dict[str, HookFn], **rollout) -> Rollout:
        """A full rollout (greedy unless `decode=` says otherwise) with `fns` attached."""
        with self.hooks(fns):
            return self.model(locs, **rollout)

    @torch.no_grad()
    def run_with_cache(self, locs: torch.Tensor, names, **rollout) -> dict[str, torch.Tensor]:
        """Activations by name: [batch, node, d] for encoder points, [batch, step, ...] for decoder points.

        When no decoder point is asked for, only the encoder runs.
        """
        names = self.check_names(names)
        cache: dict[str, list[torch.Tensor]] = {n: [] for n in names}

        def record(x: torch.Tensor, name: str) -> None:
            cache[name].append(x)

        with self.hooks(dict.fromkeys(names, record)):
            if any(self.is_decoder_point(n) for n in names):
                if rollout.get("multistart"):
                    raise ValueError("run_with_cache reads one trajectory per instance; multistart is not supported")
                self.model(locs, **rollout)
            else:
                self.model.encode(locs)
        return {n: torch.cat(v, dim=1) if self.is_decoder_point(n) else v[0] for n, v in cache.items()}


def _adapter(fn: HookFn, name: str):
    """A torch forward hook that calls fn(output, name) and passes on its replacement, if any."""

    def hook(module, inputs, output):
        return fn(output, name)

    return hook
