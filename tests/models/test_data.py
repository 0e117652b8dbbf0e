"""BankData normalisation and the adoption index every model reads history through."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.data import (
    NAT_NS,
    Adoption,
    AdoptionIndex,
    BankData,
    CustomerState,
    snapshot_of_state,
    to_ns,
)
from models.sequences import NEVER, first_adoption_matrix, held_matrix
from models.synthetic import SyntheticBank, generate_bank, write_bank

PRODUCTS_CSV = """product_code,name,category,value,business_weight,active,min_age,max_age,segments,requires,excludes
current,Current account,accounts,40,,true,18,,,,
card,Credit card,cards,150,2,TRUE,18,75,mass|affluent,current,gold
gold,Gold card,cards,400,1,false,21,,affluent,current,card
"""
CUSTOMERS_CSV = """customer_id,segment,branch_id,joined_at,birth_date,income,region,vip
C1,mass,B1,2020-01-05,1980-02-29,3200,north,1
C2,affluent,B2,2021-06-30,,NA,south,0
C3,,,2022-03-01,2001-12-31,1500.5,,
"""
ADOPTIONS_CSV = """customer_id,product_code,adopted_at,closed_at
C1,current,2020-01-05,
C1,card,2020-03-01,2021-01-01
C1,card,2022-01-01,
C2,current,2021-06-30,
C3,current,2022-03-01,2023-01-01
"""


@pytest.fixture(scope="module")
def bank() -> SyntheticBank:
    return generate_bank(3_000, seed=5)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "products.csv").write_text(PRODUCTS_CSV)
    (tmp_path / "customers.csv").write_text(CUSTOMERS_CSV)
    (tmp_path / "adoptions.csv").write_text(ADOPTIONS_CSV)
    return tmp_path


# --------------------------------------------------------------------------- reading


def test_from_folder_normalises_every_column(folder: Path) -> None:
    data = BankData.from_folder(folder)

    products = data.products.set_index("product_code")
    assert data.product_codes == ("current", "card", "gold")
    assert products.loc["card", "segments"] == ("mass", "affluent")
    assert products.loc["card", "requires"] == ("current",)
    assert products.loc["current", "segments"] is None
    assert products.loc["current", "requires"] is None
    assert products["active"].tolist() == [True, True, False]
    assert products.loc["current", "business_weight"] == 1.0  # empty -> default
    assert products.loc["card", "max_age"] == 75
    assert pd.isna(products.loc["current", "max_age"])
    assert str(products["min_age"].dtype) == "Int64"

    customers = data.customers.set_index("customer_id")
    assert data.attribute_kinds == {
        "income": "numeric",
        "region": "categorical",
        "vip": "numeric",
    }
    assert customers["income"].dtype == np.float64
    assert np.isnan(customers.loc["C2", "income"])  # "NA" is missing, not a category
    assert customers.loc["C3", "income"] == 1500.5
    assert pd.isna(customers.loc["C3", "region"])
    assert pd.isna(customers.loc["C3", "segment"])
    assert customers["joined_at"].dtype == "datetime64[ns]"
    assert pd.isna(customers.loc["C2", "birth_date"])

    adoptions = data.adoptions
    assert adoptions["adopted_at"].dtype == "datetime64[ns]"
    assert adoptions["closed_at"].isna().tolist() == [True, False, True, True, False]


def test_explicit_attribute_kinds_win(folder: Path) -> None:
    data = BankData.from_folder(folder, attribute_kinds={"vip": "categorical"})
    assert data.attribute_kinds["vip"] == "categorical"
    assert data.customers.set_index("customer_id").loc["C1", "vip"] == "1"


def test_csv_and_parquet_files_read_like_the_frames(bank: SyntheticBank, tmp_path: Path) -> None:
    expected = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    for fmt in ("csv", "parquet"):
        write_bank(bank, tmp_path / fmt, fmt=fmt)
        data = BankData.from_folder(tmp_path / fmt)
        assert data.attribute_kinds == expected.attribute_kinds
        for name in ("products", "customers", "adoptions"):
            pd.testing.assert_frame_equal(
                getattr(data, name), getattr(expected, name), check_dtype=False
            )


@pytest.mark.parametrize(
    ("table", "edit", "message"),
    [
        ("products", lambda f: pd.concat([f, f.head(1)]), "repeats"),
        ("customers", lambda f: f.drop(columns="customer_id"), "missing column"),
        ("adoptions", lambda f: f.assign(product_code="nope"), "unknown value"),
        ("adoptions", lambda f: f.assign(customer_id="nobody"), "unknown value"),
        ("adoptions", lambda f: f.assign(adopted_at=None), "must not be missing"),
        ("customers", lambda f: f.assign(joined_at="yesterday"), "unparseable date"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    bank: SyntheticBank, table: str, edit: object, message: str
) -> None:
    frames = {"products": bank.products, "customers": bank.customers, "adoptions": bank.adoptions}
    frames[table] = edit(frames[table].copy())  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        BankData.from_frames(frames["products"], frames["customers"], frames["adoptions"])


def test_missing_table_is_named(folder: Path) -> None:
    (folder / "adoptions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="adoptions"):
        BankData.from_folder(folder)


def test_customer_state_round_trips_a_customer(folder: Path) -> None:
    data = BankData.from_folder(folder)
    state = data.customer_state("C1")
    assert state.segment == "mass"
    assert state.attributes == {"income": 3200.0, "region": "north", "vip": 1.0}
    assert [a.product_code for a in state.adoptions] == ["current", "card", "card"]
    assert state.adoptions[1].closed_at == pd.Timestamp("2021-01-01")
    with pytest.raises(KeyError):
        data.customer_state("C9")


# --------------------------------------------------------------------------- time


def test_to_ns_reads_every_date_type_as_wall_clock_time() -> None:
    midnight = int(pd.Timestamp("2024-03-01").value)
    assert to_ns(dt.date(2024, 3, 1)) == midnight
    assert to_ns(dt.datetime(2024, 3, 1)) == midnight
    assert to_ns(pd.Timestamp("2024-03-01")) == midnight
    assert to_ns(np.datetime64("2024-03-01")) == midnight
    assert to_ns("2024-03-01") == midnight
    assert to_ns(pd.Timestamp("2024-03-01 00:00", tz="Europe/Prague")) == midnight
    assert to_ns(dt.datetime(2024, 3, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))) == midnight
    assert to_ns(dt.datetime(2024, 3, 1, 12, 30, 5, 7)) == int(
        pd.Timestamp("2024-03-01 12:30:05.000007").value
    )
    assert to_ns(None) == NAT_NS
    assert to_ns(pd.NaT) == NAT_NS


# --------------------------------------------------------------------------- the index


@pytest.mark.parametrize("at", ["2020-06-01", "2022-02-14 13:30", "2024-12-31", "2026-01-01"])
def test_index_matches_the_sequences_module(bank: SyntheticBank, at: str) -> None:
    """held and first-adoption days mean exactly what models.sequences says they mean."""
    data = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    ids = data.customers["customer_id"].to_numpy(dtype=object)
    index = AdoptionIndex.from_frame(
        data.adoptions, customer_ids=ids, product_codes=data.product_codes
    )
    snapshot = index.snapshot(to_ns(at))

    expected_held = held_matrix(
        data.adoptions, at=at, product_codes=data.product_codes, customer_ids=ids
    )
    expected_first = first_adoption_matrix(
        data.adoptions, as_of=at, product_codes=data.product_codes, customer_ids=ids
    ).first_days
    np.testing.assert_array_equal(snapshot.held, expected_held)
    np.testing.assert_array_equal(snapshot.first_days, expected_first)

    # The last adoption by brute force.
    seen = data.adoptions[data.adoptions["adopted_at"] < pd.Timestamp(at)]
    columns = {code: j for j, code in enumerate(data.product_codes)}
    seen = seen.assign(col=seen["product_code"].map(columns)).sort_values(["adopted_at", "col"])
    last = seen.groupby("customer_id").tail(1).set_index("customer_id")
    rows = pd.Index(ids).get_indexer(last.index)
    assert (snapshot.last_col >= 0).sum() == len(last)
    np.testing.assert_array_equal(snapshot.last_col[rows], last["col"].to_numpy())
    np.testing.assert_array_equal(
        snapshot.last_day[rows], last["adopted_at"].to_numpy().astype("datetime64[D]").astype(int)
    )


def test_one_customer_snapshot_equals_the_index(bank: SyntheticBank) -> None:
    data = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    ids = data.customers["customer_id"].to_numpy(dtype=object)
    codes = data.product_codes
    columns = {code: j for j, code in enumerate(codes)}
    index = AdoptionIndex.from_frame(data.adoptions, customer_ids=ids, product_codes=codes)
    for at in ("2021-01-01", "2023-07-15 08:00"):
        batch = index.snapshot(to_ns(at))
        for row in range(0, len(ids), 7):
            one = snapshot_of_state(
                data.customer_state(ids[row]),
                product_index=columns,
                n_products=len(codes),
                at_ns=to_ns(at),
            )
            np.testing.assert_array_equal(one.held[0], batch.held[row])
            np.testing.assert_array_equal(one.first_days[0], batch.first_days[row])
            assert one.last_col[0] == batch.last_col[row]
            assert one.last_day[0] == batch.last_day[row]


def test_snapshot_edge_cases_by_hand() -> None:
    """Closed on the instant still counts as held; adopted on it does not; re-adoption
    keeps the first day; same-instant adoptions: the later column is the last."""
    at = "2024-01-10"
    state = CustomerState(
        customer_id="C",
        adoptions=(
            Adoption("a", "2024-01-01", "2024-01-10"),  # closed exactly at `at`: held
            Adoption("b", "2023-01-01", "2023-06-01"),  # closed before: not held
            Adoption("b", "2023-09-01", None),  # re-adopted: held, first day stays
            Adoption("c", "2024-01-10", None),  # adopted exactly at `at`: not seen
            Adoption("d", "2024-01-01", None),  # same instant as "a", later column
        ),
    )
    columns = {"a": 0, "b": 1, "c": 2, "d": 3}
    one = snapshot_of_state(state, product_index=columns, n_products=4, at_ns=to_ns(at))
    frame = pd.DataFrame(
        [(state.customer_id, a.product_code, a.adopted_at, a.closed_at) for a in state.adoptions],
        columns=["customer_id", "product_code", "adopted_at", "closed_at"],
    ).astype({"adopted_at": "datetime64[ns]", "closed_at": "datetime64[ns]"})
    index = AdoptionIndex.from_frame(frame, customer_ids=["C"], product_codes=list(columns))
    batch = index.snapshot(to_ns(at))
    for snapshot in (one, batch):
        assert snapshot.held[0].tolist() == [True, True, False, True]
        day = pd.Timestamp("2023-01-01").value // 86_400_000_000_000
        assert snapshot.first_days[0, 1] == day
        assert snapshot.first_days[0, 2] == NEVER
        assert snapshot.last_col[0] == 3


def test_snapshot_of_a_bank_without_any_adoption() -> None:
    """Customers but no adoption yet (a bank's first import): every customer holds nothing."""
    frame = pd.DataFrame(
        {"customer_id": [], "product_code": [], "adopted_at": [], "closed_at": []}
    ).astype({"adopted_at": "datetime64[ns]", "closed_at": "datetime64[ns]"})
    index = AdoptionIndex.from_frame(frame, customer_ids=["A", "B"], product_codes=["x", "y"])
    snapshot = index.snapshot(to_ns("2024-01-10"))
    assert not snapshot.held.any()
    assert snapshot.last_col.tolist() == [-1, -1]
    assert snapshot.last_day.tolist() == [NEVER, NEVER]
