"""The graph layer: attribution graphs of single decisions, virtual weights between dictionaries (weights) and the
edge export (edges). It sits above clt: it reads transcoders and SAEs, and nothing in clt, sae or policy imports it.

One decision, from file names alone: `attribution.py` is the algorithm (`attribute`, its steps numbered in the
docstring), `graph.py` the graph object (`Graph`, `build_graph`), `local.py` the local replacement model it is
traced through, `prune.py` pruning and scores, `verify.py`, `edge_check.py` and `circuit.py` the checks in the live
policy, `spliced.py` that live policy with the replacement spliced in (`Change`, `intervene`); `attribute.py` and
`intervene.py` are the commands (`python -m clt.graph.attribute`), which is why the functions `attribute` and
`intervene` are imported from `clt.graph.attribution` and `clt.graph.spliced`, not from here (the command modules
hold those names):

    from clt.graph import Decision, TraceOptions, load_replacement
    from clt.graph.attribution import attribute
    doc = attribute(policy, load_replacement(run_dir), Decision(locs, tour[:7]), TraceOptions(), {}).doc
"""

from clt.graph.attribution import Attribution, TraceOptions
from clt.graph.decision import Decision, greedy_tour
from clt.graph.graph import Graph, build_graph
from clt.graph.replacement import Replacement, load_replacement
from clt.graph.spliced import Change

__all__ = ["Attribution", "Change", "Decision", "Graph", "Replacement", "TraceOptions", "build_graph", "greedy_tour",
           "load_replacement"]  # fmt: skip
