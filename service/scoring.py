"""Batch scoring and rule listing over a registered model version.

``nbo score`` writes every customer's ranked offers (or one product's campaign list)
with the active version; customers imported after training are scored from their
current data, because features are built from the database at scoring time by the
same builder that trained the model.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from models.propensity import PropensityModel
from service.data import registry
from service.data.bank import default_as_of, load_bank
from service.data.db import unit_of_work


class ScoringError(Exception):
    """Scoring cannot run: no such version, no active version, unknown product, bad file."""


@dataclass(frozen=True)
class ScoreResult:
    version: str
    as_of: dt.date
    customers: int
    rows: int


def load_version(engine: Engine, version: str | None) -> tuple[str, PropensityModel]:
    """The named version (default: the active one), loaded and verified."""
    with unit_of_work(engine) as session:
        if version is None:
            row = registry.active_version(session)
            if row is None:
                raise ScoringError("no active model version: train one with `nbo train`")
        else:
            try:
                row = registry.get_version(session, version)
            except registry.RegistryError as exc:
                raise ScoringError(str(exc)) from None
        session.expunge(row)
    try:
        return row.version, registry.load_model(row)
    except registry.RegistryError as exc:
        raise ScoringError(str(exc)) from None


def rank_offers(
    scores: pd.DataFrame, *, top_k: int | None = None, product: str | None = None
) -> pd.DataFrame:
    """Rank scored pairs: per customer (1 = best), or per product over customers.

    Ties are broken by customer id and product code, so the output is deterministic.
    """
    frame = scores.loc[:, ["customer_id", "product_code", "propensity", "lgbm", "rules"]]
    if product is not None:
        frame = frame.loc[frame["product_code"] == product]
        frame = frame.sort_values(
            ["propensity", "customer_id"], ascending=[False, True], kind="stable"
        )
        frame.insert(3, "rank", np.arange(1, len(frame) + 1, dtype=np.int64))
    else:
        frame = frame.sort_values(
            ["customer_id", "propensity", "product_code"],
            ascending=[True, False, True],
            kind="stable",
        )
        frame.insert(3, "rank", frame.groupby("customer_id", sort=False).cumcount() + 1)
    if top_k is not None:
        frame = frame.loc[frame["rank"] <= top_k]
    return frame.reset_index(drop=True)


def score_bank(
    engine: Engine,
    *,
    out: Path,
    version: str | None = None,
    product: str | None = None,
    top_k: int | None = None,
    as_of: dt.date | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> ScoreResult:
    """Score every customer with ``version`` and write the ranked pairs to ``out``.

    ``as_of`` defaults to the later of the model's training cutoff and the day after the
    last recorded adoption, so that recent adoptions are seen and held products are
    never offered.
    """
    suffix = "".join(out.suffixes[-2:]).lower()
    if suffix not in (".csv", ".csv.gz", ".parquet") and out.suffix.lower() not in (
        ".csv",
        ".parquet",
    ):
        raise ScoringError(f"{out}: the output must end in .csv, .csv.gz or .parquet")
    if progress:
        progress("loading the model", 0.05)
    version_id, model = load_version(engine, version)
    if product is not None and product not in model.product_codes:
        raise ScoringError(
            f"--product {product!r}: model version {version_id} does not score it "
            f"(it scores {', '.join(model.product_codes)})"
        )
    if progress:
        progress("loading the bank", 0.2)
    data = load_bank(engine, reader="scoring")
    day = as_of or max(model.as_of.date(), default_as_of(data))
    if progress:
        progress("scoring", 0.5)
    scores = model.score(data, as_of=day)
    ranked = rank_offers(scores, top_k=top_k, product=product)
    if progress:
        progress("writing", 0.9)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    if out.suffix.lower() == ".parquet":
        ranked.to_parquet(partial, index=False)
    else:
        ranked.to_csv(partial, index=False, float_format="%.6f", compression="infer")
    partial.replace(out)
    return ScoreResult(version_id, day, int(ranked["customer_id"].nunique()), len(ranked))


def model_rules(
    engine: Engine,
    *,
    version: str | None = None,
    consequents: Sequence[str] | None = None,
    min_confidence: float = 0.0,
    min_lift: float = 0.0,
    ordered: bool | None = None,
) -> tuple[str, pd.DataFrame]:
    """The mined rules of a version, filtered, best first (confidence, lift, customers).

    The antecedent is rendered as text: ``a, b`` for co-holding rules, ``a -> b`` for
    ordered ones.
    """
    version_id, model = load_version(engine, version)
    if model.rules is None:
        return version_id, pd.DataFrame(
            columns=[
                "antecedent",
                "consequent",
                "ordered",
                "support",
                "confidence",
                "lift",
                "conviction",
                "n_customers",
                "median_days",
            ]
        )
    frame = model.rules.to_frame()
    keep = (frame["confidence"] >= min_confidence) & (frame["lift"] >= min_lift)
    if consequents:
        unknown = sorted(set(consequents) - set(model.product_codes))
        if unknown:
            raise ScoringError(f"--consequent: unknown product(s) {', '.join(unknown)}")
        keep &= frame["consequent"].isin(list(consequents))
    if ordered is not None:
        keep &= frame["ordered"] == ordered
    frame = frame.loc[keep].copy()
    frame["antecedent"] = [
        (" -> " if is_ordered else ", ").join(items)
        for items, is_ordered in zip(frame["antecedent"], frame["ordered"], strict=True)
    ]
    frame = frame.sort_values(
        ["confidence", "lift", "n_customers"], ascending=False, kind="stable"
    ).reset_index(drop=True)
    columns = [
        "antecedent",
        "consequent",
        "ordered",
        "support",
        "confidence",
        "lift",
        "conviction",
        "n_customers",
        "median_days",
    ]
    return version_id, frame.loc[:, columns]
