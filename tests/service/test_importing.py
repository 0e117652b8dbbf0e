"""Import: good files load, bad files are rejected whole with a message saying where."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, text

from service.data.importing import (
    ImportFailed,
    SnapshotOptions,
    import_adoptions,
    import_customers,
    import_products,
    import_snapshots,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TABLES = ("products", "customers", "adoptions", "attribute_definitions")


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body.lstrip())
    return path


def load_fixture_bank(engine: Engine) -> None:
    import_products(engine, FIXTURES / "products.csv")
    import_customers(engine, FIXTURES / "customers.csv")
    import_adoptions(engine, FIXTURES / "adoptions.csv")


def rejects(engine: Engine, run: object, *fragments: str) -> ImportFailed:
    """Run an import that must fail; check the message and that nothing changed."""
    before = counts(engine)
    with pytest.raises(ImportFailed) as info:
        run()  # type: ignore[operator]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert counts(engine) == before, "a rejected import wrote something"
    return info.value


# ------------------------------------------------------------------ good files


def test_fixture_bank_loads(engine: Engine) -> None:
    load_fixture_bank(engine)
    assert counts(engine) == {
        "products": 4,
        "customers": 3,
        "adoptions": 5,
        "attribute_definitions": 3,
    }
    with engine.connect() as conn:
        kinds: dict[str, str] = dict(
            conn.execute(text("SELECT name, kind FROM attribute_definitions")).all()
        )
        attrs = conn.execute(
            text("SELECT attributes FROM customers WHERE external_id = 'C3'")
        ).scalar_one()
        card = conn.execute(
            text("SELECT requires, min_age, active FROM products WHERE code = 'credit_card'")
        ).one()
        closed = conn.execute(
            text(
                "SELECT a.closed_at FROM adoptions a JOIN products p ON p.id = a.product_id "
                "WHERE p.code = 'credit_card'"
            )
        ).scalar_one()
    assert kinds == {"income": "numeric", "region": "categorical", "dependants": "numeric"}
    attrs = json.loads(attrs) if isinstance(attrs, str) else attrs
    assert attrs == {"income": 12000.0, "region": "north"}  # empty dependants is left out
    requires = json.loads(card.requires) if isinstance(card.requires, str) else card.requires
    assert requires == ["current_account"] and card.min_age == 18 and card.active
    assert str(closed) == "2022-01-10"


def test_reimport_adds_nothing(engine: Engine) -> None:
    load_fixture_bank(engine)
    before = counts(engine)
    products = import_products(engine, FIXTURES / "products.csv")
    customers = import_customers(engine, FIXTURES / "customers.csv")
    adoptions = import_adoptions(engine, FIXTURES / "adoptions.csv")
    assert counts(engine) == before
    for summary, rows in ((products, 4), (customers, 3), (adoptions, 5)):
        assert (summary.rows_read, summary.added, summary.updated, summary.unchanged) == (
            rows,
            0,
            0,
            rows,
        )


def test_changed_rows_update(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    adoptions = write(
        tmp_path,
        "a.csv",
        """
customer_id,product_code,adopted_at,closed_at
C1,home_insurance,2021-03-01,2023-05-05
C3,credit_card,2020-01-01,
""",
    )
    summary = import_adoptions(engine, adoptions)
    assert (summary.added, summary.updated, summary.unchanged) == (1, 1, 0)
    customers = write(tmp_path, "c.csv", "customer_id,income\nC1,3300\nC2,900\n")
    summary = import_customers(engine, customers)
    assert (summary.added, summary.updated, summary.unchanged) == (0, 1, 1)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT segment, attributes FROM customers WHERE external_id = 'C1'")
        ).one()
    attrs = json.loads(row.attributes) if isinstance(row.attributes, str) else row.attributes
    # Columns absent from the file keep their stored values.
    assert row.segment == "mass"
    assert attrs == {"income": 3300.0, "region": "north", "dependants": 2.0}


def test_parquet_and_chunking(engine: Engine, tmp_path: Path) -> None:
    import_products(engine, FIXTURES / "products.csv")
    customers = pd.DataFrame(
        {
            "customer_id": [f"P{i}" for i in range(250)],
            "joined_at": pd.to_datetime("2020-01-01") + pd.to_timedelta(range(250), unit="D"),
            "score": [float(i) for i in range(250)],
        }
    )
    customers.to_parquet(tmp_path / "customers.parquet")
    adoptions = pd.DataFrame(
        {
            "customer_id": customers["customer_id"],
            "product_code": "current_account",
            "adopted_at": customers["joined_at"].dt.date,
        }
    )
    adoptions.to_parquet(tmp_path / "adoptions.parquet")
    assert import_customers(engine, tmp_path / "customers.parquet", chunk_rows=64).added == 250
    summary = import_adoptions(engine, tmp_path / "adoptions.parquet", chunk_rows=64)
    assert (summary.rows_read, summary.added) == (250, 250)


# ------------------------------------------------------------------ bad files


def test_missing_column(engine: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "product_code,name,value\nx,X,1\n")
    rejects(
        engine,
        lambda: import_products(engine, path),
        "p.csv",
        "column 'category'",
        "missing column",
    )


def test_unknown_column_in_products(engine: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "product_code,name,category,value,colour\nx,X,c,1,red\n")
    rejects(engine, lambda: import_products(engine, path), "column 'colour'", "unknown column")


def test_negative_value(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.csv",
        "product_code,name,category,value\nok,OK,c,5\nbad,Bad,c,-5\n",
    )
    rejects(
        engine,
        lambda: import_products(engine, path),
        "p.csv, row 2, column 'value': negative value -5",
    )


def test_duplicate_product(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path, "p.csv", "product_code,name,category,value\na,A,c,1\nb,B,c,1\na,A2,c,1\n"
    )
    rejects(
        engine,
        lambda: import_products(engine, path),
        "row 3, column 'product_code': duplicate key 'a' (also on row 1)",
    )


def test_product_requires_unknown_product(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path, "p.csv", "product_code,name,category,value,requires\na,A,c,1,\nb,B,c,1,a|zz\n"
    )
    rejects(
        engine,
        lambda: import_products(engine, path),
        "row 2, column 'requires': unknown product 'zz'",
    )


def test_unknown_product_in_adoptions(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    path = write(
        tmp_path,
        "a.csv",
        """
customer_id,product_code,adopted_at
C2,credit_card,2024-01-01
C2,jet_ski,2024-02-01
""",
    )
    rejects(
        engine,
        lambda: import_adoptions(engine, path),
        "a.csv, row 2, column 'product_code': unknown product 'jet_ski'",
    )


def test_unparsable_date(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    path = write(
        tmp_path,
        "a.csv",
        """
customer_id,product_code,adopted_at
C2,credit_card,2024-01-01
C3,credit_card,31/02/2024
""",
    )
    rejects(
        engine,
        lambda: import_adoptions(engine, path),
        "row 2, column 'adopted_at': unparsable date '31/02/2024'",
    )


def test_duplicate_adoption_key(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    path = write(
        tmp_path,
        "a.csv",
        """
customer_id,product_code,adopted_at
C2,credit_card,2024-01-01
C3,credit_card,2024-01-01
C2,credit_card,2024-01-01
""",
    )
    rejects(
        engine,
        lambda: import_adoptions(engine, path),
        "row 3: duplicate key: customer 'C2', product 'credit_card', adopted_at 2024-01-01 "
        "(also on row 1)",
    )


def test_duplicate_customer_across_chunks(engine: Engine, tmp_path: Path) -> None:
    rows = "\n".join(f"K{i},{i}" for i in range(10))
    path = write(tmp_path, "c.csv", f"customer_id,score\n{rows}\nK3,99\n")
    rejects(
        engine,
        lambda: import_customers(engine, path, chunk_rows=4),
        "row 11, column 'customer_id': duplicate key 'K3' (also on row 4)",
    )


def test_unknown_customer(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    path = write(
        tmp_path, "a.csv", "customer_id,product_code,adopted_at\nC9,credit_card,2024-01-01\n"
    )
    rejects(
        engine,
        lambda: import_adoptions(engine, path),
        "row 1, column 'customer_id': unknown customer 'C9'",
    )


def test_closed_before_adopted_and_future(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    path = write(
        tmp_path,
        "a.csv",
        """
customer_id,product_code,adopted_at,closed_at
C2,credit_card,2024-01-01,2023-01-01
C3,credit_card,2099-01-01,
""",
    )
    error = rejects(engine, lambda: import_adoptions(engine, path))
    reasons = [str(p) for p in error.problems]
    assert any(
        "row 1, column 'closed_at': closed_at 2023-01-01 is before adopted_at" in r for r in reasons
    )
    assert any("row 2, column 'adopted_at': date 2099-01-01 is in the future" in r for r in reasons)


def test_attribute_kind_mismatch(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    path = write(tmp_path, "c.csv", "customer_id,income\nC1,3300\nC2,lots\n")
    rejects(
        engine,
        lambda: import_customers(engine, path),
        "row 2, column 'income': not a number: 'lots' (attribute 'income' is numeric",
    )


def test_late_error_rolls_back_earlier_chunks(engine: Engine, tmp_path: Path) -> None:
    """A problem in the last chunk leaves nothing of the first chunks behind."""
    load_fixture_bank(engine)
    lines = [f"N{i},{i}" for i in range(300)] + ["N300,not-a-number"]
    path = write(tmp_path, "c.csv", "customer_id,income\n" + "\n".join(lines) + "\n")
    rejects(
        engine, lambda: import_customers(engine, path, chunk_rows=50), "row 301, column 'income'"
    )


def test_problems_are_capped(engine: Engine, tmp_path: Path) -> None:
    load_fixture_bank(engine)
    lines = [f"C1,nope{i},2024-01-01" for i in range(100)]
    path = write(
        tmp_path, "a.csv", "customer_id,product_code,adopted_at\n" + "\n".join(lines) + "\n"
    )
    error = rejects(engine, lambda: import_adoptions(engine, path, max_errors=5))
    assert len(error.problems) == 5 and error.truncated


def test_empty_and_missing_files(engine: Engine, tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.csv", "")
    rejects(engine, lambda: import_products(engine, empty), "empty.csv: the file is empty")
    header_only = write(tmp_path, "h.csv", "product_code,name,category,value\n")
    rejects(engine, lambda: import_products(engine, header_only), "the file has no rows")
    rejects(engine, lambda: import_products(engine, tmp_path / "nope.csv"), "file not found")


# ------------------------------------------------------------------ snapshots

SNAPSHOT_HEADER = (
    '"fecha_dato","ncodpers","age","ind_cco_fin_ult1","ind_tjcr_fin_ult1","ind_nomina_ult1"'
)
# In the raw Santander format: space padding, NA flags, empty fields.
SNAPSHOT_ROWS = """
2015-01-28,1001, 35,1,0,0
2015-01-28,1002, 23,0,0,NA
2015-02-28,1001, 35,1,1,0
2015-02-28,1002, 23,1,0,
2015-03-28,1001, 35,1,1,1
2015-03-28,1002, 23,1,0,0
2015-03-28,1003, 51,1,1,0
2015-04-28,1001, 35,1,0,1
2015-04-28,1002, 23,0,0,0
2015-04-28,1003, 51,1,1,0
2015-05-28,1001, 35,1,1,NA
"""
SNAPSHOT_OPTIONS = SnapshotOptions(
    id_column="ncodpers",
    date_column="fecha_dato",
    product_columns=("ind_*_ult1",),
    product_map={"ind_cco_fin_ult1": "current_account", "ind_tjcr_fin_ult1": "credit_card"},
    create_products=True,
)


def adoption_rows(engine: Engine) -> set[tuple[str, str, str, str | None, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.external_id, p.code, a.adopted_at, a.closed_at, a.source FROM adoptions a "
                "JOIN customers c ON c.id = a.customer_id JOIN products p ON p.id = a.product_id"
            )
        ).all()
    return {(e, p, str(a), None if c is None else str(c), s) for e, p, a, c, s in rows}


def test_snapshots_derive_adoptions_and_closures(engine: Engine, tmp_path: Path) -> None:
    import_products(engine, FIXTURES / "products.csv")
    path = write(tmp_path, "snap.csv", SNAPSHOT_HEADER + "\n" + SNAPSHOT_ROWS)
    summary = import_snapshots(engine, path, SNAPSHOT_OPTIONS, chunk_rows=4)
    expected = {
        # 1001 held the account at its first snapshot: held since then, true date unknown.
        ("1001", "current_account", "2015-01-28", None, "snapshot_initial"),
        # card taken in February, closed in April, taken again in May
        ("1001", "credit_card", "2015-02-28", "2015-04-28", "snapshot"),
        ("1001", "credit_card", "2015-05-28", None, "snapshot"),
        # payroll taken in March; the May NA carries April's 1 forward
        ("1001", "ind_nomina_ult1", "2015-03-28", None, "snapshot"),
        # 1002: account taken in February (Jan NA/empty flags count as not held), closed in April
        ("1002", "current_account", "2015-02-28", "2015-04-28", "snapshot"),
        # 1003 first seen in March holding two products
        ("1003", "current_account", "2015-03-28", None, "snapshot_initial"),
        ("1003", "credit_card", "2015-03-28", None, "snapshot_initial"),
    }
    assert adoption_rows(engine) == expected
    assert summary.rows_read == 11
    assert summary.extra["customers_created"] == 3
    assert summary.extra["products_created"] == 1
    assert summary.extra["closures"] == 2
    again = import_snapshots(engine, path, SNAPSHOT_OPTIONS)
    assert (again.added, again.updated) == (0, 0)
    assert adoption_rows(engine) == expected


def test_later_snapshot_file_continues_holdings(engine: Engine, tmp_path: Path) -> None:
    """A second file starting where the first ended continues open adoptions, not duplicates."""
    import_products(engine, FIXTURES / "products.csv")
    lines = SNAPSHOT_ROWS.strip().splitlines()
    first = write(tmp_path, "first.csv", SNAPSHOT_HEADER + "\n" + "\n".join(lines[:6]) + "\n")
    second = write(tmp_path, "second.csv", SNAPSHOT_HEADER + "\n" + "\n".join(lines[4:]) + "\n")
    import_snapshots(engine, first, SNAPSHOT_OPTIONS)
    import_snapshots(engine, second, SNAPSHOT_OPTIONS)
    rows = adoption_rows(engine)
    assert ("1002", "current_account", "2015-02-28", "2015-04-28", "snapshot") in rows
    assert ("1001", "credit_card", "2015-02-28", "2015-04-28", "snapshot") in rows
    assert not any(
        r[2] == "2015-03-28" and r[0] in {"1001", "1002"} and r[1] != "ind_nomina_ult1"
        for r in rows
    )


def test_snapshot_errors(engine: Engine, tmp_path: Path) -> None:
    import_products(engine, FIXTURES / "products.csv")
    bad_flag = write(tmp_path, "s1.csv", SNAPSHOT_HEADER + "\n2015-01-28,1001, 35,1,2,0\n")
    rejects(
        engine,
        lambda: import_snapshots(engine, bad_flag, SNAPSHOT_OPTIONS),
        "row 1, column 'ind_tjcr_fin_ult1': holding flag must be 0 or 1, got '2'",
    )
    out_of_order = write(
        tmp_path,
        "s2.csv",
        SNAPSHOT_HEADER + "\n2015-02-28,1001, 35,1,0,0\n2015-01-28,1001, 35,1,0,0\n",
    )
    rejects(
        engine,
        lambda: import_snapshots(engine, out_of_order, SNAPSHOT_OPTIONS),
        "row 2, column 'fecha_dato': out of date order",
    )
    strict = SnapshotOptions(**{**SNAPSHOT_OPTIONS.__dict__, "create_products": False})
    good = write(tmp_path, "s3.csv", SNAPSHOT_HEADER + "\n2015-01-28,1001, 35,1,0,0\n")
    rejects(
        engine,
        lambda: import_snapshots(engine, good, strict),
        "column 'ind_nomina_ult1': unknown product 'ind_nomina_ult1'",
    )


def test_santander_sample_header_imports(engine: Engine) -> None:
    """The real sample's quirks (padding, NA, 24 flags) read cleanly."""
    from tests.conftest import SHARED_DATA

    sample = SHARED_DATA / "santander_sample" / "train_ver2_head_9999rows.csv"
    if not sample.exists():
        pytest.skip("shared data not present")
    options = SnapshotOptions(
        id_column="ncodpers",
        date_column="fecha_dato",
        product_columns=("ind_*_ult1",),
        create_products=True,
    )
    summary = import_snapshots(engine, sample, options, today=dt.date(2026, 1, 1))
    assert summary.rows_read == 9_999
    assert summary.extra["products_created"] == 24
    # One month only: every holding is an initial one, no flips.
    assert summary.extra["adoptions_from_flips"] == 0
    assert summary.extra["held_at_first_snapshot"] == summary.added > 9_000
