"""The serving state's change-log poll: other workers' changes, none missed."""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text

from service.decision.state import MAX_GAPS, ServingState
from service.settings import Settings

AT = dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)


def _event(engine: Engine, event_id: int, offer: str, origin: str = "worker-other") -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO change_events (id, kind, customer_external_id, product_code, "
                "detail, origin, occurred_at) VALUES (:id, 'offer', 'C1', 'card', :offer, "
                ":origin, :at)"
            ),
            {"id": event_id, "offer": offer, "origin": origin, "at": AT},
        )


def test_an_event_committed_late_is_not_missed(engine: Engine, tmp_path: Path) -> None:
    # Event ids are chosen here, so this worker must write none of its own (heartbeats).
    settings = Settings(database_url=str(engine.url), data_dir=tmp_path, announce_offers="never")
    state = ServingState(engine, settings)
    _event(engine, 1, "o1")
    assert state.poll() == 1
    # Event 3 commits before event 2 (two transactions in flight): 2 is a gap ...
    _event(engine, 3, "o3")
    _event(engine, 4, "o4", origin=state.origin)  # this worker's own: not applied again
    assert state.poll() == 1
    assert state.last_event == 4 and set(state._gaps) == {2}
    # ... looked for again until it appears.
    assert state.poll() == 0
    _event(engine, 2, "o2")
    assert state.poll() == 1
    assert not state._gaps
    assert set(state.history["C1"].offers) == {"o1", "o2", "o3"}
    assert state.poll() == 0


class _CountingDict(OrderedDict[int, float]):
    """The poll's ordered dict of gaps, counting the keys set in it."""

    sets = 0

    def __setitem__(self, key: int, value: float) -> None:
        self.sets += 1
        super().__setitem__(key, value)


def test_a_first_event_far_above_the_last_makes_at_most_max_gaps(
    engine: Engine, tmp_path: Path
) -> None:
    # A worker that loaded while the log was empty (pruned, or emptied by hand) has seen
    # no event, and the first it sees may have an id in the millions (its sequence went
    # on). Every id below it was made a gap, and all but MAX_GAPS then dropped one at a
    # time from the front of the dict: at 3.5M ids that held the interpreter for
    # minutes while decisions crawled at a tenth of their rate.
    settings = Settings(database_url=str(engine.url), data_dir=tmp_path, announce_offers="never")
    state = ServingState(engine, settings)
    assert state.poll() == 0 and state.last_event == 0
    counting = state._gaps = _CountingDict()
    far = 3 * MAX_GAPS + 5
    _event(engine, far, "far")
    assert state.poll() == 1
    assert counting.sets == MAX_GAPS
    assert sorted(state._gaps) == list(range(far - MAX_GAPS, far))
    # An event committed late below it is still found; the oldest gaps go first.
    _event(engine, far - 1, "late")
    assert state.poll() == 1
    assert far - 1 not in state._gaps and len(state._gaps) == MAX_GAPS - 1
    _event(engine, far + 3, "next")  # two more gaps: the oldest one goes
    assert state.poll() == 1
    assert len(state._gaps) == MAX_GAPS and min(state._gaps) == far - MAX_GAPS + 1
    assert set(state.history["C1"].offers) == {"far", "late", "next"}


def _plans_of_change_log_reads(engine: Engine, poll: Callable[[], int]) -> list[str]:
    """The query plans of the change-log reads ``poll`` makes, as the database gives them
    (PostgreSQL: ``EXPLAIN ANALYZE``; SQLite: ``EXPLAIN QUERY PLAN``)."""
    reads: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM change_events" in statement:
            reads.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        poll()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert reads, "the poll read no change events"
    explain = "EXPLAIN ANALYZE " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    plans = []
    with engine.connect() as conn:
        for statement, parameters in reads:
            rows = conn.exec_driver_sql(explain + statement, parameters).all()
            plans.append("\n".join(str(row[-1]) for row in rows))
    return plans


def test_a_poll_reads_only_the_new_events_however_long_the_log(
    engine: Engine, tmp_path: Path
) -> None:
    settings = Settings(database_url=str(engine.url), data_dir=tmp_path, announce_offers="never")
    state = ServingState(engine, settings)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO change_events (id, kind, customer_external_id, product_code, "
                "detail, origin, occurred_at) VALUES (:id, 'offer', 'C1', 'card', :offer, "
                "'worker-other', :at)"
            ),
            [{"id": n, "offer": f"o{n}", "at": AT} for n in range(1, 3001)],
        )
        conn.execute(text("ANALYZE change_events"))
    state.last_event = 3000  # every event seen, no gaps: the usual poll
    _event(engine, 3001, "new")
    plans = _plans_of_change_log_reads(engine, state.poll)
    assert set(state.history["C1"].offers) == {"new"}
    for plan in plans:
        # The log is read by its key from the last event seen on, not tested row by row.
        if engine.dialect.name == "postgresql":
            assert "Index Cond: (id > " in plan and "Rows Removed by Filter" not in plan, plan
        else:
            assert "SEARCH change_events USING INTEGER PRIMARY KEY (rowid>?)" in plan, plan
    # With a gap to look for, both reads are by the key too.
    state._gaps[1500] = time.monotonic()
    _event(engine, 3002, "newer")
    for plan in _plans_of_change_log_reads(engine, state.poll):
        if engine.dialect.name == "postgresql":
            assert "Rows Removed by Filter" not in plan and "Seq Scan" not in plan, plan
        else:
            assert "SCAN change_events" not in plan.replace("SCAN change_events USING", ""), plan
