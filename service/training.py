"""Training job: read the bank from the database, evaluate on a holdout, train, register."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from models.artifacts import save_bundle
from models.data import BankData
from models.evaluation import (
    HoldoutResult,
    campaign_metrics,
    holdout_comparison,
    holdout_evaluation,
    report_inputs,
    truth_reference,
)
from models.evaluation_report import write_report
from models.metrics import compare
from models.model_card import build_card
from models.propensity import PropensityModel, TrainConfig
from models.propensity.training import train
from service.data import registry
from service.data.bank import default_as_of, load_bank
from service.data.db import read_only, unit_of_work
from service.data.tables import ModelVersion


@dataclass(frozen=True)
class TrainOutcome:
    version: ModelVersion
    activated: bool
    reason: str
    holdout: HoldoutResult
    card: dict[str, Any]
    """The version's model card (:func:`models.model_card.build_card`), also kept in the
    registry row's ``params["card"]``."""


WITHOUT_OUTCOMES = "blend without outcome features"
"""The comparison row of the served blend trained without offer outcome features."""


def evaluate(
    data: BankData,
    *,
    as_of: dt.date | None,
    horizon_days: int,
    truth_dir: Path | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[str, float], None] | None = None,
    outcome_comparison: bool = False,
) -> HoldoutResult:
    """The holdout of ``data`` ending at ``as_of``, with the oracle row when the bank is
    synthetic and ``truth_dir`` (the generated bank folder) is given.

    The holdout is temporal, or a seeded random split of customers when the data
    supports only one training cutoff (a campaign snapshot and its responders); see
    :func:`models.evaluation.holdout_evaluation`.

    With ``outcome_comparison``, when the data has offer outcomes and ``config`` uses
    them, the holdout is run a second time without outcome features and its blend is
    added to the comparison as :data:`WITHOUT_OUTCOMES` (same cutoff, candidates and
    adoptions), so the table shows what learning from outcomes adds.
    """
    as_of = as_of or default_as_of(data)
    config = config or TrainConfig()
    references = {"oracle": truth_reference(truth_dir)} if truth_dir is not None else None
    holdout = holdout_evaluation(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=(lambda stage, f: progress(f"holdout: {stage}", f)) if progress else None,
        references=references,
    )
    has_outcomes = data.outcomes is not None and not data.outcomes.empty
    if not (outcome_comparison and has_outcomes and config.outcome_features):
        return holdout
    plain = holdout_evaluation(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        config=replace(config, outcome_features=False),
        progress=(
            (lambda stage, f: progress(f"holdout without outcomes: {stage}", f))
            if progress
            else None
        ),
        kind=holdout.holdout_kind,
    )
    ranked = dict(holdout.ranked)
    ranked[WITHOUT_OUTCOMES] = plain.ranked["blend"]
    comparison, by_product = holdout_comparison(ranked, holdout.actual)
    return replace(holdout, ranked=ranked, comparison=comparison, by_product=by_product)


def write_evaluation_report(
    holdout: HoldoutResult,
    path: Path,
    *,
    data: BankData,
    title: str = "nbo evaluation",
    card: dict[str, Any] | None = None,
) -> Path:
    """The HTML report of a holdout: comparison, gains, calibration, products, rules, and
    the model card (``card``, else the card of the holdout's own model)."""
    inputs = report_inputs(holdout)
    adopted = data.adoptions["adopted_at"]
    before = adopted[adopted < dt.datetime.combine(holdout.cutoff, dt.time())]
    summary = {
        "holdout": holdout.describe_holdout(),
        "customers evaluated": f"{int(holdout.comparison['n_customers'].iloc[0]):,} "
        f"with an adoption, of {holdout.holdout_size:,} measured",
        "history": (
            f"{before.min():%Y-%m-%d} to {holdout.cutoff - dt.timedelta(days=1)}"
            if len(before)
            else f"none dated before {holdout.cutoff} (attributes only)"
        ),
        "holdout window": f"{holdout.cutoff} + {holdout.horizon_days} days",
        "adoptions in window": f"{len(holdout.actual):,}",
        "products": f"{len(holdout.model.products)}",
        "served model": "blend",
    }
    return write_report(
        path,
        title=title,
        summary=summary,
        comparison=holdout.comparison,
        products=inputs.products,
        calibration=inputs.calibration,
        gains=inputs.gains,
        rules=inputs.rules,
        rules_left_out=inputs.rules_left_out,
        importance=inputs.importance,
        card=card if card is not None else build_card(holdout.model, holdout, data),
    )


def active_on_holdout(
    engine: Engine,
    holdout: HoldoutResult,
    data: BankData | None,
    *,
    cache_dir: Path | None = None,
    score: Callable[[PropensityModel, dt.date], pd.DataFrame] | None = None,
) -> tuple[float | None, str]:
    """The active version's gate metric measured on ``holdout``, when that is fair.

    The gate metric is the holdout kind's (:data:`service.data.registry.GATE_METRICS`):
    MAP@3 on a temporal holdout, mean AUC over products on a random split of customers.
    Fair means the active version was trained only on data before the holdout window
    (its ``as_of`` is on or before the cutoff), so it has seen none of the adoptions it
    is scored on: in a random split the held-out customers' responses are in the
    window too, so a version trained past the cutoff (e.g. on the same campaign, with
    those customers) is never scored on them. Otherwise the recorded metrics are
    compared instead (by the gate, and only for the same kind of holdout), and the note
    says so. The active bundle is loaded through ``cache_dir`` (the local cache of
    :func:`service.data.registry.load_model`; a temporary folder without it).
    ``score(model, day)`` scores the bank with the active model (default: ``model.score``
    on ``data``; the Dask path scores its partitions on the cluster).
    """
    if score is None and data is None:
        raise ValueError("give the bank (data) or a score function")
    with unit_of_work(engine) as session:
        current = registry.active_version(session)
        if current is None:
            return None, "no active version"
        version, as_of = current.version, current.as_of
        session.expunge(current)
    if as_of > holdout.cutoff:
        return (
            None,
            f"active {version} was trained past the holdout cutoff, so it may have seen the "
            "measured adoptions; recorded metrics compared",
        )
    try:
        with read_only(engine).connect() as conn:
            active = registry.load_model(conn, current, cache_dir=cache_dir)
    except registry.RegistryError as exc:
        return None, f"active {version} could not be loaded ({exc}); recorded metrics compared"
    measured = holdout.ranked["blend"][["customer_id", "product_code"]]
    if score is not None:
        active_scores = score(active, holdout.cutoff)
    else:
        assert data is not None  # checked above
        active_scores = active.score(data, as_of=holdout.cutoff)
    scores = measured.merge(
        active_scores[["customer_id", "product_code", "propensity"]],
        on=["customer_id", "product_code"],
        how="left",
    )
    ranked = measured.assign(score=scores["propensity"].fillna(0.0).to_numpy())
    if holdout.holdout_kind == "random_customers":
        aucs = campaign_metrics(ranked, holdout.actual)["auc"].dropna()
        if aucs.empty:
            return None, f"active {version} has no AUC on the holdout; recorded metrics compared"
        return float(aucs.mean()), f"active {version} scored on the same held-out customers"
    table = compare(
        {"active": ranked, "candidate": holdout.ranked["blend"]}, holdout.actual, ks=(3,)
    )
    return float(table.loc["active", "MAP@3"]), f"active {version} scored on the same holdout"


def train_and_register(
    engine: Engine,
    *,
    artifacts_dir: Path,
    as_of: dt.date | None,
    horizon_days: int,
    tolerance: float,
    config: TrainConfig | None = None,
    truth_dir: Path | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> TrainOutcome:
    """Train on all history to ``as_of``, holdout-evaluate, save the bundle, register it.

    The promotion gate compares the candidate's holdout metric (MAP@3 on a temporal
    holdout, mean AUC on a random split of customers) with the active version's measured
    on the same holdout (see :func:`active_on_holdout`), else with its recorded one of
    the same kind of holdout; across kinds nothing is compared and the candidate is
    registered without activation (:func:`service.data.registry.gate`).
    """
    data = load_bank(engine)
    as_of = as_of or default_as_of(data)
    # The final model first: it is small once trained, while the holdout's scored pairs
    # (several frames of every candidate pair) are kept for the card, so training after
    # them would add its working memory to theirs.
    model = train(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=(lambda stage, f: progress(f"final: {stage}", f)) if progress else None,
    )
    holdout = evaluate(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        truth_dir=truth_dir,
        config=config,
        progress=progress,
    )
    metrics = holdout.summary_metrics()
    active_value, active_note = active_on_holdout(engine, holdout, data, cache_dir=artifacts_dir)
    if progress:
        progress("model card", 1.0)
    card = build_card(model, holdout, data)
    return register_model(
        engine,
        model,
        holdout,
        card,
        metrics=metrics,
        artifacts_dir=artifacts_dir,
        as_of=as_of,
        horizon_days=horizon_days,
        tolerance=tolerance,
        config=config,
        active_value=active_value,
        active_note=active_note,
    )


def register_model(
    engine: Engine,
    model: PropensityModel,
    holdout: HoldoutResult,
    card: dict[str, Any],
    *,
    metrics: dict[str, Any],
    artifacts_dir: Path,
    as_of: dt.date,
    horizon_days: int,
    tolerance: float,
    config: TrainConfig | None,
    active_value: float | None,
    active_note: str,
) -> TrainOutcome:
    """Save ``model``'s bundle and register it through the promotion gate: the one
    registration of both the single-machine and the Dask path."""
    with tempfile.TemporaryDirectory(prefix="nbo-bundle-") as tmp:
        bundle = Path(tmp) / "bundle"
        save_bundle(model, bundle, metrics=metrics)
        with unit_of_work(engine) as session:
            row, decision = registry.register(
                session,
                bundle=bundle,
                artifacts_dir=artifacts_dir,
                as_of=as_of,
                horizon_days=horizon_days,
                params={
                    "config": (config or TrainConfig()).to_dict(),
                    "holdout": {
                        "kind": holdout.holdout_kind,
                        "fraction": holdout.holdout_fraction,
                        "seed": holdout.holdout_seed,
                        "cutoff": holdout.cutoff.isoformat(),
                    },
                    "plan": model.window.get("plan"),
                    "card": card,
                },
                metrics=metrics,
                gate_metric=registry.GATE_METRICS[holdout.holdout_kind],
                tolerance=tolerance,
                active_value=active_value,
                active_note=active_note,
            )
    return TrainOutcome(row, decision.activated, decision.reason, holdout, card)
