"""The decisions the site's Decisions tab shows: `<site data>/decisions.json`, and `decisions.js` with the same list
as `window.DECISIONS = ...;` (a script, so that docs/index.html also works from the file system).

Each entry is an attribution document (clt.graph.attribution) cut down for drawing: the kept nodes, the strongest kept
edges, no full node list. `clt.site.export` writes the demo decisions here and `clt.graph.attribute --export` adds
one; an entry replaces the one of the same run and name.
"""

from __future__ import annotations

import json
from pathlib import Path

from policy.io import atomic_write, locked, read_json

SITE_EDGES = 1500  # edges drawn per decision, by edge influence


def for_site(doc: dict, name: str, edges: int = SITE_EDGES) -> dict:
    """The part of an attribution document the site draws, under `name`."""
    kept = [n for n in doc["nodes"] if n["kept"]]
    strongest = sorted(doc["edges"], key=lambda e: -e["score"])[:edges]
    verification = {
        k: {key: v for key, v in part.items() if key not in ("removals", "checked")}
        for k, part in doc["verification"].items()
    }
    return {
        **{k: v for k, v in doc.items() if k not in ("nodes", "edges", "verification")},
        "name": name,
        "nodes": kept,
        "edges": strongest,
        "verification": verification,
    }


def read_gallery(folder: str | Path) -> list[dict]:
    path = Path(folder) / "decisions.json"
    return read_json(path) if path.is_file() else []


def add_to_gallery(folder: str | Path, entries: list[dict], only_run: str | None = None) -> Path:
    """Add (or replace, by run and name) site entries; with `only_run`, drop the entries of every other run (a site
    shows one run). Returns decisions.json's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".decisions.lock"):
        keys = {(e["run"], e["name"]) for e in entries}
        kept = [e for e in read_gallery(folder)
                if (e.get("run"), e.get("name")) not in keys and only_run in (None, e.get("run"))]  # fmt: skip
        text = json.dumps(kept + entries, separators=(",", ":"))
        atomic_write(folder / "decisions.js", lambda tmp: tmp.write_text(f"window.DECISIONS = {text};\n"))
        return atomic_write(folder / "decisions.json", lambda tmp: tmp.write_text(text + "\n"))
