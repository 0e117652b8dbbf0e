"""No key material and no customer data in the logs (issue 13, finding 8).

A whole scenario runs through the app with every logger at DEBUG, SQLAlchemy's
statement log included: keys created, customers written with distinctive attribute
values, decisions, outcomes, bad requests, refused keys, and statements that fail on a
constraint. Then every log record (message, arguments, extra fields, traceback) is
searched for the keys, their hashes and the attribute values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from service import auth
from service.app import create_app
from service.cli.keys import keys_app
from service.data.db import make_engine, unit_of_work
from service.settings import Settings

SECRET_TEXT = "ZEBRA-QUOKKA-4417-SECRET"
SECRET_NUMBER = 8675309.123457
SECRET_BAD_INPUT = "NARWHAL-0931-BADINPUT"


def _record_text(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    """Everything a handler could write for ``record``: message, arguments, the extra
    fields, and the traceback."""
    parts = [record.getMessage(), repr(record.args)]
    parts += [repr(value) for value in vars(record).values()]
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    return "\n".join(parts)


def test_a_full_scenario_logs_no_keys_and_no_customer_data(
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: a failing statement was logged with its parameters, customer attributes
    included (and SQLAlchemy's statement log, when on, carried every parameter)."""
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool", "nbo", "uvicorn"):
        caplog.set_level(logging.DEBUG, logger=name)

    monkeypatch.setenv("NBO_DATABASE_URL", database_url)
    monkeypatch.setenv("NBO_DATA_DIR", str(tmp_path))
    created = CliRunner().invoke(keys_app, ["create", "--name", "admin", "--role", "admin"])
    assert created.exit_code == 0, created.output
    admin = created.stdout.strip()
    engine = make_engine(database_url)
    with unit_of_work(engine) as session:
        teller = auth.create_key(session, name="teller", scopes=["decisions", "outcomes"])
        feed = auth.create_key(session, name="feed", scopes=["data"])
        revoked = auth.create_key(session, name="gone", scopes=["data"])
        auth.revoke_key(session, prefix=revoked.split("_")[1])
    keys = [admin, teller, feed, revoked]

    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        control_share=0.0,
        min_propensity=0.0,
        cold_start=True,
        poll_interval_seconds=60.0,
        ops_endpoints="key",
    )
    app = create_app(settings)

    @app.post("/test-only/duplicate-customer")
    def duplicate_customer() -> dict[str, str]:
        # A statement that fails on a constraint, carrying attribute values, through the
        # app's own engine; not caught, so the app's error handler logs it.
        with unit_of_work(app.state.engine) as session:
            session.execute(
                text("INSERT INTO customers (external_id, attributes) VALUES (:id, :attributes)"),
                {"id": "C1", "attributes": f'{{"note": "{SECRET_TEXT}", "x": {SECRET_NUMBER}}}'},
            )
        return {}

    def as_(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    with TestClient(app, raise_server_exceptions=False) as client:
        for code in ("P1", "P2"):
            put = client.put(
                f"/v1/products/{code}",
                json={"name": f"Product {code}", "category": "cards", "value": 10},
                headers=as_(admin),
            )
            assert put.status_code in (200, 201), put.text
        for n in (1, 2, 3):
            put = client.put(
                f"/v1/customers/C{n}",
                json={
                    "segment": "retail",
                    "attributes": {"note": SECRET_TEXT, "income": SECRET_NUMBER},
                },
                headers=as_(feed),
            )
            assert put.status_code in (200, 201), put.text
        pushed = client.post(
            "/v1/adoptions",
            json={"adoptions": [{"customer_id": "C2", "product_code": "P1"}]},
            headers=as_(feed),
        )
        assert pushed.status_code < 300, pushed.text
        offers = []
        for n in (1, 2, 3, 4):
            decision = client.post(
                f"/v1/customers/C{n}/decisions",
                json={"channel": "branch", "staff_id": "S1", "branch_id": "B1"},
                headers=as_(teller),
            )
            assert decision.status_code == 200, decision.text
            offers += decision.json()["offers"]
        for offer in offers[:2]:
            outcome = client.post(
                f"/v1/offers/{offer['offer_id']}/outcome",
                json={"outcome": "accepted"},
                headers=as_(teller),
            )
            assert outcome.status_code in (200, 201), outcome.text
        # Bad requests, a wrong secret, a revoked key, a key without the scope.
        bad = client.put(
            "/v1/customers/C1",
            json={"birth_date": SECRET_BAD_INPUT, "attributes": {"note": SECRET_TEXT}},
            headers=as_(feed),
        )
        assert bad.status_code == 422
        assert client.get("/v1/models", headers=as_(teller[:-3] + "abc")).status_code == 401
        assert client.put("/v1/customers/C9", json={}, headers=as_(revoked)).status_code == 401
        assert client.get("/v1/models", headers=as_(teller)).status_code == 403
        assert client.get("/metrics", headers=as_(admin)).status_code == 200
        failed = client.post("/test-only/duplicate-customer")
        assert failed.status_code == 500
        assert SECRET_TEXT not in failed.text
    # And straight on an engine, as the CLI would meet it.
    with pytest.raises(IntegrityError) as caught, unit_of_work(engine) as session:
        session.execute(
            text("INSERT INTO customers (external_id, attributes) VALUES (:id, :a)"),
            {"id": "C2", "a": f'{{"note": "{SECRET_TEXT}"}}'},
        )
    logging.getLogger("nbo.test").error("constraint failed", exc_info=caught.value)
    engine.dispose()

    formatter = logging.Formatter()
    records = [(r, _record_text(r, formatter)) for r in caplog.records]
    # The scan is not vacuous: statements were logged, and the failures with tracebacks.
    assert any("INSERT INTO customers" in t for r, t in records if r.name.startswith("sqlalchemy"))
    assert any(r.name == "nbo.errors" and r.exc_info for r, _ in records)
    forbidden = {SECRET_TEXT, repr(SECRET_NUMBER), SECRET_BAD_INPUT}
    for key in keys:
        forbidden |= {key, key.split("_", 2)[2], auth.hash_key(key)}
    leaks: list[Any] = [
        (record.name, record.msg, word)
        for record, logged in records
        for word in forbidden
        if word in logged
    ]
    assert not leaks, leaks[:5]
