"""Durable audit records of decisions, written with group commits.

A decision is answered only after the transaction holding its rows has committed, so
an acknowledged decision is never lost. Concurrent requests share commits: a writer
thread takes every record queued while the previous commit was in flight and writes
them in one transaction (one fsync for many decisions).

When the database cannot be written (it is down, or the commit failed for a reason
that is not the record's fault), the records are appended to a local spool file and
fsynced before the decision is answered, and flagged ``degraded``; the writer replays
spooled records into the database as soon as a commit succeeds again (duplicates are
ignored by primary key), so the audit trail stays whole. The spool is a journal of framed
records (:mod:`service.decision.spool`): a torn or damaged record, or one the database refuses as
data, goes to a dead-letter file and holds back nothing else.

Every caller gets an answer, whatever fails: True (committed), False (spooled: answered
degraded) or :class:`NotRecorded` (answered 503); and ``close`` ends in bounded time,
spooling what it could not commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError

from service.decision.spool import Claim, Entry, Journal
from service.metrics import AUDIT_BATCH_ROWS, AUDIT_COMMIT_SECONDS

log = logging.getLogger("nbo.audit")

COMMIT_LANES = 1
"""Group commits in flight at once per worker on PostgreSQL, unless told otherwise
(``NBO_AUDIT_COMMIT_LANES``, whose default says the same): see :class:`LoopAuditWriter`."""
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
    "api_key_prefix",
    "idempotency_key",
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
        "boolean", "boolean", "timestamptz", "text", "text",
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


Stored = Literal["committed", "down", "rejected"]
"""What became of one record: in the database; not, as the database is unreachable or
failing (the record stays spooled); not, as the database refuses it as data (it would
fail again however often it were retried)."""

_LEGACY_DECISION_FIELDS = 12
"""Decision fields in the first spool format; columns added since are nullable."""

_SCALARS = (str, int, float, bool, type(None))


class _Spool:
    """Statement building, the local spool and its replay, shared by both writers."""

    def __init__(
        self,
        engine: Engine,
        spool_dir: Path,
        max_batch: int,
        *,
        close_seconds: float,
        stall_seconds: float,
    ) -> None:
        self.engine = engine
        self.spool_dir = spool_dir
        self.max_batch = max_batch
        self.close_seconds = close_seconds
        self.stall_seconds = stall_seconds
        self._journal = Journal(spool_dir, f"decisions-{os.getpid()}.jsonl")
        self._closed = False
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

    @property
    def healthy(self) -> bool:
        """Whether this writer takes records and its commits progress: False once it is
        closed, when its thread is gone, or when a batch has waited for its commit longer
        than ``stall_seconds``. Readiness reports it."""
        if self._closed or not self._running():
            return False
        oldest = self._oldest_batch()
        return oldest is None or time.monotonic() - oldest < self.stall_seconds

    def _running(self) -> bool:
        return True

    def _oldest_batch(self) -> float | None:
        """When the oldest batch still being committed was taken (monotonic), if any."""
        return None

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

    # ------------------------------------------------------------------ spooling

    def _spool_records(self, records: Sequence[AuditRecord]) -> None:
        """Append ``records`` to this process's spool file, durably; OSError if not."""
        for record in records:
            record.decision[9] = True  # "degraded", as the caller is told
        self._journal.append(
            [
                orjson.dumps({"decision": r.decision, "offers": r.offers, "events": r.events})
                for r in records
            ]
        )

    def _answers(
        self, records: Sequence[AuditRecord], stored: Sequence[Stored]
    ) -> list[bool | NotRecorded]:
        """Each caller's answer once its record's commit is settled: spool the records
        the database could not take (False: degraded), and refuse the ones it rejected."""
        down = [
            record for record, outcome in zip(records, stored, strict=True) if outcome == "down"
        ]
        spooled: bool | NotRecorded = False
        if down:
            try:
                self._spool_records(down)
            except OSError as exc:
                spooled = _not_spooled(len(down), exc)
        rejected = NotRecorded("the database refused the audit record")
        answers: dict[Stored, bool | NotRecorded] = {
            "committed": True,
            "down": spooled,
            "rejected": rejected,
        }
        return [answers[outcome] for outcome in stored]

    def _spooled_files(self) -> list[Path]:
        return self._journal.pending_files()

    # ------------------------------------------------------------------ replaying

    def _claimed_spools(self) -> Generator[tuple[Claim, list[tuple[Entry, AuditRecord]]]]:
        """Each spool file that no other replayer holds, claimed, with its records; what
        cannot be read as a record is in the dead-letter file already. The file stays
        claimed until the caller asks for the next one or closes the iterator."""
        for claim in self._journal.claims():
            items: list[tuple[Entry, AuditRecord]] = []
            for entry in claim.entries:
                try:
                    items.append((entry, _record_from(entry.value)))
                except (KeyError, TypeError, ValueError):
                    self._journal.dead_letter(
                        claim.path.name, entry.offset, "bad_record", entry.payload
                    )
            if len(items) < len(claim.entries):
                self._journal.keep(claim, [entry for entry, _ in items])
            yield claim, items

    def _chunks(
        self, items: list[tuple[Entry, AuditRecord]]
    ) -> Iterator[tuple[int, list[AuditRecord]]]:
        for done in range(0, len(items), self.max_batch):
            yield done, [record for _, record in items[done : done + self.max_batch]]

    def _replayed(
        self,
        claim: Claim,
        items: list[tuple[Entry, AuditRecord]],
        done: int,
        stored: Sequence[Stored],
    ) -> bool:
        """Settle the replayed chunk ``items[done:done + len(stored)]``: dead-letter what
        the database refused; if it failed, keep the rest of the file and say so."""
        chunk = items[done : done + len(stored)]
        for (entry, _), outcome in zip(chunk, stored, strict=True):
            if outcome == "rejected":
                self._journal.dead_letter(claim.path.name, entry.offset, "rejected", entry.payload)
        if "down" not in stored:
            return True
        left = [
            entry for (entry, _), outcome in zip(chunk, stored, strict=True) if outcome == "down"
        ]
        left += [entry for entry, _ in items[done + len(stored) :]]
        self._journal.keep(claim, left)
        log.warning(
            "spool replay failed; will retry", extra={"file": claim.path.name, "records": len(left)}
        )
        return False

    def _finished(self, claim: Claim, count: int) -> None:
        self._journal.finish(claim)
        log.info("spool replayed", extra={"file": claim.path.name, "records": count})


class AuditWriter(_Spool):
    """Group-committing writer thread; :meth:`write` resolves once the record is durable.

    ``write`` returns True when the record is in the database, False when it was
    spooled to local disk instead (the caller flags the decision degraded), and raises
    :class:`NotRecorded` when neither could take it. Used for
    SQLite (whose driver has no asynchronous interface); PostgreSQL gets
    :class:`LoopAuditWriter`.
    """

    def __init__(
        self,
        engine: Engine,
        spool_dir: Path,
        *,
        max_batch: int = 500,
        close_seconds: float = 5.0,
        stall_seconds: float = 60.0,
    ) -> None:
        super().__init__(
            engine,
            spool_dir,
            max_batch,
            close_seconds=close_seconds,
            stall_seconds=stall_seconds,
        )
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._batch: list[_Waiting] = []  # the one being committed, for close()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="nbo-audit", daemon=True)
        self._thread.start()

    async def write(self, record: AuditRecord) -> bool:
        if self._closed:
            raise NotRecorded("the audit writer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.put((record, loop, future))
        return await future

    async def start(self) -> None:
        """Nothing to wait for: the thread replays any spool before its first commit."""

    async def close(self) -> None:
        """Commit (or spool) what is queued and stop the thread, in bounded time: after
        ``close_seconds`` the records the thread still holds are spooled from here, and
        every caller gets an answer."""
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, self.close_seconds)
        if not self._thread.is_alive():
            return
        held = [*self._batch, *_drain(self._queue)]
        log.error("audit writer did not stop in time; spooling", extra={"records": len(held)})
        outcome: bool | NotRecorded = NotRecorded("the audit writer stopped before recording it")
        try:
            async with asyncio.timeout(self.close_seconds):
                await asyncio.to_thread(self._spool_records, [record for record, _, _ in held])
            outcome = False
        except (OSError, TimeoutError) as exc:
            outcome = _not_spooled(len(held), exc)
        for _, loop, future in held:
            _resolve_from_thread(loop, future, outcome)

    def _running(self) -> bool:
        return self._thread.is_alive()

    def _oldest_batch(self) -> float | None:
        return self._busy_since

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        try:
            self._replay_at_start()
            while self._serve_one():
                pass
        finally:
            # Normally nothing is left; if the thread ends otherwise (the interpreter is
            # stopping), answer whoever still waits rather than leave them hanging.
            self._closed = True
            for _, loop, future in [*self._batch, *_drain(self._queue)]:
                _resolve_from_thread(loop, future, NotRecorded("the audit writer stopped"))

    def _replay_at_start(self) -> None:
        try:
            self._replay()
        except Exception:  # noqa: BLE001 - a bad spool must not keep the writer from starting
            log.warning("audit spool replay failed at start-up; will retry", exc_info=True)

    def _serve_one(self) -> bool:
        """Commit one batch of queued records and answer their callers; False to stop."""
        item = self._queue.get()
        if item is None:
            return False
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
        self._batch, self._busy_since = batch, time.monotonic()
        try:
            answers = self._settle([record for record, _, _ in batch])
        except Exception:  # noqa: BLE001 - the thread must live on and answer everyone
            log.exception("audit writer failed on a batch", extra={"records": len(batch)})
            answers = [NotRecorded("the audit writer failed")] * len(batch)
        for (_, loop, future), answer in zip(batch, answers, strict=True):
            _resolve_from_thread(loop, future, answer)
        self._batch, self._busy_since = [], None
        return not stop

    def _settle(self, records: Sequence[AuditRecord]) -> list[bool | NotRecorded]:
        stored = self._store(records, ignore_duplicates=False)
        answers = self._answers(records, stored)
        if "committed" in stored and "down" not in stored:
            try:
                if self._spooled_files():
                    # Back from an outage: restore the trail before answering, so that a
                    # caller who sees this answer also finds the earlier spooled ones.
                    self._replay()
            except Exception:  # noqa: BLE001 - these records are in; the spool waits
                log.warning("spool replay failed; will retry", exc_info=True)
        return answers

    def _store(self, records: Sequence[AuditRecord], *, ignore_duplicates: bool) -> list[Stored]:
        """Commit ``records`` in one transaction; if the database refuses it as data, one
        record at a time, so that one bad record does not hold back the others."""
        started = time.perf_counter()
        try:
            with self.engine.begin() as conn:
                for sql, params in self._statements(records, ignore_duplicates=ignore_duplicates):
                    conn.exec_driver_sql(sql, params)
        except (IntegrityError, DataError) as exc:
            if len(records) > 1:
                return _one_at_a_time(
                    records, lambda one: self._store(one, ignore_duplicates=ignore_duplicates)
                )
            _log_rejected(exc)
            return ["rejected"]
        except Exception as exc:  # noqa: BLE001 - any other failure: keep them on disk
            _log_down(exc, len(records))
            return ["down"] * len(records)
        AUDIT_BATCH_ROWS.observe(len(records))
        AUDIT_COMMIT_SECONDS.observe(time.perf_counter() - started)
        return ["committed"] * len(records)

    def _replay(self) -> None:
        """Move spooled records (of any worker, past or present) into the database."""
        with contextlib.closing(self._claimed_spools()) as claims:
            for claim, items in claims:
                for done, records in self._chunks(items):
                    stored = self._store(records, ignore_duplicates=True)
                    if not self._replayed(claim, items, done, stored):
                        return  # still down: the rest of the spool waits
                self._finished(claim, len(items))


class LoopAuditWriter(_Spool):
    """Group commits on the event loop itself, for PostgreSQL (psycopg's async driver).

    Requests queue their records; a flush task writes everything queued while earlier
    commits were in flight as one statement (one round trip, one transaction), then
    resolves those requests. Up to ``lanes`` commits are in flight at once, each on its
    own connection, so requests need not wait for a whole commit before theirs can start;
    but one lane (the default) makes groups about twice as large and the database does
    half the commits, which with PostgreSQL on the same 2-core machine answered 12-28 %
    more decisions at a lower p99 at 4 and 32 connections, and as many at 1 and 2.
    No writer thread means no contention for the GIL with the event loop, which under
    load cost a thread-based writer more than the commits themselves.
    """

    def __init__(
        self,
        engine: Engine,
        spool_dir: Path,
        *,
        max_batch: int = 500,
        lanes: int = COMMIT_LANES,
        commit_seconds: float = 10.0,
        close_seconds: float = 5.0,
        stall_seconds: float = 60.0,
    ) -> None:
        import psycopg  # only with PostgreSQL

        super().__init__(
            engine,
            spool_dir,
            max_batch,
            close_seconds=close_seconds,
            stall_seconds=stall_seconds,
        )
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self.lanes = lanes
        self.commit_seconds = commit_seconds
        self._data_errors = (psycopg.IntegrityError, psycopg.DataError)
        self._idle: list[tuple[Any, int]] = []  # (connection, generation)
        self._generation = 0
        self._pending: list[tuple[AuditRecord, asyncio.Future[bool]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        # Flush tasks still taking records. Not len(_flushers): a task leaves that set
        # in a done callback, a loop step after its last look at the queue, and a
        # record queued in between would wait for the next write to start a flush.
        self._flushing = 0
        self._busy: dict[int, float] = {}  # id of a batch being committed -> taken at
        self._spooled = False  # this process spooled since the last look
        self._next_look = 0.0  # the first commit looks at the folder
        self._stale: list[Any] = []
        self._sql = {flag: _pg_insert_all(ignore_duplicates=flag) for flag in (False, True)}

    async def write(self, record: AuditRecord) -> bool:
        if self._closed:
            raise NotRecorded("the audit writer is closed")
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
        try:
            await self._replay()
        except Exception:  # noqa: BLE001 - a bad spool must not keep the writer from starting
            log.warning("audit spool replay failed at start-up; will retry", exc_info=True)

    async def close(self) -> None:
        """Finish the commits in flight and stop, in bounded time: commits still running
        after ``close_seconds`` are cancelled and their records spooled, as are records
        no commit took; every caller gets an answer."""
        self._closed = True
        if self._flushers:
            _, stuck = await asyncio.wait(set(self._flushers), timeout=self.close_seconds)
            if stuck:
                log.error(
                    "audit commits did not end in time; spooling", extra={"batches": len(stuck)}
                )
                for task in stuck:
                    task.cancel()
                await asyncio.wait(stuck, timeout=self.close_seconds)
        left, self._pending = self._pending, []
        if left:
            self._spool_and_answer(left)
        self.reconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_seconds):
                await self._connect_closed()

    def _oldest_batch(self) -> float | None:
        return min(self._busy.values(), default=None)

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
            self._busy[id(batch)] = time.monotonic()
            try:
                answers = await self._settle([record for record, _ in batch])
            except asyncio.CancelledError:
                self._spool_and_answer(batch)  # close() stopped waiting for this commit
                raise
            except Exception:  # noqa: BLE001 - the flush must answer everyone and go on
                log.exception("audit writer failed on a batch", extra={"records": len(batch)})
                answers = [NotRecorded("the audit writer failed")] * len(batch)
            finally:
                del self._busy[id(batch)]
            for (_, future), answer in zip(batch, answers, strict=True):
                _resolve(future, answer)

    def _spool_and_answer(self, batch: Sequence[tuple[AuditRecord, asyncio.Future[bool]]]) -> None:
        """Spool records whose commit will not be waited for, and answer their callers."""
        waiting = [(record, future) for record, future in batch if not future.done()]
        answer: bool | NotRecorded = False
        try:
            self._spool_records([record for record, _ in waiting])
        except OSError as exc:
            answer = _not_spooled(len(waiting), exc)
        for _, future in waiting:
            _resolve(future, answer)

    async def _settle(self, records: Sequence[AuditRecord]) -> list[bool | NotRecorded]:
        stored = await self._store(records, ignore_duplicates=False)
        answers = self._answers(records, stored)
        if "down" in stored:
            self._spooled = True
        elif "committed" in stored:
            try:
                if self._spool_due():
                    # At start-up, or back from an outage: restore the trail before
                    # answering, so a caller who sees this answer also finds earlier ones.
                    await self._replay()
            except Exception:  # noqa: BLE001 - these records are in; the spool waits
                log.warning("spool replay failed; will retry", exc_info=True)
        return answers

    def _spool_due(self) -> bool:
        """Whether spooled records wait for replay: always after this process spooled,
        and at most once a second a look at the folder (another worker's spool)."""
        now = time.monotonic()
        if not self._spooled and now < self._next_look:
            return False
        self._next_look = now + 1.0
        self._spooled = False
        return bool(self._spooled_files())

    async def _store(
        self, records: Sequence[AuditRecord], *, ignore_duplicates: bool
    ) -> list[Stored]:
        """Commit ``records`` in one statement; if the database refuses it as data, one
        record at a time, so that one bad record does not hold back the others."""
        try:
            await self._execute(records, ignore_duplicates=ignore_duplicates)
        except self._data_errors as exc:
            if len(records) > 1:
                stored: list[Stored] = []
                for record in records:
                    stored += await self._store([record], ignore_duplicates=ignore_duplicates)
                    if stored[-1] == "down":  # gone meanwhile: the rest waits too
                        return stored + ["down"] * (len(records) - len(stored))
                return stored
            _log_rejected(exc)
            return ["rejected"]
        except Exception as exc:  # noqa: BLE001 - any other failure: keep them on disk
            _log_down(exc, len(records))
            return ["down"] * len(records)
        return ["committed"] * len(records)

    async def _execute(self, records: Sequence[AuditRecord], *, ignore_duplicates: bool) -> None:
        started = time.perf_counter()
        params = (
            orjson.dumps([r.decision for r in records]).decode(),
            orjson.dumps([o for r in records for o in r.offers]).decode(),
            orjson.dumps([e for r in records for e in r.events]).decode(),
        )
        # Bounded: a commit that hangs (a lost network, a lock) would hold its callers.
        async with asyncio.timeout(self.commit_seconds):
            connection, generation = await self._connect()
            try:
                await connection.execute(self._sql[ignore_duplicates], params)
            except self._data_errors:
                self._release(connection, generation)  # only the statement failed
                raise
            except BaseException:
                self._stale.append(connection)
                self.reconnect()
                raise
        self._release(connection, generation)
        AUDIT_BATCH_ROWS.observe(len(records))
        AUDIT_COMMIT_SECONDS.observe(time.perf_counter() - started)

    def _release(self, connection: Any, generation: int) -> None:
        if generation == self._generation:
            self._idle.append((connection, generation))
        else:
            self._stale.append(connection)

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
        with contextlib.closing(self._claimed_spools()) as claims:
            for claim, items in claims:
                for done, records in self._chunks(items):
                    stored = await self._store(records, ignore_duplicates=True)
                    if not self._replayed(claim, items, done, stored):
                        return  # still down: the rest of the spool waits
                self._finished(claim, len(items))


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


AuditSink = AuditWriter | LoopAuditWriter
"""Either writer: what the application holds as ``app.state.audit``."""


def audit_writer(engine: Engine, spool_dir: Path, *, lanes: int = COMMIT_LANES) -> AuditSink:
    """The writer for ``engine``'s database: on the event loop for PostgreSQL (``lanes``
    commits in flight), a thread otherwise."""
    if engine.dialect.name == "postgresql":
        return LoopAuditWriter(engine, spool_dir, lanes=lanes)
    return AuditWriter(engine, spool_dir)


class NotRecorded(Exception):
    """Neither the database nor the local spool took the record: it is not durable,
    and the decision must not be answered as made."""


_Waiting = tuple[AuditRecord, asyncio.AbstractEventLoop, "asyncio.Future[bool]"]


def _record_from(value: Any) -> AuditRecord:
    """The record a spooled JSON object holds; ValueError (or KeyError, TypeError) when
    this version could not store it."""
    decision = value["decision"]
    offers = value.get("offers", [])
    events = value.get("events", [])
    if not (isinstance(decision, list) and isinstance(offers, list) and isinstance(events, list)):
        raise ValueError("a spooled record holds lists")
    if not _LEGACY_DECISION_FIELDS <= len(decision) <= len(DECISION_COLUMNS):
        raise ValueError("a spooled decision has the wrong number of fields")
    decision = decision + [None] * (len(DECISION_COLUMNS) - len(decision))
    offer_rows = [tuple(o) for o in offers]
    event_rows = [tuple(e) for e in events]
    if any(len(o) != len(OFFER_COLUMNS) for o in offer_rows) or any(
        len(e) != len(EVENT_COLUMNS) for e in event_rows
    ):
        raise ValueError("a spooled row has the wrong number of fields")
    for row in (decision, *offer_rows, *event_rows):
        if not all(isinstance(v, _SCALARS) for v in row):
            raise ValueError("a spooled row holds a value that is not a scalar")
    return AuditRecord(decision, offer_rows, event_rows)


def _one_at_a_time(
    records: Sequence[AuditRecord], store: Callable[[Sequence[AuditRecord]], list[Stored]]
) -> list[Stored]:
    stored: list[Stored] = []
    for record in records:
        stored += store([record])
        if stored[-1] == "down":  # gone meanwhile: the rest waits too
            return stored + ["down"] * (len(records) - len(stored))
    return stored


def _log_rejected(exc: BaseException) -> None:
    # The error's text may quote the record's values: log its class and code only.
    log.error(
        "audit record refused by the database",
        extra={"error": type(getattr(exc, "orig", None) or exc).__name__},
    )


def _log_down(exc: BaseException, count: int) -> None:
    log.warning(
        "audit commit failed; spooling",
        extra={"records": count, "error": type(getattr(exc, "orig", None) or exc).__name__},
    )


def _not_spooled(count: int, cause: BaseException) -> NotRecorded:
    """What ``count`` callers are told when the spool could not take their records."""
    log.error(
        "audit records neither committed nor spooled",
        extra={"records": count, "error": type(cause).__name__},
        exc_info=cause,
    )
    return NotRecorded(f"the audit spool could not be written ({type(cause).__name__})")


def _drain(waiting: queue.SimpleQueue[_Waiting | None]) -> list[_Waiting]:
    items: list[_Waiting] = []
    while True:
        try:
            item = waiting.get_nowait()
        except queue.Empty:
            return items
        if item is not None:
            items.append(item)


def _resolve_from_thread(loop: asyncio.AbstractEventLoop, future: Any, outcome: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
        loop.call_soon_threadsafe(_resolve, future, outcome)


def _resolve(future: Any, outcome: bool | NotRecorded) -> None:
    if future.done():
        return
    if isinstance(outcome, NotRecorded):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
