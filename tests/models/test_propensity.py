"""Propensity models: planted signals found, calibrated, leak-free, one path == batch."""

from __future__ import annotations

import importlib.util
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models.data import BankData, CustomerState
from models.eligibility import Catalogue, eligible_matrix
from models.propensity import ProductScore, PropensityModel, TrainConfig, training
from models.propensity import model as propensity_model
from models.propensity.training import plan_cutoffs, train
from models.rules import RuleSet
from models.synthetic import SyntheticBank, generate_bank, true_propensities

REPO = Path(__file__).resolve().parents[2]
BERKA = REPO.parent / "shared" / "data" / "berka"
HORIZON = pd.Timedelta(days=90)


def planted_bank(n: int = 6_000, seed: int = 0) -> BankData:
    """A bank with two planted signals.

    - ``insurance`` follows ``acc`` then ``card``: 70% of card holders take it within
      two months of the card; otherwise 8% of customers take it at a random time.
    - ``savings`` has a monthly hazard that triples from December 2023 (a campaign),
      so a model trained on earlier cutoffs is miscalibrated until calibrated on the
      recent validation cutoff.
    """
    rng = np.random.default_rng(seed)
    start, end = pd.Timestamp("2019-01-01"), pd.Timestamp("2024-12-31")
    joined = start + pd.to_timedelta(rng.integers(0, 5 * 365, n), unit="D")
    ids = np.array([f"C{i:05d}" for i in range(n)], dtype=object)
    rows = [pd.DataFrame({"customer_id": ids, "product_code": "acc", "adopted_at": joined})]
    has_card = rng.random(n) < 0.6
    card_at = joined + pd.to_timedelta(rng.exponential(300, n).astype(int) + 1, unit="D")
    rows.append(
        pd.DataFrame(
            {"customer_id": ids[has_card], "product_code": "card", "adopted_at": card_at[has_card]}
        )
    )
    after = has_card & (rng.random(n) < 0.7)
    insurance_at = pd.DatetimeIndex(
        np.where(
            after,
            card_at + pd.to_timedelta(rng.integers(1, 60, n), unit="D"),
            joined + pd.to_timedelta(rng.integers(0, 2000, n), unit="D"),
        )
    )
    insured = after | (~has_card & (rng.random(n) < 0.08))
    rows.append(
        pd.DataFrame(
            {
                "customer_id": ids[insured],
                "product_code": "insurance",
                "adopted_at": insurance_at[insured],
            }
        )
    )
    taken = np.zeros(n, dtype=bool)
    when = np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]")
    for month in pd.date_range(start, end, freq="MS"):
        rate = 0.006 if month < pd.Timestamp("2023-12-01") else 0.02
        new = ~taken & (joined < month) & (rng.random(n) < rate)
        days = month + pd.to_timedelta(rng.integers(0, 28, n), unit="D")
        when[new] = days[new]
        taken |= new
    rows.append(
        pd.DataFrame(
            {"customer_id": ids[taken], "product_code": "savings", "adopted_at": when[taken]}
        )
    )
    adoptions = pd.concat(rows, ignore_index=True)
    adoptions = adoptions[adoptions["adopted_at"] <= end].assign(closed_at=pd.NaT)
    customers = pd.DataFrame(
        {
            "customer_id": ids,
            "segment": rng.choice(["mass", "affluent"], n),
            "branch_id": rng.choice(["B1", "B2", "B3"], n),
            "joined_at": joined,
            "birth_date": joined - pd.to_timedelta(rng.integers(20 * 365, 70 * 365, n), unit="D"),
            "income": rng.lognormal(8, 0.5, n).round(),
        }
    )
    products = pd.DataFrame(
        {
            "product_code": ["acc", "card", "insurance", "savings"],
            "name": ["Current account", "Credit card", "Home insurance", "Savings account"],
        }
    )
    return BankData.from_frames(products, customers, adoptions)


def outcomes_after(data: BankData, scores: pd.DataFrame, as_of: pd.Timestamp) -> np.ndarray:
    """For each scored pair: adopted within the horizon after ``as_of``?"""
    adoptions = data.adoptions
    window = adoptions[
        (adoptions["adopted_at"] >= as_of) & (adoptions["adopted_at"] < as_of + HORIZON)
    ]
    adopted = set(zip(window["customer_id"], window["product_code"], strict=True))
    return np.array(
        [
            (c, p) in adopted
            for c, p in zip(scores["customer_id"], scores["product_code"].astype(str), strict=True)
        ]
    )


# --------------------------------------------------------------------------- planted bank

AS_OF = pd.Timestamp("2024-04-01")


@pytest.fixture(scope="module")
def planted() -> BankData:
    return planted_bank()


@pytest.fixture(scope="module")
def planted_model(planted: BankData) -> PropensityModel:
    return train(planted, as_of=AS_OF, config=TrainConfig(n_cutoffs=4))


@pytest.fixture(scope="module")
def planted_scores(planted: BankData, planted_model: PropensityModel) -> pd.DataFrame:
    """Scores at the training instant, with what happened in the next 90 days."""
    scores = planted_model.score(planted, as_of=AS_OF, uncalibrated=True)
    return scores.assign(adopted=outcomes_after(planted, scores, AS_OF))


def test_planted_path_is_found_on_a_later_cutoff(planted_scores: pd.DataFrame) -> None:
    insurance = planted_scores[planted_scores["product_code"] == "insurance"]
    assert insurance["adopted"].sum() > 50
    assert roc_auc_score(insurance["adopted"], insurance["propensity"]) > 0.8


def test_the_planted_rule_is_mined_and_worded(
    planted: BankData, planted_model: PropensityModel, planted_scores: pd.DataFrame
) -> None:
    assert planted_model.rules is not None
    best = max(planted_model.rules.for_consequent("insurance"), key=lambda rule: rule.confidence)
    assert "card" in best.antecedent and best.confidence > 0.6
    insurance = planted_scores[planted_scores["product_code"] == "insurance"]
    top = insurance.sort_values("propensity").iloc[-1]
    explanation = planted_model.explain(
        planted.customer_state(top["customer_id"]), "insurance", as_of=AS_OF
    )
    assert explanation.rule is not None and explanation.rule.confidence == top["rules"]
    assert explanation.rule_sentence is not None
    assert "credit card" in explanation.rule_sentence
    assert "home insurance" in explanation.rule_sentence
    assert any("Credit card" in c.label for c in explanation.contributions)


def test_calibration_corrects_a_drifting_base_rate(
    planted_model: PropensityModel, planted_scores: pd.DataFrame
) -> None:
    """Training cutoffs predate the savings campaign; the validation cutoff does not."""
    assert planted_model.report["products"]["savings"]["calibration"] in ("platt", "isotonic")
    savings = planted_scores[planted_scores["product_code"] == "savings"]
    observed = savings["adopted"].mean()
    brier = {
        column: float(np.mean((savings[column] - savings["adopted"]) ** 2))
        for column in ("lgbm_uncalibrated", "lgbm")
    }
    assert brier["lgbm"] < brier["lgbm_uncalibrated"]
    assert savings["lgbm_uncalibrated"].mean() < 0.6 * observed
    assert savings["lgbm"].mean() == pytest.approx(observed, rel=0.2)


def test_training_reads_nothing_on_or_after_as_of(
    planted: BankData, planted_model: PropensityModel
) -> None:
    """Rewriting every later adoption leaves the trained model bit-identical."""
    rng = np.random.default_rng(3)
    adoptions = planted.adoptions.copy()
    later = (adoptions["adopted_at"] >= AS_OF).to_numpy()
    adoptions.loc[later, "adopted_at"] = AS_OF + pd.to_timedelta(
        rng.integers(0, 200, int(later.sum())), unit="D"
    )
    adoptions = adoptions[~(later & (rng.random(len(adoptions)) < 0.5))]
    adoptions.loc[adoptions["adopted_at"] < AS_OF, "closed_at"] = AS_OF + pd.Timedelta(days=3)
    changed = BankData.from_frames(planted.products, planted.customers, adoptions)
    again = train(changed, as_of=AS_OF, config=TrainConfig(n_cutoffs=4))
    assert [p.model_text for p in again.products] == [p.model_text for p in planted_model.products]
    assert [p.parameters() for p in again.products] == [
        p.parameters() for p in planted_model.products
    ]
    assert again.rules is not None and planted_model.rules is not None
    assert again.rules.to_json() == planted_model.rules.to_json()


def test_training_is_deterministic(planted: BankData, planted_model: PropensityModel) -> None:
    again = train(planted, as_of=AS_OF, config=TrainConfig(n_cutoffs=4))
    pd.testing.assert_frame_equal(
        again.score(planted, as_of=AS_OF), planted_model.score(planted, as_of=AS_OF)
    )


def test_rules_are_mined_once_per_bank_and_cutoff(
    planted: BankData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holdout's training and the final one share most monthly cutoffs: the rules of
    a cutoff already mined from the same bank are not mined again, and are the rules a
    fresh mining finds."""
    mined: list[pd.Timestamp] = []
    real = training.mine_rules

    def counting(*args: object, **kwargs: Any) -> RuleSet:
        mined.append(pd.Timestamp(kwargs["as_of"]))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "mine_rules", counting)
    config = TrainConfig(n_cutoffs=3, products=("insurance",))
    bank = BankData.from_frames(planted.products, planted.customers, planted.adoptions)
    earlier = AS_OF - pd.DateOffset(months=2)
    train(bank, as_of=earlier, config=config)
    first = set(mined)
    mined.clear()
    model = train(bank, as_of=AS_OF, config=config)
    plan = training.training_plan(bank, as_of=AS_OF, horizon_days=90, config=config)
    instants = {*plan.train, plan.validation, AS_OF}
    assert instants & first  # the two trainings share cutoffs...
    assert sorted(mined) == sorted(instants - first)  # ...mined the first time only
    fresh = BankData.from_frames(planted.products, planted.customers, planted.adoptions)
    again = train(fresh, as_of=AS_OF, config=config)
    assert sorted(mined[-len(instants) :]) == sorted(instants)  # a new bank mines afresh
    assert again.rules is not None and model.rules is not None
    assert again.rules.to_json() == model.rules.to_json()
    assert [p.model_text for p in again.products] == [p.model_text for p in model.products]


def test_progress_is_reported_to_the_end(planted: BankData) -> None:
    seen: list[tuple[str, float]] = []
    train(
        planted,
        as_of=AS_OF,
        config=TrainConfig(n_cutoffs=2, products=("insurance",)),
        progress=lambda stage, fraction: seen.append((stage, fraction)),
    )
    fractions = [fraction for _, fraction in seen]
    assert fractions == sorted(fractions)
    assert seen[-1] == ("done", 1.0)
    assert any(stage.startswith("training insurance") for stage, _ in seen)


# --------------------------------------------------------------------------- synthetic bank

SYNTHETIC_AS_OF = pd.Timestamp("2025-03-01")


@pytest.fixture(scope="module")
def bank() -> SyntheticBank:
    return generate_bank(15_000, seed=12)


@pytest.fixture(scope="module")
def data(bank: SyntheticBank) -> BankData:
    return BankData.from_frames(bank.products, bank.customers, bank.adoptions)


@pytest.fixture(scope="module")
def model(data: BankData) -> PropensityModel:
    return train(data, as_of=SYNTHETIC_AS_OF, config=TrainConfig(n_cutoffs=4))


@pytest.fixture(scope="module")
def scores(data: BankData, model: PropensityModel) -> pd.DataFrame:
    scores = model.score(data, as_of=SYNTHETIC_AS_OF, uncalibrated=True)
    return scores.assign(adopted=outcomes_after(data, scores, SYNTHETIC_AS_OF))


def test_model_approaches_the_true_propensities(bank: SyntheticBank, scores: pd.DataFrame) -> None:
    """Against the simulator's own probabilities: close in ranking and level."""
    oracle = true_propensities(
        bank.truth,
        bank.customers,
        bank.adoptions,
        bank.personas,
        as_of=(SYNTHETIC_AS_OF - pd.Timedelta(days=1)).date(),
    ).astype({"product_code": "str"})
    merged = scores.astype({"product_code": "str"}).merge(
        oracle, on=["customer_id", "product_code"]
    )
    assert len(merged) > 0.99 * len(scores)
    assert merged["propensity"].corr(merged["probability"], method="spearman") > 0.6
    ours, best = [], []
    for _, pairs in merged.groupby("product_code"):
        if pairs["adopted"].sum() >= 40:
            ours.append(roc_auc_score(pairs["adopted"], pairs["propensity"]))
            best.append(roc_auc_score(pairs["adopted"], pairs["probability"]))
    assert len(ours) >= 12
    assert np.mean(ours) > 0.85 * np.mean(best)


def test_held_out_calibration(scores: pd.DataFrame) -> None:
    brier_calibrated = np.mean((scores["lgbm"] - scores["adopted"]) ** 2)
    brier_uncalibrated = np.mean((scores["lgbm_uncalibrated"] - scores["adopted"]) ** 2)
    assert brier_calibrated <= brier_uncalibrated
    assert scores["propensity"].mean() == pytest.approx(scores["adopted"].mean(), rel=0.1)
    for _, pairs in scores.groupby("product_code", observed=True):
        if pairs["adopted"].sum() >= 100:
            assert pairs["propensity"].mean() == pytest.approx(pairs["adopted"].mean(), rel=0.35)


def test_report_has_validation_metrics(model: PropensityModel) -> None:
    summary = model.report["summary"]
    assert summary["lightgbm_products"] >= 15 and summary["mean_auc"] > 0.6
    metrics = model.report["products"]["mobile_banking"]
    assert metrics["kind"] == "lightgbm" and metrics["n_trees"] > 0
    assert metrics["brier_lgbm"] <= metrics["brier_uncalibrated"] * 1.01
    bins = metrics["reliability"]
    assert len(bins) == 10
    # Bins hold equal weight; negatives weigh 1 / sampling share, so more than the rows.
    weights = [b["weight"] for b in bins]
    assert min(weights) > 0.8 * max(weights)
    assert sum(weights) >= metrics["validation_rows"]
    assert bins[-1]["observed"] > 3 * bins[0]["observed"]


def test_only_eligible_pairs_are_scored(
    data: BankData, model: PropensityModel, scores: pd.DataFrame
) -> None:
    eligible = eligible_matrix(data, at=SYNTHETIC_AS_OF)
    rows = pd.Index(data.customers["customer_id"]).get_indexer(scores["customer_id"])
    cols = pd.Index(Catalogue.from_data(data).product_codes).get_indexer(
        scores["product_code"].astype(str)
    )
    assert eligible[rows, cols].all()
    held = data.adoptions[
        (data.adoptions["adopted_at"] < SYNTHETIC_AS_OF)
        & ~(data.adoptions["closed_at"] < SYNTHETIC_AS_OF)
    ]
    held_pairs = set(zip(held["customer_id"], held["product_code"], strict=True))
    scored_pairs = set(zip(scores["customer_id"], scores["product_code"].astype(str), strict=True))
    assert not held_pairs & scored_pairs
    # Every eligible pair of a joined customer and a modelled product is scored.
    joined = (data.customers["joined_at"] < SYNTHETIC_AS_OF).to_numpy()
    modelled = np.isin(Catalogue.from_data(data).product_codes, model.product_codes)
    assert len(scores) == int(eligible[joined][:, modelled].sum())


def test_scoring_a_chunk_of_customers_at_a_time_changes_nothing(
    data: BankData, model: PropensityModel, scores: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch builds a chunk of customers' features at a time; the pairs, their order
    and their scores are those of one pass, with the model's catalogue or another."""
    products = data.products.loc[data.products["product_code"] != "mobile_banking"]
    other = Catalogue.from_products(products)
    assert other.product_codes != model.spec.product_codes
    whole = model.score(data, as_of=SYNTHETIC_AS_OF, catalogue=other, uncalibrated=True)
    assert len(data.customers) <= propensity_model._SCORE_CUSTOMERS  # one pass by default
    monkeypatch.setattr(propensity_model, "_SCORE_CUSTOMERS", 1_000)
    chunked = model.score(data, as_of=SYNTHETIC_AS_OF, uncalibrated=True)
    pd.testing.assert_frame_equal(chunked, scores.drop(columns="adopted"), check_exact=True)
    narrowed = model.score(data, as_of=SYNTHETIC_AS_OF, catalogue=other, uncalibrated=True)
    pd.testing.assert_frame_equal(narrowed, whole, check_exact=True)
    assert "mobile_banking" not in set(narrowed["product_code"].astype(str))


def test_one_customer_path_equals_the_batch(
    data: BankData, model: PropensityModel, scores: pd.DataFrame
) -> None:
    by_customer = {c: frame for c, frame in scores.groupby("customer_id")}
    ids = data.customers["customer_id"][data.customers["joined_at"] < SYNTHETIC_AS_OF]
    for customer in ids.iloc[::97]:
        fast = model.score_customer(data.customer_state(customer), as_of=SYNTHETIC_AS_OF)
        assert [s.propensity for s in fast] == sorted((s.propensity for s in fast), reverse=True)
        batch = by_customer.get(customer, scores.iloc[:0])
        expected = {
            str(row.product_code): ProductScore(
                str(row.product_code), row.propensity, row.lgbm, row.rules
            )
            for row in batch.itertuples()
        }
        assert {s.product_code: s for s in fast} == expected


def test_one_customer_path_is_thread_safe(data: BankData, model: PropensityModel) -> None:
    states = [data.customer_state(c) for c in data.customers["customer_id"].iloc[:400]]
    expected = [model.score_customer(s, as_of=SYNTHETIC_AS_OF) for s in states]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda s: model.score_customer(s, as_of=SYNTHETIC_AS_OF), states))
            assert got == expected


def test_scores_are_the_same_without_the_fast_path(
    data: BankData, model: PropensityModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If LightGBM's single-row C API is unavailable, Booster.predict takes over."""
    states = [data.customer_state(c) for c in data.customers["customer_id"].iloc[:50]]
    expected = [model.score_customer(s, as_of=SYNTHETIC_AS_OF) for s in states]
    monkeypatch.setattr(model._runtime.fast, "_predict", None)
    assert [model.score_customer(s, as_of=SYNTHETIC_AS_OF) for s in states] == expected


def test_a_narrower_catalogue_is_respected(data: BankData, model: PropensityModel) -> None:
    products = data.products.copy()
    products.loc[products["product_code"] == "mobile_banking", "active"] = False
    catalogue = Catalogue.from_products(products)
    state = next(
        s
        for s in (data.customer_state(c) for c in data.customers["customer_id"])
        if "mobile_banking"
        in [x.product_code for x in model.score_customer(s, as_of=SYNTHETIC_AS_OF)]
    )
    narrowed = model.score_customer(state, as_of=SYNTHETIC_AS_OF, catalogue=catalogue)
    assert "mobile_banking" not in [s.product_code for s in narrowed]
    assert len(narrowed) == len(model.score_customer(state, as_of=SYNTHETIC_AS_OF)) - 1
    batch = model.score(data, as_of=SYNTHETIC_AS_OF, catalogue=catalogue)
    assert "mobile_banking" not in set(batch["product_code"].astype(str))


def test_explanations_add_up_to_the_score(
    data: BankData, model: PropensityModel, scores: pd.DataFrame
) -> None:
    for row in scores.iloc[::5000].itertuples():
        state = data.customer_state(row.customer_id)
        product = str(row.product_code)
        full = model.explain(state, product, as_of=SYNTHETIC_AS_OF, top_n=1_000)
        raw = math.log(row.lgbm_uncalibrated / (1 - row.lgbm_uncalibrated))
        assert full.baseline + sum(c.contribution for c in full.contributions) == pytest.approx(
            raw, abs=1e-6
        )
        assert full.score.propensity == row.propensity
        top = model.explain(state, product, as_of=SYNTHETIC_AS_OF)
        assert len(top.contributions) <= 3
        magnitudes = [abs(c.contribution) for c in top.contributions]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert all(" " in c.label or c.label.isalpha() for c in top.contributions)
        assert (top.rule is None) == (row.rules == 0)


def test_explain_refuses_unknown_and_ineligible_products(
    data: BankData, model: PropensityModel
) -> None:
    state = data.customer_state(data.customers["customer_id"].iloc[0])
    with pytest.raises(KeyError):
        model.explain(state, "no_such_product", as_of=SYNTHETIC_AS_OF)
    held = CustomerState(
        customer_id="X",
        birth_date=pd.Timestamp("1980-01-01"),
        adoptions=(),
    )
    assert "credit_card" in model.product_codes
    with pytest.raises(ValueError, match="not eligible"):
        model.explain(held, "credit_card", as_of=SYNTHETIC_AS_OF)  # needs current_account


def test_feature_importance(model: PropensityModel) -> None:
    importance = model.feature_importance()
    assert list(importance.columns) == ["product_code", "feature", "label", "gain", "splits"]
    home = importance[importance["product_code"] == "home_insurance"]
    assert len(home) == len(model.spec.columns)
    assert home["gain"].is_monotonic_decreasing
    assert home["gain"].iloc[0] > 0


def test_the_native_boosters_give_lightgbms_own_scores(
    data: BankData, model: PropensityModel
) -> None:
    """models.propensity.native loads each product's model text without the lightgbm
    package: raw scores, contributions and importances are the package's, bit for bit;
    a text LightGBM cannot read, or a matrix of the wrong width, is a NativeError."""
    import lightgbm as lgb

    from models.propensity.native import C_API_PREDICT_CONTRIB, NativeBooster, NativeError

    frame = model._runtime.builder.build(data, as_of=SYNTHETIC_AS_OF)
    values = np.ascontiguousarray(frame.values[:300], dtype=np.float32)
    checked = 0
    for product in model.products:
        if product.model_text is None:
            continue
        ours, theirs = NativeBooster(product.model_text), lgb.Booster(model_str=product.model_text)
        assert np.array_equal(ours.predict(values), theirs.predict(values, raw_score=True))
        assert np.array_equal(
            ours.predict(values[:5], predict_type=C_API_PREDICT_CONTRIB),
            theirs.predict(values[:5], pred_contrib=True),
        )
        for kind in ("split", "gain"):
            mine, package = ours.feature_importance(kind), theirs.feature_importance(kind)
            assert mine.dtype == package.dtype and np.array_equal(mine, package)
        assert ours.predict(values[:0]).shape == (0,)
        with pytest.raises(NativeError, match="feature columns"):
            ours.predict(values[:, :-1])
        checked += 1
    assert checked >= 3
    with pytest.raises(NativeError):
        NativeBooster("tree\nnot a model")


def test_a_serving_process_does_not_import_the_training_libraries() -> None:
    """The app (and with it every worker) scores through LightGBM's C library alone:
    importing the lightgbm package pulled in scikit-learn and SciPy, about 80 MiB and
    1.5-2 s of every worker's start. Nor does it import what mines rules (mlxtend, with
    joblib and psutil) or migrates (Alembic, with Mako and Pygments: 26 MiB and 0.5 s)."""
    import subprocess
    import sys

    heavy = ("lightgbm", "sklearn", "scipy", "matplotlib", "dask", "mlxtend", "alembic")
    code = (
        "import sys; import service.app; from service.data import db; "
        # what readiness asks of a worker every few seconds
        "db.current_revision(db.make_engine('sqlite://')); "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert found.stdout.strip() == ""


# --------------------------------------------------------------------------- cutoffs


def test_cutoffs_leave_the_validation_window_unseen() -> None:
    plan = plan_cutoffs("2025-06-01", horizon_days=90, first_adoption="2019-01-01", n_cutoffs=12)
    assert plan.validation == pd.Timestamp("2025-03-01")
    assert plan.validation + HORIZON <= pd.Timestamp("2025-06-01")
    assert len(plan.train) == 12 and not plan.split_customers
    assert all(t + HORIZON <= plan.validation for t in plan.train)
    assert plan.train[0] == pd.Timestamp("2024-12-01")
    assert list(plan.train) == sorted(plan.train, reverse=True)
    assert all(t.day == 1 for t in plan.train)


def test_short_history_uses_one_cutoff_split_by_customer() -> None:
    plan = plan_cutoffs("2025-06-01", horizon_days=90, first_adoption="2024-10-15")
    assert plan.split_customers and plan.train == (plan.validation,)
    # Too short even for a validation month: the one cutoff as_of - horizon, to the day.
    plan = plan_cutoffs("2025-06-01", horizon_days=90, first_adoption="2025-01-01")
    assert plan.split_customers and plan.train == (pd.Timestamp("2025-03-03"),)


def test_one_cutoff_training_still_produces_a_model(planted: BankData) -> None:
    recent = planted.adoptions[planted.adoptions["adopted_at"] >= pd.Timestamp("2023-09-01")]
    short = BankData.from_frames(planted.products, planted.customers, recent)
    model = train(short, as_of=AS_OF, config=TrainConfig(products=("card", "savings")))
    assert model.window["split_customers"] is True
    assert model.report["products"]["card"]["kind"] == "lightgbm"


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not BERKA.exists(), reason="the Berka data is not available")
def test_berka_loans_are_predicted() -> None:
    spec = importlib.util.spec_from_file_location(
        "berka_convert", REPO / "examples/berka/convert.py"
    )
    assert spec is not None and spec.loader is not None
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    frames = convert.convert(BERKA)
    data = BankData.from_frames(frames["products"], frames["customers"], frames["adoptions"])
    as_of = pd.Timestamp("1998-01-01")
    model = train(data, as_of=as_of, config=TrainConfig(min_positives=10))
    scores = model.score(data, as_of=as_of)
    loans = scores[scores["product_code"] == "loan"]
    adopted = outcomes_after(data, loans, as_of)
    assert adopted.sum() >= 30
    assert roc_auc_score(adopted, loans["propensity"]) > 0.8


# --------------------------------------------------------------------------- offer outcomes


OFFERED_AS_OF = pd.Timestamp("2026-01-01")
SMALL_MODEL = TrainConfig(n_cutoffs=3, max_rounds=60, rules=False, num_threads=1)


@pytest.fixture(scope="module")
def offered() -> BankData:
    """A synthetic bank with an offer history: declines damp products for months."""
    bank = generate_bank(4_000, seed=9, offers_per_month=0.3)
    return BankData.from_frames(
        bank.products, bank.customers, bank.adoptions, outcomes=bank.outcomes
    )


@pytest.fixture(scope="module")
def offered_model(offered: BankData) -> PropensityModel:
    return train(offered, as_of=OFFERED_AS_OF, config=SMALL_MODEL)


def test_recent_declines_are_learnt(offered_model: PropensityModel) -> None:
    assert offered_model.spec.outcome_kinds == ("declined",)
    importance = offered_model.feature_importance()
    declined = importance[importance["feature"].str.startswith("declined_recently_")]
    assert declined["gain"].sum() > 0
    assert declined["splits"].sum() > 0


def test_one_customer_path_sees_declines_as_the_batch_does(
    offered: BankData, offered_model: PropensityModel
) -> None:
    assert offered.outcomes is not None
    recent = offered.outcomes[
        (offered.outcomes["outcome"] == "declined")
        & (offered.outcomes["occurred_at"] >= OFFERED_AS_OF - pd.Timedelta(days=60))
    ]
    customers = recent["customer_id"].drop_duplicates().iloc[:40].tolist()
    batch = offered_model.score(offered, as_of=OFFERED_AS_OF)
    batch = batch[batch["customer_id"].isin(customers)].set_index(["customer_id", "product_code"])
    column = offered_model.spec.columns.index(f"declined_recently_{recent['product_code'].iloc[0]}")
    state = offered.customer_state(str(recent["customer_id"].iloc[0]))
    row = offered_model.builder.for_customer(state, as_of=OFFERED_AS_OF)
    assert row[column] >= 1
    for customer in customers:
        state = offered.customer_state(customer)
        for score in offered_model.score_customer(state, as_of=OFFERED_AS_OF):
            expected = batch.loc[(customer, score.product_code), "propensity"]
            assert score.propensity == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_outcome_features_can_be_left_out(offered: BankData) -> None:
    plain = train(offered, as_of=OFFERED_AS_OF, config=replace(SMALL_MODEL, outcome_features=False))
    assert plain.spec.outcome_kinds == ()
    assert not any(c.startswith("declined_recently_") for c in plain.spec.columns)


def test_accepted_offers_are_positives_unless_forced_sales_are_dropped(
    offered: BankData, offered_model: PropensityModel
) -> None:
    """Accepted offers are adoptions, so labels; ``drop`` leaves their rows out."""
    dropped = train(offered, as_of=OFFERED_AS_OF, config=replace(SMALL_MODEL, forced_sales="drop"))
    assert "forced_sales_dropped" not in offered_model.report
    assert dropped.report["forced_sales_dropped"] > 0

    def positives(model: PropensityModel, kind: str) -> int:
        return sum(m[f"{kind}_positives"] for m in model.report["products"].values())

    for kind in ("train", "validation"):
        assert positives(dropped, kind) < positives(offered_model, kind)
    # The positives lost are the accepted offers in the label windows, no more.
    lost = positives(offered_model, "validation") - positives(dropped, "validation")
    assert offered.outcomes is not None
    validation = pd.Timestamp(offered_model.window["validation_cutoff"])
    window = offered.outcomes[
        (offered.outcomes["outcome"] == "accepted")
        & (offered.outcomes["occurred_at"] >= validation)
        & (offered.outcomes["occurred_at"] < validation + HORIZON)
    ]
    assert 0 < lost <= len(window)
    with pytest.raises(ValueError, match="forced_sales"):
        TrainConfig(forced_sales="maybe")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- one machine


def test_products_boosted_in_parallel_give_the_one_thread_model(planted: BankData) -> None:
    """Two threads train two boosters at once, one thread each: the same model."""
    config = TrainConfig(n_cutoffs=3, max_rounds=80)
    one = train(planted, as_of=AS_OF, config=replace(config, num_threads=1))
    two = train(planted, as_of=AS_OF, config=replace(config, num_threads=2))
    assert len(one.products) >= 2
    assert [p.model_text is None for p in one.products] == [
        p.model_text is None for p in two.products
    ]
    pd.testing.assert_frame_equal(one.score(planted, as_of=AS_OF), two.score(planted, as_of=AS_OF))


def test_products_sample_negatives_with_one_draw_per_customer() -> None:
    """Each product's negatives are a uniform share, reweighted; a smaller share keeps
    a subset of a larger one's, so a cutoff's features are built for few customers."""
    rng = np.random.default_rng(0)
    n = 50_000
    draws = rng.random(n)
    config = TrainConfig(negatives_per_positive=10, min_negatives=100)
    samples = []
    for rate in (0.01, 0.05):
        labels = rng.random(n) < rate
        candidates = np.arange(n)
        rows, weights = training._sample(
            candidates, labels, config, 40_000, draws, validation=False
        )
        negatives = rows[~labels[rows]]
        positives = int(labels.sum())
        assert np.array_equal(rows[labels[rows]], np.flatnonzero(labels))
        share = 1 / weights[~labels[rows]][0]
        assert negatives.size == pytest.approx(10 * positives, rel=0.1)
        assert np.all(draws[negatives] < share)
        assert (weights[~labels[rows]].sum() + positives) == pytest.approx(n, rel=0.05)
        samples.append(set(negatives.tolist()))
    rare, common = samples
    # The rarer product's negatives (a smaller share) mostly nest in the other's;
    # only customers who are positives of the other product are outside it.
    assert len(rare - common) <= 0.1 * len(rare)


def test_sampled_rows_are_gathered_from_shared_blocks() -> None:
    rows = training._Rows()
    first = np.arange(12, dtype=np.float32).reshape(4, 3)
    second = -np.arange(6, dtype=np.float32).reshape(2, 3)
    rows.add(
        first,
        np.array([3, 0]),
        np.array([True, False]),
        np.ones(2),
        np.zeros(2, np.int8),
        np.zeros(2),
    )
    rows.add(
        second, np.array([1]), np.array([False]), np.full(1, 4.0), np.ones(1, np.int8), np.ones(1)
    )
    values, labels, weights, folds, rules = rows.arrays(3)
    assert np.array_equal(values, np.vstack([first[[3, 0]], second[[1]]]))
    assert labels.tolist() == [True, False, False]
    assert weights.tolist() == [1.0, 1.0, 4.0] and folds.tolist() == [0, 0, 1]
    assert rows.weighted_rows == 6.0 and rows.weighted_positives == 1.0
    assert not rows.blocks


def test_negatives_are_drawn_apart_from_a_generator_seeded_alike() -> None:
    """A synthetic bank generated with ``default_rng(seed)`` draws its customers from
    that stream: one draw per customer from the same stream would pick the negatives
    by the customers' attributes. The sampling stream is the seed's own."""
    n = 100_000
    generator = np.random.default_rng(0).random(n)
    draws = training._negatives_stream(0).random(n)
    assert abs(np.corrcoef(generator, draws)[0, 1]) < 0.02
    assert np.array_equal(draws, training._negatives_stream(0).random(n))
