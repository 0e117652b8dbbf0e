"""The HTTP surface: health probes, problem details, and the OpenAPI contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.openapi import render_openapi
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    # Ops endpoints open: these tests read the readiness figures without a key.
    settings = Settings(database_url=database_url, data_dir=tmp_path, ops_endpoints="open")
    with TestClient(create_app(settings)) as client:
        yield client


def test_openapi_yaml_equals_served_spec() -> None:
    """openapi.yaml at the top level is what the app serves (regenerate: `nbo openapi`)."""
    served = render_openapi(create_app(Settings()))
    assert (REPO / "openapi.yaml").read_text() == served


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json()["status"] == "ok"
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["schema_revision"] is not None


def test_not_ready_on_unmigrated_database(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'empty.sqlite3'}", data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 503 and "nbo db upgrade" in body["detail"]


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Not Found"
