"""The package's shape: data flows one way (no import cycles), layers stand alone, every error has one base."""

import ast
import importlib
import inspect
import pathlib

import networkx as nx

import tcnn_fx
from tcnn_fx.errors import TcnnFxError

ROOT = pathlib.Path(tcnn_fx.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = ["tcnn_fx", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def import_graph() -> nx.DiGraph:
    """Module-level imports between the package's modules (imports inside functions are deliberate deferrals)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
                targets = submodules if len(submodules) == len(node.names) else [node.module, *submodules]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in MODULES and t != name)
    return graph


def test_no_import_cycles():
    assert list(nx.simple_cycles(import_graph())) == []


def test_verify_does_not_depend_on_rewrite():
    assert not nx.has_path(import_graph(), "tcnn_fx.verify", "tcnn_fx.rewrite")


def test_layers_never_import_the_compiler():
    graph = import_graph()
    for name in (m for m in MODULES if m.startswith("tcnn_fx.layers")):
        outside = {t for t in nx.descendants(graph, name) if not t.startswith("tcnn_fx.layers")}
        assert outside <= {"tcnn_fx.errors", "tcnn_fx.settings"}, (name, outside)  # leaf utilities


def test_every_error_class_has_the_one_base():
    classes = []
    for name in MODULES:
        if name.startswith("tcnn_fx.cli"):
            continue
        module = importlib.import_module(name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, Exception) and c.__module__.startswith("tcnn_fx")]  # fmt: skip
    assert len(classes) >= 10
    assert all(issubclass(c, TcnnFxError) for c in classes), [c for c in classes if not issubclass(c, TcnnFxError)]
    raised = {
        node.exc.func.id
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
    }
    builtin = {name for name in raised if name in dir(__builtins__) or name in __builtins__}
    assert builtin <= {"SystemExit", "NotImplementedError"}, f"builtin exceptions raised directly: {builtin}"
