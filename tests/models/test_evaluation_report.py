"""HTML evaluation report (models/evaluation_report.py): one self-contained, escaped file."""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.evaluation_report import write_report
from models.metrics import (
    calibration_table,
    compare,
    gains_table,
    label_pairs,
    oracle_scores,
    product_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def inputs() -> dict[str, object]:
    """Report inputs computed by models.metrics on a small planted-signal problem."""
    rng = np.random.default_rng(3)
    n_customers, codes = 400, ["card", "loan", "savings", "mortgage"]
    candidates = pd.DataFrame(
        {
            "customer_id": np.repeat(np.arange(n_customers), len(codes)),
            "product_code": np.tile(codes, n_customers),
        }
    )
    truth = rng.random(len(candidates)) * 0.3
    adopted = rng.random(len(candidates)) < truth
    actual = candidates.loc[adopted]
    model = candidates.assign(score=np.clip(truth + rng.normal(0, 0.05, len(truth)), 0, 1))
    popularity = candidates.assign(score=np.tile([0.2, 0.1, 0.15, 0.05], n_customers))
    models = {
        "popularity": popularity,
        "lightgbm": model,
        "oracle": oracle_scores(candidates, actual),
    }
    labelled = {name: label_pairs(scores, actual) for name, scores in models.items()}
    return {
        "summary": {
            "Data window": "2019-01-01 – 2024-06-30",
            "Cutoff": "2024-07-01",
            "Horizon": "90 days",
            "Model version": "lgbm-7f3a",
            "Customers": f"{n_customers:,}",
        },
        "comparison": compare(models, actual),
        "products": product_metrics(model, actual),
        "calibration": {
            name: calibration_table(frame["score"], frame["label"])
            for name, frame in labelled.items()
            if name != "oracle"
        },
        "gains": {
            name: gains_table(frame["score"], frame["label"]) for name, frame in labelled.items()
        },
        "rules": pd.DataFrame(
            {
                "antecedent": [("card",), ("card", "savings"), ("<b>loan</b>",)],
                "consequent": ["loan", "mortgage", "savings & more"],
                "confidence": [0.31, 0.52, 0.12],
                "lift": [1.8, 3.25, 0.9],
                "n_customers": [1200, 85, 40],
                "median_days": [45.0, 180.5, None],
                "ordered": [True, True, False],
            }
        ),
        "importance": pd.DataFrame(
            {"feature": ["age", "income", "tenure_days"], "importance": [310.0, 120.0, 55.0]}
        ),
    }


def _write(path: Path, inputs: dict[str, object], **changes: object) -> str:
    arguments = {**inputs, **changes}
    written = write_report(path, title="NBO evaluation <2024-07> & co", **arguments)  # type: ignore[arg-type]
    assert written == path
    return path.read_text(encoding="utf-8")


def _pngs(document: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in DATA_URI.findall(document)]


def test_the_report_has_every_section_and_the_key_numbers(
    tmp_path: Path, inputs: dict[str, object]
) -> None:
    document = _write(tmp_path / "nested" / "report.html", inputs)
    assert document.startswith("<!DOCTYPE html>")
    for anchor in ("comparison", "gains", "calibration", "products", "rules", "importance"):
        assert f'<section id="{anchor}">' in document
    for heading in ("Model comparison", "Gains and lift", "Calibration", "Products", "Top rules"):
        assert f"<h2>{heading}</h2>" in document
    for key, value in inputs["summary"].items():  # type: ignore[attr-defined]
        assert f"<dt>{key}</dt><dd>{value}</dd>" in document

    comparison = inputs["comparison"]
    assert isinstance(comparison, pd.DataFrame)
    map3 = f"{comparison.loc['lightgbm', 'MAP@3']:.3f}"
    assert f">{map3}</td>" in document
    n_customers = int(comparison["n_customers"].iloc[0])
    assert f"Averaged over {n_customers:,} customers" in document

    products = inputs["products"]
    assert isinstance(products, pd.DataFrame)
    assert f"<td>{products['product_code'].iloc[0]}</td>" in document
    assert f">{products['auc'].iloc[0]:.3f}</td>" in document

    # Rules: ordered antecedents read "then", confidence as a percentage, days rounded.
    assert "card then savings" in document
    assert ">52.0%</td>" in document and ">3.25</td>" in document and ">180</td>" in document


def test_the_best_non_reference_model_is_highlighted(
    tmp_path: Path, inputs: dict[str, object]
) -> None:
    document = _write(tmp_path / "report.html", inputs)
    rows = {
        name: row
        for name, row in re.findall(r"<tr[^>]*><td>(\w+)</td>(.*?)</tr>", document)
        if name in {"popularity", "lightgbm", "oracle"}
    }
    # The oracle is best everywhere but only shown for reference; the planted model wins.
    assert 'class="num best"' not in rows["oracle"]
    assert rows["lightgbm"].count('class="num best"') >= 15
    assert '<tr class="reference"><td>oracle</td>' in document


def test_charts_are_embedded_pngs(tmp_path: Path, inputs: dict[str, object]) -> None:
    document = _write(tmp_path / "report.html", inputs)
    images = _pngs(document)
    assert len(images) == 3  # gains and lift, calibration, feature importance
    for image in images:
        assert image.startswith(PNG_SIGNATURE)
        width, height = struct.unpack(">II", image[16:24])  # the IHDR chunk
        assert width > 400 and height > 200


def test_the_file_is_self_contained(tmp_path: Path, inputs: dict[str, object]) -> None:
    document = _write(tmp_path / "report.html", inputs)
    assert "http://" not in document and "https://" not in document
    assert "<link" not in document and "<script" not in document
    sources = re.findall(r'(?:src|href)="([^"]*)"', document)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    for image in _pngs(document):
        assert b"http" not in image  # no URL in PNG metadata either


def test_text_is_escaped(tmp_path: Path, inputs: dict[str, object]) -> None:
    document = _write(tmp_path / "report.html", inputs)
    assert "<title>NBO evaluation &lt;2024-07&gt; &amp; co</title>" in document
    assert "&lt;b&gt;loan&lt;/b&gt;" in document and "<b>loan</b>" not in document
    assert "savings &amp; more" in document


def test_optional_sections_and_single_frames(tmp_path: Path, inputs: dict[str, object]) -> None:
    calibration = inputs["calibration"]
    gains = inputs["gains"]
    assert isinstance(calibration, dict) and isinstance(gains, dict)
    document = _write(
        tmp_path / "report.html",
        inputs,
        rules=None,
        importance=None,
        calibration=calibration["lightgbm"],
        gains=gains["lightgbm"],
    )
    assert "No rules in this evaluation." in document
    assert "No feature importance given." in document
    assert len(_pngs(document)) == 2


def test_rewriting_replaces_the_file(tmp_path: Path, inputs: dict[str, object]) -> None:
    path = tmp_path / "report.html"
    path.write_text("old")
    _write(path, inputs)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_missing_columns_are_reported(tmp_path: Path, inputs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="importance is missing"):
        _write(tmp_path / "a.html", inputs, importance=pd.DataFrame({"feature": ["age"]}))
    with pytest.raises(ValueError, match=r"gains\['model'\] is missing"):
        _write(tmp_path / "b.html", inputs, gains=pd.DataFrame({"cum_share": [1.0]}))
