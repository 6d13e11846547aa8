"""The graph layer: attribution graphs of single decisions (replacement, decision, local, pointer, attribution,
prune, verify, intervention, trace; the commands attribute and intervene; gallery for the site), virtual weights
between dictionaries (weights) and the edge export (edges).

This layer sits above clt: it reads transcoders and SAEs, and nothing in clt, sae or policy imports it.
"""
