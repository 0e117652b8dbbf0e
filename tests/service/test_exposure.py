"""What the service shows and accepts without a key: operations endpoints behind scope
'ops' by default, readiness figures only to such a key, readiness that tells the truth,
and a body limit enforced before the key is checked (issue 13, findings 5 and 7)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service import auth
from service.app import create_app
from service.cli.keys import keys_app
from service.data.db import make_engine, unit_of_work
from service.settings import Settings
from tests.uvicorn_thread import uvicorn_thread

OPS_PATHS = ["/metrics", "/docs", "/redoc", "/openapi.json"]
FIGURES = ("database", "schema_revision", "model_version", "degraded", "customers")


def _keys(url: str) -> dict[str, str]:
    engine = make_engine(url)
    try:
        with unit_of_work(engine) as session:
            return {
                "ops": auth.create_key(session, name="prometheus", scopes=["ops"]),
                "teller": auth.create_key(session, name="teller", scopes=["decisions"]),
                "admin": auth.create_key(session, name="admin", scopes=["admin"]),
                "data": auth.create_key(session, name="feed", scopes=["data"]),
            }
    finally:
        engine.dispose()


@pytest.fixture
def keys(database_url: str) -> dict[str, str]:
    return _keys(database_url)


@pytest.fixture
def make_client(database_url: str, tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def start(**overrides: Any) -> TestClient:
        settings = Settings(
            database_url=database_url,
            data_dir=tmp_path,
            poll_interval_seconds=60.0,
            **overrides,
        )
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- ops endpoints


def test_ops_endpoints_need_a_key_with_ops_by_default(
    make_client: Any, keys: dict[str, str]
) -> None:
    """Before: /metrics, /docs, /redoc and /openapi.json answered anyone."""
    client = make_client()
    for path in OPS_PATHS:
        missing = client.get(path)
        assert missing.status_code == 401, path
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert client.get(path, headers=bearer(keys["teller"])).status_code == 403, path
        assert client.get(path, headers=bearer(keys["ops"])).status_code == 200, path
        assert client.get(path, headers={"X-API-Key": keys["admin"]}).status_code == 200
    metrics = client.get("/metrics", headers=bearer(keys["ops"]))
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "nbo_http_request_duration_seconds" in metrics.text
    spec = client.get("/openapi.json", headers=bearer(keys["ops"])).json()
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "/openapi.json" in client.get("/docs", headers=bearer(keys["ops"])).text


def test_ops_endpoints_open_by_configuration(make_client: Any) -> None:
    client = make_client(ops_endpoints="open")
    for path in OPS_PATHS:
        assert client.get(path).status_code == 200, path


def test_probes_stay_open_but_readiness_figures_need_ops(
    make_client: Any, keys: dict[str, str]
) -> None:
    """Before: /health/ready told anyone the model version and the number of customers."""
    client = make_client()
    assert client.get("/health/live").status_code == 200
    bare = client.get("/health/ready")
    assert bare.status_code == 200
    assert bare.json()["status"] == "ok"
    assert all(bare.json()[field] is None for field in FIGURES)
    full = client.get("/health/ready", headers=bearer(keys["ops"])).json()
    assert full["database"] and full["schema_revision"] and full["customers"] == 0
    assert client.get("/health/ready", headers=bearer(keys["teller"])).status_code == 403
    bad = client.get("/health/ready", headers=bearer("nbo_abcdefgh_" + "x" * 43))
    assert bad.status_code == 401
    opened = make_client(ops_endpoints="open").get("/health/ready").json()
    assert opened["schema_revision"] == full["schema_revision"]


def test_keys_cli_creates_an_ops_key(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBO_DATABASE_URL", database_url)
    monkeypatch.setenv("NBO_DATA_DIR", str(tmp_path))
    created = CliRunner().invoke(keys_app, ["create", "--name", "scraper", "--scopes", "ops"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    engine = make_engine(database_url)
    try:
        principal = auth.KeyStore(engine).authenticate(None, key, "ops")
    finally:
        engine.dispose()
    assert principal.scopes == {"ops"} and not principal.allows("decisions")


# --------------------------------------------------------------------------- readiness


def test_readiness_is_503_when_the_active_model_did_not_load(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    assert client.get("/health/ready").status_code == 200
    state = client.app.state.serving
    monkeypatch.setattr(state, "load_error", "bundle checksum mismatch", raising=False)
    answer = client.get("/health/ready")
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert "could not load the active model" in answer.json()["detail"]
    assert "checksum" not in answer.text  # the details are in the worker's log


def test_readiness_is_503_when_the_audit_writer_is_not_running(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    audit = client.app.state.audit
    monkeypatch.setattr(type(audit), "healthy", property(lambda self: False), raising=False)
    answer = client.get("/health/ready")
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert "audit writer" in answer.json()["detail"]


def test_readiness_is_503_without_a_snapshot(make_client: Any) -> None:
    """A worker that could not load its snapshot answers every decision degraded with no
    offers: it is not ready, whatever the database says."""
    client = make_client()
    client.app.state.serving.snapshot = None
    answer = client.get("/health/ready")
    assert answer.status_code == 503 and "snapshot" in answer.json()["detail"]


# --------------------------------------------------------------------------- body limit


def test_an_oversize_body_is_413_before_the_key_is_checked(make_client: Any) -> None:
    """Before: a body of any size was read, then 401 for the missing key."""
    client = make_client(max_body_bytes=4096)
    big = b'{"attributes": {"a": "' + b"x" * 10_000 + b'"}}'
    for headers in ({}, {"Authorization": "Bearer nbo_abcdefgh_" + "x" * 43}):
        answer = client.put(
            "/v1/customers/C1",
            content=big,
            headers={"content-type": "application/json", **headers},
        )
        assert answer.status_code == 413, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["detail"] == "the request body is over 4,096 bytes"
    small = client.put("/v1/customers/C1", json={"attributes": {"a": 1}})
    assert small.status_code == 401


def test_a_streamed_body_is_counted_as_it_arrives(make_client: Any, keys: dict[str, str]) -> None:
    client = make_client(max_body_bytes=4096)

    def chunks() -> Iterator[bytes]:
        yield b'{"attributes": {"a": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}}'

    answer = client.put(
        "/v1/customers/C1",
        content=chunks(),
        headers={"content-type": "application/json", **bearer(keys["data"])},
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["status"] == 413


def _raw_put(port: int, head: bytes, body_chunks: Iterator[bytes]) -> tuple[bytes, float, int]:
    """Send a request over a socket; return the status line, the seconds until it came,
    and how many body bytes were sent before it did."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        for chunk in body_chunks:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.setblocking(True)
        while b"\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        return answer.split(b"\r\n", 1)[0], time.monotonic() - started, sent


def test_a_huge_body_without_a_key_is_refused_at_once_over_the_wire(
    database_url: str, tmp_path: Path
) -> None:
    """The 400 MiB PUT of the finding: 413 at once, without reading it, both with a
    Content-Length and chunked."""
    settings = Settings(database_url=database_url, data_dir=tmp_path, poll_interval_seconds=60)
    mib = b"x" * (1 << 20)

    def body(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield mib

    def chunked(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"%x\r\n" % len(mib) + mib + b"\r\n"
        yield b"0\r\n\r\n"

    with uvicorn_thread(create_app(settings), lifespan="on") as (_, port):
        declared = (
            b"PUT /v1/customers/C1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (400 << 20)
        )
        status, seconds, sent = _raw_put(port, declared, body(400))
        assert status.startswith(b"HTTP/1.1 413 "), status
        assert seconds < 2 and sent < (64 << 20)
        streamed = (
            b"PUT /v1/customers/C1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        status, seconds, sent = _raw_put(port, streamed, chunked(400))
        assert status.startswith(b"HTTP/1.1 413 "), status
        assert seconds < 2 and sent < (64 << 20)
        # The server is fine afterwards.
        assert httpx.get(f"http://127.0.0.1:{port}/health/live").status_code == 200


def test_decisions_keep_their_own_smaller_limit(make_client: Any, keys: dict[str, str]) -> None:
    client = make_client()
    too_big = b'{"channel": "branch", "context": {"a": "' + b"x" * 70_000 + b'"}}'
    answer = client.post(
        "/v1/customers/C1/decisions",
        content=too_big,
        headers={"content-type": "application/json", **bearer(keys["teller"])},
    )
    assert answer.status_code == 413
