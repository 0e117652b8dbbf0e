"""Eligibility: each rule on its own, the reasons in words, and batch == one customer."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from models.data import Adoption, BankData, CustomerState
from models.eligibility import (
    RULES,
    Catalogue,
    check_eligibility,
    eligible_matrix,
    eligible_products,
)
from models.synthetic import SyntheticBank, generate_bank, true_propensities

AT = pd.Timestamp("2024-06-01")


def _catalogue(**changes: object) -> Catalogue:
    """One product ``p`` with the given rules, plus ``a``, ``b`` and ``x`` to hold."""
    base: dict[str, object] = {
        "product_code": "p",
        "name": "Product",
        "active": True,
        "min_age": None,
        "max_age": None,
        "segments": None,
        "requires": None,
        "excludes": None,
    }
    base.update(changes)
    frame = pd.DataFrame(
        [base, {"product_code": "a"}, {"product_code": "b"}, {"product_code": "x"}]
    )
    return Catalogue.from_products(
        BankData.from_frames(frame, _NO_CUSTOMERS, _NO_ADOPTIONS).products
    )


_NO_CUSTOMERS = pd.DataFrame({"customer_id": pd.Series([], dtype="str")})
_NO_ADOPTIONS = pd.DataFrame(
    {"customer_id": [], "product_code": [], "adopted_at": pd.Series([], dtype="datetime64[ns]")}
)


def _customer(
    *held: str, birth: dt.date | None = dt.date(1990, 1, 1), segment: str | None = "mass"
) -> CustomerState:
    return CustomerState(
        customer_id="C1",
        segment=segment,
        birth_date=birth,
        adoptions=tuple(Adoption(code, "2020-01-01") for code in held),
    )


def _reasons(catalogue: Catalogue, state: CustomerState, at: pd.Timestamp = AT) -> tuple[str, ...]:
    result = check_eligibility(state, catalogue, at)
    assert ("p" in result.eligible) == ("p" not in result.reasons)
    return result.reasons.get("p", ())


def test_an_unrestricted_product_is_eligible() -> None:
    assert _reasons(_catalogue(), _customer()) == ()
    assert "p" in eligible_products(_customer(), _catalogue(), AT)


def test_inactive_product_is_never_eligible() -> None:
    assert _reasons(_catalogue(active=False), _customer()) == ("not active",)


def test_held_product_is_not_offered_again_until_closed() -> None:
    catalogue = _catalogue()
    assert _reasons(catalogue, _customer("p")) == ("already held",)
    closed = CustomerState("C1", adoptions=(Adoption("p", "2020-01-01", "2024-05-31"),))
    assert _reasons(catalogue, closed) == ()
    adopted_at_the_instant = CustomerState("C1", adoptions=(Adoption("p", AT),))
    assert _reasons(catalogue, adopted_at_the_instant) == ()


@pytest.mark.parametrize(
    ("birth", "expected"),
    [
        (dt.date(2006, 6, 2), ("age 17 below minimum 18",)),  # 18 tomorrow
        (dt.date(2006, 6, 1), ()),  # 18 today: the birthday counts
        (dt.date(1959, 6, 2), ()),  # 64 until tomorrow
        (dt.date(1959, 6, 1), ("age 65 above maximum 64",)),
        (None, ()),  # unknown age passes the age rules
    ],
)
def test_age_limits_are_inclusive(birth: dt.date | None, expected: tuple[str, ...]) -> None:
    catalogue = _catalogue(min_age=18, max_age=64)
    assert _reasons(catalogue, _customer(birth=birth)) == expected


def test_segment_must_be_listed() -> None:
    catalogue = _catalogue(segments="affluent|private")
    assert _reasons(catalogue, _customer(segment="affluent")) == ()
    assert _reasons(catalogue, _customer(segment="mass")) == (
        "segment mass not in affluent|private",
    )
    assert _reasons(catalogue, _customer(segment=None)) == (
        "segment unknown not in affluent|private",
    )


def test_every_required_product_must_be_held() -> None:
    catalogue = _catalogue(requires="a|b")
    assert _reasons(catalogue, _customer("a", "b")) == ()
    assert _reasons(catalogue, _customer("a")) == ("requires b",)
    assert _reasons(catalogue, _customer()) == ("requires a, b",)
    closed = CustomerState(
        "C1", adoptions=(Adoption("a", "2020-01-01"), Adoption("b", "2020-01-01", "2021-01-01"))
    )
    assert _reasons(catalogue, closed) == ("requires b",)


def test_no_excluded_product_may_be_held() -> None:
    catalogue = _catalogue(excludes="x")
    assert _reasons(catalogue, _customer("a")) == ()
    assert _reasons(catalogue, _customer("x")) == ("excluded by x held",)


def test_every_failed_rule_is_reported_in_order() -> None:
    catalogue = _catalogue(active=False, min_age=30, requires="a", excludes="x")
    assert _reasons(catalogue, _customer("x", "p", birth=dt.date(2000, 1, 1))) == (
        "not active",
        "already held",
        "age 24 below minimum 30",
        "requires a",
        "excluded by x held",
    )


def test_catalogue_refuses_unknown_required_products() -> None:
    frame = pd.DataFrame([{"product_code": "p", "requires": "ghost"}])
    products = BankData.from_frames(frame, _NO_CUSTOMERS, _NO_ADOPTIONS).products
    with pytest.raises(ValueError, match="ghost"):
        Catalogue.from_products(products)


def test_catalogue_records_round_trip() -> None:
    catalogue = _catalogue(min_age=18, segments="affluent", requires="a", excludes="x")
    again = Catalogue.from_records(catalogue.to_records())
    assert again.to_records() == catalogue.to_records()


# --------------------------------------------------------------------------- whole banks


@pytest.fixture(scope="module")
def bank() -> SyntheticBank:
    return generate_bank(4_000, seed=8)


def test_matrix_equals_the_one_customer_check(bank: SyntheticBank) -> None:
    """One implementation: the matrix and the per-customer check agree everywhere."""
    data = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    catalogue = Catalogue.from_data(data)
    at = pd.Timestamp("2023-03-15")
    matrix = eligible_matrix(data, at=at)
    assert matrix.shape == (len(data.customers), len(catalogue))
    ids = data.customers["customer_id"].tolist()
    for row in range(0, len(ids), 11):
        result = check_eligibility(data.customer_state(ids[row]), catalogue, at)
        expected = [code for j, code in enumerate(catalogue.product_codes) if matrix[row, j]]
        assert list(result.eligible) == expected
        assert set(result.reasons) == set(catalogue.product_codes) - set(expected)


def test_matrix_equals_the_synthetic_banks_own_rules(bank: SyntheticBank) -> None:
    """The simulator decides eligibility by its own code; both must agree exactly."""
    data = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    catalogue = Catalogue.from_data(data)
    last_day = dt.date(2025, 12, 31)
    oracle = true_propensities(
        bank.truth, bank.customers, bank.adoptions, bank.personas, as_of=last_day
    )
    # The oracle's state is at the end of its day: our instant is the next midnight,
    # whose date (for ages) is a day later, so birthdays on that date are left out.
    matrix = eligible_matrix(data, at=pd.Timestamp(last_day) + pd.Timedelta(days=1))
    rows = pd.Index(data.customers["customer_id"]).get_indexer(oracle["customer_id"])
    cols = pd.Index(catalogue.product_codes).get_indexer(oracle["product_code"].astype(str))
    expected = np.zeros_like(matrix)
    expected[rows, cols] = True
    birth = data.customers["birth_date"]
    same = ~((birth.dt.month == 1) & (birth.dt.day == 1)).to_numpy()
    assert matrix.sum() > 10_000
    np.testing.assert_array_equal(matrix[same], expected[same])


def test_rules_are_the_documented_ones() -> None:
    assert RULES == ("inactive", "held", "too_young", "too_old", "segment", "requires", "excludes")
