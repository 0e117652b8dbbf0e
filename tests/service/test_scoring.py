"""nbo evaluate, train's gate on a shared holdout, nbo score and nbo rules, end to end."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, create_engine, text
from typer.testing import CliRunner

from models.synthetic import generate_bank, write_bank
from service.cli.main import app
from service.data import registry
from service.data.bank import load_bank
from service.data.db import unit_of_work
from service.scoring import ScoringError, load_version, rank_offers

runner = CliRunner()


def nbo(args: list[str], database_url: str, data_dir: Path) -> str:
    result = runner.invoke(
        app,
        args,
        env={"NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(data_dir)},
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bank")
    write_bank(generate_bank(2_000, seed=11), folder)
    return folder


def test_train_gate_score_and_rules_through_the_cli(
    database_url: str, tmp_path: Path, bank_dir: Path
) -> None:
    nbo(["import", "bank", str(bank_dir)], database_url, tmp_path)

    # An older version first, trained on history up to mid-2025 ...
    out = nbo(["train", "--as-of", "2025-06-01"], database_url, tmp_path)
    assert "active (no active version)" in out
    # ... then a retrain on all history: the gate scores the active version on the new
    # holdout (it never saw those adoptions) instead of trusting its recorded metric.
    out = nbo(["train", "--truth", str(bank_dir)], database_url, tmp_path)
    assert "oracle" in out
    assert "scored on the same holdout" in out
    engine = create_engine(database_url)
    with unit_of_work(engine) as session:
        versions = registry.list_versions(session)
        assert len(versions) == 2
        newest = max(versions, key=lambda v: v.created_at)
        assert "oracle.map@3" in newest.metrics
        gate = newest.metrics["gate"]
        assert "scored on the same holdout" in gate["reason"]

    # Ranked offers for every customer, best first (by score, as the decision API ranks),
    # never a held product.
    offers = tmp_path / "offers.csv"
    nbo(["score", "--out", str(offers), "--top-k", "3"], database_url, tmp_path)
    table = pd.read_csv(offers)
    assert list(table.columns[:4]) == ["customer_id", "product_code", "rank", "propensity"]
    assert table["customer_id"].nunique() == 2_000
    assert table.groupby("customer_id")["rank"].max().max() == 3
    assert (table.groupby("customer_id")["score"].diff().dropna() <= 0).all()
    data = load_bank(engine)
    held = data.adoptions.loc[data.adoptions["closed_at"].isna(), ["customer_id", "product_code"]]
    clash = table.merge(held, on=["customer_id", "product_code"])
    assert clash.empty, clash.head()

    # A campaign list for one product, and a customer imported after training.
    (tmp_path / "late.csv").write_text(
        "customer_id,joined_at,birth_date,segment,branch_id,income,region\n"
        "LATE1,2025-12-01,1990-05-05,mass,B01,52000,north\n"
    )
    (tmp_path / "late_adoptions.csv").write_text(
        "customer_id,product_code,adopted_at\nLATE1,current_account,2025-12-01\n"
    )
    nbo(["import", "customers", str(tmp_path / "late.csv")], database_url, tmp_path)
    nbo(["import", "adoptions", str(tmp_path / "late_adoptions.csv")], database_url, tmp_path)
    campaign = tmp_path / "cards.parquet"
    nbo(["score", "--out", str(campaign), "--product", "credit_card"], database_url, tmp_path)
    cards = pd.read_parquet(campaign)
    assert set(cards["product_code"]) == {"credit_card"}
    assert list(cards["rank"]) == list(range(1, len(cards) + 1))
    assert cards["propensity"].is_monotonic_decreasing
    assert "LATE1" in set(cards["customer_id"])
    late = tmp_path / "late_offers.csv"
    nbo(["score", "--out", str(late)], database_url, tmp_path)
    late_offers = pd.read_csv(late)
    late_offers = late_offers.loc[late_offers["customer_id"] == "LATE1"]
    assert not late_offers.empty and "current_account" not in set(late_offers["product_code"])

    # Rules of the active version, filtered, and as CSV.
    rules_csv = tmp_path / "rules.csv"
    out = nbo(
        ["rules", "--consequent", "home_insurance", "--min-lift", "1.5", "--csv", str(rules_csv)],
        database_url,
        tmp_path,
    )
    rules = pd.read_csv(rules_csv)
    assert not rules.empty
    assert set(rules["consequent"]) == {"home_insurance"} and (rules["lift"] >= 1.5).all()
    assert rules["confidence"].is_monotonic_decreasing
    assert f"{len(rules)} rules of model version" in out
    engine.dispose()


def test_evaluate_writes_a_report_with_the_oracle(tmp_path: Path, bank_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nbo.sqlite3'}"
    nbo(["db", "upgrade"], url, tmp_path)
    nbo(["import", "bank", str(bank_dir)], url, tmp_path)
    report = tmp_path / "out" / "evaluation.html"
    out = nbo(
        ["evaluate", "--report", str(report), "--truth", str(bank_dir), "--as-of", "2025-10-01"],
        url,
        tmp_path,
    )
    for model in ("popularity", "rules", "lightgbm", "blend", "oracle"):
        assert model in out
    assert "trained on data before 2025-07-03" in out
    page = report.read_text()
    for section in ("comparison", "gains", "calibration", "products", "rules", "importance"):
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") >= 3


def test_scoring_errors_are_clear(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ScoringError, match="no active model version"):
        load_version(engine, None)
    with pytest.raises(ScoringError, match="unknown model version|no model version"):
        load_version(engine, "nope")


def test_a_changed_bundle_is_refused(engine: Engine, tmp_path: Path, bank_dir: Path) -> None:
    from service.data.importing import import_adoptions, import_customers, import_products
    from service.training import train_and_register

    import_products(engine, bank_dir / "products.csv")
    import_customers(engine, bank_dir / "customers.csv")
    import_adoptions(engine, bank_dir / "adoptions.csv")
    outcome = train_and_register(
        engine,
        artifacts_dir=tmp_path / "models",
        as_of=dt.date(2025, 3, 1),
        horizon_days=90,
        tolerance=0.0,
    )
    version, model = load_version(engine, None)
    assert version == outcome.version.version
    # Save -> register -> load gives the same scores as the model trained in memory.
    data = load_bank(engine)
    again = outcome.holdout.model  # a different model (holdout cutoff): only shapes match
    assert again.product_codes == model.product_codes
    scores = model.score(data, as_of="2025-03-01")
    with engine.connect() as conn:
        reloaded = registry.load_model(conn, outcome.version).score(data, as_of="2025-03-01")
    pd.testing.assert_frame_equal(scores, reloaded)
    # The stored manifest (and its recorded sha256) changed: the registered checksum refuses it.
    with engine.begin() as conn:
        manifest = conn.execute(
            text("SELECT content FROM model_files WHERE version = :v AND name = 'manifest.json'"),
            {"v": outcome.version.version},
        ).scalar_one()
        changed = bytes(manifest).replace(b'"horizon_days": 90', b'"horizon_days": 91')
        conn.execute(
            text(
                "UPDATE model_files SET content = :c, sha256 = :s "
                "WHERE version = :v AND name = 'manifest.json'"
            ),
            {"c": changed, "s": hashlib.sha256(changed).hexdigest(), "v": outcome.version.version},
        )
    with pytest.raises(ScoringError, match="stored manifest.json .* the bundle was changed"):
        load_version(engine, None)


def test_rank_offers_orders_ties_deterministically() -> None:
    scores = pd.DataFrame(
        {
            "customer_id": ["b", "a", "a", "b"],
            "product_code": ["x", "y", "x", "y"],
            "propensity": [0.2, 0.5, 0.5, 0.9],
            "lgbm": 0.0,
            "rules": 0.0,
        }
    )
    ranked = rank_offers(scores, rank_by="propensity")
    assert ranked[["customer_id", "product_code", "rank"]].values.tolist() == [
        ["a", "x", 1],
        ["a", "y", 2],
        ["b", "y", 1],
        ["b", "x", 2],
    ]
    campaign = rank_offers(scores, product="x", rank_by="propensity")
    assert campaign["customer_id"].tolist() == ["a", "b"]
    assert rank_offers(scores, top_k=1, rank_by="propensity")["rank"].max() == 1
    # By score (propensity x value x business weight), as the decision API ranks: the
    # values reverse both customers' orders. A product's ties go by propensity.
    valued = scores.assign(score=[0.9, 0.5, 0.1, 0.3])
    ranked = rank_offers(valued)
    assert ranked[["customer_id", "product_code", "rank"]].values.tolist() == [
        ["a", "y", 1],
        ["a", "x", 2],
        ["b", "x", 1],
        ["b", "y", 2],
    ]
    tied = rank_offers(valued.assign(score=0.0), product="y")
    assert tied["customer_id"].tolist() == ["b", "a"]
