"""nbo simulate: the closed loop recovers the uplift the generator planted.

Each simulation is small (about a thousand customers, ten days, a tiny model) but runs
the whole loop: decisions, outcomes, feedback and adoptions through the API on a
simulated clock, a live model swap, and the reports. Seeds make every run the same.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from models.propensity import TrainConfig
from models.synthetic import OfferResponse
from service.cli.main import app
from service.simulation.report import html_report, write_report
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


def test_each_day_adds_up_to_the_final_reports(strong: SimulationResult) -> None:
    """The day-by-day record is the loop's own count; the final reports read the database.
    They must agree, and the last evening's reading of the experiment is the final one."""
    days = strong.daily
    assert [d.day for d in days] == strong.config.period.days
    conversion, nps = strong.conversion.total, strong.nps.total
    assert sum(d.decisions for d in days) == strong.visits
    assert sum(d.decisions_with_offers for d in days) == strong.decisions_with_offers
    assert sum(d.offers for d in days) == conversion.offers
    assert sum(d.accepted for d in days) == conversion.accepted
    assert sum(d.declined for d in days) == conversion.declined
    assert sum(d.not_now for d in days) == conversion.not_now
    assert sum(d.promoters for d in days) == nps.promoters
    assert sum(d.detractors for d in days) == nps.detractors
    assert sum(d.nps_responses for d in days) == nps.responses
    ((control,),) = sql(strong, "SELECT count(*) FROM decisions WHERE control")
    assert strong.control_decisions == control > 0
    assert days[-1].uplift == strong.uplift.total
    assert days[-1].true_uplift == strong.true_uplift.total
    # Read as of each evening: the experiment only grows, and so far is never final.
    treated = [d.uplift.treated_customers for d in days]
    assert treated == sorted(treated) and 0 < treated[0] < treated[-1]
    assert days[0].uplift.treated_adopters <= days[-1].uplift.treated_adopters


def test_reports_in_each_format(strong: SimulationResult, tmp_path: Path) -> None:
    page = tmp_path / "sim.html"
    assert write_report(strong, page) is False
    document = page.read_text()
    assert document.startswith("<!DOCTYPE html>") and "</html>" in document
    assert "http://" not in document and "https://" not in document  # self-contained
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', document)
    assert len(images) == 3  # conversion, NPS, uplift
    for encoded in images:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            assert image.width > 600 and image.height > 200
    for anchor in ("summary", "conversion", "nps", "uplift", "products", "versions"):
        assert f'<section id="{anchor}">' in document
    assert f"<td>{strong.config.customers:,}</td>" in document
    assert f"{strong.conversion.total.offers:,}</td>" in document

    notes = tmp_path / "sim.md"
    assert write_report(strong, notes) is False
    assert write_report(strong, notes) is True  # replaced, and the caller is told
    assert not list(tmp_path.glob(".*partial"))
    text = notes.read_text()
    assert text.startswith("# nbo simulation") and "<" not in text
    assert sum(line.startswith("| 2026-") for line in text.splitlines()) == strong.config.days

    figures = tmp_path / "sim.json"
    write_report(strong, figures)
    data = json.loads(figures.read_text())
    assert len(data["daily"]) == strong.config.days
    assert data["daily"][-1]["uplift"] == strong.uplift.total.difference
    assert sum(day["offers"] for day in data["daily"]) == data["conversion"]["offers"]

    with pytest.raises(ValueError, match=r"\.html or \.htm .*, \.md .* or \.json"):
        write_report(strong, tmp_path / "sim.txt")
    assert not (tmp_path / "sim.txt").exists()


def test_a_report_without_nps_says_so(strong: SimulationResult) -> None:
    silent = dataclasses.replace(
        strong,
        nps=dataclasses.replace(
            strong.nps, total=dataclasses.replace(strong.nps.total, responses=0, nps=None)
        ),
    )
    document = html_report(silent)
    assert "No NPS answers were simulated." in document
    assert document.count("<img ") == 2


def test_report_problems_are_refused_before_the_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (tmp_path / "reports.html").mkdir()
    for report, message in [
        (tmp_path / "sim.txt", "'sim.txt' ends in '.txt'"),
        (tmp_path / "sim", "'sim' has no suffix"),
        (tmp_path / "reports.html", "is a folder"),
    ]:
        outcome = CliRunner().invoke(
            app, ["simulate", "--work", str(work), "--report", str(report)]
        )
        said = " ".join(outcome.output.split())
        assert outcome.exit_code == 2 and message in said, said
        assert "Traceback" not in said
    bad_start = CliRunner().invoke(app, ["simulate", "--start", "2026-13-01"])
    assert bad_start.exit_code == 2 and "YYYY-MM-DD" in bad_start.output
    assert not work.exists()  # nothing ran


def test_a_used_work_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nbo.sqlite3").write_text("")
    outcome = CliRunner().invoke(app, ["simulate", "--days", "1", "--work", str(tmp_path)])
    assert outcome.exit_code == 2 and "not empty" in " ".join(outcome.output.split())
