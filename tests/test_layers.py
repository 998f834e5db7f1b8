"""The import structure of caee/: layers point down only and no module takes part in an import circle.

Every module under caee/ is parsed (not imported); each ``import caee...`` / ``from caee... import``
anywhere in it (function bodies included, ``if TYPE_CHECKING:`` blocks excluded) is an edge. The
layer of each module is declared below; a module may import its own layer or a lower one.
Run alone with ``python -m pytest tests/test_layers.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "caee"

# lowest first; a name is a module or a package (covering everything under it)
LAYERS: list[tuple[str, set[str]]] = [
    ("base: config, io, metrics, errors and plumbing", {
        "caee", "caee.errors", "caee.io", "caee.config", "caee.metrics", "caee.provenance", "caee.distributed",
        "caee.logs", "caee.parallel", "caee.layout", "caee.markers"}),
    ("weight files", {"caee.weights"}),
    ("models, data, engine", {"caee.models", "caee.data", "caee.engine", "caee.sgd_in_backward", "caee.evaluation",
                              "caee.pictures"}),
    ("method", {"caee.affinity", "caee.affinity_labels", "caee.cam", "caee.crf", "caee.erasing", "caee.oracle",
                "caee.pseudo_labels", "caee.random_walk", "caee.segment"}),
    ("stages", {"caee.stages"}),
    ("drivers", {"caee.pipeline", "caee.steps", "caee.runner", "caee.variants", "caee.reports", "caee.results",
                 "caee.cli", "caee.__main__"}),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    """Index in LAYERS of the most specific entry covering ``module``."""
    best, best_len = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, known: set[str]) -> set[str]:
    """The caee modules ``path`` imports (``from caee import x`` counts as caee.x when that is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "caee")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "caee":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_import_from_a_higher_layer():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "imports that point up:\n  " + "\n  ".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "modules importing each other (directly or through others):\n  " + \
        "\n  ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder(graph, expected):
    assert _cycles(graph) == expected


def test_layer_of_a_module_inside_a_package():
    assert LAYERS[_layer("caee.stages.make_cam")][0] == "stages"
    assert _layer("caee.weights.checkpoints") < _layer("caee.models.resnet38") < _layer("caee.segment")


def test_checkpoint_files_are_read_in_one_module():
    """torch.load / torch.save of checkpoint files happen in caee/weights/checkpoints.py only."""
    allowed = PACKAGE / "weights" / "checkpoints.py"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("load", "save") and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch" and path != allowed:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} torch.{node.attr}")
    assert not found, "checkpoint files read or written outside caee/weights/checkpoints.py:\n  " + "\n  ".join(found)
