"""Graceful shutdown of a real ``nbo serve``: on SIGTERM it stops accepting connections,
answers the requests in flight, leaves every decision it answered in the database, and
exits with status 0 within NBO_SHUTDOWN_TIMEOUT_SECONDS, even when a request never
ends (issue 16)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from models.synthetic import generate_bank, write_bank
from service.data.db import make_engine
from tests.bank import load_trained_bank
from tests.conftest import REPO

NBO = REPO / ".venv" / "bin" / "nbo"
MARGIN_SECONDS = 3.0
"""What exiting may take beyond the shutdown timeout (the audit writer's last second,
the interpreter's exit)."""


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shutdown") / "bank"
    write_bank(generate_bank(300, seed=5), folder)
    return folder


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    key: str
    log: Path
    customers: list[str]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Connection": "close"}

    def stop(self) -> float:
        """Send SIGTERM; the monotonic time it was sent."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return sent

    def wait(self, timeout: float) -> tuple[int, float]:
        """Exit status and the monotonic time the process was seen gone."""
        status = self.process.wait(timeout=timeout)
        return status, time.monotonic()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving(
    database_url: str, bank: Path, data_dir: Path, *, timeout: float, workers: int = 1
) -> Iterator[Server]:
    """``nbo serve`` on ``database_url`` with the bank imported (no model: decisions are
    answered from popularity, and recorded all the same), ready; killed if still alive."""
    key = load_trained_bank(database_url, bank, None, data_dir, keys={"teller": ["decisions"]})
    customers = [
        line.split(",", 1)[0] for line in (bank / "customers.csv").read_text().splitlines()[1:]
    ]
    port = _free_port()
    log = data_dir / "serve.log"
    env = {
        **os.environ,
        "NBO_DATABASE_URL": database_url,
        "NBO_DATA_DIR": str(data_dir),
        "NBO_SHUTDOWN_TIMEOUT_SECONDS": str(timeout),
        "NBO_POLL_INTERVAL_SECONDS": "0.5",
        "NBO_CONTROL_SHARE": "0",
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(NBO), "serve", "--port", str(port), "--workers", str(workers)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", port, key["teller"], log, customers)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"nbo serve ended: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"nbo serve not ready: {log.read_text()[-3000:]}"
            # Every worker started (one answering is not enough with two).
            started = log.read_text().count("Application startup complete") >= workers
            with contextlib.suppress(httpx.TransportError):
                if started and httpx.get(f"{server.url}/health/ready", timeout=2).is_success:
                    break
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None = None
    decision_id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Threads asking for decisions, each on a new connection, until refused."""

    server: Server
    threads: int
    outcomes: list[Outcome] = field(default_factory=list)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def join(self, timeout: float) -> None:
        for worker in self._workers:
            worker.join(timeout)
            assert not worker.is_alive(), "a client thread never ended"

    def _run(self, n: int) -> None:
        customers = self.server.customers
        with httpx.Client(timeout=30) as client:
            for i in range(10_000):
                customer = customers[(n * 37 + i) % len(customers)]
                outcome = Outcome(started=time.monotonic(), ended=0.0)
                try:
                    response = client.post(
                        f"{self.server.url}/v1/customers/{customer}/decisions",
                        json={"channel": "branch"},
                        headers=self.server.headers(),
                    )
                    outcome.status = response.status_code
                    if response.status_code == 200:
                        outcome.decision_id = response.json()["decision_id"]
                except httpx.TransportError as exc:
                    outcome.error = type(exc).__name__
                outcome.ended = time.monotonic()
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.error == "ConnectError":
                    return  # refused: the server is gone or going


@contextlib.contextmanager
def audit_commits_held(database_url: str) -> Iterator[Callable[[], None]]:
    """Hold a lock that every audit commit waits for (PostgreSQL: on the decisions
    table; SQLite: the database's write lock) until the yielded function is called."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as holder:
            if engine.dialect.name == "postgresql":
                holder.execute(text("LOCK TABLE decisions IN ACCESS EXCLUSIVE MODE"))
            else:
                holder.execute(text("SELECT 1"))  # nbo's SQLite engine begins IMMEDIATE
            yield holder.rollback
            holder.rollback()
    finally:
        engine.dispose()


def _stored_decisions(database_url: str) -> set[str]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return set(connection.execute(text("SELECT id FROM decisions")).scalars())
    finally:
        engine.dispose()


def _refused(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        try:
            probe.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def test_sigterm_answers_what_is_in_flight_and_keeps_every_answer(
    database_url: str, bank: Path, tmp_path: Path
) -> None:
    _burst_then_sigterm(database_url, bank, tmp_path, workers=1)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_sigterm_to_the_parent_stops_every_worker_so(
    database_url: str, bank: Path, tmp_path: Path
) -> None:
    _burst_then_sigterm(database_url, bank, tmp_path, workers=2)


def _burst_then_sigterm(database_url: str, bank: Path, tmp_path: Path, *, workers: int) -> None:
    """Twelve clients ask for decisions on new connections. The test then holds the
    audit commits back with a lock, so that every client has a decision in flight when
    SIGTERM comes, and lets them go a second after it."""
    timeout = 10.0
    with serving(database_url, bank, tmp_path, timeout=timeout, workers=workers) as server:
        load = Load(server, threads=12)
        load.start()
        time.sleep(1.0)  # well under way
        with audit_commits_held(database_url) as release:
            time.sleep(0.5)
            signalled = server.stop()
            time.sleep(1.0)
            release()
        status, gone = server.wait(timeout=timeout + 30)
        load.join(timeout=30)
        refused_after = _refused(server.port)
        log = server.log.read_text()

    took = gone - signalled
    print(
        f"workers={workers}: exit {status} {took:.2f} s after SIGTERM, {len(load.outcomes)} requests"
    )
    assert status == 0, log[-3000:]
    assert took < timeout + MARGIN_SECONDS, log[-3000:]
    # Each worker ran its shutdown (audit writer closed), none was killed.
    assert log.count("Application shutdown complete") == workers, log[-3000:]
    before = [o for o in load.outcomes if o.started < signalled]
    answered = [o for o in load.outcomes if o.status == 200]
    # Every request sent before SIGTERM was answered (200), none cut off.
    cut = [(round(o.started - signalled, 3), o.error) for o in before if o.status != 200]
    assert not cut, cut
    # Every client had one in flight when SIGTERM came, answered after it.
    in_flight = [o for o in answered if o.started < signalled < o.ended]
    assert len(in_flight) == load.threads, len(in_flight)
    # Answered means recorded: every decision id answered is in the database.
    stored = _stored_decisions(database_url)
    missing = {o.decision_id for o in answered} - stored
    assert not missing, f"{len(missing)} answered decisions are not in the database"
    # uvicorn looks for the signal every 0.1 s (the parent of two workers every 0.5 s,
    # then signals them): a connection opened in between may still be answered, or
    # closed unanswered (its request was never read), but never gets an error status.
    settle = 0.3 if workers == 1 else 1.0
    after = [o for o in load.outcomes if o.started >= signalled]
    assert all(o.status in (200, None) for o in after), [o for o in after if o.status][:5]
    # Later ones find nobody accepting. One worker closes its socket: refused. Several
    # share the parent's socket, which stays open (unserved) until the parent exits:
    # their connections wait in its queue and are reset then (ReadError), or one a
    # worker took in its last moment is closed unread (RemoteProtocolError: closed
    # without an answer, seen once in a CI run on a busy machine).
    late = [o for o in after if o.started >= signalled + settle]
    expected = (
        {"ConnectError"} if workers == 1 else {"ConnectError", "ReadError", "RemoteProtocolError"}
    )
    assert all(o.error in expected for o in late), late[:5]
    closed = [o for o in after if o.error not in (None, "ConnectError")]
    print(f"after SIGTERM: {len(after)} requests, {len(closed)} closed unanswered")
    assert refused_after
    assert not list((tmp_path / "spool").glob("decisions-*.jsonl")) or all(
        p.stat().st_size == 0 for p in (tmp_path / "spool").glob("decisions-*.jsonl")
    ), "the database was up: nothing should be left in the spool"


def test_a_request_that_never_ends_does_not_hold_the_exit(
    database_url: str, bank: Path, tmp_path: Path
) -> None:
    timeout = 2.0
    with serving(database_url, bank, tmp_path, timeout=timeout) as server:
        # A client that sends the head of a decision request and half its body, then
        # nothing: the request is in flight until the server gives up on it.
        held = socket.create_connection(("127.0.0.1", server.port))
        body = b'{"channel": "branch"}'
        held.sendall(
            f"POST /v1/customers/{server.customers[0]}/decisions HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        time.sleep(0.5)
        signalled = server.stop()
        time.sleep(0.5)
        # Still running (waiting for the held request), and no longer accepting.
        assert server.process.poll() is None, server.log.read_text()[-3000:]
        assert _refused(server.port)
        status, gone = server.wait(timeout=timeout + 30)
        held.close()
        log = server.log.read_text()

    took = gone - signalled
    print(f"held request: exit {status} {took:.2f} s after SIGTERM (timeout {timeout} s)")
    assert status == 0, log[-3000:]
    # uvicorn gives up on the request a second before the deadline (kept for the
    # lifespan's audit flush), then the lifespan exits.
    assert timeout - 1.5 < took < timeout + MARGIN_SECONDS, log[-3000:]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_database_that_does_not_answer_does_not_hold_the_exit(
    database_url: str, bank: Path, tmp_path: Path
) -> None:
    timeout = 2.0
    with serving(database_url, bank, tmp_path, timeout=timeout) as server:
        engine = make_engine(database_url)
        try:
            with engine.connect() as blocker:
                # Every audit commit now waits for this lock: the decisions asked below
                # are in flight until the server gives up on them, and so are their
                # commits when the audit writer is told to close.
                blocker.execute(text("LOCK TABLE decisions IN ACCESS EXCLUSIVE MODE"))
                load = Load(server, threads=4)
                load.start()
                time.sleep(1.0)
                signalled = server.stop()
                status, gone = server.wait(timeout=timeout + 30)
                blocker.rollback()
        finally:
            engine.dispose()
        load.join(timeout=30)
        log = server.log.read_text()

    took = gone - signalled
    print(f"database not answering: exit {status} {took:.2f} s after SIGTERM (timeout {timeout} s)")
    assert status == 0, log[-3000:]
    assert "audit commits did not end in time" in log, log[-3000:]
    assert took < timeout + MARGIN_SECONDS, log[-3000:]
    assert not [o for o in load.outcomes if o.status == 200], "nothing could be recorded"


def serve_with_a_slow_store_build() -> None:
    """``nbo serve`` (arguments from ``sys.argv[2:]``) whose serving store is built in a
    child process that only sleeps, its pid written to ``sys.argv[1]``: a start-up that
    lasts as long as a store build of a million customers."""
    import sys

    from service import child
    from service.cli.main import main

    pid_file, arguments = sys.argv[1], sys.argv[2:]
    run = child.run

    def slow(settings: Any, target: str, **named: Any) -> Any:
        if target.endswith(":build_in_child"):
            target, named = "tests.service.test_child:sleep_a_while", {"pid_file": pid_file}
        return run(settings, target, **named)

    child.CHILD_CUSTOMERS = 0  # every build in a child, however small the bank
    child.run = slow
    sys.argv = ["nbo", *arguments]
    main()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigterm_during_start_up_stops_the_store_build_and_exits(
    database_url: str, bank: Path, tmp_path: Path
) -> None:
    load_trained_bank(database_url, bank, None, tmp_path)
    pid_file, log = tmp_path / "builder.pid", tmp_path / "serve.log"
    env = {**os.environ, "NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(tmp_path)}
    script = (
        "from tests.service.test_shutdown import serve_with_a_slow_store_build as serve; serve()"
    )
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(NBO.parent / "python"), "-c", script, str(pid_file), "serve"]
            + ["--port", str(_free_port())],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        from tests.service.test_child import _pid_from, gone

        builder = _pid_from(pid_file, timeout=60)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    text_ = log.read_text()
    print(f"start-up stopped: exit {status} {took:.2f} s after SIGTERM")
    assert status == 0, text_[-3000:]
    assert took < 5.0, text_[-3000:]  # the build slept for a minute
    assert gone(builder, timeout=1), "the store build outlived its worker"
    assert "snapshot load stopped: the worker is stopping" in text_, text_[-3000:]
    assert '"level":"ERROR"' not in text_ and "Traceback" not in text_, text_[-3000:]
