"""Temporal holdout evaluation: train before a cutoff, measure on the adoptions after it.

The served blend is compared side by side with its parts (LightGBM alone, the
best rule's confidence alone) and with the popularity baseline, on the same
candidates (eligible, not held at the cutoff) and the same customers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pandas as pd

from models.data import BankData
from models.metrics import compare, popularity_scores
from models.propensity import ProgressFn, PropensityModel, TrainConfig, train


@dataclass(frozen=True)
class HoldoutResult:
    """What a temporal holdout measured."""

    cutoff: dt.date
    horizon_days: int
    model: PropensityModel
    scores: pd.DataFrame
    actual: pd.DataFrame
    comparison: pd.DataFrame

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
    comparison = compare(models, actual, ks=(1, 3, 5))
    return HoldoutResult(cutoff, horizon_days, model, scores, actual, comparison)
