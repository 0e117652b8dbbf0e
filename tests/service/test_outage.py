"""Database outages: verified keys keep working, decisions answer degraded, every other
route answers 503 with Retry-After (never 500), nothing waits on the event loop, and
connections, statements and lock waits are bounded (issue 13, finding 4)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from models.artifacts import save_bundle
from models.data import BankData
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service import auth, metrics
from service.app import create_app
from service.auth import KeyStore, Unauthorized
from service.data import db
from service.data.db import make_engine, unit_of_work
from service.errors import Unavailable, is_outage
from service.settings import Settings
from tests.bank import load_trained_bank
from tests.conftest import POSTGRES_URL
from tests.uvicorn_thread import uvicorn_thread

AS_OF = dt.date(2026, 1, 1)
CUSTOMER = "C0000042"


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small bank and a model trained on it: (bank folder, bundle folder)."""
    root = tmp_path_factory.mktemp("outage")
    write_bank(generate_bank(400, seed=3), root / "bank")
    data = BankData.from_folder(root / "bank")
    model = train(data, as_of=AS_OF, config=TrainConfig(max_rounds=10))
    save_bundle(model, root / "bundle", metrics={"map@3": 0.3})
    return root / "bank", root / "bundle"


@dataclass
class Running:
    client: TestClient
    url: str
    keys: dict[str, str]

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def decide(self, customer: str = CUSTOMER) -> httpx.Response:
        return self.client.post(
            f"/v1/customers/{customer}/decisions",
            json={"channel": "branch"},
            headers=self.auth("teller"),
        )


def _prepare(url: str, bank: tuple[Path, Path], data_dir: Path) -> dict[str, str]:
    folder, bundle = bank
    keys = {"teller": ["decisions", "outcomes"], "admin": ["admin"]}
    return load_trained_bank(url, folder, bundle, data_dir, keys=keys)


@pytest.fixture
def running(database_url: str, bank: tuple[Path, Path], tmp_path: Path) -> Iterator[Running]:
    keys = _prepare(database_url, bank, tmp_path)
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        control_share=0.0,
        min_propensity=0.0,
        poll_interval_seconds=60.0,
        # Simulated time: a key expires after 0.1 s instead of 30 s.
        api_key_ttl_seconds=0.1,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Running(client, database_url, keys)


def _unreachable_like(url: str, tmp_path: Path) -> Engine:
    """An engine of the same kind as ``url`` whose database cannot be reached."""
    if make_url(url).get_backend_name() == "sqlite":
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        return create_engine(f"sqlite:///{blocker / 'nbo.sqlite3'}")
    return create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")


@contextlib.contextmanager
def outage(service: Running, tmp_path: Path) -> Iterator[None]:
    """Every path of the app to the database leads nowhere while inside."""
    state: Any = service.client.app.state  # type: ignore[attr-defined]
    dead = _unreachable_like(service.url, tmp_path)
    real = state.engine
    audit = state.audit
    pg_audit = hasattr(audit, "conninfo")  # PostgreSQL: the writer has its own connection
    real_audit = audit.conninfo if pg_audit else audit.engine
    state.engine = state.keys._engine = state.serving.engine = dead
    if pg_audit:
        audit.conninfo = "postgresql://nobody@127.0.0.1:1/none"
        audit.reconnect()
    else:
        audit.engine = dead
    try:
        yield
    finally:
        state.engine = state.keys._engine = state.serving.engine = real
        if pg_audit:
            audit.conninfo = real_audit
        else:
            audit.engine = real_audit
        dead.dispose()


def _stale_count() -> float:
    return metrics.AUTH_STALE_KEYS._value.get()  # type: ignore[attr-defined,no-any-return]


def _assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["status"] == 503


# --------------------------------------------------------------------------- key store


def _verified_key(engine: Engine) -> tuple[str, KeyStore, list[float]]:
    """A teller key, a store with a TTL of 1 s that has verified it, and the store's
    clock (its one value, settable)."""
    with unit_of_work(engine) as session:
        good = auth.create_key(session, name="teller", scopes=["decisions"])
    now = [0.0]
    store = KeyStore(engine, ttl_seconds=1, clock=lambda: now[0])
    store.authenticate(None, good, "decisions")
    return good, store, now


def _busy_default_executor() -> threading.Event:
    """The running loop's default executor made one thread, kept busy until the event
    is set: what ``asyncio.to_thread`` submits meanwhile waits in its queue, as under
    load it waits for the loop to give up the interpreter."""
    busy = threading.Event()
    executor = ThreadPoolExecutor(max_workers=1)
    asyncio.get_running_loop().set_default_executor(executor)
    executor.submit(busy.wait, 5)
    return busy


def test_a_verified_key_outlives_its_ttl_through_an_outage(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """Before: after the TTL the key check needed the database and raised (500)."""
    with unit_of_work(engine) as session:
        good = auth.create_key(session, name="teller", scopes=["decisions"])
        gone = auth.create_key(session, name="old", scopes=["decisions"])
        auth.revoke_key(session, prefix=gone.split("_")[1])
        later = auth.create_key(session, name="never-seen", scopes=["decisions"])
    now = [0.0]
    store = KeyStore(engine, ttl_seconds=30, clock=lambda: now[0])
    assert store.authenticate(None, good, "decisions").name == "teller"
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(None, gone, "decisions")
    store._engine = _unreachable_like(database_url, tmp_path)
    before = _stale_count()
    for minutes in (1, 5, 45):
        now[0] = minutes * 60.0
        assert store.authenticate(None, good, "decisions").name == "teller"
        # A revocation read before the outage still holds through it.
        with pytest.raises(Unauthorized, match="revoked"):
            store.authenticate(None, gone, "decisions")
    assert _stale_count() >= before + 3
    # A key never verified cannot be vouched for: 503, not 401 and not 500.
    with pytest.raises(Unavailable) as caught:
        store.authenticate(None, later, "decisions")
    assert caught.value.status == 503 and caught.value.headers["Retry-After"]
    # The database back: keys are read again.
    store._engine = engine
    now[0] += 60
    assert store.authenticate(None, later, "decisions").name == "never-seen"


def test_a_wrong_secret_stays_401_through_an_outage(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    good, store, now = _verified_key(engine)
    store._engine = _unreachable_like(database_url, tmp_path)
    now[0] = 10.0
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthorized, match="invalid API key"):
        store.authenticate(None, forged, "decisions")


def test_an_error_that_is_not_an_outage_is_not_hidden(engine: Engine) -> None:
    """Only connection trouble falls back to memory; anything else still raises."""
    good, store, now = _verified_key(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_gone"))
    now[0] = 10.0
    with pytest.raises(sa_exc.DBAPIError) as caught:
        store.authenticate(None, good, "decisions")
    assert not is_outage(caught.value)


def test_concurrent_requests_for_an_expired_key_read_it_once(engine: Engine) -> None:
    """While one request re-reads an expired key, the others use its last entry rather
    than each waiting on the database (a slow database must not pile them up)."""
    good, store, now = _verified_key(engine)
    now[0] = 5.0
    prefix = good.split("_")[1]
    store._refreshing.add(prefix)  # as if another request were reading it right now
    assert store._cached(prefix) is not None
    store._refreshing.discard(prefix)
    assert store._cached(prefix) is None


def test_requests_on_the_event_loop_for_an_expired_key_read_it_once(engine: Engine) -> None:
    """Every request the loop takes up while the first one's read waits for its thread
    uses the key's last entry: one read a TTL, not one per request in flight."""
    good, store, now = _verified_key(engine)
    reads: list[str] = []
    load = store._load

    def counted_load(prefix: str, at: float) -> Any:
        reads.append(prefix)
        return load(prefix, at)

    store._load = counted_load  # type: ignore[assignment,method-assign]
    now[0] = 5.0

    async def in_flight() -> list[str]:
        # As under load: the loop takes up every request before a thread begins a read.
        busy = _busy_default_executor()
        calls = [store.authenticate_async(None, good, "decisions") for _ in range(32)]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0.1)
        busy.set()
        return [principal.name for principal in await asyncio.gather(*tasks)]

    assert asyncio.run(in_flight()) == ["teller"] * 32
    assert len(reads) == 1
    prefix = good.split("_")[1]
    assert prefix not in store._refreshing and store._cached(prefix) is not None


def test_a_read_cancelled_before_its_thread_began_leaves_no_claim(engine: Engine) -> None:
    """Else the key's last entry would be served for ever, a revocation never seen."""
    good, store, now = _verified_key(engine)
    now[0] = 5.0
    prefix = good.split("_")[1]

    read = store._refresh
    reads: list[str] = []
    store._refresh = lambda p: reads.append(p) or read(p)  # type: ignore[assignment,func-returns-value,method-assign]

    async def cancelled() -> None:
        busy = _busy_default_executor()  # the read waits in the executor's queue
        task = asyncio.ensure_future(store.authenticate_async(None, good, "decisions"))
        await asyncio.sleep(0.05)
        assert prefix in store._refreshing  # claimed, its thread not begun
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        busy.set()

    asyncio.run(cancelled())
    assert reads == [] and prefix not in store._refreshing
    assert store._cached(prefix) is None  # the next request reads it


# --------------------------------------------------------------------------- the app


def test_decisions_answer_degraded_and_other_routes_503_through_a_long_outage(
    running: Running, tmp_path: Path
) -> None:
    """Before: once the key TTL had passed, every request answered 500."""
    assert running.decide().json()["degraded"] is False
    with outage(running, tmp_path):
        time.sleep(0.3)  # three key TTLs of simulated time
        for _ in range(3):
            answer = running.decide()
            assert answer.status_code == 200, answer.text
            assert answer.json()["degraded"] is True
            time.sleep(0.15)
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("GET", "/v1/products", None),
            ("PUT", f"/v1/customers/{CUSTOMER}", {"attributes": {"income": 1}}),
            ("POST", "/v1/offers/nope/outcome", {"outcome": "accepted"}),
        ]:
            _assert_503(
                running.client.request(method, path, json=body, headers=running.auth("admin"))
            )
        _assert_503(running.client.get("/health/ready"))
        assert running.client.get("/health/live").status_code == 200
    # Back: a decision is normal again and the outage's decisions reach the database.
    after = running.decide()
    assert after.status_code == 200 and after.json()["degraded"] is False


def test_a_key_first_seen_during_an_outage_is_503_not_500(running: Running, tmp_path: Path) -> None:
    with unit_of_work(make_engine(running.url)) as session:
        fresh = auth.create_key(session, name="new", scopes=["decisions", "models"])
    with outage(running, tmp_path):
        decision = running.client.post(
            f"/v1/customers/{CUSTOMER}/decisions",
            json={"channel": "branch"},
            headers={"X-API-Key": fresh},
        )
        _assert_503(decision)
        _assert_503(running.client.get("/v1/models", headers={"X-API-Key": fresh}))


# --------------------------------------------------------------------------- PostgreSQL


def _admin() -> Engine:
    return create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


@pytest.mark.postgres
def test_a_real_postgres_outage(database_url: str, bank: tuple[Path, Path], tmp_path: Path) -> None:
    """The server refuses connections and every backend is terminated, for longer than a
    key's TTL: decisions go on (degraded, spooled), other routes answer 503, and after it
    every decision answered is in the database."""
    url = database_url
    if make_url(url).get_backend_name() != "postgresql":
        pytest.skip("a server outage; SQLite's are covered by the tests above")
    keys = _prepare(url, bank, tmp_path)
    name = make_url(url).database
    settings = Settings(
        database_url=url,
        data_dir=tmp_path,
        control_share=0.0,
        min_propensity=0.0,
        poll_interval_seconds=0.2,
        api_key_ttl_seconds=0.2,
    )
    service = Running(TestClient(create_app(settings), raise_server_exceptions=False), url, keys)
    admin = _admin()
    reader = create_engine(url)
    answered: list[str] = []
    with service.client:
        assert service.decide().status_code == 200
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                answer = service.decide(f"C{len(answered) % 50 + 1:07d}")
                assert answer.status_code == 200, answer.text
                assert answer.json()["degraded"] is True
                answered.append(answer.json()["decision_id"])
                time.sleep(0.05)
            _assert_503(service.client.get("/v1/models", headers=service.auth("admin")))
            _assert_503(service.client.get("/health/ready"))
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        assert service.client.get("/v1/models", headers=service.auth("admin")).status_code == 200
        # The next commit replays the spool.
        deadline = time.monotonic() + 20
        missing = set(answered)
        while missing and time.monotonic() < deadline:
            service.decide()
            with reader.connect() as conn:
                missing -= {r[0] for r in conn.execute(text("SELECT id FROM decisions"))}
            time.sleep(0.2)
        assert not missing, f"{len(missing)} of {len(answered)} decisions lost"
    admin.dispose()
    reader.dispose()


@pytest.mark.postgres
def test_a_locked_key_table_does_not_stall_the_event_loop(
    database_url: str, bank: tuple[Path, Path], tmp_path: Path
) -> None:
    """Before: the decision lane read an unknown key on the event loop; with api_keys
    locked for 5 s, /health/live took 4.2 s. Now the read waits in a thread, and gives
    up after the lock timeout with a 503."""
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("SQLite readers never wait for a writer in WAL mode")
    keys = _prepare(database_url, bank, tmp_path)
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        poll_interval_seconds=60.0,
        db_lock_timeout_seconds=2.0,
    )
    locker = create_engine(database_url)
    with uvicorn_thread(create_app(settings), lifespan="on") as (host, port):
        base = f"http://{host}:{port}"
        with locker.connect() as conn:
            trans = conn.begin()
            conn.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            result: dict[str, Any] = {}

            def decide() -> None:
                started = time.monotonic()
                result["response"] = httpx.post(
                    f"{base}/v1/customers/{CUSTOMER}/decisions",
                    json={"channel": "branch"},
                    headers={"Authorization": f"Bearer {keys['teller']}"},
                    timeout=30,
                )
                result["seconds"] = time.monotonic() - started

            waiting = threading.Thread(target=decide)
            waiting.start()
            time.sleep(0.3)  # the key lookup is now waiting for the lock
            started = time.monotonic()
            live = httpx.get(f"{base}/health/live", timeout=10)
            live_seconds = time.monotonic() - started
            waiting.join(timeout=20)
            trans.rollback()
    locker.dispose()
    assert live.status_code == 200 and live_seconds < 0.5, live_seconds
    response = result["response"]
    _assert_503(response)  # the lock timeout, not a 500 and not a wait for ever
    assert result["seconds"] < 4.0


@pytest.mark.postgres
def test_serving_engine_bounds_statements_and_the_cli_engine_does_not(
    database_url: str, tmp_path: Path
) -> None:
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("statement and lock timeouts are PostgreSQL settings")
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        db_statement_timeout_seconds=1.5,
        db_lock_timeout_seconds=0.5,
    )
    serving = db.engine_from_settings(settings, serving=True)
    cli = db.engine_from_settings(settings)
    try:
        with serving.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "500ms"
            with pytest.raises(sa_exc.OperationalError) as caught:
                conn.execute(text("SELECT pg_sleep(3)"))
            assert is_outage(caught.value)  # a cancelled statement answers 503
        with cli.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
            conn.execute(text("SELECT pg_sleep(1.6)"))
        assert serving.pool.timeout() == settings.db_pool_timeout_seconds  # type: ignore[attr-defined]
    finally:
        serving.dispose()
        cli.dispose()


@pytest.mark.postgres
def test_connecting_to_a_server_that_never_answers_gives_up() -> None:
    """Before: no connect timeout, a server that accepts but never answers held the
    connection attempt (and its request) indefinitely."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever speaks
        port = silent.getsockname()[1]
        settings = Settings(
            database_url=f"postgresql+psycopg://nobody@127.0.0.1:{port}/none",
            db_connect_timeout_seconds=2,
        )
        engine = db.engine_from_settings(settings)
        outcome: dict[str, Any] = {}

        def connect() -> None:
            started = time.monotonic()
            try:
                engine.connect().close()
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(timeout=15)
        engine.dispose()
    assert "seconds" in outcome, "the connection attempt did not give up"
    assert outcome["seconds"] < 10
    assert is_outage(outcome["error"])


# --------------------------------------------------------------------------- classifying


def test_outage_classification() -> None:
    class PgError(Exception):
        def __init__(self, sqlstate: str | None) -> None:
            self.sqlstate = sqlstate

    def operational(orig: BaseException) -> sa_exc.OperationalError:
        return sa_exc.OperationalError("SELECT 1", {}, orig)

    import sqlite3

    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5  # type: ignore[attr-defined]
    no_table = sqlite3.OperationalError("no such table: x")
    no_table.sqlite_errorcode = 1  # type: ignore[attr-defined]
    assert is_outage(operational(PgError(None)))  # refused, timed out: no server answer
    assert is_outage(operational(PgError("57014")))  # statement timeout
    assert is_outage(operational(PgError("55P03")))  # lock timeout
    assert is_outage(operational(PgError("08006")))  # connection failure
    assert is_outage(operational(locked))
    assert is_outage(sa_exc.TimeoutError("pool"))
    assert not is_outage(operational(no_table))
    assert not is_outage(operational(PgError("54011")))  # too many columns: not a retry
    assert not is_outage(sa_exc.IntegrityError("INSERT", {}, PgError("23505")))
    assert not is_outage(ValueError("x"))
