"""The change log does not grow for good: each worker deletes the events it saw more
than an hour ago (offers are announced, so there are a few events per decision)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, text

from service.data.db import unit_of_work
from service.data.events import record_event
from service.decision import state as state_module
from service.decision.state import ServingState
from service.settings import Settings


def _events(engine: Engine, count: int) -> None:
    with unit_of_work(engine) as session:
        for n in range(count):
            record_event(session.connection(), kind="offer", origin="elsewhere", detail=str(n))


def _offer(engine: Engine, offer_id: str) -> None:
    """Another worker's offer of a card to C1, in its own transaction."""
    with unit_of_work(engine) as session:
        record_event(
            session.connection(),
            kind="offer",
            origin="worker-other",
            customer="C1",
            product="card",
            detail=offer_id,
        )


def _remaining(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [int(i) for i in conn.scalars(text("SELECT id FROM change_events ORDER BY id"))]


def test_events_seen_over_an_hour_ago_are_deleted_and_newer_ones_kept(engine: Engine) -> None:
    state = ServingState(engine, Settings())
    _events(engine, 5)
    state.last_event = max(_remaining(engine))  # as a poll leaves it
    old = state.last_event
    start = state._pruned_at
    assert state.prune_events(now=start + 1) == 0  # too soon to prune at all
    _events(engine, 3)
    state.last_event = max(_remaining(engine))
    # Ten minutes on: due to prune, but nothing was seen an hour ago yet.
    assert state.prune_events(now=start + 600) == 0
    assert len(_remaining(engine)) == 8
    hour = state_module.EVENT_RETENTION_SECONDS
    # An hour after the first events were seen, they go; the three seen later stay.
    # (A few seconds' margin: monotonic clock values are floats.)
    assert state.prune_events(now=start + 5 + hour) == 5
    assert all(i > old for i in _remaining(engine)) and len(_remaining(engine)) == 3
    # Pruning runs at most every PRUNE_EVERY_SECONDS.
    assert state.prune_events(now=start + 6 + hour) == 0
    later = start + 610 + hour + state_module.PRUNE_EVERY_SECONDS
    newest = state.last_event
    assert state.prune_events(now=later) == 2  # all seen an hour ago but the newest
    assert _remaining(engine) == [newest]


def test_a_log_pruned_to_its_last_event_never_hands_out_a_seen_id_again(
    engine: Engine, tmp_path: Path
) -> None:
    # SQLite gives a new row the largest id held plus one (1 in an empty table): had the
    # prune emptied the log, the next events would take ids every worker had seen, and
    # each poll (ids above the last seen) would skip them.
    settings = Settings(database_url=str(engine.url), data_dir=tmp_path, announce_offers="never")
    state = ServingState(engine, settings)
    for offer in ("o1", "o2", "o3"):
        _offer(engine, offer)
    assert state.poll() == 3
    start = state._pruned_at
    state.prune_events(now=start + 1)  # notes what was seen, and when
    hour = state_module.EVENT_RETENTION_SECONDS
    assert state.prune_events(now=start + 2 + hour + state_module.PRUNE_EVERY_SECONDS) == 2
    _offer(engine, "o4")  # another worker's offer, after a quiet hour
    assert state.poll() == 1
    assert set(state.history["C1"].offers) == {"o1", "o2", "o3", "o4"}
