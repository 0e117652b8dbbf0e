"""Association rules (models/rules.py): baskets, adoption sequences, rule sets, wording."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.rules import (
    BASKET_COLUMNS,
    Rule,
    RuleSet,
    _fpgrowth,
    best_rule_confidence,
    frequent_itemsets,
    mine_basket_rules,
    mine_coholding_rules,
    mine_sequence_rules,
    mine_sequence_rules_from_matrix,
    read_baskets,
    rule_sentence,
)
from models.sequences import NEVER, AdoptionMatrix, adoption_sequences, first_adoption_matrix

GROCERIES = Path(__file__).resolve().parents[3] / "shared" / "data" / "groceries"


# --------------------------------------------------------------------------- baskets


@pytest.fixture(scope="module")
def groceries() -> pd.DataFrame:
    path = GROCERIES / "groceries_tidy.csv"
    if not path.exists():
        pytest.skip(f"Groceries data not found at {path}")
    return read_baskets(path)


@pytest.fixture(scope="module")
def mine_groceries(groceries: pd.DataFrame) -> Callable[..., pd.DataFrame]:
    """mine_basket_rules on Groceries, each setting mined once per module."""
    cache: dict[tuple[float, float, int], pd.DataFrame] = {}

    def mine(min_support: float, min_confidence: float, min_len: int = 1) -> pd.DataFrame:
        key = (min_support, min_confidence, min_len)
        if key not in cache:
            cache[key] = mine_basket_rules(
                groceries, min_support=min_support, min_confidence=min_confidence, min_len=min_len
            )
        return cache[key]

    return mine


def _lengths(rules: pd.DataFrame) -> dict[int, int]:
    sizes = rules["antecedent"].map(len) + 1
    return {int(k): int(v) for k, v in sizes.value_counts().sort_index().items()}


@pytest.mark.parametrize(
    ("min_support", "min_confidence", "min_len", "expected_lengths"),
    [
        (0.001, 0.8, 1, {3: 29, 4: 229, 5: 140, 6: 12}),
        (0.006, 0.25, 2, {2: 150, 3: 297, 4: 16}),
        (0.005, 0.5, 1, {2: 1, 3: 98, 4: 21}),
    ],
)
def test_groceries_reproduces_published_rule_counts(
    mine_groceries: Callable[..., pd.DataFrame],
    min_support: float,
    min_confidence: float,
    min_len: int,
    expected_lengths: dict[int, int],
) -> None:
    rules = mine_groceries(min_support, min_confidence, min_len)
    assert list(rules.columns) == list(BASKET_COLUMNS)
    assert len(rules) == sum(expected_lengths.values())  # 410, 463 and 120
    assert _lengths(rules) == expected_lengths
    assert rules["lift"].is_monotonic_decreasing
    assert (rules["count"] >= math.ceil(min_support * 9835)).all()


def test_groceries_top_lift_rule(mine_groceries: Callable[..., pd.DataFrame]) -> None:
    rules = mine_groceries(0.001, 0.8)
    top = rules.iloc[0]
    assert top["antecedent"] == ("liquor", "red/blush wine")
    assert top["consequent"] == "bottled beer"
    assert top["count"] == 19  # of the 21 baskets with liquor and red/blush wine
    assert top["support"] == pytest.approx(0.001932, abs=5e-7)
    assert top["confidence"] == pytest.approx(0.9048, abs=5e-5)
    assert top["lift"] == pytest.approx(11.235, abs=5e-4)
    # 39 of the 410 rules have confidence exactly 4/5; for 4 of them the ratio of float
    # supports (count / 9835) / (antecedent / 9835) rounds below 0.8, so a float
    # comparison would report 406 rules.
    antecedent_counts = (rules["count"] / rules["confidence"]).round().astype(int)
    at_threshold = [
        Fraction(int(c), int(a)) == Fraction(4, 5)
        for c, a in zip(rules["count"], antecedent_counts, strict=True)
    ]
    assert sum(at_threshold) == 39


def test_groceries_min_len_one_adds_the_empty_antecedent_rule(
    mine_groceries: Callable[..., pd.DataFrame],
) -> None:
    # arules' default minlen=1 allows {} => {whole milk}: its support 0.2555 beats 0.25.
    rules = mine_groceries(0.006, 0.25)
    assert len(rules) == 464
    empty = rules[rules["antecedent"] == ()]
    assert empty["consequent"].tolist() == ["whole milk"]
    assert empty["confidence"].iloc[0] == empty["support"].iloc[0] == 2513 / 9835
    assert empty["lift"].iloc[0] == 1.0


def _baskets(*baskets: str) -> pd.DataFrame:
    rows = [(i, item) for i, basket in enumerate(baskets) for item in basket]
    return pd.DataFrame(rows, columns=["transaction_id", "item"])


def test_basket_rules_small_example_by_hand() -> None:
    # a: 3 of 5 baskets, b: 3, {a, b}: 2, c: 1 (below the support count of 2).
    baskets = _baskets("ab", "ab", "a", "b", "c")
    rules = mine_basket_rules(baskets, min_support=0.4, min_confidence=0.6)
    by_rule = {(r.antecedent, r.consequent): r for r in rules.itertuples()}
    # {} => a has confidence 3/5, exactly the threshold: kept.
    assert set(by_rule) == {((), "a"), ((), "b"), (("a",), "b"), (("b",), "a")}
    a_to_b = by_rule[(("a",), "b")]
    assert a_to_b.support == 2 / 5
    assert a_to_b.confidence == 2 / 3
    assert a_to_b.lift == (2 / 3) / (3 / 5)
    assert a_to_b.conviction == pytest.approx((1 - 3 / 5) / (1 - 2 / 3))
    assert a_to_b.count == 2
    assert len(mine_basket_rules(baskets, min_support=0.4, min_confidence=0.6, min_len=2)) == 2
    assert mine_basket_rules(baskets, min_support=0.4, min_confidence=0.6, max_len=1)[
        "antecedent"
    ].tolist() == [(), ()]


def test_basket_support_threshold_is_exact() -> None:
    # 0.1 * 30 is 3.0000000000000004 in floating point; an itemset in exactly 3 of 30
    # baskets still has support 0.1 and must be kept (plain mlxtend would need 4).
    baskets = _baskets(*(["xy"] * 3 + ["z"] * 27))
    rules = mine_basket_rules(baskets, min_support=0.1, min_confidence=1.0, min_len=2)
    assert sorted(rules["consequent"]) == ["x", "y"]
    assert rules["conviction"].tolist() == [math.inf, math.inf]


def test_read_baskets(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("transaction_id,item,extra\n007,NA,1\n007,milk,2\n")
    frame = read_baskets(good)
    assert frame.to_dict("list") == {"transaction_id": ["007", "007"], "item": ["NA", "milk"]}

    bad = tmp_path / "bad.csv"
    bad.write_text("basket,product\n1,milk\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['transaction_id', 'item'\]"):
        read_baskets(bad)

    holes = tmp_path / "holes.csv"
    holes.write_text("transaction_id,item\n1,milk\n2,\n")
    with pytest.raises(ValueError, match="first on line 3"):
        read_baskets(holes)


# --------------------------------------------------------------------------- sequences

# A = everyday account, B = credit card, C = home insurance, D = loan. Cutoff 2021-01-01.
#
# customer  A           B           C           D           notes
#  1        2020-01-01  2020-02-01  2020-03-01              A<B, C 29 days after B
#  2        2020-01-01  2020-03-01  2020-06-01              A<B, C 92 days after B
#  3        2020-01-01  2020-01-11  2020-01-21              A<B, C 10 days after B
#  4        2020-02-01  2020-01-01  2020-04-01              B<A, C 60 days after A
#  5        2020-01-01  2020-02-01                          A<B, no C
#  6        2020-01-01  2020-02-01  2020-01-15              C before B: not at risk
#  7        2020-01-01  2020-01-01  2020-02-01              A,B same day, C 31 days later
#  8        2020-01-01                                      no B
#  9        2020-01-01  2020-12-15  2021-01-20              C after the cutoff (36 days)
# 10-12                                         2020-01-01  D only
# 13                                            2021-02-01  after the cutoff only
#
# Before the cutoff there are N = 12 customers (13 adopted nothing yet) and C's base
# rate is 6/12 (customers 1, 2, 3, 4, 6, 7).
_TABLE = {
    "1": {"A": "2020-01-01", "B": "2020-02-01", "C": "2020-03-01"},
    "2": {"A": "2020-01-01", "B": "2020-03-01", "C": "2020-06-01"},
    "3": {"A": "2020-01-01", "B": "2020-01-11", "C": "2020-01-21"},
    "4": {"A": "2020-02-01", "B": "2020-01-01", "C": "2020-04-01"},
    "5": {"A": "2020-01-01", "B": "2020-02-01"},
    "6": {"A": "2020-01-01", "B": "2020-02-01", "C": "2020-01-15"},
    "7": {"A": "2020-01-01", "B": "2020-01-01", "C": "2020-02-01"},
    "8": {"A": "2020-01-01"},
    "9": {"A": "2020-01-01", "B": "2020-12-15", "C": "2021-01-20"},
    "10": {"D": "2020-01-01"},
    "11": {"D": "2020-01-01"},
    "12": {"D": "2020-01-01"},
    "13": {"D": "2021-02-01"},
}
AS_OF = "2021-01-01"


@pytest.fixture
def adoptions() -> pd.DataFrame:
    rows = [
        (customer, product, pd.Timestamp(date), pd.NaT)
        for customer, products in _TABLE.items()
        for product, date in products.items()
    ]
    return pd.DataFrame(rows, columns=["customer_id", "product_code", "adopted_at", "closed_at"])


def _find(rules: RuleSet, antecedent: tuple[str, ...], consequent: str) -> Rule:
    found = [r for r in rules.rules if r.antecedent == antecedent and r.consequent == consequent]
    assert len(found) == 1, f"{antecedent} => {consequent}: {found}"
    return found[0]


def _mine(adoptions: pd.DataFrame, **settings: object) -> RuleSet:
    options: dict[str, object] = {"min_support": 0.05, "min_confidence": 0.0, "as_of": AS_OF}
    options.update(settings)
    return mine_sequence_rules(adoptions, **options)  # type: ignore[arg-type]


def test_unordered_sequence_rule_by_hand(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions)
    rule = _find(rules, ("A", "B"), "C")
    # Completed {A, B}: 1-7 and 9. At risk (no C on or before t_X): all but 6 -> 7.
    # Hits (C after t_X, before the cutoff): 1, 2, 3, 4, 7 -> 5 (9's C is after it).
    assert (rule.n_customers, rule.n_at_risk) == (5, 7)
    assert rule.support == 5 / 12
    assert rule.confidence == 5 / 7
    assert rule.lift == (5 / 7) / (6 / 12)  # 10/7
    assert rule.conviction == (1 - 6 / 12) / (1 - 5 / 7)  # 7/4
    # Days from t_X to C: 29, 92, 10, 60, 31 -> median 31.
    assert rule.median_days == 31.0
    assert rule.ordered is False
    assert rules.mode == "sequence"
    assert rules.params["n_customers"] == 12
    assert rules.params["as_of"] == "2021-01-01T00:00:00"


def test_ordered_rules_exclude_b_then_a(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions, ordered=True)
    a_then_b = _find(rules, ("A", "B"), "C")
    # A strictly before B: 1, 2, 3, 5, 6, 9 (not 4: B first; not 7: same day).
    # At risk: all but 6 -> 5; hits 1, 2, 3 -> 3; days 29, 92, 10 -> median 29.
    assert (a_then_b.n_customers, a_then_b.n_at_risk) == (3, 5)
    assert a_then_b.support == 3 / 12
    assert a_then_b.confidence == 3 / 5
    assert a_then_b.lift == (3 / 5) / (6 / 12)  # 6/5
    assert a_then_b.conviction == (1 - 6 / 12) / (1 - 3 / 5)  # 5/4
    assert a_then_b.median_days == 29.0
    assert a_then_b.ordered is True
    # B then A: only customer 4, who then took C 60 days later.
    b_then_a = _find(rules, ("B", "A"), "C")
    assert (b_then_a.n_customers, b_then_a.n_at_risk) == (1, 1)
    assert b_then_a.confidence == 1.0
    assert b_then_a.conviction == math.inf
    assert b_then_a.median_days == 60.0
    assert all(rule.ordered for rule in rules.rules)


def test_within_days_counts_only_fully_observed_windows(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions, within_days=30)
    rule = _find(rules, ("A", "B"), "C")
    # The 30-day window after t_X must end before the cutoff: t_X <= 2020-12-01. That
    # drops customer 9 (t_X = 2020-12-15) from the 7 at risk -> 6. Hits within 30
    # days: 1 (29 days) and 3 (10 days); 7 (31 days) is one day late.
    assert (rule.n_customers, rule.n_at_risk) == (2, 6)
    assert rule.confidence == 2 / 6
    assert rule.support == 2 / 12
    assert rule.median_days == 19.5


def test_within_days_window_boundary() -> None:
    # Cutoff 2021-01-01, 30-day window: completing on 2020-12-01 leaves the window
    # (Dec 1, Dec 31] fully seen; completing on 2020-12-02 needs 2021-01-01, unseen.
    frame = pd.DataFrame(
        {
            "customer_id": ["early", "early", "late", "late"],
            "product_code": ["A", "C", "A", "C"],
            "adopted_at": pd.to_datetime(["2020-12-01", "2020-12-31", "2020-12-02", "2020-12-31"]),
            "closed_at": pd.NaT,
        }
    )
    rules = _mine(frame, within_days=30)
    rule = _find(rules, ("A",), "C")
    assert (rule.n_customers, rule.n_at_risk) == (1, 1)


def test_as_of_ignores_later_adoptions(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions, as_of=None)
    rule = _find(rules, ("A", "B"), "C")
    # Without a cutoff customer 13 counts (N = 13), C's base rate is 7/13 and 9's C,
    # 36 days after B, is a hit: 6 hits of 7 at risk, days 10, 29, 31, 36, 60, 92.
    assert (rule.n_customers, rule.n_at_risk) == (6, 7)
    assert rule.support == 6 / 13
    assert rule.lift == (6 / 7) / (7 / 13)
    assert rule.median_days == 33.5
    # With the cutoff nothing after it leaks in, even for products only adopted later.
    cut = _mine(adoptions, as_of="2020-01-02")
    assert cut.params["product_codes"] == ["A", "B", "D"]  # no C by then
    assert {r.consequent for r in cut.rules} <= {"A", "B", "D"}


def test_sequence_thresholds_are_inclusive_and_exact(adoptions: pd.DataFrame) -> None:
    key = (("A", "B"), "C")

    def kept(**settings: object) -> bool:
        rules = _mine(adoptions, ordered=True, **settings)
        return key in {(r.antecedent, r.consequent) for r in rules.rules}

    # Ordered A, B => C: 3 hits of N = 12, confidence 3/5, lift 6/5.
    assert kept(min_support=0.25) and not kept(min_support=0.26)
    assert kept(min_confidence=0.6) and not kept(min_confidence=0.61)
    assert kept(min_lift=1.2) and not kept(min_lift=1.21)
    assert kept(min_customers=3) and not kept(min_customers=4)
    assert not kept(max_antecedent=1)


def test_coholding_rules(adoptions: pd.DataFrame) -> None:
    rules = mine_coholding_rules(
        adoptions, min_support=0.05, min_confidence=0.0, max_antecedent=2, as_of=AS_OF
    )
    rule = _find(rules, ("A", "B"), "C")
    # Holding A and B: 1-7 and 9 (8 customers); of those also C: 1, 2, 3, 4, 6, 7.
    assert (rule.n_customers, rule.n_at_risk) == (6, 8)
    assert rule.confidence == 6 / 8
    assert rule.support == 6 / 12
    assert rule.median_days is None
    assert rules.mode == "coholding"
    assert all(len(r.antecedent) in (1, 2) for r in rules.rules)


def test_sequence_miner_finds_a_planted_sequence() -> None:
    # Customers who take A and then B take C within 30-90 days 70% of the time; C is
    # otherwise rare. The miner must rank (A, B) => C first among rules for C.
    rng = np.random.default_rng(42)
    n = 20_000
    start = pd.Timestamp("2018-01-01")
    rows = []
    takes_a = rng.random(n) < 0.6
    takes_b = rng.random(n) < 0.5
    a_day = rng.integers(0, 300, n)
    b_day = a_day + rng.integers(1, 300, n)
    planted = takes_a & takes_b & (rng.random(n) < 0.7)
    noise = rng.random(n) < 0.05
    c_day = np.where(planted, b_day + rng.integers(30, 91, n), rng.integers(0, 900, n))
    for i in range(n):
        rows.append((i, "D", start))
        if takes_a[i]:
            rows.append((i, "A", start + pd.Timedelta(days=int(a_day[i]))))
        if takes_b[i]:
            rows.append((i, "B", start + pd.Timedelta(days=int(b_day[i]))))
        if planted[i] or noise[i]:
            rows.append((i, "C", start + pd.Timedelta(days=int(c_day[i]))))
    frame = pd.DataFrame(rows, columns=["customer_id", "product_code", "adopted_at"])
    rules = mine_sequence_rules(frame, min_support=0.01, min_confidence=0.1, ordered=True)
    for_c = rules.for_consequent("C")
    assert for_c[0].antecedent == ("A", "B")
    assert for_c[0].confidence > 0.69  # planted 0.7, plus noise (0.72 here)
    assert for_c[0].lift > 2.5
    assert 30 <= (for_c[0].median_days or 0) <= 90


@pytest.mark.parametrize(
    ("ordered", "within_days"), [(False, None), (True, None), (False, 30), (True, 30)]
)
def test_sequence_miner_matches_a_per_customer_reference(
    ordered: bool, within_days: int | None
) -> None:
    # Small random histories with many same-day ties, checked against the definitions
    # applied one customer at a time: same rules, same counts, same medians.
    rng = np.random.default_rng(3)
    n, codes = 1000, ["A", "B", "C", "D", "E"]
    held = rng.random((n, len(codes))) < [0.8, 0.5, 0.4, 0.3, 0.2]
    days = rng.integers(0, 120, (n, len(codes)))
    customers, products = np.nonzero(held)
    frame = pd.DataFrame(
        {
            "customer_id": customers,
            "product_code": np.array(codes)[products],
            "adopted_at": pd.Timestamp("2020-01-01")
            + pd.to_timedelta(days[customers, products], unit="D"),
        }
    )
    as_of = pd.Timestamp("2020-04-10")
    mined = mine_sequence_rules(
        frame,
        as_of=as_of,
        ordered=ordered,
        within_days=within_days,
        min_support=0.005,
        min_confidence=0.05,
        min_lift=0.3,
    )
    got = {
        (r.antecedent, r.consequent): (r.n_customers, r.n_at_risk, r.median_days)
        for r in mined.rules
    }

    matrix = first_adoption_matrix(frame, as_of=as_of)
    people = [
        {code: int(d) for code, d in zip(matrix.product_codes, row, strict=True) if d != NEVER}
        for row in matrix.first_days
    ]
    base = {code: sum(code in p for p in people) for code in matrix.product_codes}
    expected: dict[tuple[tuple[str, ...], str], tuple[int, int, float]] = {}
    for size in (1, 2):
        pick = itertools.permutations if ordered else itertools.combinations
        for antecedent in pick(matrix.product_codes, size):
            for consequent in set(matrix.product_codes) - set(antecedent):
                hits, at_risk, waits = 0, 0, []
                for p in people:
                    if any(a not in p for a in antecedent):
                        continue
                    if ordered and any(p[a] >= p[b] for a, b in itertools.pairwise(antecedent)):
                        continue
                    t = max(p[a] for a in antecedent)
                    if within_days is not None and not t + within_days < matrix.horizon_day:
                        continue
                    if consequent in p and p[consequent] <= t:
                        continue
                    at_risk += 1
                    wait = p[consequent] - t if consequent in p else None
                    if wait is not None and (within_days is None or wait <= within_days):
                        hits += 1
                        waits.append(wait)
                if (
                    hits >= Fraction(5, 1000) * len(people)
                    and hits >= Fraction(5, 100) * at_risk
                    and hits * len(people) >= Fraction(3, 10) * at_risk * base[consequent]
                ):
                    expected[(antecedent, consequent)] = (
                        hits,
                        at_risk,
                        float(np.median(waits)),
                    )
    assert len(expected) > 20
    assert any(len(antecedent) == 2 for antecedent, _ in expected)
    assert got == expected


# --------------------------------------------------------------------------- rule sets


def test_rule_set_json_round_trip(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions, ordered=True, within_days=300)
    assert any(math.isinf(r.conviction) for r in rules.rules)
    text = rules.to_json()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads(text, parse_constant=refuse)  # strict JSON: no Infinity / NaN
    loaded = RuleSet.from_json(text)
    assert loaded == rules
    assert loaded.to_json() == text
    assert loaded.best_rules(["A", "B"]) == rules.best_rules(["A", "B"])
    with pytest.raises(ValueError, match="not an nbo.rules document"):
        RuleSet.from_json("{}")


def test_rule_set_frame_and_for_consequent(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions)
    frame = rules.to_frame()
    assert list(frame.columns) == [
        "antecedent",
        "consequent",
        "support",
        "confidence",
        "lift",
        "conviction",
        "n_customers",
        "n_at_risk",
        "median_days",
        "ordered",
    ]
    assert len(frame) == len(rules.rules)
    for_c = rules.for_consequent("C")
    assert for_c and all(rule.consequent == "C" for rule in for_c)
    confidences = [rule.confidence for rule in for_c]
    assert confidences == sorted(confidences, reverse=True)


def test_best_rules_by_hand(adoptions: pd.DataFrame) -> None:
    rules = _mine(adoptions, ordered=True)
    # For C, after A then B: A => C has 6/9, B => C 5/7, (A, B) => C 3/5: B => C wins.
    best = rules.best_rules(["A", "B"])
    assert best["C"] == _find(rules, ("B",), "C")
    assert "A" not in best and "B" not in best
    # After B then A the ordered rule (B, A) => C (confidence 1) applies instead.
    assert rules.best_rules(["B", "A"])["C"] == _find(rules, ("B", "A"), "C")
    # Repeats are ignored; unknown products are harmless.
    assert rules.best_rules(["B", "A", "B", "ZZ"])["C"].antecedent == ("B", "A")
    assert rules.best_rules([]) == {}


def _random_history(seed: int, n: int = 3000, p: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    codes = np.array([f"P{j}" for j in range(p)])
    held = rng.random((n, p)) < np.linspace(0.7, 0.15, p)
    # Distinct days within a customer, so orders are never tied.
    days = np.argsort(rng.random((n, p)), axis=1) * 40 + rng.integers(0, 2000, (n, 1))
    # Plant: P0 then P1 makes P4 likely.
    planted = held[:, 0] & held[:, 1] & (days[:, 0] < days[:, 1]) & (rng.random(n) < 0.6)
    held[:, 4] |= planted
    days[:, 4] = np.where(planted, days.max(axis=1) + 10, days[:, 4])
    customers, products = np.nonzero(held)
    return pd.DataFrame(
        {
            "customer_id": customers,
            "product_code": codes[products],
            "adopted_at": pd.Timestamp("2015-01-01")
            + pd.to_timedelta(days[customers, products], unit="D"),
        }
    )


@pytest.fixture(scope="module")
def mixed_rules() -> Iterator[tuple[RuleSet, pd.DataFrame]]:
    history = _random_history(1)
    settings = {"min_support": 0.01, "min_confidence": 0.05, "max_antecedent": 2}
    ordered = mine_sequence_rules(history, ordered=True, **settings)  # type: ignore[arg-type]
    unordered = mine_sequence_rules(history, **settings)  # type: ignore[arg-type]
    yield RuleSet(rules=ordered.rules + unordered.rules, mode="sequence", params={}), history


def test_best_rules_agrees_with_best_rule_confidence(
    mixed_rules: tuple[RuleSet, pd.DataFrame],
) -> None:
    rules, history = mixed_rules
    assert len(rules) > 50
    matrix = first_adoption_matrix(history)
    rng = np.random.default_rng(5)
    # Score on a held matrix that drops a few products (closed), not just ever-adopted.
    held = matrix.adopted & (rng.random(matrix.adopted.shape) < 0.9)
    features = best_rule_confidence(held, matrix.first_days, matrix.product_codes, rules)
    assert features.shape == held.shape
    column = {code: j for j, code in enumerate(matrix.product_codes)}
    sequences = adoption_sequences(matrix)
    for i, sequence in enumerate(sequences):
        held_sequence = [code for code in sequence if held[i, column[code]]]
        expected = np.zeros(len(column))
        for code, rule in rules.best_rules(held_sequence).items():
            expected[column[code]] = rule.confidence
        assert features[i].tolist() == expected.tolist(), held_sequence
    assert (features[held] == 0).all()
    assert (features > 0).any()


def test_best_rule_confidence_ordering_is_strict() -> None:
    rule = Rule(("A", "B"), "C", 0.1, 0.5, 2.0, 1.5, 10, 20, 30.0, True)
    held = np.array([[True, True, False]] * 3)
    days = np.array([[1, 2, 0], [2, 1, 0], [1, 1, 0]])  # A<B, B<A, same day
    result = best_rule_confidence(held, days, ["A", "B", "C"], [rule])
    assert result[:, 2].tolist() == [0.5, 0.0, 0.0]


def test_best_rules_is_fast(mixed_rules: tuple[RuleSet, pd.DataFrame]) -> None:
    rules, _ = mixed_rules
    rules.best_rules(["P0"])  # builds the index
    held = [["P0", "P1"], ["P2"], ["P1", "P0", "P3"], ["P5", "P2", "P1", "P0"]]
    repeats = 500
    began = time.perf_counter()
    for _ in range(repeats):
        for sequence in held:
            rules.best_rules(sequence)
    per_call = (time.perf_counter() - began) / (repeats * len(held))
    # Typically 10-30 microseconds; the bound leaves room for slow CI machines.
    assert per_call < 500e-6


# --------------------------------------------------------------------------- wording

NAMES = {
    "ACC": "an everyday account",
    "CC": "a credit card",
    "INS": "home insurance",
    "LOAN": "a personal loan",
}


def _rule(
    antecedent: tuple[str, ...],
    confidence: float,
    median_days: float | None,
    *,
    ordered: bool = False,
    consequent: str = "INS",
) -> Rule:
    return Rule(antecedent, consequent, 0.1, confidence, 2.0, 1.5, 100, 125, median_days, ordered)


def test_rule_sentence_example() -> None:
    rule = _rule(("ACC", "CC"), 0.8, 120.0)
    assert rule_sentence(rule, NAMES) == (
        "8 in 10 customers with an everyday account and a credit card take home insurance, "
        "usually within 4 months"
    )


@pytest.mark.parametrize(
    ("confidence", "share"),
    [
        (1.0, "All customers"),
        (0.996, "99% of customers"),
        (0.97, "97% of customers"),
        (0.94, "9 in 10 customers"),
        (0.25, "3 in 10 customers"),
        (0.15, "2 in 10 customers"),
        (0.12, "12% of customers"),
        (0.004, "Fewer than 1% of customers"),
    ],
)
def test_rule_sentence_share(confidence: float, share: str) -> None:
    sentence = rule_sentence(_rule(("CC",), confidence, None), NAMES)
    assert sentence == f"{share} with a credit card take home insurance"


@pytest.mark.parametrize(
    ("days", "timing"),
    [
        (1.0, "a day"),
        (9.5, "10 days"),
        (13.0, "13 days"),
        (14.0, "2 weeks"),
        (30.0, "5 weeks"),
        (56.0, "8 weeks"),
        (61.0, "3 months"),
        (365.0, "12 months"),
        (800.0, "3 years"),
    ],
)
def test_rule_sentence_timing(days: float, timing: str) -> None:
    sentence = rule_sentence(_rule(("CC",), 0.5, days), NAMES)
    assert sentence.endswith(f"take home insurance, usually within {timing}")


def test_rule_sentence_ordered_and_long_antecedents() -> None:
    ordered = _rule(("ACC", "CC"), 0.6, 29.0, ordered=True)
    assert rule_sentence(ordered, NAMES) == (
        "6 in 10 customers who took an everyday account and then a credit card go on to take "
        "home insurance, usually within 5 weeks"
    )
    three = _rule(("ACC", "CC", "LOAN"), 0.7, None)
    assert rule_sentence(three, NAMES) == (
        "7 in 10 customers with an everyday account, a credit card and a personal loan take "
        "home insurance"
    )
    assert rule_sentence(_rule((), 0.3, None), NAMES) == "3 in 10 customers take home insurance"
    with pytest.raises(KeyError, match="MORTGAGE"):
        rule_sentence(_rule(("MORTGAGE",), 0.5, None), NAMES)


# --------------------------------------------------------------------------- fast counting


def _random_matrix(rng: np.random.Generator) -> AdoptionMatrix:
    n, p = int(rng.integers(20, 400)), int(rng.integers(2, 7))
    days = rng.integers(0, 60, size=(n, p)).astype(np.int32)
    days[rng.random((n, p)) < rng.uniform(0.2, 0.7)] = NEVER
    return AdoptionMatrix(
        customer_ids=np.arange(n),
        product_codes=tuple(f"p{i}" for i in range(p)),
        first_days=days,
        as_of=pd.Timestamp("2020-03-01"),
        horizon_day=int(rng.integers(30, 80)),
    )


def test_frequent_itemsets_equal_fpgrowth() -> None:
    """The exact counter over distinct rows finds mlxtend's itemsets and counts."""
    rng = np.random.default_rng(3)
    for trial in range(25):
        n, m = int(rng.integers(1, 2_000)), int(rng.integers(1, 10))
        onehot = rng.random((n, m)) < rng.random(m) * 0.6
        min_count, max_len = int(rng.integers(1, 30)), [None, 1, 2, 3][trial % 4]
        found = frequent_itemsets(onehot, min_count, max_len)
        if min_count > n:
            assert found == {}
            continue
        expected = _fpgrowth(onehot, min_count, max_len)
        assert found == dict(zip(expected["itemsets"], expected["count"].tolist(), strict=True))
    wide = rng.random((200, 70)) < 0.3  # more columns than one int64 key holds
    expected = _fpgrowth(wide, 8, 3)
    assert frequent_itemsets(wide, 8, 3) == dict(
        zip(expected["itemsets"], expected["count"].tolist(), strict=True)
    )


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("within_days", [None, 10, 30])
def test_counting_by_completion_equals_the_general_loop(
    ordered: bool, within_days: int | None
) -> None:
    """Antecedents of one product or ordered pairs are counted for all consequents at
    once; the rules equal those the general loop (longer antecedents) mines."""
    rng = np.random.default_rng(11 + (within_days or 0) + ordered)
    mined = 0
    for _ in range(12):
        matrix = _random_matrix(rng)
        settings: dict[str, Any] = {
            "min_support": float(rng.choice([0.0, 0.01, 0.05])),
            "min_confidence": float(rng.choice([0.0, 0.1, 0.3])),
            "min_customers": int(rng.integers(0, 5)),
            "min_lift": [None, 1.0][int(rng.integers(0, 2))],
            "ordered": ordered,
            "within_days": within_days,
        }
        for longest in (1, 2) if ordered else (1,):
            fast = mine_sequence_rules_from_matrix(matrix, max_antecedent=longest, **settings)
            loop = mine_sequence_rules_from_matrix(matrix, max_antecedent=3, **settings)
            expected = [r for r in loop.rules if len(r.antecedent) <= longest]
            assert fast.rules == expected
            mined += len(expected)
    assert mined >= 10
