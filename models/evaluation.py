"""Temporal holdout evaluation: train before a cutoff, measure on the adoptions after it.

The served blend is compared side by side with its parts (LightGBM alone, the
best rule's confidence alone) and with the popularity baseline, on the same
candidates (eligible, not held at the cutoff) and the same customers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from models.data import BankData
from models.metrics import (
    calibration_table,
    compare,
    gains_table,
    label_pairs,
    popularity_scores,
    product_metrics,
)
from models.propensity import PropensityModel, TrainConfig
from models.propensity.training import ProgressFn, train
from models.synthetic import read_truth, true_propensities

ReferenceScorer = Callable[[dt.date, int, pd.DataFrame], pd.DataFrame]
"""``(cutoff, horizon_days, candidates) -> scores``: a reference ranking (e.g. the oracle)."""


@dataclass(frozen=True)
class HoldoutResult:
    """What a temporal holdout measured."""

    cutoff: dt.date
    horizon_days: int
    model: PropensityModel
    scores: pd.DataFrame
    actual: pd.DataFrame
    comparison: pd.DataFrame
    ranked: Mapping[str, pd.DataFrame]
    """Each compared model's scores (``customer_id, product_code, score``)."""

    def summary_metrics(self, served: str = "blend") -> dict[str, Any]:
        """Flat, JSON-ready headline metrics (``map@3`` of the served model first)."""
        table = self.comparison
        out: dict[str, Any] = {
            "holdout_cutoff": self.cutoff.isoformat(),
            "holdout_customers": int(table["n_customers"].iloc[0]),
        }
        for model in table.index:
            for k in (1, 3, 5):
                column = f"MAP@{k}"
                if column in table:
                    out[f"{model}.map@{k}"] = float(table.loc[model, column])
        out["map@3"] = out.get(f"{served}.map@3")
        return out


def holdout_evaluation(
    data: BankData,
    *,
    as_of: dt.date,
    horizon_days: int = 90,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    references: Mapping[str, ReferenceScorer] | None = None,
) -> HoldoutResult:
    """Train with data before ``as_of - horizon_days`` and measure the next ``horizon_days``.

    Parameters
    ----------
    data : BankData
        The whole bank; only adoptions strictly before the cutoff reach training.
    as_of : datetime.date
        End of the observed history; the cutoff is ``horizon_days`` before it.
    horizon_days : int
        Length of the evaluation window (the propensity horizon).
    references : mapping of str to ReferenceScorer, optional
        Extra rows for the comparison, such as the oracle of a synthetic bank
        (:func:`truth_reference`). Each is called with the cutoff, the horizon and the
        candidate pairs and scores only those pairs.
    """
    cutoff = as_of - dt.timedelta(days=horizon_days)
    model = train(data, as_of=cutoff, horizon_days=horizon_days, config=config, progress=progress)
    scores = model.score(data, as_of=cutoff)
    start = pd.Timestamp(cutoff)
    end = start + pd.Timedelta(days=horizon_days)
    adopted = data.adoptions["adopted_at"]
    actual = data.adoptions.loc[
        (adopted >= start) & (adopted < end), ["customer_id", "product_code"]
    ]
    actual = actual.drop_duplicates()
    candidates = scores[["customer_id", "product_code"]]
    history = data.adoptions.loc[adopted < start]
    models = {
        "popularity": popularity_scores(history, candidates, as_of=cutoff, window_days=365),
        "rules": scores[["customer_id", "product_code"]].assign(score=scores["rules"].fillna(0.0)),
        "lightgbm": scores[["customer_id", "product_code"]].assign(score=scores["lgbm"]),
        "blend": scores[["customer_id", "product_code"]].assign(score=scores["propensity"]),
    }
    for name, scorer in (references or {}).items():
        reference = scorer(cutoff, horizon_days, candidates)
        models[name] = candidates.merge(
            reference[["customer_id", "product_code", "score"]],
            on=["customer_id", "product_code"],
            how="left",
        ).fillna({"score": 0.0})
    comparison = compare(models, actual, ks=(1, 3, 5))
    return HoldoutResult(cutoff, horizon_days, model, scores, actual, comparison, models)


def truth_reference(bank_dir: str | Path) -> ReferenceScorer:
    """The oracle of a synthetic bank: each pair scored by its true propensity.

    Parameters
    ----------
    bank_dir : str or pathlib.Path
        A folder written by :func:`models.synthetic.write_bank` (its ``truth/``,
        ``customers`` and ``adoptions`` files are read once, here).

    Returns
    -------
    ReferenceScorer
        Scores candidates by the probability, under the generator's own hazard model, of
        adopting within the horizon from the state the day before the cutoff (features
        see only what happened strictly before the cutoff, the same information),
        declined offers included when the bank has an offer history.

    Raises
    ------
    FileNotFoundError
        If the folder holds no ground truth.
    """
    folder = Path(bank_dir)
    truth, personas = read_truth(folder)
    customers = _read_table(folder, "customers")
    adoptions = _read_table(folder, "adoptions")
    try:
        outcomes: pd.DataFrame | None = _read_table(folder, "outcomes")
    except FileNotFoundError:
        outcomes = None

    def score(cutoff: dt.date, horizon_days: int, candidates: pd.DataFrame) -> pd.DataFrame:
        probabilities = true_propensities(
            truth,
            customers,
            adoptions,
            personas,
            as_of=cutoff - dt.timedelta(days=1),
            horizon_days=horizon_days,
            outcomes=outcomes,
        )
        frame = probabilities.rename(columns={"probability": "score"})
        frame["product_code"] = frame["product_code"].astype(str)
        return frame

    return score


def _read_table(folder: Path, name: str) -> pd.DataFrame:
    for suffix in (".parquet", ".csv", ".csv.gz"):
        path = folder / f"{name}{suffix}"
        if path.exists():
            if suffix == ".parquet":
                return pd.read_parquet(path)
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    raise FileNotFoundError(f"{folder}: no {name}.parquet, {name}.csv or {name}.csv.gz")


@dataclass(frozen=True)
class ReportInputs:
    """The frames :func:`models.evaluation_report.write_report` draws, for one holdout."""

    products: pd.DataFrame
    calibration: dict[str, pd.DataFrame]
    gains: dict[str, pd.DataFrame]
    rules: pd.DataFrame | None
    importance: pd.DataFrame


def report_inputs(result: HoldoutResult) -> ReportInputs:
    """Per-product metrics of the served blend, calibration and gains per model, rules
    and feature importance of the holdout model."""
    blend = result.ranked["blend"]
    products = product_metrics(blend, result.actual)
    calibration: dict[str, pd.DataFrame] = {}
    gains: dict[str, pd.DataFrame] = {}
    for name, scores in result.ranked.items():
        labelled = label_pairs(scores, result.actual)
        gains[name] = gains_table(labelled["score"], labelled["label"])
        if name in ("blend", "lightgbm", "oracle"):
            calibration[name] = calibration_table(labelled["score"], labelled["label"])
    rules = result.model.rules.to_frame() if result.model.rules is not None else None
    per_product = result.model.feature_importance()
    total = per_product.groupby("label", sort=False)["gain"].sum()
    importance = (
        (total / max(float(total.sum()), 1e-12))
        .rename("importance")
        .rename_axis("feature")
        .reset_index()
        .sort_values("importance", ascending=False, kind="stable")
        .reset_index(drop=True)
    )
    return ReportInputs(products, calibration, gains, rules, importance)
