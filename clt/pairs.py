"""Layer pairs (source hook -> target hook), their canonical names, and clt/configs/<run>.json.

Names: `encoder_layer_{i}` is `L{i}`, a sub-point keeps its suffix (`L1.mlp_in`),
`init_embedding` is `embed`, `encoder_output` is `out` and `decoder.<point>` is `dec.<point>`; a pair is
`clt_<source>_to_<target>`, e.g. `clt_L0_to_L2`, `clt_L1.mlp_in_to_L1.mlp_out` or `clt_dec.context_to_dec.glimpse`.
Saved tensors are `source_<hook>` and `target_<hook>`.

A pair's two sides are both encoder points (a row per (instance, city)) or both decoder points (a row per
(instance, decoding step), along the tour the collection follows); the glimpse, from the step's context to
`decoder.glimpse`, is the decoder's one nonlinear block.

A config file:

    {"layer_pairs": ["encoder_layer_0:encoder_layer_1", ...],
     "sparsity": {"expansion_factors": [8], "k": [16]},          (or "k_ratio": [...])
     "sampling": {"num_instances_per_pair": 10000, "distribution": "uniform", "seed": 0}}

CLI flags override the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from policy.checks import check_types
from policy.io import read_json
from sae.hook_names import DECODER_POINTS, parse_layer_hook

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_SHORT = re.compile(r"^L(\d+)(\.[a-z_]+)?$")
DECODER_PAIRS = ("decoder.context:decoder.glimpse",)
"""The decoder pair worth a transcoder: the glimpse (attention over the unvisited cities, then project_out)."""
_PAIR_NAME = re.compile(r"^clt_(.+)_to_(.+)$")


@dataclass(frozen=True)
class LayerPair:
    source: str
    target: str

    @property
    def name(self) -> str:
        return f"clt_{short_name(self.source)}_to_{short_name(self.target)}"

    @classmethod
    def from_name(cls, name: str) -> LayerPair:
        """The hooks of a pair name: `clt_L0.mlp_in_to_L0.mlp_out` -> encoder_layer_0.mlp_in, .mlp_out of layer 0."""
        match = _PAIR_NAME.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a pair name (clt_<source>_to_<target>, e.g. clt_L0_to_L2)")
        return cls(long_name(match.group(1)), long_name(match.group(2)))

    @classmethod
    def from_spec(cls, item: str) -> LayerPair:
        """A config's `source:target` entry (spaces around either hook allowed), not yet checked against a policy's
        hooks (parse_pairs does that)."""
        if item.count(":") != 1:
            raise ValueError(f"a layer pair is 'source:target', got {item!r}")
        return cls(*(part.strip() for part in item.split(":")))

    @property
    def on_decoder(self) -> bool:
        """Rows are (instance, decoding step) rather than (instance, city)."""
        return is_decoder_point(self.source)

    @property
    def source_tensor(self) -> str:
        return f"source_{self.source}"

    @property
    def target_tensor(self) -> str:
        return f"target_{self.target}"


def is_decoder_point(hook: str) -> bool:
    return hook in DECODER_POINTS


def short_name(hook: str) -> str:
    if hook == "init_embedding":
        return "embed"
    if hook == "encoder_output":
        return "out"
    if is_decoder_point(hook):
        return "dec." + hook.removeprefix("decoder.")
    parsed = parse_layer_hook(hook)
    if parsed is None:
        raise ValueError(f"{hook!r} cannot be part of a pair: it is not an encoder or decoder hook point")
    return f"L{parsed.layer}" + (f".{parsed.point}" if parsed.point else "")


def long_name(short: str) -> str:
    """The inverse of short_name: `L1.mlp_in` -> `encoder_layer_1.mlp_in`, `dec.glimpse` -> `decoder.glimpse`."""
    if short in ("embed", "out"):
        return {"embed": "init_embedding", "out": "encoder_output"}[short]
    if short.startswith("dec.") and is_decoder_point("decoder." + short.removeprefix("dec.")):
        return "decoder." + short.removeprefix("dec.")
    match = _SHORT.match(short)
    if not match:
        raise ValueError(f"{short!r} is not a short hook name (embed, out, L<i>, L<i>.<point> or dec.<point>)")
    return f"encoder_layer_{match.group(1)}{match.group(2) or ''}"


def parse_pairs(spec: str | list[str], hook_names: list[str]) -> list[LayerPair]:
    """`a:b,c:d` (or a list of `a:b`) -> pairs, checked against the policy's hooks in forward order."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    order = {name: i for i, name in enumerate(hook_names)}
    pairs = []
    for item in filter(None, items):
        pair = LayerPair.from_spec(item)
        source, target = pair.source, pair.target
        for hook in (source, target):
            if hook not in order:
                raise ValueError(f"unknown hook {hook!r} in pair {item!r}; valid names: {', '.join(hook_names)}")
            short_name(hook)
        if order[target] <= order[source]:
            raise ValueError(f"pair {item!r}: the target {target} is not downstream of the source {source}")
        if is_decoder_point(source) != is_decoder_point(target):
            raise ValueError(f"pair {item!r} mixes an encoder point (a row per city) with a decoder point (a row "
                             f"per decoding step); pair decoder points together, e.g. {DECODER_PAIRS[0]}")  # fmt: skip
        pairs.append(pair)
    if not pairs:
        raise ValueError("no layer pairs given")
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"a pair is listed twice: {names}")
    return pairs


@dataclass
class PairsConfig:
    """What clt/configs/<run>.json holds."""

    layer_pairs: list[str] = field(default_factory=list)
    """'source:target' hook pairs."""
    expansion_factors: list[int] = field(default_factory=lambda: [8])
    """Transcoder widths to sweep, as multiples of d."""
    k: list[int] = field(default_factory=list)
    """Active features per row to sweep (or k_ratio)."""
    k_ratio: list[float] = field(default_factory=list)
    """Fractions of features active per row to sweep."""
    num_instances_per_pair: int | None = None
    """Instances collected for every pair [default: `default_instances` of the run's size]."""
    distribution: str | None = None
    """Instance distribution [default: the run's]."""
    seed: int = 0
    """Seed of the instances."""

    def __post_init__(self):
        check_types(self)
        for name in ("layer_pairs", "expansion_factors", "k", "k_ratio"):
            if not isinstance(getattr(self, name), list):
                raise ValueError(f"{name} must be a list, got {getattr(self, name)!r}")


ROWS_PER_PAIR = 200_000
"""Rows a pair dump holds by default, whatever the instance size: one row per city."""


def default_instances(num_loc: int) -> int:
    """Instances per pair when neither a config nor the command line says: ROWS_PER_PAIR rows (10000 instances of
    TSP20, 4000 of TSP50, 2000 of TSP100), so that a transcoder gets as many training steps on any model."""
    return max(1, ROWS_PER_PAIR // num_loc)


def default_layer_pairs(n_layers: int) -> list[str]:
    """The pairs of a run without a config: every encoder layer's mlp_in -> mlp_out (what the multi-layer CLT
    trains on), then each layer's output -> the next's."""
    mlp = [f"encoder_layer_{i}.mlp_in:encoder_layer_{i}.mlp_out" for i in range(n_layers)]
    return mlp + [f"encoder_layer_{i}:encoder_layer_{i + 1}" for i in range(n_layers - 1)]


def run_layer_count(run_dir: Path) -> int:
    """The number of encoder layers a run's config.json declares (read without torch)."""
    try:
        n = read_json(run_dir / "config.json")["policy"]["num_encoder_layers"]
    except (FileNotFoundError, KeyError, TypeError) as err:
        raise ValueError(f"{run_dir}: no policy.num_encoder_layers in config.json ({err})") from None
    if not isinstance(n, int) or not 1 <= n <= 64:
        raise ValueError(f"{run_dir}/config.json: num_encoder_layers must be an integer in 1..64, got {n!r}")
    return n


def read_pairs_config(path: str | Path) -> PairsConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pairs config {path}")
    raw = read_json(path)
    sparsity = raw.get("sparsity", {}) if isinstance(raw, dict) else None
    sampling = raw.get("sampling", {}) if isinstance(raw, dict) else None
    if not (isinstance(sparsity, dict) and isinstance(sampling, dict)):
        raise ValueError(f"{path}: expected an object with 'layer_pairs', 'sparsity' and 'sampling'")
    try:
        return PairsConfig(
            layer_pairs=raw.get("layer_pairs", []),
            expansion_factors=sparsity.get("expansion_factors", [8]),
            k=sparsity.get("k", []),
            k_ratio=sparsity.get("k_ratio", []),
            num_instances_per_pair=sampling.get("num_instances_per_pair"),
            distribution=sampling.get("distribution"),
            seed=sampling.get("seed", 0),
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def default_config_path(run_name: str) -> Path:
    return CONFIG_DIR / f"{run_name}.json"
