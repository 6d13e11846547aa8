"""A decision's graph in words: feature nodes carry their label (clt.label's `eval/labels.json`), and the decision
is summed up by city and category.

`attach_labels(doc, replacement)` adds `label` and `category` to every feature node and top feature of an
attribution document (clt.graph.attribution) whose dictionary has been labelled; `in_words(doc)` says what drives the
choice: the strongest features on the first target with their labels, then their total effect per category.
"""

from __future__ import annotations

import logging

from clt.feature_labels import read_labels
from clt.graph.replacement import Replacement

log = logging.getLogger(__name__)


def label_tables(replacement: Replacement) -> list[dict[int, dict] | None]:
    """Per layer of the graph (the glimpse last), feature -> its label entry; None where nothing is labelled."""
    folders = replacement.folders
    if replacement.kind == "multilayer":
        folders = folders[:1] * replacement.n_layers
    if replacement.glimpse_folder is not None:
        folders = [*folders, replacement.glimpse_folder]
    read: dict[str, dict] = {}  # each folder's labels.json once (a multi-layer CLT's layers share one)
    tables = []
    for folder, dictionary in zip(folders, replacement.dictionary_ids(), strict=True):
        if str(folder) not in read:
            try:
                read[str(folder)] = read_labels(folder)
            except (ValueError, KeyError, TypeError) as err:  # a labels.json from elsewhere or damaged: no labels
                log.warning("ignoring the labels in %s: %s", folder, err)
                read[str(folder)] = {}
        tables.append(read[str(folder)].get(dictionary))
    return tables


def attach_labels(doc: dict, replacement: Replacement, tables: list[dict[int, dict] | None] | None = None) -> int:
    """Adds `label` and `category` to the document's feature nodes and top features; returns how many nodes got one.
    `tables`: label_tables(replacement), when already read (many decisions of one replacement)."""
    tables = label_tables(replacement) if tables is None else tables
    found = {}
    for node in doc["nodes"]:
        if node["kind"] == "feature" and node["layer"] < len(tables) and tables[node["layer"]] is not None:
            entry = tables[node["layer"]].get(node["feature"])
            if entry is not None:
                node.update(label=entry["label"], category=entry["category"])
                found[node["id"]] = entry
    for top in doc["top_features"]:
        if top["id"] in found:
            top.update(label=found[top["id"]]["label"], category=found[top["id"]]["category"])
    return len(found)


def short(label: str) -> str:
    """A label without its score: "convex-hull cities, AUROC 0.97" -> "convex-hull cities"."""
    return label.rsplit(", AUROC", 1)[0]


def in_words(doc: dict, features: int = 5) -> str:
    """ "city 11 over city 0: L1#913 at city 4 (convex-hull cities) +1.19, ...; by category: boundary +2.10, ..." """
    if not doc["top_features"]:
        return "no feature drives this decision"
    target = next(iter(doc["top_features"][0]["total_effect"]))
    against = (doc.get("against") or [None])[0]
    head = f"city {target.split(':')[1]}" + (f" over city {against}" if against is not None else "")
    ranked = sorted(doc["top_features"], key=lambda f: -abs(f["total_effect"][target]))
    parts = []
    for f in ranked[:features]:
        _, layer, city, index = f["id"].split(":")
        what = short(f["label"]) if "label" in f else "not labelled"
        parts.append(f"L{layer}#{index} at city {city} ({what}) {f['total_effect'][target]:+.2f}")
    by_category: dict[str, float] = {}
    for f in doc["top_features"]:
        key = f.get("category", "not labelled")
        by_category[key] = by_category.get(key, 0.0) + f["total_effect"][target]
    totals = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(by_category.items(), key=lambda kv: -abs(kv[1])))
    return f"{head}: " + ", ".join(parts) + f"; by category (top {len(doc['top_features'])} features): {totals}"
