"""The decision API end to end over HTTP, on SQLite and PostgreSQL.

A small synthetic bank is trained once per module (the bundle is registered into each
test's fresh database), then every test drives the service as a teller system would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from models.artifacts import save_bundle
from models.data import BankData
from models.eligibility import Catalogue, check_eligibility
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service.app import _publish_figures as publish_figures
from service.app import create_app
from service.data import registry
from service.data.db import make_engine, unit_of_work
from service.decision import lane
from service.settings import Settings
from tests.bank import load_trained_bank, register_bundle
from tests.uvicorn_thread import uvicorn_thread

AS_OF = dt.date(2026, 1, 1)


@dataclass(frozen=True)
class Trained:
    bank: Path
    bundle: Path
    bundle_b: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    write_bank(generate_bank(1_500, seed=5), root / "bank")
    data = BankData.from_folder(root / "bank")
    config = TrainConfig(max_rounds=60)
    save_bundle(train(data, as_of=AS_OF, config=config), root / "bundle", metrics={"map@3": 0.3})
    other = TrainConfig(max_rounds=30, seed=1)
    save_bundle(train(data, as_of=AS_OF, config=other), root / "bundle_b", metrics={"map@3": 0.3})
    return Trained(root / "bank", root / "bundle", root / "bundle_b")


@dataclass
class Service:
    client: TestClient
    url: str
    keys: dict[str, str]
    settings: Settings

    def decide(self, customer: str, key: str = "teller", **body: Any) -> Any:
        return self.client.post(
            f"/v1/customers/{customer}/decisions",
            json={"channel": "branch", "staff_id": "S1", "branch_id": "B1", **body},
            headers=self.auth(key),
        )

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def sql(self, query: str, **params: Any) -> list[Any]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(query), params).all())
        finally:
            engine.dispose()


KEYS = {
    "teller": ["decisions", "outcomes"],
    "admin": ["admin"],
    "data": ["data"],
    "analyst": ["models", "rules", "catalogue"],
    "analyst_decider": ["decisions", "models", "reports"],
}


def prepare(url: str, trained: Trained, data_dir: Path, *, bundle: bool = True) -> dict[str, str]:
    return load_trained_bank(
        url, trained.bank, trained.bundle if bundle else None, data_dir, keys=KEYS
    )


@pytest.fixture
def make_service(database_url: str, trained: Trained, tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient] = []
    keys = prepare(database_url, trained, tmp_path)

    def start(**overrides: Any) -> Service:
        defaults: dict[str, Any] = {
            "control_share": 0.0,
            "min_propensity": 0.0,
            "poll_interval_seconds": 60.0,
        }
        settings = Settings(
            database_url=database_url, data_dir=tmp_path, **{**defaults, **overrides}
        )
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return Service(client, database_url, keys, settings)

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def customers_with_offers(service: Service, n: int = 5) -> list[str]:
    found = []
    for i in range(1, 400):
        cid = f"C{i:07d}"
        if service.decide(cid).json()["offers"]:
            found.append(cid)
        if len(found) == n:
            return found
    raise AssertionError("no customer with offers")


def test_ranked_offers_with_reasons_are_recorded_before_the_answer(
    make_service: Any, trained: Trained
) -> None:
    service = make_service()
    response = service.decide("C0000042", max_offers=4, explain=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "v1" and body["control"] is False
    assert body["degraded"] is False and body["cold_start"] is False
    offers = body["offers"]
    assert 1 <= len(offers) <= 4
    assert [o["rank"] for o in offers] == list(range(1, len(offers) + 1))
    scores = [o["score"] for o in offers]
    assert scores == sorted(scores, reverse=True)
    data = BankData.from_folder(trained.bank)
    catalogue = Catalogue.from_data(data)
    state = next(s for s in _states(data) if s.customer_id == "C0000042")
    eligibility = check_eligibility(state, catalogue, AS_OF)
    for offer in offers:
        assert offer["product_code"] in eligibility.eligible, offer
        assert offer["talking_point"]
        reasons = offer["reasons"]
        assert reasons["rule"] is None or isinstance(reasons["rule"], str)
        assert 0 < len(reasons["factors"]) <= 3
        k = catalogue.index[offer["product_code"]]
        expected = offer["propensity"] * catalogue.values[k] * catalogue.business_weights[k]
        assert offer["score"] == pytest.approx(expected, rel=1e-4)
    rows = service.sql(
        "SELECT channel, staff_id, model_version FROM decisions WHERE id = :id",
        id=body["decision_id"],
    )
    assert rows == [("branch", "S1", "v1")]
    stored = service.sql(
        "SELECT count(*) FROM offers WHERE decision_id = :id", id=body["decision_id"]
    )
    assert stored[0][0] == len(offers)
    # Without factors: still the rule sentence, no SHAP.
    lean = service.decide("C0000042").json()
    assert all(o["reasons"]["factors"] == [] for o in lean["offers"])


def _states(data: BankData) -> list[Any]:
    from service.decision.state import customer_states

    return list(customer_states(data).values())


def test_policies_decline_cooldown_frequency_cap_minimum_and_cap(make_service: Any) -> None:
    service = make_service(frequency_cap=1, max_offers_per_contact=2)
    customer = customers_with_offers(service, 1)[0]
    # Per-contact cap: at most 2 whatever is asked.
    service2 = make_service(max_offers_per_contact=2)
    assert len(service2.decide(customer, max_offers=10).json()["offers"]) <= 2

    first = service.decide(customer, key="admin").json()
    offered = {o["product_code"] for o in first["offers"]}
    assert offered
    # Frequency cap 1: the same products are not offered again in the window.
    again = service.decide(customer, key="admin").json()
    assert offered.isdisjoint(o["product_code"] for o in again["offers"])
    assert all(again["suppressed"][code] == "frequency_cap" for code in offered)
    # Asked until the cap holds back everything worth offering: the note says so.
    for _ in range(10):
        answer = service.decide(customer).json()
        if not answer["offers"]:
            break
    assert answer["offers"] == [] and answer["note"].startswith("contact policy"), answer

    # A decline keeps the product away for the cooldown (frequency cap relaxed).
    relaxed = make_service(frequency_cap=100)
    body = relaxed.decide(customer).json()
    top = body["offers"][0]
    declined = relaxed.client.post(
        f"/v1/offers/{top['offer_id']}/outcome",
        json={"outcome": "declined", "reason": "not interested"},
        headers=relaxed.auth("teller"),
    )
    assert declined.status_code == 201, declined.text
    after = relaxed.decide(customer, key="admin").json()
    assert top["product_code"] not in {o["product_code"] for o in after["offers"]}
    assert after["suppressed"][top["product_code"]] == "declined_recently"

    # Nothing good enough: an empty answer, said plainly.
    picky = make_service(min_propensity=0.999)
    empty = picky.decide(customer)
    assert empty.status_code == 200
    assert empty.json()["offers"] == [] and "likely enough" in empty.json()["note"]


def test_inactive_product_is_not_offered_and_catalogue_admin(make_service: Any) -> None:
    service = make_service()
    customer = customers_with_offers(service, 1)[0]
    top = service.decide(customer).json()["offers"][0]["product_code"]
    product = service.client.get(f"/v1/products/{top}", headers=service.auth("analyst"))
    assert product.status_code == 200
    body = product.json()
    body.pop("product_code")
    body["active"] = False
    put = service.client.put(f"/v1/products/{top}", json=body, headers=service.auth("analyst"))
    assert put.status_code == 200, put.text
    after = service.decide(customer).json()
    assert top not in {o["product_code"] for o in after["offers"]}
    bad = service.client.put(
        f"/v1/products/{top}",
        json={**body, "requires": ["no_such_product"]},
        headers=service.auth("analyst"),
    )
    assert bad.status_code == 422 and "no_such_product" in bad.json()["detail"]
    assert (
        service.client.get("/v1/products/nope", headers=service.auth("analyst")).status_code == 404
    )


def test_control_group_gets_no_offers_and_is_flagged(make_service: Any) -> None:
    service = make_service(control_share=1.0)
    body = service.decide("C0000042").json()
    assert body["control"] is True and body["offers"] == []
    rows = service.sql("SELECT control FROM decisions WHERE id = :id", id=body["decision_id"])
    assert bool(rows[0][0]) is True
    from service.decision.policy import in_control_group

    share = sum(in_control_group(f"C{i}", share=0.05, salt="s") for i in range(20_000)) / 20_000
    assert 0.04 < share < 0.06
    assert in_control_group("C1", share=0.05, salt="s") == in_control_group(
        "C1", share=0.05, salt="s"
    )


def test_outcomes_are_idempotent_and_acceptance_updates_holdings(make_service: Any) -> None:
    service = make_service(frequency_cap=100)
    customer = customers_with_offers(service, 1)[0]
    offer = service.decide(customer).json()["offers"][0]
    url = f"/v1/offers/{offer['offer_id']}/outcome"
    headers = {**service.auth("teller"), "Idempotency-Key": "k-1"}
    first = service.client.post(url, json={"outcome": "accepted"}, headers=headers)
    retry = service.client.post(url, json={"outcome": "accepted"}, headers=headers)
    same = service.client.post(url, json={"outcome": "accepted"}, headers=service.auth("teller"))
    assert (first.status_code, retry.status_code, same.status_code) == (201, 200, 200)
    assert retry.json()["duplicate"] is True and same.json()["duplicate"] is True
    clash = service.client.post(url, json={"outcome": "declined"}, headers=headers)
    assert clash.status_code == 409
    assert clash.headers["content-type"] == "application/problem+json"
    count = service.sql(
        "SELECT count(*) FROM offer_outcomes WHERE offer_id = :o", o=offer["offer_id"]
    )
    assert count[0][0] == 1
    held = service.sql(
        "SELECT a.source FROM adoptions a JOIN customers c ON c.id = a.customer_id "
        "JOIN products p ON p.id = a.product_id WHERE c.external_id = :c AND p.code = :p",
        c=customer,
        p=offer["product_code"],
    )
    assert ("offer",) in held
    after = service.decide(customer).json()
    assert offer["product_code"] not in {o["product_code"] for o in after["offers"]}
    missing = service.client.post(
        "/v1/offers/nope/outcome", json={"outcome": "accepted"}, headers=service.auth("teller")
    )
    assert missing.status_code == 404
    wrong = service.client.post(url, json={"outcome": "maybe"}, headers=service.auth("teller"))
    assert wrong.status_code == 422 and "body.outcome" in wrong.json()["detail"]


def test_pushed_adoption_and_customer_change_apply_at_once(make_service: Any) -> None:
    service = make_service(frequency_cap=100)
    customer = customers_with_offers(service, 1)[0]
    top = service.decide(customer).json()["offers"][0]["product_code"]
    pushed = service.client.post(
        "/v1/adoptions",
        json={
            "adoptions": [
                {"customer_id": customer, "product_code": top, "adopted_at": "2025-12-30"}
            ]
        },
        headers=service.auth("data"),
    )
    assert pushed.status_code == 200, pushed.text
    assert pushed.json() == {"received": 1, "added": 1, "updated": 0}
    assert top not in {o["product_code"] for o in service.decide(customer).json()["offers"]}
    unknown = service.client.post(
        "/v1/adoptions",
        json={"adoptions": [{"customer_id": customer, "product_code": "nope"}]},
        headers=service.auth("data"),
    )
    assert unknown.status_code == 422 and "adoptions.0.product_code" in unknown.json()["detail"]

    # A new customer pushed through the API can be decided on at once.
    created = service.client.put(
        "/v1/customers/NEW1",
        json={
            "segment": "mass",
            "birth_date": "1990-01-01",
            "joined_at": "2025-06-01",
            "attributes": {"income": 40000, "region": "north"},
        },
        headers=service.auth("data"),
    )
    assert created.status_code == 201, created.text
    service.client.post(
        "/v1/adoptions",
        json={
            "adoptions": [
                {
                    "customer_id": "NEW1",
                    "product_code": "current_account",
                    "adopted_at": "2025-06-01",
                }
            ]
        },
        headers=service.auth("data"),
    )
    decided = service.decide("NEW1", key="admin").json()
    assert "current_account" not in {o["product_code"] for o in decided["offers"]}
    assert decided["suppressed"]["current_account"] == "held_or_ineligible"
    bad = service.client.put(
        "/v1/customers/NEW1", json={"attributes": {"income": "lots"}}, headers=service.auth("data")
    )
    assert bad.status_code == 422 and "attributes.income" in bad.json()["detail"]


def test_other_workers_follow_through_the_change_log(make_service: Any) -> None:
    worker_a = make_service(frequency_cap=1, workers=2)
    worker_b = make_service(frequency_cap=1, workers=2)
    customer = customers_with_offers(worker_b, 1)[0]
    offered = {o["product_code"] for o in worker_a.decide(customer).json()["offers"]}
    worker_b.client.app.state.serving.poll()
    again = worker_b.decide(customer).json()["offers"]
    assert offered.isdisjoint(o["product_code"] for o in again)


def test_a_version_activated_offline_reaches_running_workers(
    make_service: Any, trained: Trained, tmp_path: Path
) -> None:
    """``nbo train``'s gate, ``nbo models promote`` and ``rollback`` run outside the
    service: their activation must reach running workers at the next change poll."""
    service = make_service()
    serving = service.client.app.state.serving
    assert service.decide("C0000001").json()["model_version"] == "v1"
    engine = make_engine(service.url)
    try:
        with unit_of_work(engine) as session:  # registered, then promoted by hand
            register_bundle(session, trained.bundle_b, tmp_path, version="v2", map3=0.1)
            registry.activate(session, registry.get_version(session, "v2"))
        assert serving.poll() >= 1
        assert service.decide("C0000001").json()["model_version"] == "v2"
        with unit_of_work(engine) as session:
            registry.rollback(session)
        serving.poll()
        assert service.decide("C0000001").json()["model_version"] == "v1"
    finally:
        engine.dispose()


def test_unknown_customer_404_or_cold_start(make_service: Any) -> None:
    service = make_service()
    missing = service.decide("NOBODY")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert "NOBODY" in missing.json()["detail"]
    cold = make_service(cold_start=True).decide("NOBODY").json()
    assert cold["cold_start"] is True
    assert cold["offers"], cold
    for offer in cold["offers"]:
        assert offer["product_code"] not in {"credit_card", "mortgage", "home_insurance"}


def test_degraded_without_a_bundle(make_service: Any, tmp_path: Path, database_url: str) -> None:
    # The bundle is gone from both places a worker could load it: this machine's cache,
    # and the database that holds every registered bundle.
    shutil.rmtree(tmp_path / "models" / "v1")
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM model_files WHERE version = 'v1'"))
    finally:
        engine.dispose()
    service = make_service()
    body = service.decide("C0000042").json()
    assert body["degraded"] is True and body["model_version"] is None
    held = {
        code
        for (code,) in service.sql(
            "SELECT p.code FROM adoptions a JOIN customers c ON c.id = a.customer_id "
            "JOIN products p ON p.id = a.product_id WHERE c.external_id = 'C0000042' "
            "AND a.closed_at IS NULL"
        )
    }
    assert held.isdisjoint(o["product_code"] for o in body["offers"])
    # The active version exists but this worker could not load it: not ready.
    ready = service.client.get("/health/ready", headers=service.auth("admin"))
    assert ready.status_code == 503 and "model" in ready.json()["detail"]


def test_degraded_when_the_database_goes_away_and_nothing_is_lost(
    make_service: Any, tmp_path: Path
) -> None:
    service = make_service()
    audit = service.client.app.state.audit
    on_loop = hasattr(audit, "conninfo")  # PostgreSQL: the writer has its own connection
    real = audit.conninfo if on_loop else audit.engine
    if on_loop:
        audit.conninfo = "postgresql://nobody@127.0.0.1:1/none"
        audit.reconnect()
    else:
        audit.engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        response = service.decide("C0000042")
        assert response.status_code == 200
        body = response.json()
        assert body["degraded"] is True
        assert (
            service.sql("SELECT count(*) FROM decisions WHERE id = :i", i=body["decision_id"])[0][0]
            == 0
        )
    finally:
        if on_loop:
            audit.conninfo = real
        else:
            audit.engine.dispose()
            audit.engine = real
    # The next commit replays the spool: the degraded decision is in the audit trail.
    service.decide("C0000043")
    rows = service.sql("SELECT degraded FROM decisions WHERE id = :i", i=body["decision_id"])
    assert rows and bool(rows[0][0]) is True
    offers = service.sql(
        "SELECT count(*) FROM offers WHERE decision_id = :i", i=body["decision_id"]
    )
    assert offers[0][0] == len(body["offers"])


def test_activation_under_load_fails_no_request(
    make_service: Any, trained: Trained, tmp_path: Path
) -> None:
    service = make_service()
    engine = make_engine(service.url)
    with unit_of_work(engine) as session:
        row = register_bundle(session, trained.bundle_b, tmp_path, version="v2", map3=0.1)
        assert row.status == "rejected"
    engine.dispose()
    failures: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            r = service.decide(f"C{(i % 300) + 1:07d}")
            if r.status_code != 200:
                failures.append(r.text)
            else:
                versions.add(r.json()["model_version"])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        activated = service.client.post("/v1/models/v2/activate", headers=service.auth("analyst"))
        after = service.decide("C0000042").json()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert activated.status_code == 200, activated.text
    assert activated.json() == {"version": "v2", "previous": "v1", "serving": "v2"}
    assert failures == []
    assert after["model_version"] == "v2"
    assert "v1" in versions
    listed = service.client.get("/v1/models", headers=service.auth("analyst")).json()
    assert {v["version"]: v["status"] for v in listed} == {"v1": "retired", "v2": "active"}
    assert (
        service.client.post("/v1/models/zzz/activate", headers=service.auth("analyst")).status_code
        == 404
    )


def test_an_activation_whose_store_cannot_be_built_changes_nothing(
    make_service: Any, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new version's serving store is built before the version becomes active: when
    the build fails the answer is a 503 and the old version stays active and serving."""
    from service.decision import state as serving_state

    service = make_service()
    engine = make_engine(service.url)
    with unit_of_work(engine) as session:
        register_bundle(session, trained.bundle_b, tmp_path, version="v2", map3=0.1)
    engine.dispose()
    built: list[str | None] = []

    def broken(engine: Any, settings: Any, model: Any, version: str | None, folder: Path) -> None:
        built.append(version)
        raise OSError("disk full")

    monkeypatch.setattr(serving_state, "_build_store", broken)
    failed = service.client.post("/v1/models/v2/activate", headers=service.auth("analyst"))
    assert failed.status_code == 503, failed.text
    assert failed.headers["content-type"] == "application/problem+json"
    assert "could not be built" in failed.json()["detail"]
    assert "retry-after" in failed.headers
    assert built == ["v2"]
    listed = service.client.get("/v1/models", headers=service.auth("analyst")).json()
    assert {v["version"]: v["status"] for v in listed}["v1"] == "active"
    assert service.decide("C0000042").json()["model_version"] == "v1"
    monkeypatch.undo()
    activated = service.client.post("/v1/models/v2/activate", headers=service.auth("analyst"))
    assert activated.status_code == 200, activated.text
    assert service.decide("C0000042").json()["model_version"] == "v2"


def test_keys_scopes_and_problem_details(make_service: Any) -> None:
    service = make_service()
    url = "/v1/customers/C0000042/decisions"
    none = service.client.post(url, json={"channel": "branch"})
    assert none.status_code == 401
    assert none.headers["content-type"] == "application/problem+json"
    assert "www-authenticate" in none.headers
    wrong = service.client.post(url, json={"channel": "branch"}, headers={"X-API-Key": "nbo_x_y"})
    assert wrong.status_code == 401
    forbidden = service.client.post(url, json={"channel": "branch"}, headers=service.auth("data"))
    assert forbidden.status_code == 403 and "decisions" in forbidden.json()["detail"]
    assert service.client.get("/v1/models", headers=service.auth("teller")).status_code == 403
    invalid = service.decide("C0000042", max_offers=11)
    assert invalid.status_code == 422
    assert "body.max_offers" in invalid.json()["detail"]
    channel = service.decide("C0000042", channel="fax")
    assert channel.status_code == 422 and "body.channel" in channel.json()["detail"]
    # The served route validates as its documented twin would, field named.
    extra = service.decide("C0000042", colour="red")
    assert extra.status_code == 422 and extra.json()["errors"][0]["field"] == "body.colour"
    broken = service.client.post(url, content=b"{not json", headers=service.auth("teller"))
    assert broken.status_code == 422 and broken.json()["errors"][0]["field"].startswith("body")
    assert broken.headers["content-type"] == "application/problem+json"
    long_id = service.decide("C" * 129)
    assert long_id.status_code == 422
    assert long_id.json()["errors"][0]["field"] == "path.customer_id"
    huge = service.client.post(
        url,
        content=b" " * 70_000,
        headers={**service.auth("teller"), "content-type": "application/json"},
    )
    assert huge.status_code == 413 and huge.json()["status"] == 413
    # A caller without a key learns nothing about the body: 401 before validation.
    assert service.client.post(url, json={"channel": "fax"}).status_code == 401


def test_a_nul_character_is_refused_by_field_and_poisons_no_commit(make_service: Any) -> None:
    # PostgreSQL text holds no NUL: one in a decision's row would fail the whole group
    # commit it shared with other callers' decisions, so it is refused up front.
    service = make_service()
    staff = service.decide("C0000042", staff_id="S\x001")
    assert staff.status_code == 422 and staff.json()["errors"][0]["field"] == "body.staff_id"
    assert "NUL" in staff.json()["detail"]
    context = service.decide("C0000042", context={"reason": "a\x00b"})
    assert context.status_code == 422
    assert context.json()["errors"][0]["field"].startswith("body.context")
    path = service.decide("C%00042")
    assert path.status_code == 422 and path.json()["errors"][0]["field"] == "path.customer_id"
    outcome = service.client.post(
        "/v1/offers/x/outcome",
        json={"outcome": "declined", "reason": "\x00"},
        headers=service.auth("teller"),
    )
    assert outcome.status_code == 422 and outcome.json()["errors"][0]["field"] == "body.reason"
    fine = service.decide("C0000042")
    assert fine.status_code == 200 and fine.json()["degraded"] is False
    assert service.sql("SELECT count(*) FROM decisions")[0][0] == 1


def test_offer_ids_are_derived_from_their_decision_and_unique(make_service: Any) -> None:
    service = make_service()
    body = service.decide("C0000042", max_offers=5).json()
    ids = [o["offer_id"] for o in body["offers"]]
    assert len(ids) >= 2 and len(set(ids)) == len(ids)
    for offer_id in ids:
        assert offer_id[:35] == body["decision_id"][:35] and offer_id != body["decision_id"]
        assert uuid.UUID(offer_id).version == 7
    stored = service.sql(
        "SELECT id FROM offers WHERE decision_id = :d ORDER BY rank", d=body["decision_id"]
    )
    assert [r[0] for r in stored] == ids


def _http_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` HTTP/1.1 answers with a content-length off ``sock``."""
    answers: list[tuple[int, dict[str, str], bytes]] = []
    buffer = b""
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(answers)} answers"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        size = int(headers["content-length"])
        while len(buffer) < size:
            buffer += sock.recv(65536)
        answers.append((int(status_line.split()[1]), headers, buffer[:size]))
        buffer = buffer[size:]
    assert buffer == b""
    return answers


@pytest.mark.parametrize("access_log", [False, True], ids=["one-write", "asgi-messages"])
def test_decisions_over_real_uvicorn_keep_alive_pipelining_and_close(
    database_url: str,
    trained: Trained,
    tmp_path: Path,
    access_log: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The app writes a decision's answer to uvicorn's socket in one write (bypassing
    # its two ASGI messages) unless an access log asks for uvicorn's own path: both
    # must put the same valid HTTP/1.1 on the wire.
    keys = prepare(database_url, trained, tmp_path)
    settings = Settings(database_url=database_url, data_dir=tmp_path, control_share=0.0)
    body = b'{"channel": "branch", "staff_id": "S1", "max_offers": 2}'

    def request(customer: str, *extra: str) -> bytes:
        lines = [
            f"POST /v1/customers/{customer}/decisions HTTP/1.1",
            "Host: nbo",
            f"Authorization: Bearer {keys['teller']}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *extra,
        ]
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + body

    app = create_app(settings)
    sent_whole: list[bool] = []
    send_whole = lane._send_whole

    async def spy(send: Any, content: bytes) -> bool:
        sent_whole.append(await send_whole(send, content))
        return sent_whole[-1]

    monkeypatch.setattr(lane, "_send_whole", spy)
    with (
        uvicorn_thread(app, lifespan="on", access_log=access_log) as address,
        socket.create_connection(address, timeout=10) as sock,
    ):
        # Keep-alive: one after another on one connection, then two pipelined at once,
        # then a failure (the problem path) and a success again.
        for customer in ("C0000042", "C0000043"):
            sock.sendall(request(customer))
            [(status, headers, content)] = _http_answers(sock, 1)
            assert status == 200, content
            assert headers["content-type"] == "application/json"
            assert "date" in headers and "connection" not in headers
            assert orjson.loads(content)["customer_id"] == customer
        sock.sendall(request("C0000044") + request("C0000045"))
        pipelined = _http_answers(sock, 2)
        assert [orjson.loads(c)["customer_id"] for _, _, c in pipelined] == [
            "C0000044",
            "C0000045",
        ]
        sock.sendall(request("C0000046").replace(b'"branch"', b'"fax!!!"'))
        [(status, headers, _)] = _http_answers(sock, 1)
        assert status == 422 and headers["content-type"] == "application/problem+json"
        sock.sendall(request("C0000047", "Connection: close"))
        [(status, headers, content)] = _http_answers(sock, 1)
        assert status == 200 and headers["connection"] == "close"
        assert orjson.loads(content)["customer_id"] == "C0000047"
        assert sock.recv(1) == b""  # and the server closed it
    assert sent_whole == [not access_log] * 5  # the 422 is not a decision's answer
    engine = create_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM decisions")).scalar() == 5
    engine.dispose()


def test_rules_endpoint_and_metrics(make_service: Any) -> None:
    service = make_service()
    rules = service.client.get(
        "/v1/rules", params={"min_lift": 1.2, "limit": 5}, headers=service.auth("analyst")
    )
    assert rules.status_code == 200
    body = rules.json()
    assert body["model_version"] == "v1" and len(body["rules"]) <= 5
    assert all(r["lift"] >= 1.2 and r["sentence"] for r in body["rules"])
    service.decide("C0000042")
    exposition = service.client.get("/metrics", headers=service.auth("admin")).text
    assert 'nbo_decisions_total{channel="branch"' in exposition
    assert 'route="/v1/customers/{customer_id}/decisions"' in exposition
    assert "C0000042" not in exposition
    assert "nbo_decision_stage_seconds" in exposition


def test_a_failed_customer_read_answers_degraded_not_500(make_service: Any) -> None:
    """A customer not held in memory is read from the database; if that read fails, the
    answer is an empty, flagged one (never a held product, never a 5xx)."""
    service = make_service()
    serving = service.client.app.state.serving
    real = serving.engine
    serving.engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        response = service.decide("NOT-LOADED-YET")
    finally:
        serving.engine.dispose()
        serving.engine = real
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True and body["offers"] == []
    assert "unavailable" in body["note"]
    recorded = service.sql("SELECT degraded FROM decisions WHERE id = :i", i=body["decision_id"])
    assert recorded and bool(recorded[0][0]) is True


def test_feedback_is_validated_tied_to_the_contact_and_idempotent(make_service: Any) -> None:
    # B3 is no customer's branch: named, or its NPS gauge would be pooled under "other".
    service = make_service(known_branches=["B3"])
    customer = customers_with_offers(service, 1)[0]
    decision = service.decide(customer, staff_id="S7", branch_id="B3").json()

    def send(key: str = "teller", headers: dict[str, str] | None = None, **body: Any) -> Any:
        return service.client.post(
            "/v1/feedback", json=body, headers={**service.auth(key), **(headers or {})}
        )

    csat_out_of_range = send(kind="csat", score=7, customer_id=customer)
    assert csat_out_of_range.status_code == 422
    assert csat_out_of_range.json()["errors"][0]["field"] == "body.score"
    assert send(kind="nps", score=11, customer_id=customer).status_code == 422
    unknown = send(kind="nps", score=9, decision_id="no-such-decision")
    assert unknown.status_code == 422 and "decision_id" in unknown.json()["detail"]
    assert send(kind="nps", score=9).json()["errors"][0]["field"] == "body.decision_id"
    stranger = send(kind="nps", score=9, customer_id="C9999999")
    assert stranger.status_code == 422 and "C9999999" in stranger.json()["detail"]
    assert send("data", kind="nps", score=9, customer_id=customer).status_code == 403

    received = _counter(service, 'nbo_feedback_total{kind="nps"}')
    retry = {"Idempotency-Key": "fb-1"}
    first = send(headers=retry, kind="nps", score=9, decision_id=decision["decision_id"])
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["category"] == "promoter" and body["customer_id"] == customer
    assert (body["staff_id"], body["branch_id"]) == ("S7", "B3")  # taken from the decision
    again = send(headers=retry, kind="nps", score=9, decision_id=decision["decision_id"])
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["feedback_id"] == body["feedback_id"]
    clash = send(headers=retry, kind="nps", score=2, decision_id=decision["decision_id"])
    assert clash.status_code == 409
    csat = send(kind="csat", score=3, customer_id=customer, comment="ok")
    assert csat.status_code == 201 and csat.json()["category"] == "neutral"
    rows = service.sql("SELECT kind, score, staff_id FROM feedback ORDER BY id")
    assert [tuple(r) for r in rows] == [("nps", 9, "S7"), ("csat", 3, None)]
    assert _counter(service, 'nbo_feedback_total{kind="nps"}') == received + 1
    # The rolling business figures reach Prometheus as gauges.
    offer = decision["offers"][0]
    accepted = service.client.post(
        f"/v1/offers/{offer['offer_id']}/outcome",
        json={"outcome": "accepted"},
        headers=service.auth("teller"),
    )
    assert accepted.status_code == 201
    asyncio.run(publish_figures(service.client.app.state.serving))
    code = offer["product_code"]
    assert _sample(service, "nbo_conversion_ratio", product=code, channel="branch") == 1.0
    assert _sample(service, "nbo_nps_score", branch="B3") == 100.0


def _sample(service: Service, name: str, **labels: str) -> float | None:
    """A sample's value whatever the order of its labels (multiprocess mode sorts them)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in service.client.get("/metrics", headers=service.auth("admin")).text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and set(head[len(name) + 1 : -1].split(",")) == wanted:
            return float(value)
    return None


def _counter(service: Service, sample: str) -> float:
    for line in service.client.get("/metrics", headers=service.auth("admin")).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_detractor_after_an_offer_suppresses_offers_and_says_why(make_service: Any) -> None:
    worker = make_service(detractor_suppress_days=30, workers=2)
    other = make_service(detractor_suppress_days=30, workers=2)
    unhappy, spoken_to = customers_with_offers(worker, 2)
    decision = worker.decide(unhappy).json()
    # A detractor answer without an offered contact (here: about the customer only) is
    # recorded but suppresses nothing; after an offer it does.
    loose = worker.client.post(
        "/v1/feedback",
        json={"kind": "nps", "score": 2, "customer_id": spoken_to},
        headers=worker.auth("teller"),
    )
    assert loose.status_code == 201 and loose.json()["offers_suppressed_until"] is None
    assert worker.decide(spoken_to).json()["offers"]
    answer = worker.client.post(
        "/v1/feedback",
        json={"kind": "nps", "score": 3, "decision_id": decision["decision_id"]},
        headers=worker.auth("analyst"),
    )
    assert answer.status_code == 403  # analysts read, teller systems record
    answer = worker.client.post(
        "/v1/feedback",
        json={"kind": "nps", "score": 3, "decision_id": decision["decision_id"]},
        headers=worker.auth("teller"),
    )
    assert answer.status_code == 201 and answer.json()["category"] == "detractor"
    assert answer.json()["offers_suppressed_until"] is None  # not the teller's to see

    teller_view = worker.decide(unhappy).json()
    assert teller_view["offers"] == [] and teller_view["suppressed"] is None
    assert teller_view["note"] == "contact policy: no offers to this customer at the moment"
    analyst_view = worker.decide(unhappy, key="analyst_decider").json()
    assert analyst_view["offers"] == []
    assert "detractor" in analyst_view["note"]
    assert set(analyst_view["suppressed"].values()) == {"detractor"}
    # Another worker hears of it through the change log; a restarted one from the table.
    other.client.app.state.serving.poll()
    assert other.decide(unhappy).json()["offers"] == []
    restarted = make_service(detractor_suppress_days=30)
    assert restarted.decide(unhappy).json()["offers"] == []
    # The guardrail lapses after the configured days.
    state = worker.client.app.state.serving
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    state.clock = lambda: later
    assert worker.decide(unhappy).json()["offers"]


def test_a_restarted_worker_reads_the_offers_of_the_window(make_service: Any) -> None:
    """A worker started after offers were made reads them (streamed from the offers
    table) into its contact history: the frequency cap holds across a restart."""
    service = make_service(frequency_cap=1, max_offers_per_contact=2)
    customers = customers_with_offers(service, 3)
    offered = {
        c: {o["product_code"] for o in service.decide(c).json()["offers"]} for c in customers
    }
    restarted = make_service(frequency_cap=1, max_offers_per_contact=2)
    for customer, codes in offered.items():
        assert codes
        answer = restarted.decide(customer, key="admin").json()
        assert codes.isdisjoint(o["product_code"] for o in answer["offers"]), answer
        assert all(answer["suppressed"][code] == "frequency_cap" for code in codes)
