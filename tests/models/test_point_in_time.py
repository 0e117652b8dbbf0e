"""Point-in-time attributes: features at a cutoff read the values held at that cutoff."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.data import BankData
from models.features import FeatureBuilder, FeatureSpec
from models.synthetic import generate_bank

CHANGE = pd.Timestamp("2024-06-01")


def _small_bank(history: pd.DataFrame | None) -> BankData:
    products = pd.DataFrame(
        {
            "product_code": ["current_account", "premium_card"],
            "value": [1.0, 5.0],
            "segments": ["", "affluent"],
        }
    )
    customers = pd.DataFrame(
        {
            "customer_id": ["C1", "C2", "C3"],
            "segment": ["affluent", "mass", "mass"],
            "branch_id": ["B1", "B2", "B2"],
            "joined_at": ["2018-01-01", "2018-01-01", "2018-01-01"],
            "birth_date": ["1980-01-01", "1990-01-01", "1985-01-01"],
            "income": [5000.0, 1000.0, 300.0],
            "region": ["north", "north", "east"],
        }
    )
    adoptions = pd.DataFrame(
        {
            "customer_id": ["C1", "C2", "C3"],
            "product_code": ["current_account"] * 3,
            "adopted_at": ["2018-01-01"] * 3,
        }
    )
    return BankData.from_frames(products, customers, adoptions, attribute_history=history)


def _history() -> pd.DataFrame:
    # C1 earned 3000 in the south, in the mass segment, until the change on 2024-06-01;
    # C3's income rose twice. Given out of order: the bank sorts it.
    return pd.DataFrame(
        {
            "customer_id": ["C3", "C1", "C1", "C1", "C3"],
            "attribute": ["income", "income", "region", "segment", "income"],
            "changed_at": ["2024-01-01", "2024-06-01", "2024-06-01", "2024-06-01", "2023-01-01"],
            "previous": ["200", "3000", "south", "mass", "100"],
        }
    )


def _row(data: BankData, as_of: str) -> dict[str, dict[str, object]]:
    spec = FeatureSpec.fit(data, rule_features=False)
    frame = FeatureBuilder(spec).build(data, as_of=as_of)
    out: dict[str, dict[str, object]] = {}
    for i, cid in enumerate(frame.customer_ids):
        out[str(cid)] = {
            "income": float(frame.column("attr_income")[i]),
            "region": spec.display_value("attr_region", float(frame.column("attr_region")[i])),
            "segment": spec.display_value("segment", float(frame.column("segment")[i])),
            "raw_segment": frame.segments[i],
        }
    return out


def test_a_later_value_never_reaches_an_earlier_cutoff() -> None:
    data = _small_bank(_history())
    before = _row(data, "2024-03-01")
    assert before["C1"] == {
        "income": 3000.0,
        "region": "south",  # a level only the history holds
        "segment": "mass",
        "raw_segment": "mass",  # eligibility reads the segment of the day too
    }
    # A change dated on the cutoff has not happened at the cutoff (as an adoption).
    assert _row(data, "2024-06-01")["C1"] == before["C1"]
    assert _row(data, "2024-06-02")["C1"] == {
        "income": 5000.0,
        "region": "north",
        "segment": "affluent",
        "raw_segment": "affluent",
    }
    # A customer without history reads the values held now at every cutoff.
    assert before["C2"] == {
        "income": 1000.0,
        "region": "north",
        "segment": "mass",
        "raw_segment": "mass",
    }


@pytest.mark.parametrize(
    ("as_of", "income"),
    [
        ("2019-06-01", 100.0),  # the value before the first change extends back
        ("2023-01-01", 100.0),
        ("2023-01-02", 200.0),
        ("2023-12-31", 200.0),
        ("2024-01-02", 300.0),
        ("2026-01-01", 300.0),
    ],
)
def test_several_changes_are_read_in_order(as_of: str, income: float) -> None:
    assert _row(_small_bank(_history()), as_of)["C3"]["income"] == income


def test_one_prepared_bank_serves_every_cutoff() -> None:
    data = _small_bank(_history())
    builder = FeatureBuilder(FeatureSpec.fit(data, rule_features=False))
    prepared = builder.prepare(data)
    early = builder.build(prepared, as_of="2024-03-01")
    late = builder.build(prepared, as_of="2024-07-01")
    again = builder.build(prepared, as_of="2024-03-01")
    np.testing.assert_array_equal(again.values, early.values)
    assert not np.array_equal(early.values, late.values)
    # Building at an early cutoff leaves the prepared (current) values untouched.
    np.testing.assert_array_equal(builder.build(prepared, as_of="2024-07-01").values, late.values)


# --------------------------------------------------------------------------- an oracle


@pytest.fixture(scope="module")
def bank_with_history() -> tuple[BankData, pd.DataFrame]:
    """A synthetic bank and a random history of income, region and segment changes."""
    bank = generate_bank(3_000, seed=5)
    rng = np.random.default_rng(8)
    ids = bank.customers["customer_id"].to_numpy(dtype=object)
    pieces = []
    for name, values in (
        ("income", rng.integers(500, 20_000, 4_000).astype(float).astype(object)),
        ("region", rng.choice(["north", "south", "east", "west", "islands"], 4_000)),
        ("segment", rng.choice(["youth", "mass", "affluent", "private"], 4_000)),
    ):
        pieces.append(
            pd.DataFrame(
                {
                    "customer_id": rng.choice(ids, 4_000),
                    "attribute": name,
                    "changed_at": pd.Timestamp("2021-01-01")
                    + pd.to_timedelta(rng.integers(0, 1_600, 4_000), unit="D"),
                    "previous": values,
                }
            )
        )
    history = pd.concat(pieces, ignore_index=True)
    history = history.drop_duplicates(["customer_id", "attribute", "changed_at"])
    # Some earlier values unknown.
    history.loc[rng.random(len(history)) < 0.05, "previous"] = None
    data = BankData.from_frames(
        bank.products, bank.customers, bank.adoptions, attribute_history=history
    )
    return data, history


def _held_at(data: BankData, history: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """The customers table as it was at ``as_of``, one change at a time (slow, plain)."""
    customers = data.customers.copy().set_index("customer_id")
    first_later: dict[tuple[str, str], tuple[pd.Timestamp, object]] = {}
    for cid, name, changed, previous in history.itertuples(index=False):
        key = (str(cid), str(name))
        if changed >= as_of and (key not in first_later or changed < first_later[key][0]):
            first_later[key] = (changed, previous)
    for (cid, name), (_, previous) in first_later.items():
        customers.loc[cid, name] = np.nan if previous is None else previous
    return customers.reset_index()


@pytest.mark.parametrize("as_of", ["2021-06-15", "2023-03-01", "2025-01-01", "2030-01-01"])
def test_features_equal_those_of_a_bank_holding_the_values_of_the_day(
    bank_with_history: tuple[BankData, pd.DataFrame], as_of: str
) -> None:
    data, history = bank_with_history
    cutoff = pd.Timestamp(as_of)
    spec = FeatureSpec.fit(data, rule_features=False)
    built = FeatureBuilder(spec).build(data, as_of=cutoff)

    then = BankData.from_frames(
        data.products,
        _held_at(data, history, cutoff),
        data.adoptions,
        attribute_kinds=data.attribute_kinds,
    )
    expected = FeatureBuilder(spec).build(then, as_of=cutoff)
    np.testing.assert_array_equal(built.customer_ids, expected.customer_ids)
    np.testing.assert_array_equal(built.values, expected.values)
    assert [s if isinstance(s, str) else None for s in built.segments] == [
        s if isinstance(s, str) else None for s in expected.segments
    ]


# --------------------------------------------------------------------------- no history


def test_without_history_the_features_are_those_of_the_customers_table(
    bank_with_history: tuple[BankData, pd.DataFrame],
) -> None:
    data, history = bank_with_history
    plain = BankData.from_frames(
        data.products, data.customers, data.adoptions, attribute_kinds=data.attribute_kinds
    )
    empty = BankData.from_frames(
        data.products,
        data.customers,
        data.adoptions,
        attribute_kinds=data.attribute_kinds,
        attribute_history=history.iloc[:0],
    )
    spec = FeatureSpec.fit(plain, rule_features=False)
    assert FeatureSpec.fit(empty, rule_features=False) == spec
    for as_of in ("2021-06-15", "2025-01-01"):
        reference = FeatureBuilder(spec).build(plain, as_of=as_of)
        np.testing.assert_array_equal(
            FeatureBuilder(spec).build(empty, as_of=as_of).values, reference.values
        )
    # After the last change, the history reads as the values held now.
    after = pd.Timestamp(history["changed_at"].max()) + pd.Timedelta(days=1)
    np.testing.assert_array_equal(
        FeatureBuilder(spec).build(data, as_of=after).values,
        FeatureBuilder(spec).build(plain, as_of=after).values,
    )


# --------------------------------------------------------------------------- the frame


def test_history_from_a_folder_is_read_by_attribute_kind(tmp_path: Path) -> None:
    data = _small_bank(None)
    data.products.assign(segments=["", "affluent"]).to_csv(tmp_path / "products.csv", index=False)
    data.customers.to_csv(tmp_path / "customers.csv", index=False)
    data.adoptions.to_csv(tmp_path / "adoptions.csv", index=False)
    _history().to_csv(tmp_path / "attribute_history.csv", index=False)
    loaded = BankData.from_folder(tmp_path)
    assert loaded.attribute_history is not None
    c1 = loaded.attribute_history[loaded.attribute_history["customer_id"] == "C1"]
    assert dict(zip(c1["attribute"], c1["previous"], strict=True)) == {
        "income": 3000.0,
        "region": "south",
        "segment": "mass",
    }
    assert _row(loaded, "2024-03-01") == _row(_small_bank(_history()), "2024-03-01")


def test_history_naming_unknown_customers_or_attributes_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attribute"):
        _small_bank(_history().assign(attribute="shoe_size"))
    with pytest.raises(ValueError, match="unknown value"):
        _small_bank(_history().assign(customer_id="C9"))
    with pytest.raises(ValueError, match="not a number"):
        _small_bank(_history().assign(previous="lots"))
