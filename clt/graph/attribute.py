"""Why does the policy pick this city at step t? The attribution graph of one decision.

    python -m clt.graph.attribute --run_dir tsp20_demo --seed 3 --step 7
    python -m clt.graph.attribute --run_dir tsp20_demo --locs X.npy --index 2 --tour tours.npy --step 10 --export

Traces the decision through the run's multi-layer CLT (or, without one, its per-layer mlp_in -> mlp_out
transcoders; --clt picks another) in the local replacement model (clt.graph.local), prunes the graph, scores it
and checks it by removing its most influential features (clt.graph.verify). Writes

    <run>/clt/attribution/<decision>.json         schema tsp-interp.attribution/1 (docs/guide/attribution-graphs.md)
    <run>/clt/attribution/<decision>.safetensors  the full graph: adjacency (rows receive), constants, values,
                                                  node influence, node and edge masks

(or --out; the default name ends with the attention and glimpse modes, so that graphs of one decision in two modes
keep both files), prints a summary, and with --export adds the graph to the site's Decisions tab.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
from tqdm import tqdm

from clt.graph.attribution import TraceOptions, attribute
from clt.graph.decision import DecisionOptions
from clt.graph.explain import attach_labels, in_words, label_tables
from clt.graph.gallery import add_to_gallery, for_site
from clt.graph.replacement import load_replacement
from policy.checks import check_device, check_types
from policy.cli import command
from policy.io import write_json
from policy.loading import load_policy
from policy.options import options, split_nested
from policy.runs import check_name, resolve_run_dir
from policy.torch_files import save_tensors
from sae.runs import attribution_dir

log = logging.getLogger(__name__)


@dataclass
class AttributeConfig:
    run_dir: str
    """Run folder, or a run name under runs/."""
    decision: DecisionOptions
    """Which decision (flattened into options)."""
    trace: TraceOptions = field(default_factory=TraceOptions)
    """Targets, pruning and checks (flattened into options)."""
    clt: str | None = None
    """A multi-layer CLT run folder [default: the run's newest, else its per-layer mlp_in -> mlp_out transcoders]."""
    glimpse_clt: str | None = None
    """Also replace step t's glimpse by a decoder.context -> decoder.glimpse transcoder (a run folder, or `newest`
    for the run's newest): its features become nodes between the encoder output and the targets (clt.graph.glimpse;
    the glimpse is then frozen; needs step >= 1)."""
    checkpoint: int | None = None
    """Policy epoch [default: the one the transcoders were trained on, else the latest]."""
    out: str | None = None
    """The graph's JSON path (the .safetensors goes beside it) [default:
    <run>/clt/attribution/<decision>_attention-<mode>_glimpse-<mode>.json]."""
    export: str | None = None
    """Also add the graph to the site data in this folder (docs/data) for the Decisions tab."""
    full_graph: bool = True
    """Also write the full graph as .safetensors beside the JSON (float32 adjacency: 5 MB for TSP20, 110 MB for
    TSP100; --no_full_graph to skip)."""
    steps: str | None = None
    """Several decisions of each instance in one process, instead of --step: A-B (inclusive), a comma list, or
    `all` (every step from 1 that has two candidates, or one with --target score); each graph is written under its
    own name and a table sums them up."""
    instances: str | None = None
    """Several instances, as A-B or a comma list: with --locs their indices (instead of --index), with --seed their
    seeds (instead of --seed)."""
    device: str = "cpu"
    """torch device."""

    def __post_init__(self):
        check_types(self)
        check_device(self.device)
        if self.out is not None and not self.out.endswith(".json"):
            raise ValueError(f"--out names a .json file, got {self.out!r}")
        if self.many and self.out is not None:
            raise ValueError("--out names one graph; with --steps or --instances each goes to <run>/clt/attribution/")
        if self.steps is not None and self.steps != "all":
            parse_numbers(self.steps, "--steps")
        if self.instances is not None:
            parse_numbers(self.instances, "--instances")

    @property
    def many(self) -> bool:
        return self.steps is not None or self.instances is not None

    def decisions(self, cities: Callable[[DecisionOptions], int]) -> list[DecisionOptions]:
        """Every decision --steps and --instances name (instance-major), or just --step's; `cities` gives an
        instance's number of cities (for `all`)."""
        if self.instances is None:
            where = [self.decision]
        elif self.decision.locs is not None:
            where = [replace(self.decision, index=i) for i in parse_numbers(self.instances, "--instances")]
        else:
            where = [replace(self.decision, seed=s) for s in parse_numbers(self.instances, "--instances")]
        if self.steps is None:
            return where
        if self.steps != "all":
            return [replace(w, step=s) for w in where for s in parse_numbers(self.steps, "--steps")]
        spare = 1 if self.trace.target == "score" else 2  # a difference needs two candidates left
        return [replace(w, step=s) for w in where for s in range(1, cities(w) - spare + 1)]


def parse_numbers(text: str, option: str) -> list[int]:
    """`3-7` (inclusive) or `1,4,9` -> the numbers; a one-line error for anything else."""
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-"))
            numbers = list(range(low, high + 1))
        else:
            numbers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes A-B or a comma list of numbers, got {text!r}") from None
    if not numbers or min(numbers) < 0:
        raise ValueError(f"{option} {text!r} names no number, or a negative one")
    return numbers


def run(cfg: AttributeConfig) -> list[tuple[dict, Path]]:
    """Attribute every decision the config names (one, or those of --steps and --instances) with one loaded policy
    and replacement; returns each graph's document and where it went (the graphs themselves are written, not
    kept: hundreds of them would not fit in memory)."""
    run_dir = resolve_run_dir(cfg.run_dir)
    replacement = load_replacement(run_dir, cfg.clt, cfg.glimpse_clt)
    epoch = cfg.checkpoint if cfg.checkpoint is not None else replacement.checkpoint_epoch
    policy = load_policy(run_dir, epoch, cfg.device)
    if replacement.models[0].b_dec.shape[-1] != policy.config.policy.embed_dim:
        raise ValueError(f"the replacement's width does not match the policy's {policy.config.policy.embed_dim}")
    replacement.to(cfg.device)
    decisions = cfg.decisions(lambda options: len(options.instance(policy.config.num_loc)[0]))
    labels = label_tables(replacement)  # from clt.label's eval/labels.json, where the dictionaries have one
    done = [
        one(cfg, run_dir, policy, replacement, labels, d)
        for d in tqdm(decisions, desc="decisions", disable=len(decisions) < 2)
    ]
    if cfg.export:
        add_to_gallery(cfg.export, [for_site(doc, out.stem) for doc, out in done])
    return done


def one(
    cfg: AttributeConfig, run_dir: Path, policy, replacement, labels: list, options: DecisionOptions
) -> tuple[dict, Path]:
    decision, instance, name = options.decision(policy.model, policy.config.num_loc)
    source = {
        "run": run_dir.name,
        "checkpoint_epoch": policy.epoch,
        "checkpoint_sha256": policy.checkpoint_sha256,
        "instance": instance,
    }
    result = attribute(policy.model, replacement, decision, cfg.trace, source)
    attach_labels(result.doc, replacement, labels)
    result.doc["in_words"] = in_words(result.doc)
    used = result.doc["options"]  # the glimpse mode as resolved
    mode = f"_attention-{used['attention']}_glimpse-{used['glimpse']}"  # graphs in other modes keep their files
    out = Path(cfg.out) if cfg.out else attribution_dir(run_dir) / f"{check_name(name + mode, 'decision name')}.json"
    if cfg.full_graph:
        save_tensors(out.with_suffix(".safetensors"), result.tensors())
    write_json(out, result.doc, indent=None)  # thousands of nodes: compact
    return result.doc, out


def format_table(done: list[tuple[dict, Path]]) -> str:
    """One line per decision: the pick, the live check and the baseline, the replacement alone; then the means."""
    head = (f"{'decision':<44}{'picks':>6}{'live r':>8}{'sign':>7}{'grad r':>8}{'beats':>7}{'patch r':>8}{'edge r':>8}"
            f"{'circuit':>8}{'alone':>7}{'s':>6}")  # fmt: skip
    lines, rs, bs, ps = [head], [], [], []
    for d, out in done:
        live = d["verification"].get("live", {})
        r, g = live.get("pearson_r", float("nan")), live.get("gradient_x_activation", {}).get("pearson_r", float("nan"))
        fidelity = d["verification"]["fidelity"]
        rs.append(r)
        bs.append(g)
        sign = live.get("sign_agreement", float("nan"))
        edge = d["verification"].get("edges", {}).get("scale_0", {}).get("total", {}).get("pearson_r", float("nan"))
        circuit = d["verification"].get("circuit", {}).get("faithfulness", float("nan"))
        patch = live.get("patched", {}).get("pearson_r", float("nan"))
        ps.append(patch)
        lines.append(f"{out.stem[:43]:<44}{d['policy_tour'][d['step']]:>6}{r:>8.3f}{sign:>7.0%}{g:>8.3f}"
                     f"{'yes' if r > g + 1e-4 else 'no':>7}{patch:>8.3f}{edge:>8.3f}{circuit:>8.0%}"
                     f"{'same' if fidelity['same_choice'] else 'DIFF':>7}{d['seconds']:>6.1f}")  # fmt: skip
    finite = [(r, g) for r, g in zip(rs, bs, strict=True) if r == r and g == g]
    if finite:
        mean = sum(r for r, _ in finite) / len(finite)
        median = sorted(r for r, _ in finite)[len(finite) // 2]
        lines.append(f"{len(done)} decisions: live r mean {mean:.3f}, median {median:.3f}; the graph beats gradient x "
                     f"activation in {sum(r > g + 1e-4 for r, g in finite)} of {len(finite)}")  # fmt: skip
    patched = [p for p in ps if p == p]
    if patched:
        lines.append(f"patched removal effects: r mean {sum(patched) / len(patched):.3f}, median "
                     f"{sorted(patched)[len(patched) // 2]:.3f}")  # fmt: skip
    return "\n".join(lines)


def format_summary(doc: dict) -> str:
    """What a researcher reads first: the decision, the candidates, the scores, the strongest features, the checks."""
    where = doc["instance"]
    instance = f"seed {where['seed']}" if "seed" in where else f"{where['file']} #{where['index']}"
    lines = [
        f"decision: {instance} ({len(doc['instance']['locs'])} cities), step {doc['step']}, current city "
        f"{doc['current']}, first {doc['first']}; the policy picks {doc['policy_tour'][doc['step']]}",
        "candidates: " + ", ".join(f"{c['city']} ({c['probability']:.1%})" for c in doc["candidates"][:5]),
    ]
    against = doc["against"] or [None] * len(doc["targets"])
    lines.append(
        "targets: "
        + ", ".join(
            f"score {t}" + (f" - score {a}" if a is not None else "")
            for t, a in zip(doc["targets"], against, strict=True)
        )
    )
    kinds = {k: sum(n["kind"] == k for n in doc["nodes"]) for k in ("feature", "error", "input", "target")}
    s = doc["scores"]
    lines += [
        f"graph: {len(doc['nodes'])} nodes ({kinds['feature']} features, {kinds['error']} errors, {kinds['input']} "
        f"inputs, {kinds['target']} targets); pruned: {s['kept_nodes']} nodes, {s['kept_edges']} edges",
        f"scores: replacement {s['graph']['replacement']:.3f} (pruned {s['pruned']['replacement']:.3f}), "
        f"completeness {s['graph']['completeness']:.3f} (pruned {s['pruned']['completeness']:.3f})",
        "most influential features (total effect on each target):",
    ]
    for f in doc["top_features"][:8]:
        effects = ", ".join(f"{t} {v:+.3f}" for t, v in f["total_effect"].items())
        label = f"   {f['label']}" if "label" in f else ""
        lines.append(f"  {f['id']:<16} influence {f['influence']:.4f}   {effects}{label}")
    v = doc["verification"]
    if "fidelity" in v:
        f = v["fidelity"]
        lines.append(f"replacement alone (errors dropped): picks {f['choice']} "
                     f"({'the same city' if f['same_choice'] else 'NOT the policy city'}), "
                     f"{f['probability_of_policy_choice']:.1%} on the policy's choice, KL {f['kl']:.3f}")  # fmt: skip
    if "live" in v:
        live, held = v["live"], v["live"]["selection_held"]
        lines.append(f"checks on the {v['local']['features']} most influential features: (a) local model, max "
                     f"relative error {v['local']['max_relative_error']:.1e}; (b) live policy, Pearson r "
                     f"{live['pearson_r']:.3f}, sign agreement {live['sign_agreement']:.1%} (with the transcoders' "
                     f"selection held: r {held['pearson_r']:.3f}, {held['sign_agreement']:.1%})")  # fmt: skip
        if "gradient_x_activation" in live:
            g = live["gradient_x_activation"]
            gap = live["pearson_r"] - g["pearson_r"]
            verdict = "beats" if gap > 1e-4 else "ties with" if gap >= -1e-4 else "does not beat"
            lines.append(f"baseline: gradient x activation in the live policy, r {g['pearson_r']:.3f}, sign agreement "
                         f"{g['sign_agreement']:.1%}: the graph {verdict} it")  # fmt: skip
        if "patched" in live:
            q = live["patched"]
            lines.append(f"patched removal effects (each feature removed in the replacement, selection held): r "
                         f"{q['pearson_r']:.3f}, sign agreement {q['sign_agreement']:.1%}")  # fmt: skip
    if "edges" in v and v["edges"]["edges"]:
        e = v["edges"]
        parts = [f"scaled by {a}: r {e[f'scale_{a}']['total']['pearson_r']:.3f} (direct edge alone "
                 f"{e[f'scale_{a}']['direct']['pearson_r']:.3f}), sign {e[f'scale_{a}']['total']['sign_agreement']:.0%}"
                 for a in ("0.9", "0")]  # fmt: skip
        lines.append(f"edges: the {e['edges']} strongest, their {e['sources']} sources intervened on in the live "
                     f"policy; receivers' change against the graph's: " + "; ".join(parts))  # fmt: skip
    if "circuit" in v:
        c = v["circuit"]
        lines.append(f"circuit: the margin is {c['margin_all']:.3f} with every feature, {c['margin_none']:.3f} with "
                     f"none (errors held); the {doc['scores']['kept_nodes']}-node pruned graph's features alone give "
                     f"{c['faithfulness']:.0%} of the difference, all but them {c['complement']:.0%}; by node "
                     "threshold: " + ", ".join(f"{x['node_threshold']:g} {x['faithfulness']:.0%}"
                                               for x in c["curve"]))  # fmt: skip
    if doc.get("in_words"):
        lines.append(f"in words: {doc['in_words']}")
    c = doc["checks"]
    lines.append(
        f"exactness: contributions + constants - inputs {c['max_completeness_error']:.1e}, targets vs the "
        f"live policy {c['max_target_error']:.1e} ({doc['seconds']:.2f} s)"
    )
    return "\n".join(lines)


@click.command()
@options(AttributeConfig, flatten=("decision", "trace"))
@click.option("--json", "as_json", is_flag=True, help="Print the graph's JSON instead of the summary.")
def main(as_json, **settings):
    """Attribution graph of one decision: which features, at which cities and layers, make the policy pick its city."""
    with command():
        settings = split_nested(AttributeConfig, split_nested(AttributeConfig, settings, "decision"), "trace")
        cfg = AttributeConfig(**settings)
        done = run(cfg)
    if cfg.many:
        click.echo(json.dumps([doc for doc, _ in done]) if as_json else format_table(done))
        return
    ((doc, out),) = done
    click.echo(json.dumps(doc, indent=1) if as_json else format_summary(doc))
    if not as_json:
        full = out.with_suffix(".safetensors")
        click.echo(f"wrote {out}" + (f" and {full.name}" if full.is_file() and settings["full_graph"] else ""))


if __name__ == "__main__":
    main()
