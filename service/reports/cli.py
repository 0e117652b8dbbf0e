"""``nbo report``: conversion, uplift, NPS and CSAT reports as tables or CSV.

Each report covers an explicit, inclusive range of UTC days (``--start``, ``--end``).
``--csv FILE`` also writes the rows (total last) to a file; ``--format csv`` prints them
as CSV instead of a table, for piping.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import Engine

from service.cli.context import check_output, open_engine
from service.reports import measures as reports
from service.reports.measures import ConversionDimension, FeedbackDimension, Period

report_app = typer.Typer(help="Reports over an explicit date range.", no_args_is_help=True)

T = TypeVar("T")


def _console() -> Console:
    # Made per command, not at import: the width then follows the terminal (or COLUMNS).
    return Console()


def _day(value: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD)", param_hint=option
        ) from None


def _period(start: str, end: str) -> Period:
    first, last = _day(start, "--start"), _day(end, "--end")
    if last < first:
        raise typer.BadParameter(f"{last} is before --start {first}", param_hint="--end")
    return Period(first, last)


def _run(report: Callable[[Engine], T]) -> T:
    with open_engine() as engine:
        return report(engine)


StartOption = Annotated[str, typer.Option(help="First day (UTC), YYYY-MM-DD.")]
EndOption = Annotated[str, typer.Option(help="Last day (UTC, included), YYYY-MM-DD.")]
FormatOption = Annotated[
    Literal["table", "csv"],
    typer.Option("--format", help="table, or csv on standard output."),
]


# --------------------------------------------------------------------------- formatting


def _number(value: float | None, pattern: str = "{:,.0f}") -> str:
    return "" if value is None else pattern.format(value)


def _share(value: float | None) -> str:
    return _number(value, "{:.1%}")


def _write_csv(rows: Sequence[Any], out: TextIO) -> None:
    fields = [field.name for field in dataclasses.fields(rows[0])]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(dataclasses.asdict(row))


def _emit(table: Table, rows: Sequence[Any], csv_path: Path | None, fmt: str) -> None:
    """Print ``table`` (or ``rows`` as CSV) and write ``rows`` to ``csv_path`` if given."""
    if csv_path is not None:
        check_output(csv_path, "--csv")
        with csv_path.open("w", newline="", encoding="utf-8") as out:
            _write_csv(rows, out)
    if fmt == "csv":
        _write_csv(rows, sys.stdout)
        return
    console = _console()
    console.print(table)
    if csv_path is not None:
        console.print(f"wrote {len(rows):,} rows to {csv_path}", markup=False, highlight=False)


def _conversion_table(title: str, key: str, rows: Sequence[reports.ConversionRow]) -> Table:
    table = Table(title=title)
    table.add_column(key)
    for column in (
        "offers",
        "presented",
        "accepted",
        "declined",
        "not now",
        "conversion",
        "adopted",
        "median days",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            escape(row.key),
            f"{row.offers:,}",
            f"{row.presented:,}",
            f"{row.accepted:,}",
            f"{row.declined:,}",
            f"{row.not_now:,}",
            _share(row.conversion),
            f"{row.adopted:,}",
            _number(row.median_days_to_adoption, "{:.1f}"),
            end_section=row.key == reports.TOTAL_KEY,
        )
    return table


# --------------------------------------------------------------------------- commands


@report_app.command("conversion")
def conversion_cmd(
    start: StartOption,
    end: EndOption,
    by: Annotated[ConversionDimension, typer.Option(help="Group by this.")] = "product",
    adoption_window_days: Annotated[
        int, typer.Option(min=0, help="An offer counts as adopted within this many days.")
    ] = 90,
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write the rows as CSV here (the total row last)."),
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """Offers, outcomes, conversion (accepted / presented) and adoption by a dimension."""
    period = _period(start, end)
    report = _run(
        lambda engine: reports.conversion(
            engine, period, by=by, adoption_window_days=adoption_window_days
        )
    )
    rows = [*report.rows, report.total]
    title = (
        f"conversion by {by}, {period.start} to {period.end} "
        f"(adoption within {adoption_window_days} days)"
    )
    _emit(_conversion_table(title, by, rows), rows, csv_path, fmt)


@report_app.command("uplift")
def uplift_cmd(
    start: StartOption,
    end: EndOption,
    window_days: Annotated[
        int, typer.Option(min=0, help="Adoptions count within this many days of first contact.")
    ] = 30,
    confidence: Annotated[
        float, typer.Option(help="Confidence level of the intervals, between 0 and 1.")
    ] = 0.95,
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write the rows as CSV here (the '(any)' total last)."),
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """Adoption by customers who got model offers versus the control group, per product."""
    period = _period(start, end)
    if not 0.0 < confidence < 1.0:
        raise typer.BadParameter(f"{confidence} is not between 0 and 1", param_hint="--confidence")
    report = _run(
        lambda engine: reports.uplift(
            engine, period, window_days=window_days, confidence=confidence
        )
    )
    rows = [*report.rows, report.total]
    level = f"{100 * confidence:g}%"
    table = Table(
        title=f"uplift against the control group, contacts {period.start} to {period.end} "
        f"(adoption within {window_days} days, {level} intervals)"
    )
    table.add_column("product")
    for column in (
        "treated",
        "adopted",
        "rate",
        "control",
        "adopted",
        "rate",
        "difference (points)",
        f"{level} CI",
        "incremental adoptions",
        "incremental value",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            escape(row.product_code),
            f"{row.treated_customers:,}",
            f"{row.treated_adopters:,}",
            _share(row.treated_rate),
            f"{row.control_customers:,}",
            f"{row.control_adopters:,}",
            _share(row.control_rate),
            _number(None if row.difference is None else 100 * row.difference, "{:+.1f}"),
            ""
            if row.ci_low is None or row.ci_high is None
            else f"{100 * row.ci_low:+.1f} to {100 * row.ci_high:+.1f}",
            f"{row.incremental_adoptions:,.1f}",
            f"{row.incremental_value:,.0f}",
            end_section=row.product_code == reports.ANY_PRODUCT,
            style="bold" if row.significant else None,
        )
    _emit(table, rows, csv_path, fmt)
    if fmt == "table":
        console = _console()
        for row in rows:
            console.print(
                f"{row.product_code}: {row.verdict}", markup=False, highlight=False, soft_wrap=True
            )


@report_app.command("nps")
def nps_cmd(
    start: StartOption,
    end: EndOption,
    by: Annotated[FeedbackDimension, typer.Option(help="Group by this.")] = "branch",
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write the rows as CSV here (the total row last)."),
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """Net promoter score (% promoters 9-10 minus % detractors 0-6) by a dimension."""
    period = _period(start, end)
    report = _run(lambda engine: reports.nps(engine, period, by=by))
    rows = [*report.rows, report.total]
    table = Table(title=f"NPS by {by}, {period.start} to {period.end}")
    table.add_column(by)
    for column in ("responses", "promoters", "passives", "detractors", "NPS"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            escape(row.key),
            f"{row.responses:,}",
            f"{row.promoters:,}",
            f"{row.passives:,}",
            f"{row.detractors:,}",
            _number(row.nps, "{:+.1f}"),
            end_section=row.key == reports.TOTAL_KEY,
        )
    _emit(table, rows, csv_path, fmt)


@report_app.command("csat")
def csat_cmd(
    start: StartOption,
    end: EndOption,
    by: Annotated[FeedbackDimension, typer.Option(help="Group by this.")] = "branch",
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write the rows as CSV here (the total row last)."),
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """Customer satisfaction (1-5): mean score and share of 4s and 5s by a dimension."""
    period = _period(start, end)
    report = _run(lambda engine: reports.csat(engine, period, by=by))
    rows = [*report.rows, report.total]
    table = Table(title=f"CSAT by {by}, {period.start} to {period.end}")
    table.add_column(by)
    for column in ("responses", "mean", "satisfied (4-5)"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            escape(row.key),
            f"{row.responses:,}",
            _number(row.mean, "{:.2f}"),
            _share(row.satisfied_share),
            end_section=row.key == reports.TOTAL_KEY,
        )
    _emit(table, rows, csv_path, fmt)


def _figures_table(title: str, columns: Sequence[tuple[str, reports.DayFigures]]) -> Table:
    table = Table(title=title)
    table.add_column("")
    for name, _ in columns:
        table.add_column(escape(name), justify="right")
    lines: list[tuple[str, Callable[[reports.DayFigures], str]]] = [
        ("offers", lambda f: f"{f.offers:,}"),
        ("presented", lambda f: f"{f.presented:,}"),
        ("accepted", lambda f: f"{f.accepted:,}"),
        ("conversion", lambda f: _share(f.conversion)),
        ("NPS", lambda f: _number(f.nps, "{:+.1f}")),
        ("NPS answers", lambda f: f"{f.nps_responses:,}"),
        ("CSAT", lambda f: _number(f.csat_mean, "{:.2f}")),
        ("CSAT answers", lambda f: f"{f.csat_responses:,}"),
    ]
    for label, show in lines:
        table.add_row(label, *(show(figures) for _, figures in columns))
    return table


DayOption = Annotated[
    str | None, typer.Option(help="The day (UTC), YYYY-MM-DD; default yesterday.")
]


def _chosen_day(day: str | None) -> dt.date:
    if day is None:
        return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    return _day(day, "--day")


@report_app.command("staff")
def staff_cmd(
    staff_id: Annotated[str, typer.Argument(help="The staff member's id.")],
    day: DayOption = None,
) -> None:
    """A staff member's day beside their branch and the bank, and their offers by product."""
    chosen = _chosen_day(day)
    daily = _run(lambda engine: reports.staff_daily(engine, staff_id, chosen))
    branch = f"branch {daily.branch_id}" if daily.branch_id else "branch (none)"
    console = _console()
    console.print(
        _figures_table(
            f"{staff_id} on {chosen}",
            [(staff_id, daily.staff), (branch, daily.branch), ("bank", daily.bank)],
        )
    )
    console.print(_conversion_table(f"{staff_id}'s offers by product", "product", daily.by_product))


@report_app.command("branch")
def branch_cmd(
    branch_id: Annotated[str, typer.Argument(help="The branch's id.")],
    day: DayOption = None,
) -> None:
    """A branch's day: beside the bank, per staff member, per product, and its last 7 days."""
    chosen = _chosen_day(day)
    daily = _run(lambda engine: reports.branch_daily(engine, branch_id, chosen))
    console = _console()
    console.print(
        _figures_table(
            f"branch {branch_id} on {chosen}",
            [(branch_id, daily.branch), ("bank", daily.bank), *daily.staff],
        )
    )
    console.print(_conversion_table("offers by product", "product", daily.by_product))
    console.print(
        _figures_table(
            f"branch {branch_id}, last {len(daily.trend)} days",
            [(f"{d:%a %d %b}", figures) for d, figures in daily.trend],
        )
    )
