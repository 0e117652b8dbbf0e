"""``nbo simulate``: a closed-loop simulation of nbo on the synthetic bank."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from service.cli.context import console, err_console, progress

if TYPE_CHECKING:
    from service.simulation.run import SimulationResult

simulate_app = typer.Typer(help="Closed-loop simulation on the synthetic bank.")


@simulate_app.callback(invoke_without_command=True)
def simulate(
    days: Annotated[int, typer.Option(min=1, help="Days to simulate.")] = 60,
    customers: Annotated[
        int, typer.Option(min=50, help="Customers of the synthetic bank.")
    ] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed, the same run.")] = 0,
    start: Annotated[
        str, typer.Option(help="First simulated day (the bank's history ends the day before).")
    ] = "2026-01-01",
    visits_per_month: Annotated[
        float, typer.Option(min=0.0, help="Branch visits per customer per month.")
    ] = 0.5,
    control_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Control-group share (production's default is 5%; more narrows the interval).",
        ),
    ] = 0.3,
    max_offers: Annotated[int, typer.Option(min=1, max=10, help="Offers asked per visit.")] = 3,
    retrain_every: Annotated[
        int, typer.Option(min=0, help="Days between retrainings (0: never).")
    ] = 7,
    window_days: Annotated[
        int, typer.Option(min=1, help="Uplift window after the first contact, in days.")
    ] = 30,
    offer_effect: Annotated[
        float,
        typer.Option(
            min=0.0,
            help=(
                "Scales the chance that a customer accepts an offer (1: their true "
                "propensity; 0: offers are never accepted)."
            ),
        ),
    ] = 1.0,
    work: Annotated[
        Path | None,
        typer.Option(
            help="Keep the bank, database and models in this (empty) folder; default: a "
            "temporary folder, removed at the end."
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Also write a report here, in the format its suffix names: .html (or .htm) "
            "a self-contained page with charts over the simulated days, .md Markdown, .json "
            "the figures. Any other suffix is refused before the run starts (exit 2). An "
            "existing file is replaced, and the command says so.",
        ),
    ] = None,
) -> None:
    """Generate a synthetic bank, serve it for DAYS simulated days and measure the results.

    Every day some customers visit their branch and ask the decision API for offers; they
    answer by the ground truth, NPS answers and every customer's adoptions flow back
    through the API, and the model retrains weekly. The end reports conversion, uplift
    against the control group next to the true uplift the generator planted, and NPS.
    """
    from models.synthetic import OfferResponse
    from service.simulation.report import write_report
    from service.simulation.run import SimulationConfig, run_simulation

    if report is not None:
        _check_report_path(report)
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        err_console.print(f"--work {work} is not empty: give a new or empty folder")
        raise typer.Exit(code=2)
    try:
        first_day = dt.date.fromisoformat(start)
    except ValueError:
        err_console.print(f"--start {start!r} is not a date: give it as YYYY-MM-DD")
        raise typer.Exit(code=2) from None
    try:
        config = SimulationConfig(
            customers=customers,
            days=days,
            seed=seed,
            start=first_day,
            visits_per_month=visits_per_month,
            control_share=control_share,
            max_offers=max_offers,
            retrain_every_days=retrain_every,
            uplift_window_days=window_days,
            offer_response=OfferResponse(acceptance_multiplier=offer_effect),
        )
    except ValueError as exc:
        err_console.print(f"invalid settings: {exc}")
        raise typer.Exit(code=2) from None
    with progress() as bar:
        task = bar.add_task("starting", total=days)

        def advance(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=min(done, days))

        if work is None:
            with tempfile.TemporaryDirectory(prefix="nbo-simulation-") as folder:
                result = run_simulation(config, Path(folder), progress=advance)
        else:
            result = run_simulation(config, work, progress=advance)
    _print(result)
    if report is not None:
        try:
            replaced = write_report(result, report)
        except OSError as exc:
            err_console.print(f"cannot write the report {report}: {exc.strerror or exc}")
            raise typer.Exit(code=2) from None
        console.print(f"replaced {report}" if replaced else f"report: {report}")


def _check_report_path(report: Path) -> None:
    """Refuse, before a run that may take minutes, a report that could not be written."""
    from service.simulation.report import report_format

    try:
        report_format(report)
    except ValueError as exc:
        err_console.print(f"--report {exc}")
        raise typer.Exit(code=2) from None
    if report.is_dir():
        err_console.print(
            f"--report {report} is a folder: give a file name, e.g. {report}/simulation.html"
        )
        raise typer.Exit(code=2)
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err_console.print(f"--report {report}: cannot create its folder ({exc.strerror or exc})")
        raise typer.Exit(code=2) from None
    if not os.access(report.parent, os.W_OK) or (
        report.exists() and not os.access(report, os.W_OK)
    ):
        err_console.print(f"--report {report}: not writable")
        raise typer.Exit(code=2)


def _print(result: SimulationResult) -> None:
    from service.simulation.report import pct as _pct
    from service.simulation.report import pp as _pp
    from service.simulation.report import uplift_rows

    config = result.config
    period = config.period
    total = result.conversion.total
    conversion = Table(title=f"offers and answers, {period.start} to {period.end}")
    for column in ("product", "offers", "accepted", "declined", "not now", "conversion"):
        conversion.add_column(column, justify="left" if column == "product" else "right")
    for row in [*result.conversion.rows, total]:
        conversion.add_row(
            row.key,
            f"{row.offers:,}",
            f"{row.accepted:,}",
            f"{row.declined:,}",
            f"{row.not_now:,}",
            _pct(row.conversion),
        )
    console.print(conversion)

    uplift = Table(
        title=(
            f"uplift: adoption within {config.uplift_window_days} days of the first contact, "
            f"treated vs control ({_pct(config.control_share, 0)} of customers), in points"
        )
    )
    for column in ("product", "treated", "control", "measured", "95% CI", "true", "in CI"):
        uplift.add_column(column, justify="left" if column == "product" else "right")
    for measured, truth in uplift_rows(result):
        true_value = None if truth is None else truth.difference
        inside = (
            measured.ci_low is not None
            and measured.ci_high is not None
            and true_value is not None
            and measured.ci_low <= true_value <= measured.ci_high
        )
        uplift.add_row(
            "any product" if measured.product_code == "(any)" else measured.product_code,
            f"{_pct(measured.treated_rate)} ({measured.treated_customers:,})",
            f"{_pct(measured.control_rate)} ({measured.control_customers:,})",
            _pp(measured.difference),
            "" if measured.ci_low is None else f"{_pp(measured.ci_low)}..{_pp(measured.ci_high)}",
            _pp(true_value),
            "[green]yes[/green]" if inside else "[red]no[/red]",
            end_section=measured.product_code == "(any)",
        )
    console.print(uplift)

    nps = result.nps.total
    versions = [r for r in result.retrainings if r.activated]
    lines = [
        f"{result.visits:,} branch visits ({result.decisions_with_offers:,} with offers), "
        f"{total.accepted:,} offers accepted of {total.presented:,} ({_pct(total.conversion)})",
        f"adoptions: {result.adoptions_offer:,} through offers, "
        f"{result.adoptions_organic:,} organic (treated and control alike)",
        f"NPS {'n/a' if nps.nps is None else f'{nps.nps:+.1f}'} from {nps.responses:,} answers "
        f"({nps.promoters:,} promoters, {nps.detractors:,} detractors)",
        f"model versions: {len(result.retrainings)} trained, {len(versions)} activated live",
        f"uplift (any product): measured {_pp(result.uplift.total.difference)} pp, "
        f"true {_pp(result.true_difference())} pp: "
        + (
            "the experiment recovers the planted effect."
            if result.recovered()
            else "the true value is outside the interval."
        ),
        f"{result.seconds:.0f} s",
    ]
    for line in lines:
        console.print(line)
