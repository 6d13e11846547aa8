"""The docs site: export its data (export), serve it (viewer), screenshot it (screenshots).

The top layer: it reads policy, sae, clt and clt.graph, and nothing imports it.
"""
