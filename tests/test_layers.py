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

# lowest first. An entry ending in ".*" covers the modules of that package (its folder shows the
# layer); any other entry is one module. There is no catch-all: a module that no entry covers fails.
LAYERS: list[tuple[str, set[str]]] = [
    ("core: config, records, layout, io, metrics, errors, processes", {"caee", "caee.core", "caee.core.*"}),
    ("weight files", {"caee.weights", "caee.weights.*"}),
    ("models, data, engine", {"caee.models", "caee.models.*", "caee.data", "caee.data.*", "caee.engine",
                              "caee.engine.*"}),
    ("method", {"caee.method", "caee.method.*"}),
    ("stages", {"caee.stages", "caee.stages.*"}),
    ("pipeline", {"caee.pipeline", "caee.pipeline.*"}),
    ("command line and reproduction drivers", {"caee.cli", "caee.__main__", "caee.reports", "caee.reports.*"}),
]

# The method layer takes arrays, tensors and networks and returns them: it never imports what knows
# folders, records, locks or checkpoint files (those belong to the stages, data/ and weights/).
METHOD_MAY_NOT_IMPORT = {"caee.core.records", "caee.core.layout", "caee.core.io", "caee.core.parallel",
                         "caee.weights.checkpoints", "caee.engine.scoring"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _covers(entry: str, module: str) -> bool:
    if entry.endswith(".*"):
        package = entry[:-2]
        return module.startswith(package + ".") and "." not in module[len(package) + 1:]
    return module == entry


def _layer(module: str, layers: list[tuple[str, set[str]]] | None = None) -> int:
    """Index in ``layers`` (default LAYERS) of the one layer whose entries cover ``module``."""
    found = [i for i, (_, names) in enumerate(layers or LAYERS) if any(_covers(n, module) for n in names)]
    if not found:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
    if len(found) > 1:
        raise AssertionError(f"{module} is in {len(found)} layers: keep it in one")
    return found[0]


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


def test_a_module_without_a_layer_fails():
    """No catch-all: a new package, or a module at the top of caee/, is not covered until listed."""
    for module in ("caee.new_module", "caee.core.sub.deeper", "caee.toolbox.thing"):
        with pytest.raises(AssertionError, match="has no layer"):
            _layer(module)
    with pytest.raises(AssertionError, match="in 2 layers"):
        _layer("caee.core.io", LAYERS + [("again", {"caee.core.io"})])


def _method_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in graph.items() if m.startswith("caee.method")
            for d in sorted(deps & METHOD_MAY_NOT_IMPORT)]


def test_method_layer_is_pure():
    bad = _method_violations(_graph())
    assert not bad, "method modules that know folders, records, locks or checkpoint files:\n  " + "\n  ".join(bad)


def test_method_purity_check_catches_an_import():
    graph = {"caee.method.cam": {"caee.core.records"}, "caee.method.crf": {"caee.core.io", "caee.core.config"},
             "caee.stages.make_cam": {"caee.core.io"}}
    assert _method_violations(graph) == ["caee.method.cam imports caee.core.records",
                                         "caee.method.crf imports caee.core.io"]


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
    assert _layer("caee.weights.checkpoints") < _layer("caee.models.resnet38") < _layer("caee.method.segment")


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
