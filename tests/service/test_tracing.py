"""Traces of decisions (:mod:`service.tracing`): the span tree of a decision, what its
spans may say (never the customer or the key), a degraded decision traced too, tracing
that fails without failing a decision, nothing traced or loaded when it is off, and the
real OTLP exporter started by the lifespan with no collector to answer it.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from service.app import create_app
from service.settings import Settings
from tests.service import test_decisions_api as api

REPO = Path(__file__).resolve().parents[2]

# The bank trained once per module by the decision API tests.
trained = api.trained

BODY = {"channel": "branch", "staff_id": "S1", "branch_id": "B1", "max_offers": 3}
KNOWN = "C0000042"
STAGES = {"key check", "ranking", "audit commit"}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of decisions, kept in memory (tracing configured as the lifespan does)."""
    found = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(found))
    tracing.configure(provider)
    yield found
    tracing.configure(None)


def _settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "control_share": 0.0,
        "min_propensity": 0.0,
        "poll_interval_seconds": 60.0,
    }
    return Settings(database_url=database_url, data_dir=data_dir, **{**defaults, **overrides})


def _decide(client: TestClient, key: str, customer: str = KNOWN, **headers: str) -> Any:
    return client.post(
        f"/v1/customers/{customer}/decisions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def _trees(spans: tuple[ReadableSpan, ...]) -> list[tuple[ReadableSpan, list[ReadableSpan]]]:
    """Each ``decision`` span with its children, in the order the decisions ended."""
    roots = [s for s in spans if s.name == "decision"]
    trees = []
    for root in roots:
        assert root.parent is None  # a trace of its own
        assert root.context is not None
        children = [
            s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id
        ]
        assert all(c.context is not None and c.context.trace_id == root.context.trace_id
                   for c in children)  # fmt: skip
        trees.append((root, children))
    # Every span is a decision or a child of one.
    assert sum(1 + len(children) for _, children in trees) == len(spans)
    return trees


def _said(spans: tuple[ReadableSpan, ...]) -> str:
    """Everything the spans say: names, attribute names and values, events, status."""
    parts = []
    for span in spans:
        parts.append(span.name)
        parts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        parts += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
        parts.append(str(span.status.description))
    return "\n".join(parts)


def test_a_decision_is_a_span_tree_without_customer_or_key(
    database_url: str, trained: api.Trained, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    keys = api.prepare(database_url, trained, tmp_path)
    with TestClient(create_app(_settings(database_url, tmp_path))) as client:
        answered = _decide(client, keys["teller"], **{"X-Request-ID": "req-trace-1"})
        assert answered.status_code == 200
        unknown = _decide(client, keys["teller"], customer="NOBODY")
        assert unknown.status_code == 404
        refused = _decide(client, "nbo_abcdefgh_" + "x" * 43)
        assert refused.status_code == 401
    decision = answered.json()
    assert decision["offers"] and decision["model_version"]
    spans = exporter.get_finished_spans()
    (ok, ok_children), (missing, missing_children), (bad, bad_children) = _trees(spans)

    assert {c.name for c in ok_children} == STAGES
    assert len(ok_children) == 3
    assert dict(ok.attributes or {}) == {
        "nbo.request_id": "req-trace-1",
        "nbo.decision.id": decision["decision_id"],
        "nbo.decision.channel": "branch",
        "nbo.decision.result": "normal",
        "nbo.decision.offers": len(decision["offers"]),
        "nbo.decision.model_version": decision["model_version"],
    }
    assert ok.status.is_ok
    # The children lie within the decision, in the order the decision takes them.
    by_name = {c.name: c for c in ok_children}
    starts = [by_name[n].start_time or 0 for n in ("key check", "ranking", "audit commit")]
    assert (ok.start_time or 0) <= starts[0] < starts[1] < starts[2]
    assert all((c.end_time or 0) <= (ok.end_time or 0) for c in ok_children)

    # An unknown customer: the key was checked, the ranking refused; said by type only.
    assert {c.name for c in missing_children} == {"key check", "ranking"}
    assert (missing.attributes or {})["error.type"] == "NotFound"
    assert missing.status.is_unset  # a 404 is the caller's, not the service's error
    # A bad key: only the key check, which failed.
    assert [c.name for c in bad_children] == ["key check"]
    assert (bad_children[0].attributes or {})["error.type"] == "Unauthorized"

    said = _said(spans)
    for secret in (KNOWN, "NOBODY", keys["teller"], keys["teller"][:12], "x" * 43):
        assert secret not in said


def test_a_degraded_decision_is_traced(
    database_url: str, trained: api.Trained, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    keys = api.prepare(database_url, trained, tmp_path, bundle=False)  # no model
    with TestClient(create_app(_settings(database_url, tmp_path))) as client:
        answered = _decide(client, keys["teller"])
    assert answered.status_code == 200 and answered.json()["degraded"] is True
    ((root, children),) = _trees(exporter.get_finished_spans())
    assert {c.name for c in children} == STAGES
    attributes = dict(root.attributes or {})
    assert attributes["nbo.decision.result"] == "degraded"
    assert attributes["nbo.decision.id"] == answered.json()["decision_id"]
    assert "nbo.decision.model_version" not in attributes  # there is none


class Broken(SpanProcessor):
    """A span processor that fails at every span's start and end."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("tracing broke")

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("tracing broke")


def test_tracing_that_fails_breaks_no_decision(
    database_url: str,
    trained: api.Trained,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = api.prepare(database_url, trained, tmp_path)
    provider = TracerProvider()
    provider.add_span_processor(Broken())
    tracing.configure(provider)
    monkeypatch.setattr(tracing, "_failed", False)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="nbo.tracing"),
            TestClient(create_app(_settings(database_url, tmp_path))) as client,
        ):
            answers = [_decide(client, keys["teller"]) for _ in range(3)]
    finally:
        tracing.configure(None)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.json()["offers"] for a in answers)
    # Logged once, not once a decision.
    failures = [r for r in caplog.records if r.message.startswith("tracing failed")]
    assert len(failures) == 1


def test_tracing_off_traces_nothing_and_loads_no_sdk(
    database_url: str,
    trained: api.Trained,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = api.prepare(database_url, trained, tmp_path)
    begun: list[Any] = []
    monkeypatch.setattr(tracing, "DecisionTrace", lambda tracer: begun.append(tracer))
    with TestClient(create_app(_settings(database_url, tmp_path))) as client:
        assert _decide(client, keys["teller"]).status_code == 200
    assert tracing.tracer is None and begun == []
    # A worker serving decisions untraced loads neither the SDK nor an exporter.
    # (opentelemetry's API is FastAPI's own dependency: FastAPI imports it.)
    probe = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        f"settings = Settings(database_url={database_url!r}, data_dir={str(tmp_path)!r})\n"
        "with TestClient(create_app(settings)) as client:\n"
        f"    answer = client.post('/v1/customers/{KNOWN}/decisions', json={BODY!r},\n"
        f"                         headers={{'Authorization': 'Bearer {keys['teller']}'}})\n"
        "    assert answer.status_code == 200, answer.text\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(\n"
        "    ('opentelemetry.sdk', 'opentelemetry.exporter'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_an_otlp_endpoint_starts_the_exporter_without_a_collector(
    database_url: str, trained: api.Trained, tmp_path: Path
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    keys = api.prepare(database_url, trained, tmp_path)
    endpoint = f"http://127.0.0.1:{_free_port()}/v1/traces"  # nothing listens there
    settings = _settings(database_url, tmp_path, otlp_endpoint=endpoint)
    with TestClient(create_app(settings)) as client:
        provider = tracing._provider
        assert tracing.tracer is not None and provider is not None
        processors = provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [BatchSpanProcessor]
        exporter = processors[0]._batch_processor._exporter
        assert isinstance(exporter, OTLPSpanExporter) and exporter._endpoint == endpoint
        assert provider.resource.attributes["service.name"] == "nbo"
        answers = [_decide(client, keys["teller"]) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        stopping = time.monotonic()
    # The lifespan flushed (to no one) and stopped tracing, promptly.
    assert tracing.tracer is None and tracing._provider is None
    assert time.monotonic() - stopping < 15
