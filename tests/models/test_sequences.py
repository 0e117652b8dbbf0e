"""Adoption matrices and sequences (models/sequences.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.sequences import (
    NEVER,
    adoption_sequences,
    first_adoption_matrix,
    held_matrix,
    to_days,
)


def _day(date: str) -> int:
    return int(to_days([date])[0])


def _adoptions(rows: list[tuple[str, str, str, str | None]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["customer_id", "product_code", "adopted_at", "closed_at"])
    frame["adopted_at"] = pd.to_datetime(frame["adopted_at"])
    frame["closed_at"] = pd.to_datetime(frame["closed_at"])
    return frame


@pytest.fixture
def adoptions() -> pd.DataFrame:
    return _adoptions(
        [
            ("c2", "CC", "2020-03-01", "2020-06-01"),
            ("c2", "CC", "2020-09-01", None),  # re-opened: first adoption stays March
            ("c2", "ACC", "2020-01-01", None),
            ("c1", "ACC", "2020-01-01", None),
            ("c1", "INS", "2020-01-01", "2021-01-01"),  # same day as ACC
            ("c1", "LOAN", "2021-01-01", None),  # exactly at the cutoff used below
            ("c3", "LOAN", "2021-02-01", None),  # only after the cutoff
        ]
    )


def test_to_days_floors_to_the_calendar_day() -> None:
    assert to_days(["1970-01-01", "1970-01-01 23:59", "1969-12-31 12:00"]).tolist() == [0, 0, -1]
    aware = pd.Series(pd.to_datetime(["2020-01-01 00:30"])).dt.tz_localize("Europe/Prague")
    # The local wall-clock date counts, not the UTC one (2019-12-31 23:30 UTC).
    assert to_days(aware).tolist() == [_day("2020-01-01")]


def test_first_adoption_matrix_defaults(adoptions: pd.DataFrame) -> None:
    matrix = first_adoption_matrix(adoptions)
    assert matrix.customer_ids.tolist() == ["c1", "c2", "c3"]
    assert matrix.product_codes == ("ACC", "CC", "INS", "LOAN")
    assert matrix.first_days.dtype == np.int32
    expected = [
        [_day("2020-01-01"), NEVER, _day("2020-01-01"), _day("2021-01-01")],
        [_day("2020-01-01"), _day("2020-03-01"), NEVER, NEVER],
        [NEVER, NEVER, NEVER, _day("2021-02-01")],
    ]
    assert matrix.first_days.tolist() == expected
    assert matrix.as_of is None
    # Without a cutoff every adoption day is fully observed: the horizon is the day after
    # the last adoption (re-adoptions included).
    assert matrix.horizon_day == _day("2021-02-02")
    assert matrix.adopted.sum() == 6


def test_first_adoption_matrix_as_of_is_strict(adoptions: pd.DataFrame) -> None:
    matrix = first_adoption_matrix(adoptions, as_of="2021-01-01")
    # c3 adopted nothing before the cutoff, so is not a customer yet; c1's LOAN, stamped
    # exactly at the cutoff, is not seen; LOAN then has no adopter and no column.
    assert matrix.customer_ids.tolist() == ["c1", "c2"]
    assert matrix.product_codes == ("ACC", "CC", "INS")
    assert matrix.as_of == pd.Timestamp("2021-01-01")
    assert matrix.horizon_day == _day("2021-01-01")
    # A cutoff at noon leaves its own day only half seen.
    assert first_adoption_matrix(adoptions, as_of="2021-01-01 12:00").horizon_day == _day(
        "2021-01-01"
    )


def test_first_adoption_matrix_explicit_labels(adoptions: pd.DataFrame) -> None:
    matrix = first_adoption_matrix(
        adoptions, as_of="2021-01-01", product_codes=["INS", "CC"], customer_ids=["c2", "zz", "c1"]
    )
    assert matrix.customer_ids.tolist() == ["c2", "zz", "c1"]
    assert matrix.product_codes == ("INS", "CC")
    assert matrix.first_days.tolist() == [
        [NEVER, _day("2020-03-01")],
        [NEVER, NEVER],  # unknown customer: a row of NEVER
        [_day("2020-01-01"), NEVER],
    ]


def test_first_adoption_matrix_rejects_bad_input(adoptions: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="missing column"):
        first_adoption_matrix(adoptions.drop(columns="adopted_at"))
    broken = adoptions.copy()
    broken.loc[0, "adopted_at"] = pd.NaT
    with pytest.raises(ValueError, match="must not be missing"):
        first_adoption_matrix(broken)
    with pytest.raises(ValueError, match="unique"):
        first_adoption_matrix(adoptions, customer_ids=["c1", "c1"])


def test_held_matrix_follows_adoptions_and_closures(adoptions: pd.DataFrame) -> None:
    # On 2020-07-01 c2's first credit card is closed and the second not yet open.
    held = held_matrix(adoptions, at="2020-07-01")
    assert held.tolist() == [[True, False, True], [True, False, False]]
    # On 2021-01-01 c1's INS closes at that very instant: still held (not before `at`);
    # c2's re-opened card is held; c1's LOAN, adopted at that instant, is not.
    held = held_matrix(adoptions, at="2021-01-01")
    assert held.tolist() == [[True, False, True], [True, True, False]]
    assert held_matrix(adoptions, at="2021-01-02")[0].tolist() == [True, False, False, True]


def test_held_matrix_aligns_with_first_adoption_matrix(adoptions: pd.DataFrame) -> None:
    at = "2021-01-02"
    matrix = first_adoption_matrix(adoptions, as_of=at)
    held = held_matrix(adoptions, at=at)
    assert held.shape == matrix.first_days.shape
    # Held implies adopted; the difference is exactly the closed holdings (c1's INS).
    assert not (held & ~matrix.adopted).any()
    assert np.argwhere(matrix.adopted & ~held).tolist() == [[0, 2]]
    explicit = held_matrix(adoptions, at=at, product_codes=["LOAN"], customer_ids=["c3", "c1"])
    assert explicit.tolist() == [[False], [True]]


def test_adoption_sequences_orders_by_first_adoption(adoptions: pd.DataFrame) -> None:
    sequences = adoption_sequences(first_adoption_matrix(adoptions))
    assert sequences.to_dict() == {
        # ACC and INS on the same day keep column order.
        "c1": ("ACC", "INS", "LOAN"),
        "c2": ("ACC", "CC"),
        "c3": ("LOAN",),
    }
    assert sequences.index.name == "customer_id"


def test_first_adoption_matrix_handles_many_customers_quickly() -> None:
    rng = np.random.default_rng(7)
    n = 200_000
    frame = pd.DataFrame(
        {
            "customer_id": rng.integers(0, n, 3 * n),
            "product_code": rng.choice(np.array(["A", "B", "C", "D"]), 3 * n),
            "adopted_at": pd.Timestamp("2015-01-01")
            + pd.to_timedelta(rng.integers(0, 3000, 3 * n), unit="D"),
        }
    )
    matrix = first_adoption_matrix(frame)
    expected = frame.groupby(["customer_id", "product_code"])["adopted_at"].min()
    rows = np.searchsorted(matrix.customer_ids, expected.index.get_level_values(0))
    cols = [matrix.product_codes.index(code) for code in expected.index.get_level_values(1)]
    assert (matrix.first_days[rows, cols] == to_days(expected.reset_index(drop=True))).all()
    assert matrix.adopted.sum() == len(expected)
