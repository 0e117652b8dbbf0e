"""Prometheus metrics: route-template labels, error counting, /metrics, multiprocess mode."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.errors import NotFound, install_error_handlers

REPO = Path(__file__).resolve().parents[2]
DECISIONS_ROUTE = "/v1/customers/{customer_id}/decisions"
CUSTOMER_ID = "C-8675309"
MISSING_CUSTOMER_ID = "C-0000404"


def _build_app() -> FastAPI:
    """A small app shaped like nbo's: resource routers under /v1, errors as problems.

    The nesting matters: a route of an included router knows only its own
    path ("/{customer_id}/decisions"), not the prefixes it is served under.
    """
    customers = APIRouter(prefix="/customers")

    @customers.get("/{customer_id}/decisions")
    def decide(customer_id: str) -> dict[str, str]:
        if customer_id == MISSING_CUSTOMER_ID:
            raise NotFound(f"customer {customer_id} not found")
        return {"customer_id": customer_id}

    api = APIRouter(prefix="/v1")
    api.include_router(customers)

    @api.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(metrics.router)
    app.add_middleware(metrics.MetricsMiddleware)
    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    # A 500 must reach the middleware as an exception and the client as a response.
    with TestClient(_build_app(), raise_server_exceptions=False) as client:
        yield client


def _requests(method: str, route: str, status: int) -> float:
    """Requests counted so far for one label set (the registry is process-wide)."""
    labels = {"method": method, "route": route, "status": str(status)}
    value = REGISTRY.get_sample_value("nbo_http_request_duration_seconds_count", labels)
    return value or 0.0


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_request_is_labelled_by_route_template_not_path(client: TestClient) -> None:
    before = _requests("GET", DECISIONS_ROUTE, 200)

    for _ in range(2):
        assert client.get(f"/v1/customers/{CUSTOMER_ID}/decisions").status_code == 200

    assert _requests("GET", DECISIONS_ROUTE, 200) == before + 2
    assert _requests("GET", f"/v1/customers/{CUSTOMER_ID}/decisions", 200) == 0


def test_not_found_from_a_handler_keeps_its_route(client: TestClient) -> None:
    before = _requests("GET", DECISIONS_ROUTE, 404)

    response = client.get(f"/v1/customers/{MISSING_CUSTOMER_ID}/decisions")

    assert response.status_code == 404
    assert _requests("GET", DECISIONS_ROUTE, 404) == before + 1


def test_unknown_path_is_unmatched(client: TestClient) -> None:
    before = _requests("GET", metrics.UNMATCHED_ROUTE, 404)

    response = client.get(f"/v1/nowhere/{CUSTOMER_ID}")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert _requests("GET", metrics.UNMATCHED_ROUTE, 404) == before + 1


def test_exception_is_counted_as_500(client: TestClient) -> None:
    before = _requests("GET", "/v1/boom", 500)

    response = client.get("/v1/boom")

    assert response.status_code == 500
    assert response.json()["title"] == "Internal Server Error"
    assert _requests("GET", "/v1/boom", 500) == before + 1


def test_wrong_method_keeps_the_route(client: TestClient) -> None:
    before = _requests("POST", DECISIONS_ROUTE, 405)

    assert client.post(f"/v1/customers/{CUSTOMER_ID}/decisions").status_code == 405

    assert _requests("POST", DECISIONS_ROUTE, 405) == before + 1


def test_non_standard_method_is_other(client: TestClient) -> None:
    before = _requests("other", DECISIONS_ROUTE, 405)

    client.request("BREW", f"/v1/customers/{CUSTOMER_ID}/decisions")

    assert _requests("other", DECISIONS_ROUTE, 405) == before + 1


def test_decisions_show_in_metrics_output(client: TestClient) -> None:
    metrics.DECISIONS.labels("test-channel", "cold_start").inc(3)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {
        (labels["channel"], labels["result"]): value
        for name, labels, value in _samples(response.text)
        if name == "nbo_decisions_total"
    }
    assert found[("test-channel", "cold_start")] >= 3


def test_no_label_holds_a_customer_id(client: TestClient) -> None:
    client.get(f"/v1/customers/{CUSTOMER_ID}/decisions")
    client.get(f"/v1/customers/{MISSING_CUSTOMER_ID}/decisions")
    client.post(f"/v1/customers/{CUSTOMER_ID}/decisions")

    text = client.get("/metrics").text

    assert CUSTOMER_ID not in text and MISSING_CUSTOMER_ID not in text
    routes = {
        labels["route"]
        for name, labels, _ in _samples(text)
        if name.startswith("nbo_http_request_duration_seconds")
    }
    assert DECISIONS_ROUTE in routes


def test_metrics_endpoint_is_documented() -> None:
    operation = _build_app().openapi()["paths"]["/metrics"]["get"]

    assert operation["operationId"] == "getMetrics"
    assert operation["tags"] == ["operations"]
    assert operation["summary"] and operation["description"]
    assert "text/plain" in next(iter(operation["responses"]["200"]["content"]))


def test_set_active_model_reports_one_version() -> None:
    try:
        metrics.set_active_model("v-old", dt.date(2025, 6, 1))
        metrics.set_active_model("v-new", dt.date(2026, 1, 1))

        assert REGISTRY.get_sample_value("nbo_model_active_info", {"version": "v-new"}) == 1
        assert REGISTRY.get_sample_value("nbo_model_active_info", {"version": "v-old"}) is None
        assert REGISTRY.get_sample_value("nbo_model_as_of_timestamp_seconds") == 1767225600

        metrics.set_active_model("v-new")  # a caller that knows only the version

        assert REGISTRY.get_sample_value("nbo_model_as_of_timestamp_seconds") == 1767225600

        metrics.set_active_model(None)

        assert REGISTRY.get_sample_value("nbo_model_active_info", {"version": "v-new"}) is None
        assert REGISTRY.get_sample_value("nbo_model_as_of_timestamp_seconds") is None
        assert REGISTRY.get_sample_value("nbo_model_age_seconds") is None
    finally:
        metrics.set_active_model(None)


def test_prepare_multiprocess_empties_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_DIR_ENV, raising=False)  # restored afterwards
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "worker-123.json").write_text('{"pid": 123}')
    (directory / "README").write_text("not ours")

    metrics.prepare_multiprocess(directory)

    assert os.environ[metrics.MULTIPROC_DIR_ENV] == str(directory.resolve())
    assert sorted(p.name for p in directory.iterdir()) == ["README"]
    # This process imported prometheus_client before: it stays single-process.
    assert not metrics.is_multiprocess()


# A worker: counts decisions, serves the versions given in turn, holds one pooled
# database connection, prints its pid, and lives until its stdin is closed.
_WORKER = """
import datetime as dt, os, sys
from sqlalchemy import create_engine
from service import metrics
from service.settings import Settings
assert metrics.is_multiprocess()
engine = create_engine("sqlite:///" + sys.argv[1] + f"/worker-{os.getpid()}.sqlite3")
held = int(sys.argv[2])
metrics.watch_worker(Settings(data_dir=sys.argv[1]), engine, held=lambda: (held * 100, held))
metrics.DECISIONS.labels("web", "normal").inc(int(sys.argv[2]))
for version in sys.argv[3].split(","):
    metrics.set_active_model(version, dt.date(2026, 1, 1))
with engine.connect():
    pass
metrics.refresh_worker()
print(os.getpid(), flush=True)
sys.stdin.read()
"""

# The scraped worker: marks the pids given dead, then renders every worker's metrics.
_SCRAPE = """
import os, sys
from service import metrics
from service.settings import Settings
metrics.watch_worker(Settings(data_dir=sys.argv[1]))
for pid in sys.argv[2:]:
    metrics.mark_worker_dead(int(pid))
print(os.getpid())
sys.stdout.write(metrics.render_metrics()[0].decode())
metrics.mark_worker_dead()
"""


def _python(code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _scrape(data_dir: Path, *dead: str) -> tuple[str, list[tuple[str, dict[str, str], float]]]:
    """(the scraping process's pid, the samples it rendered)."""
    pid, _, text = _python(_SCRAPE, str(data_dir), *dead).partition("\n")
    return pid, _samples(text)


def _by_pid(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[str, float]:
    return {labels["pid"]: value for found, labels, value in samples if found == name}


@contextlib.contextmanager
def _worker(data_dir: Path, decisions: int, versions: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(data_dir), str(decisions), versions],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


def test_multiprocess_sums_the_workers_and_reports_each_live_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics.MULTIPROC_DIR_ENV, raising=False)
    folder = tmp_path / "prometheus"
    metrics.prepare_multiprocess(folder)  # as `nbo serve` does; children inherit
    with _worker(tmp_path, 2, "v1") as one, _worker(tmp_path, 3, "v1,v2") as two:
        assert one.stdout is not None and two.stdout is not None
        first, second = one.stdout.readline().strip(), two.stdout.readline().strip()

        scraper, samples = _scrape(tmp_path)

        decisions = [
            value
            for name, labels, value in samples
            if name == "nbo_decisions_total" and labels == {"channel": "web", "result": "normal"}
        ]
        assert decisions == [5.0]
        active = {
            (labels["pid"], labels["version"]): value
            for name, labels, value in samples
            if name == "nbo_model_active_info"
        }
        # The version each serves, at 1; none of the versions served before.
        assert active == {(first, "v1"): 1.0, (second, "v2"): 1.0}
        as_of = _by_pid(samples, "nbo_model_as_of_timestamp_seconds")
        assert as_of == {first: 1767225600.0, second: 1767225600.0}
        for name in ("nbo_worker_resident_memory_bytes", "nbo_worker_open_fds"):
            found = _by_pid(samples, name)
            assert set(found) == {first, second, scraper}, name  # the scraper is a worker too
            assert all(value > 0 for value in found.values()), name
        assert min(_by_pid(samples, "nbo_worker_resident_memory_bytes").values()) > 10e6
        assert _by_pid(samples, "nbo_worker_db_connections") == {first: 1.0, second: 1.0}
        # What each holds in memory, from its state file (the scraper watches none).
        assert _by_pid(samples, "nbo_worker_contact_history_customers") == {
            first: 200.0,
            second: 300.0,
        }
        assert _by_pid(samples, "nbo_worker_overlay_customers") == {first: 2.0, second: 3.0}
        assert [v for n, _, v in samples if n == "nbo_build_info"] == [1.0]

        # The first is marked dead (as its lifespan's exit does) though its process lives.
        _, marked = _scrape(tmp_path, first)

        assert _workers(marked) == {second}
        assert _by_pid(marked, "nbo_model_active_info") == {second: 1.0}

        # The second is gone without a word (a crash): its file stays, but not for long.
        assert two.stdin is not None
        two.stdin.close()
        two.wait(timeout=30)
        _, after = _scrape(tmp_path)

    assert _workers(after) == set()
    assert not list(folder.glob("worker-*.json"))
    assert [
        value
        for name, labels, value in after
        if name == "nbo_decisions_total" and labels["channel"] == "web"
    ] == [5.0]


def _workers(samples: list[tuple[str, dict[str, str], float]]) -> set[str]:
    """The pids of the nbo workers (models served, databases connected) in ``samples``."""
    return {
        labels["pid"]
        for name, labels, _ in samples
        if name in ("nbo_model_active_info", "nbo_worker_db_connections")
    }


def test_tally_hands_prometheus_the_same_buckets_as_observing_directly() -> None:
    registry = CollectorRegistry()
    direct = Histogram(
        "t_direct_seconds", "t", ["k"], buckets=(0.001, 0.01, 0.1), registry=registry
    )
    deferred = Histogram(
        "t_tally_seconds", "t", ["k"], buckets=(0.001, 0.01, 0.1), registry=registry
    )
    counter = Counter("t_things", "t", ["k"], registry=registry)
    values = [0.0005, 0.001, 0.0010001, 0.01, 0.05, 0.1, 0.2, 3.0]
    tally = metrics.tally(deferred, "a")
    for value in values:
        direct.labels("a").observe(value)
        tally.observe(value)
        metrics.tally(counter, "a").inc()
    assert registry.get_sample_value("t_tally_seconds_count", {"k": "a"}) == 0.0
    metrics.flush_tallies()
    metrics.flush_tallies()  # nothing pending: nothing added twice
    for le in ("0.001", "0.01", "0.1", "+Inf"):
        assert registry.get_sample_value(
            "t_tally_seconds_bucket", {"k": "a", "le": le}
        ) == registry.get_sample_value("t_direct_seconds_bucket", {"k": "a", "le": le}), le
    assert registry.get_sample_value("t_tally_seconds_sum", {"k": "a"}) == pytest.approx(
        sum(values)
    )
    assert registry.get_sample_value("t_things_total", {"k": "a"}) == len(values)
