"""Migrations under a lock: processes upgrading one database at once take turns, so the
schema is migrated once and every one of them ends at head; and `nbo serve --no-migrate`
starts on a schema it leaves alone (issue 16)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url

from service.data import db
from tests.conftest import REPO

NBO = REPO / ".venv" / "bin" / "nbo"
UPGRADERS = 4


def _nbo(database_url: str, data_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(data_dir)}
    return subprocess.Popen(
        [str(NBO), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _upgrade(database_url: str) -> subprocess.Popen[str]:
    """A process calling :func:`service.data.db.upgrade`, as `nbo serve` does, printing
    what `nbo db upgrade` prints."""
    code = (
        "import sys\n"
        "from service.data import db\n"
        "db.upgrade(sys.argv[1])\n"
        "engine = db.make_engine(sys.argv[1])\n"
        "print(f'database at revision {db.current_revision(engine)}')\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, database_url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextlib.contextmanager
def _advisory_lock_held(url: str) -> Iterator[Callable[[], int]]:
    """Hold nbo's migration lock on ``url``'s server from this process; yields a count of
    the sessions of that database waiting for an advisory lock."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    key = {"key": db.MIGRATION_LOCK_KEY}
    try:
        with engine.connect() as holder, engine.connect() as observer:
            assert holder.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar()

            def waiting(connection: Connection = observer) -> int:
                return int(
                    connection.execute(
                        text(
                            "SELECT count(*) FROM pg_locks l JOIN pg_database d "
                            "ON d.oid = l.database WHERE l.locktype = 'advisory' "
                            "AND NOT l.granted AND d.datname = current_database()"
                        )
                    ).scalar_one()
                )

            yield waiting
            holder.execute(text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock_held(url: str) -> Iterator[Callable[[], int]]:
    """Hold nbo's migration lock on the SQLite file of ``url``; yields a count of the
    processes blocked on it (from /proc/locks)."""
    path = Path(f"{make_url(url).database}.migration-lock")
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        inode = os.fstat(descriptor).st_ino

        def waiting() -> int:
            lines = Path("/proc/locks").read_text().splitlines()
            return sum(1 for line in lines if "->" in line and f":{inode} " in line)

        yield waiting
    finally:
        os.close(descriptor)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no schema, of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nbo.sqlite3'}"
    url: str = request.getfixturevalue("empty_postgres_url")
    return url


def _wait_for(what: str, condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_upgrades_at_once_take_turns_and_end_at_head(empty_url: str, tmp_path: Path) -> None:
    held = (
        _advisory_lock_held(empty_url)
        if empty_url.startswith("postgresql")
        else _file_lock_held(empty_url)
    )
    with held as waiting:
        # One through the command line, the others as `nbo serve` calls it (lighter).
        upgraders = [_nbo(empty_url, tmp_path, "db", "upgrade")]
        upgraders += [_upgrade(empty_url) for _ in range(UPGRADERS - 1)]
        try:
            # Every one reaches the lock and waits there, having changed nothing.
            started = time.monotonic()

            def all_waiting() -> bool:
                assert all(p.poll() is None for p in upgraders), "an upgrader did not wait"
                return waiting() == UPGRADERS

            _wait_for("every upgrader waits for the lock", all_waiting, seconds=60)
            print(f"all {UPGRADERS} waiting after {time.monotonic() - started:.1f} s")
            engine = db.make_engine(empty_url)
            assert not db.has_schema(engine)
            engine.dispose()
        except BaseException:
            for process in upgraders:
                process.kill()
                process.wait()
            raise
    # Released: all four rush in at once; one migrates, the others find it done.
    released = time.monotonic()
    outputs = [p.communicate(timeout=120)[0] for p in upgraders]
    print(f"all {UPGRADERS} done {time.monotonic() - released:.1f} s after the release")
    head = db.head_revision()
    for process, output in zip(upgraders, outputs, strict=True):
        assert process.returncode == 0, output
        assert f"database at revision {head}" in output, output
    engine = db.make_engine(empty_url)
    try:
        assert db.current_revision(engine) == head
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()


def test_serve_no_migrate_leaves_the_schema_alone_and_warns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nbo.sqlite3'}"
    port = _free_port()
    process = _nbo(url, tmp_path, "serve", "--no-migrate", "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"

        def live() -> bool:
            assert process.poll() is None, process.communicate()[0]
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{base}/health/live", timeout=2).status_code == 200
            return False

        _wait_for("nbo serve --no-migrate answers", live, seconds=60)
        ready = httpx.get(f"{base}/health/ready", timeout=5)
        assert ready.status_code == 503
        assert "not migrated" in ready.json()["detail"]
        engine = db.make_engine(url)
        assert not db.has_schema(engine)
        engine.dispose()
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "database schema is not at this version's revision" in output, output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
