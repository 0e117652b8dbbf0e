"""The pure decision logic: arbitration, every contact policy, the control group."""

from __future__ import annotations

import datetime as dt
import gc
import itertools

import numpy as np
import pytest

from service.decision.policy import (
    Arbiter,
    ContactHistory,
    Policy,
    in_control_group,
    popular_products,
)

NOW = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
CODES = ("card", "loan", "mortgage", "savings", "travel")
NAN = float("nan")


def ranked(
    propensity: list[float],
    *,
    history: ContactHistory | None = None,
    values: list[float] | None = None,
    weights: list[float] | None = None,
    active: list[bool] | None = None,
    policy: Policy | None = None,
    limit: int = 3,
    explain: bool = True,
):  # noqa: ANN202 - a Ranking
    n = len(CODES)
    arbiter = Arbiter.for_catalogue(
        product_codes=CODES,
        values=np.array(values or [1.0] * n),
        weights=np.array(weights or [1.0] * n),
        active=np.array(active or [True] * n),
        policy=policy or Policy(min_propensity=0.05),
    )
    return arbiter.rank(
        np.array(propensity, dtype=float), history=history, now=NOW, limit=limit, explain=explain
    )


def test_arbitration_is_propensity_times_value_times_weight_ties_by_code() -> None:
    # scores: card .2*10*1=2, loan .1*30*1=3, mortgage .5*4*1=2, savings .4*5*2=4, travel NaN
    result = ranked(
        [0.2, 0.1, 0.5, 0.4, NAN],
        values=[10, 30, 4, 5, 1],
        weights=[1, 1, 1, 2, 1],
        limit=4,
    )
    assert [c.product_code for c in result.offers] == ["savings", "loan", "card", "mortgage"]
    savings = result.offers[0]
    assert (savings.propensity, savings.expected_value, savings.score) == (0.4, 2.0, 4.0)
    assert result.suppressed == {"travel": "held_or_ineligible"}


def test_each_filter_names_its_reason() -> None:
    history = ContactHistory()
    history.add_decline("loan", NOW - dt.timedelta(days=3))
    for i in range(3):
        history.add_offer(f"o{i}", "mortgage", NOW - dt.timedelta(days=i + 1))
    result = ranked(
        [NAN, 0.5, 0.6, 0.01, 0.7],
        history=history,
        active=[True, True, True, True, False],
        policy=Policy(min_propensity=0.05, decline_cooldown_days=30, frequency_cap=3),
    )
    assert result.offers == ()  # an empty answer is a valid answer
    assert result.suppressed == {
        "card": "held_or_ineligible",
        "loan": "declined_recently",
        "mortgage": "frequency_cap",
        "savings": "low_propensity",
        "travel": "inactive",
    }


def test_windows_lapse() -> None:
    history = ContactHistory()
    history.add_decline("loan", NOW - dt.timedelta(days=31))
    for i in range(3):
        history.add_offer(f"o{i}", "mortgage", NOW - dt.timedelta(days=40 + i))
    result = ranked([NAN, 0.5, 0.6, NAN, NAN], history=history)
    assert [c.product_code for c in result.offers] == ["mortgage", "loan"]


def test_caps_per_request_and_per_contact() -> None:
    propensity = [0.5, 0.4, 0.3, 0.2, 0.1]
    assert len(ranked(propensity, limit=2).offers) == 2
    capped = ranked(propensity, limit=10, policy=Policy(max_offers_per_contact=4))
    assert len(capped.offers) == 4


@pytest.mark.parametrize("seed", range(20))
def test_explain_changes_only_the_reasons_given(seed: int) -> None:
    rng = np.random.default_rng(seed)
    propensity = rng.random(len(CODES))
    propensity[rng.random(len(CODES)) < 0.3] = NAN
    history = ContactHistory()
    for k, code in enumerate(CODES):
        if rng.random() < 0.3:
            history.add_decline(code, NOW - dt.timedelta(days=int(rng.integers(0, 60))))
        for i in range(int(rng.integers(0, 4))):
            history.add_offer(f"{k}-{i}", code, NOW - dt.timedelta(days=int(rng.integers(0, 60))))
    active = (rng.random(len(CODES)) < 0.8).tolist()
    full = ranked(propensity.tolist(), history=history, active=active, limit=2)
    lean = ranked(propensity.tolist(), history=history, active=active, limit=2, explain=False)
    assert lean.offers == full.offers
    assert lean.suppressed.items() <= full.suppressed.items()
    offered = {c.product_code for c in full.offers}
    assert offered.isdisjoint(full.suppressed)
    assert len(offered) + len(full.suppressed) >= min(len(CODES), 2)


def test_a_detractor_answer_suppresses_everything_for_the_configured_days() -> None:
    history = ContactHistory()
    history.add_detractor(NOW - dt.timedelta(days=10))
    result = ranked([0.5] * 5, history=history, policy=Policy(detractor_suppress_days=30))
    assert result.offers == () and set(result.suppressed.values()) == {"detractor"}
    assert result.detractor_until == NOW + dt.timedelta(days=20)
    later = ranked([0.5] * 5, history=history, policy=Policy(detractor_suppress_days=7))
    assert len(later.offers) == 3 and later.detractor_until is None


def test_control_group_is_deterministic_salted_and_of_the_configured_share() -> None:
    ids = [f"C{i:07d}" for i in range(20_000)]
    members = [c for c in ids if in_control_group(c, share=0.05, salt="a")]
    assert abs(len(members) / len(ids) - 0.05) < 0.006
    assert members == [c for c in ids if in_control_group(c, share=0.05, salt="a")]
    other_salt = {c for c in ids if in_control_group(c, share=0.05, salt="b")}
    assert len(other_salt & set(members)) < len(members) * 0.2
    assert not any(in_control_group(c, share=0.0, salt="a") for c in itertools.islice(ids, 100))


def test_popular_products_excludes_and_breaks_ties_by_code() -> None:
    counts = {"a": 5, "b": 9, "c": 5, "d": 1}
    assert popular_products(counts, exclude=frozenset({"b"}), limit=2) == ["a", "c"]


def test_history_counts_offers_per_product_window_once_each() -> None:
    history = ContactHistory()
    for i, days in enumerate([40, 20, 10, 10, 1]):
        history.add_offer(f"o{i}", "card", NOW - dt.timedelta(days=days))
    history.add_offer("o4", "card", NOW)  # a replayed event: counted once
    history.add_offer("x", "loan", NOW - dt.timedelta(days=2))
    assert history.offers_since("card", NOW - dt.timedelta(days=30)) == 4
    assert history.offers_since("card", NOW - dt.timedelta(days=10)) == 3
    assert history.offers_since("savings", NOW - dt.timedelta(days=30)) == 0
    assert history.capped("card", NOW - dt.timedelta(days=30), 4)
    assert not history.capped("card", NOW - dt.timedelta(days=30), 5)
    assert not history.capped("card", NOW - dt.timedelta(days=10), 4)
    assert not history.capped("savings", NOW - dt.timedelta(days=30), 1)
    history.forget_before(NOW - dt.timedelta(days=15))
    assert set(history.offers) == {"o2", "o3", "o4", "x"}
    assert history.offers_since("card", NOW - dt.timedelta(days=30)) == 3
    history.forget_before(NOW)
    assert history.offers == {} and history.times == {}


def test_history_counts_offers_arriving_out_of_order() -> None:
    history = ContactHistory()
    for i, days in enumerate([1, 20, 5, 40, 10]):
        history.add_offer(f"o{i}", "card", NOW - dt.timedelta(days=days))
    stamps = list(memoryview(history.times["card"]).cast("d"))
    assert stamps == sorted(stamps) and len(stamps) == 5
    assert history.offers_since("card", NOW - dt.timedelta(days=10)) == 3
    assert history.offers_since("card", NOW - dt.timedelta(days=10, seconds=1)) == 3
    assert history.offers_since("card", NOW - dt.timedelta(days=9)) == 2


def test_history_gives_the_garbage_collector_nothing_to_scan() -> None:
    # A worker holds one history per customer offered lately; containers the collector
    # tracks would be re-scanned by every young collection (pauses under load).
    history = ContactHistory()
    gc.collect()
    history.add_offer("o1", "card", NOW)
    history.add_offer("o2", "loan", NOW)
    history.add_decline("card", NOW)
    history.add_detractor(NOW)
    assert not gc.is_tracked(history.offers)
    assert not gc.is_tracked(history.times)
    assert not gc.is_tracked(history.declines)
    assert not any(gc.is_tracked(times) for times in history.times.values())


def test_history_adds_offers_in_bulk_as_one_at_a_time() -> None:
    stamps = [(NOW - dt.timedelta(days=d)).timestamp() for d in (25, 12, 3)]
    one, bulk = ContactHistory(), ContactHistory()
    one.add_offer("early", "card", NOW - dt.timedelta(days=40))
    bulk.add_offer("early", "card", NOW - dt.timedelta(days=40))
    for stamp, key in zip(stamps, ("a", "b", "c"), strict=True):
        one.add_offer(key, "card", dt.datetime.fromtimestamp(stamp, dt.UTC))
    bulk.add_offers("card", list(zip(stamps, ("a", "b", "c"), strict=True)))
    bulk.add_offers("card", [(stamps[0], "a")])  # already known: nothing added
    assert bulk.offers == one.offers and bulk.times == one.times
    for days in (50, 30, 10, 1):
        since = NOW - dt.timedelta(days=days)
        assert bulk.offers_since("card", since) == one.offers_since("card", since)
    assert not gc.is_tracked(bulk.times)


def test_history_trims_stale_offers_only_when_it_has_doubled() -> None:
    history = ContactHistory()
    old = NOW - dt.timedelta(days=60)
    for i in range(40):
        history.add_offer(f"old-{i}", "card", old)
    for i in range(30):
        history.add_offer(f"new-{i}", "card", NOW)
    history.forget_before(NOW - dt.timedelta(days=30))
    assert len(history.offers) == 30 and history.offers_since("card", old) == 30
    assert history.trim_at == 64  # never below the first threshold
    for i in range(70):
        history.add_offer(f"more-{i}", "loan", NOW)
    history.forget_before(NOW - dt.timedelta(days=30))
    assert len(history.offers) == 100 and history.trim_at == 200
    loaded = ContactHistory()
    loaded.add_offers("card", [(NOW.timestamp(), f"o{i}") for i in range(50)])
    assert loaded.trim_at == 100  # read at start-up: all inside the window
