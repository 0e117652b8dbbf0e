"""A campaign's response data through the command line, on SQLite and PostgreSQL: import
the snapshot, holdings and responders, train on the one cutoff, score customers imported
later; and a promotion gate that compares like with like."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine
from typer.testing import CliRunner

from service.cli.main import app
from service.data import db, registry
from service.data.db import unit_of_work
from tests.campaign_data import DAYS, SNAPSHOT, TARGET, make_campaign

runner = CliRunner()
AS_OF = SNAPSHOT + dt.timedelta(days=DAYS)
LATER = dt.date(2024, 5, 6)


def nbo(args: list[str], database_url: str, tmp_path: Path) -> tuple[int, str]:
    env = {"NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    result = runner.invoke(app, args, env=env)
    return result.exit_code, result.output


def versions(database_url: str) -> list[dict[str, Any]]:
    """The registry's versions, newest first, as `nbo models show` describes them."""
    engine = db.make_engine(database_url)
    try:
        with unit_of_work(engine) as session:
            return [registry.describe(row) for row in registry.list_versions(session)]
    finally:
        engine.dispose()


def test_campaign_sequence_trains_and_scores(database_url: str, tmp_path: Path) -> None:
    files = make_campaign(1_500).write(tmp_path / "files")
    new = make_campaign(200, seed=99, prefix="N", responders=False)
    new.customers.to_csv(tmp_path / "files" / "new_customers.csv", index=False)

    for kind, name in (
        ("products", "products"),
        ("customers", "customers"),
        ("adoptions", "holdings"),
        ("adoptions", "responders"),
    ):
        code, out = nbo(["import", kind, str(files[name])], database_url, tmp_path)
        assert code == 0, out
    train = ["train", "--as-of", AS_OF.isoformat(), "--horizon-days", str(DAYS)]
    code, out = nbo([*train, "--report", str(tmp_path / "campaign.html")], database_url, tmp_path)
    assert code == 0, out
    assert "Traceback" not in out and "active (no active version)" in out
    (first,) = versions(database_url)
    metrics = first["metrics"]
    assert metrics["holdout_kind"] == "random_customers"
    assert first["params"]["holdout"]["kind"] == "random_customers"
    assert metrics["holdout_cutoff"] == SNAPSHOT.isoformat()
    assert metrics["auc"] > 0.65 > metrics["popularity.auc"]
    assert metrics["blend.top20_hits"] > metrics["popularity.top20_hits"]
    report = (tmp_path / "campaign.html").read_text()
    assert "random customers" in report and "Model card" in report

    # The model card: kept with the version, shown by `nbo models show`.
    card = first["params"]["card"]
    assert card["holdout"]["kind"] == "random_customers"
    code, out = nbo(["models", "show", first["version"]], database_url, tmp_path)
    assert code == 0, out
    for heading in ("Data window", "Holdout", "Products", "By segment", "By age band"):
        assert heading in out, heading
    assert TARGET in out and "lightgbm" in out
    code, out = nbo(["models", "show", first["version"], "--json"], database_url, tmp_path)
    assert code == 0 and '"card"' in out

    # A retrain on the same campaign: the active version saw the held-out customers'
    # responses, so it is not scored on them; the recorded AUCs are compared.
    code, out = nbo(train, database_url, tmp_path)
    assert code == 0, out
    second = versions(database_url)[0]
    reason = second["metrics"]["gate"]["reason"]
    assert "holdout auc" in reason and "recorded metrics compared" in reason

    code, out = nbo(
        ["import", "customers", str(tmp_path / "files" / "new_customers.csv")],
        database_url,
        tmp_path,
    )
    assert code == 0, out
    out_file = tmp_path / "scores.csv"
    code, out = nbo(
        ["score", "--product", TARGET, "--as-of", LATER.isoformat(), "--out", str(out_file)],
        database_url,
        tmp_path,
    )
    assert code == 0, out
    scores = pd.read_csv(out_file)
    assert set(scores["product_code"]) == {TARGET}
    assert set(new.customers["customer_id"]) <= set(scores["customer_id"])
    fresh = scores[scores["customer_id"].str.startswith("N")]
    assert fresh["propensity"].between(0, 1).all() and fresh["propensity"].nunique() > 50


def test_nothing_to_learn_is_one_clear_error(database_url: str, tmp_path: Path) -> None:
    files = make_campaign(300).write(tmp_path / "files")
    for kind, name in (("products", "products"), ("customers", "customers")):
        assert nbo(["import", kind, str(files[name])], database_url, tmp_path)[0] == 0
    assert nbo(["import", "adoptions", str(files["responders"])], database_url, tmp_path)[0] == 0
    code, out = nbo(
        ["train", "--as-of", SNAPSHOT.isoformat(), "--horizon-days", str(DAYS)],
        database_url,
        tmp_path,
    )
    assert code != 0 and "Traceback" not in out
    assert "nothing to learn" in out and "import the responses" in out


def _bundle(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "bundles" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name}))
    return folder


def _register(
    engine: Engine, tmp_path: Path, name: str, metrics: dict[str, object]
) -> tuple[bool, str]:
    kind = registry.holdout_kind(metrics)
    with unit_of_work(engine) as session:
        _, decision = registry.register(
            session,
            bundle=_bundle(tmp_path, name),
            artifacts_dir=tmp_path / "models",
            as_of=AS_OF,
            horizon_days=DAYS,
            params={},
            metrics=metrics,
            gate_metric=registry.GATE_METRICS[kind],
            tolerance=0.0,
            version=name,
        )
        return decision.activated, decision.reason


def _status(engine: Engine) -> dict[str, str]:
    with unit_of_work(engine) as session:
        return {row.version: row.status for row in registry.list_versions(session)}


def test_the_gate_compares_like_with_like(engine: Engine, tmp_path: Path) -> None:
    random = {"holdout_kind": "random_customers", "map@3": 1.0}
    # A row from before holdout kinds were recorded is temporal.
    assert _register(engine, tmp_path, "t1", {"map@3": 0.3}) == (True, "no active version")
    activated, reason = _register(engine, tmp_path, "r1", {**random, "auc": 0.8})
    assert not activated
    assert "not compared" in reason and "nbo models promote r1" in reason
    assert _status(engine) == {"t1": "active", "r1": "candidate"}
    with unit_of_work(engine) as session:
        registry.activate(session, registry.get_version(session, "r1"))
    activated, reason = _register(engine, tmp_path, "r2", {**random, "auc": 0.7})
    assert not activated and "holdout auc 0.7000 vs active r1 0.8000" in reason
    activated, reason = _register(engine, tmp_path, "r3", {**random, "auc": 0.81})
    assert activated
    activated, reason = _register(engine, tmp_path, "t2", {"holdout_kind": "temporal", "map@3": 9})
    assert not activated and "not compared" in reason
    assert _status(engine) == {
        "t1": "retired",
        "r1": "retired",
        "r2": "rejected",
        "r3": "active",
        "t2": "candidate",
    }
