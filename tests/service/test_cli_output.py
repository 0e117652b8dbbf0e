"""What ``nbo`` prints and writes: tables that fit 80 columns without cutting an id,
``nbo score`` ranking offers as the decision API does, and evaluation reports that warn
when the holdout is too small and never replace a file silently."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from service.cli.models import MIN_HOLDOUT_CUSTOMERS, MIN_PRODUCT_ADOPTERS, holdout_warnings
from service.data.db import make_engine
from service.decision.state import build_snapshot
from service.settings import Settings
from tests.service.cli_bank import FAST, VERSIONS, CliBank, make_cli_bank, run


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> CliBank:
    return make_cli_bank(tmp_path_factory.mktemp("cli-output"), sqlite_template)


def nbo(args: list[str], bank: CliBank, *, columns: int = 200) -> str:
    code, output = run(args, bank.url, bank.data_dir, columns=columns)
    assert code == 0, output
    return output


# ---------------------------------------------------------------- tables at 80 columns


def test_models_list_shows_whole_version_ids_at_80_columns(bank: CliBank) -> None:
    output = nbo(["models", "list"], bank, columns=80)
    assert max(len(line) for line in output.splitlines()) <= 80
    for version in VERSIONS:
        assert re.search(rf"(^|\s){re.escape(version)}\s", output, re.MULTILINE), output
    assert "active" in output and "retired" in output


def test_rules_show_whole_product_codes_at_80_columns(bank: CliBank, tmp_path: Path) -> None:
    rules_csv = tmp_path / "rules.csv"
    output = nbo(["rules", "--all", "--top", "25", "--csv", str(rules_csv)], bank, columns=80)
    assert max(len(line) for line in output.splitlines()) <= 80
    shown = pd.read_csv(rules_csv).head(25)
    assert len(shown) >= 10
    words = set(re.findall(r"[\w.-]+", output))
    codes = set(shown["consequent"]) | {
        code for antecedent in shown["antecedent"] for code in re.split(r", | -> ", antecedent)
    }
    assert max(len(code) for code in codes) >= 14  # long enough to be cut if it could be
    assert codes <= words, codes - words


def test_rules_come_in_the_order_reasons_are_chosen_and_say_what_is_left_out(
    bank: CliBank, tmp_path: Path
) -> None:
    every, said = tmp_path / "every.csv", tmp_path / "said.csv"
    everything = nbo(["rules", "--all", "--csv", str(every)], bank, columns=120)
    output = nbo(["rules", "--csv", str(said)], bank, columns=120)
    every_rule, said_rules = pd.read_csv(every), pd.read_csv(said)
    assert "left out" not in everything
    worth = every_rule[(every_rule["lift"] > 1) & (every_rule["n_customers"] >= 30)]
    assert len(said_rules) == len(worth) < len(every_rule)
    assert f"{len(every_rule) - len(worth):,} rules left out" in output
    for frame in (every_rule, said_rules):
        lifts = frame["lift"].to_list()
        assert lifts == sorted(lifts, reverse=True)


# ---------------------------------------------------------------- score ranks as the API


def test_score_ranks_each_customer_as_the_decision_engine_does(
    bank: CliBank, tmp_path: Path
) -> None:
    out = tmp_path / "offers.csv"
    nbo(["score", "--out", str(out)], bank)
    scored = pd.read_csv(out)
    assert list(scored.columns[:6]) == [
        "customer_id",
        "product_code",
        "rank",
        "propensity",
        "expected_value",
        "score",
    ]
    settings = Settings(database_url=bank.url, data_dir=bank.data_dir)
    engine = make_engine(bank.url)
    try:
        snapshot = build_snapshot(engine, settings)
    finally:
        engine.dispose()
    now = dt.datetime.combine(snapshot.as_of, dt.time(12), tzinfo=dt.UTC)
    by_customer = dict(iter(scored.groupby("customer_id", sort=False)))
    compared = differs_from_propensity = 0
    for customer_id, entry in list(snapshot.customers.items())[:300]:
        ranking = snapshot.arbiter.rank(entry.propensity, history=None, now=now, limit=5)
        if not ranking.offers:
            continue
        rows = by_customer[customer_id].sort_values("rank")
        offered = rows.loc[rows["propensity"] >= settings.min_propensity]
        head = offered.head(len(ranking.offers))
        assert list(head["product_code"]) == [c.product_code for c in ranking.offers], customer_id
        # Serving keeps propensities as float32 (7 significant digits): relative too.
        assert list(head["score"]) == pytest.approx(
            [c.score for c in ranking.offers], rel=2e-7, abs=1e-6
        )
        assert list(head["expected_value"]) == pytest.approx(
            [c.expected_value for c in ranking.offers], rel=2e-7, abs=1e-6
        )
        by_propensity = offered.sort_values("propensity", ascending=False, kind="stable")
        differs_from_propensity += list(by_propensity["product_code"]) != list(
            offered["product_code"]
        )
        compared += 1
    assert compared >= 100
    # Values and weights change the order for many customers: the test can tell.
    assert differs_from_propensity >= 20


def test_score_can_rank_by_propensity(bank: CliBank, tmp_path: Path) -> None:
    out = tmp_path / "by-propensity.csv"
    output = nbo(["score", "--out", str(out), "--rank-by", "propensity", "--top-k", "3"], bank)
    assert "propensity" in output
    scored = pd.read_csv(out)
    assert scored.groupby("customer_id")["rank"].max().max() == 3
    assert (scored.groupby("customer_id")["propensity"].diff().dropna() <= 0).all()
    again = nbo(["score", "--out", str(out), "--rank-by", "propensity", "--top-k", "3"], bank)
    assert "replaced the earlier file" in again


# ---------------------------------------------------------------- holdout size, reports


def _holdout(adopters: dict[str, int], products: list[str]) -> Any:
    rows = [(f"{code}-{i}", code) for code, n in adopters.items() for i in range(n)]
    actual = pd.DataFrame(rows, columns=["customer_id", "product_code"])
    return SimpleNamespace(
        cutoff=dt.date(2025, 10, 3),
        horizon_days=90,
        comparison=pd.DataFrame({"n_customers": [actual["customer_id"].nunique()]}),
        actual=actual,
        model=SimpleNamespace(product_codes=products),
    )


def test_a_small_holdout_is_called_noise() -> None:
    few = _holdout({"card": MIN_HOLDOUT_CUSTOMERS - 1}, ["card"])
    (warning,) = holdout_warnings(few)
    assert f"only {MIN_HOLDOUT_CUSTOMERS - 1} customers" in warning and "noise" in warning
    enough = _holdout(
        {"card": MIN_HOLDOUT_CUSTOMERS, "loan": MIN_PRODUCT_ADOPTERS}, ["card", "loan"]
    )
    assert holdout_warnings(enough) == []
    thin = _holdout(
        {"card": MIN_HOLDOUT_CUSTOMERS, "loan": MIN_PRODUCT_ADOPTERS - 1}, ["card", "loan", "fund"]
    )
    (warning,) = holdout_warnings(thin)
    assert f"loan ({MIN_PRODUCT_ADOPTERS - 1})" in warning and "fund (0)" in warning
    assert "card" not in warning


def test_evaluate_warns_on_a_small_window_and_says_it_replaced_the_report(
    bank: CliBank, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.training

    real = service.training.evaluate

    def quick(data: Any, **options: Any) -> Any:
        config = dataclasses.replace(FAST, forced_sales=options["config"].forced_sales)
        return real(data, **{**options, "config": config})

    monkeypatch.setattr(service.training, "evaluate", quick)
    report = tmp_path / "evaluation.html"
    args = ["evaluate", "--report", str(report), "--horizon-days", "14"]
    first = " ".join(nbo(args, bank).split())
    assert "warning: only" in first and "the comparison is noise" in first
    assert f"report: {report}" in first and "replaced" not in first
    assert report.stat().st_size > 10_000
    second = " ".join(nbo(args, bank).split())
    assert f"report: {report} (replaced the earlier file, written " in second
