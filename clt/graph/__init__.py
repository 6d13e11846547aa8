"""Attribution graphs: virtual weights between dictionaries (weights) and the edge export (edges).

This layer sits above clt: it reads transcoders and SAEs, and nothing in clt, sae or policy imports it.
"""
