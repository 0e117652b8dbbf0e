"""Training on a campaign snapshot: one cutoff to the day, random customer splits, and a
holdout of random customers measured by AUC and responders in the top of the ranking."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from models.data import BankData
from models.errors import TooLittleData
from models.evaluation import campaign_metrics, holdout_evaluation
from models.propensity import TrainConfig
from models.propensity.training import stratified_split, train, training_plan
from tests.campaign_data import DAYS, SNAPSHOT, TARGET, Campaign, make_campaign
from tests.conftest import SHARED_DATA

AS_OF = SNAPSHOT + dt.timedelta(days=DAYS)
FAST = TrainConfig(num_threads=1)


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    return make_campaign(3_000)


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("holdings", [True, False], ids=["holdings", "attributes-only"])
def test_a_campaign_trains_on_one_cutoff_to_the_day(campaign: Campaign, holdings: bool) -> None:
    data = campaign.bank(holdings=holdings)
    plan = training_plan(data, as_of=AS_OF, horizon_days=DAYS)
    # 2024-03-11 is not a month start: the cutoff is as_of - horizon exactly.
    assert plan.split_customers and plan.kind == "single_cutoff"
    assert plan.train == (pd.Timestamp(SNAPSHOT),) and plan.validation == pd.Timestamp(SNAPSHOT)
    model = train(data, as_of=AS_OF, horizon_days=DAYS, config=FAST)
    assert model.window["plan"] == "single_cutoff"
    assert model.window["validation"]["kind"] == "random_customers"
    report = model.report["products"][TARGET]
    assert report["kind"] == "lightgbm"
    # Every responder is a label: training plus validation positives are all of them.
    assert report["train_positives"] + report["validation_positives"] == len(campaign.responders)


@pytest.mark.parametrize(("spread_days", "monthly"), [(120, True), (700, False)])
def test_a_burst_of_responses_after_a_dated_history_is_a_campaign(
    spread_days: int, monthly: bool
) -> None:
    """400 earlier adoptions of the campaign's product over 120 days come at about the
    window's rate: a dated history, kept monthly. Over 700 days (some 16 a window) the
    window's responses are a burst (over 4 times as many): one cutoff."""
    rng = np.random.default_rng(1)
    campaign = make_campaign(1_000)
    n = 400
    earlier = pd.DataFrame(
        {
            "customer_id": campaign.customers["customer_id"].sample(n, random_state=2).to_numpy(),
            "product_code": TARGET,
            "adopted_at": [
                (pd.Timestamp(SNAPSHOT) - pd.Timedelta(days=int(d))).date().isoformat()
                for d in rng.integers(1, spread_days, n)
            ],
        }
    )
    responders = campaign.responders[
        ~campaign.responders["customer_id"].isin(earlier["customer_id"])
    ]
    data = BankData.from_frames(
        campaign.products, campaign.customers, pd.concat([campaign.holdings, earlier, responders])
    )
    plan = training_plan(data, as_of=AS_OF, horizon_days=DAYS, config=TrainConfig(n_cutoffs=3))
    assert plan.split_customers is not monthly
    expected = "2024-03-01" if monthly else SNAPSHOT.isoformat()
    assert plan.validation == pd.Timestamp(expected)


def test_nothing_to_learn_says_what_to_do(campaign: Campaign) -> None:
    """A window before the responses, with no dated holdings: nothing to learn."""
    data = campaign.bank(holdings=False)
    with pytest.raises(TooLittleData, match=r"nothing to learn: .*import the responses") as caught:
        train(data, as_of=SNAPSHOT, horizon_days=DAYS, config=FAST)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- splits


def test_random_split_is_stratified_seeded_and_order_free() -> None:
    rng = np.random.default_rng(5)
    ids = np.asarray([f"c{i}" for i in range(2_000)], dtype=object)
    responded = rng.random(ids.size) < 0.07
    split = stratified_split(ids, responded, fraction=0.25, seed=3, stream="validation")
    assert split[responded].sum() == round(0.25 * responded.sum())
    assert split[~responded].sum() == round(0.25 * (~responded).sum())
    again = stratified_split(ids, responded, fraction=0.25, seed=3, stream="validation")
    assert np.array_equal(split, again)
    other = stratified_split(ids, responded, fraction=0.25, seed=4, stream="validation")
    assert not np.array_equal(split, other)
    holdout = stratified_split(ids, responded, fraction=0.25, seed=3, stream="holdout")
    assert not np.array_equal(split, holdout)
    order = rng.permutation(ids.size)
    shuffled = stratified_split(
        ids[order], responded[order], fraction=0.25, seed=3, stream="validation"
    )
    assert np.array_equal(shuffled, split[order])


def test_validation_split_follows_the_seed(campaign: Campaign) -> None:
    data = campaign.bank()
    one = train(data, as_of=AS_OF, horizon_days=DAYS, config=FAST).report["products"][TARGET]
    same = train(data, as_of=AS_OF, horizon_days=DAYS, config=FAST).report["products"][TARGET]
    other = train(
        data, as_of=AS_OF, horizon_days=DAYS, config=TrainConfig(num_threads=1, seed=9)
    ).report["products"][TARGET]
    responders = len(campaign.responders)
    # Stratified: the validation customers hold a quarter of the responders, to one.
    assert abs(one["validation_positives"] - 0.25 * responders) <= 1
    assert one["auc"] == same["auc"]
    assert other["auc"] != one["auc"]


# --------------------------------------------------------------------------- holdout


def test_campaign_metrics_count_the_top_of_each_ranking() -> None:
    pairs = pd.DataFrame({"customer_id": [f"c{i}" for i in range(100)], "product_code": "p"})
    actual = pairs.iloc[:10]
    perfect = campaign_metrics(pairs.assign(score=-np.arange(100.0)), actual)
    assert perfect.loc[0, "auc"] == 1.0 and perfect.loc[0, "top10_hits"] == 10
    flat = campaign_metrics(pairs.assign(score=0.5), actual)
    assert flat.loc[0, "auc"] == 0.5
    assert flat.loc[0, "top10_hits"] == pytest.approx(1.0)
    assert flat.loc[0, "top20_share"] == pytest.approx(0.2)


@pytest.mark.parametrize("holdings", [True, False], ids=["holdings", "attributes-only"])
def test_campaign_holdout_measures_held_out_customers(campaign: Campaign, holdings: bool) -> None:
    data = campaign.bank(holdings=holdings)
    result = holdout_evaluation(data, as_of=AS_OF, horizon_days=DAYS, config=FAST)
    assert result.holdout_kind == "random_customers"
    assert result.cutoff == SNAPSHOT and result.holdout_size == 750
    measured = set(result.scores["customer_id"])
    assert len(measured) == 750
    # The holdout model never saw the measured customers.
    assert result.model.window["customers"] == 3_000 - 750
    responders = set(campaign.responders["customer_id"])
    assert set(result.actual["customer_id"]) == responders & measured
    table = result.comparison
    assert table.loc["popularity", "AUC"] == pytest.approx(0.5)
    assert table.loc["blend", "AUC"] > 0.7
    assert table.loc["blend", "top10% share"] > 2 * table.loc["popularity", "top10% share"]
    assert table.loc["blend", "top20% hits"] > table.loc["blend", "top10% hits"]
    summary = result.summary_metrics()
    assert summary["holdout_kind"] == "random_customers"
    assert summary["holdout_fraction"] == 0.25 and summary["holdout_seed"] == 0
    assert summary["auc"] == summary["blend.auc"] == table.loc["blend", "AUC"]
    assert summary["by_product"][TARGET]["responders"] == len(responders & measured)
    assert "random customers" in result.describe_holdout()


def test_a_dated_bank_keeps_the_temporal_holdout(campaign: Campaign) -> None:
    """Responses all through the months before the window, at about the window's rate:
    a dated history, not a burst."""
    rng = np.random.default_rng(3)
    earlier = pd.concat(
        make_campaign(3_000, seed=seed).responders for seed in (11, 12, 13)
    ).drop_duplicates("customer_id")
    earlier["adopted_at"] = [
        (pd.Timestamp(SNAPSHOT) - pd.Timedelta(days=int(d))).date().isoformat()
        for d in rng.integers(1, 150, len(earlier))
    ]
    dated = BankData.from_frames(
        campaign.products,
        campaign.customers,
        pd.concat([campaign.holdings, earlier, campaign.responders]),
    )
    config = TrainConfig(num_threads=1, n_cutoffs=3)
    assert not training_plan(dated, as_of=AS_OF, horizon_days=DAYS, config=config).split_customers
    result = holdout_evaluation(dated, as_of=AS_OF, horizon_days=DAYS, config=config)
    assert result.holdout_kind == "temporal" and result.holdout_fraction is None
    assert result.summary_metrics()["holdout_kind"] == "temporal"
    assert "blend.auc" in result.summary_metrics()


# --------------------------------------------------------------------------- real data


HILLSTROM = SHARED_DATA / "hillstrom" / "hillstrom.csv"


@pytest.mark.skipif(not HILLSTROM.exists(), reason="the Hillstrom data is not available")
def test_hillstrom_visits_are_ranked_on_held_out_customers() -> None:
    """15,000 of the real campaign's customers, attributes as given, visits and
    purchases in the two weeks after the campaign day as adoptions."""
    raw = pd.read_csv(HILLSTROM).sample(15_000, random_state=1).reset_index(drop=True)
    day = dt.date(2008, 3, 3)
    ids = np.asarray([f"H{i:05d}" for i in range(len(raw))], dtype=object)
    customers = raw.drop(columns=["conversion", "visit", "spend"]).assign(customer_id=ids)
    offsets = np.random.default_rng(0).integers(0, 14, len(raw))
    adoptions = pd.concat(
        pd.DataFrame(
            {
                "customer_id": ids[took],
                "product_code": code,
                "adopted_at": [str(day + dt.timedelta(days=int(d))) for d in offsets[took]],
            }
        )
        for code, took in (("visit", raw["visit"] == 1), ("purchase", raw["conversion"] == 1))
    )
    products = pd.DataFrame(
        {"product_code": ["visit", "purchase"], "category": "web", "value": [1.0, 100.0]}
    )
    data = BankData.from_frames(products, customers, adoptions)
    assert data.attribute_kinds["history_segment"] == "categorical"
    result = holdout_evaluation(
        data, as_of=day + dt.timedelta(days=14), horizon_days=14, config=FAST
    )
    assert result.holdout_kind == "random_customers"
    visits = result.by_product.set_index(["model", "product_code"]).loc[("blend", "visit")]
    # About 550 held-out visitors: an AUC of 0.6 is some eight standard errors above 0.5.
    assert visits["n_positive"] > 400
    assert visits["auc"] > 0.6
    assert visits["top20_share"] > 0.26
