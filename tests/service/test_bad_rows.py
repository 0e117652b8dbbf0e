"""Every reader survives a bad stored row, and no stored name reaches SQL text.

Rows are stored directly in the database (bypassing the API and the importer, as
rows written before their validation existed would be); then the batch load
(training, scoring, the serving snapshot), the one-customer read and the reports must
skip or repair the row, count it, and serve everyone else as before.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine, text

from models.artifacts import save_bundle
from models.data import BankData, CustomerState, to_ns
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service.app import create_app
from service.auth import create_key
from service.data import registry
from service.data.bank import load_bank
from service.data.db import make_engine, unit_of_work
from service.decision import state as serving
from service.decision.state import ServingState, read_customers
from service.reports import measures as reports
from service.settings import Settings
from tests.bank import load_trained_bank, register_bundle

AS_OF = dt.date(2026, 1, 1)
VICTIM = "C0000007"
"""The customer (or the product below) a bad row is stored on."""
OTHERS = ["C0000001", "C0000002", "C0000003", "C0000010", "C0000020"]
INJECTION = "a'||(SELECT pg_sleep(2))::text||'"
TINY = TrainConfig(n_cutoffs=2, max_rounds=20, rules=False, num_threads=1)


@dataclass(frozen=True)
class Trained:
    bank: Path
    bundle: Path
    customers: int


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("bad_rows")
    write_bank(generate_bank(400, seed=11), root / "bank")
    data = BankData.from_folder(root / "bank")
    save_bundle(train(data, as_of=AS_OF, config=TINY), root / "bundle", metrics={"map@3": 0.3})
    return Trained(root / "bank", root / "bundle", len(data.customers))


def prepare(engine: Engine, trained: Trained, data_dir: Path) -> None:
    load_trained_bank(engine, trained.bank, trained.bundle, data_dir)


@pytest.fixture
def bank(engine: Engine, trained: Trained, tmp_path: Path) -> Engine:
    prepare(engine, trained, tmp_path)
    return engine


def settings_for(engine: Engine, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        data_dir=tmp_path,
        min_propensity=0.0,
        control_share=0.0,
        **overrides,
    )


def skipped(reader: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "nbo_rows_skipped_total", {"reader": reader, "reason": reason}
    )
    return value or 0.0


def run(engine: Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def attributes_of(engine: Engine, customer: str) -> dict[str, Any]:
    with engine.connect() as conn:
        raw = conn.execute(
            text("SELECT CAST(attributes AS TEXT) FROM customers WHERE external_id = :c"),
            {"c": customer},
        ).scalar_one()
    return dict(json.loads(raw))


def set_attributes(engine: Engine, customer: str, raw: str) -> None:
    """Store ``raw`` as the customer's attributes text, as it is (JSONB on PostgreSQL)."""
    cast = "CAST(:raw AS JSONB)" if engine.dialect.name == "postgresql" else ":raw"
    run(
        engine,
        f"UPDATE customers SET attributes = {cast} WHERE external_id = :c",
        raw=raw,
        c=customer,
    )


def drop_check(engine: Engine, table: str, constraint: str) -> None:
    """Let a row the schema forbids in be stored, as an older schema or a hand edit could."""
    if engine.dialect.name == "postgresql":
        run(engine, f"ALTER TABLE {table} DROP CONSTRAINT {constraint}")


def without_checks(engine: Engine, sql: str, **params: Any) -> None:
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
            conn.execute(text(sql), params)
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")
    else:
        run(engine, sql, **params)


# --------------------------------------------------------------------------- bad rows


def _joined_1542(engine: Engine) -> None:
    run(engine, "UPDATE customers SET joined_at = '1542-08-08' WHERE external_id = :c", c=VICTIM)


def _joined_9999(engine: Engine) -> None:
    run(engine, "UPDATE customers SET joined_at = '9999-12-31' WHERE external_id = :c", c=VICTIM)


def _born_1600(engine: Engine) -> None:
    run(engine, "UPDATE customers SET birth_date = '1600-01-01' WHERE external_id = :c", c=VICTIM)


def _adopted_year_1(engine: Engine) -> None:
    run(
        engine,
        "UPDATE adoptions SET adopted_at = '0001-01-01' WHERE id = (SELECT min(a.id) "
        "FROM adoptions a JOIN customers c ON c.id = a.customer_id WHERE c.external_id = :c)",
        c=VICTIM,
    )


def _closed_before_adopted(engine: Engine) -> None:
    drop_check(engine, "adoptions", "ck_adoptions_closed_after")
    without_checks(
        engine,
        "UPDATE adoptions SET adopted_at = '2024-06-01', closed_at = '2020-01-01' WHERE id = "
        "(SELECT min(a.id) FROM adoptions a JOIN customers c ON c.id = a.customer_id "
        "WHERE c.external_id = :c)",
        c=VICTIM,
    )


def _text_in_numeric(engine: Engine) -> None:
    attributes = attributes_of(engine, VICTIM)
    set_attributes(engine, VICTIM, json.dumps({**attributes, "income": "lots"}))


def _huge_in_numeric(engine: Engine) -> None:
    attributes = attributes_of(engine, VICTIM)
    set_attributes(engine, VICTIM, json.dumps({**attributes, "income": 1e308}))


def _infinity_in_numeric(engine: Engine) -> None:
    attributes = attributes_of(engine, VICTIM)
    if engine.dialect.name == "postgresql":  # JSONB has no Infinity: stored as text
        set_attributes(engine, VICTIM, json.dumps({**attributes, "income": "Infinity"}))
    else:  # json.dumps writes it bare, and SQLite keeps any text
        set_attributes(engine, VICTIM, json.dumps({**attributes, "income": math.inf}))


def _nan_in_numeric(engine: Engine) -> None:
    attributes = attributes_of(engine, VICTIM)
    value: Any = "NaN" if engine.dialect.name == "postgresql" else math.nan
    set_attributes(engine, VICTIM, json.dumps({**attributes, "income": value}))


def _not_json(engine: Engine) -> None:
    if engine.dialect.name == "postgresql":
        pytest.skip("JSONB holds only JSON")
    run(engine, "UPDATE customers SET attributes = '{income: 3' WHERE external_id = :c", c=VICTIM)


def _product_value_infinite(engine: Engine) -> None:
    run(engine, "UPDATE products SET value = :v WHERE code = :p", v=math.inf, p=_product(engine))


def _product_value_nan(engine: Engine) -> None:
    # SQLite stores a bound NaN as NULL (refused here): the text is what an older
    # writer could leave.
    value: Any = math.nan if engine.dialect.name == "postgresql" else "NaN"
    drop_check(engine, "products", "ck_products_value_not_negative")
    without_checks(
        engine, "UPDATE products SET value = :v WHERE code = :p", v=value, p=_product(engine)
    )


def _product_weight_huge(engine: Engine) -> None:
    run(
        engine,
        "UPDATE products SET business_weight = :v WHERE code = :p",
        v=1e308,
        p=_product(engine),
    )


def _product(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT min(code) FROM products")).scalar_one())


BAD_ROWS: dict[str, tuple[Callable[[Engine], None], str]] = {
    "joined_at 1542-08-08": (_joined_1542, "date_out_of_range"),
    "joined_at 9999-12-31": (_joined_9999, "date_out_of_range"),
    "birth_date 1600-01-01": (_born_1600, "date_out_of_range"),
    "adoption dated 0001-01-01": (_adopted_year_1, "date_out_of_range"),
    "closed before adopted": (_closed_before_adopted, "closed_before_adopted"),
    "text in a numeric attribute": (_text_in_numeric, "bad_attribute_value"),
    "1e308 in a numeric attribute": (_huge_in_numeric, "bad_attribute_value"),
    "Infinity in a numeric attribute": (_infinity_in_numeric, "bad_attribute_value"),
    "NaN in a numeric attribute": (_nan_in_numeric, "bad_attribute_value"),
    "attributes not JSON": (_not_json, "bad_attributes"),
    "product value Infinity": (_product_value_infinite, "bad_number"),
    "product value NaN": (_product_value_nan, "bad_number"),
    "product weight 1e308": (_product_weight_huge, "bad_number"),
}


def offered(snapshot: serving.Snapshot, customer: str) -> bool:
    """Whether the snapshot holds model propensities for the customer (offers to make)."""
    entry = snapshot.customers[customer]
    return bool(np.isfinite(entry.propensity).any())


def comparable(state: CustomerState) -> tuple[Any, ...]:
    """A customer as read, with dates as instants (the batch holds Timestamps)."""
    return (
        state.customer_id,
        to_ns(state.joined_at),
        to_ns(state.birth_date),
        dict(state.attributes),
        sorted((a.product_code, to_ns(a.adopted_at), to_ns(a.closed_at)) for a in state.adoptions),
    )


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_stored_row_is_skipped_counted_and_everyone_else_served(
    bank: Engine, tmp_path: Path, trained: Trained, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    poison, reason = BAD_ROWS[kind]
    poison(bank)
    before = {r: skipped(r, reason) for r in ("training", "snapshot", "customer")}

    with caplog.at_level(logging.WARNING, logger="nbo.rows"):
        data = load_bank(bank)
    assert len(data.customers) == trained.customers
    assert skipped("training", reason) > before["training"]
    logged = [r for r in caplog.records if r.name == "nbo.rows"]
    assert logged and all(getattr(r, "reason", None) for r in logged)

    state = ServingState(bank, settings_for(bank, tmp_path))
    snapshot = state.load()
    assert state.snapshot is snapshot and state.load_error is None
    assert snapshot.version == "v1" and not snapshot.degraded
    assert skipped("snapshot", reason) > before["snapshot"]
    assert all(offered(snapshot, customer) for customer in OTHERS)
    assert VICTIM in snapshot.customers

    # The one-customer read (a refresh after a change) cleans the row the same way.
    fresh = read_customers(bank, snapshot, [VICTIM, *OTHERS])
    assert set(fresh) == {VICTIM, *OTHERS}
    for customer in OTHERS:
        # The serving store keeps propensities as float32: the same value, so rounded.
        np.testing.assert_array_equal(
            fresh[customer].propensity.astype(np.float32),
            snapshot.customers[customer].propensity,
        )
    if kind.startswith(("joined", "birth", "text", "1e308", "Inf", "NaN", "attributes")):
        assert skipped("customer", reason) > before["customer"]
        assert comparable(fresh[VICTIM].state) == comparable(snapshot.customers[VICTIM].state)


def test_a_quarantined_product_is_kept_but_never_offered(bank: Engine, tmp_path: Path) -> None:
    _product_value_infinite(bank)
    code = _product(bank)
    snapshot = ServingState(bank, settings_for(bank, tmp_path)).load()
    j = snapshot.catalogue.index[code]
    assert not snapshot.catalogue.active[j]
    assert np.isfinite(snapshot.catalogue.values).all()
    assert np.isfinite(snapshot.catalogue.business_weights).all()


# --------------------------------------------------------------------------- names


def _hostile_names(engine: Engine) -> list[str]:
    longest = 200 if engine.dialect.name == "sqlite" else 128  # VARCHAR(128) there
    return [INJECTION, 'say "hi"', "n" * longest]


def test_attribute_names_never_reach_sql(bank: Engine, tmp_path: Path) -> None:
    names = _hostile_names(bank)
    for name in names:
        run(
            bank,
            "INSERT INTO attribute_definitions (name, kind) VALUES (:n, 'numeric')",
            n=name,
        )
    for i, customer in enumerate([VICTIM, *OTHERS]):
        attributes = attributes_of(bank, customer)
        set_attributes(bank, customer, json.dumps({**attributes, **{n: i for n in names}}))
    if bank.dialect.name == "postgresql":
        # Where the name reaches SQL, pg_sleep(2) runs once per customer row: fail
        # fast instead of hanging (this test's own database, new connections).
        run(bank, f'ALTER DATABASE "{bank.url.database}" SET statement_timeout = 5000')
        bank.dispose()
    started = time.perf_counter()
    data = load_bank(bank)
    assert time.perf_counter() - started < 3.0
    assert set(names) <= set(data.attribute_kinds)
    row = data.customers.set_index("customer_id").loc[OTHERS[1]]
    assert all(row[name] == 2.0 for name in names)

    started = time.perf_counter()
    snapshot = ServingState(bank, settings_for(bank, tmp_path)).load()
    assert time.perf_counter() - started < 10.0
    assert all(offered(snapshot, customer) for customer in OTHERS)
    assert snapshot.customers[OTHERS[1]].state.attributes[INJECTION] == 2.0
    fresh = read_customers(bank, snapshot, [OTHERS[1]])
    assert fresh[OTHERS[1]].state.attributes[names[1]] == 2.0


def test_thousands_of_attribute_definitions_load(bank: Engine, tmp_path: Path) -> None:
    many = [f"extra_{i:04d}" for i in range(3_000)]  # past PostgreSQL's 1,600 columns
    with bank.begin() as conn:
        conn.execute(
            text("INSERT INTO attribute_definitions (name, kind) VALUES (:n, :k)"),
            [{"n": n, "k": "numeric" if i % 2 else "categorical"} for i, n in enumerate(many)],
        )
    attributes = attributes_of(bank, VICTIM)
    set_attributes(bank, VICTIM, json.dumps({**attributes, many[1]: 5, many[2]: "x"}))
    started = time.perf_counter()
    data = load_bank(bank)
    assert time.perf_counter() - started < 30.0
    assert set(many) <= set(data.attribute_kinds)
    row = data.customers.set_index("customer_id").loc[VICTIM]
    assert row[many[1]] == 5.0 and row[many[2]] == "x"
    snapshot = ServingState(bank, settings_for(bank, tmp_path)).load()
    assert all(offered(snapshot, customer) for customer in OTHERS)


# --------------------------------------------------------------------------- reloads


def test_a_failed_reload_keeps_the_previous_snapshot_and_is_retried(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ServingState(bank, settings_for(bank, tmp_path))
    first = state.load()
    failures = (
        REGISTRY.get_sample_value("nbo_snapshot_reload_failures_total", {"what": "snapshot"}) or 0.0
    )

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(serving, "build_snapshot", broken)
    assert state.load() is first  # no exception: the caller's write stands
    assert state.snapshot is first
    assert state.load_error is not None and "RuntimeError" in state.load_error
    assert (
        REGISTRY.get_sample_value("nbo_snapshot_reload_failures_total", {"what": "snapshot"})
        == failures + 1
    )
    assert state._retry_at is not None

    monkeypatch.undo()
    state._retry_at = 0.0  # due now
    state.poll()
    assert state.snapshot is not first and state.load_error is None
    assert state._retry_at is None


def test_a_worker_that_never_loaded_gets_an_empty_snapshot(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(serving, "build_snapshot", broken)
    state = ServingState(bank, settings_for(bank, tmp_path))
    snapshot = state.load()
    assert state.snapshot is None and snapshot.degraded and not snapshot.customers
    assert state.load_error is not None


def test_an_unloadable_active_model_is_a_load_error(bank: Engine, tmp_path: Path) -> None:
    with unit_of_work(bank) as session:
        row = registry.active_version(session)
        assert row is not None
        # The stored bundle is the authority (a damaged local copy is fetched again).
        session.execute(
            text("UPDATE model_files SET content = :c WHERE version = :v AND name = :n"),
            {"c": b"{}", "v": row.version, "n": "manifest.json"},
        )
    state = ServingState(bank, settings_for(bank, tmp_path / "replica"))
    snapshot = state.load()
    assert snapshot.degraded and state.load_error is not None and "v1" in state.load_error
    assert "the bundle was changed" in state.load_error


def test_a_failed_customer_refresh_never_raises_and_is_retried(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ServingState(bank, settings_for(bank, tmp_path))
    snapshot = state.load()
    old = snapshot.customers[VICTIM]
    assert VICTIM not in snapshot.customers.overlay  # served from the store

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(serving, "read_customers", broken)
    state.refresh_customers([VICTIM])  # no exception
    assert VICTIM not in snapshot.customers.overlay  # still the store's entry
    assert snapshot.customers[VICTIM].db_id == old.db_id
    assert set(state._stale) == {VICTIM}

    monkeypatch.undo()
    state.poll()  # no change events: the stale customer is re-read anyway
    assert snapshot.customers.overlay[VICTIM] is snapshot.customers[VICTIM]
    assert not state._stale


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def service(
    database_url: str, trained: Trained, tmp_path: Path
) -> Iterator[tuple[TestClient, dict[str, str], Engine]]:
    engine = make_engine(database_url)
    prepare(engine, trained, tmp_path)
    with unit_of_work(engine) as session:
        register_bundle(session, trained.bundle, tmp_path, version="v2")
        keys = {
            "models": create_key(session, name="analyst", scopes=["models", "catalogue"]),
            "teller": create_key(session, name="teller", scopes=["decisions"]),
            "data": create_key(session, name="feed", scopes=["data"]),
        }
    settings = settings_for(engine, tmp_path, poll_interval_seconds=60.0)
    with TestClient(create_app(settings)) as client:
        yield client, keys, engine
    engine.dispose()


def test_activation_after_a_poisoned_customer_answers_200_and_serves(
    service: tuple[TestClient, dict[str, str], Engine],
) -> None:
    client, keys, engine = service
    _joined_1542(engine)
    _adopted_year_1(engine)
    _text_in_numeric(engine)
    response = client.post(
        "/v1/models/v1/activate", headers={"Authorization": f"Bearer {keys['models']}"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["serving"] == "v1"
    for customer in OTHERS:
        answer = client.post(
            f"/v1/customers/{customer}/decisions",
            json={"channel": "branch", "staff_id": "S1", "branch_id": "B1"},
            headers={"Authorization": f"Bearer {keys['teller']}"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["degraded"] is False
    victim = client.post(
        f"/v1/customers/{VICTIM}/decisions",
        json={"channel": "branch", "staff_id": "S1", "branch_id": "B1"},
        headers={"Authorization": f"Bearer {keys['teller']}"},
    )
    assert victim.status_code == 200 and victim.json()["degraded"] is False


def test_a_write_whose_refresh_fails_still_answers_the_write(
    service: tuple[TestClient, dict[str, str], Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, keys, engine = service

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database went away")

    monkeypatch.setattr(serving, "read_customers", broken)
    response = client.put(
        f"/v1/customers/{VICTIM}",
        json={"segment": "mass"},
        headers={"Authorization": f"Bearer {keys['data']}"},
    )
    assert response.status_code in (200, 201), response.text


# --------------------------------------------------------------------------- reports


def test_uplift_survives_bad_adoption_dates_and_product_values(
    bank: Engine, tmp_path: Path
) -> None:
    # A contacted customer with an adoption dated year 1 and one closed in 9999, and a
    # product worth Infinity.
    with bank.connect() as conn:
        customer_id = conn.execute(
            text("SELECT id FROM customers WHERE external_id = :c"), {"c": VICTIM}
        ).scalar_one()
    run(
        bank,
        "INSERT INTO decisions (id, customer_id, customer_external_id, channel, created_at, "
        "control, degraded, cold_start) VALUES ('d1', :c, :e, 'branch', :at, false, false, false)",
        c=customer_id,
        e=VICTIM,
        at=dt.datetime(2026, 5, 4, 10, tzinfo=dt.UTC),
    )
    _adopted_year_1(bank)
    run(
        bank,
        "UPDATE adoptions SET closed_at = '9999-12-31' WHERE id = (SELECT max(a.id) "
        "FROM adoptions a WHERE a.customer_id = :c)",
        c=customer_id,
    )
    _product_value_infinite(bank)
    before = skipped("report", "date_out_of_range")
    report = reports.uplift(bank, reports.Period(dt.date(2026, 5, 1), dt.date(2026, 5, 31)))
    assert skipped("report", "date_out_of_range") > before
    assert report.total.treated_customers == 1
    assert all(math.isfinite(row.incremental_value) for row in report.rows)


@pytest.mark.parametrize("missing", [None, math.nan, pd.NaT])
def test_a_missing_date_is_missing_not_bad(missing: Any) -> None:
    """A frame holds a missing text as NaN (pandas' ``str`` dtype) or NaT: that is an
    open product, not a bad date (before, closed products read this way were counted as
    bad rows and held for ever in the uplift report)."""
    from service.data.rows import parse_date

    assert parse_date(missing) == (None, None)
    assert parse_date("not a date") == (None, "bad_date")
    assert parse_date("2024-02-29") == (dt.date(2024, 2, 29), None)
