"""Guards on the shape of the code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODELS = {
    "service",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "prometheus_client",
    "alembic",
}


def test_models_is_a_pure_library() -> None:
    """models/ never imports the application, web, database or metrics layers."""
    offenders = []
    for path in (REPO / "models").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_IN_MODELS:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert offenders == []


def test_only_settings_reads_the_environment() -> None:
    offenders = []
    for path in (REPO / "service").rglob("*.py"):
        # metrics.py only sets PROMETHEUS_MULTIPROC_DIR for uvicorn's worker processes.
        if path.name in ("settings.py", "metrics.py"):
            continue
        if "os.environ" in path.read_text() or "os.getenv" in path.read_text():
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


PACKAGES = ("service", "models")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every module of service/ and models/ and the modules of theirs it imports,
    at module level or inside a function (a lazy import still ties the two)."""
    modules = {
        _module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from service.reports import measures` imports the submodule.
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            # A package's __init__ re-exporting its own modules is not a cycle of concern.
            outside = {m for m in component if not any(o.startswith(m + ".") for o in component)}
            if len(outside) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """Arrows go one way: no two modules of service/ or models/ import each other,
    directly or round a loop, not even through an import inside a function."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "p": {"p.x"}, "p.x": {"p"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# What a serving worker must never load: plotting, the fake bank, offline evaluation,
# the training job and loop, the command line and the simulation.
NOT_FOR_SERVING = (
    "matplotlib",
    "models.synthetic",
    "models.evaluation",
    "models.evaluation_report",
    "models.propensity.training",
    "service.training",
    "service.scoring",
    "service.cli",
    "service.simulation",
)


def test_the_serving_path_loads_no_offline_code() -> None:
    """The app (every route, the decision lane) imports none of NOT_FOR_SERVING: they
    cost each worker memory and start-up time, and tie serving to offline changes."""
    probe = (
        "import sys, service.app, service.decision.lane, service.decision.engine\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({NOT_FOR_SERVING!r}))\n"
        "print('\\n'.join(bad))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert loaded == []
