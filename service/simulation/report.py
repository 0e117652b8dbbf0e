"""The report of ``nbo simulate``: one self-contained HTML page, Markdown or JSON.

The HTML page follows ``nbo evaluate``'s (:mod:`models.evaluation_report`): inline
styles, and every chart a matplotlib PNG embedded as a ``data:`` URI, so it opens
offline and fetches nothing. Charts are drawn on matplotlib's Agg canvas directly (no
pyplot, no display), and matplotlib is imported only when a chart is drawn: the
command line and the serving path never load it otherwise.

What the page shows: a summary table of the run; over the simulated days, adoption by
treated and control customers and the offers' conversion, NPS, and the uplift against
the control group with its interval next to the true uplift the generator planted (as
read each evening: the customers contacted so far, their adoptions so far); then the
final tables by product and the model versions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from service.reports import measures

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from service.simulation.run import SimulationResult

__all__ = [
    "REPORT_FORMATS",
    "html_report",
    "markdown",
    "pct",
    "pp",
    "report_format",
    "summary",
    "uplift_rows",
    "write_report",
]

REPORT_FORMATS: Final[dict[str, str]] = {
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".json": "json",
}
"""The report's format by the file's suffix (any case)."""

_TREATED: Final = "#2563eb"
_CONTROL: Final = "#ea580c"
_TRUTH: Final = "#16a34a"
_MUTED: Final = "#6b7280"

_CSS: Final[str] = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --soft: #f9fafb;
        --accent: #2563eb; --good: #166534; --bad: #b91c1c; }
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
.fact dd { margin: 2px 0 0; font-size: 17px; font-weight: 600; overflow-wrap: anywhere; }
nav { position: sticky; top: 0; z-index: 2; background: #fff;
      border-bottom: 1px solid var(--line); padding: 8px 40px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 18px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 40px 40px; }
section { margin-top: 32px; }
h2 { font-size: 20px; margin: 0 0 6px; border-bottom: 2px solid var(--line);
     padding-bottom: 4px; }
p.note { color: var(--muted); margin: 4px 0 12px; font-size: 13.5px; }
p.empty { color: var(--muted); font-style: italic; }
p.verdict { font-size: 16px; font-weight: 600; }
p.verdict.good { color: var(--good); }
p.verdict.bad { color: var(--bad); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; width: 100%; }
table.summary { width: auto; min-width: 50%; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: var(--soft); text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f3f4f6; }
tr.total td { font-weight: 600; }
td.wrap { white-space: normal; }
figure { margin: 0 0 12px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 6px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 20px; }
"""


def report_format(path: Path) -> str:
    """The format the report at ``path`` is written in: ``html``, ``markdown`` or ``json``.

    Raises
    ------
    ValueError
        When the suffix is none of :data:`REPORT_FORMATS`, naming the ones allowed.
    """
    found = REPORT_FORMATS.get(path.suffix.lower())
    if found is None:
        ending = f"ends in {path.suffix!r}" if path.suffix else "has no suffix"
        raise ValueError(
            "a report must be .html or .htm (a page with charts), .md (Markdown) or .json "
            f"(the figures); {path.name!r} {ending}"
        )
    return found


def write_report(result: SimulationResult, path: Path) -> bool:
    """Write the report in the format its suffix names, atomically.

    Returns
    -------
    bool
        Whether a file was there before (and is now replaced).

    Raises
    ------
    ValueError
        For a suffix :func:`report_format` refuses.
    OSError
        When the file cannot be written.
    """
    kind = report_format(path)
    if kind == "html":
        text = html_report(result)
    elif kind == "markdown":
        text = markdown(result)
    else:
        text = json.dumps(summary(result), indent=2, default=str) + "\n"
    replaced = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return replaced


# --------------------------------------------------------------------------- shared


def pct(value: float | None, digits: int = 1) -> str:
    """A rate as a percentage (empty when unknown)."""
    return "" if value is None else f"{100 * value:.{digits}f}%"


def pp(value: float | None) -> str:
    """A difference of rates in signed percentage points (empty when unknown)."""
    return "" if value is None else f"{100 * value:+.1f}"


def uplift_rows(
    result: SimulationResult,
) -> list[tuple[measures.UpliftRow, measures.UpliftRow | None]]:
    """(measured, true) rows worth showing: the total, then products anyone adopted."""
    truth = {row.product_code: row for row in result.true_uplift.rows}
    rows: list[tuple[measures.UpliftRow, measures.UpliftRow | None]] = [
        (result.uplift.total, result.true_uplift.total)
    ]
    for row in result.uplift.rows:
        if row.treated_adopters or row.control_adopters:
            rows.append((row, truth.get(row.product_code)))
    return rows


def _inside(measured: measures.UpliftRow, truth: measures.UpliftRow | None) -> bool:
    true_value = None if truth is None else truth.difference
    return (
        measured.ci_low is not None
        and measured.ci_high is not None
        and true_value is not None
        and measured.ci_low <= true_value <= measured.ci_high
    )


def _nps_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _interval(row: measures.UpliftRow) -> str:
    return "" if row.ci_low is None else f"{pp(row.ci_low)} .. {pp(row.ci_high)}"


def _title(result: SimulationResult) -> str:
    period = result.config.period
    return f"nbo simulation: {result.config.customers:,} customers, {period.start} to {period.end}"


def _product_label(code: str) -> str:
    return "any product" if code == measures.ANY_PRODUCT else code


def _summary_rows(result: SimulationResult) -> list[tuple[str, str]]:
    """The summary table: what happened, and the experiment's answer."""
    config = result.config
    total = result.conversion.total
    uplift = result.uplift.total
    nps = result.nps.total
    control = result.control_decisions
    verdict = "yes" if result.recovered() else "no"
    return [
        ("simulated days", f"{config.days:,} ({config.period.start} to {config.period.end})"),
        ("customers", f"{config.customers:,}"),
        ("contacts (branch visits)", f"{result.visits:,}"),
        (
            "decisions",
            f"{result.visits:,}: {result.visits - control:,} treated, {control:,} control",
        ),
        ("decisions with offers", f"{result.decisions_with_offers:,}"),
        ("offers", f"{total.offers:,}"),
        (
            "outcomes",
            f"{total.accepted + total.declined + total.not_now:,}: {total.accepted:,} accepted, "
            f"{total.declined:,} declined, {total.not_now:,} not now",
        ),
        ("offer conversion", pct(total.conversion) or "n/a"),
        (
            "adoptions",
            f"{result.adoptions_offer:,} through offers, {result.adoptions_organic:,} organic",
        ),
        ("NPS", f"{_nps_text(nps.nps)} from {nps.responses:,} answers"),
        ("treatment group", f"{uplift.treated_customers:,} customers"),
        (
            "control group",
            f"{uplift.control_customers:,} customers ({pct(config.control_share, 0)} asked)",
        ),
        (
            f"uplift within {config.uplift_window_days} days (any product)",
            f"{pp(uplift.difference) or 'n/a'} points, 95% CI {_interval(uplift) or 'n/a'}",
        ),
        ("true uplift", f"{pp(result.true_difference()) or 'n/a'} points"),
        ("true uplift inside the interval", verdict),
        ("model versions", f"{len(result.retrainings)} trained, {_activated(result)} activated"),
        ("run time", f"{result.seconds:.0f} s"),
    ]


def _activated(result: SimulationResult) -> int:
    return sum(1 for r in result.retrainings if r.activated)


# --------------------------------------------------------------------------- JSON


def summary(result: SimulationResult) -> dict[str, Any]:
    """The results as plain JSON-ready data."""
    config = result.config
    return {
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("train_config",)},
            "train_config": config.train_config.to_dict(),
        },
        "visits": result.visits,
        "decisions_with_offers": result.decisions_with_offers,
        "control_decisions": result.control_decisions,
        "adoptions_organic": result.adoptions_organic,
        "adoptions_offer": result.adoptions_offer,
        "conversion": asdict(result.conversion.total),
        "conversion_by_product": [asdict(row) for row in result.conversion.rows],
        "uplift": asdict(result.uplift.total),
        "true_uplift": result.true_difference(),
        "recovered": result.recovered(),
        "uplift_by_product": [
            {**asdict(measured), "true_difference": None if truth is None else truth.difference}
            for measured, truth in uplift_rows(result)[1:]
        ],
        "nps": asdict(result.nps.total),
        "nps_by_branch": [asdict(row) for row in result.nps.rows],
        "retrainings": [asdict(r) for r in result.retrainings],
        "daily": [
            {
                "day": day.day,
                "decisions": day.decisions,
                "control_decisions": day.control_decisions,
                "decisions_with_offers": day.decisions_with_offers,
                "offers": day.offers,
                "accepted": day.accepted,
                "declined": day.declined,
                "not_now": day.not_now,
                "nps_responses": day.nps_responses,
                "nps": day.nps,
                "treated_customers": day.uplift.treated_customers,
                "control_customers": day.uplift.control_customers,
                "treated_rate": day.uplift.treated_rate,
                "control_rate": day.uplift.control_rate,
                "uplift": day.uplift.difference,
                "uplift_ci_low": day.uplift.ci_low,
                "uplift_ci_high": day.uplift.ci_high,
                "true_uplift": day.true_uplift.difference,
            }
            for day in result.daily
        ],
        "seconds": result.seconds,
    }


# --------------------------------------------------------------------------- Markdown


def markdown(result: SimulationResult) -> str:
    """The results as a Markdown report: the summary, the days, the uplift by product."""
    config = result.config
    out = [f"# {_title(result)}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {value} |" for name, value in _summary_rows(result)]
    out += [
        "",
        "## Day by day",
        "",
        "Uplift as read each evening: the customers contacted so far, their adoptions so far.",
        "",
        "| day | decisions | control | offers | accepted | NPS (answers) | treated adopted "
        "| control adopted | uplift (pp) | 95% CI (pp) | true (pp) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for day in result.daily:
        row = day.uplift
        out.append(
            f"| {day.day} | {day.decisions:,} | {day.control_decisions:,} | {day.offers:,} | "
            f"{day.accepted:,} | {_nps_text(day.nps)} ({day.nps_responses:,}) | "
            f"{pct(row.treated_rate)} of {row.treated_customers:,} | "
            f"{pct(row.control_rate)} of {row.control_customers:,} | {pp(row.difference)} | "
            f"{_interval(row)} | {pp(day.true_uplift.difference)} |"
        )
    out += [
        "",
        f"## Uplift: adoption within {config.uplift_window_days} days of the first contact",
        "",
        "| product | treated | control | measured (pp) | 95% CI (pp) | true (pp) | in CI |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for measured, truth in uplift_rows(result):
        out.append(
            f"| {_product_label(measured.product_code)} | {pct(measured.treated_rate)} of "
            f"{measured.treated_customers:,} | {pct(measured.control_rate)} of "
            f"{measured.control_customers:,} | {pp(measured.difference)} | "
            f"{_interval(measured)} | {pp(None if truth is None else truth.difference)} | "
            f"{'yes' if _inside(measured, truth) else 'no'} |"
        )
    out += ["", "## Model versions", ""]
    for r in result.retrainings:
        state = "activated" if r.activated else "not activated"
        out.append(f"- {r.day}: {r.version} ({state}; {r.reason})")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTML


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _section(anchor: str, heading: str, note: str, content: str) -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{_esc(heading)}</h2>{note_html}{content}</section>'


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool], css: str
) -> str:
    num = ' class="num"'
    head = "".join(
        f"<th{num if is_num else ''}>{_esc(h)}</th>"
        for h, is_num in zip(headers, numeric, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{num if is_num else ''}>{_esc(cell)}</td>"
            for cell, is_num in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def html_report(result: SimulationResult) -> str:
    """The results as one self-contained HTML page (see the module docstring)."""
    config = result.config
    title = _title(result)
    facts = {
        "days": f"{config.days:,}",
        "customers": f"{config.customers:,}",
        "control share": pct(config.control_share, 0),
        "offers per visit": f"{config.max_offers}",
        "uplift window": f"{config.uplift_window_days} days",
        "retraining": f"every {config.retrain_every_days} days"
        if config.retrain_every_days
        else "never",
        "seed": f"{config.seed}",
    }
    header = (
        f'<header><h1>{_esc(title)}</h1><dl class="facts">'
        + "".join(
            f'<div class="fact"><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>'
            for k, v in facts.items()
        )
        + "</dl></header>"
    )
    links = [
        ("summary", "Summary"),
        ("conversion", "Conversion"),
        ("nps", "NPS"),
        ("uplift", "Uplift"),
        ("products", "By product"),
        ("versions", "Model versions"),
    ]
    nav = "<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in links) + "</nav>"
    body = [
        header,
        nav,
        "<main>",
        _summary_section(result),
        _conversion_section(result),
        _nps_section(result),
        _uplift_section(result),
        _products_section(result),
        _versions_section(result),
        "</main>",
        "<footer>nbo closed-loop simulation report &middot; self-contained, no external "
        "resources</footer>",
    ]
    return "\n".join(
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


def _summary_section(result: SimulationResult) -> str:
    recovered = result.recovered()
    verdict = (
        '<p class="verdict good">The experiment recovers the planted effect: the true uplift '
        "lies inside the measured interval.</p>"
        if recovered
        else '<p class="verdict bad">The true uplift lies outside the measured interval (or '
        "the experiment had too few customers to give one).</p>"
    )
    rows = "".join(
        f'<tr><th scope="row">{_esc(name)}</th><td>{_esc(value)}</td></tr>'
        for name, value in _summary_rows(result)
    )
    table = f'<div class="scroll"><table class="summary" id="summary-table"><tbody>{rows}</tbody></table></div>'
    note = (
        "Every visit asked the decision API for offers; control-group decisions get none. "
        "Treatment and control groups count customers by their first contact that was not "
        "a cold start."
    )
    return _section("summary", "Summary", note, verdict + table)


def _conversion_section(result: SimulationResult) -> str:
    window = result.config.uplift_window_days
    note = (
        f"Left: share of customers who adopted any product they did not hold within {window} "
        "days of their first contact, as read each evening (customers contacted so far, "
        "adoptions so far), for treated and control customers, and for the treated "
        "customers' counterfactual twins, the same customers never offered anything (the "
        "generator's truth). Right: offers accepted of those made, each day and so far."
    )
    return _section(
        "conversion", "Conversion: treated versus control", note, _chart(result, "conversion")
    )


def _nps_section(result: SimulationResult) -> str:
    nps = result.nps.total
    if nps.responses == 0:
        return _section("nps", "NPS", "", '<p class="empty">No NPS answers were simulated.</p>')
    note = (
        "Net promoter score (% promoters 9-10 minus % detractors 0-6) of the answers given "
        f"each day (dots, sized by answers) and so far (line); {nps.responses:,} answers in all, "
        f"NPS {_nps_text(nps.nps)}."
    )
    return _section("nps", "NPS", note, _chart(result, "nps"))


def _uplift_section(result: SimulationResult) -> str:
    window = result.config.uplift_window_days
    note = (
        f"Adoption of any product within {window} days of the first contact, treated minus "
        "control, in percentage points, as read each evening; the band is its 95% confidence "
        "interval. The true uplift is the treated customers' adoption minus their "
        "counterfactual twins' (same random draws, never offered anything). Dotted lines: a "
        "retrained model swapped in live."
    )
    return _section("uplift", "Uplift against the control group", note, _chart(result, "uplift"))


def _products_section(result: SimulationResult) -> str:
    window = result.config.uplift_window_days
    uplift = _table(
        ["product", "treated", "control", "measured (pp)", "95% CI (pp)", "true (pp)", "in CI"],
        [
            [
                _product_label(measured.product_code),
                f"{pct(measured.treated_rate)} of {measured.treated_customers:,}",
                f"{pct(measured.control_rate)} of {measured.control_customers:,}",
                pp(measured.difference),
                _interval(measured),
                pp(None if truth is None else truth.difference),
                "yes" if _inside(measured, truth) else "no",
            ]
            for measured, truth in uplift_rows(result)
        ],
        [False, True, True, True, True, True, False],
        "uplift",
    )
    conversion = _table(
        ["product", "offers", "accepted", "declined", "not now", "conversion"],
        [
            [
                row.key,
                f"{row.offers:,}",
                f"{row.accepted:,}",
                f"{row.declined:,}",
                f"{row.not_now:,}",
                pct(row.conversion),
            ]
            for row in [*result.conversion.rows, result.conversion.total]
        ],
        [False, True, True, True, True, True],
        "conversion",
    )
    note = (
        f"Uplift over the whole run (adoption within {window} days of the first contact; "
        "products anyone adopted), then the offers made and their answers."
    )
    return _section("products", "By product", note, uplift + "<p></p>" + conversion)


def _versions_section(result: SimulationResult) -> str:
    table = _table(
        ["trained on", "version", "activated", "holdout MAP@3", "gate"],
        [
            [
                str(r.day),
                r.version,
                "yes" if r.activated else "no",
                "" if r.holdout_map3 is None else f"{r.holdout_map3:.3f}",
                r.reason,
            ]
            for r in result.retrainings
        ],
        [False, False, False, True, False],
        "versions",
    )
    return _section("versions", "Model versions", "", table)


# --------------------------------------------------------------------------- charts


def _chart(result: SimulationResult, which: str) -> str:
    """One chart as an ``<figure>`` holding an embedded PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    if which == "conversion":
        alt = _draw_conversion(figure, result)
    elif which == "nps":
        alt = _draw_nps(figure, result)
    else:
        alt = _draw_uplift(figure, result)
    buffer = io.BytesIO()
    # No Software metadata: the PNG then carries no URL at all.
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure id="chart-{which}"><img alt="{_esc(alt)}" '
        f'src="data:image/png;base64,{encoded}"></figure>'
    )


def _x(result: SimulationResult) -> list[int]:
    """Each simulated day's position on a chart's x axis (the days are its ticks)."""
    return list(range(len(result.daily)))


def _values(values: Sequence[float | None], scale: float = 1.0) -> list[float]:
    return [float("nan") if v is None else scale * v for v in values]


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _tidy(axes: Axes, result: SimulationResult) -> None:
    """House look, and the simulated days as the x axis: at most a dozen labelled."""
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    axes.grid(True, color="#e5e7eb", linewidth=0.8)
    axes.set_axisbelow(True)
    days = [day.day for day in result.daily]
    step = max(1, math.ceil(len(days) / 12))
    ticks = list(range(0, len(days), step))
    axes.set_xticks(ticks, [days[i].strftime("%d %b") for i in ticks])
    axes.set_xlim(-0.5, len(days) - 0.5)


def _marker(result: SimulationResult) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3.5} if len(result.daily) <= 45 else {}


def _draw_conversion(figure: Figure, result: SimulationResult) -> str:
    adoption, offers = figure.subplots(1, 2)
    x = _x(result)
    style = _marker(result)
    adoption.plot(
        x,
        _values([d.uplift.treated_rate for d in result.daily], 100),
        color=_TREATED,
        linewidth=2,
        label="treated",
        **style,
    )
    adoption.plot(
        x,
        _values([d.uplift.control_rate for d in result.daily], 100),
        color=_CONTROL,
        linewidth=2,
        label="control group",
        **style,
    )
    adoption.plot(
        x,
        _values([d.true_uplift.control_rate for d in result.daily], 100),
        color=_TRUTH,
        linestyle="--",
        linewidth=1.5,
        label="treated, never offered (truth)",
    )
    adoption.set(ylabel="customers who adopted (%)", title="Adoption of any product, so far")
    adoption.set_ylim(bottom=0)
    adoption.legend(frameon=False, fontsize=9)

    daily = [_ratio(d.accepted, d.offers) for d in result.daily]
    accepted = offered = 0
    so_far: list[float | None] = []
    for d in result.daily:
        accepted, offered = accepted + d.accepted, offered + d.offers
        so_far.append(_ratio(accepted, offered))
    offers.plot(
        x, _values(daily, 100), color=_TREATED, linestyle="none", marker="o", markersize=4,
        alpha=0.6, label="that day",
    )  # fmt: skip
    offers.plot(x, _values(so_far, 100), color=_TREATED, linewidth=2, label="so far")
    offers.set(ylabel="offers accepted (%)", title="Offer conversion (treated customers)")
    offers.set_ylim(bottom=0)
    offers.legend(frameon=False, fontsize=9)
    for axes in (adoption, offers):
        _tidy(axes, result)
    last = result.daily[-1].uplift
    return (
        f"Adoption so far: treated {pct(last.treated_rate)}, control {pct(last.control_rate)}; "
        f"offer conversion {pct(result.conversion.total.conversion)}"
    )


def _draw_nps(figure: Figure, result: SimulationResult) -> str:
    axes = figure.subplots()
    x = _x(result)
    sizes = [6.0 + 2.0 * d.nps_responses for d in result.daily]
    axes.scatter(
        x, _values([d.nps for d in result.daily]), s=sizes, color=_TREATED, alpha=0.45,
        label="that day",
    )  # fmt: skip
    promoters = detractors = answers = 0
    so_far: list[float | None] = []
    for d in result.daily:
        promoters += d.promoters
        detractors += d.detractors
        answers += d.nps_responses
        so_far.append(None if answers == 0 else 100.0 * (promoters - detractors) / answers)
    axes.plot(x, _values(so_far), color=_TREATED, linewidth=2, label="so far")
    axes.axhline(0.0, color=_MUTED, linewidth=0.8)
    axes.set(ylabel="NPS", title="Net promoter score", ylim=(-100, 100))
    axes.legend(frameon=False, fontsize=9)
    _tidy(axes, result)
    return f"NPS {_nps_text(result.nps.total.nps)} from {result.nps.total.responses:,} answers"


def _draw_uplift(figure: Figure, result: SimulationResult) -> str:
    axes = figure.subplots()
    x = _x(result)
    low = _values([d.uplift.ci_low for d in result.daily], 100)
    high = _values([d.uplift.ci_high for d in result.daily], 100)
    axes.fill_between(x, low, high, color=_TREATED, alpha=0.15, linewidth=0, label="95% interval")
    axes.plot(
        x,
        _values([d.uplift.difference for d in result.daily], 100),
        color=_TREATED,
        linewidth=2,
        label="measured: treated minus control",
        **_marker(result),
    )
    axes.plot(
        x,
        _values([d.true_uplift.difference for d in result.daily], 100),
        color=_TRUTH,
        linestyle="--",
        linewidth=2,
        label="true uplift",
    )
    axes.axhline(0.0, color=_MUTED, linewidth=0.8)
    swapped = [r for r in result.retrainings[1:] if r.activated]
    for i, r in enumerate(swapped):
        # Retrained at the end of r.day: the new model serves from the next morning.
        axes.axvline(
            (r.day - result.config.start).days + 0.5,
            color="#374151",
            linestyle=":",
            linewidth=1.4,
            label="model swapped" if i == 0 else None,
        )
    axes.set(ylabel="uplift (percentage points)", title="Uplift against the control group, so far")
    axes.legend(frameon=False, fontsize=9, loc="best")
    _tidy(axes, result)
    total = result.uplift.total
    return (
        f"Uplift {pp(total.difference) or 'n/a'} points (95% CI {_interval(total) or 'n/a'}), "
        f"true {pp(result.true_difference()) or 'n/a'} points"
    )
