"""Operations metrics of a running app (issue 16): the served model and its age, snapshot
loads, the audit spool's backlog and dead letters, the worker's memory, files and
database connections, the build, and adoption by arm (treated, control).

Multiprocess mode (several workers) is tested in ``test_metrics.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from models.artifacts import save_bundle
from models.data import BankData
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service import child, metrics
from service.app import FIGURES_LOCK, _publish_figures, create_app
from service.data.db import unit_of_work
from service.reports import measures as reports
from service.settings import Settings
from tests.bank import AS_OF, load_trained_bank, register_bundle

AS_OF_SECONDS = dt.datetime.combine(AS_OF, dt.time(0), tzinfo=dt.UTC).timestamp()
KEYS = {"teller": ["decisions", "outcomes"], "admin": ["admin"]}
PER_WORKER = (
    "nbo_worker_resident_memory_bytes",
    "nbo_worker_open_fds",
    "nbo_worker_db_connections",
    "nbo_worker_contact_history_customers",
    "nbo_worker_overlay_customers",
)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small bank and a model trained on it: (bank folder, bundle folder)."""
    root = tmp_path_factory.mktemp("ops-metrics")
    write_bank(generate_bank(300, seed=7), root / "bank")
    data = BankData.from_folder(root / "bank")
    # Few rounds and cutoffs, one thread: a model to serve, trained in a second.
    config = TrainConfig(max_rounds=8, n_cutoffs=3, num_threads=1)
    model = train(data, as_of=AS_OF, config=config)
    save_bundle(model, root / "bundle", metrics={"map@3": 0.3})
    return root / "bank", root / "bundle"


@dataclass
class Running:
    client: TestClient
    url: str
    keys: dict[str, str]
    data_dir: Path

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def decide(self, customer: str) -> dict[str, Any]:
        response = self.client.post(
            f"/v1/customers/{customer}/decisions",
            json={"channel": "branch"},
            headers=self.auth("teller"),
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        response = self.client.get("/metrics")
        assert response.status_code == 200
        return [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        ]

    def values(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, value) for found, labels, value in self.samples() if found == name]


@contextlib.contextmanager
def running_app(
    url: str, bank: tuple[Path, Path], data_dir: Path, **overrides: Any
) -> Iterator[Running]:
    keys = load_trained_bank(url, *bank, data_dir, keys=KEYS)
    settings = Settings(
        database_url=url,
        data_dir=data_dir,
        min_propensity=0.0,
        poll_interval_seconds=60.0,
        ops_endpoints="open",
        **{"control_share": 0.0, **overrides},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Running(client, url, keys, data_dir)


def _loads() -> float:
    return REGISTRY.get_sample_value("nbo_snapshot_load_duration_seconds_count") or 0.0


def test_a_loaded_worker_reports_its_model_build_and_resources(
    database_url: str, bank: tuple[Path, Path], tmp_path: Path
) -> None:
    loads = _loads()
    with running_app(database_url, bank, tmp_path, build_commit="0123abc") as app:
        app.decide("C0000001")  # a connection back in the pool
        app.decide("C0000002")
        app.decide("C0000001")
        samples = app.samples()
        scraped = time.time()

    found = {name: (labels, value) for name, labels, value in samples}
    assert [
        (labels, value) for name, labels, value in samples if name == "nbo_model_active_info"
    ] == [({"version": "v1"}, 1.0)]
    assert found["nbo_model_as_of_timestamp_seconds"] == ({}, AS_OF_SECONDS)
    age = found["nbo_model_age_seconds"][1]
    assert scraped - AS_OF_SECONDS - 60 < age <= scraped - AS_OF_SECONDS
    assert found["nbo_build_info"] == (
        {
            "version": importlib.metadata.version("nbo"),
            "commit": "0123abc",
            "python": platform.python_version(),
        },
        1.0,
    )
    assert found["nbo_worker_resident_memory_bytes"][1] > 50e6  # a Python with pandas
    assert 3 <= found["nbo_worker_open_fds"][1] < 10_000
    assert found["nbo_worker_db_connections"][1] >= 1
    # Two customers were offered something: their contact histories are held; none was
    # re-read since the store was built.
    assert found["nbo_worker_contact_history_customers"][1] == 2
    assert found["nbo_worker_overlay_customers"][1] == 0
    for name in PER_WORKER:
        assert found[name][0] == {}, name  # one process: no pid label
    assert found["nbo_audit_spool_backlog_records"] == ({}, 0.0)
    assert found["nbo_audit_dead_letter_records"] == ({}, 0.0)
    # Start-up loaded the snapshot once; its time is in the histogram.
    assert found["nbo_snapshot_load_duration_seconds_count"][1] == loads + 1
    assert found["nbo_snapshot_load_duration_seconds_sum"][1] > 0


def test_activating_a_version_reports_only_the_new_one(
    database_url: str, bank: tuple[Path, Path], tmp_path: Path
) -> None:
    with running_app(database_url, bank, tmp_path) as app:
        engine = create_engine(database_url)
        try:
            with unit_of_work(engine) as session:
                # Registered with a worse metric, so the gate keeps it a candidate.
                register_bundle(session, bank[1], tmp_path, version="v2", map3=0.1)
        finally:
            engine.dispose()
        assert app.values("nbo_model_active_info") == [({"version": "v1"}, 1.0)]
        loads = _loads()

        response = app.client.post("/v1/models/v2/activate", headers=app.auth("admin"))

        assert response.status_code == 200, response.text
        assert app.values("nbo_model_active_info") == [({"version": "v2"}, 1.0)]
        assert app.values("nbo_model_as_of_timestamp_seconds") == [({}, AS_OF_SECONDS)]
        assert _loads() == loads + 1


def _dead_engine(url: str, tmp_path: Path) -> Engine:
    """An engine of the same kind as ``url`` whose database cannot be reached."""
    if make_url(url).get_backend_name() == "sqlite":
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        return create_engine(f"sqlite:///{blocker / 'nbo.sqlite3'}")
    return create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")


@contextlib.contextmanager
def audit_outage(app: Running, tmp_path: Path) -> Iterator[None]:
    """The audit writer cannot reach the database while inside (as in test_outage.py)."""
    audit: Any = app.client.app.state.audit  # type: ignore[attr-defined]
    dead = _dead_engine(app.url, tmp_path)
    if hasattr(audit, "conninfo"):  # PostgreSQL: the writer has its own connections
        real = audit.conninfo
        audit.conninfo = "postgresql://nobody@127.0.0.1:1/none"
        audit.reconnect()
    else:
        real = audit.engine
        audit.engine = dead
    try:
        yield
    finally:
        if hasattr(audit, "conninfo"):
            audit.conninfo = real
            audit.reconnect()
        else:
            audit.engine = real
        dead.dispose()


def test_spool_backlog_and_dead_letters_are_counted(
    database_url: str, bank: tuple[Path, Path], tmp_path: Path
) -> None:
    with running_app(database_url, bank, tmp_path) as app:
        assert app.decide("C0000001")["degraded"] is False
        with audit_outage(app, tmp_path):
            spooled = [app.decide(f"C{i:07d}") for i in range(2, 7)]
            assert all(answer["degraded"] for answer in spooled)
            assert app.values("nbo_audit_spool_backlog_records") == [({}, 5.0)]
            assert app.values("nbo_audit_dead_letter_records") == [({}, 0.0)]
            # A record damaged on disk (another worker's file), read at the next replay.
            (tmp_path / "spool" / "decisions-999999.jsonl").write_bytes(b"not a record\n")
            assert app.values("nbo_audit_spool_backlog_records") == [({}, 6.0)]

        # The database is back: the next commit replays the spool first.
        assert app.decide("C0000007")["degraded"] is False

        assert app.values("nbo_audit_spool_backlog_records") == [({}, 0.0)]
        assert app.values("nbo_audit_dead_letter_records") == [({}, 1.0)]
        stored = app.client.app.state.engine  # type: ignore[attr-defined]
        with stored.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM decisions")).scalar_one() == 7


def _unheld_product(engine: Engine, customer: str) -> str:
    """A product ``customer`` never adopted."""
    with engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT p.code FROM products p WHERE p.id NOT IN (SELECT a.product_id "
                    "FROM adoptions a JOIN customers c ON c.id = a.customer_id "
                    "WHERE c.external_id = :customer) ORDER BY p.code LIMIT 1"
                ),
                {"customer": customer},
            ).scalar_one()
        )


def test_uplift_gauge_gives_adoption_by_arm(
    database_url: str, bank: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_app(database_url, bank, tmp_path, control_share=0.5) as app:
        arms: dict[bool, list[str]] = {True: [], False: []}
        for i in range(1, 25):
            customer = f"C{i:07d}"
            arms[app.decide(customer)["control"]].append(customer)
        treated, control = arms[False], arms[True]
        assert len(treated) >= 4 and len(control) >= 4, arms
        engine = create_engine(database_url)
        try:
            adopters = treated[:3] + control[:1]
            adoptions = [
                {"customer_id": c, "product_code": _unheld_product(engine, c)} for c in adopters
            ]
        finally:
            engine.dispose()
        app.keys["data"] = app.keys["admin"]
        response = app.client.post(
            "/v1/adoptions", json={"adoptions": adoptions}, headers=app.auth("data")
        )
        assert response.status_code == 200, response.text

        asyncio.run(_publish_figures(app.client.app.state.serving))  # type: ignore[attr-defined]

        rates = {
            labels["arm"]: value for labels, value in app.values("nbo_uplift_conversion_ratio")
        }

        # A large bank's figures come from a child process: the same gauges.
        serving = app.client.app.state.serving  # type: ignore[attr-defined]
        monkeypatch.setattr(child, "CHILD_CUSTOMERS", 0)
        metrics.set_uplift_figures({})
        metrics.set_business_figures({}, {})
        assert app.values("nbo_uplift_conversion_ratio") == []
        os.utime(serving.settings.data_dir / FIGURES_LOCK, (0, 0))  # the last turn long ago
        asyncio.run(_publish_figures(serving))
        from_child = {
            labels["arm"]: value for labels, value in app.values("nbo_uplift_conversion_ratio")
        }
        assert from_child == rates
    assert rates == pytest.approx({"treated": 3 / len(treated), "control": 1 / len(control)})
    # Read a few customer ids at a time (memory bounded at any bank size): the same rates.
    engine = create_engine(database_url)
    try:
        today = dt.datetime.now(dt.UTC).date()
        for chunk in (1, 7, 1000):
            assert reports.rolling_uplift(engine, today, chunk_customers=chunk) == pytest.approx(
                rates
            )
        # The ranges split the contacts and their adoptions, each counted once.
        period = reports.Period(today - dt.timedelta(days=6), today)
        with engine.connect() as conn:
            contacts = reports._first_contacts(conn, period)
            adopted = reports._contacted_adoptions(conn, period, 7)
            ranges = [(start, start + 7) for start in range(0, 400, 7)]
            parts = [reports._first_contacts(conn, period, r) for r in ranges]
            adoption_parts = [reports._contacted_adoptions(conn, period, 7, r) for r in ranges]
        assert len(contacts) == 24 and sum(len(part) for part in parts) == 24
        assert sum(len(part) for part in adoption_parts) == len(adopted) > 0
    finally:
        engine.dispose()


def test_one_worker_of_a_machine_computes_the_business_figures(tmp_path: Path) -> None:
    """The figures read a week of contacts and adoptions: of the workers sharing a data
    folder one computes them (the gauges are shared), none while another is at it, and
    none again before half the interval has passed."""
    import fcntl
    from types import SimpleNamespace

    from service.app import FIGURES_LOCK, _figures_turn

    def worker(every: float) -> Any:
        return SimpleNamespace(
            settings=SimpleNamespace(data_dir=tmp_path / "data", figures_interval_seconds=every)
        )

    with _figures_turn(worker(300.0)) as first:
        assert first
        with _figures_turn(worker(300.0)) as meanwhile:
            assert not meanwhile  # the first holds the lock
    with _figures_turn(worker(300.0)) as soon_after:
        assert not soon_after  # computed a moment ago
    lock = tmp_path / "data" / FIGURES_LOCK
    old = time.time() - 200.0
    os.utime(lock, (old, old))
    with _figures_turn(worker(300.0)) as later:
        assert later  # over half the interval since
    with _figures_turn(worker(0.0)) as unscheduled:
        assert unscheduled  # no interval (figures asked for directly): no wait
    with lock.open("a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with _figures_turn(worker(0.0)) as blocked:
            assert not blocked


def test_the_change_poll_goes_on_while_the_figures_are_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The figures take seconds at a large bank (longer on a busy machine): the change
    poll, which carries other workers' decisions to this one's contact policy, must not
    wait for them."""
    from types import SimpleNamespace

    import service.app as app_module

    polls: list[float] = []
    figures_started = asyncio.Event()

    async def stuck_figures(state: object) -> None:
        figures_started.set()
        await asyncio.Event().wait()  # never done

    class State:
        snapshot = object()
        settings = SimpleNamespace(figures_interval_seconds=0.01)

        def poll(self) -> int:
            polls.append(time.monotonic())
            return 0

        def prune_events(self) -> None:
            pass

    async def no_sweep(state: object) -> None:
        pass

    monkeypatch.setattr(app_module, "_publish_figures", stuck_figures)
    monkeypatch.setattr(app_module, "_sweep_history", no_sweep)

    async def scenario() -> None:
        state = State()
        figures = asyncio.create_task(app_module._figures_forever(state, 0.01))  # type: ignore[arg-type]
        poller = asyncio.create_task(app_module._poll_forever(state, 0.01))  # type: ignore[arg-type]
        await asyncio.wait_for(figures_started.wait(), 5)
        seen = len(polls)
        await asyncio.sleep(0.2)
        for task in (figures, poller):
            task.cancel()
        assert len(polls) >= seen + 5, polls

    asyncio.run(scenario())
