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
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (millis & (1 << 48) - 1) << 80 | random_bits
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


def timestamp(value: dt.datetime, dialect: str) -> str:
    """A UTC instant as text for a timestamp column: with its offset on PostgreSQL, in
    SQLAlchemy's own naive UTC format on SQLite (so stored rows compare and parse alike)."""
    text = value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return text + "+00:00" if dialect == "postgresql" else text


class AuditWriter:
    """Group-committing writer thread; :meth:`write` resolves once the record is durable.

    ``write`` returns True when the record is in the database, False when it was
    spooled to local disk instead (the caller flags the decision degraded).
    """

    def __init__(self, engine: Engine, spool_dir: Path, *, max_batch: int = 500) -> None:
        self.engine = engine
        self.spool_dir = spool_dir
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[AuditRecord, Any, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nbo-audit", daemon=True)
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
        self._thread.start()

    async def write(self, record: AuditRecord) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.put((record, loop, future))
        return await future

    def stamp(self, value: dt.datetime) -> str:
        """``value`` as this database's timestamp text (see :func:`timestamp`)."""
        return timestamp(value, self.engine.dialect.name)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

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
            durable = self._commit([record for record, _, _ in batch])
            if not durable:
                for record, _, _ in batch:
                    record.decision[9] = True  # "degraded", as the caller is told
                self._spool_records([record for record, _, _ in batch])
            if durable and self._spooled_files():
                # Back from an outage: restore the trail before answering, so that a
                # caller who sees this answer also finds the earlier spooled ones.
                self._replay()
            for _, loop, future in batch:
                loop.call_soon_threadsafe(_resolve, future, durable)
            if stop:
                return

    def _commit(self, records: Sequence[AuditRecord]) -> bool:
        started = time.perf_counter()
        try:
            with self.engine.begin() as conn:
                self._insert(conn, records, ignore_duplicates=False)
        except Exception:  # noqa: BLE001 - any failure: keep the records on local disk
            log.exception("audit commit failed; spooling", extra={"records": len(records)})
            return False
        AUDIT_BATCH_ROWS.observe(len(records))
        AUDIT_COMMIT_SECONDS.observe(time.perf_counter() - started)
        return True

    def _insert(
        self, conn: Any, records: Sequence[AuditRecord], *, ignore_duplicates: bool
    ) -> None:
        """One multi-row INSERT per table (in chunks): a single statement per table keeps
        the driver from releasing and re-taking the GIL once per row, which, with the
        event loop busy, cost up to a switch interval (5 ms) each time."""
        suffix = " ON CONFLICT DO NOTHING" if ignore_duplicates else ""
        tables = (
            ("decisions", DECISION_COLUMNS, [tuple(r.decision) for r in records], suffix),
            ("offers", OFFER_COLUMNS, [o for r in records for o in r.offers], suffix),
            # Change events have generated ids: a replayed one may appear twice, which
            # workers tolerate (applying an event is idempotent).
            ("change_events", EVENT_COLUMNS, [e for r in records for e in r.events], ""),
        )
        for table, columns, rows, tail in tables:
            per_chunk = max(1, _MAX_PARAMETERS // len(columns))
            for start in range(0, len(rows), per_chunk):
                chunk = rows[start : start + per_chunk]
                sql = f"{self._head[table]} {', '.join([self._row[table]] * len(chunk))}{tail}"
                conn.exec_driver_sql(sql, tuple(value for row in chunk for value in row))

    # ------------------------------------------------------------------ spool

    def _spool_records(self, records: Sequence[AuditRecord]) -> None:
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

    def _replay(self) -> None:
        """Move spooled records (of any worker, past or present) into the database."""
        for path in self._spooled_files():
            with open(path, "r+", encoding="utf-8") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # another worker is replaying it
                records = [
                    AuditRecord(
                        item["decision"],
                        [tuple(o) for o in item["offers"]],
                        [tuple(e) for e in item["events"]],
                    )
                    for item in map(json.loads, filter(str.strip, handle))
                ]
                if not records:
                    continue
                try:
                    with self.engine.begin() as conn:
                        # Change events have generated ids: a replayed one may appear
                        # twice, which workers tolerate (applying one is idempotent).
                        self._insert(conn, records, ignore_duplicates=True)
                except Exception:  # noqa: BLE001 - still down: keep the spool
                    log.warning("spool replay failed; will retry", extra={"file": path.name})
                    return
                handle.truncate(0)
                handle.flush()
                os.fsync(handle.fileno())
                log.info("spool replayed", extra={"file": path.name, "records": len(records)})


def _resolve(future: Any, value: bool) -> None:
    if not future.done():
        future.set_result(value)
