"""The audit writers: ids, timestamps, and records stored whole and typed, on both databases."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from service.data.db import unit_of_work
from service.data.tables import Customer, Product
from service.decision.audit import (
    AuditRecord,
    AuditWriter,
    LoopAuditWriter,
    NotRecorded,
    audit_writer,
    derived_id,
    new_id,
    timestamp,
)


def test_ids_are_uuid7_time_ordered_and_distinct() -> None:
    ids = [new_id() for _ in range(2_000)]
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    millis = [u.int >> 80 for u in parsed]
    assert millis == sorted(millis)
    assert all(str(u) == i for u, i in zip(parsed, ids, strict=True))


def test_derived_ids_differ_from_their_base_and_each_other_and_stay_uuid7() -> None:
    for base in [new_id() for _ in range(200)]:
        derived = [derived_id(base, n) for n in range(1, 16)]
        assert len({base, *derived}) == 16
        for d in derived:
            parsed = uuid.UUID(d)
            assert str(parsed) == d and parsed.version == 7 and parsed.variant == uuid.RFC_4122
            assert d[:35] == base[:35]
    with pytest.raises(ValueError, match="1 to 15"):
        derived_id(new_id(), 16)


def test_timestamps_are_utc_text_with_microseconds() -> None:
    local = dt.datetime(2026, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert timestamp(local, "postgresql") == "2026-01-02 03:04:05.000000+00:00"
    assert timestamp(local, "sqlite") == "2026-01-02 03:04:05.000000"


def _record(stamp: str, customer: int, product: int, i: int) -> AuditRecord:
    decision_id = new_id()
    decision = [
        decision_id,
        customer,
        "C1",
        "branch",
        "S1",
        None,
        json.dumps({"reason": f"visit {i}", "quote": 'it\'s "fine"'}),
        "v1",
        False,
        i % 2 == 1,
        False,
        stamp,
        None,
        None,
    ]
    offers = [
        (new_id(), decision_id, customer, product, 1, 0.25, 12.5, 12.5, '{"rule": "ä"}', stamp)
    ]
    events = [("offer", "C1", "card", offers[0][0], "worker-x", stamp)]
    return AuditRecord(decision, offers, events)


def test_records_are_stored_whole_and_typed(engine: Engine, tmp_path: Path) -> None:
    with unit_of_work(engine) as session:
        product = Product(code="card", name="Card", category="cards", value=10.0)
        customer = Customer(external_id="C1", attributes={})
        session.add_all([product, customer])
        session.flush()
        ids = customer.id, product.id
    writer = audit_writer(engine, tmp_path / "spool")
    expected = LoopAuditWriter if engine.dialect.name == "postgresql" else AuditWriter
    assert isinstance(writer, expected)
    at = dt.datetime(2026, 11, 23, 9, 30, 1, 250_000, tzinfo=dt.UTC)
    records = [_record(writer.stamp(at), *ids, i) for i in range(25)]

    async def write_all() -> list[bool]:
        await writer.start()
        try:
            return await asyncio.gather(*(writer.write(r) for r in records))
        finally:
            await writer.close()

    assert asyncio.run(write_all()) == [True] * len(records)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT d.id, d.customer_id, d.branch_id, d.context, d.degraded, d.created_at, "
                "o.propensity, o.rank, o.reasons FROM decisions d "
                "JOIN offers o ON o.decision_id = d.id ORDER BY d.id"
            )
        ).all()
        events = conn.execute(text("SELECT count(*) FROM change_events")).scalar()
    assert [r[0] for r in rows] == sorted(r.decision[0] for r in records)
    by_id = {r[0]: r for r in rows}
    rows = [by_id[r.decision[0]] for r in records]  # in the order written
    first = rows[0]
    assert first[1] == ids[0] and first[2] is None
    context = first[3] if isinstance(first[3], dict) else json.loads(first[3])
    assert context == {"reason": "visit 0", "quote": 'it\'s "fine"'}
    assert [bool(r[4]) for r in rows] == [i % 2 == 1 for i in range(25)]
    created = first[5]
    if isinstance(created, str):  # SQLite hands back text for a raw query
        created = dt.datetime.fromisoformat(created)
    assert created.replace(tzinfo=dt.UTC) == at.replace(tzinfo=dt.UTC)
    assert (first[6], first[7]) == (0.25, 1)
    reasons = first[8] if isinstance(first[8], dict) else json.loads(first[8])
    assert reasons == {"rule": "ä"}
    assert events == len(records)


@pytest.mark.postgres
def test_loop_writer_spools_when_the_database_is_gone_and_replays(
    engine: Engine, tmp_path: Path
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the event-loop writer is PostgreSQL's")
    with unit_of_work(engine) as session:
        product = Product(code="card", name="Card", category="cards", value=10.0)
        customer = Customer(external_id="C1", attributes={})
        session.add_all([product, customer])
        session.flush()
        ids = customer.id, product.id
    writer = LoopAuditWriter(engine, tmp_path / "spool")
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    lost, kept = _record(stamp, *ids, 0), _record(stamp, *ids, 2)
    real = writer.conninfo

    async def scenario() -> tuple[bool, bool]:
        writer.conninfo = "postgresql://nobody@127.0.0.1:1/none"
        down = await writer.write(lost)
        writer.conninfo = real
        up = await writer.write(kept)
        await writer.close()
        return down, up

    assert asyncio.run(scenario()) == (False, True)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, degraded FROM decisions")).all())
    assert rows == {lost.decision[0]: True, kept.decision[0]: False}
    assert not any(p.stat().st_size for p in (tmp_path / "spool").glob("*.jsonl"))


def _stored(engine: Engine) -> tuple[int, int]:
    with unit_of_work(engine) as session:
        product = Product(code="card", name="Card", category="cards", value=10.0)
        customer = Customer(external_id="C1", attributes={})
        session.add_all([product, customer])
        session.flush()
        return customer.id, product.id


def test_a_record_queued_as_a_flush_ends_is_still_committed(engine: Engine, tmp_path: Path) -> None:
    # Callers that write again as soon as their commit resolves, with one lane: each
    # write lands while the flush that resolved it is finishing. None may be left
    # waiting for some later write to start a flush.
    ids = _stored(engine)
    if engine.dialect.name == "postgresql":
        writer: Any = LoopAuditWriter(engine, tmp_path / "spool", lanes=1)
    else:
        writer = AuditWriter(engine, tmp_path / "spool")
    stamp = writer.stamp(dt.datetime.now(dt.UTC))

    async def caller(k: int) -> int:
        for i in range(20):
            assert await writer.write(_record(stamp, *ids, k * 100 + i))
        return k

    async def scenario() -> list[int]:
        await writer.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(caller(k) for k in range(4))), 30)
        finally:
            await writer.close()

    assert asyncio.run(scenario()) == [0, 1, 2, 3]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM decisions")).scalar() == 80


def test_a_record_neither_committed_nor_spooled_is_an_error_not_a_hang(
    engine: Engine, tmp_path: Path
) -> None:
    ids = _stored(engine)
    blocked = tmp_path / "spool"
    blocked.write_text("a file where the spool folder should be")
    writer = audit_writer(engine, blocked)
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    if isinstance(writer, LoopAuditWriter):
        writer.conninfo = "postgresql://nobody@127.0.0.1:1/none"
    else:
        writer.engine = create_engine("sqlite:///" + str(tmp_path / "no" / "such" / "dir.db"))

    async def scenario() -> None:
        try:
            with pytest.raises(NotRecorded, match="spool"):
                await asyncio.wait_for(writer.write(_record(stamp, *ids, 0)), 30)
            # The writer lives on: the next record, with the database back, commits.
            if isinstance(writer, LoopAuditWriter):
                writer.conninfo = writer.engine.url.set(drivername="postgresql").render_as_string(
                    hide_password=False
                )
            else:
                writer.engine = engine
            assert await asyncio.wait_for(writer.write(_record(stamp, *ids, 1)), 30)
        finally:
            await writer.close()

    asyncio.run(scenario())


def test_a_failed_replay_after_a_commit_still_answers_the_batch_durable(
    engine: Engine, tmp_path: Path
) -> None:
    # Only a record that was to be spooled is lost when the spool fails; a batch that
    # committed stays durable when replaying older spooled records hits a disk error.
    ids = _stored(engine)
    writer = audit_writer(engine, tmp_path / "spool")
    stamp = writer.stamp(dt.datetime.now(dt.UTC))

    def broken_disk(*_: Any) -> Any:
        raise OSError("disk gone")

    async def broken_replay() -> None:
        broken_disk()

    if isinstance(writer, LoopAuditWriter):
        writer._spool_due = lambda: True  # type: ignore[method-assign]
        writer._replay = broken_replay  # type: ignore[method-assign]
    else:
        writer._spooled_files = lambda: [tmp_path / "x.jsonl"]  # type: ignore[method-assign]
        writer._replay = broken_disk  # type: ignore[method-assign]

    async def scenario() -> bool:
        try:
            return await asyncio.wait_for(writer.write(_record(stamp, *ids, 0)), 30)
        finally:
            await writer.close()

    assert asyncio.run(scenario()) is True
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM decisions")).scalar() == 1


def test_the_setting_and_the_writer_default_to_the_same_commit_lanes() -> None:
    """The setting's default cannot name the writer's constant (settings import nothing
    of the service), so they are held equal here."""
    from service.decision.audit import COMMIT_LANES
    from service.settings import Settings

    assert Settings.model_fields["audit_commit_lanes"].default == COMMIT_LANES
