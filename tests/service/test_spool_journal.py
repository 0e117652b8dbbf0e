"""The audit spool as a journal: damaged records are dead-lettered and hold back nothing,
appends never race a replay, files are private, and every caller gets an answer, also
while closing during an outage; on SQLite (thread writer) and PostgreSQL (loop writer)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import multiprocessing
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, create_engine, text

from service.data.db import unit_of_work
from service.data.tables import Customer, Product
from service.decision import spool as spool_module
from service.decision.audit import AuditRecord, AuditWriter, LoopAuditWriter, NotRecorded, new_id
from service.decision.spool import DEAD_LETTER_NAME, Journal, frame, parse
from service.metrics import AUDIT_DEAD_LETTERS

DOWN_URL = "postgresql+psycopg://nobody@127.0.0.1:1/none"

Writer = AuditWriter | LoopAuditWriter


# ---------------------------------------------------------------------- helpers


def _ids(engine: Engine) -> tuple[int, int]:
    with unit_of_work(engine) as session:
        product = Product(code="card", name="Card", category="cards", value=10.0)
        customer = Customer(external_id="C1", attributes={})
        session.add_all([product, customer])
        session.flush()
        return customer.id, product.id


def _record(stamp: str, customer: int, product: int) -> AuditRecord:
    decision_id = new_id()
    decision = [
        decision_id, customer, "C1", "branch", "S1", None, "{}", "v1", False, False, False,
        stamp, None, None,
    ]  # fmt: skip
    offer = (new_id(), decision_id, customer, product, 1, 0.25, 12.5, 12.5, "{}", stamp)
    return AuditRecord(decision, [offer], [("offer", "C1", "card", offer[0], "w", stamp)])


def _payload(record: AuditRecord) -> bytes:
    return orjson.dumps(
        {"decision": record.decision, "offers": record.offers, "events": record.events}
    )


def _legacy_line(record: AuditRecord) -> bytes:
    """A record as the previous version spooled it: one bare JSON object a line."""
    item = {"decision": record.decision, "offers": record.offers, "events": record.events}
    return (json.dumps(item) + "\n").encode()


def _writer(engine: Engine, spool: Path, **options: Any) -> Writer:
    if engine.dialect.name == "postgresql":
        return LoopAuditWriter(engine, spool, **options)
    return AuditWriter(engine, spool, **options)


def _take_down(writer: Writer, url: str = DOWN_URL, **connect: Any) -> None:
    if isinstance(writer, LoopAuditWriter):
        writer.conninfo = url.replace("+psycopg", "")
        writer.reconnect()
    else:
        writer.engine = create_engine(url, connect_args=connect)


def _bring_back(writer: Writer, engine: Engine) -> None:
    if isinstance(writer, LoopAuditWriter):
        writer.conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
    else:
        writer.engine.dispose()
        writer.engine = engine


def _stored_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM decisions")).scalars())


def _dead_letters(spool: Path) -> list[dict[str, Any]]:
    path = spool / DEAD_LETTER_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _waiting_spools(spool: Path) -> list[Path]:
    return [p for p in spool.glob("decisions-*.jsonl") if p.stat().st_size]


def _dead_lettered(reason: str) -> float:
    return float(AUDIT_DEAD_LETTERS.labels(reason)._value.get())


# ---------------------------------------------------------------------- the format


def test_frames_locate_damage_and_read_the_records_around_it() -> None:
    def item(n: int) -> bytes:
        return orjson.dumps({"decision": [f"d{n}"], "offers": [], "events": []})

    corrupt = bytearray(frame(item(3)))
    corrupt[-3] ^= 0x01  # one flipped bit in the JSON
    parts = [frame(item(1)), b'{"decision": ["d2"]}\n', bytes(corrupt), frame(item(4))]
    torn = frame(item(5))[:20]
    entries, damage = parse(b"".join(parts) + torn)
    assert [e.value["decision"][0] for e in entries] == ["d1", "d2", "d4"]
    offsets = [sum(map(len, parts[:i])) for i in range(len(parts) + 1)]
    assert [(d.reason, d.offset) for d in damage] == [
        ("bad_checksum", offsets[2]),
        ("torn_tail", offsets[4]),
    ]
    assert damage[1].raw == torn
    # The previous version appended after a torn line without ending it: the record
    # glued to the damage is still read, as is a framed one glued to garbage.
    glued = b'{"decision": ["d6"' + b'{"decision": ["d7"]}\n' + b"x9" + frame(item(8))
    entries, damage = parse(glued)
    assert [e.value["decision"][0] for e in entries] == ["d7", "d8"]
    assert [d.reason for d in damage] == ["bad_json", "bad_frame"]


# ---------------------------------------------------------------------- replay


def test_a_damaged_spool_left_by_a_previous_process_is_replayed_around_the_damage(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nbo.audit")
    ids = _ids(engine)
    spool = tmp_path / "spool"
    spool.mkdir()
    writer = _writer(engine, spool)
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    framed, legacy, corrupt, after, torn, fresh = (_record(stamp, *ids) for _ in range(6))
    bad = bytearray(frame(_payload(corrupt)))
    bad[bad.index(b"C1") + 1] = ord("2")  # the checksum no longer matches
    # A full disk or a crash cut the last record short; a stray binary file too.
    previous = (
        frame(_payload(framed))
        + _legacy_line(legacy)
        + bytes(bad)
        + frame(_payload(after))
        + frame(_payload(torn))[:70]
    )
    (spool / "decisions-1.jsonl").write_bytes(previous)
    (spool / "decisions-2.jsonl").write_bytes(b"\x00\xff\xfe not a record\n")
    before = {r: _dead_lettered(r) for r in ("bad_checksum", "torn_tail", "bad_frame")}

    async def scenario() -> bool:
        await writer.start()
        try:
            assert writer.healthy
            return await asyncio.wait_for(writer.write(fresh), 30)
        finally:
            await writer.close()

    assert asyncio.run(scenario()) is True
    expected = {r.decision[0] for r in (framed, legacy, after, fresh)}
    assert _stored_ids(engine) == expected
    letters = _dead_letters(spool)
    assert sorted((d["reason"], d["offset"]) for d in letters) == sorted(
        [
            ("bad_checksum", previous.index(bytes(bad))),
            ("torn_tail", len(previous) - 70),
            ("bad_frame", 0),
        ]
    )
    torn_letter = next(d for d in letters if d["reason"] == "torn_tail")
    assert torn_letter["raw"].encode() == frame(_payload(torn))[:70]
    assert "raw_base64" in next(d for d in letters if d["reason"] == "bad_frame")
    for reason, count in before.items():
        assert _dead_lettered(reason) == count + 1
    assert not _waiting_spools(spool)
    # Logged by file and offset, never by contents.
    moved = [r for r in caplog.records if "dead-letter" in r.getMessage()]
    assert {(r.file, r.offset) for r in moved} == {(d["file"], d["offset"]) for d in letters}  # type: ignore[attr-defined]
    logged = " ".join(str(vars(r)) for r in caplog.records)
    assert not any(r.decision[0] in logged for r in (corrupt, torn))


def test_decisions_spooled_after_a_torn_write_are_not_stranded(
    engine: Engine, tmp_path: Path
) -> None:
    # The reported failure: the database goes away, decisions are spooled (answered
    # degraded 200), a write is torn, more are spooled after it. Once the database is
    # back every one of them must reach it.
    ids = _ids(engine)
    spool = tmp_path / "spool"
    writer = _writer(engine, spool)
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    records = [_record(stamp, *ids) for _ in range(8)]
    torn = _record(stamp, *ids)

    async def scenario() -> list[bool]:
        await writer.start()
        try:
            _take_down(writer)
            answers = [await asyncio.wait_for(writer.write(r), 30) for r in records[:3]]
            live = next(iter(_waiting_spools(spool)))
            with live.open("ab") as handle:
                handle.write(frame(_payload(torn))[:90])
            answers += [await asyncio.wait_for(writer.write(r), 30) for r in records[3:7]]
            _bring_back(writer, engine)
            answers.append(await asyncio.wait_for(writer.write(records[7]), 30))
            return answers
        finally:
            await writer.close()

    assert asyncio.run(scenario()) == [False] * 7 + [True]
    assert _stored_ids(engine) == {r.decision[0] for r in records}
    assert [d["reason"] for d in _dead_letters(spool)] == ["bad_frame"]
    assert not _waiting_spools(spool)


def test_a_record_the_database_refuses_holds_back_no_other(engine: Engine, tmp_path: Path) -> None:
    ids = _ids(engine)
    spool = tmp_path / "spool"
    spool.mkdir()
    writer = _writer(engine, spool)
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    good = [_record(stamp, *ids) for _ in range(4)]
    refused = [_record(stamp, *ids) for _ in range(2)]
    for record in refused:
        record.decision[3] = None  # the channel is NOT NULL
    spooled = [good[0], refused[0], good[1]]
    (spool / "decisions-1.jsonl").write_bytes(b"".join(frame(_payload(r)) for r in spooled))
    before = _dead_lettered("rejected")

    async def scenario() -> list[Any]:
        await writer.start()
        try:
            live = [good[2], refused[1], good[3]]
            return await asyncio.wait_for(
                asyncio.gather(*(writer.write(r) for r in live), return_exceptions=True), 30
            )
        finally:
            await writer.close()

    answers = asyncio.run(scenario())
    assert answers[0] is True and answers[2] is True
    assert isinstance(answers[1], NotRecorded)
    assert _stored_ids(engine) == {r.decision[0] for r in good}
    letters = _dead_letters(spool)
    assert [(d["reason"], d["offset"]) for d in letters] == [
        ("rejected", len(frame(_payload(good[0]))))
    ]
    assert json.loads(letters[0]["raw"])["decision"][0] == refused[0].decision[0]
    assert _dead_lettered("rejected") == before + 1
    assert not _waiting_spools(spool)


# ---------------------------------------------------------------------- files


def test_spool_and_dead_letter_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # as an older version left it
    old = os.umask(0)
    try:
        journal = Journal(folder, "decisions-7.jsonl")
        journal.append([b'{"decision": []}'])
        journal.dead_letter("decisions-7.jsonl", 0, "bad_record", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("decisions-7.jsonl", DEAD_LETTER_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


def test_an_append_during_a_replay_goes_to_a_new_file_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    appender = Journal(folder, "decisions-5.jsonl")
    replayer = Journal(folder, "decisions-6.jsonl")
    appender.append([b'{"n": 1}'])
    claims = replayer.claims()
    claim = next(claims)  # claimed: read, and held while its records are committed
    assert [e.value for e in claim.entries] == [{"n": 1}]
    started = time.monotonic()
    appender.append([b'{"n": 2}'])  # must neither wait for the replay nor be lost by it
    assert time.monotonic() - started < 1.0
    replayer.finish(claim)
    claims.close()
    assert [e.value for c in replayer.claims() for e in c.entries] == [{"n": 2}]


def _append_many(folder: str, first: int, count: int) -> None:
    # A slow appender (in this child process only): the time between opening the file
    # and locking it is where a replayer may claim it.
    real = spool_module._try_lock

    def slow_lock(fd: int) -> bool:
        time.sleep(0.0005)
        return real(fd)

    spool_module._try_lock = slow_lock  # type: ignore[assignment]
    journal = Journal(Path(folder), f"decisions-{os.getpid()}.jsonl")
    for n in range(first, first + count, 2):
        journal.append([orjson.dumps({"n": n}), orjson.dumps({"n": n + 1})])


def test_appends_racing_replays_lose_nothing(tmp_path: Path) -> None:
    # Two processes append while two replayers (other open files, as in other workers)
    # claim, read and delete the spool files as fast as they can.
    folder = tmp_path / "spool"
    folder.mkdir()
    per_process = 300
    context = multiprocessing.get_context("fork")
    appenders = [
        context.Process(target=_append_many, args=(str(folder), k * per_process, per_process))
        for k in range(2)
    ]
    seen: list[int] = []
    lock = threading.Lock()
    appending = threading.Event()  # not Process.is_alive: only one thread may reap them
    appending.set()

    def replay_once(journal: Journal) -> None:
        for claim in journal.claims():
            with lock:
                seen.extend(entry.value["n"] for entry in claim.entries)
            journal.finish(claim)

    def replayer() -> None:
        journal = Journal(folder, "decisions-0.jsonl")
        while appending.is_set():
            replay_once(journal)

    for process in appenders:
        process.start()
    threads = [threading.Thread(target=replayer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for process in appenders:
        process.join(60)
    appending.clear()
    for thread in threads:
        thread.join(60)
    assert [p.exitcode for p in appenders] == [0, 0]
    replay_once(Journal(folder, "decisions-0.jsonl"))
    assert sorted(seen) == list(range(2 * per_process))
    assert not (folder / DEAD_LETTER_NAME).exists()


# ---------------------------------------------------------------------- answers


def test_every_caller_is_answered_when_a_flush_fails_and_the_writer_lives_on(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _ids(engine)
    writer = _writer(engine, tmp_path / "spool")
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    real = writer._answers
    calls = iter([True])

    def fails_once(*args: Any) -> Any:
        if next(calls, False):
            raise RuntimeError("a bug in the flush")
        return real(*args)

    monkeypatch.setattr(writer, "_answers", fails_once)

    async def scenario() -> bool:
        await writer.start()
        try:
            with pytest.raises(NotRecorded):
                await asyncio.wait_for(writer.write(_record(stamp, *ids)), 30)
            assert writer.healthy
            return await asyncio.wait_for(writer.write(_record(stamp, *ids)), 30)
        finally:
            await writer.close()
            assert not writer.healthy

    assert asyncio.run(scenario()) is True


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that takes connections and never answers (a hung database)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener.getsockname()[1]
    listener.close()


def test_close_during_an_outage_is_bounded_and_spools_what_it_holds(
    engine: Engine, tmp_path: Path, silent_server: int
) -> None:
    ids = _ids(engine)
    spool = tmp_path / "spool"
    writer = _writer(engine, spool, close_seconds=1.0, stall_seconds=0.3)
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    records = [_record(stamp, *ids) for _ in range(20)]
    _take_down(
        writer, f"postgresql+psycopg://nobody@127.0.0.1:{silent_server}/none", connect_timeout=20
    )

    async def scenario() -> tuple[list[Any], float]:
        await writer.start()
        assert writer.healthy
        calls = [asyncio.create_task(writer.write(r)) for r in records]
        await asyncio.sleep(0.6)  # the commit hangs on the silent server
        assert not writer.healthy  # a stalled commit: readiness must say so
        started = time.monotonic()
        await writer.close()
        elapsed = time.monotonic() - started
        answers = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        return answers, elapsed

    answers, elapsed = asyncio.run(scenario())
    assert answers == [False] * len(records)
    assert elapsed < 4.0
    spooled = [parse(p.read_bytes())[0] for p in _waiting_spools(spool)]
    assert {e.value["decision"][0] for entries in spooled for e in entries} == {
        r.decision[0] for r in records
    }
    for path in _waiting_spools(spool):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700


def test_close_with_the_database_refusing_connections_spools_and_stops(
    engine: Engine, tmp_path: Path
) -> None:
    ids = _ids(engine)
    spool = tmp_path / "spool"
    writer = _writer(engine, spool, close_seconds=2.0)
    stamp = writer.stamp(dt.datetime.now(dt.UTC))
    records = [_record(stamp, *ids) for _ in range(10)]
    _take_down(writer)

    async def scenario() -> tuple[list[Any], float]:
        calls = [asyncio.create_task(writer.write(r)) for r in records]
        await asyncio.sleep(0)
        started = time.monotonic()
        await writer.close()
        elapsed = time.monotonic() - started
        with pytest.raises(NotRecorded, match="closed"):
            await writer.write(records[0])
        return await asyncio.wait_for(asyncio.gather(*calls), 5), elapsed

    answers, elapsed = asyncio.run(scenario())
    assert answers == [False] * len(records)
    assert elapsed < 5.0
    spooled = [e for p in _waiting_spools(spool) for e in parse(p.read_bytes())[0]]
    assert sorted(e.value["decision"][0] for e in spooled) == sorted(r.decision[0] for r in records)


def test_a_dead_letter_put_back_as_a_line_is_replayed(tmp_path: Path) -> None:
    # The recovery the README describes: a dead letter's "raw" JSON, mended, saved as a
    # line of a decisions-*.jsonl file in the spool folder, is read like any record.
    folder = tmp_path / "spool"
    journal = Journal(folder, "decisions-3.jsonl")
    journal.dead_letter("decisions-9.jsonl", 0, "rejected", b'{"decision": ["d1"]}')
    raw = _dead_letters(folder)[0]["raw"]
    (folder / "decisions-recovered.jsonl").write_text(raw + "\n")
    claims = list(journal.claims())
    assert [(c.path.name, [e.value for e in c.entries]) for c in claims] == [
        ("decisions-recovered.jsonl", [{"decision": ["d1"]}])
    ]
