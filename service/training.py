"""Training job: read the bank from the database, evaluate on a holdout, train, register."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine

from models.artifacts import BundleError, load_bundle, save_bundle
from models.data import BankData
from models.evaluation import HoldoutResult, holdout_evaluation, report_inputs, truth_reference
from models.evaluation_report import write_report
from models.metrics import compare
from models.propensity import TrainConfig
from models.propensity.training import train
from service.data import registry
from service.data.bank import default_as_of, load_bank
from service.data.db import unit_of_work
from service.data.tables import ModelVersion


@dataclass(frozen=True)
class TrainOutcome:
    version: ModelVersion
    activated: bool
    reason: str
    holdout: HoldoutResult


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
    """The temporal holdout of ``data`` ending at ``as_of``, with the oracle row when the
    bank is synthetic and ``truth_dir`` (the generated bank folder) is given.

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
    )
    ranked = dict(holdout.ranked)
    ranked[WITHOUT_OUTCOMES] = plain.ranked["blend"]
    comparison = compare(ranked, holdout.actual, ks=(1, 3, 5))
    return replace(holdout, ranked=ranked, comparison=comparison)


def write_evaluation_report(
    holdout: HoldoutResult, path: Path, *, data: BankData, title: str = "nbo evaluation"
) -> Path:
    """The HTML report of a holdout: comparison, gains, calibration, products, rules."""
    inputs = report_inputs(holdout)
    adopted = data.adoptions["adopted_at"]
    summary = {
        "customers evaluated": f"{int(holdout.comparison['n_customers'].iloc[0]):,}",
        "history": f"{adopted.min():%Y-%m-%d} to {holdout.cutoff - dt.timedelta(days=1)}",
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
        importance=inputs.importance,
    )


def active_on_holdout(
    engine: Engine, holdout: HoldoutResult, data: BankData
) -> tuple[float | None, str]:
    """The active version's MAP@3 measured on ``holdout``, when that is fair.

    Fair means the active version was trained only on data before the holdout window
    (its ``as_of`` is on or before the cutoff), so it has not seen the adoptions it is
    scored on. Otherwise (a retrain on the same history) the recorded metrics are
    compared instead, and the note says so.
    """
    with unit_of_work(engine) as session:
        current = registry.active_version(session)
        if current is None:
            return None, "no active version"
        path, version, as_of = Path(current.path), current.version, current.as_of
    if as_of > holdout.cutoff:
        return (
            None,
            f"active {version} was trained past the holdout cutoff; recorded metrics compared",
        )
    try:
        active = load_bundle(path)
    except BundleError as exc:
        return None, f"active {version} could not be loaded ({exc}); recorded metrics compared"
    scores = active.score(data, as_of=holdout.cutoff)
    table = compare(
        {
            "active": scores[["customer_id", "product_code"]].assign(score=scores["propensity"]),
            "candidate": holdout.ranked["blend"],
        },
        holdout.actual,
        ks=(3,),
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
    """Holdout-evaluate, train on all history to ``as_of``, save the bundle, register it.

    The promotion gate compares the candidate's holdout MAP@3 with the active version's
    measured on the same holdout (see :func:`active_on_holdout`).
    """
    data = load_bank(engine)
    as_of = as_of or default_as_of(data)
    holdout = evaluate(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        truth_dir=truth_dir,
        config=config,
        progress=progress,
    )
    metrics = holdout.summary_metrics()
    active_value, active_note = active_on_holdout(engine, holdout, data)
    model = train(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=(lambda stage, f: progress(f"final: {stage}", f)) if progress else None,
    )
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
                params={"config": (config or TrainConfig()).to_dict()},
                metrics=metrics,
                gate_metric="map@3",
                tolerance=tolerance,
                active_value=active_value,
                active_note=active_note,
            )
    return TrainOutcome(row, decision.activated, decision.reason, holdout)
