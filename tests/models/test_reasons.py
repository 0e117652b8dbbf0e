"""Reasons worth saying: rules chosen by lift (models/rules.py), profile claims
(models/reasons.py), and the display order of rules."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from models.data import BankData
from models.reasons import (
    ProfileRates,
    multiplier_text,
    profile_columns,
    profile_sentence,
)
from models.rules import (
    REASON_MIN_CUSTOMERS,
    Rule,
    RuleSet,
    mine_sequence_rules,
    rules_for_display,
)
from models.sequences import adoption_sequences, first_adoption_matrix


def _rule(
    antecedent: tuple[str, ...],
    consequent: str,
    *,
    confidence: float,
    lift: float,
    conviction: float = 1.0,
    n: int = 100,
    ordered: bool = False,
) -> Rule:
    return Rule(antecedent, consequent, 0.01, confidence, lift, conviction, n, 2 * n, 30.0, ordered)


# --------------------------------------------------------------------------- rules


def test_reasons_for_never_gives_a_rule_with_lift_at_or_below_one() -> None:
    # The example: the most confident rule argues against the offer.
    weak = _rule(("current_account",), "term_deposit", confidence=0.9, lift=0.62)
    flat = _rule(("current_account",), "savings", confidence=0.5, lift=1.0)
    strong = _rule(("current_account",), "credit_card", confidence=0.1, lift=2.5)
    weaker_but_confident = _rule(("current_account",), "credit_card", confidence=0.8, lift=1.1)
    rules = RuleSet([weak, flat, strong, weaker_but_confident], "sequence", {})
    held = ["current_account"]
    assert rules.best_rules(held) == {
        "term_deposit": weak,
        "credit_card": weaker_but_confident,
        "savings": flat,
    }
    assert rules.reasons_for(held) == {"credit_card": strong}


def test_reasons_for_needs_enough_customers_and_ranks_by_lift_conviction_confidence() -> None:
    few = _rule(("a",), "x", confidence=0.9, lift=9.0, n=REASON_MIN_CUSTOMERS - 1)
    enough = _rule(("a",), "x", confidence=0.2, lift=3.0, n=REASON_MIN_CUSTOMERS)
    assert RuleSet([few, enough], "sequence", {}).reasons_for(["a"]) == {"x": enough}
    assert RuleSet([few], "sequence", {}).reasons_for(["a"]) == {}
    assert RuleSet([few], "sequence", {}).reasons_for(["a"], min_customers=1) == {"x": few}
    by_conviction = _rule(("b",), "x", confidence=0.2, lift=3.0, conviction=1.4)
    by_confidence = _rule(("a", "b"), "x", confidence=0.3, lift=3.0, conviction=1.2)
    same = _rule(("b",), "y", confidence=0.5, lift=2.0)
    more = _rule(("a",), "y", confidence=0.6, lift=2.0)
    rules = RuleSet([enough, by_confidence, by_conviction, same, more], "sequence", {})
    assert rules.reasons_for(["a", "b"]) == {"x": by_conviction, "y": more}
    # Best first across consequents, by the same order.
    assert list(rules.reasons_for(["a", "b"])) == ["x", "y"]


def test_reasons_for_keeps_order_and_held_products() -> None:
    ordered = _rule(("a", "b"), "c", confidence=0.5, lift=4.0, ordered=True)
    rules = RuleSet([ordered], "sequence", {})
    assert rules.reasons_for(["a", "b"]) == {"c": ordered}
    assert rules.reasons_for(["b", "a"]) == {}
    assert rules.reasons_for(["a", "b", "c"]) == {}


def _brute_force(rules: RuleSet, held: list[str], min_lift: float, min_n: int) -> dict[str, Rule]:
    position = {code: i for i, code in enumerate(held)}
    best: dict[str, tuple[tuple[float, float, float, int, int], Rule]] = {}
    for index, rule in enumerate(rules.rules):
        if rule.lift <= min_lift or rule.n_customers < min_n or rule.consequent in position:
            continue
        if not all(a in position for a in rule.antecedent):
            continue
        if rule.ordered and any(
            position[a] >= position[b] for a, b in itertools.pairwise(rule.antecedent)
        ):
            continue
        key = (-rule.lift, -rule.conviction, -rule.confidence, -rule.n_customers, index)
        if rule.consequent not in best or key < best[rule.consequent][0]:
            best[rule.consequent] = (key, rule)
    return {c: rule for c, (_, rule) in sorted(best.items(), key=lambda item: item[1][0])}


def _random_history(seed: int, n: int = 2000, p: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    codes = [f"p{j}" for j in range(p)]
    # Products 0 -> 1 -> 2 tend to follow each other (lift above 1); the rest are noise.
    days = rng.integers(0, 2000, size=(n, p)).astype(float)
    days[:, 1] = days[:, 0] + rng.integers(1, 200, size=n)
    days[:, 2] = np.where(rng.random(n) < 0.5, days[:, 1] + 30, days[:, 2])
    taken = rng.random((n, p)) < np.array([0.6, 0.1, 0.1, 0.3, 0.2, 0.2])
    taken[:, 1] |= taken[:, 0] & (rng.random(n) < 0.6)
    taken[:, 2] |= taken[:, 1] & (rng.random(n) < 0.5)
    customers, products = np.nonzero(taken)
    return pd.DataFrame(
        {
            "customer_id": [f"C{i}" for i in customers],
            "product_code": [codes[j] for j in products],
            "adopted_at": pd.Timestamp("2015-01-01")
            + pd.to_timedelta(days[customers, products], unit="D"),
        }
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_reasons_for_equals_a_brute_force_choice(seed: int) -> None:
    history = _random_history(seed)
    settings = {"min_support": 0.005, "min_confidence": 0.01, "max_antecedent": 2}
    ordered = mine_sequence_rules(history, ordered=True, **settings)  # type: ignore[arg-type]
    unordered = mine_sequence_rules(history, **settings)  # type: ignore[arg-type]
    rules = RuleSet(ordered.rules + unordered.rules, "sequence", {})
    lifts = [rule.lift for rule in rules.rules]
    assert min(lifts) < 1 < max(lifts)  # both kinds, or the test proves nothing
    sequences = adoption_sequences(first_adoption_matrix(history))
    said = 0
    for sequence in sequences[:400]:
        held = list(sequence)
        for min_lift, min_n in ((1.0, REASON_MIN_CUSTOMERS), (1.2, 1)):
            found = rules.reasons_for(held, min_lift=min_lift, min_customers=min_n)
            assert found == _brute_force(rules, held, min_lift, min_n), held
            assert list(found) == list(_brute_force(rules, held, min_lift, min_n))
            said += len(found)
    assert said > 0
    # The model's features are untouched: best_rules still goes by confidence.
    for sequence in sequences[:50]:
        for code, rule in rules.best_rules(list(sequence)).items():
            applicable = [
                r
                for r in rules.rules
                if r.consequent == code
                and all(a in sequence for a in r.antecedent)
                and (
                    not r.ordered
                    or all(
                        sequence.index(a) < sequence.index(b)
                        for a, b in itertools.pairwise(r.antecedent)
                    )
                )
            ]
            assert rule.confidence == max(r.confidence for r in applicable)


def test_rules_for_display_orders_as_reasons_and_counts_what_is_left_out() -> None:
    low = _rule(("a",), "x", confidence=0.9, lift=0.6)
    one = _rule(("a",), "y", confidence=0.8, lift=1.0)
    thin = _rule(("b",), "x", confidence=0.7, lift=5.0, n=3)
    mid = _rule(("b",), "y", confidence=0.2, lift=2.0, conviction=1.1)
    mid_more = _rule(("c",), "y", confidence=0.3, lift=2.0, conviction=1.3)
    top = _rule(("c",), "x", confidence=0.1, lift=3.0, conviction=math.inf)
    rules = RuleSet([low, one, thin, mid, mid_more, top], "sequence", {})
    shown, left_out = rules_for_display(rules)
    assert shown == [top, mid_more, mid]
    assert left_out == 3
    shown, left_out = rules_for_display(rules, limit=2)
    assert (shown, left_out) == ([top, mid_more], 4)
    shown, left_out = rules_for_display([r for r in rules.rules if r.consequent == "x"])
    assert (shown, left_out) == ([top], 2)
    shown, left_out = rules_for_display(rules, min_customers=1, min_lift=0.0)
    assert shown == [thin, top, mid_more, mid, one, low] and left_out == 0
    with pytest.raises(ValueError, match="limit"):
        rules_for_display(rules, limit=-1)
    # The first rule shown for a product is the one a decision would say.
    for code in ("x", "y"):
        said = rules.reasons_for(["a", "b", "c"]).get(code)
        first = next(r for r in rules_for_display(rules)[0] if r.consequent == code)
        assert said == first


# --------------------------------------------------------------------------- profiles

AS_OF = dt.date(2026, 1, 1)


def _planted_bank(seed: int = 3, n: int = 6000) -> BankData:
    """Customers aged 25-34 take 'card' four times as often as the rest within the last
    year; income and region are noise; 'loan' is taken by nobody's profile in
    particular."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(18, 80, size=n)
    birth = [AS_OF.replace(year=AS_OF.year - int(a)) - dt.timedelta(days=10) for a in ages]
    young = (ages >= 25) & (ages < 35)
    card = rng.random(n) < np.where(young, 0.2, 0.05)
    loan = rng.random(n) < 0.08
    held_before = rng.random(n) < 0.1  # held card since before the window: not at risk
    customers = pd.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(n)],
            "segment": rng.choice(["mass", "affluent"], size=n),
            "joined_at": "2015-01-01",
            "birth_date": [b.isoformat() for b in birth],
            "income": rng.lognormal(8, 0.5, size=n).round(),
            "region": rng.choice(["north", "south", "east"], size=n),
            "gender": rng.choice(["F", "M"], size=n),
        }
    )
    rows = []
    for i in range(n):
        if held_before[i]:
            rows.append((f"C{i:05d}", "card", "2020-05-01"))
        elif card[i]:
            rows.append((f"C{i:05d}", "card", f"2025-{rng.integers(1, 13):02d}-15"))
        if loan[i]:
            rows.append((f"C{i:05d}", "loan", f"2025-{rng.integers(1, 13):02d}-10"))
        rows.append((f"C{i:05d}", "account", "2016-01-01"))
    adoptions = pd.DataFrame(rows, columns=["customer_id", "product_code", "adopted_at"])
    products = pd.DataFrame({"product_code": ["account", "card", "loan"], "value": [1, 1, 1]})
    return BankData.from_frames(products, customers, adoptions)


def _hand_rates(data: BankData, code: str, group: pd.Series) -> tuple[float, float, int]:
    """Take-up over the year before AS_OF in ``group`` and overall, by pandas alone."""
    start = pd.Timestamp(AS_OF) - pd.Timedelta(days=365)
    frame = data.adoptions[data.adoptions["product_code"] == code]
    held = set(frame.loc[frame["adopted_at"] < start, "customer_id"])
    took = set(
        frame.loc[
            (frame["adopted_at"] >= start) & (frame["adopted_at"] < pd.Timestamp(AS_OF)),
            "customer_id",
        ]
    )
    ids = data.customers["customer_id"]
    at_risk = ~ids.isin(held)
    adopted = at_risk & ids.isin(took)
    overall = adopted.sum() / at_risk.sum()
    rate = (adopted & group).sum() / (at_risk & group).sum()
    return float(rate), float(overall), int((adopted & group).sum())


def test_a_planted_profile_is_found_and_its_multiplier_is_the_counted_ratio() -> None:
    data = _planted_bank()
    columns = {"card": ("age", "attr_income", "attr_region"), "loan": ("age", "attr_region")}
    rates = ProfileRates.measure(data, as_of=AS_OF, columns=columns)
    bands = rates.bands(data)
    age = [c.column for c in rates.columns].index("age")
    ages = (pd.Timestamp(AS_OF) - data.customers["birth_date"]).dt.days // 365.25
    young = (ages >= 25) & (ages < 35)
    rate, overall, adopters = _hand_rates(data, "card", young)
    assert 2 < rate / overall < 3
    young_row = int(np.flatnonzero(young.to_numpy())[0])
    # The age group alone (the first of card's columns), as counted by hand.
    by_group = dict(rates.groups["card"])
    alone = by_group[(0,)][(int(bands[young_row, age]),)]
    assert alone.nouns == ("age",)
    assert alone.ratio == pytest.approx(rate / overall)
    assert alone.n_customers == adopters
    assert alone.overall == pytest.approx(overall)
    # The customer's claim is the strongest group they are in: this one, or a stronger
    # pair with age.
    claim = rates.claim("card", rates.key("card", tuple(bands[young_row])) or ())
    assert claim is not None and "age" in claim.nouns
    assert claim.ratio >= alone.ratio
    sentence = profile_sentence(claim, "a card")
    shown = re.search(r"took a card ([0-9.]+)\N{MULTIPLICATION SIGN} as often", sentence)
    assert shown is not None
    assert float(shown.group(1)) == math.floor(claim.ratio * 10) / 10
    assert float(shown.group(1)) <= claim.ratio < float(shown.group(1)) + 0.1
    # Every claim is a group of customers the customer is in, counted by hand.
    for row in np.flatnonzero(bands[:, age] > 0)[:300]:
        found = rates.claim("card", rates.key("card", tuple(bands[row])) or ())
        if found is None:
            assert not young.iloc[row]
            continue
        assert found.ratio >= 1.5 and found.n_customers >= 30
    # Nobody's age makes them take a loan: no claim for it.
    assert all(
        rates.claim("loan", rates.key("loan", tuple(row)) or ()) is None for row in bands[:500]
    )


def test_batch_and_single_customer_bands_agree() -> None:
    from service.decision.state import customer_states  # the states serving builds

    data = _planted_bank(n=800)
    columns = {"card": ("age", "attr_income", "attr_region", "segment", "tenure_days")}
    rates = ProfileRates.measure(data, as_of=AS_OF, columns=columns, min_customers=5)
    bands = rates.bands(data)
    assert (bands > 0).all()
    states = customer_states(data)
    for row, cid in enumerate(data.customers["customer_id"]):
        assert rates.bands_of(states[cid]) == tuple(bands[row].tolist())
    # Unknown values are in no band.
    blank = states["C00000"].__class__(customer_id="new")
    assert rates.bands_of(blank) == (0,) * len(rates.columns)


def test_profile_columns_are_the_models_strongest_sayable_ones() -> None:
    importance = pd.DataFrame(
        {
            "product_code": ["card"] * 6 + ["loan"] * 2,
            "feature": [
                "held_loan",
                "attr_gender",
                "age",
                "attr_income",
                "rule_conf_card",
                "attr_Marital Status",
                "tenure_days",
                "branch_id",
            ],
            "gain": [90.0, 80.0, 50.0, 60.0, 70.0, 40.0, 0.0, 5.0],
        }
    )
    found = profile_columns(importance, ["gender", "income", "Marital Status"])
    assert found == {"card": ("attr_income", "age"), "loan": ()}
    assert profile_columns(importance, ["income"], limit=1)["card"] == ("attr_income",)


@pytest.mark.parametrize(
    ("ratio", "text"),
    [(1.5, "1.5"), (2.99, "2.9"), (3.0, "3.0"), (2.3, "2.3"), (9.99, "9.9"), (12.7, "12")],
)
def test_multiplier_is_rounded_down(ratio: float, text: str) -> None:
    assert multiplier_text(ratio) == f"{text}\N{MULTIPLICATION SIGN}"
