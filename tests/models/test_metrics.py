"""Offline evaluation metrics (models/metrics.py): hand-computed cases and properties."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from models.metrics import (
    GAINS_COLUMNS,
    PRODUCT_COLUMNS,
    RANKING_COLUMNS,
    calibration_table,
    compare,
    expected_calibration_error,
    gains_table,
    label_pairs,
    oracle_scores,
    popularity_scores,
    product_codes,
    product_metrics,
    ranking_metrics,
)


def _scores(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["customer_id", "product_code", "score"])


def _pairs(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["customer_id", "product_code"])


def _metric(table: pd.DataFrame, k: int, column: str) -> float:
    return float(table.loc[table["k"] == k, column].iloc[0])


# --------------------------------------------------------------------------- hand cases


@pytest.fixture
def small_case() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Five customers; only A and B adopted one of their candidates.

    A ranks p1 > p2 > p3 > p4 > p5 and adopted {p2, p4}: rel = 0 1 0 1 0.
    B ties p1 and p2 (the code breaks the tie: p1 first), then p3; adopted {p1}: rel = 1 0 0.
    C adopted p9, which is not one of its candidates (say, already held): not evaluated.
    D adopted nothing: not evaluated. E adopted but has no candidates: not evaluated.
    """
    scores = _scores(
        [
            ("A", "p1", 0.9),
            ("A", "p2", 0.8),
            ("A", "p3", 0.7),
            ("A", "p4", 0.6),
            ("A", "p5", 0.5),
            ("B", "p2", 0.2),  # listed before p1 on purpose: the code breaks the tie
            ("B", "p1", 0.2),
            ("B", "p3", 0.1),
            ("C", "p1", 0.5),
            ("C", "p2", 0.4),
            ("D", "p1", 0.3),
        ]
    )
    actual = _pairs([("A", "p2"), ("A", "p4"), ("A", "p4"), ("B", "p1"), ("C", "p9"), ("E", "p1")])
    return scores, actual


def test_ranking_metrics_by_hand(small_case: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    scores, actual = small_case
    table = ranking_metrics(scores, actual, ks=(1, 3, 5))
    assert list(table.columns) == list(RANKING_COLUMNS)
    assert table["k"].tolist() == [1, 3, 5]
    assert table["n_customers"].tolist() == [2, 2, 2]  # A and B

    log3, log5 = math.log2(3), math.log2(5)
    # k = 1. A: top is p1, not adopted -> every metric 0. B: top is p1, adopted -> 1.
    expected_1 = {"map": 0.5, "precision": 0.5, "recall": 0.5, "ndcg": 0.5, "hit_rate": 0.5}
    # k = 3. A: hits 1 (p2 at rank 2).
    #   precision 1/3, recall 1/2, AP = P(2)/min(3, 2) = (1/2)/2 = 1/4,
    #   NDCG = (1/log2 3) / (1 + 1/log2 3), hit 1.
    # B: hits 1 (rank 1): precision 1/3, recall 1, AP 1, NDCG 1, hit 1.
    ndcg_a3 = (1 / log3) / (1 + 1 / log3)
    expected_3 = {
        "map": (0.25 + 1) / 2,
        "precision": (1 / 3 + 1 / 3) / 2,
        "recall": (0.5 + 1) / 2,
        "ndcg": (ndcg_a3 + 1) / 2,
        "hit_rate": 1.0,
    }
    # k = 5. A: hits 2 (ranks 2 and 4): precision 2/5, recall 1,
    #   AP = (P(2) + P(4)) / min(5, 2) = (1/2 + 2/4) / 2 = 1/2,
    #   NDCG = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3).
    # B: precision 1/5 (divided by k although B has 3 candidates), recall 1, AP 1, NDCG 1.
    ndcg_a5 = (1 / log3 + 1 / log5) / (1 + 1 / log3)
    expected_5 = {
        "map": (0.5 + 1) / 2,
        "precision": (0.4 + 0.2) / 2,
        "recall": 1.0,
        "ndcg": (ndcg_a5 + 1) / 2,
        "hit_rate": 1.0,
    }
    for k, expected in ((1, expected_1), (3, expected_3), (5, expected_5)):
        for column, value in expected.items():
            assert _metric(table, k, column) == pytest.approx(value, abs=1e-12), (k, column)
    assert _metric(table, 3, "ndcg") == pytest.approx(0.693426, abs=1e-6)


def test_ties_are_broken_by_product_code(small_case: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    scores, _ = small_case
    b_only = scores[scores["customer_id"] == "B"]
    # B ties p1 and p2 at 0.2; p1 ranks first whatever the row order.
    first = ranking_metrics(b_only, _pairs([("B", "p1")]), ks=(1,))
    second = ranking_metrics(b_only, _pairs([("B", "p2")]), ks=(1, 2))
    assert _metric(first, 1, "map") == 1.0
    assert _metric(second, 1, "map") == 0.0
    assert _metric(second, 2, "map") == pytest.approx(0.5)  # P(2) = 1/2, min(2, 1) = 1
    assert _metric(second, 2, "ndcg") == pytest.approx(1 / math.log2(3))


def test_row_order_does_not_matter(small_case: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    scores, actual = small_case
    expected = ranking_metrics(scores, actual)
    for seed in range(5):
        shuffled = scores.sample(frac=1.0, random_state=seed)
        pd.testing.assert_frame_equal(ranking_metrics(shuffled, actual), expected)


def test_product_codes_compare_as_strings() -> None:
    # Codes 10 and 9 tie: as strings "10" < "9", so 10 ranks first.
    scores = pd.DataFrame({"customer_id": [1, 1], "product_code": [9, 10], "score": [0.5, 0.5]})
    table = ranking_metrics(scores, pd.DataFrame({"customer_id": [1], "product_code": ["10"]}))
    assert _metric(table, 1, "hit_rate") == 1.0


def test_matches_a_plain_python_reference() -> None:
    """The vectorised metrics equal a per-customer loop (Kaggle apk for MAP@k)."""
    rng = np.random.default_rng(11)
    rows, adopted = [], []
    for c in range(300):
        n = int(rng.integers(1, 9))
        codes = rng.choice([f"p{j}" for j in range(12)], size=n, replace=False)
        for code in codes:
            rows.append((f"c{c}", str(code), float(rng.integers(0, 4)) / 4))  # many ties
            if rng.random() < 0.25:
                adopted.append((f"c{c}", str(code)))
    scores, actual = _scores(rows), _pairs(adopted)

    def reference(k: int) -> dict[str, float]:
        totals = dict.fromkeys(["map", "precision", "recall", "ndcg", "hit_rate"], 0.0)
        relevant = actual.groupby("customer_id")["product_code"].apply(set).to_dict()
        evaluated = 0
        for customer, group in scores.groupby("customer_id"):
            truth = relevant.get(customer, set())
            if not truth:
                continue
            evaluated += 1
            ranked = sorted(zip(group["score"], group["product_code"], strict=True),
                            key=lambda pair: (-pair[0], pair[1]))  # fmt: skip
            predicted = [code for _, code in ranked][:k]
            hits, precision_sum, dcg = 0, 0.0, 0.0
            for i, code in enumerate(predicted, start=1):
                if code in truth:
                    hits += 1
                    precision_sum += hits / i
                    dcg += 1 / math.log2(i + 1)
            ideal = sum(1 / math.log2(i + 1) for i in range(1, min(k, len(truth)) + 1))
            totals["map"] += precision_sum / min(k, len(truth))
            totals["precision"] += hits / k
            totals["recall"] += hits / len(truth)
            totals["ndcg"] += dcg / ideal
            totals["hit_rate"] += float(hits > 0)
        return {name: value / evaluated for name, value in totals.items()} | {"n": evaluated}

    table = ranking_metrics(scores, actual, ks=(1, 2, 3, 5, 10))
    for k in (1, 2, 3, 5, 10):
        expected = reference(k)
        assert _metric(table, k, "n_customers") == expected.pop("n")
        for column, value in expected.items():
            assert _metric(table, k, column) == pytest.approx(value, abs=1e-12), (k, column)


# --------------------------------------------------------------------------- properties


def _grid(n_customers: int, n_products: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every customer has every product as a candidate and adopted exactly one."""
    rng = np.random.default_rng(seed)
    customers = np.repeat(np.arange(n_customers), n_products)
    products = np.tile([f"p{j:02d}" for j in range(n_products)], n_customers)
    scores = pd.DataFrame(
        {"customer_id": customers, "product_code": products, "score": rng.random(len(customers))}
    )
    chosen = rng.integers(0, n_products, n_customers)
    actual = pd.DataFrame(
        {"customer_id": np.arange(n_customers), "product_code": [f"p{j:02d}" for j in chosen]}
    )
    return scores, actual


def test_a_perfect_ranking_scores_one() -> None:
    scores, actual = _grid(500, 8, seed=1)
    oracle = oracle_scores(scores[["customer_id", "product_code"]], actual)
    table = ranking_metrics(oracle, actual, ks=(1, 3, 5))
    for column in ("map", "recall", "ndcg", "hit_rate"):
        assert table[column].tolist() == [1.0, 1.0, 1.0], column
    # One adoption each: precision@k of a perfect ranking is 1/k.
    assert table["precision"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 5])


def test_a_random_ranking_scores_its_expected_value() -> None:
    # 10 candidates, one adopted, random order: the adopted product's rank is uniform on
    # 1..10, so hit@k = recall@k = k/10, precision@k = 1/10,
    # MAP@k = E[1/rank; rank <= k] = (1/10) * sum_{i<=k} 1/i and
    # NDCG@k = (1/10) * sum_{i<=k} 1/log2(i + 1).
    scores, actual = _grid(20_000, 10, seed=2)
    table = ranking_metrics(scores, actual, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert _metric(table, k, "hit_rate") == pytest.approx(k / 10, abs=0.015)
        assert _metric(table, k, "recall") == pytest.approx(k / 10, abs=0.015)
        assert _metric(table, k, "precision") == pytest.approx(1 / 10, abs=0.005)
        expected_map = sum(1 / i for i in range(1, k + 1)) / 10
        expected_ndcg = sum(1 / math.log2(i + 1) for i in range(1, k + 1)) / 10
        assert _metric(table, k, "map") == pytest.approx(expected_map, abs=0.01)
        assert _metric(table, k, "ndcg") == pytest.approx(expected_ndcg, abs=0.01)


def test_a_planted_signal_beats_random() -> None:
    rng = np.random.default_rng(5)
    scores, actual = _grid(5_000, 10, seed=3)
    adopted = label_pairs(scores, actual)["label"].to_numpy()
    informed = scores.assign(score=adopted * 1.0 + rng.normal(0, 0.7, len(scores)))
    table = compare({"random": scores, "informed": informed}, actual, baseline="random")
    assert table.loc["informed", "MAP@3"] > 2 * table.loc["random", "MAP@3"]
    assert table.loc["informed", "MAP@3/random"] > 2


def test_metrics_are_monotone_in_k() -> None:
    scores, actual = _grid(2_000, 12, seed=4)
    table = ranking_metrics(scores, actual, ks=(1, 2, 3, 5, 8, 12))
    for column in ("recall", "hit_rate", "ndcg", "map"):
        assert table[column].is_monotonic_increasing, column
    assert _metric(table, 12, "recall") == 1.0


def test_unscored_candidates_rank_last() -> None:
    candidates = _pairs([("A", "p1"), ("A", "p2"), ("A", "p3")])
    partial = _scores([("A", "p3", 0.1)])
    # Ranking: p3 (scored), then p1, p2 (unscored, by code). Adopted p1 sits at rank 2.
    table = ranking_metrics(partial, _pairs([("A", "p1")]), ks=(1, 2), candidates=candidates)
    assert table["hit_rate"].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="not candidates"):
        ranking_metrics(_scores([("A", "p9", 0.5)]), _pairs([("A", "p1")]), candidates=candidates)


def test_ranking_runs_fast_on_a_bank_sized_problem() -> None:
    # 100k customers x 20 products = 2M candidate pairs.
    scores, actual = _grid(100_000, 20, seed=6)
    start = time.perf_counter()
    table = ranking_metrics(scores, actual)
    elapsed = time.perf_counter() - start
    assert table["n_customers"].iloc[0] == 100_000
    assert elapsed < 10, f"took {elapsed:.1f}s"


# --------------------------------------------------------------------------- compare


def test_compare_judges_every_model_on_the_same_customers() -> None:
    scores = _scores(
        [
            ("A", "p1", 0.9),
            ("A", "p2", 0.1),
            ("B", "p1", 0.2),
            ("B", "p2", 0.8),
        ]
    )
    actual = _pairs([("A", "p1"), ("B", "p1")])
    # Popularity puts p1 first for everyone: right for A and B, MAP@1 = 1.
    popularity = scores.assign(score=[0.5, 0.3, 0.5, 0.3])
    # The model gets A right and B wrong: MAP@1 = 1/2; at k = 2 B's p1 is at rank 2:
    # AP@2 = 1/2, so MAP@2 = (1 + 1/2) / 2 = 3/4.
    # "partial" only scored A's pairs; B's candidates are unscored and ranked by code,
    # p1 first, so it is right for B too.
    partial = scores.iloc[:2]
    table = compare(
        {"popularity": popularity, "model": scores, "partial": partial}, actual, ks=(1, 2)
    )
    assert table.index.tolist() == ["popularity", "model", "partial"]
    assert table.index.name == "model"
    assert list(table.columns) == [
        "MAP@1",
        "MAP@2",
        "precision@1",
        "precision@2",
        "recall@1",
        "recall@2",
        "NDCG@1",
        "NDCG@2",
        "hit@1",
        "hit@2",
        "n_customers",
        "coverage",
        "MAP@2/popularity",  # no k = 3: the largest k is used
    ]
    assert table["n_customers"].tolist() == [2, 2, 2]
    assert table.loc["model", "MAP@1"] == 0.5
    assert table.loc["model", "MAP@2"] == 0.75
    assert table.loc["partial", "MAP@1"] == 1.0
    assert table["coverage"].tolist() == [1.0, 1.0, 0.5]
    assert table.loc["model", "MAP@2/popularity"] == 0.75
    assert "MAP@3/popularity" in compare({"popularity": popularity}, actual).columns
    assert not any("/" in c for c in compare({"model": scores}, actual).columns)


# --------------------------------------------------------------------------- per product


def test_product_metrics_by_hand() -> None:
    scores = _scores(
        [
            ("c1", "X", 0.9),
            ("c2", "X", 0.8),
            ("c3", "X", 0.4),
            ("c4", "X", 0.3),
            ("c1", "Y", 0.2),
            ("c2", "Y", 0.1),
            ("c1", "Z", 2.0),
            ("c2", "Z", -1.0),
        ]
    )
    labels = _pairs([("c1", "X"), ("c3", "X"), ("c1", "Z"), ("c9", "Y")])  # c9 not scored
    table = product_metrics(scores, labels).set_index("product_code")
    assert ["product_code", *table.columns] == list(PRODUCT_COLUMNS)
    assert table.index.tolist() == ["X", "Y", "Z"]

    x = table.loc["X"]
    assert (x["n_candidates"], x["n_positive"], x["base_rate"]) == (4, 2, 0.5)
    # Pairs (adopter, non-adopter): 0.9>0.8, 0.9>0.3, 0.4<0.8, 0.4>0.3 -> 3 of 4.
    assert x["auc"] == pytest.approx(0.75)
    # Ranked 0.9(1) 0.8(0) 0.4(1) 0.3(0): recall steps 1/2 at precision 1, 1/2 at 2/3.
    assert x["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # (0.1^2 + 0.8^2 + 0.6^2 + 0.3^2) / 4 = 1.10 / 4.
    assert x["brier"] == pytest.approx(0.275)
    assert x["mean_predicted"] == pytest.approx(0.6)

    y = table.loc["Y"]  # no adopter: AUC and PR-AUC undefined
    assert y["n_positive"] == 0 and math.isnan(y["auc"]) and math.isnan(y["pr_auc"])
    assert y["brier"] == pytest.approx((0.2**2 + 0.1**2) / 2)

    z = table.loc["Z"]  # scores outside [0, 1] are not probabilities: no Brier score
    assert z["auc"] == 1.0 and z["pr_auc"] == 1.0 and math.isnan(z["brier"])


@pytest.mark.parametrize(
    "values",
    [
        pd.Series(["loan", "card", "loan", "account"]),
        # Categorical codes in catalogue order (not alphabetical), one unused.
        pd.Series(pd.Categorical(["x", "a", "x", "b"], categories=["x", "b", "a", "unused"])),
        pd.Series([10, 2, 10], dtype="int64"),  # as text, "10" sorts before "2"
        pd.Series(["b", "a"], dtype="string"),
    ],
)
def test_product_codes_are_the_sorted_text_factorisation(values: pd.Series) -> None:
    codes, products = product_codes(values)
    expected_codes, expected_products = pd.factorize(values.astype(str), sort=True)
    assert codes.tolist() == expected_codes.tolist()
    assert products == [str(p) for p in expected_products]


def test_product_metrics_of_categorical_codes_equal_those_of_text() -> None:
    rows = [("c1", "Y", 0.9), ("c2", "X", 0.8), ("c3", "Y", 0.4), ("c1", "X", 0.3)]
    text = _scores(rows)
    categorical = text.assign(
        product_code=pd.Categorical(text["product_code"], categories=["Y", "X"])
    )
    labels = _pairs([("c1", "Y"), ("c2", "X")])
    pd.testing.assert_frame_equal(
        product_metrics(categorical, labels), product_metrics(text, labels)
    )


def test_product_metrics_label_column_and_ties() -> None:
    scores = _scores([("a", "X", 0.5), ("b", "X", 0.5), ("c", "X", 0.1)])
    labels = pd.DataFrame(
        {"customer_id": ["a", "b", "c"], "product_code": ["X", "X", "X"], "label": [1, 0, 0]}
    )
    row = product_metrics(scores, labels).iloc[0]
    assert row["n_positive"] == 1
    # The adopter ties one non-adopter (counts 1/2) and beats the other: (0.5 + 1) / 2.
    assert row["auc"] == pytest.approx(0.75)
    # One threshold at 0.5 holds the adopter at precision 1/2.
    assert row["pr_auc"] == pytest.approx(0.5)


def test_product_metrics_agree_with_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(8)
    n = 3_000
    label = rng.random(n) < 0.1
    score = np.round(np.clip(0.1 + 0.2 * label + rng.normal(0, 0.15, n), 0, 1), 2)
    scores = pd.DataFrame({"customer_id": np.arange(n), "product_code": "X", "score": score})
    labels = scores.loc[label, ["customer_id", "product_code"]]
    row = product_metrics(scores, labels).iloc[0]
    assert row["auc"] == pytest.approx(metrics.roc_auc_score(label, score), abs=1e-12)
    assert row["pr_auc"] == pytest.approx(metrics.average_precision_score(label, score), abs=1e-12)
    assert row["brier"] == pytest.approx(metrics.brier_score_loss(label, score), abs=1e-12)
    assert row["auc"] > 0.8  # the planted signal is found


# --------------------------------------------------------------------------- calibration


def test_calibration_table_by_hand() -> None:
    # Quantile edges of [0.1, 0.2, 0.3, 0.4] with 2 bins: 0.1, 0.25, 0.4.
    # Bin 1: {0.1, 0.2}, mean 0.15, observed 0/2. Bin 2: {0.3, 0.4}, mean 0.35, observed 2/2.
    # ECE = 1/2 * |0 - 0.15| + 1/2 * |1 - 0.35| = 0.075 + 0.325 = 0.4.
    table = calibration_table([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], bins=2)
    assert table["count"].tolist() == [2, 2]
    assert table["mean_predicted"].tolist() == pytest.approx([0.15, 0.35])
    assert table["observed_rate"].tolist() == [0.0, 1.0]
    assert table["lower"].tolist() == pytest.approx([0.1, 0.25])
    assert table.attrs["ece"] == pytest.approx(0.4)
    assert expected_calibration_error(table) == pytest.approx(0.4)


def test_calibration_uniform_bins_skip_empty_ones() -> None:
    # 0.05 -> bin 1, 0.15 -> bin 2, 0.95 and 1.0 -> bin 10 (the last bin is closed).
    # ECE = (1/4)|0 - 0.05| + (1/4)|1 - 0.15| + (2/4)|1/2 - 0.975| = 0.0125 + 0.2125 + 0.2375.
    table = calibration_table([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 0], strategy="uniform")
    assert table["bin"].tolist() == [1, 2, 10]
    assert table["count"].tolist() == [1, 1, 2]
    assert table.attrs["ece"] == pytest.approx(0.4625)


def test_calibration_of_calibrated_probabilities_is_small() -> None:
    rng = np.random.default_rng(9)
    p = rng.beta(1, 20, 200_000)
    y = rng.random(len(p)) < p
    table = calibration_table(p, y, bins=10)
    assert len(table) == 10
    assert table["count"].sum() == len(p)
    assert table.attrs["ece"] < 0.005
    assert expected_calibration_error(calibration_table(p * 2, y)) > 0.02


def test_calibration_ties_do_not_split_bins() -> None:
    table = calibration_table([0.2] * 6 + [0.5] * 2, [0, 0, 0, 1, 0, 0, 1, 1], bins=4)
    assert table["count"].tolist() == [6, 2]
    assert table["observed_rate"].tolist() == pytest.approx([1 / 6, 1.0])


# --------------------------------------------------------------------------- gains


def test_gains_table_by_hand() -> None:
    # Sorted: 0.9(1) 0.8(0) | 0.7(1) 0.6(0). Two groups with one adoption each.
    table = gains_table([0.6, 0.9, 0.7, 0.8], [0, 1, 1, 0], groups=2)
    assert list(table.columns) == list(GAINS_COLUMNS)
    assert table["n"].tolist() == [2, 2]
    assert table["positives"].tolist() == [1.0, 1.0]
    assert table["cum_gain"].tolist() == [0.5, 1.0]
    assert table["lift"].tolist() == [1.0, 1.0]
    assert table["max_score"].tolist() == [0.9, 0.7]
    assert table["min_score"].tolist() == [0.8, 0.6]

    # Sorted: 0.9(1) 0.8(1) | 0.7(0) 0.6(0) 0.5(0); groups of 2 and 3 (floor(5/2) = 2).
    # Overall rate 2/5; group 1 rate 1 -> lift 2.5; cumulative gain 1 at 40 % of pairs.
    table = gains_table([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 0, 0], groups=2)
    assert table["n"].tolist() == [2, 3]
    assert table["lift"].tolist() == pytest.approx([2.5, 0.0])
    assert table["cum_gain"].tolist() == [1.0, 1.0]
    assert table["cum_lift"].tolist() == pytest.approx([2.5, 1.0])


def test_gains_of_tied_scores_are_those_of_a_random_order() -> None:
    # All scores equal: every pair counts as the mean label 1/2, whatever the row order.
    table = gains_table([0.3, 0.3, 0.3, 0.3], [1, 1, 0, 0], groups=2)
    assert table["positives"].tolist() == [1.0, 1.0]
    assert table["cum_gain"].tolist() == [0.5, 1.0]
    assert table["lift"].tolist() == [1.0, 1.0]


def test_gains_of_a_random_ranking_follow_the_diagonal() -> None:
    rng = np.random.default_rng(10)
    y = rng.random(100_000) < 0.05
    table = gains_table(rng.random(len(y)), y)
    assert table["cum_gain"].to_numpy() == pytest.approx(table["cum_share"].to_numpy(), abs=0.02)
    assert table["n"].sum() == len(y)


# --------------------------------------------------------------------------- baselines


def test_popularity_scores_by_hand() -> None:
    adoptions = pd.DataFrame(
        [
            ("C1", "current_account", "2020-01-01"),
            ("C1", "credit_card", "2024-06-10"),  # in window
            ("C2", "savings", "2023-01-01"),
            ("C2", "current_account", "2024-06-15"),  # in window
            ("C3", "current_account", "2021-01-01"),
            ("C3", "savings", "2024-06-01"),  # exactly at the window start: in
            ("C3", "credit_card", "2024-07-01"),  # at the cutoff: not seen
            ("C4", "credit_card", "2024-08-01"),  # after the cutoff: not seen
        ],
        columns=["customer_id", "product_code", "adopted_at"],
    )
    adoptions["adopted_at"] = pd.to_datetime(adoptions["adopted_at"])
    candidates = _pairs(
        [
            ("C3", "mortgage"),
            ("C3", "credit_card"),
            ("C4", "savings"),
            ("C4", "current_account"),
        ]
    )
    scores = popularity_scores(adoptions, candidates, as_of="2024-07-01", window_days=30)
    # Window [2024-06-01, 2024-07-01); customers seen before the cutoff: C1, C2, C3.
    # current_account: C1, C3 had it before the window; C2 adopted in it -> 1 / (3 - 2).
    # credit_card: C1 in the window, nobody before -> 1 / 3.
    # savings: C2 before, C3 in the window -> 1 / (3 - 1).  mortgage: nobody -> 0.
    assert scores["score"].tolist() == pytest.approx([0.0, 1 / 3, 0.5, 1.0])
    assert scores[["customer_id", "product_code"]].equals(candidates)

    aware = adoptions.assign(adopted_at=adoptions["adopted_at"].dt.tz_localize("Europe/Prague"))
    same = popularity_scores(aware, candidates, as_of="2024-07-01", window_days=30)
    assert same["score"].tolist() == scores["score"].tolist()

    with pytest.raises(ValueError, match="window_days"):
        popularity_scores(adoptions, candidates, as_of="2024-07-01", window_days=0)
    with pytest.raises(ValueError, match="no adoption before"):
        popularity_scores(adoptions, candidates, as_of="2000-01-01", window_days=30)


def test_oracle_and_labels() -> None:
    candidates = _pairs([("A", "p1"), ("A", "p2")])
    oracle = oracle_scores(candidates, _pairs([("A", "p2"), ("A", "p7")]))
    assert oracle["score"].tolist() == [0.0, 1.0]
    labelled = label_pairs(oracle, _pairs([("A", "p2")]))
    assert labelled["label"].tolist() == [0, 1]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("scores", "actual", "message"),
    [
        (_scores([]), _pairs([("A", "p1")]), "empty"),
        (_scores([("A", "p1", 0.5)]), _pairs([]), "no customer adopted"),
        (_scores([("A", "p1", 0.5)]), _pairs([("A", "p2")]), "no customer adopted"),
        (_scores([("A", "p1", math.nan)]), _pairs([("A", "p1")]), "missing"),
        (_scores([("A", "p1", 0.5), ("A", "p1", 0.4)]), _pairs([("A", "p1")]), "repeated"),
        (pd.DataFrame({"customer_id": ["A"], "score": [1.0]}), _pairs([("A", "p1")]), "missing"),
        (_scores([("A", "p1", 0.5)]), pd.DataFrame({"customer_id": ["A"]}), "missing column"),
    ],
)
def test_ranking_errors_are_clear(scores: pd.DataFrame, actual: pd.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(scores, actual)


@pytest.mark.parametrize("ks", [(), (0,), (1, 1), (2.5,), (True,)])
def test_bad_cutoffs_are_rejected(ks: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match="k"):
        ranking_metrics(_scores([("A", "p1", 0.5)]), _pairs([("A", "p1")]), ks=ks)  # type: ignore[arg-type]


def test_other_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="models is empty"):
        compare({}, _pairs([("A", "p1")]))
    with pytest.raises(ValueError, match="empty"):
        product_metrics(_scores([]), _pairs([]))
    with pytest.raises(ValueError, match="0/1"):
        product_metrics(
            _scores([("A", "p1", 0.5)]),
            pd.DataFrame({"customer_id": ["A"], "product_code": ["p1"], "label": [2]}),
        )
    with pytest.raises(ValueError, match="empty"):
        calibration_table([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_table([1.5], [1])
    with pytest.raises(ValueError, match="expected 2"):
        calibration_table([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="strategy"):
        calibration_table([0.5], [1], strategy="kmeans")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no positive"):
        gains_table([0.1, 0.2], [0, 0], groups=2)
    with pytest.raises(ValueError, match="at least 10"):
        gains_table([0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        gains_table([], [], groups=1)
