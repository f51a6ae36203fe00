"""The package's layout: dependencies point one way (no import cycle, ``TYPE_CHECKING`` and
function-level imports included), and the pipeline's lower stages know the upper ones only
through protocols."""

from __future__ import annotations

import ast
import pathlib

import loopwatch

ROOT = pathlib.Path(loopwatch.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, wherever the import statement stands."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # ``from loopwatch import live`` is the module; ``from loopwatch import X``
                # the package itself
                if target in modules and target != name:
                    graph[name].add(target)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_under_type_checking_and_in_functions() -> None:
    graph = import_graph()
    assert "loopwatch.otel" in graph["loopwatch.monitor"]  # under TYPE_CHECKING
    assert "loopwatch.otel" in graph["loopwatch.middleware"]  # inside a method


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_pipeline_stages_depend_one_way() -> None:
    graph = import_graph()
    # the watchdog loop knows what it drives only through its protocol
    assert _reaches(graph, "loopwatch.watchdog") == set()
    # detect and attribute: below the books, the sinks and the monitor
    upper = {"loopwatch.monitor", "loopwatch.book", "loopwatch.deliver", "loopwatch.middleware"}
    for stage in ("loopwatch.detect", "loopwatch.attribute", "loopwatch.requests",
                  "loopwatch.frames", "loopwatch.accounting"):  # fmt: skip
        assert not _reaches(graph, stage) & upper, stage
    # the books and the exporters read a loop through ``stats.WatchedLoop``, not the monitor
    for lower in ("loopwatch.book", "loopwatch.stats", "loopwatch.live", "loopwatch.metrics",
                  "loopwatch.timeline", "loopwatch.profile", "loopwatch.deliver",
                  "loopwatch.pipeline"):  # fmt: skip
        assert "loopwatch.monitor" not in _reaches(graph, lower), lower
    # only the entry points (the middleware, the pytest plugin) build monitors
    users = {name for name, deps in graph.items() if "loopwatch.monitor" in deps}
    assert users <= {"loopwatch", "loopwatch.middleware", "loopwatch.pytest_plugin.loops"}, users


def test_no_class_is_much_over_400_lines() -> None:
    sizes = {
        f"{path.name}:{node.name}": (node.end_lineno or node.lineno) - node.lineno + 1
        for path in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    assert sizes and max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
