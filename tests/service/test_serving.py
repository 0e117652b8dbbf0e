"""The serving state's change-log poll: other workers' changes, none missed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Engine, text

from service.decision.state import ServingState
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
