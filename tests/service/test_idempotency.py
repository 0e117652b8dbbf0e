"""One final outcome per offer, idempotency keys scoped per API key, idempotent decisions.

Over HTTP on SQLite and PostgreSQL (the service fixtures of ``test_decisions_api``), plus
the migration of existing rows and the in-memory answer cache on its own.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from service.data import db
from service.decision import outcomes
from service.decision.idempotency import DecisionReplays
from service.errors import Conflict
from tests.service import test_decisions_api as api
from tests.service.test_decisions_api import Service, customers_with_offers

# The service fixtures of the decision API tests (a trained bank, a service per test).
trained = api.trained
make_service = api.make_service

FINALS = ("accepted", "declined", "not_now")


def _outcome(
    service: Service, offer_id: str, outcome: str, key: str = "teller", **headers: str
) -> Any:
    return service.client.post(
        f"/v1/offers/{offer_id}/outcome",
        json={"outcome": outcome},
        headers={**service.auth(key), **headers},
    )


def _offer(service: Service) -> dict[str, Any]:
    customer = customers_with_offers(service, 1)[0]
    offer: dict[str, Any] = service.decide(customer).json()["offers"][0]
    return offer


# --------------------------------------------------------------------------- outcomes


def test_an_offer_takes_one_final_outcome_and_presented_is_not_one(make_service: Any) -> None:
    service = make_service(frequency_cap=100)
    offer_id = _offer(service)["offer_id"]
    first = _outcome(service, offer_id, "accepted")
    assert first.status_code == 201, first.text
    for other in ("declined", "not_now"):
        clash = _outcome(service, offer_id, other)
        assert clash.status_code == 409, clash.text
        assert clash.headers["content-type"] == "application/problem+json"
        assert clash.json()["recorded_outcome"] == "accepted"
        assert "'accepted'" in clash.json()["detail"]
    again = _outcome(service, offer_id, "accepted")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["recorded_at"][:26] == first.json()["recorded_at"][:26]
    # Presented is a sighting, not an answer: recorded once, whenever it arrives.
    late = _outcome(service, offer_id, "presented")
    assert late.status_code == 201 and late.json()["duplicate"] is False
    assert _outcome(service, offer_id, "presented").json()["duplicate"] is True
    rows = service.sql(
        "SELECT outcome FROM offer_outcomes WHERE offer_id = :o ORDER BY id", o=offer_id
    )
    assert [r[0] for r in rows] == ["accepted", "presented"]


def test_the_database_refuses_a_second_final_outcome(make_service: Any) -> None:
    service = make_service(frequency_cap=100)
    offer_id = _offer(service)["offer_id"]
    engine = create_engine(service.url)
    insert = text("INSERT INTO offer_outcomes (offer_id, outcome, created_at) VALUES (:o, :k, :t)")
    now = dt.datetime.now(dt.UTC)
    try:
        with engine.begin() as conn:
            conn.execute(insert, {"o": offer_id, "k": "presented", "t": now})
            conn.execute(insert, {"o": offer_id, "k": "declined", "t": now})
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert, {"o": offer_id, "k": "accepted", "t": now})
    finally:
        engine.dispose()


def test_a_race_lost_at_the_unique_index_answers_409_not_500(
    make_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service(frequency_cap=100)
    offer_id = _offer(service)["offer_id"]
    # Another request's decline commits between this request's check and its insert:
    # the check is blinded once, so only the database stands in the way.
    assert _outcome(service, offer_id, "declined").status_code == 201
    real = outcomes._recorded_outcome
    calls: list[int] = []

    def blind_once(session: Any, ask: Any) -> Any:
        calls.append(1)
        return None if len(calls) == 1 else real(session, ask)

    monkeypatch.setattr(outcomes, "_recorded_outcome", blind_once)
    lost = _outcome(service, offer_id, "accepted")
    assert lost.status_code == 409, lost.text
    assert lost.json()["recorded_outcome"] == "declined" and len(calls) == 2
    held = service.sql(
        "SELECT count(*) FROM adoptions WHERE source = 'offer'",
    )
    assert held[0][0] == 0  # the losing acceptance left nothing behind


def test_concurrent_different_outcomes_exactly_one_wins(make_service: Any) -> None:
    service = make_service(frequency_cap=100)
    offer_id = _offer(service)["offer_id"]
    start = threading.Barrier(6)
    answers: list[Any] = []

    def send(outcome: str) -> None:
        start.wait()
        answers.append(_outcome(service, offer_id, outcome))

    threads = [threading.Thread(target=send, args=(o,)) for o in FINALS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codes = sorted(a.status_code for a in answers)
    assert len(codes) == 6 and codes.count(201) == 1, [a.text for a in answers]
    assert set(codes) <= {200, 201, 409}
    winner = next(a.json()["outcome"] for a in answers if a.status_code == 201)
    for answer in answers:
        if answer.status_code == 200:
            assert answer.json()["outcome"] == winner and answer.json()["duplicate"] is True
        elif answer.status_code == 409:
            assert answer.json()["recorded_outcome"] == winner
    rows = service.sql("SELECT outcome FROM offer_outcomes WHERE offer_id = :o", o=offer_id)
    assert [r[0] for r in rows] == [winner]


def test_idempotency_keys_belong_to_their_api_key(make_service: Any) -> None:
    service = make_service(frequency_cap=100)
    customers = customers_with_offers(service, 2)
    mine = service.decide(customers[0]).json()["offers"][0]["offer_id"]
    theirs = service.decide(customers[1]).json()["offers"][0]["offer_id"]
    shared = {"Idempotency-Key": "order-1"}
    assert _outcome(service, mine, "accepted", "teller", **shared).status_code == 201
    # Another caller's key of the same name is its own: no collision.
    other = _outcome(service, theirs, "declined", "admin", **shared)
    assert other.status_code == 201, other.text
    # Reusing one's own key for another request is 409, and says nothing of the other
    # caller's record.
    reused = _outcome(service, theirs, "declined", "teller", **shared)
    assert reused.status_code == 409
    assert mine not in reused.text and "'accepted' of another offer" in reused.json()["detail"]
    retry = _outcome(service, mine, "accepted", "teller", **shared)
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    stored = service.sql(
        "SELECT o.api_key_prefix FROM offer_outcomes o WHERE o.idempotency_key = 'order-1'"
    )
    assert sorted(r[0] for r in stored) == sorted(
        service.keys[k].split("_")[1] for k in ("teller", "admin")
    )

    def feedback(key: str, score: int) -> Any:
        return service.client.post(
            "/v1/feedback",
            json={"kind": "nps", "score": score, "customer_id": customers[0]},
            headers={**service.auth(key), "Idempotency-Key": "survey-1"},
        )

    assert feedback("teller", 9).status_code == 201
    assert feedback("admin", 3).status_code == 201  # not a 409 naming the teller's answer
    clash = feedback("teller", 2)
    assert clash.status_code == 409 and "of 9" in clash.json()["detail"]
    assert feedback("admin", 3).json()["duplicate"] is True


# --------------------------------------------------------------------------- decisions


def _decisions_total(service: Service) -> float:
    total = 0.0
    for line in service.client.get("/metrics", headers=service.auth("admin")).text.splitlines():
        if line.startswith("nbo_decisions_total{"):
            total += float(line.split()[-1])
    return total


def test_a_retried_decision_is_the_same_decision_counted_once(make_service: Any) -> None:
    service = make_service(frequency_cap=3)
    customer = customers_with_offers(service, 1)[0]  # offered once here
    before = service.sql(
        "SELECT count(*) FROM decisions WHERE customer_external_id = :c", c=customer
    )[0][0]
    counted = _decisions_total(service)
    headers = {**service.auth("teller"), "Idempotency-Key": "contact-77"}
    url = f"/v1/customers/{customer}/decisions"
    body = {"channel": "branch", "staff_id": "S1", "branch_id": "B1"}
    first = service.client.post(url, json=body, headers=headers)
    retry = service.client.post(url, json=body, headers=headers)
    assert first.status_code == retry.status_code == 200, retry.text
    assert retry.content == first.content
    offered = {o["product_code"] for o in first.json()["offers"]}
    assert offered
    assert _decisions_total(service) == counted + 1
    # The frequency cap (3 in the window) counted the keyed offers once: a new decision
    # may still offer them (counted twice, they would all be capped).
    after = service.decide(customer, key="admin").json()
    assert offered <= {o["product_code"] for o in after["offers"]}, after["suppressed"]
    recorded = service.sql(
        "SELECT count(*) FROM decisions WHERE customer_external_id = :c", c=customer
    )[0][0]
    assert recorded == before + 2  # the keyed decision once, then the new one

    # The same key for another customer or another body is refused; another API key's
    # key of the same name is its own.
    other = customers_with_offers(service, 2)[1]
    elsewhere = service.client.post(f"/v1/customers/{other}/decisions", json=body, headers=headers)
    assert elsewhere.status_code == 409 and customer not in elsewhere.text
    changed = service.client.post(url, json={**body, "max_offers": 1}, headers=headers)
    assert changed.status_code == 409 and "body" in changed.json()["detail"]
    theirs = service.client.post(
        url, json=body, headers={**service.auth("admin"), "Idempotency-Key": "contact-77"}
    )
    assert theirs.status_code == 200
    assert theirs.json()["decision_id"] != first.json()["decision_id"]
    too_long = service.client.post(
        url, json=body, headers={**service.auth("teller"), "Idempotency-Key": "k" * 129}
    )
    assert too_long.status_code == 422
    assert too_long.json()["errors"][0]["field"] == "header.idempotency-key"


def test_a_retry_on_another_worker_finds_the_recorded_decision(make_service: Any) -> None:
    first_worker = make_service(frequency_cap=2)
    customer = customers_with_offers(first_worker, 1)[0]
    headers = {**first_worker.auth("teller"), "Idempotency-Key": "contact-88"}
    url = f"/v1/customers/{customer}/decisions"
    body = {"channel": "branch", "staff_id": "S1", "branch_id": "B1", "explain": True}
    first = first_worker.client.post(url, json=body, headers=headers).json()
    second_worker = make_service(frequency_cap=2)
    retry = second_worker.client.post(url, json=body, headers=headers)
    assert retry.status_code == 200, retry.text
    again = retry.json()
    for field in ("decision_id", "customer_id", "model_version", "control", "cold_start"):
        assert again[field] == first[field], field
    assert again["offers"] == first["offers"]
    assert dt.datetime.fromisoformat(again["created_at"]) == dt.datetime.fromisoformat(
        first["created_at"]
    )
    recorded = second_worker.sql(
        "SELECT count(*) FROM decisions WHERE customer_external_id = :c", c=customer
    )
    assert recorded[0][0] >= 1
    assert second_worker.sql(
        "SELECT count(*) FROM decisions WHERE id = :d", d=first["decision_id"]
    ) == [(1,)]
    # Asked for another customer with the key, the other worker refuses too.
    other = customers_with_offers(second_worker, 2)[1]
    clash = second_worker.client.post(
        f"/v1/customers/{other}/decisions", json=body, headers=headers
    )
    assert clash.status_code == 409 and customer not in clash.text


# --------------------------------------------------------------------------- the cache


def test_kept_answers_are_bounded_and_expire() -> None:
    now = [0.0]
    replays = DecisionReplays(max_entries=2, ttl_seconds=10.0, clock=lambda: now[0])
    replays.put(("p", "a"), "C1", "body", b"A")
    replays.put(("p", "b"), "C1", "body", b"B")
    assert replays.get(("p", "a")) is not None  # now the most recent
    replays.put(("p", "c"), "C1", "body", b"C")
    assert replays.get(("p", "b")) is None and len(replays) == 2
    kept = replays.get(("p", "a"))
    assert kept is not None and kept.answer_for("a", "C1", "body") == b"A"
    with pytest.raises(Conflict, match="another customer"):
        kept.answer_for("a", "C2", "body")
    with pytest.raises(Conflict, match="different request body"):
        kept.answer_for("a", "C1", "other")
    assert replays.get(("q", "a")) is None  # another API key's key
    now[0] = 10.0
    assert replays.get(("p", "a")) is None and replays.get(("p", "c")) is None


# --------------------------------------------------------------------------- migration


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.sqlite3'}"
    url: str = request.getfixturevalue("empty_postgres_url")
    return url


def test_migration_keeps_the_first_final_outcome_and_unscopes_old_keys(empty_url: str) -> None:
    db.upgrade(empty_url, "0005")
    engine = create_engine(empty_url)
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO offers (id, decision_id, product_id, rank, propensity, "
                    "expected_value, score, created_at) VALUES "
                    "('o1', 'd1', 1, 1, 0.5, 1, 1, :t), ('o2', 'd1', 2, 2, 0.5, 1, 1, :t)"
                ),
                {"t": at},
            )
            for offer, outcome, key in (
                ("o1", "presented", None),
                ("o1", "declined", "k1"),
                ("o1", "accepted", "k2"),
                ("o1", "not_now", None),
                ("o2", "accepted", "k3"),
            ):
                conn.execute(
                    text(
                        "INSERT INTO offer_outcomes (offer_id, outcome, idempotency_key, "
                        "created_at) VALUES (:o, :k, :i, :t)"
                    ),
                    {"o": offer, "k": outcome, "i": key, "t": at},
                )
        db.upgrade(empty_url)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT offer_id, outcome, api_key_prefix, idempotency_key "
                    "FROM offer_outcomes ORDER BY id"
                )
            ).all()
        assert [tuple(r) for r in rows] == [
            ("o1", "presented", None, None),
            ("o1", "declined", None, "k1"),
            ("o2", "accepted", None, "k3"),
        ]
        db.downgrade(empty_url, "0005")
        db.upgrade(empty_url)
    finally:
        engine.dispose()
