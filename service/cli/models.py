"""``nbo train``, ``evaluate``, ``score``, ``rules`` and ``models``: learning a model
version, measuring it, using it offline, and the registry that holds the versions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from service.cli.context import (
    console,
    err_console,
    load_settings,
    open_session,
    progress,
    ready_engine,
)
from service.settings import Settings

rules_app = typer.Typer(
    help="Adoption-sequence rules of a model version; `nbo rules mine` explores a basket file."
)
models_app = typer.Typer(
    help="The model registry: list, show, promote, roll back.", no_args_is_help=True
)


AsOfOption = Annotated[
    str | None,
    typer.Option(help="End of history to learn from (default: the day after the last adoption)."),
]
HorizonOption = Annotated[int, typer.Option(min=7, help="Propensity horizon in days.")]
TruthOption = Annotated[
    Path | None,
    typer.Option(help="A synthetic bank folder (from `nbo generate`): adds the oracle row."),
]
ForcedSalesOption = Annotated[
    str | None,
    typer.Option(
        help=(
            "Accepted offers as training labels: keep (positives, the default) or drop "
            "(left out: a push, not the customer's own propensity). Default: "
            "NBO_FORCED_SALES, else keep."
        ),
    ),
]


def _train_config(forced_sales: str | None, settings: Settings) -> Any:
    from models.propensity import TrainConfig

    choice = forced_sales or settings.forced_sales
    if choice not in ("keep", "drop"):
        err_console.print(f"--forced-sales must be keep or drop, not {choice!r}")
        raise typer.Exit(code=2)
    return TrainConfig(forced_sales=choice)  # type: ignore[arg-type]  # checked above: keep or drop


@contextmanager
def _stage_progress() -> Iterator[Callable[[str, float], None]]:
    with progress(counted=False) as bar:
        task = bar.add_task("loading the bank", total=1.0)

        def advance(stage: str, fraction: float) -> None:
            bar.update(task, description=stage, completed=fraction)

        yield advance


def _comparison_table(holdout: Any) -> Table:
    table = Table(
        title=f"holdout: trained before {holdout.cutoff}, measured on the next "
        f"{holdout.horizon_days} days ({int(holdout.comparison['n_customers'].iloc[0]):,} "
        "customers with an adoption)"
    )
    columns = ("MAP@1", "MAP@3", "MAP@5", "NDCG@3", "hit@3")
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in holdout.comparison.iterrows():
        table.add_row(str(name), *(f"{row[c]:.4f}" if c in row else "" for c in columns))
    return table


def _parse_day(value: str | None, option: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        err_console.print(f"{option}: {value!r} is not a date (YYYY-MM-DD)")
        raise typer.Exit(code=2) from None


def train(
    as_of: AsOfOption = None,
    horizon_days: HorizonOption = 90,
    truth: TruthOption = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the holdout's HTML report here.")
    ] = None,
    forced_sales: ForcedSalesOption = None,
) -> None:
    """Evaluate on a holdout, train on all history, register a model version (activated if not worse).

    The new version is compared with the active one on the same holdout. Recorded offer
    outcomes are learnt from: a recent decline of a product is a feature, and accepted
    offers are positives (unless --forced-sales drop).
    """
    from service.data.bank import load_bank
    from service.training import train_and_register, write_evaluation_report

    settings = load_settings()
    config = _train_config(forced_sales, settings)
    engine = ready_engine(settings)
    day = _parse_day(as_of, "--as-of")
    with _stage_progress() as advance:
        outcome = train_and_register(
            engine,
            artifacts_dir=settings.artifacts_dir,
            as_of=day,
            horizon_days=horizon_days,
            tolerance=settings.promotion_tolerance,
            config=config,
            truth_dir=truth,
            progress=advance,
        )
        if report is not None:
            advance("writing the report", 1.0)
            write_evaluation_report(outcome.holdout, report, data=load_bank(engine))
    console.print(_comparison_table(outcome.holdout))
    state = "active" if outcome.activated else outcome.version.status
    console.print(f"model version {outcome.version.version}: {state} ({outcome.reason})")
    if report is not None:
        console.print(f"report: {report}")


def evaluate(
    report: Annotated[Path, typer.Option(help="Where to write the HTML report.")] = Path(
        "data/evaluation.html"
    ),
    as_of: AsOfOption = None,
    horizon_days: HorizonOption = 90,
    truth: TruthOption = None,
    bank: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Evaluate a bank folder (products, customers, adoptions and an optional "
                "outcomes file) instead of the database; a synthetic one adds its oracle."
            ),
        ),
    ] = None,
    forced_sales: ForcedSalesOption = None,
) -> None:
    """Temporal holdout comparison of popularity, rules, LightGBM and the served blend, as HTML.

    Trains before a cutoff and measures on the adoptions after it (with --truth, also the
    oracle of a synthetic bank). When the bank has offer outcomes, the blend is also
    trained without outcome features, to show what learning from outcomes adds.
    """
    from models.data import BankData
    from service.data.bank import load_bank
    from service.training import evaluate as run_evaluation
    from service.training import write_evaluation_report

    settings = load_settings()
    config = _train_config(forced_sales, settings)
    day = _parse_day(as_of, "--as-of")
    if bank is not None and truth is None and (bank / "truth" / "model.json").exists():
        truth = bank
    with _stage_progress() as advance:
        data = BankData.from_folder(bank) if bank is not None else load_bank(ready_engine(settings))
        holdout = run_evaluation(
            data,
            as_of=day,
            horizon_days=horizon_days,
            truth_dir=truth,
            config=config,
            progress=advance,
            outcome_comparison=True,
        )
        advance("writing the report", 1.0)
        write_evaluation_report(holdout, report, data=data)
    console.print(_comparison_table(holdout))
    console.print(f"report: {report}")


def score(
    out: Annotated[Path, typer.Option(help="Output file: .csv, .csv.gz or .parquet.")],
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Keep each customer's K best products.")
    ] = None,
    product: Annotated[
        str | None,
        typer.Option(help="One product's ranking over every customer who can take it."),
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option(
            help="Score as of this day (default: the later of the model's as-of "
            "and the day after the last adoption)."
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Model version (default: the active one).")
    ] = None,
) -> None:
    """Score every customer with a model version and write the ranked offers."""
    from service.scoring import ScoringError, score_bank

    settings = load_settings()
    engine = ready_engine(settings)
    try:
        with _stage_progress() as advance:
            result = score_bank(
                engine,
                out=out,
                version=version,
                product=product,
                top_k=top_k,
                as_of=_parse_day(as_of, "--as-of"),
                progress=advance,
            )
    except ScoringError as exc:
        err_console.print(str(exc), markup=False)
        raise typer.Exit(code=1) from None
    table = Table(title=f"scored with model version {result.version} as of {result.as_of}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("customers scored", f"{result.customers:,}")
    table.add_row("rows written", f"{result.rows:,}")
    table.add_row("file", str(out))
    console.print(table)


@rules_app.callback(invoke_without_command=True)
def rules_list(
    ctx: typer.Context,
    version: Annotated[
        str | None, typer.Option(help="Model version (default: the active one).")
    ] = None,
    consequent: Annotated[
        list[str] | None, typer.Option(help="Only rules leading to this product (repeatable).")
    ] = None,
    min_confidence: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.0,
    min_lift: Annotated[float, typer.Option(min=0.0)] = 0.0,
    ordered: Annotated[
        bool | None, typer.Option("--ordered/--unordered", help="Only ordered / unordered rules.")
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="Write the rules as CSV here.")] = None,
    top: Annotated[int, typer.Option(min=0, help="Rules to print.")] = 30,
) -> None:
    """List the adoption-sequence rules of a model version (`nbo rules mine` explores baskets)."""
    if ctx.invoked_subcommand is not None:
        return
    from service.scoring import ScoringError, model_rules

    settings = load_settings()
    try:
        version_id, rules = model_rules(
            ready_engine(settings),
            version=version,
            consequents=consequent or None,
            min_confidence=min_confidence,
            min_lift=min_lift,
            ordered=ordered,
        )
    except ScoringError as exc:
        err_console.print(str(exc), markup=False)
        raise typer.Exit(code=1) from None
    if csv is not None:
        rules.to_csv(csv, index=False)
    table = Table(title=f"{len(rules):,} rules of model version {version_id}")
    for column in (
        "if the customer holds",
        "then",
        "confidence",
        "lift",
        "customers",
        "median days",
    ):
        table.add_column(column)
    for row in rules.head(top).itertuples(index=False):
        table.add_row(
            row.antecedent,
            row.consequent,
            f"{row.confidence:.3f}",
            f"{row.lift:.2f}",
            f"{row.n_customers:,}",
            "" if row.median_days != row.median_days else f"{row.median_days:.0f}",
        )
    console.print(table)
    if csv is not None:
        console.print(f"wrote {len(rules):,} rules to {csv}")


@rules_app.command("mine")
def rules_mine(
    file: Annotated[Path, typer.Argument(help="Basket CSV: transaction_id,item rows.")],
    min_support: Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum support.")] = 0.01,
    min_confidence: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Minimum confidence.")
    ] = 0.5,
    min_len: Annotated[
        int, typer.Option(min=1, help="Minimum items in antecedent + consequent.")
    ] = 1,
    max_len: Annotated[int | None, typer.Option(min=1, help="Maximum items in a rule.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the rules as CSV here.")] = None,
    top: Annotated[int, typer.Option(min=0, help="Rules to print (by lift).")] = 20,
) -> None:
    """Mine single-consequent rules from a basket file (basket mode, arules semantics)."""
    from models.rules import mine_basket_rules, read_baskets

    try:
        baskets = read_baskets(file)
        rules = mine_basket_rules(
            baskets,
            min_support=min_support,
            min_confidence=min_confidence,
            min_len=min_len,
            max_len=max_len,
        )
    except (ValueError, OSError) as exc:
        err_console.print(f"{file}: {exc}", markup=False)
        raise typer.Exit(code=1) from None
    table = rules.assign(antecedent=rules["antecedent"].map(lambda a: "{" + ", ".join(a) + "}"))
    if out is not None:
        table.to_csv(out, index=False)
    shown = Table(
        title=f"{len(rules):,} rules from {baskets['transaction_id'].nunique():,} baskets "
        f"(support >= {min_support}, confidence >= {min_confidence})"
    )
    for column in ("antecedent", "consequent", "support", "confidence", "lift", "count"):
        shown.add_column(column)
    for row in table.head(top).itertuples(index=False):
        shown.add_row(
            str(row.antecedent),
            str(row.consequent),
            f"{row.support:.4f}",
            f"{row.confidence:.3f}",
            f"{row.lift:.2f}",
            f"{row.count:,}",
        )
    console.print(shown)
    if out is not None:
        console.print(f"wrote {len(rules):,} rules to {out}")


def _version_table(rows: list[Any]) -> Table:
    table = Table()
    for column in ("version", "status", "as_of", "horizon", "created", "gate metric"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.version,
            row.status,
            row.as_of.isoformat(),
            f"{row.horizon_days} d",
            f"{row.created_at:%Y-%m-%d %H:%M}" if row.created_at else "",
            str((row.metrics or {}).get("gate", {}).get("reason", "")),
        )
    return table


@models_app.command("list")
def models_list() -> None:
    """List model versions, newest first."""
    from service.data import registry

    with open_session() as session:
        rows = registry.list_versions(session)
        if not rows:
            console.print("no model versions yet")
            return
        console.print(_version_table(rows))


@models_app.command("show")
def models_show(version: Annotated[str, typer.Argument(help="Version id.")]) -> None:
    """Show one version: status, data window, parameters, holdout metrics."""
    from service.data import registry

    with open_session() as session:
        try:
            row = registry.get_version(session, version)
        except registry.RegistryError as exc:
            err_console.print(str(exc), markup=False)
            raise typer.Exit(code=1) from None
        console.print_json(registry.dumps(registry.describe(row)))


@models_app.command("promote")
def models_promote(version: Annotated[str, typer.Argument(help="Version id.")]) -> None:
    """Make VERSION active by hand, whatever the gate said; the active one retires."""
    from service.data import registry

    with open_session() as session:
        try:
            row = registry.get_version(session, version)
            previous = registry.activate(session, row)
        except registry.RegistryError as exc:
            err_console.print(str(exc), markup=False)
            raise typer.Exit(code=1) from None
        retired = f" ({previous.version} retired)" if previous else ""
        console.print(f"{row.version} is active{retired}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Re-activate the version that was active before the current one."""
    from service.data import registry

    with open_session() as session:
        try:
            now_active, retired = registry.rollback(session)
        except registry.RegistryError as exc:
            err_console.print(str(exc), markup=False)
            raise typer.Exit(code=1) from None
        console.print(f"{now_active.version} is active again ({retired.version} retired)")
