"""nbo train end to end through the database: holdout, bundle, registry, gate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from models.artifacts import save_bundle
from models.data import OUTCOME_COLUMNS, BankData
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service.cli.main import app
from service.data import registry
from service.data.bank import default_as_of, load_bank
from service.data.db import unit_of_work
from service.data.importing import import_adoptions, import_customers, import_products
from service.data.tables import Customer, Decision, Offer, OfferOutcome, Product
from service.decision.state import build_snapshot, read_customers
from service.settings import Settings
from service.training import (
    WITHOUT_OUTCOMES,
    evaluate,
    train_and_register,
)

DAYS_60 = pd.Timedelta(days=60)


def test_train_registers_an_active_version_that_beats_popularity(
    engine: Engine, tmp_path: Path
) -> None:
    bank = generate_bank(3_000, seed=3)
    files = write_bank(bank, tmp_path / "bank")
    import_products(engine, files["products"])
    import_customers(engine, files["customers"])
    import_adoptions(engine, files["adoptions"])

    data = load_bank(engine)
    assert len(data.customers) == 3_000
    assert len(data.adoptions) == len(bank.adoptions)
    assert set(data.attribute_kinds) >= {"income", "region"}

    outcome = train_and_register(
        engine, artifacts_dir=tmp_path / "models", as_of=None, horizon_days=90, tolerance=0.0
    )
    assert outcome.activated
    table = outcome.holdout.comparison
    assert table.loc["blend", "MAP@3"] > table.loc["popularity", "MAP@3"]
    with unit_of_work(engine) as session:
        active = registry.active_version(session)
        assert active is not None and active.version == outcome.version.version
        assert active.metrics["map@3"] == table.loc["blend", "MAP@3"]
        # Stored in the database (not a folder of this machine), cached locally.
        assert active.path == f"db:{active.version}"
        assert registry.stored_size(session, active.version)[0] >= 5
        assert (tmp_path / "models" / active.version / "manifest.json").exists()


TINY = TrainConfig(n_cutoffs=2, max_rounds=30, rules=False, num_threads=1)


def record_outcomes(engine: Engine, outcomes: pd.DataFrame) -> None:
    """Store outcomes as the service does: each answers an offer of a decision."""
    with unit_of_work(engine) as session:
        customers = dict(session.execute(select(Customer.external_id, Customer.id)).all())
        products = dict(session.execute(select(Product.code, Product.id)).all())
        for i, row in enumerate(outcomes.itertuples(index=False)):
            at = dt.datetime.combine(row.occurred_at.date(), dt.time(10), tzinfo=dt.UTC)
            session.add(
                Decision(
                    id=f"d{i}",
                    customer_id=customers[row.customer_id],
                    customer_external_id=row.customer_id,
                    channel="branch",
                    created_at=at,
                )
            )
            session.add(
                Offer(
                    id=f"o{i}",
                    decision_id=f"d{i}",
                    customer_id=customers[row.customer_id],
                    product_id=products[row.product_code],
                    rank=1,
                    propensity=0.1,
                    expected_value=1.0,
                    score=1.0,
                    created_at=at,
                )
            )
            session.flush()
            session.add(OfferOutcome(offer_id=f"o{i}", outcome=row.outcome, created_at=at))


def test_recorded_outcomes_reach_training_and_serving(engine: Engine, tmp_path: Path) -> None:
    bank = generate_bank(1_500, seed=4, offers_per_month=0.3)
    assert bank.outcomes is not None
    files = write_bank(bank, tmp_path / "bank")
    import_products(engine, files["products"])
    import_customers(engine, files["customers"])
    import_adoptions(engine, files["adoptions"])
    assert load_bank(engine).outcomes is None  # nothing recorded: no outcome features

    recent = bank.outcomes[bank.outcomes["occurred_at"] >= pd.Timestamp(bank.end) - DAYS_60]
    record_outcomes(engine, recent)
    data = load_bank(engine)
    assert data.outcomes is not None and tuple(data.outcomes.columns) == OUTCOME_COLUMNS
    got = data.outcomes.sort_values(list(OUTCOME_COLUMNS)).reset_index(drop=True)
    want = recent.assign(occurred_at=recent["occurred_at"] + pd.Timedelta(hours=10))
    want = want.sort_values(list(OUTCOME_COLUMNS)).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)

    # A model trained on them is served the same features one customer at a time.
    model = train(data, as_of=default_as_of(data), config=TINY)
    assert model.spec.outcome_kinds == ("declined",)
    save_bundle(model, tmp_path / "bundle", metrics={"map@3": 0.3})
    with unit_of_work(engine) as session:
        registry.register(
            session,
            bundle=tmp_path / "bundle",
            artifacts_dir=tmp_path / "models",
            as_of=default_as_of(data),
            horizon_days=90,
            params={},
            metrics={"map@3": 0.3},
            gate_metric="map@3",
            tolerance=0.0,
        )
    snapshot = build_snapshot(engine, Settings(database_url=str(engine.url), data_dir=tmp_path))
    declined = recent[recent["outcome"] == "declined"]["customer_id"].drop_duplicates()
    fresh = read_customers(engine, snapshot, declined.tolist())
    column = model.spec.columns.index(f"declined_recently_{recent['product_code'].iloc[0]}")
    for customer in declined:
        entry, batch = fresh[customer], snapshot.customers[customer]
        assert sorted(entry.state.outcomes) == sorted(batch.state.outcomes)
        # The serving store keeps propensities as float32: the same value, so rounded.
        np.testing.assert_array_equal(entry.propensity.astype(np.float32), batch.propensity)
    first = fresh[str(recent["customer_id"].iloc[0])]
    assert model.builder.for_customer(first.state, as_of=default_as_of(data))[column] >= 1


def test_evaluate_shows_what_outcome_features_add() -> None:
    bank = generate_bank(2_000, seed=6, offers_per_month=0.3)
    data = BankData.from_frames(
        bank.products, bank.customers, bank.adoptions, outcomes=bank.outcomes
    )
    holdout = evaluate(data, as_of=None, horizon_days=90, config=TINY, outcome_comparison=True)
    table = holdout.comparison
    assert list(table.index[-2:]) == ["blend", WITHOUT_OUTCOMES]
    assert table.loc[WITHOUT_OUTCOMES, "n_customers"] == table.loc["blend", "n_customers"]
    assert holdout.model.spec.outcome_kinds == ("declined",)
    assert f"{WITHOUT_OUTCOMES}.map@3" in holdout.summary_metrics()

    plain = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    alone = evaluate(plain, as_of=None, horizon_days=90, config=TINY, outcome_comparison=True)
    assert WITHOUT_OUTCOMES not in alone.comparison.index


def test_nbo_evaluate_reads_a_bank_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--bank`` evaluates a folder with its outcomes and oracle; ``--forced-sales``
    reaches the training settings (the holdout itself is stubbed: it is tested above)."""
    bank = generate_bank(300, seed=2, offers_per_month=0.2)
    write_bank(bank, tmp_path / "bank")
    seen: dict[str, Any] = {}

    def fake(data: BankData, **kwargs: Any) -> Any:
        seen.update(kwargs, data=data)
        raise SystemExit(0)

    monkeypatch.setattr("service.training.evaluate", fake)
    result = CliRunner().invoke(
        app, ["evaluate", "--bank", str(tmp_path / "bank"), "--forced-sales", "drop"]
    )
    assert result.exit_code == 0, result.output
    assert seen["data"].outcomes is not None and len(seen["data"].outcomes) > 0
    assert seen["config"].forced_sales == "drop" and seen["outcome_comparison"]
    assert seen["truth_dir"] == tmp_path / "bank"
    wrong = CliRunner().invoke(app, ["evaluate", "--bank", ".", "--forced-sales", "maybe"])
    assert wrong.exit_code == 2 and "keep or drop" in wrong.output
