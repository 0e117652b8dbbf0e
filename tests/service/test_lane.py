"""The decision lane and the documented decision route give the same answers.

The lane (:mod:`service.decision.lane`) serves ``POST /v1/customers/{id}/decisions``
ahead of middleware and routing; the route in :mod:`service.api.decisions` is what the
OpenAPI spec documents, and serves any decision that reaches FastAPI itself. One table
of requests goes through both, on SQLite and PostgreSQL: same status, same body (but
for the ids and time of each new decision), and the lane must really be the one that
served its half. Then the lane's one socket write failing under a real uvicorn: the
recorded decision is still answered, by ASGI messages.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http import httptools_impl

from service.app import create_app
from service.decision import lane
from service.schemas import DecisionResponse
from service.settings import Settings
from tests.bank import load_trained_bank
from tests.service import test_decisions_api as api
from tests.uvicorn_thread import uvicorn_thread

# The bank trained once per module by the decision API tests.
trained = api.trained

KEYS = {"teller": ["decisions"], "feed": ["data"]}
BODY = {"channel": "branch", "staff_id": "S1", "branch_id": "B1", "max_offers": 3}
KNOWN = "C0000042"


@dataclass(frozen=True)
class Case:
    """One request: its path (from the customer id), headers by key name, body."""

    name: str
    customer: str = KNOWN
    key: str | None = "teller"
    body: bytes = orjson.dumps(BODY)
    headers: dict[str, str] = field(default_factory=dict)
    root_path: str = ""
    prefixed: bool = False  # the path carries root_path, as uvicorn sends it
    status: int = 200


CASES = [
    Case("no key", key=None, status=401),
    Case("unknown key", key="wrong", status=401),
    Case("wrong scope", key="feed", status=403),
    Case("bad body field", body=orjson.dumps({**BODY, "channel": "fax"}), status=422),
    Case("extra body field", body=orjson.dumps({**BODY, "colour": "red"}), status=422),
    Case("body not JSON", body=b"{not json", status=422),
    Case("bad body, no key: the key first", key=None, body=b"{not json", status=401),
    Case("oversized body", body=b" " * 70_000, status=413),
    Case("oversized body, no key: the key first", key=None, body=b" " * 70_000, status=401),
    Case("customer id no import holds", customer="%20C1", status=422),
    Case("customer id too long", customer="C" * 129, status=422),
    Case("Idempotency-Key too long", headers={"Idempotency-Key": "k" * 129}, status=422),
    Case("unknown customer", customer="NOBODY", status=404),
    Case("success"),
    Case("success with an Idempotency-Key", headers={"Idempotency-Key": "contact-1"}),
    Case("root path, prefixed", root_path="/nbo", prefixed=True),
    Case("root path, not prefixed", root_path="/nbo"),
    Case("root path, bad body", root_path="/nbo", prefixed=True, body=b"[]", status=422),
]


class Either:
    """The application, served per request by the lane (as in production) or by FastAPI
    itself, the lane bypassed: its documented route, through middleware and routing.

    One object for both, so that one lifespan (one serving state, one audit writer)
    serves both halves of each case.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.routed = False
        self.root_path = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": self.root_path}
        if self.routed:
            await FastAPI.__call__(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)


@dataclass
class Served:
    client: TestClient
    either: Either
    keys: dict[str, str]
    lane_calls: list[str]

    def send(self, case: Case, *, routed: bool) -> Any:
        self.either.routed = routed
        self.either.root_path = case.root_path
        headers = {"content-type": "application/json", **case.headers}
        if case.key is not None:
            headers["authorization"] = (
                f"Bearer {self.keys.get(case.key, 'nbo_abcdefgh_' + 'x' * 43)}"
            )
        path = f"/v1/customers/{case.customer}/decisions"
        if case.prefixed:
            path = case.root_path + path
        before = len(self.lane_calls)
        try:
            return self.client.post(path, content=case.body, headers=headers)
        finally:
            by_lane = len(self.lane_calls) > before
            assert by_lane is not routed, f"{case.name}: {'lane' if by_lane else 'routing'} served"


@pytest.fixture
def served(
    database_url: str, trained: api.Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    keys = load_trained_bank(database_url, trained.bank, trained.bundle, tmp_path, keys=KEYS)
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        control_share=0.0,
        min_propensity=0.0,
        frequency_cap=1_000_000,  # a decision does not change the next one's offers
        poll_interval_seconds=60.0,
    )
    calls: list[str] = []
    serve = lane.serve

    async def counted(app: Any, scope: Scope, receive: Receive, send: Send, customer: str) -> None:
        calls.append(customer)
        await serve(app, scope, receive, send, customer)

    monkeypatch.setattr(lane, "serve", counted)
    either = Either(create_app(settings))
    with TestClient(either) as client:
        yield Served(client, either, keys, calls)


def _comparable(response: Any) -> Any:
    """The answer without what differs per decision (its ids and time)."""
    body = response.json()
    if response.status_code == 200:
        DecisionResponse.model_validate_json(response.content)  # the documented answer
        del body["decision_id"], body["created_at"]
        for offer in body["offers"]:
            del offer["offer_id"]
    else:
        assert {"type", "title", "status", "detail"} <= body.keys()
        assert body["status"] == response.status_code
        # Each request has its own id, in the body and the header alike.
        assert body.pop("request_id") == response.headers["x-request-id"]
    return body


def _count(exposition: str, wanted: set[str]) -> float:
    name = "nbo_http_request_duration_seconds_count{"
    for line in exposition.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name) and set(head[len(name) : -1].split(",")) == wanted:
            return float(value)
    return 0.0


def test_the_lane_and_the_documented_route_answer_alike(served: Served) -> None:
    # One service for the whole table (a bank per case would take minutes); every
    # case is run and every difference reported.
    differences = []
    for case in CASES:
        by_lane = served.send(case, routed=False)
        by_route = served.send(case, routed=True)
        found = {
            "lane": (by_lane.status_code, by_lane.headers["content-type"], _comparable(by_lane)),
            "route": (
                by_route.status_code,
                by_route.headers["content-type"],
                _comparable(by_route),
            ),
        }
        if by_lane.status_code != case.status or found["lane"] != found["route"]:
            differences.append((case.name, case.status, found))
        elif case.status == 200:
            assert by_lane.json()["offers"], f"{case.name}: a decision with offers"
    assert [name for name, *_ in differences] == [], differences


def test_both_count_the_request_under_the_route_template(
    database_url: str, trained: api.Trained, tmp_path: Path
) -> None:
    keys = load_trained_bank(
        database_url, trained.bank, trained.bundle, tmp_path, keys={**KEYS, "ops": ["ops"]}
    )
    settings = Settings(database_url=database_url, data_dir=tmp_path, poll_interval_seconds=60)
    either = Either(create_app(settings))
    teller = {"authorization": f"Bearer {keys['teller']}"}
    wanted = {'method="POST"', f'route="{lane.DECISION_ROUTE}"', 'status="404"'}
    with TestClient(either) as client:

        def counted() -> float:
            either.routed = False
            exposition = client.get("/metrics", headers={"authorization": f"Bearer {keys['ops']}"})
            return _count(exposition.text, wanted)

        before = counted()
        for routed in (False, True):
            either.routed = routed
            answer = client.post("/v1/customers/NOBODY/decisions", json=BODY, headers=teller)
            assert answer.status_code == 404
        assert counted() == before + 2


# --------------------------------------------------------------------------- the one write


class _WriteFailsOnce:
    """A transport whose first write raises (as a changed uvicorn, or a transport in a
    state the one write did not expect, would), then writes as the real one."""

    failed: list[bytes] = []

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._failed = False

    def write(self, data: bytes) -> None:
        if not self._failed:
            self._failed = True
            type(self).failed.append(data)
            raise RuntimeError("the one write fell over")
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def test_a_failed_one_write_still_answers_the_recorded_decision(
    database_url: str, trained: api.Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = load_trained_bank(database_url, trained.bank, trained.bundle, tmp_path, keys=KEYS)
    settings = Settings(
        database_url=database_url, data_dir=tmp_path, control_share=0.0, min_propensity=0.0
    )
    assert lane._httptools_cycle() is not None  # the one write is on (read before the patch)
    cycle = httptools_impl.RequestResponseCycle
    init = cycle.__init__

    def with_failing_transport(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.transport = _WriteFailsOnce(self.transport)

    monkeypatch.setattr(cycle, "__init__", with_failing_transport)
    monkeypatch.setattr(_WriteFailsOnce, "failed", [])
    body = orjson.dumps(BODY)
    request = (
        f"POST /v1/customers/{KNOWN}/decisions HTTP/1.1\r\nHost: nbo\r\n"
        f"Authorization: Bearer {keys['teller']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with (
        uvicorn_thread(create_app(settings), lifespan="on", access_log=False) as address,
        socket.create_connection(address, timeout=10) as sock,
    ):
        sock.sendall(request)
        [(status, headers, content)] = api._http_answers(sock, 1)
    assert status == 200, content
    assert headers["content-type"] == "application/json"
    answer = orjson.loads(content)
    # What failed was the one write of this very answer.
    [failed] = _WriteFailsOnce.failed
    assert failed.startswith(b"HTTP/1.1 200 OK\r\n") and failed.endswith(content)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            recorded = conn.execute(
                text("SELECT customer_external_id FROM decisions WHERE id = :i"),
                {"i": answer["decision_id"]},
            ).scalar_one()
            offers = conn.execute(
                text("SELECT id FROM offers WHERE decision_id = :i ORDER BY rank"),
                {"i": answer["decision_id"]},
            ).all()
    finally:
        engine.dispose()
    assert recorded == KNOWN and answer["offers"]
    assert [o["offer_id"] for o in answer["offers"]] == [r[0] for r in offers]


def test_any_error_in_the_one_write_falls_back_to_asgi_messages(
    database_url: str, trained: api.Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = load_trained_bank(database_url, trained.bank, trained.bundle, tmp_path, keys=KEYS)
    settings = Settings(database_url=database_url, data_dir=tmp_path, control_share=0.0)

    async def broken(send: Send, body: bytes) -> bool:
        raise AttributeError("'RequestResponseCycle' object has no attribute 'flow'")

    monkeypatch.setattr(lane, "_send_whole", broken)
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            f"/v1/customers/{KNOWN}/decisions",
            json=BODY,
            headers={"authorization": f"Bearer {keys['teller']}"},
        )
    assert answer.status_code == 200, answer.text
    DecisionResponse.model_validate_json(answer.content)
