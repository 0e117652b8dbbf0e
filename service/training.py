"""Training job: read the bank from the database, evaluate on a holdout, train, register."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, text

from models.artifacts import save_bundle
from models.data import BankData
from models.evaluation import HoldoutResult, holdout_evaluation
from models.propensity import TrainConfig, train
from service import registry
from service.db import unit_of_work
from service.tables import ModelVersion


def _joined(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    items = json.loads(value) if isinstance(value, str) else value
    return "|".join(items or [])


def load_bank(engine: Engine) -> BankData:
    """The bank as the models library sees it, read in a few set-based queries."""
    with engine.connect() as conn:
        kinds = dict(conn.execute(text("SELECT name, kind FROM attribute_definitions")).all())
        products = pd.read_sql(
            text(
                "SELECT code AS product_code, name, category, value, business_weight, active, "
                "min_age, max_age, segments, requires, excludes FROM products ORDER BY code"
            ),
            conn,
        )
        for column in ("segments", "requires", "excludes"):
            products[column] = products[column].map(_joined)
        postgres = conn.dialect.name == "postgresql"
        attributes = [
            (
                f"attributes ->> '{name}'"
                if postgres
                else f"json_extract(attributes, '$.\"{name}\"')"
            )
            + f' AS "{name}"'
            for name in kinds
        ]
        customers = pd.read_sql(
            text(
                "SELECT external_id AS customer_id, segment, branch_id, joined_at, birth_date"
                + "".join(f", {a}" for a in attributes)
                + " FROM customers ORDER BY external_id"
            ),
            conn,
        )
        adoptions = pd.read_sql(
            text(
                "SELECT c.external_id AS customer_id, p.code AS product_code, a.adopted_at, "
                "a.closed_at FROM adoptions a JOIN customers c ON c.id = a.customer_id "
                "JOIN products p ON p.id = a.product_id"
            ),
            conn,
        )
    return BankData.from_frames(products, customers, adoptions, attribute_kinds=kinds)


@dataclass(frozen=True)
class TrainOutcome:
    version: ModelVersion
    activated: bool
    reason: str
    holdout: HoldoutResult


def train_and_register(
    engine: Engine,
    *,
    artifacts_dir: Path,
    as_of: dt.date | None,
    horizon_days: int,
    tolerance: float,
    config: TrainConfig | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> TrainOutcome:
    """Holdout-evaluate, train on all history to ``as_of``, save the bundle, register it."""
    data = load_bank(engine)
    if as_of is None:
        as_of = (data.adoptions["adopted_at"].max() + pd.Timedelta(days=1)).date()
    holdout = holdout_evaluation(
        data,
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=(lambda stage, f: progress(f"holdout: {stage}", f)) if progress else None,
    )
    metrics = holdout.summary_metrics()
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
                params={"config": repr(config or TrainConfig())},
                metrics=metrics,
                gate_metric="map@3",
                tolerance=tolerance,
            )
    return TrainOutcome(row, decision.activated, decision.reason, holdout)
