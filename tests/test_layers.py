"""The import graph: policy <- sae <- clt <- clt.graph <- clt.site, no command module imported by another, and the
bookkeeping modules free of torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policy", "sae", "clt")
LAYERS = (("clt.site", 4), ("clt.graph", 3), ("clt", 2), ("sae", 1), ("policy", 0))
"""Most specific prefix first: a module may import only from its own layer or below."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    return next(rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + "."))


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function (`from x import y` counts x.y when
    x.y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").is_file()
            }
    return {m for m in found if m.split(".")[0] in PACKAGES}


def is_command(path: Path) -> bool:
    """A `python -m` entry point: a module that runs its own `main()` under `if __name__ == "__main__"`."""
    return 'if __name__ == "__main__":\n    main()' in path.read_text()


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def test_the_layers_are_known():
    assert {"policy.runs", "sae.runs", "clt.model", "clt.graph.weights", "clt.site.export"} <= set(MODULES)
    assert [layer(m) for m in ("policy.io", "sae.hooks", "clt.eval", "clt.graph.edges", "clt.site.viewer")] == [
        0,
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    upward = sorted(m for m in project_imports(MODULES[module]) if layer(m) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports {upward}"


def test_no_command_module_is_imported_by_another_module():
    commands = {m for m, p in MODULES.items() if is_command(p)}
    assert {"policy.train", "sae.train_topk", "clt.train_transcoder", "clt.eval", "clt.site.export"} <= commands
    imported = {(m, i) for m, p in MODULES.items() for i in project_imports(p) if i in commands and i != m}
    assert not imported, f"command modules imported by others (move what they share into a library module): {imported}"


TORCH_FREE = ("policy.io", "policy.runs", "policy.checks", "sae.hook_names", "sae.runs", "clt.pairs", "clt.summarize",
              "clt.list_pairs")  # fmt: skip
"""What train_clt.sh runs between its stages (clt.summarize, clt.list_pairs) and what they import: without torch
(~1.7 s to import) each starts in ~0.13 s."""


def test_the_bookkeeping_modules_import_without_torch():
    loaded = "sorted(m for m in sys.modules if m.split('.')[0] == 'torch')"
    code = f"import sys; import {', '.join(TORCH_FREE)}; print({loaded})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", f"torch imported by {TORCH_FREE}: {done.stdout[:200]}"


def test_the_graph_package_exports_its_api_and_keeps_the_command_names():
    """clt.graph exports the objects of one decision's attribution; `attribute` and `intervene` stay the command
    modules (python -m clt.graph.attribute), whichever is imported first."""
    import clt.graph
    import clt.graph.attribute
    import clt.graph.intervene

    for name in clt.graph.__all__:
        assert getattr(clt.graph, name) is not None
    assert type(clt.graph.attribute).__name__ == "module" and type(clt.graph.intervene).__name__ == "module"
    assert callable(clt.graph.attribute.main) and callable(clt.graph.intervene.main)
