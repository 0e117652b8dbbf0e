"""Durable audit records of decisions, written with group commits.

A decision is answered only after the transaction holding its rows has committed, so
an acknowledged decision is never lost. Concurrent requests share commits: a writer
thread takes every record queued while the previous commit was in flight and writes
them in one transaction (one fsync for many decisions).

When the database cannot be written (it is down, or the commit failed for a reason
that is not the record's fault), the records are appended to a local spool file and
fsynced before the decision is answered, and flagged ``degraded``; the writer replays
spooled records into the database as soon as a commit succeeds again (duplicates are
ignored by primary key), so the audit trail stays whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from service.metrics import AUDIT_BATCH_ROWS, AUDIT_COMMIT_SECONDS

log = logging.getLogger("nbo.audit")

_MAX_PARAMETERS = 30_000
"""Bound parameters per statement (SQLite allows 32,766; PostgreSQL 65,535)."""


DECISION_COLUMNS = (
    "id",
    "customer_id",
    "customer_external_id",
    "channel",
    "staff_id",
    "branch_id",
    "context",
    "model_version",
    "control",
    "degraded",
    "cold_start",
    "created_at",
)
OFFER_COLUMNS = (
    "id",
    "decision_id",
    "customer_id",
    "product_id",
    "rank",
    "propensity",
    "expected_value",
    "score",
    "reasons",
    "created_at",
)
EVENT_COLUMNS = (
    "kind",
    "customer_external_id",
    "product_code",
    "detail",
    "origin",
    "occurred_at",
)

# PostgreSQL types of the columns above, for the one INSERT of a group commit.
_PG_TYPES = {
    "decisions": (
        "text", "bigint", "text", "text", "text", "text", "jsonb", "text", "boolean",
        "boolean", "boolean", "timestamptz",
    ),
    "offers": (
        "text", "text", "bigint", "integer", "smallint", "float8", "float8", "float8",
        "jsonb", "timestamptz",
    ),
    "change_events": ("text", "text", "text", "text", "text", "timestamptz"),
}  # fmt: skip


@dataclass(slots=True)
class AuditRecord:
    """The rows of one decision, as driver-ready tuples in the column orders above.

    Times are text (``YYYY-MM-DD HH:MM:SS.ffffff+00:00``, UTC) and JSON columns are JSON
    text, so the same tuples go to SQLite and PostgreSQL and into the spool unchanged;
    building them once per request keeps the commit path free of per-row type handling.
    """

    decision: list[Any]
    offers: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)


def new_id() -> str:
    """A time-ordered UUID (version 7: 48 bits of Unix milliseconds, then random bits).

    Decision and offer ids are primary keys; ids that grow with time are appended at
    the right edge of the index instead of landing on random pages, which keeps each
    commit's write small.
    """
    millis = time.time_ns() // 1_000_000
    value = (millis & (1 << 48) - 1) << 80 | _random.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def derived_id(base: str, n: int) -> str:
    """The ``n``-th id (1 to 15) made from the id ``base``: the same but for its last hex
    digit. An offer's id is derived from its decision's, so one random draw serves a
    whole decision, the ids of one decision differ, and an offer's id shows which
    decision made it; ids of different decisions still differ in their random bits.
    """
    if not 0 < n < 16:
        raise ValueError(f"a derived id takes n from 1 to 15, not {n}")
    return f"{base[:35]}{int(base[35], 16) ^ n:x}"


# The random bits of ids: a generator seeded from the OS (one system call per id cost
# more than the rest of id making), re-seeded in a forked child so processes differ.
_random = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def timestamp(value: dt.datetime, dialect: str) -> str:
    """A UTC instant as text for a timestamp column: with its offset on PostgreSQL, in
    SQLAlchemy's own naive UTC format on SQLite (so stored rows compare and parse alike)."""
    text = value.astimezone(dt.UTC).isoformat(sep=" ", timespec="microseconds")
    return text if dialect == "postgresql" else text[:-6]


class _Spool:
    """Statement building and the local spool, shared by both writers."""

    def __init__(self, engine: Engine, spool_dir: Path, max_batch: int) -> None:
        self.engine = engine
        self.spool_dir = spool_dir
        self.max_batch = max_batch
        self._spool = spool_dir / f"decisions-{os.getpid()}.jsonl"
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._head: dict[str, str] = {}
        self._row: dict[str, str] = {}
        for table, columns in (
            ("decisions", DECISION_COLUMNS),
            ("offers", OFFER_COLUMNS),
            ("change_events", EVENT_COLUMNS),
        ):
            self._head[table] = f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
            self._row[table] = f"({', '.join(marker for _ in columns)})"

    def stamp(self, value: dt.datetime) -> str:
        """``value`` as this database's timestamp text (see :func:`timestamp`)."""
        return timestamp(value, self.engine.dialect.name)

    def _statements(
        self, records: Sequence[AuditRecord], *, ignore_duplicates: bool
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """One multi-row INSERT per table (in chunks): a single statement per table keeps
        the driver's per-statement work (and, in a thread, its GIL hand-offs) to a few
        per commit instead of one per row."""
        suffix = " ON CONFLICT DO NOTHING" if ignore_duplicates else ""
        tables = (
            ("decisions", DECISION_COLUMNS, [tuple(r.decision) for r in records], suffix),
            ("offers", OFFER_COLUMNS, [o for r in records for o in r.offers], suffix),
            # Change events have generated ids: a replayed one may appear twice, which
            # workers tolerate (applying an event is idempotent).
            ("change_events", EVENT_COLUMNS, [e for r in records for e in r.events], ""),
        )
        statements = []
        for table, columns, rows, tail in tables:
            per_chunk = max(1, _MAX_PARAMETERS // len(columns))
            for start in range(0, len(rows), per_chunk):
                chunk = rows[start : start + per_chunk]
                sql = f"{self._head[table]} {', '.join([self._row[table]] * len(chunk))}{tail}"
                statements.append((sql, tuple(value for row in chunk for value in row)))
        return statements

    def _spool_records(self, records: Sequence[AuditRecord]) -> None:
        for record in records:
            record.decision[9] = True  # "degraded", as the caller is told
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps({"decision": r.decision, "offers": r.offers, "events": r.events}) + "\n"
            for r in records
        )
        with open(self._spool, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def _spooled_files(self) -> list[Path]:
        if not self.spool_dir.exists():
            return []
        return sorted(p for p in self.spool_dir.glob("decisions-*.jsonl") if p.stat().st_size)

    def _claimed_spools(self) -> Iterator[tuple[Any, Path, list[AuditRecord]]]:
        """Each spool file holding records that no other worker is replaying, with its
        records; the file stays open and locked until the caller asks for the next."""
        for path in self._spooled_files():
            with open(path, "r+", encoding="utf-8") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # another worker is replaying it
                records = self._read_spool(handle)
                if records:
                    yield handle, path, records

    @staticmethod
    def _read_spool(handle: Any) -> list[AuditRecord]:
        return [
            AuditRecord(
                item["decision"],
                [tuple(o) for o in item["offers"]],
                [tuple(e) for e in item["events"]],
            )
            for item in map(json.loads, filter(str.strip, handle))
        ]

    @staticmethod
    def _clear_spool(handle: Any, path: Path, count: int) -> None:
        handle.truncate(0)
        handle.flush()
        os.fsync(handle.fileno())
        log.info("spool replayed", extra={"file": path.name, "records": count})


class AuditWriter(_Spool):
    """Group-committing writer thread; :meth:`write` resolves once the record is durable.

    ``write`` returns True when the record is in the database, False when it was
    spooled to local disk instead (the caller flags the decision degraded), and raises
    :class:`NotRecorded` when neither could take it. Used for
    SQLite (whose driver has no asynchronous interface); PostgreSQL gets
    :class:`LoopAuditWriter`.
    """

    def __init__(self, engine: Engine, spool_dir: Path, *, max_batch: int = 500) -> None:
        super().__init__(engine, spool_dir, max_batch)
        self._queue: queue.SimpleQueue[tuple[AuditRecord, Any, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nbo-audit", daemon=True)
        self._thread.start()

    async def write(self, record: AuditRecord) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.put((record, loop, future))
        return await future

    async def start(self) -> None:
        """Nothing to wait for: the thread replays any spool before its first commit."""

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 10)

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        self._replay()
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            outcome: bool | NotRecorded = self._commit([record for record, _, _ in batch])
            try:
                if not outcome:
                    self._spool_records([record for record, _, _ in batch])
                elif self._spooled_files():
                    # Back from an outage: restore the trail before answering, so that a
                    # caller who sees this answer also finds the earlier spooled ones.
                    self._replay()
            except OSError as exc:
                outcome = _spool_failed(bool(outcome), len(batch), exc)
            for _, loop, future in batch:
                loop.call_soon_threadsafe(_resolve, future, outcome)
            if stop:
                return

    def _commit(self, records: Sequence[AuditRecord]) -> bool:
        started = time.perf_counter()
        try:
            with self.engine.begin() as conn:
                for sql, params in self._statements(records, ignore_duplicates=False):
                    conn.exec_driver_sql(sql, params)
        except Exception:  # noqa: BLE001 - any failure: keep the records on local disk
            log.exception("audit commit failed; spooling", extra={"records": len(records)})
            return False
        AUDIT_BATCH_ROWS.observe(len(records))
        AUDIT_COMMIT_SECONDS.observe(time.perf_counter() - started)
        return True

    def _replay(self) -> None:
        """Move spooled records (of any worker, past or present) into the database."""
        for handle, path, records in self._claimed_spools():
            try:
                with self.engine.begin() as conn:
                    for sql, params in self._statements(records, ignore_duplicates=True):
                        conn.exec_driver_sql(sql, params)
            except Exception:  # noqa: BLE001 - still down: keep the spool
                log.warning("spool replay failed; will retry", extra={"file": path.name})
                return
            self._clear_spool(handle, path, len(records))


class LoopAuditWriter(_Spool):
    """Group commits on the event loop itself, for PostgreSQL (psycopg's async driver).

    Requests queue their records; a flush task writes everything queued while earlier
    commits were in flight as one statement (one round trip, one transaction), then
    resolves those requests. Up to ``lanes`` commits are in flight at once, each on its
    own connection, so requests do not wait for a whole commit before theirs can start.
    No writer thread means no contention for the GIL with the event loop, which under
    load cost a thread-based writer more than the commits themselves.
    """

    def __init__(
        self, engine: Engine, spool_dir: Path, *, max_batch: int = 500, lanes: int = 2
    ) -> None:
        super().__init__(engine, spool_dir, max_batch)
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self.lanes = lanes
        self._idle: list[tuple[Any, int]] = []  # (connection, generation)
        self._generation = 0
        self._pending: list[tuple[AuditRecord, asyncio.Future[bool]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        # Flush tasks still taking records. Not len(_flushers): a task leaves that set
        # in a done callback, a loop step after its last look at the queue, and a
        # record queued in between would wait for the next write to start a flush.
        self._flushing = 0
        self._spooled = False  # this process spooled since the last look
        self._next_look = 0.0  # the first commit looks at the folder
        self._stale: list[Any] = []
        self._sql = {flag: _pg_insert_all(ignore_duplicates=flag) for flag in (False, True)}

    async def write(self, record: AuditRecord) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self._flushing < self.lanes:
            self._flushing += 1
            task = asyncio.create_task(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await future

    def reconnect(self) -> None:
        """Drop every connection (safe from any thread); the next commits connect again,
        to ``conninfo``."""
        self._generation += 1
        idle, self._idle = self._idle, []
        self._stale.extend(connection for connection, _ in idle)

    async def start(self) -> None:
        """Replay what a previous process spooled (a failure leaves it for later)."""
        await self._replay()

    async def close(self) -> None:
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
        self.reconnect()
        await self._connect_closed()

    async def _connect_closed(self) -> None:
        while self._stale:
            with contextlib.suppress(Exception):
                await self._stale.pop().close()

    async def _flush(self) -> None:
        try:
            await self._flush_pending()
        finally:
            self._flushing -= 1  # in the same step as the last look at the queue

    async def _flush_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            records = [record for record, _ in batch]
            outcome: bool | NotRecorded = await self._commit(records, ignore_duplicates=False)
            try:
                if not outcome:
                    self._spool_records(records)
                    self._spooled = True
                elif self._spool_due():
                    # At start-up, or back from an outage: restore the trail before
                    # answering, so a caller who sees this answer also finds earlier ones.
                    await self._replay()
            except OSError as exc:
                outcome = _spool_failed(bool(outcome), len(batch), exc)
            for _, future in batch:
                _resolve(future, outcome)

    def _spool_due(self) -> bool:
        """Whether spooled records wait for replay: always after this process spooled,
        and at most once a second a look at the folder (another worker's spool)."""
        now = time.monotonic()
        if not self._spooled and now < self._next_look:
            return False
        self._next_look = now + 1.0
        self._spooled = False
        return bool(self._spooled_files())

    async def _commit(self, records: Sequence[AuditRecord], *, ignore_duplicates: bool) -> bool:
        started = time.perf_counter()
        params = (
            orjson.dumps([r.decision for r in records]).decode(),
            orjson.dumps([o for r in records for o in r.offers]).decode(),
            orjson.dumps([e for r in records for e in r.events]).decode(),
        )
        connection = None
        try:
            connection, generation = await self._connect()
            await connection.execute(self._sql[ignore_duplicates], params)
        except Exception:  # noqa: BLE001 - any failure: keep the records on local disk
            log.exception("audit commit failed; spooling", extra={"records": len(records)})
            if connection is not None:
                self._stale.append(connection)
            self.reconnect()
            return False
        if generation == self._generation:
            self._idle.append((connection, generation))
        else:
            self._stale.append(connection)
        AUDIT_BATCH_ROWS.observe(len(records))
        AUDIT_COMMIT_SECONDS.observe(time.perf_counter() - started)
        return True

    async def _connect(self) -> Any:
        import psycopg  # only with PostgreSQL

        await self._connect_closed()
        while self._idle:
            connection, generation = self._idle.pop()
            if not connection.closed and generation == self._generation:
                return connection, generation
            self._stale.append(connection)
        generation = self._generation
        # Autocommit: the one statement of a commit is its own transaction.
        connection = await psycopg.AsyncConnection.connect(
            self.conninfo, connect_timeout=5, autocommit=True
        )
        return connection, generation

    async def _replay(self) -> None:
        for handle, path, records in self._claimed_spools():
            if not await self._commit(records, ignore_duplicates=True):
                return  # still down: keep the spool
            self._clear_spool(handle, path, len(records))


def _pg_insert_all(*, ignore_duplicates: bool) -> str:
    """One statement writing a whole group commit.

    Each table's rows arrive as one JSON array of row arrays (made by orjson, in C)
    and are unpacked by the server, so the event loop spends next to nothing on
    parameters; data-modifying CTEs insert all three tables. The text never changes,
    so the driver parses it once and the server prepares it; one statement is one
    round trip and, in autocommit, one atomic transaction.

    The arrays are read as ``jsonb``: parsed once, then each field is a lookup. As
    ``json``, every ``->>`` parsed its row's text again, and PostgreSQL spent about a
    third more CPU per recorded decision (``bench/audit_insert.py``: 108 against 70 us).
    """
    suffix = " ON CONFLICT DO NOTHING" if ignore_duplicates else ""
    parts = []
    for table, columns in (
        ("decisions", DECISION_COLUMNS),
        ("offers", OFFER_COLUMNS),
        ("change_events", EVENT_COLUMNS),
    ):
        values = ", ".join(f"(r->>{i})::{kind}" for i, kind in enumerate(_PG_TYPES[table]))
        tail = suffix if table != "change_events" else ""
        parts.append(
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"SELECT {values} FROM jsonb_array_elements(%s::jsonb) AS t(r){tail}"
        )
    return f"WITH d AS ({parts[0]}), o AS ({parts[1]}) {parts[2]}"


def audit_writer(
    engine: Engine, spool_dir: Path, *, lanes: int = 2
) -> AuditWriter | LoopAuditWriter:
    """The writer for ``engine``'s database: on the event loop for PostgreSQL (``lanes``
    commits in flight), a thread otherwise."""
    if engine.dialect.name == "postgresql":
        return LoopAuditWriter(engine, spool_dir, lanes=lanes)
    return AuditWriter(engine, spool_dir)


class NotRecorded(Exception):
    """Neither the database nor the local spool took the record: it is not durable,
    and the decision must not be answered as made."""


def _spool_failed(committed: bool, count: int, cause: OSError) -> bool | NotRecorded:
    """What ``count`` records' callers are told when the spool failed them: their records
    are lost if they were to be spooled (:class:`NotRecorded`), and still durable if
    they had committed and only the replay of older spooled records failed (True)."""
    if committed:
        log.warning("spool replay failed; will retry", exc_info=cause)
        return True
    log.error(
        "audit records neither committed nor spooled",
        extra={"records": count, "error": type(cause).__name__},
        exc_info=cause,
    )
    return NotRecorded(f"the audit spool could not be written ({type(cause).__name__})")


def _resolve(future: Any, outcome: bool | NotRecorded) -> None:
    if future.done():
        return
    if isinstance(outcome, NotRecorded):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
