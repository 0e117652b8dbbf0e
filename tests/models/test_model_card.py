"""Model cards (models/model_card): every section, unequal performance made visible, JSON,
80-column text and the HTML report."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from models.data import BankData
from models.evaluation import HoldoutResult, holdout_evaluation
from models.evaluation_report import write_report
from models.metrics import product_metrics
from models.model_card import CardConfig, build_card, card_sections, render_text
from models.propensity import TrainConfig
from models.synthetic import generate_bank

AS_OF = dt.date(2025, 12, 1)
SECTIONS = {
    "format",
    "format_version",
    "model",
    "data",
    "holdout",
    "products",
    "features",
    "metrics",
    "calibration",
    "groups",
    "training",
    "libraries",
    "notes",
}


@pytest.fixture(scope="module")
def data() -> BankData:
    bank = generate_bank(2_000, seed=7)
    return BankData.from_frames(bank.products, bank.customers, bank.adoptions)


@pytest.fixture(scope="module")
def holdout(data: BankData) -> HoldoutResult:
    config = TrainConfig(n_cutoffs=1, max_rounds=40, num_threads=1)
    return holdout_evaluation(data, as_of=AS_OF, horizon_days=90, config=config)


@pytest.fixture(scope="module")
def card(holdout: HoldoutResult, data: BankData) -> dict[str, Any]:
    return build_card(holdout.model, holdout, data)


def _groups(card: dict[str, Any], dimension: str) -> dict[str, dict[str, Any]]:
    return {row["group"]: row for row in card["groups"][dimension]["groups"]}


def _text(card: dict[str, Any], width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    for renderable in render_text(card, width=width):
        console.print(renderable)
    return console.export_text()


def test_the_card_has_every_section_and_agrees_with_the_model(
    card: dict[str, Any], holdout: HoldoutResult, data: BankData
) -> None:
    model = holdout.model
    assert set(card) == SECTIONS
    assert card["format"] == "nbo-model-card"
    assert card["data"]["as_of"] == model.as_of.date().isoformat()
    assert card["data"]["first_adoption"] == "2019-01-01"
    assert card["data"]["training_cutoffs"] == ["2025-03-01"]
    assert card["holdout"]["kind"] == "temporal"
    assert card["holdout"]["cutoff"] == str(holdout.cutoff)
    assert card["holdout"]["customers_evaluated"] == int(holdout.comparison["n_customers"].iloc[0])
    assert [p["code"] for p in card["products"]] == list(model.product_codes)
    kinds = {p["code"]: p["kind"] for p in card["products"]}
    assert {"lightgbm", "base_rate"} <= set(kinds.values())
    assert sum(p["trees"] for p in card["products"]) == model.n_trees
    columns = card["features"]["columns"]
    assert [c["name"] for c in columns] == list(model.spec.columns)
    assert {c["name"] for c in columns if c["kind"] == "categorical"} == set(model.spec.categorical)
    assert {a["name"]: a["kind"] for a in card["features"]["attributes"]} == data.attribute_kinds
    models = [m["model"] for m in card["metrics"]["models"]]
    assert models == ["popularity", "rules", "lightgbm", "blend"]
    blend = card["metrics"]["models"][3]
    assert blend["MAP@3"] == pytest.approx(float(holdout.comparison.loc["blend", "MAP@3"]))
    calibrated = {p["code"]: p for p in card["calibration"]["products"]}
    assert set(calibrated) == set(model.product_codes)
    assert any(len(p["validation"]["bins"]) > 1 for p in calibrated.values())
    assert card["calibration"]["holdout_bins"]
    assert card["training"]["config"] == model.config.to_dict()
    assert card["training"]["lightgbm"]["num_leaves"] == model.config.num_leaves
    assert set(card["libraries"]) == {
        "python",
        "nbo",
        "lightgbm",
        "numpy",
        "pandas",
        "scikit-learn",
        "mlxtend",
    }
    assert "not installed" not in card["libraries"].values()


def test_groups_partition_the_holdout_and_the_overall_row_is_the_served_score(
    card: dict[str, Any], holdout: HoldoutResult, data: BankData
) -> None:
    blend = holdout.comparison.loc["blend"]
    for dimension in ("segment", "age_band"):
        part = card["groups"][dimension]
        assert part["available"]
        overall = part["overall"]
        assert overall["map@3"] == pytest.approx(float(blend["MAP@3"]))
        assert overall["hit@3"] == pytest.approx(float(blend["hit@3"]))
        assert overall["adopters"] == int(blend["n_customers"])
        rows = part["groups"]
        assert sum(r["customers"] for r in rows) == overall["customers"]
        assert sum(r["adopters"] for r in rows) == overall["adopters"]
        assert sum(r["adoptions"] for r in rows) == overall["adoptions"]
    segments = _groups(card, "segment")
    scored = data.customers.loc[data.customers["customer_id"].isin(holdout.scores["customer_id"])]
    assert {name: row["customers"] for name, row in segments.items()} == (
        scored["segment"].value_counts().to_dict()
    )
    # Ages at the cutoff, computed here by calendar: everyone in a band is in it.
    cutoff = pd.Timestamp(holdout.cutoff)
    birth = scored["birth_date"]
    age = (
        cutoff.year
        - birth.dt.year
        - ((birth.dt.month * 100 + birth.dt.day) > cutoff.month * 100 + cutoff.day)
    )
    bands = _groups(card, "age_band")
    assert bands["30-44"]["customers"] == int(((age >= 30) & (age <= 44)).sum())
    assert bands["60+"]["customers"] == int((age >= 60).sum())


def test_a_model_worse_for_one_segment_shows_in_that_segment_only(
    card: dict[str, Any], holdout: HoldoutResult, data: BankData
) -> None:
    before = _groups(card, "segment")
    measured = [name for name, row in before.items() if not row["skipped"]]
    assert len(measured) >= 3
    victim = measured[0]
    customers = data.customers.loc[data.customers["segment"] == victim, "customer_id"]
    served = holdout.ranked["blend"]
    hit = served["customer_id"].isin(customers).to_numpy()
    # Deliberately worse for that segment: its scores turned upside down.
    worse = served.assign(score=np.where(hit, 1.0 - served["score"], served["score"]))
    changed = dataclasses.replace(holdout, ranked={**holdout.ranked, "blend": worse})
    after = _groups(build_card(holdout.model, changed, data), "segment")
    assert after[victim]["map@3"] < before[victim]["map@3"] - 0.1
    assert after[victim]["hit@3"] < before[victim]["hit@3"] - 0.1
    assert after[victim]["baseline_map@3"] == before[victim]["baseline_map@3"]
    # Upside-down scores rank adopters below non-adopters exactly as often as above.
    aucs = [(before[victim]["auc"][c], a) for c, a in after[victim]["auc"].items() if a is not None]
    assert any(b > 0.6 for b, _ in aucs)
    assert all(a == pytest.approx(1.0 - b) for b, a in aucs)
    for name in measured[1:]:
        assert after[name] == before[name]


def test_small_groups_are_left_out_and_said_so(
    card: dict[str, Any], holdout: HoldoutResult, data: BankData
) -> None:
    rows = _groups(card, "segment")
    sizes = sorted(row["adopters"] for row in rows.values())
    threshold = sizes[len(sizes) // 2]
    strict = build_card(holdout.model, holdout, data, config=CardConfig(min_adopters=threshold))
    for name, row in _groups(strict, "segment").items():
        if row["adopters"] < threshold:
            assert row["skipped"] and row["map@3"] is None and row["hit@3"] is None
            assert set(row["auc"].values()) == {None}
            assert any(name in note for note in strict["notes"])
        else:
            assert row["skipped"] is None and row["map@3"] is not None
    loose = build_card(
        holdout.model, holdout, data, config=CardConfig(min_adopters=1, min_auc_cases=1)
    )
    assert all(row["skipped"] is None for row in _groups(loose, "segment").values())


def test_many_segments_pool_the_smallest(
    card: dict[str, Any], holdout: HoldoutResult, data: BankData
) -> None:
    rows = _groups(card, "segment")
    pooled = build_card(holdout.model, holdout, data, config=CardConfig(max_segments=3))
    shown = _groups(pooled, "segment")
    largest = sorted(rows, key=lambda name: -rows[name]["customers"])
    assert list(shown) == [*largest[:2], "other"]
    assert shown["other"]["customers"] == sum(rows[name]["customers"] for name in largest[2:])
    assert shown[largest[0]] == rows[largest[0]]


def test_the_card_round_trips_through_json(card: dict[str, Any]) -> None:
    text = json.dumps(card, allow_nan=False)
    again = json.loads(text)
    assert again == card
    assert card_sections(again) == card_sections(card)
    assert _text(again) == _text(card)


def test_the_text_fits_80_columns_and_has_every_heading(card: dict[str, Any]) -> None:
    wide = json.loads(json.dumps(card))
    # Long names must wrap, not overflow: a long model row, segment and product name.
    wide["metrics"]["models"].append(
        {**wide["metrics"]["models"][-1], "model": "blend without outcome features"}
    )
    wide["groups"]["segment"]["groups"][0]["group"] = "high net worth individuals, private"
    wide["products"][0]["name"] = "A current account with a very long marketing name indeed"
    for shown in (card, wide):
        text = _text(shown)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80
        for heading in (
            "Overview",
            "Data window",
            "Holdout",
            "Products",
            "Feature columns",
            "Holdout metrics",
            "Calibration",
            "By segment",
            "By age band",
            "Training parameters and libraries",
        ):
            assert heading in lines
    text = _text(wide)
    assert "blend without outcome" in text and "high net worth" in text
    assert "mobile_banking" in text and "lightgbm" in text


def test_the_html_report_carries_the_card(
    tmp_path: Path, card: dict[str, Any], holdout: HoldoutResult
) -> None:
    # The report's own charts are left out: only the card is under test here.
    arguments: dict[str, Any] = {
        "title": "nbo evaluation",
        "summary": {"holdout": str(holdout.cutoff)},
        "comparison": holdout.comparison,
        "products": product_metrics(holdout.ranked["blend"], holdout.actual),
        "calibration": {},
        "gains": {},
        "rules": None,
        "importance": None,
    }
    plain = write_report(tmp_path / "plain.html", **arguments).read_text()
    assert 'id="card"' not in plain and "Model card" not in plain
    document = write_report(tmp_path / "card.html", card=card, **arguments).read_text()
    section = document[document.index('<section id="card">') :]
    assert '<a href="#card">Model card</a>' in document
    for part in card_sections(card):
        assert f'<h3 id="{part.anchor}">{part.heading}</h3>' in section
    mass = _groups(card, "segment")["mass"]
    assert f'<td>mass</td><td class="num">{mass["customers"]:,}</td>' in section
    assert "data:image/png;base64," in section  # the reliability of each product
    with pytest.raises(ValueError, match="nbo-model-card"):
        write_report(tmp_path / "bad.html", card={"format": "other"}, **arguments)


def test_a_card_without_a_holdout_says_so(holdout: HoldoutResult, data: BankData) -> None:
    card = build_card(holdout.model, None, data)
    assert set(card) == SECTIONS
    assert card["holdout"] is None
    assert card["metrics"] == {"columns": [], "models": [], "products": []}
    assert not card["groups"]["segment"]["available"]
    assert card["notes"]
    assert all(p["holdout"] is None for p in card["calibration"]["products"])
    text = _text(card)
    assert "No holdout was measured" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_kind_of_holdout_is_read_from_the_holdout(
    holdout: HoldoutResult, data: BankData
) -> None:
    fields = {f.name: getattr(holdout, f.name) for f in dataclasses.fields(holdout)}
    random_split = SimpleNamespace(
        **{**fields, "holdout_kind": "random_customers", "holdout_fraction": 0.25}
    )
    card = build_card(holdout.model, cast(HoldoutResult, random_split), data)
    assert card["holdout"]["kind"] == "random_customers"
    assert card["holdout"]["fraction"] == 0.25
    text = _text(card)
    assert "random customers" in text and "25.0% of customers" in text


def test_bad_settings_are_refused(holdout: HoldoutResult, data: BankData) -> None:
    with pytest.raises(TypeError, match="CardConfig"):
        build_card(holdout.model, holdout, data, config=TrainConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="age band"):
        CardConfig(age_bands=(("30+", 30, None), ("40+", 40, None)))
    with pytest.raises(ValueError, match="no 'served' scores"):
        build_card(holdout.model, holdout, data, config=CardConfig(served="served"))
