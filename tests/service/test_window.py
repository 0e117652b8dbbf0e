"""The start-up's bulk read of the policy windows takes its COPY rows from libpq itself
(service.decision.window._copy_out): the data must be psycopg's, and a reader that
stops or fails, or a COPY the server fails, must leave the connection usable."""

from __future__ import annotations

import itertools
import os
import resource
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from service.decision import window

pytestmark = pytest.mark.postgres

ROWS = "COPY (SELECT g, g * 2 FROM generate_series(1, %(n)s) g) TO STDOUT (FORMAT binary)"


@pytest.fixture
def raw(empty_postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    url = empty_postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        yield conn


def _psycopg_copy(conn: psycopg.Connection[Any], n: int) -> bytes:
    with conn.cursor() as cursor, cursor.copy(ROWS, {"n": n}) as copy:
        return b"".join(bytes(data) for data in copy)


def _usable(conn: psycopg.Connection[Any]) -> bool:
    return conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_the_blocks_hold_what_psycopg_reads(
    raw: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(window, "COPY_BLOCK", 4096)
    blocks = list(window._copy_out(raw, ROWS, {"n": 50_000}))
    assert len(blocks) > 100 and all(len(b) >= 4096 for b in blocks[:-1])
    assert b"".join(blocks) == _psycopg_copy(raw, 50_000)
    assert _usable(raw)  # the same transaction goes on


def test_a_reader_that_stops_leaves_the_connection_usable(
    raw: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(window, "COPY_BLOCK", 4096)
    # Part-way: the COPY is cancelled and drained; the transaction rolls back.
    blocks = window._copy_out(raw, ROWS, {"n": 2_000_000})
    assert len(next(blocks)) >= 4096
    blocks.close()
    raw.rollback()
    assert _usable(raw)
    # After its last rows but before the generator ended: the COPY is over, nothing to
    # cancel, and the transaction is still good.
    whole = len(list(window._copy_out(raw, ROWS, {"n": 1_000})))
    blocks = window._copy_out(raw, ROWS, {"n": 1_000})
    assert len(list(itertools.islice(blocks, whole))) == whole
    blocks.close()
    assert _usable(raw)


def test_a_copy_the_server_fails_raises_and_the_connection_recovers(
    raw: psycopg.Connection[Any],
) -> None:
    failing = "COPY (SELECT 1 / (g - 5000) FROM generate_series(1, 9000) g) TO STDOUT"
    with pytest.raises(psycopg.OperationalError, match="division by zero"):
        list(window._copy_out(raw, failing, {}))
    raw.rollback()
    assert _usable(raw)
    with pytest.raises(psycopg.OperationalError, match="COPY did not start"):
        list(window._copy_out(raw, "COPY no_such_table TO STDOUT", {}))
    raw.rollback()
    assert _usable(raw)


def test_a_connection_numbered_past_1024_is_read(empty_postgres_url: str) -> None:
    """A worker may hold over a thousand descriptors (the suite's process does), and
    ``select`` cannot wait for one numbered 1024 or more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} open files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    spare = [os.open(os.devnull, os.O_RDONLY)]
    try:
        while spare[-1] < 1100:  # every lower number taken: the socket's is above
            spare.append(os.dup(spare[0]))
        url = empty_postgres_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url) as conn:
            assert conn.pgconn.socket > 1024
            blocks = b"".join(window._copy_out(conn, ROWS, {"n": 20_000}))
            assert blocks == _psycopg_copy(conn, 20_000)
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_database_that_goes_away_mid_copy_fails_the_read_without_hanging(
    raw: psycopg.Connection[Any], empty_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(window, "COPY_BLOCK", 4096)
    backend = raw.info.backend_pid
    blocks = window._copy_out(raw, ROWS, {"n": 5_000_000})
    assert len(next(blocks)) >= 4096
    url = empty_postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [backend])
    with pytest.raises(psycopg.OperationalError):
        for _ in blocks:
            pass
    assert raw.closed or raw.pgconn.status != psycopg.pq.ConnStatus.OK
