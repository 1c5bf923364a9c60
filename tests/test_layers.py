"""The house's layers: flows -> tasks -> plain modules (mergeflow) -> merge_ops, read from every import statement.

Function-local imports count like module-level ones, so a cycle cannot hide inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("merge_ops", "mergeflow", "tasks", "flows")
WORKFLOW_LIBRARIES = ("prefect", "prefect_dask", "mlflow", "dvc", "dvc_data", "dvc_objects")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in the file: ours by module name, others by top-level package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
    return {name if name in known or name.split(".")[0] in PACKAGES else name.split(".")[0] for name in found}


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def layer(name: str) -> str:
    if name.startswith("mergeflow.cli"):
        return "cli"
    return name.split(".")[0]


ALLOWED = {
    "merge_ops": {"merge_ops"},
    "mergeflow": {"merge_ops", "mergeflow"},
    "tasks": {"merge_ops", "mergeflow", "tasks"},
    "flows": {"merge_ops", "mergeflow", "tasks", "flows"},
    "cli": {"merge_ops", "mergeflow", "flows", "cli"},
}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_flow_one_way(name: str) -> None:
    ours = {m for m in GRAPH[name] if m.split(".")[0] in PACKAGES}
    wrong = sorted(m for m in ours if layer(m) not in ALLOWED[layer(name)])
    assert not wrong, f"{name} ({layer(name)}) may import only {sorted(ALLOWED[layer(name)])}, but imports {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer(n) in ("merge_ops", "mergeflow")))
def test_plain_modules_know_no_workflow_engine(name: str) -> None:
    """merge_ops uses no Prefect, MLflow or DVC; the plain workflow modules use their clients but never Prefect."""
    banned = WORKFLOW_LIBRARIES if layer(name) == "merge_ops" else ("prefect", "prefect_dask")
    assert not GRAPH[name] & set(banned), f"{name} imports {sorted(GRAPH[name] & set(banned))}"


def test_no_import_cycles() -> None:
    ours = {n: {m for m in deps if m in GRAPH and m != n} for n, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(ours[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(ours):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_cli_calls_flows_or_plain_functions_never_tasks() -> None:
    cli = {n: deps for n, deps in GRAPH.items() if layer(n) == "cli"}
    assert cli and not any(m.startswith("tasks") for deps in cli.values() for m in deps)


def test_the_checks_see_a_violation() -> None:
    """The graph is read from real import statements: a known edge is there, so a wrong one would be seen."""
    assert "tasks.retries" in GRAPH["tasks.sources"] and "merge_ops.headers" in GRAPH["mergeflow.sources"]
    assert "prefect" in GRAPH["tasks.sources"] and "prefect" not in GRAPH["mergeflow.sources"]
