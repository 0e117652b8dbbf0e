"""Holdout evaluation (models/evaluation.py): the comparison measured a chunk of customers
at a time equals the one-pass measurement, and references join the candidates exactly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import models.metrics as metrics
from models.data import BankData
from models.evaluation import (
    HoldoutResult,
    _references,
    campaign_metrics,
    holdout_comparison,
    holdout_evaluation,
    truth_reference,
)
from models.metrics import product_metrics, ranking_metrics
from models.propensity import TrainConfig
from models.synthetic import generate_bank, write_bank

AS_OF = dt.date(2025, 12, 1)


@pytest.fixture(scope="module")
def holdout() -> HoldoutResult:
    bank = generate_bank(2_000, seed=11)
    data = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    config = TrainConfig(n_cutoffs=1, max_rounds=40, num_threads=1)
    return holdout_evaluation(data, as_of=AS_OF, horizon_days=90, config=config)


def test_the_comparison_in_chunks_of_customers_equals_one_pass(
    holdout: HoldoutResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ranking metrics are means over customers: measured a few customers at a time
    and averaged once, they are the one-pass figures to the bit."""
    models = dict(holdout.ranked)
    # A model that scored only some of the candidates: its others rank last.
    models["partial"] = models["blend"].iloc[::3].reset_index(drop=True)
    n_pairs = len(models["blend"])
    assert n_pairs < metrics._CHUNK_PAIRS  # the default measures this bank in one pass
    whole, whole_products = holdout_comparison(models, holdout.actual)
    monkeypatch.setattr(metrics, "_CHUNK_PAIRS", 40)
    pairs = metrics.CandidatePairs.of(list(models.values()), holdout.actual)
    chunks = metrics._customer_chunks(pairs.universe, pairs.space.n_products)
    assert len(chunks) > 100
    assert chunks[0][0] == 0 and chunks[-1][1] == len(pairs.universe)
    chunked, chunked_products = holdout_comparison(models, holdout.actual)
    pd.testing.assert_frame_equal(chunked, whole, check_exact=True)
    pd.testing.assert_frame_equal(chunked_products, whole_products, check_exact=True)
    # The served rows are those the holdout recorded, and the blend is better than
    # popularity on this planted bank (the comparison measures something).
    pd.testing.assert_frame_equal(
        chunked.drop(index="partial"), holdout.comparison, check_exact=True
    )
    assert chunked.loc["blend", "MAP@3"] > chunked.loc["popularity", "MAP@3"]
    for name in ("blend", "partial"):
        one = ranking_metrics(models[name], holdout.actual, candidates=models["blend"])
        assert one.set_index("k")["map"].tolist() == [
            chunked.loc[name, f"MAP@{k}"] for k in (1, 3, 5)
        ]


def test_per_product_figures_match_product_metrics(holdout: HoldoutResult) -> None:
    """AUC and counts per product, read from the shared arrays, equal those of the
    labelled pairs of each model's own frame."""
    _, by_product = holdout_comparison(holdout.ranked, holdout.actual)
    for name, scores in holdout.ranked.items():
        ours = by_product.loc[by_product["model"] == name].set_index("product_code")
        theirs = product_metrics(scores, holdout.actual).set_index("product_code")
        assert ours.index.tolist() == theirs.index.tolist()
        assert ours["n_candidates"].tolist() == theirs["n_candidates"].tolist()
        assert ours["n_positive"].tolist() == theirs["n_positive"].tolist()
        np.testing.assert_array_equal(ours["auc"].to_numpy(), theirs["auc"].to_numpy())
        single = campaign_metrics(scores, holdout.actual).set_index("product_code")
        pd.testing.assert_frame_equal(single, ours.drop(columns="model"), check_exact=True)


@pytest.mark.parametrize("share", [0.7, 0.02])  # most cells are candidates, or few
# The oracle gives its customer ids as categorical (categories: every customer, some of
# them scoring nothing, and some not among the candidates).
@pytest.mark.parametrize("categorical_ids", [False, True])
def test_a_reference_scores_the_candidates_as_a_left_join_would(
    share: float, categorical_ids: bool
) -> None:
    rng = np.random.default_rng(5)
    ids = np.array([f"c{i:04d}" for i in range(300)], dtype=object)
    customer = np.repeat(np.arange(300), 60)
    product = np.tile(np.arange(60), 300)
    keep = rng.random(customer.size) < share
    candidates = pd.DataFrame(
        {
            "customer_id": pd.Series(ids[customer[keep]], dtype="str"),
            "product_code": pd.Categorical.from_codes(product[keep], [f"p{j}" for j in range(60)]),
        }
    )
    scored = rng.random(customer.size) < share * 1.1
    reference = pd.DataFrame(
        {
            "customer_id": ids[customer[scored]],
            # A product the candidates do not have, as text rather than categorical.
            "product_code": [f"p{j}" if j < 59 else "other" for j in product[scored]],
            "score": rng.random(int(scored.sum())),
        }
    )
    reference.loc[reference.index[::40], "score"] = np.nan
    reference = reference.sample(frac=1.0, random_state=2)
    if categorical_ids:
        everyone = [*ids, "c9999", "unscored"]
        reference["customer_id"] = pd.Categorical(reference["customer_id"], categories=everyone)
        reference.loc[reference.index[-3:], "customer_id"] = "c9999"  # not a candidate
    as_text = reference.assign(customer_id=reference["customer_id"].astype(str))
    joined = candidates.merge(as_text, on=["customer_id", "product_code"], how="left").fillna(
        {"score": 0.0}
    )
    out = _references({"oracle": lambda *_: reference}, AS_OF, 90, candidates)["oracle"]
    assert out["customer_id"].tolist() == candidates["customer_id"].tolist()
    assert (
        out["product_code"].astype(str).tolist() == candidates["product_code"].astype(str).tolist()
    )
    np.testing.assert_array_equal(out["score"].to_numpy(), joined["score"].to_numpy())
    assert (out["score"] == 0).any() and (out["score"] > 0).any()
    twice = pd.concat([reference, reference.iloc[:1]])
    with pytest.raises(ValueError, match="more than once"):
        _references({"oracle": lambda *_: twice}, AS_OF, 90, candidates)


def test_the_oracle_names_its_bank_folder_and_a_repeated_customer(tmp_path: Path) -> None:
    """A bank folder edited by hand with a customer twice: the oracle says which folder
    and which id, rather than scoring one of the two rows."""
    written = write_bank(generate_bank(300, seed=3), tmp_path)
    lines = written["customers"].read_text().splitlines()
    written["customers"].write_text("\n".join([*lines, lines[1]]) + "\n")
    repeated = lines[1].split(",")[0]
    with pytest.raises(ValueError, match=f"{tmp_path}: id '{repeated}' appears more than once"):
        truth_reference(tmp_path)(AS_OF, 90, pd.DataFrame())
