"""The feature builder: one definition per column, no leakage, batch == one customer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.data import AdoptionIndex, BankData
from models.features import (
    FeatureBuilder,
    FeatureSpec,
    RuleTable,
    _encode,
    _encode_one,
    build_features,
    features_for_customer,
    mine_rules,
)
from models.rules import RuleSet, best_rule_confidence
from models.sequences import NEVER
from models.synthetic import SyntheticBank, generate_bank

AS_OF = pd.Timestamp("2024-06-01")


@pytest.fixture(scope="module")
def bank() -> SyntheticBank:
    return generate_bank(6_000, seed=21)


@pytest.fixture(scope="module")
def data(bank: SyntheticBank) -> BankData:
    """The synthetic bank with random offer outcomes, so every column kind is present."""
    rng = np.random.default_rng(4)
    n = 4_000
    outcomes = pd.DataFrame(
        {
            "customer_id": rng.choice(bank.customers["customer_id"].to_numpy(), n),
            "product_code": rng.choice(bank.products["product_code"].to_numpy(), n),
            "outcome": rng.choice(["declined", "accepted", "ignored"], n),
            "occurred_at": pd.Timestamp("2024-01-01")
            + pd.to_timedelta(rng.integers(0, 300, n), unit="D"),
        }
    )
    return BankData.from_frames(bank.products, bank.customers, bank.adoptions, outcomes=outcomes)


def _rules(data: BankData, as_of: pd.Timestamp) -> RuleSet:
    ids = data.customers["customer_id"].to_numpy(dtype=object)
    index = AdoptionIndex.from_frame(
        data.adoptions, customer_ids=ids, product_codes=data.product_codes
    )
    return mine_rules(
        index,
        data.product_codes,
        as_of=as_of,
        min_support=0.002,
        min_confidence=0.02,
        within_days=90,
    )


def _future_rewritten(data: BankData, as_of: pd.Timestamp, seed: int) -> BankData:
    """Every adoption and closure on or after ``as_of`` moved, dropped or invented."""
    rng = np.random.default_rng(seed)
    adoptions = data.adoptions.copy()
    later = adoptions["adopted_at"] >= as_of
    adoptions.loc[later, "adopted_at"] = as_of + pd.to_timedelta(
        rng.integers(0, 400, int(later.sum())), unit="D"
    )
    closes_later = adoptions["closed_at"] >= as_of
    adoptions.loc[closes_later, "closed_at"] = np.where(
        rng.random(int(closes_later.sum())) < 0.5,
        pd.NaT,
        as_of + pd.to_timedelta(rng.integers(0, 400, int(closes_later.sum())), unit="D"),
    )
    # Still-open holdings may now close in the future; a few future rows disappear.
    still_open = adoptions["closed_at"].isna() & (adoptions["adopted_at"] < as_of)
    adoptions.loc[still_open & (rng.random(len(adoptions)) < 0.3), "closed_at"] = as_of
    adoptions = adoptions[~(later.to_numpy() & (rng.random(len(adoptions)) < 0.3))]
    invented = pd.DataFrame(
        {
            "customer_id": rng.choice(data.customers["customer_id"].to_numpy(), 3_000),
            "product_code": rng.choice(np.asarray(data.product_codes), 3_000),
            "adopted_at": as_of + pd.to_timedelta(rng.integers(0, 300, 3_000), unit="D"),
            "closed_at": pd.NaT,
        }
    )
    assert data.outcomes is not None
    outcomes = data.outcomes.copy()
    outcomes.loc[outcomes["occurred_at"] >= as_of, "outcome"] = "declined"
    return BankData.from_frames(
        data.products,
        data.customers,
        pd.concat([adoptions, invented], ignore_index=True).sample(frac=1.0, random_state=seed),
        attribute_kinds=data.attribute_kinds,
        outcomes=outcomes,
    )


# --------------------------------------------------------------------------- leakage


@pytest.mark.parametrize("as_of", [AS_OF, pd.Timestamp("2022-11-17 15:45")])
def test_no_information_from_on_or_after_as_of(data: BankData, as_of: pd.Timestamp) -> None:
    spec = FeatureSpec.fit(data)
    rules = _rules(data, as_of)
    before = FeatureBuilder(spec, rules).build(data, as_of=as_of)

    changed = _future_rewritten(data, as_of, seed=1)
    assert not changed.adoptions.equals(data.adoptions)
    changed_rules = _rules(changed, as_of)
    assert changed_rules.to_json() == rules.to_json()
    after = FeatureBuilder(spec, changed_rules).build(changed, as_of=as_of)

    np.testing.assert_array_equal(after.customer_ids, before.customer_ids)
    np.testing.assert_array_equal(after.values, before.values)


def test_customers_who_joined_on_or_after_as_of_are_left_out(data: BankData) -> None:
    frame = build_features(data, as_of=AS_OF, rules=None)
    joined = data.customers.set_index("customer_id").loc[frame.customer_ids, "joined_at"]
    assert (joined < AS_OF).all()
    assert len(frame) == int((data.customers["joined_at"] < AS_OF).sum())


# --------------------------------------------------------------------------- one customer


def test_one_customer_rows_equal_the_batch_rows(data: BankData) -> None:
    spec = FeatureSpec.fit(data)
    assert any(c.startswith("declined_recently_") for c in spec.columns)
    rules = _rules(data, AS_OF)
    builder = FeatureBuilder(spec, rules)
    batch = builder.build(data, as_of=AS_OF)
    checked = 0
    for row in range(0, len(batch), 9):
        state = data.customer_state(str(batch.customer_ids[row]))
        one = builder.for_customer(state, as_of=AS_OF)
        np.testing.assert_array_equal(one, batch.values[row], err_msg=str(batch.customer_ids[row]))
        checked += 1
    assert checked > 500
    state = data.customer_state(str(batch.customer_ids[0]))
    np.testing.assert_array_equal(
        features_for_customer(state, as_of=AS_OF, spec=spec, rules=rules),
        batch.values[0],
    )


def test_one_customer_given_loosely_typed_values(data: BankData) -> None:
    """The service may hand over ints, strings and dates: the row is the same."""
    spec = FeatureSpec.fit(data, rule_features=False)
    builder = FeatureBuilder(spec)
    batch = builder.build(data, as_of=AS_OF)
    state = data.customer_state(str(batch.customer_ids[3]))
    loose = type(state)(
        customer_id=state.customer_id,
        segment=state.segment,
        branch_id=state.branch_id,
        joined_at=str(state.joined_at),
        birth_date=None if state.birth_date is None else pd.Timestamp(state.birth_date).date(),
        attributes={
            k: (int(v) if isinstance(v, float) and v.is_integer() else v)
            for k, v in state.attributes.items()
        },
        adoptions=state.adoptions,
        outcomes=state.outcomes,
    )
    np.testing.assert_array_equal(builder.for_customer(loose, as_of=AS_OF), batch.values[3])


# --------------------------------------------------------------------------- columns


@pytest.fixture
def tiny() -> BankData:
    products = pd.DataFrame({"product_code": ["acc", "card", "loan"]})
    customers = pd.DataFrame(
        {
            "customer_id": ["A", "B"],
            "segment": ["mass", "never_seen"],
            "branch_id": ["B1", None],
            "joined_at": ["2020-01-01", None],
            "birth_date": ["1990-06-01", None],
            "income": [2500.0, None],
            "region": ["north", "south"],
        }
    )
    adoptions = pd.DataFrame(
        {
            "customer_id": ["A", "A", "A", "B", "A"],
            "product_code": ["acc", "card", "card", "acc", "loan"],
            "adopted_at": ["2020-01-01", "2021-01-01", "2023-01-01", "2022-05-01", "2024-06-01"],
            "closed_at": [None, "2022-01-01", None, "2023-01-01", None],
        }
    )
    return BankData.from_frames(products, customers, adoptions)


def test_columns_by_hand(tiny: BankData) -> None:
    spec = FeatureSpec.fit(tiny, rule_features=False)
    levels = dict(spec.levels)
    levels["segment"] = ("mass",)  # "never_seen" was not seen at training time
    spec = FeatureSpec(spec.product_codes, spec.attributes, levels, rule_features=False)
    frame = FeatureBuilder(spec).build(tiny, as_of="2024-06-01")
    a = dict(zip(spec.columns, frame.values[0].tolist(), strict=True))
    b = dict(zip(spec.columns, frame.values[1].tolist(), strict=True))
    day = pd.Timestamp("2024-06-01")

    assert (a["held_acc"], a["held_card"], a["held_loan"]) == (1, 1, 0)  # loan: on as_of
    assert (a["ever_acc"], a["ever_card"], a["ever_loan"]) == (1, 1, 0)
    assert a["days_since_first_card"] == (day - pd.Timestamp("2021-01-01")).days  # first one
    assert np.isnan(a["days_since_first_loan"])
    assert (a["n_held"], a["n_ever"]) == (2, 2)
    assert spec.display_value("last_product", a["last_product"]) == "card"
    assert a["days_since_last_adoption"] == (day - pd.Timestamp("2023-01-01")).days
    assert a["tenure_days"] == (day - pd.Timestamp("2020-01-01")).days
    assert a["age"] == 34  # the birthday is on as_of
    assert spec.display_value("segment", a["segment"]) == "mass"
    assert a["attr_income"] == 2500.0
    assert spec.display_value("attr_region", a["attr_region"]) == "north"

    assert (b["held_acc"], b["ever_acc"]) == (0, 1)  # closed
    assert np.isnan(b["segment"])  # unseen level
    assert np.isnan(b["branch_id"]) and np.isnan(b["tenure_days"]) and np.isnan(b["age"])
    assert np.isnan(b["attr_income"])


def test_outcome_counts_use_only_the_window_before_as_of(tiny: BankData) -> None:
    outcomes = pd.DataFrame(
        {
            "customer_id": ["A", "A", "A", "A"],
            "product_code": ["loan", "loan", "loan", "card"],
            "outcome": ["declined", "declined", "declined", "accepted"],
            "occurred_at": ["2024-05-31", "2024-03-01", "2024-06-01", "2024-05-01"],
        }
    )
    data = BankData.from_frames(tiny.products, tiny.customers, tiny.adoptions, outcomes=outcomes)
    spec = FeatureSpec.fit(data, rule_features=False, outcome_window_days=60)
    frame = FeatureBuilder(spec).build(data, as_of="2024-06-01")
    # 2024-05-31 counts; 2024-03-01 is outside 60 days; 2024-06-01 is not before as_of.
    assert frame.column("declined_recently_loan").tolist() == [1.0, 0.0]
    assert frame.column("declined_recently_card").tolist() == [0.0, 0.0]


def test_rule_table_equals_best_rule_confidence(data: BankData) -> None:
    rules = _rules(data, AS_OF)
    frame = build_features(data, as_of=AS_OF, rules=rules)
    table = RuleTable.compile(rules, frame.spec.product_codes)
    assert table.n_groups > 20
    expected = best_rule_confidence(frame.ever, frame.first_days, frame.spec.product_codes, rules)
    np.testing.assert_array_equal(table.confidence(frame.ever, frame.first_days), expected)
    for row in range(0, len(frame), 50):
        np.testing.assert_array_equal(
            table.confidence(frame.ever[row : row + 1], frame.first_days[row : row + 1])[0],
            expected[row],
        )
        for j in np.flatnonzero(expected[row] > 0)[:3]:
            rule = table.best_rule(frame.ever[row : row + 1], frame.first_days[row : row + 1], j)
            assert rule is not None and rule.confidence == expected[row, j]
    assert (frame.first_days == NEVER).any()


def test_spec_json_round_trip_and_tampering(data: BankData) -> None:
    spec = FeatureSpec.fit(data)
    assert FeatureSpec.from_json(spec.to_json()) == spec
    assert FeatureSpec.from_json(spec.to_json()).columns == spec.columns
    tampered = spec.to_json().replace('"attr_income"', '"attr_salary"', 1)
    with pytest.raises(ValueError, match="columns"):
        FeatureSpec.from_json(tampered)
    with pytest.raises(ValueError, match="version"):
        FeatureSpec.from_json(spec.to_json().replace('"version": 1', '"version": 9'))


def test_labels_are_readable(data: BankData) -> None:
    spec = FeatureSpec.fit(data)
    names = {"mortgage": "Mortgage"}
    assert spec.label("held_mortgage", names) == "holds Mortgage"
    assert spec.label("days_since_first_mortgage", names) == "days since first Mortgage"
    assert spec.label("rule_conf_mortgage", names) == "best rule confidence for Mortgage"
    assert spec.label("declined_recently_mortgage", names) == "declined Mortgage offers recently"
    assert spec.label("attr_marital_status") == "marital status"
    assert spec.label("tenure_days") == "days as a customer"


def test_building_chosen_rows_equals_their_rows_of_the_full_build(data: BankData) -> None:
    """Training builds features only for its sampled rows: each equals the full row."""
    spec = FeatureSpec.fit(data)
    builder = FeatureBuilder(spec, _rules(data, AS_OF))
    prepared = builder.prepare(data)
    full = builder.build(prepared, as_of=AS_OF)
    rng = np.random.default_rng(5)
    chosen = rng.choice(len(full), size=300, replace=False)  # any order
    part = builder.build(prepared, as_of=AS_OF, rows=full.rows[chosen])
    np.testing.assert_array_equal(part.rows, full.rows[chosen])
    np.testing.assert_array_equal(part.customer_ids, full.customer_ids[chosen])
    np.testing.assert_array_equal(part.values, full.values[chosen])
    assert part.rule_confidence is not None and full.rule_confidence is not None
    np.testing.assert_array_equal(part.rule_confidence, full.rule_confidence[chosen])
    np.testing.assert_array_equal(part.held, full.held[chosen])
    np.testing.assert_array_equal(part.ages, full.ages[chosen])
    np.testing.assert_array_equal(part.segments, full.segments[chosen])
    with pytest.raises(ValueError, match="positions of the bank"):
        builder.build(prepared, as_of=AS_OF, rows=[len(data.customers)])


def test_encoding_looks_up_each_distinct_value_once_with_the_same_result() -> None:
    mapping = {"a": 0.0, "1": 1.0, "2": 2.0}
    values = np.array(
        ["a", None, 1.0, np.nan, pd.NA, "1", 2, "zz", 1.5, np.float64(2.0), "a"], dtype=object
    )
    expected = [_encode_one(mapping, v) for v in values]
    np.testing.assert_array_equal(_encode(mapping, values), np.asarray(expected))
    assert _encode(mapping, np.array([], dtype=object)).shape == (0,)
