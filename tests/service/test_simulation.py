"""nbo simulate: the closed loop recovers the uplift the generator planted.

Each simulation is small (about a thousand customers, ten days, a tiny model) but runs
the whole loop: decisions, outcomes, feedback and adoptions through the API on a
simulated clock, a live model swap, and the reports. Seeds make every run the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from models.propensity import TrainConfig
from models.synthetic import OfferResponse
from service.cli.main import app
from service.simulation.run import SimulationConfig, SimulationResult, run_simulation

TINY_MODEL = TrainConfig(n_cutoffs=2, max_rounds=30, rules=False, num_threads=1)


def small(**overrides: object) -> SimulationConfig:
    settings: dict[str, object] = {
        "customers": 1_200,
        "days": 10,
        "seed": 3,
        "visits_per_month": 1.2,
        "max_offers": 2,
        "control_share": 0.3,
        "retrain_every_days": 0,
        "train_config": TINY_MODEL,
        **overrides,
    }
    return SimulationConfig(**settings)  # type: ignore[arg-type]


def sql(result: SimulationResult, query: str) -> list[tuple[object, ...]]:
    engine = create_engine(f"sqlite:///{result.work_dir / 'nbo.sqlite3'}")
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query)).all()]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    """Offers that customers accept far more often than they would adopt on their own,
    and a retraining half way that the gate always promotes (tolerance 100%)."""
    config = small(
        offer_response=OfferResponse(acceptance_multiplier=8.0),
        retrain_every_days=5,
        promotion_tolerance=1.0,
    )
    return run_simulation(config, tmp_path_factory.mktemp("strong"))


def test_strong_planted_uplift_is_significant_and_recovered(strong: SimulationResult) -> None:
    measured, truth = strong.uplift.total, strong.true_difference()
    assert truth is not None and truth > 0.05
    assert measured.ci_low is not None and measured.ci_low > 0, measured.verdict
    assert strong.recovered(), (measured.ci_low, truth, measured.ci_high)
    assert measured.treated_customers > 2 * measured.control_customers > 100


def test_everything_flowed_through_the_api(strong: SimulationResult) -> None:
    conversion = strong.conversion.total
    assert conversion.presented == conversion.offers > 0
    assert conversion.accepted == strong.adoptions_offer > 0
    assert conversion.accepted + conversion.declined + conversion.not_now == conversion.offers
    ((offer_adoptions,),) = sql(strong, "SELECT count(*) FROM adoptions WHERE source = 'offer'")
    ((pushed,),) = sql(strong, "SELECT count(*) FROM adoptions WHERE source = 'api'")
    assert (offer_adoptions, pushed) == (strong.adoptions_offer, strong.adoptions_organic)
    assert strong.nps.total.responses > 0 and strong.nps.total.nps is not None
    ((control,),) = sql(
        strong,
        "SELECT count(*) FROM offers o JOIN decisions d ON d.id = o.decision_id WHERE d.control",
    )
    assert control == 0


def test_the_weekly_model_is_swapped_in_live(strong: SimulationResult) -> None:
    assert [r.activated for r in strong.retrainings] == [True, True]
    versions = sql(
        strong,
        "SELECT model_version, min(created_at), max(created_at) FROM decisions "
        "GROUP BY model_version ORDER BY min(created_at)",
    )
    assert [v for v, _, _ in versions] == [r.version for r in strong.retrainings]
    assert str(versions[1][1]) >= "2026-01-06"  # retrained after the fifth day
    # The retrained model learnt from the recorded outcomes.
    spec_path = Path(strong.work_dir) / "models" / str(versions[1][0]) / "feature_spec.json"
    assert json.loads(spec_path.read_text())["outcome_kinds"] == ["declined"]


def test_offers_without_effect_show_no_uplift(tmp_path: Path) -> None:
    """Nobody accepts and declines change nothing: the truth is exactly zero and the
    interval must hold it (a biased measurement would fail here)."""
    inert = OfferResponse(acceptance_multiplier=0.0, decline_multiplier=1.0)
    result = run_simulation(small(offer_response=inert, seed=5), tmp_path)
    assert result.adoptions_offer == 0 and result.conversion.total.accepted == 0
    assert result.true_difference() == 0.0
    measured = result.uplift.total
    assert measured.ci_low is not None and measured.ci_low < 0 < measured.ci_high  # type: ignore[operator]
    assert result.recovered()


def test_cli_runs_a_tiny_simulation(tmp_path: Path) -> None:
    report = tmp_path / "simulation.json"
    outcome = CliRunner().invoke(
        app,
        [
            "simulate",
            "--days", "2",
            "--customers", "300",
            "--visits-per-month", "3",
            "--retrain-every", "0",
            "--work", str(tmp_path / "work"),
            "--report", str(report),
        ],
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert "uplift" in outcome.output and "NPS" in outcome.output
    figures = json.loads(report.read_text())
    assert figures["visits"] > 0 and figures["config"]["days"] == 2
    assert set(figures) >= {"conversion", "uplift", "true_uplift", "nps", "retrainings"}
    assert (tmp_path / "work" / "nbo.sqlite3").exists()
    again = CliRunner().invoke(app, ["simulate", "--days", "1", "--work", str(tmp_path / "work")])
    assert again.exit_code == 2 and "not empty" in " ".join(again.output.split())
