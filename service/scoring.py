"""Batch scoring and rule listing over a registered model version.

``nbo score`` writes every customer's ranked offers (or one product's campaign list)
with the active version; customers imported after training are scored from their
current data, because features are built from the database at scoring time by the
same builder that trained the model. Offers are ranked as the decision API ranks them
(:meth:`service.decision.policy.Arbiter.rank`): by ``score`` = propensity x value x
business weight, ties by product code; or, when asked, by propensity alone.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from models.eligibility import Catalogue
from models.propensity import PropensityModel
from models.rules import RuleSet, rules_for_display
from service.data import registry
from service.data.bank import default_as_of, load_bank
from service.data.db import read_only, unit_of_work

if TYPE_CHECKING:
    from service.distributed import ClusterBank


class ScoringError(Exception):
    """Scoring cannot run: no active version, a changed bundle."""


class UnknownName(ScoringError):
    """Scoring was asked for something that does not exist: a model version, a product,
    an output format (a usage error: the command line exits with status 2)."""


RankBy = Literal["expected-value", "propensity"]
RANK_BY: tuple[RankBy, ...] = ("expected-value", "propensity")
"""What offers can be ranked by: ``expected-value`` (the ``score`` column, as the
decision API ranks) or ``propensity``."""


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
                raise UnknownName(str(exc)) from None
        session.expunge(row)
    try:
        with read_only(engine).connect() as conn:
            return row.version, registry.load_model(conn, row)
    except registry.RegistryError as exc:
        raise ScoringError(str(exc)) from None


def with_values(scores: pd.DataFrame, catalogue: Catalogue) -> pd.DataFrame:
    """``scores`` with the decision API's ``expected_value`` (propensity x the product's
    value) and ``score`` (expected value x business weight) columns."""
    index = scores["product_code"].map(catalogue.index).to_numpy()
    propensity = scores["propensity"].to_numpy(dtype=np.float64)
    expected = propensity * catalogue.values[index]
    return scores.assign(
        expected_value=expected, score=expected * catalogue.business_weights[index]
    )


def rank_offers(
    scores: pd.DataFrame,
    *,
    top_k: int | None = None,
    product: str | None = None,
    rank_by: RankBy = "expected-value",
) -> pd.DataFrame:
    """Rank scored pairs: per customer (1 = best), or per product over customers.

    ``rank_by`` ``expected-value`` orders by ``score`` (see :func:`with_values`), as the
    decision API does; ``propensity`` by propensity. A customer's ties are broken by
    product code (as the API breaks them), a product's by propensity then customer id,
    so the output is deterministic.
    """
    key = "score" if rank_by == "expected-value" else "propensity"
    columns = ["customer_id", "product_code", "propensity"]
    columns += [c for c in ("expected_value", "score") if c in scores.columns]
    frame = scores.loc[:, [*columns, "lgbm", "rules"]]
    if product is not None:
        frame = frame.loc[frame["product_code"] == product]
        order = [key, "propensity", "customer_id"] if key != "propensity" else [key, "customer_id"]
        frame = frame.sort_values(
            order, ascending=[False] * (len(order) - 1) + [True], kind="stable"
        )
        frame.insert(2, "rank", np.arange(1, len(frame) + 1, dtype=np.int64))
    else:
        frame = frame.sort_values(
            ["customer_id", key, "product_code"], ascending=[True, False, True], kind="stable"
        )
        frame.insert(2, "rank", frame.groupby("customer_id", sort=False).cumcount() + 1)
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
    rank_by: RankBy = "expected-value",
    progress: Callable[[str, float], None] | None = None,
    cluster_bank: ClusterBank | None = None,
) -> ScoreResult:
    """Score every customer with ``version`` and write the ranked pairs to ``out``.

    ``as_of`` defaults to the later of the model's training cutoff and the day after the
    last recorded adoption, so that recent adoptions are seen and held products are
    never offered. Eligibility, values and business weights are the catalogue's now,
    as in serving.

    With ``cluster_bank`` (:func:`service.distributed.open_bank`) the partitions are
    scored on the Dask cluster and gathered here to be ranked and written: the same
    file as without it.
    """
    if rank_by not in RANK_BY:
        raise UnknownName(f"--rank-by {rank_by!r}: choose {' or '.join(RANK_BY)}")
    suffix = "".join(out.suffixes[-2:]).lower()
    if suffix not in (".csv", ".csv.gz", ".parquet") and out.suffix.lower() not in (
        ".csv",
        ".parquet",
    ):
        raise UnknownName(f"{out}: the output must end in .csv, .csv.gz or .parquet")
    if progress:
        progress("loading the model", 0.05)
    version_id, model = load_version(engine, version)
    if product is not None and product not in model.product_codes:
        raise UnknownName(
            f"--product {product!r}: model version {version_id} does not score it "
            f"(it scores {', '.join(model.product_codes)})"
        )
    if cluster_bank is not None:
        from service.distributed import default_as_of as cluster_as_of
        from service.distributed import scores_on_cluster

        day = as_of or max(model.as_of.date(), cluster_as_of(cluster_bank))
        if progress:
            progress("scoring on the Dask cluster", 0.3)
        catalogue = cluster_bank.catalogue
        scores = scores_on_cluster(
            cluster_bank,
            model,
            as_of=day,
            catalogue=catalogue,
            apply=functools.partial(with_values, catalogue=catalogue),
        )
    else:
        if progress:
            progress("loading the bank", 0.2)
        data = load_bank(engine, reader="scoring")
        day = as_of or max(model.as_of.date(), default_as_of(data))
        if progress:
            progress("scoring", 0.5)
        catalogue = Catalogue.from_data(data)
        scores = with_values(model.score(data, as_of=day, catalogue=catalogue), catalogue)
    ranked = rank_offers(scores, top_k=top_k, product=product, rank_by=rank_by)
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


RULE_COLUMNS = (
    "antecedent",
    "consequent",
    "ordered",
    "support",
    "confidence",
    "lift",
    "conviction",
    "n_customers",
    "median_days",
)
"""The columns of :func:`model_rules`' table, in order."""


def model_rules(
    engine: Engine,
    *,
    version: str | None = None,
    consequents: Sequence[str] | None = None,
    min_confidence: float = 0.0,
    min_lift: float = 0.0,
    ordered: bool | None = None,
    everything: bool = False,
) -> tuple[str, pd.DataFrame, int]:
    """The mined rules of a version, filtered, in the order decisions choose their
    reasons (:func:`models.rules.rules_for_display`: lift above 1 and enough customers
    behind the rule, by lift, conviction, confidence), with how many of the filtered
    rules are left out; ``everything`` keeps them all, in the same order.

    The antecedent is rendered as text: ``a, b`` for co-holding rules, ``a -> b`` for
    ordered ones.
    """
    version_id, model = load_version(engine, version)
    if model.rules is None:
        return (
            version_id,
            pd.DataFrame(columns=list(RULE_COLUMNS)),
            0,
        )
    frame = model.rules.to_frame()
    keep = (frame["confidence"] >= min_confidence) & (frame["lift"] >= min_lift)
    if consequents:
        unknown = sorted(set(consequents) - set(model.product_codes))
        if unknown:
            raise UnknownName(
                f"--consequent: unknown product(s) {', '.join(unknown)} "
                f"(model version {version_id} has {', '.join(model.product_codes)})"
            )
        keep &= frame["consequent"].isin(list(consequents))
    if ordered is not None:
        keep &= frame["ordered"] == ordered
    chosen = [rule for rule, kept in zip(model.rules.rules, keep, strict=True) if kept]
    shown, left_out = (
        rules_for_display(chosen, min_lift=-math.inf, min_customers=0)
        if everything
        else rules_for_display(chosen)
    )
    frame = RuleSet(shown, model.rules.mode, model.rules.params).to_frame()
    frame["antecedent"] = [
        (" -> " if is_ordered else ", ").join(items)
        for items, is_ordered in zip(frame["antecedent"], frame["ordered"], strict=True)
    ]
    return version_id, frame.loc[:, list(RULE_COLUMNS)], left_out
