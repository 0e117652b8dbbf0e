"""Guards on the shape of the code."""

from __future__ import annotations

import ast
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
