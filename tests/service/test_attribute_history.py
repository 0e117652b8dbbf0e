"""Customers' attribute history: imports and the API keep the values a change replaced,
dated, and the bank loads them so features at a past cutoff read the values of that day."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from models.data import BankData
from models.features import FeatureBuilder, FeatureSpec
from service.cli.main import app
from service.data.bank import load_bank
from service.data.customers import put_customer
from service.data.db import make_engine, unit_of_work
from service.data.importing import (
    ImportFailed,
    import_adoptions,
    import_customers,
    import_products,
)
from service.schemas import CustomerRequest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TODAY = dt.date(2025, 1, 10)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body.lstrip())
    return path


def load_fixture_bank(engine: Engine) -> None:
    import_products(engine, FIXTURES / "products.csv")
    import_customers(engine, FIXTURES / "customers.csv", today=TODAY)
    import_adoptions(engine, FIXTURES / "adoptions.csv")


def changes(engine: Engine) -> list[tuple[str, str, str, Any]]:
    """Every stored change as (customer, name, first day of the new value, previous)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.external_id, ch.name, ch.changed_on, CAST(ch.previous AS TEXT) "
                "FROM attribute_changes ch JOIN customers c ON c.id = ch.customer_id"
            )
        ).all()
    return sorted(
        (cid, name, str(day)[:10], None if raw is None else json.loads(raw))
        for cid, name, day, raw in rows
    )


def current(engine: Engine, customer: str) -> tuple[str | None, str | None, dict[str, Any]]:
    with engine.connect() as conn:
        segment, branch, attributes = conn.execute(
            text("SELECT segment, branch_id, attributes FROM customers WHERE external_id = :c"),
            {"c": customer},
        ).one()
    attributes = json.loads(attributes) if isinstance(attributes, str) else attributes
    return segment, branch, attributes


def features(data: BankData, as_of: str) -> dict[str, dict[str, object]]:
    """Each customer's income, region and segment as the features read them at ``as_of``."""
    spec = FeatureSpec.fit(data, rule_features=False)
    frame = FeatureBuilder(spec).build(data, as_of=as_of)
    out: dict[str, dict[str, object]] = {}
    for i, cid in enumerate(frame.customer_ids):
        income = float(frame.column("attr_income")[i])
        out[str(cid)] = {
            "income": None if np.isnan(income) else income,
            "region": spec.display_value("attr_region", float(frame.column("attr_region")[i])),
            "segment": spec.display_value("segment", float(frame.column("segment")[i])),
        }
    return out


# --------------------------------------------------------------------------- import


def test_one_snapshot_keeps_no_history_and_loses_nothing(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    again = import_customers(engine, FIXTURES / "customers.csv", today=TODAY)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)
    # A new attribute column for known customers: a first value, known all along.
    risk = write(tmp_path, "risk.csv", "customer_id,risk\nC1,0.25\nC2,0.5\n")
    summary = import_customers(engine, risk, today=TODAY)
    assert summary.updated == 2 and summary.extra["attribute_changes"] == 0
    assert changes(engine) == []
    data = load_bank(engine)
    assert data.attribute_history is None
    spec = FeatureSpec.fit(data, rule_features=False)
    early = FeatureBuilder(spec).build(data, as_of="2022-06-01")
    rows = list(early.customer_ids)
    assert float(early.column("attr_risk")[rows.index("C1")]) == 0.25
    assert features(data, "2022-06-01")["C1"] == {
        "income": 3200.0,
        "region": "north",
        "segment": "mass",
    }


def test_changes_are_dated_by_the_valid_from_column_else_the_import_day(
    engine: Engine, tmp_path: Path
) -> None:
    load_fixture_bank(engine)
    file = write(
        tmp_path,
        "changes.csv",
        """
customer_id,income,region,dependants,valid_from
C1,5000,north,,2024-06-01
C2,900,east,0,
""",
    )
    summary = import_customers(engine, file, today=TODAY)
    assert (summary.updated, summary.unchanged, summary.extra["attribute_changes"]) == (2, 0, 3)
    assert changes(engine) == [
        ("C1", "dependants", "2024-06-01", 2.0),  # an empty cell removes the value
        ("C1", "income", "2024-06-01", 3200.0),
        ("C2", "region", "2025-01-10", "south"),  # no valid_from: the import day
    ]
    assert current(engine, "C1")[2] == {"income": 5000.0, "region": "north"}
    assert current(engine, "C2")[2]["region"] == "east"

    # The same file again adds nothing, and so does a value already held that day.
    again = import_customers(engine, file, today=TODAY + dt.timedelta(days=3))
    assert (again.added, again.updated, again.unchanged) == (0, 0, 2)
    held = write(tmp_path, "held.csv", "customer_id,income,valid_from\nC1,3200,2024-01-01\n")
    assert import_customers(engine, held, today=TODAY).unchanged == 1
    assert len(changes(engine)) == 3

    data = load_bank(engine)
    assert data.attribute_history is not None and len(data.attribute_history) == 3
    assert features(data, "2024-05-01")["C1"]["income"] == 3200.0
    assert features(data, "2024-07-01")["C1"]["income"] == 5000.0
    assert features(data, "2025-01-10")["C2"]["region"] == "south"
    assert features(data, "2025-01-11")["C2"]["region"] == "east"
    # Serving's load reads the values in force now.
    assert load_bank(engine, reader="snapshot").attribute_history is None


def test_valid_from_for_the_whole_file_and_the_segment(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    file = write(
        tmp_path,
        "segments.csv",
        """
customer_id,segment,branch_id,valid_from
C1,affluent,B01,
C2,mass,B03,2024-09-01
""",
    )
    import_customers(engine, file, valid_from=dt.date(2024, 3, 1), today=TODAY)
    assert changes(engine) == [
        ("C1", "segment", "2024-03-01", "mass"),  # the option fills empty cells
        ("C2", "branch_id", "2024-09-01", "B02"),  # the row's own day wins
        ("C2", "segment", "2024-09-01", "youth"),
    ]
    assert current(engine, "C1")[:2] == ("affluent", "B01")
    data = load_bank(engine)
    assert features(data, "2024-02-01")["C1"]["segment"] == "mass"
    assert features(data, "2024-04-01")["C1"]["segment"] == "affluent"
    early = FeatureBuilder(FeatureSpec.fit(data, rule_features=False)).build(
        data, as_of="2024-08-01"
    )
    assert early.segments[list(early.customer_ids).index("C2")] == "youth"


def test_a_correction_of_the_past_keeps_the_value_in_force(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    later = write(tmp_path, "later.csv", "customer_id,income,valid_from\nC1,5000,2024-06-01\n")
    import_customers(engine, later, today=TODAY)
    earlier = write(tmp_path, "earlier.csv", "customer_id,income,valid_from\nC1,4000,2024-02-01\n")
    summary = import_customers(engine, earlier, today=TODAY)
    assert summary.updated == 1
    assert current(engine, "C1")[2]["income"] == 5000.0
    assert changes(engine) == [
        ("C1", "income", "2024-02-01", 3200.0),
        ("C1", "income", "2024-06-01", 4000.0),
    ]
    data = load_bank(engine)
    assert [features(data, day)["C1"]["income"] for day in ("2024-01-01", "2024-03-01")] == [
        3200.0,
        4000.0,
    ]
    # Setting the first value on its own day again undoes the change: one change left.
    undo = write(tmp_path, "undo.csv", "customer_id,income,valid_from\nC1,3200,2024-02-01\n")
    import_customers(engine, undo, today=TODAY)
    assert changes(engine) == [("C1", "income", "2024-06-01", 3200.0)]


def test_a_bad_valid_from_is_a_row_error_and_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    bad = write(
        tmp_path,
        "bad.csv",
        """
customer_id,income,valid_from
C1,5000,2024-13-45
C2,800,2025-03-01
""",
    )
    with pytest.raises(ImportFailed) as info:
        import_customers(engine, bad, today=TODAY)
    message = str(info.value)
    assert "row 1, column 'valid_from': unparsable date '2024-13-45'" in message
    assert "row 2, column 'valid_from': date 2025-03-01 is in the future" in message
    good = write(tmp_path, "good.csv", "customer_id,income\nC1,5000\n")
    with pytest.raises(ImportFailed, match="valid_from.*in the future"):
        import_customers(engine, good, valid_from=dt.date(2025, 2, 1), today=TODAY)
    assert changes(engine) == []
    assert current(engine, "C1")[2]["income"] == 3200.0


# --------------------------------------------------------------------------- API


def test_the_api_dates_a_change_today_and_adds_nothing_unchanged(engine: Engine) -> None:
    load_fixture_bank(engine)

    def put(customer: str, body: dict[str, Any], today: dt.date) -> None:
        with unit_of_work(engine) as session:
            put_customer(
                session,
                customer_id=customer,
                body=CustomerRequest.model_validate(body),
                origin="test",
                max_attributes=500,
                today=today,
            )

    put("C1", {"segment": "affluent", "attributes": {"income": 6000}}, dt.date(2025, 2, 1))
    put("C1", {"segment": "affluent", "attributes": {"income": 6000}}, dt.date(2025, 2, 5))
    put("C1", {"attributes": {"region": None}}, dt.date(2025, 2, 6))
    put("C9", {"segment": "mass", "attributes": {"income": 10}}, dt.date(2025, 2, 6))
    assert changes(engine) == [
        ("C1", "income", "2025-02-01", 3200.0),
        ("C1", "region", "2025-02-06", "north"),
        ("C1", "segment", "2025-02-01", "mass"),
    ]
    assert current(engine, "C1") == ("affluent", "B01", {"income": 6000, "dependants": 2.0})
    data = load_bank(engine)
    assert features(data, "2025-02-01")["C1"] == {
        "income": 3200.0,
        "region": "north",
        "segment": "mass",
    }
    assert features(data, "2025-02-07")["C1"] == {
        "income": 6000.0,
        "region": None,
        "segment": "affluent",
    }


# --------------------------------------------------------------------------- CLI


def test_the_cli_takes_valid_from(database_url: str, tmp_path: Path) -> None:
    env = {"NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    runner = CliRunner()
    for kind in ("products", "customers"):
        result = runner.invoke(app, ["import", kind, str(FIXTURES / f"{kind}.csv")], env=env)
        assert result.exit_code == 0, result.output
    file = write(tmp_path, "c.csv", "customer_id,income\nC2,950\n")
    result = runner.invoke(
        app, ["import", "customers", str(file), "--valid-from", "2024-06-01"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "attribute changes" in result.output
    result = runner.invoke(
        app, ["import", "customers", str(file), "--valid-from", "June 1st"], env=env
    )
    assert result.exit_code == 2
    engine = make_engine(database_url)
    try:
        assert changes(engine) == [("C2", "income", "2024-06-01", 900.0)]
    finally:
        engine.dispose()
