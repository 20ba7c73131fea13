"""The package's layout is its architecture: layers in folders, every import pointing down, no circles, no private
names borrowed from another module, small modules (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deeploc"
# Bottom up: a module may import its own layer and the layers below it, never one above.
LAYERS = (
    ("base", ("errors", "registry", "io", "locks", "console", "config", "visualize")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("features", ("features",)),
    ("metrics", ("metrics",)),
    ("runs", ("runs",)),
    ("training", ("training",)),
    ("multihead", ("multihead",)),
    ("evaluation", ("evaluation", "probe")),
    ("report", ("report",)),
    ("inference", ("inference",)),
    ("cli", ("cli", "testing")),
)
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS here and to docs/architecture.md")


def _imports(module: str, path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(imported deeploc module, names imported from it) for every import in the file, function-level ones too."""
    is_pkg = path.name == "__init__.py"
    pkg = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names if a.name.startswith("deeploc")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("deeploc"):
                found.append((base, tuple(a.name for a in node.names)))
    return found


def _target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = set()
        for imported, names in _imports(module, path):
            for full in [imported, *(f"{imported}.{n}" for n in names)]:
                target = _target(full)
                if target and target != module and not module.startswith(target + "."):
                    targets.add(target)
        graph[module] = targets
    return graph


def test_every_import_points_down_the_layers() -> None:
    # The root package registers conf/'s resolvers on import (a convenience for notebooks): it is not a layer.
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in _graph().items()
        if module != "deeploc"
        for target in sorted(targets)
        if target != "deeploc" and _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_circle() -> None:
    graph = _graph()
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_no_module_imports_a_private_name_of_another() -> None:
    borrowed = [
        f"{module} imports {name} from {imported}"
        for module, path in MODULES.items()
        for imported, names in _imports(module, path)
        for name in names
        if name.startswith("_") and not name.startswith("__") and imported != module
    ]
    assert not borrowed, "\n".join(borrowed)


def test_modules_are_small() -> None:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    large = [f"{m}: {n} lines" for m, n in sorted(sizes.items()) if n > MAX_LINES]
    assert not large, f"split these by job (at most {MAX_LINES} lines):\n" + "\n".join(large)
