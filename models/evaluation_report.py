"""A single-file HTML evaluation report: key facts, tables and charts on one page.

The page is self-contained: styles are inline and every chart is a matplotlib PNG
embedded as a ``data:`` URI, so it opens offline, can be mailed as one attachment and
never fetches anything. Charts are drawn on matplotlib's Agg canvas directly (no pyplot,
no display, no global state), so rendering is safe in a server or a worker thread.

The inputs are the frames :mod:`models.metrics` produces: :func:`~models.metrics.compare`
for the comparison, :func:`~models.metrics.product_metrics`,
:func:`~models.metrics.calibration_table` and :func:`~models.metrics.gains_table`; rules
as :meth:`models.rules.RuleSet.to_frame` (or basket rules) gives them.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from models.metrics import expected_calibration_error
from models.model_card import CardSection, CardTable, card_sections

__all__ = ["write_report"]

_PALETTE: Final[tuple[str, ...]] = (
    "#2563eb",
    "#ea580c",
    "#16a34a",
    "#9333ea",
    "#db2777",
    "#0891b2",
    "#ca8a04",
    "#4b5563",
)
_REFERENCE_COLOUR: Final[str] = "#6b7280"
_RANDOM_COLOUR: Final[str] = "#9ca3af"
_NUM: Final[str] = ' class="num"'
_NOT_RANKED: Final[frozenset[str]] = frozenset({"n_customers", "coverage"})
"""Comparison columns that describe the evaluation rather than rank the models."""

_CSS: Final[str] = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --soft: #f9fafb;
        --accent: #2563eb; --best: #dcfce7; --best-ink: #166534; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
             sans-serif; }
header { background: linear-gradient(135deg, #1e3a8a, #2563eb); color: #fff;
         padding: 28px 40px 24px; }
header h1 { margin: 0 0 16px; font-size: 26px; font-weight: 650; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
         gap: 10px; margin: 0; }
.fact { background: rgba(255, 255, 255, 0.12); border-radius: 8px; padding: 8px 12px; }
.fact dt { font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em;
           opacity: 0.8; }
.fact dd { margin: 2px 0 0; font-size: 17px; font-weight: 600;
           overflow-wrap: anywhere; }
nav { position: sticky; top: 0; z-index: 2; background: #fff;
      border-bottom: 1px solid var(--line); padding: 8px 40px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 18px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 40px 40px; }
section { margin-top: 32px; }
h2 { font-size: 20px; margin: 0 0 6px; border-bottom: 2px solid var(--line);
     padding-bottom: 4px; }
p.note { color: var(--muted); margin: 4px 0 12px; font-size: 13.5px; }
p.empty { color: var(--muted); font-style: italic; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; width: 100%; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: var(--soft); text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f3f4f6; }
td.best { background: var(--best); color: var(--best-ink); font-weight: 700; }
tr.reference td { color: var(--muted); font-style: italic; }
td.rule { white-space: normal; }
h3 { font-size: 16px; margin: 22px 0 6px; }
table.card-facts { width: auto; margin-bottom: 8px; }
table.card-facts th { background: none; color: var(--muted); font-weight: 500; }
td.wrap { white-space: normal; overflow-wrap: anywhere; }
table.card { margin-bottom: 8px; }
table.card caption { text-align: left; color: var(--muted); font-size: 13px;
                     padding: 4px 0; }
.arrow { color: var(--accent); font-weight: 700; padding: 0 4px; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 20px; }
"""


def write_report(
    path: Path,
    *,
    title: str,
    summary: Mapping[str, str],
    comparison: pd.DataFrame,
    products: pd.DataFrame,
    calibration: pd.DataFrame | Mapping[str, pd.DataFrame],
    gains: pd.DataFrame | Mapping[str, pd.DataFrame],
    rules: pd.DataFrame | None,
    importance: pd.DataFrame | None,
    reference_models: Collection[str] = ("oracle",),
    max_rules: int = 20,
    max_features: int = 20,
    card: Mapping[str, Any] | None = None,
    rules_left_out: int = 0,
) -> Path:
    """Write the evaluation report as one self-contained HTML file.

    Parameters
    ----------
    path : pathlib.Path
        Where to write; parent folders are created. The file is replaced atomically.
    title : str
        Page title and heading.
    summary : mapping of str to str
        Key facts shown in the header, in order (e.g. data window, cutoff, horizon,
        model version, customers).
    comparison : pandas.DataFrame
        One row per model, as :func:`models.metrics.compare` returns (models in the
        index, or in a ``model`` column). In every metric column the best value among
        the non-reference models is highlighted; ``n_customers`` and ``coverage`` are
        shown but not ranked.
    products : pandas.DataFrame
        As :func:`models.metrics.product_metrics` returns.
    calibration : pandas.DataFrame or mapping of str to pandas.DataFrame
        :func:`models.metrics.calibration_table` results, one per model (a single frame
        is labelled ``model``).
    gains : pandas.DataFrame or mapping of str to pandas.DataFrame
        :func:`models.metrics.gains_table` results, one per model.
    rules : pandas.DataFrame or None
        Rules with ``antecedent`` (tuple of product codes or text), ``consequent``,
        ``confidence``, ``lift``, customers as ``n_customers`` (or ``count``) and
        optionally ``median_days`` and ``ordered``, best first (as
        :func:`models.rules.rules_for_display` orders them); the first ``max_rules``
        are listed. None: the section says so.
    importance : pandas.DataFrame or None
        ``feature`` and ``importance`` columns; the ``max_features`` largest are
        charted. None: the section says so.
    reference_models : collection of str, default ("oracle",)
        Models shown for reference (muted, dashed in charts, never highlighted as best),
        such as the oracle that knows the future.
    max_rules, max_features : int, default 20
        How many rules and features to show.
    card : mapping, optional
        A model card (:func:`models.model_card.build_card`), shown as the last
        section, "Model card": the sections :func:`models.model_card.render_text`
        prints, with a reliability chart per product. None: no such section.
    rules_left_out : int, default 0
        Mined rules not in ``rules`` (never said to a customer), counted in the note.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If a frame lacks the columns its section needs, or ``card`` is not a model card.
    """
    references = frozenset(reference_models)
    body = [
        _header(title, summary),
        _nav(with_card=card is not None),
        "<main>",
        _comparison_section(comparison, references),
        _gains_section(_by_model(gains), references),
        _calibration_section(_by_model(calibration), references),
        _products_section(products),
        _rules_section(rules, max_rules, rules_left_out),
        _importance_section(importance, max_features),
        "" if card is None else _card_section(card),
        "</main>",
        "<footer>nbo offline evaluation report &middot; self-contained, no external "
        "resources</footer>",
    ]
    document = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(document, encoding="utf-8")
    os.replace(partial, path)
    return path


# --------------------------------------------------------------------------- sections


def _header(title: str, summary: Mapping[str, str]) -> str:
    facts = "".join(
        f'<div class="fact"><dt>{_esc(key)}</dt><dd>{_esc(value)}</dd></div>'
        for key, value in summary.items()
    )
    return f'<header><h1>{_esc(title)}</h1><dl class="facts">{facts}</dl></header>'


def _nav(*, with_card: bool = False) -> str:
    links = [
        ("comparison", "Model comparison"),
        ("gains", "Gains and lift"),
        ("calibration", "Calibration"),
        ("products", "Products"),
        ("rules", "Top rules"),
        ("importance", "Feature importance"),
    ]
    if with_card:
        links.append(("card", "Model card"))
    return "<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in links) + "</nav>"


def _section(anchor: str, heading: str, note: str, content: str) -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{_esc(heading)}</h2>{note_html}{content}</section>'


def _comparison_section(comparison: pd.DataFrame, references: frozenset[str]) -> str:
    frame = comparison.copy()
    if "model" in frame.columns:
        frame = frame.set_index("model")
    frame.index = frame.index.map(str)
    n_customers = (
        int(frame["n_customers"].iloc[0]) if "n_customers" in frame and len(frame) else None
    )
    note = (
        "Ranking metrics at cut-off <i>k</i> over each customer's candidate products, "
        "ranked by score (ties by product code). MAP@k as in the Kaggle Santander "
        "competition: AP@k = &Sigma;<sub>i&le;k</sub> P(i)&middot;rel(i) / min(k, |adopted|)."
    )
    if n_customers is not None:
        note += (
            f" Averaged over {n_customers:,} customers who adopted at least one candidate "
            "product in the evaluation window."
        )
    note += " Best value per column highlighted"
    note += (
        f" ({_esc(', '.join(sorted(references)))} shown for reference, not ranked)."
        if references & set(frame.index)
        else "."
    )
    if frame.empty:
        return _section("comparison", "Model comparison", note, _empty("No models compared."))

    ranked_rows = [name for name in frame.index if name not in references]
    best: dict[str, set[str]] = {}
    for column in frame.columns:
        if column in _NOT_RANKED or not pd.api.types.is_numeric_dtype(frame[column]):
            continue
        values = frame.loc[ranked_rows, column].astype(float)
        if values.notna().any():
            # Compare as displayed, so equal-looking values are highlighted alike.
            top = _format(column, values.max())
            best[column] = {name for name, v in values.items() if _format(column, v) == top}

    header = "<th>Model</th>" + "".join(
        f'<th class="num">{_esc(column)}</th>' for column in frame.columns
    )
    rows = []
    for name, record in frame.iterrows():
        cells = [f"<td>{_esc(name)}</td>"]
        for column in frame.columns:
            classes = ["num"]
            if name in best.get(column, ()):
                classes.append("best")
            cells.append(
                f'<td class="{" ".join(classes)}">{_esc(_format(column, record[column]))}</td>'
            )
        row_class = ' class="reference"' if name in references else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    table = (
        f'<div class="scroll"><table class="comparison"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    return _section("comparison", "Model comparison", note, table)


def _gains_section(gains: dict[str, pd.DataFrame], references: frozenset[str]) -> str:
    note = (
        "Candidate pairs sorted by score, best first. Left: share of all adoptions "
        "captured by the top share of pairs; the diagonal is a random ranking. Right: "
        "cumulative lift, the adoption rate among the top pairs over the overall rate. "
        "Tied scores count at their average, never in a lucky order."
    )
    if not gains:
        return _section("gains", "Gains and lift", note, _empty("No gains tables given."))
    for name, frame in gains.items():
        _need(frame, ("cum_share", "cum_gain", "cum_lift"), f"gains[{name!r}]")

    figure = _figure(11.0, 4.2)
    gain_axes, lift_axes = figure.subplots(1, 2)
    gain_axes.plot([0, 1], [0, 1], color=_RANDOM_COLOUR, linestyle=":", label="random")
    lift_axes.axhline(1.0, color=_RANDOM_COLOUR, linestyle=":", label="random")
    for (name, frame), style in zip(gains.items(), _styles(gains, references), strict=True):
        share = np.r_[0.0, frame["cum_share"].to_numpy(float)]
        gain = np.r_[0.0, frame["cum_gain"].to_numpy(float)]
        gain_axes.plot(share, gain, marker="o", markersize=3.5, label=name, **style)
        lift_axes.plot(
            frame["cum_share"].to_numpy(float),
            frame["cum_lift"].to_numpy(float),
            marker="o",
            markersize=3.5,
            label=name,
            **style,
        )
    gain_axes.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="share of candidate pairs (best scores first)",
        ylabel="share of adoptions captured",
        title="Cumulative gains",
    )
    lift_axes.set(
        xlim=(0, 1),
        xlabel="share of candidate pairs (best scores first)",
        ylabel="cumulative lift",
        title="Cumulative lift",
    )
    lift_axes.set_ylim(bottom=0)
    for axes in (gain_axes, lift_axes):
        _tidy(axes)
        axes.xaxis.set_major_formatter(_percent)
    gain_axes.yaxis.set_major_formatter(_percent)
    gain_axes.legend(loc="lower right", frameon=False, fontsize=9)
    return _section(
        "gains",
        "Gains and lift",
        note,
        _image(figure, "Cumulative gains and lift of each model against a random ranking"),
    )


def _calibration_section(calibration: dict[str, pd.DataFrame], references: frozenset[str]) -> str:
    note = (
        "Mean predicted probability against the observed adoption rate per bin; a "
        "calibrated model lies on the diagonal. ECE (expected calibration error) is the "
        "count-weighted mean gap. Axes are zoomed to the range of the predictions."
    )
    if not calibration:
        return _section("calibration", "Calibration", note, _empty("No calibration tables."))
    for name, frame in calibration.items():
        _need(frame, ("mean_predicted", "observed_rate", "count"), f"calibration[{name!r}]")

    figure = _figure(7.0, 6.2)
    curve_axes, count_axes = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    top = max(
        max(float(f["mean_predicted"].max()), float(f["observed_rate"].max()))
        for f in calibration.values()
    )
    limit = min(1.0, top * 1.08) if top > 0 else 1.0
    curve_axes.plot(
        [0, limit], [0, limit], color=_RANDOM_COLOUR, linestyle=":", label="perfectly calibrated"
    )
    styles = _styles(calibration, references)
    for (name, frame), style in zip(calibration.items(), styles, strict=True):
        ece = expected_calibration_error(frame)
        predicted = frame["mean_predicted"].to_numpy(float)
        curve_axes.plot(
            predicted,
            frame["observed_rate"].to_numpy(float),
            marker="o",
            markersize=4,
            label=f"{name} (ECE {ece:.3f})",
            **style,
        )
        count_axes.plot(
            predicted, frame["count"].to_numpy(float), marker="o", markersize=3, **style
        )
    curve_axes.set(
        xlim=(0, limit), ylim=(0, limit), ylabel="observed adoption rate", title="Reliability"
    )
    curve_axes.legend(loc="upper left", frameon=False, fontsize=9)
    count_axes.set(xlabel="mean predicted probability", ylabel="pairs per bin")
    count_axes.set_ylim(bottom=0)
    for axes in (curve_axes, count_axes):
        _tidy(axes)
    return _section(
        "calibration",
        "Calibration",
        note,
        _image(figure, "Reliability curve of each model with the diagonal of perfect calibration"),
    )


@dataclass(frozen=True)
class _Column:
    source: str
    header: str
    render: Callable[[Any], str]
    numeric: bool = True


def _products_section(products: pd.DataFrame) -> str:
    note = (
        "Per product, over its candidate pairs: adopters in the window, base rate, ROC AUC "
        "(chance is 0.5; a dash when a product has no adopter or no non-adopter), PR-AUC "
        "(average precision; chance is the base rate) and Brier score (lower is better)."
    )
    columns = [
        _Column("product_code", "Product", str, numeric=False),
        _Column("n_candidates", "Candidates", _integer),
        _Column("n_positive", "Adopters", _integer),
        _Column("base_rate", "Base rate", _percent_text),
        _Column("auc", "AUC", _decimal),
        _Column("pr_auc", "PR-AUC", _decimal),
        _Column("brier", "Brier", _decimal),
        _Column("mean_predicted", "Mean predicted", _percent_text),
    ]
    _need(products, [c.source for c in columns], "products")
    if products.empty:
        return _section("products", "Products", note, _empty("No products."))
    return _section("products", "Products", note, _table(products, columns, "products"))


def _rules_section(rules: pd.DataFrame | None, max_rules: int, left_out: int = 0) -> str:
    note = (
        "Adoption rules: of the customers who had the products on the left, the share "
        "who went on to adopt the product on the right (confidence), how much likelier "
        "that is than for customers overall (lift), how many customers it held for, and "
        "the median days it took."
    )
    if rules is None or rules.empty:
        return _section("rules", "Top rules", note, _empty("No rules in this evaluation."))
    customers = "n_customers" if "n_customers" in rules.columns else "count"
    _need(rules, ("antecedent", "consequent", "confidence", "lift", customers), "rules")
    frame = rules.copy()
    frame["_customers"] = frame[customers]
    # In the order given: the order decisions choose their reasons in (lift first).
    top = frame.head(max_rules)
    if left_out:
        note += (
            f" {left_out:,} mined rules are left out: a lift of 1 or below, or too few "
            "customers behind them, so they are never said to a customer."
        )
    if len(frame) > len(top):
        note += f" The best {len(top)} of {len(frame):,} are shown."

    rows = []
    for record in top.to_dict("records"):
        median = record.get("median_days")
        cells = [
            f'<td class="rule">{_rule_html(record)}</td>',
            f'<td class="num">{_esc(_percent_text(record["confidence"]))}</td>',
            f'<td class="num">{_esc(_ratio(record["lift"]))}</td>',
            f'<td class="num">{_esc(_integer(record["_customers"]))}</td>',
            f'<td class="num">{_esc(_days(median))}</td>',
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = (
        f"<th>Rule</th><th{_NUM}>Confidence</th><th{_NUM}>Lift</th>"
        f"<th{_NUM}>Customers</th><th{_NUM}>Median days</th>"
    )
    table = (
        f'<div class="scroll"><table class="rules"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    return _section("rules", "Top rules", note, table)


def _importance_section(importance: pd.DataFrame | None, max_features: int) -> str:
    note = "The features the propensity model leaned on most, largest first."
    if importance is None or importance.empty:
        return _section(
            "importance", "Feature importance", note, _empty("No feature importance given.")
        )
    _need(importance, ("feature", "importance"), "importance")
    top = (
        importance.loc[:, ["feature", "importance"]]
        .sort_values("importance", ascending=False, kind="stable")
        .head(max_features)
    )
    labels = [str(feature) for feature in top["feature"]][::-1]
    values = top["importance"].to_numpy(float)[::-1]
    figure = _figure(8.0, 0.32 * len(labels) + 1.1)
    axes = figure.subplots()
    bars = axes.barh(labels, values, color=_PALETTE[0], height=0.65)
    axes.bar_label(bars, labels=[_compact(v) for v in values], padding=3, fontsize=8)
    axes.set(xlabel="importance", title=f"Top {len(labels)} features")
    axes.set_xlim(right=float(values.max()) * 1.15 if values.max() > 0 else 1.0)
    axes.tick_params(axis="y", labelsize=9)
    _tidy(axes, grid_axis="x")
    return _section(
        "importance",
        "Feature importance",
        note,
        _image(figure, "Bar chart of the most important features"),
    )


def _card_section(card: Mapping[str, Any]) -> str:
    note = (
        "What a model-risk review reads about the model: its data and holdout, products "
        "and feature columns, holdout metrics next to the baselines, calibration, metrics "
        "by segment and by age band, and how it was trained."
    )
    parts = []
    for section in card_sections(card):
        parts.append(_card_part(section))
        if section.anchor == "card-calibration":
            parts.append(_card_reliability(card))
    return _section("card", "Model card", note, "".join(parts))


def _card_part(section: CardSection) -> str:
    parts = [f'<h3 id="{_esc(section.anchor)}">{_esc(section.heading)}</h3>']
    if section.facts:
        rows = "".join(
            f'<tr><th>{_esc(label)}</th><td class="wrap">{_esc(value)}</td></tr>'
            for label, value in section.facts
        )
        parts.append(f'<table class="card-facts"><tbody>{rows}</tbody></table>')
    parts.extend(_card_table(table) for table in section.tables)
    parts.extend(f'<p class="note">{_esc(note)}</p>' for note in section.notes)
    return "".join(parts)


def _card_table(table: CardTable) -> str:
    caption = f"<caption>{_esc(table.title)}</caption>" if table.title else ""
    header = "".join(
        f"<th{_NUM if numeric else ''}>{_esc(column)}</th>"
        for column, numeric in zip(table.columns, table.numeric, strict=True)
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td{_NUM if numeric else ''}>{_esc(cell)}</td>"
            for cell, numeric in zip(row, table.numeric, strict=True)
        )
        + "</tr>"
        for row in table.rows
    )
    return (
        f'<div class="scroll"><table class="card">{caption}<thead><tr>{header}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def _card_reliability(card: Mapping[str, Any]) -> str:
    """Small multiples: each product's validation reliability bins against the diagonal."""
    products = [p for p in card["calibration"]["products"] if p["validation"]["bins"]]
    if not products:
        return ""
    columns = min(5, len(products))
    rows = math.ceil(len(products) / columns)
    figure = _figure(2.3 * columns, 2.1 * rows)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, product in zip(grid.flat, products, strict=False):
        bins = product["validation"]["bins"]
        predicted = [float(b["mean_predicted"]) for b in bins]
        observed = [float(b["observed"]) for b in bins]
        top = max([*predicted, *observed, 1e-3]) * 1.1
        axes.plot([0, top], [0, top], color=_RANDOM_COLOUR, linestyle=":", linewidth=1)
        axes.plot(predicted, observed, marker="o", markersize=3, color=_PALETTE[0])
        axes.set(xlim=(0, top), ylim=(0, top))
        axes.set_title(str(product["code"]), fontsize=9)
        axes.tick_params(labelsize=7)
        axes.xaxis.set_major_formatter(PercentFormatter(1.0))
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.xaxis.set_major_locator(MaxNLocator(4))
        axes.yaxis.set_major_locator(MaxNLocator(4))
        _tidy(axes)
    for axes in list(grid.flat)[len(products) :]:
        axes.set_visible(False)
    figure.supxlabel("mean predicted (validation bins)", fontsize=9)
    figure.supylabel("observed adoption rate", fontsize=9)
    return _image(figure, "Reliability of each product on the validation split of training")


# --------------------------------------------------------------------------- pieces


def _table(frame: pd.DataFrame, columns: Sequence[_Column], css_class: str) -> str:
    header = "".join(f"<th{_NUM if c.numeric else ''}>{_esc(c.header)}</th>" for c in columns)
    rows = []
    for record in frame.to_dict("records"):
        cells = "".join(
            f"<td{_NUM if c.numeric else ''}>{_esc(c.render(record[c.source]))}</td>"
            for c in columns
        )
        rows.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="scroll"><table class="{css_class}"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _rule_html(record: Mapping[str, Any]) -> str:
    antecedent = record["antecedent"]
    items = [antecedent] if isinstance(antecedent, str) else [str(item) for item in antecedent]
    joiner = " then " if bool(record.get("ordered", False)) else " + "
    left = _esc(joiner.join(items)) if items else "<i>anyone</i>"
    return f'{left}<span class="arrow">&rarr;</span>{_esc(record["consequent"])}'


def _empty(message: str) -> str:
    return f'<p class="empty">{_esc(message)}</p>'


def _image(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    # No Software metadata: the PNG then carries no URL at all.
    figure.savefig(buffer, format="png", dpi=144, metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{encoded}"></figure>'


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _tidy(axes: Axes, grid_axis: Literal["both", "x", "y"] = "both") -> None:
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    axes.grid(True, axis=grid_axis, color="#e5e7eb", linewidth=0.8)
    axes.set_axisbelow(True)


def _styles(frames: Mapping[str, pd.DataFrame], references: frozenset[str]) -> list[dict[str, Any]]:
    """Line style per model: palette colours, references grey and dashed."""
    styles: list[dict[str, Any]] = []
    colour = 0
    for name in frames:
        if name in references:
            styles.append({"color": _REFERENCE_COLOUR, "linestyle": "--", "linewidth": 1.4})
        else:
            styles.append({"color": _PALETTE[colour % len(_PALETTE)], "linewidth": 2.0})
            colour += 1
    return styles


def _by_model(frames: pd.DataFrame | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(frames, pd.DataFrame):
        return {"model": frames}
    return {str(name): frame for name, frame in frames.items()}


def _need(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {list(frame.columns)}")


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _percent(value: float, _position: int | None = None) -> str:
    return f"{value:.0%}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def _format(column: str, value: Any) -> str:
    """Comparison cell text, by column meaning."""
    if _missing(value):
        return "—"
    if column == "coverage":
        return _percent_text(value)
    if "/" in column:
        return f"{float(value):.2f}×"
    if isinstance(value, int | np.integer) or column == "n_customers":
        return _integer(value)
    return _decimal(value)


def _integer(value: Any) -> str:
    return "—" if _missing(value) else f"{int(value):,}"


def _decimal(value: Any) -> str:
    if _missing(value):
        return "—"
    number = float(value)
    return f"{number:.4f}" if 0 < abs(number) < 0.01 else f"{number:.3f}"


def _percent_text(value: Any) -> str:
    if _missing(value):
        return "—"
    number = float(value)
    return f"{number:.2%}" if abs(number) < 0.1 else f"{number:.1%}"


def _ratio(value: Any) -> str:
    return "—" if _missing(value) else f"{float(value):.2f}"


def _days(value: Any) -> str:
    return "—" if _missing(value) else f"{float(value):,.0f}"


def _compact(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
