"""Structured logs (issue 16): JSON lines, request ids, decision ids, access lines.

The formatters and the format choice are checked on their own; request ids through
the app, on a routed request and on the decision fast lane (which runs before any
middleware, so does it itself): generated, taken from ``X-Request-ID``, a bad one
replaced, echoed, on every line logged for the request and in every problem body.
Access lines: every routed request, a sampled share of the lane's, never a customer
id, a query string or a key. Last, a real ``nbo serve`` writes JSON lines to a
standard error that is not a terminal.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import auth
from service.app import create_app
from service.cli.main import uvicorn_options
from service.data.db import make_engine, unit_of_work
from service.decision import lane
from service.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    begin_request,
    chosen_format,
    end_request,
    log_config,
    note_decision,
)
from service.settings import Settings
from tests.uvicorn_thread import uvicorn_thread

# Logging does not depend on the database: SQLite only, for speed.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

CUSTOMER = "C-PRIVATE-7781"  # personal data: must never reach an access line
BODY = {"channel": "branch", "staff_id": "S1", "branch_id": "B1"}
GENERATED = re.compile(r"[0-9a-f]{16}")


# ------------------------------------------------------------------------ formatting


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.getLogger("nbo.test").makeRecord(
        "nbo.test", logging.WARNING, __file__, 1, "model %s", ("loaded",), None, extra=extra
    )
    record.created = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z
    record.msecs = 250.0
    return record


def test_a_json_line_has_the_fixed_keys_then_the_extra_fields() -> None:
    line = JsonFormatter().format(_record(version="v7", rows=3, path_like=Path("/x")))
    assert "\n" not in line
    parsed = json.loads(line)
    assert list(parsed)[:4] == ["ts", "level", "logger", "msg"]
    assert parsed == {
        "ts": "2026-01-01T00:00:00.250Z",
        "level": "WARNING",
        "logger": "nbo.test",
        "msg": "model loaded",
        "version": "v7",
        "rows": 3,
        "path_like": "/x",  # what JSON cannot hold is written as its str
    }


def test_an_exception_is_one_json_field_with_its_traceback() -> None:
    try:
        raise ValueError("the bad thing")
    except ValueError:
        record = logging.getLogger("nbo.test").makeRecord(
            "nbo.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line  # one line, the traceback escaped inside it
    parsed = json.loads(line)
    assert parsed["msg"] == "failed"
    assert parsed["traceback"].startswith("Traceback (most recent call last):")
    assert parsed["traceback"].endswith("ValueError: the bad thing")
    text = TextFormatter().format(record)
    assert "ERROR" in text and text.endswith("ValueError: the bad thing")


def test_the_request_and_decision_ids_are_added_by_the_filter() -> None:
    record = _record()
    token = begin_request("req-1")
    try:
        note_decision("dec-1")
        ContextFilter().filter(record)
    finally:
        end_request(token)
    outside = _record()
    ContextFilter().filter(outside)
    assert json.loads(JsonFormatter().format(record))["request_id"] == "req-1"
    assert record.decision_id == "dec-1"
    assert "request_id=req-1 decision_id=dec-1" in TextFormatter().format(record)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("setting", "tty", "chosen"),
    [
        ("auto", True, "text"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("text", False, "text"),
    ],
)
def test_auto_is_text_on_a_terminal_and_json_otherwise(
    setting: Any, tty: bool, chosen: str
) -> None:
    assert chosen_format(setting, _Stream(tty)) == chosen
    formatter = log_config(setting, "info", stream=_Stream(tty))["formatters"]["nbo"]["class"]
    assert formatter.endswith("JsonFormatter" if chosen == "json" else "TextFormatter")


def test_nbo_serve_gives_uvicorn_the_log_config_and_the_shutdown_timeout() -> None:
    settings = Settings(log_format="json", log_level="debug", shutdown_timeout_seconds=7.5)
    options = uvicorn_options(settings, host="127.0.0.1", port=8000, workers=2)
    assert options["timeout_graceful_shutdown"] == 6.5  # a second kept for the audit flush
    assert options["access_log"] is False
    config = options["log_config"]
    assert config["formatters"]["nbo"]["class"] == "service.logs.JsonFormatter"
    assert config["loggers"]["nbo"]["level"] == "DEBUG"
    assert config["disable_existing_loggers"] is False  # or every module logger goes quiet
    assert config["handlers"]["stderr"]["filters"] == ["context"]


# ------------------------------------------------------------------------ the service


class Captured(logging.Handler):
    """Every record that reaches the root logger, with the request context added (the
    filter ``nbo serve`` puts on its handler)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == name]

    def clear(self) -> None:
        self.records.clear()


@dataclass
class Service:
    app: FastAPI
    client: TestClient
    logs: Captured
    keys: dict[str, str]

    def headers(self, key: str | None, request_id: str | None = None) -> dict[str, str]:
        headers = {} if key is None else {"authorization": f"Bearer {self.keys[key]}"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        return headers


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[Captured]:
    caplog.set_level(logging.DEBUG, logger="nbo")
    handler = Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def _service(
    database_url: str, tmp_path: Path, captured: Captured, **overrides: Any
) -> Iterator[Service]:
    engine = make_engine(database_url)
    with unit_of_work(engine) as session:
        keys = {
            "teller": auth.create_key(session, name="teller", scopes=["decisions"]),
            "catalogue": auth.create_key(session, name="cat", scopes=["catalogue"]),
            "feed": auth.create_key(session, name="feed", scopes=["data"]),
        }
    engine.dispose()
    settings = Settings(
        database_url=database_url, data_dir=tmp_path, poll_interval_seconds=60.0, **overrides
    )
    app = create_app(settings)

    @app.get("/test-only/logs")
    def logs_a_line() -> dict[str, str]:
        logging.getLogger("nbo.test").warning("inside a request", extra={"stage": "handler"})
        return {}

    @app.get("/test-only/fails")
    def fails() -> dict[str, str]:
        raise RuntimeError("an unexpected failure")

    with TestClient(app, raise_server_exceptions=False) as client:
        captured.clear()
        yield Service(app, client, captured, keys)


@pytest.fixture
def service(database_url: str, tmp_path: Path, captured: Captured) -> Iterator[Service]:
    yield from _service(database_url, tmp_path, captured)


def _ids(records: list[logging.LogRecord]) -> set[Any]:
    return {getattr(r, "request_id", None) for r in records}


@sqlite_only
def test_a_request_id_is_made_echoed_and_on_the_lines_of_that_request(service: Service) -> None:
    answers = [service.client.get("/test-only/logs") for _ in range(2)]
    made = [a.headers["x-request-id"] for a in answers]
    assert all(GENERATED.fullmatch(m) for m in made) and made[0] != made[1]
    inside = service.logs.named("nbo.test")
    access = service.logs.named("nbo.access")
    assert [r.request_id for r in inside] == made  # type: ignore[attr-defined]
    assert [r.request_id for r in access] == made  # type: ignore[attr-defined]


SENT_IDS = [
    ("abc-123_XYZ.42", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("has space", False),
    ("", False),
    ("tab\there", False),
    ("caf\u00e9", False),
]


@sqlite_only
def test_a_sane_x_request_id_is_taken_and_a_bad_one_replaced(service: Service) -> None:
    for sent, kept in SENT_IDS:
        service.logs.clear()
        sent_bytes: Any = sent.encode("latin-1")
        answer = service.client.get("/test-only/logs", headers={"x-request-id": sent_bytes})
        echoed = answer.headers["x-request-id"]
        assert echoed == sent if kept else GENERATED.fullmatch(echoed), sent
        assert _ids(service.logs.named("nbo.test")) == {echoed}, sent


@sqlite_only
def test_routed_problems_carry_the_request_id_in_body_header_and_log(service: Service) -> None:
    problems = {
        401: service.client.get("/v1/products", headers=service.headers(None, "rid-401")),
        404: service.client.get(
            "/v1/products/NOPE", headers=service.headers("catalogue", "rid-404")
        ),
        422: service.client.put(
            f"/v1/customers/{CUSTOMER}",
            json={"segment": 5, "attributes": []},
            headers=service.headers("feed", "rid-422"),
        ),
        500: service.client.get("/test-only/fails", headers={"x-request-id": "rid-500"}),
    }
    for status, answer in problems.items():
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["request_id"] == f"rid-{status}", status
        assert answer.headers.get_list("x-request-id") == [f"rid-{status}"], status
    # The unexpected failure is logged with its traceback and the request's id.
    [failure] = service.logs.named("nbo.errors")
    assert failure.exc_info and failure.request_id == "rid-500"  # type: ignore[attr-defined]
    access = {r.status: r for r in service.logs.named("nbo.access")}  # type: ignore[attr-defined]
    assert {s: r.request_id for s, r in access.items()} == {  # type: ignore[attr-defined]
        s: f"rid-{s}" for s in problems
    }


@sqlite_only
def test_routed_access_lines_name_the_route_template_only(service: Service) -> None:
    created = service.client.put(
        f"/v1/customers/{CUSTOMER}?secret=QUERY-TEXT",
        json={"segment": "retail"},
        headers=service.headers("feed", "rid-put"),
    )
    assert created.status_code == 201, created.text
    service.client.get(f"/no/such/{CUSTOMER}")
    service.client.get("/health/live")
    lines = [JsonFormatter().format(r) for r in service.logs.named("nbo.access")]
    parsed = [json.loads(line) for line in lines]
    assert [(p["method"], p["route"], p["status"]) for p in parsed] == [
        ("PUT", "/v1/customers/{customer_id}", 201),
        ("GET", "unmatched", 404),
        ("GET", "/health/live", 200),
    ]
    assert all(p["duration_ms"] >= 0 and p["msg"] == "request" for p in parsed)
    assert parsed[0]["request_id"] == "rid-put"
    for line in lines:
        assert CUSTOMER not in line and "QUERY-TEXT" not in line and "secret" not in line
        assert not any(key in line for key in service.keys.values())


# ------------------------------------------------------------------------ the lane


@pytest.fixture
def lane_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The customers the lane served (to be sure the lane, not routing, answered)."""
    calls: list[str] = []
    serve = lane.serve

    async def counted(app: Any, scope: Any, receive: Any, send: Any, customer: str) -> None:
        calls.append(customer)
        await serve(app, scope, receive, send, customer)

    monkeypatch.setattr(lane, "serve", counted)
    return calls


@sqlite_only
def test_the_lane_makes_takes_and_echoes_request_ids(
    service: Service, lane_calls: list[str]
) -> None:
    path = f"/v1/customers/{CUSTOMER}/decisions"
    made = service.client.post(path, json=BODY, headers=service.headers("teller"))
    taken = service.client.post(path, json=BODY, headers=service.headers("teller", "lane-rid"))
    bad = service.client.post(path, json=BODY, headers=service.headers("teller", "x" * 129))
    assert len(lane_calls) == 3
    assert [a.status_code for a in (made, taken, bad)] == [404, 404, 404]  # cold start off
    assert GENERATED.fullmatch(made.headers["x-request-id"])
    assert made.json()["request_id"] == made.headers["x-request-id"]
    assert taken.headers["x-request-id"] == taken.json()["request_id"] == "lane-rid"
    assert GENERATED.fullmatch(bad.json()["request_id"])


@sqlite_only
def test_lane_problems_carry_the_request_id(service: Service, lane_calls: list[str]) -> None:
    path = f"/v1/customers/{CUSTOMER}/decisions"
    problems = {
        401: service.client.post(path, json=BODY, headers={"x-request-id": "rid-401"}),
        404: service.client.post(path, json=BODY, headers=service.headers("teller", "rid-404")),
        413: service.client.post(
            path, content=b" " * 70_000, headers=service.headers("teller", "rid-413")
        ),
        422: service.client.post(
            path, json={**BODY, "channel": "fax"}, headers=service.headers("teller", "rid-422")
        ),
    }
    assert len(lane_calls) == len(problems)
    for status, answer in problems.items():
        assert answer.status_code == status, answer.text
        assert answer.json()["request_id"] == f"rid-{status}", status
        assert answer.headers.get_list("x-request-id") == [f"rid-{status}"], status
    assert not service.logs.named("nbo.access")  # access_log_sample 0: none for the lane


@pytest.fixture
def cold_start(database_url: str, tmp_path: Path, captured: Captured) -> Iterator[Service]:
    yield from _service(database_url, tmp_path, captured, cold_start=True, access_log_sample=1.0)


@sqlite_only
def test_lines_logged_during_a_decision_carry_its_request_and_decision_ids(
    cold_start: Service, lane_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = cold_start.app.state.audit
    write = audit.write

    async def warns(record: Any) -> bool:
        logging.getLogger("nbo.decisions").warning("slow audit write (test)")
        return bool(await write(record))

    monkeypatch.setattr(audit, "write", warns)
    answer = cold_start.client.post(
        f"/v1/customers/{CUSTOMER}/decisions",
        json=BODY,
        headers=cold_start.headers("teller", "decision-rid"),
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "decision-rid"
    decision_id = answer.json()["decision_id"]
    lines = cold_start.logs.named("nbo.decisions")
    assert {r.getMessage() for r in lines} == {"slow audit write (test)", "decision made"}
    for record in lines:
        assert record.request_id == "decision-rid"  # type: ignore[attr-defined]
        assert record.decision_id == decision_id  # type: ignore[attr-defined]
    assert lane_calls == [CUSTOMER]


@sqlite_only
def test_lane_access_lines_at_sample_1_without_customer_or_key(
    cold_start: Service, lane_calls: list[str]
) -> None:
    path = f"/v1/customers/{CUSTOMER}/decisions?customer={CUSTOMER}"
    statuses = [
        cold_start.client.post(path, json=BODY, headers=cold_start.headers("teller")),
        cold_start.client.post(path, json=BODY, headers={"x-api-key": "nbo_abcdefgh_" + "x" * 43}),
        cold_start.client.post(path, json=BODY, headers=cold_start.headers("teller", "lane-1")),
    ]
    assert len(lane_calls) == 3
    records = cold_start.logs.named("nbo.access")
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    assert [(x["method"], x["route"], x["status"]) for x in lines] == [
        ("POST", lane.DECISION_ROUTE, 200),
        ("POST", lane.DECISION_ROUTE, 401),
        ("POST", lane.DECISION_ROUTE, 200),
    ]
    assert [x["request_id"] for x in lines] == [a.headers["x-request-id"] for a in statuses]
    text = "\n".join(JsonFormatter().format(r) for r in records)
    assert CUSTOMER not in text and "nbo_" not in text
    assert not any(key in text for key in cold_start.keys.values())


@sqlite_only
def test_the_lane_one_write_echoes_the_request_id(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real uvicorn (httptools, no access log) the 200 is one socket write made by
    the lane itself (``_send_whole``): its head carries X-Request-ID too."""
    engine = make_engine(database_url)
    with unit_of_work(engine) as session:
        key = auth.create_key(session, name="teller", scopes=["decisions"])
    engine.dispose()
    settings = Settings(database_url=database_url, data_dir=tmp_path, cold_start=True)
    whole: list[bool] = []
    send_whole = lane._send_whole

    async def spy(send: Any, body: bytes) -> bool:
        whole.append(await send_whole(send, body))
        return whole[-1]

    monkeypatch.setattr(lane, "_send_whole", spy)
    with uvicorn_thread(create_app(settings), lifespan="on", access_log=False) as (host, port):
        answer = httpx.post(
            f"http://{host}:{port}/v1/customers/{CUSTOMER}/decisions",
            json=BODY,
            headers={"authorization": f"Bearer {key}", "x-request-id": "one-write-1"},
        )
    assert answer.status_code == 200, answer.text
    assert whole == [True]
    assert answer.headers.get_list("x-request-id") == ["one-write-1"]


# ------------------------------------------------------------------------ nbo serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@sqlite_only
def test_nbo_serve_writes_json_lines_to_a_stderr_that_is_not_a_terminal(
    database_url: str, tmp_path: Path
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBO_")}
    env |= {
        "NBO_DATABASE_URL": database_url,
        "NBO_DATA_DIR": str(tmp_path),
        "NBO_POLL_INTERVAL_SECONDS": "60",
    }
    nbo = Path(sys.executable).with_name("nbo")
    process = subprocess.Popen(
        [str(nbo), "serve", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60  # imports and migrations, on a busy machine
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "nbo serve did not start"
            try:
                httpx.get(f"{base}/health/live", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.put(
            f"{base}/v1/customers/{CUSTOMER}?x=1", json={}, headers={"x-request-id": "serve-rid-1"}
        )
        assert answer.status_code == 401
        assert answer.headers["x-request-id"] == answer.json()["request_id"] == "serve-rid-1"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines), stderr
    assert all(line["ts"].endswith("Z") for line in lines)
    loggers = {line["logger"] for line in lines}
    assert "uvicorn.error" in loggers  # uvicorn's own lines are JSON too
    [access] = [line for line in lines if line["logger"] == "nbo.access" and line["status"] == 401]
    assert access["request_id"] == "serve-rid-1"
    assert access["route"] == "/v1/customers/{customer_id}"
    assert CUSTOMER not in stderr
