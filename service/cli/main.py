"""The ``nbo`` command line."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from service.cli.keys import keys_app
from service.data import db
from service.data.importing import (
    ImportFailed,
    ImportSummary,
    SnapshotOptions,
    count_rows,
    import_adoptions,
    import_customers,
    import_products,
    import_snapshots,
)
from service.reports.cli import report_app
from service.settings import Settings, export_workers
from service.simulation.cli import simulate_app

app = typer.Typer(
    name="nbo",
    help="nbo: next-best-offer recommendations for banks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema: apply or revert migrations.", no_args_is_help=True)
import_app = typer.Typer(
    help="Load the bank's data (CSV or Parquet). An import loads whole or not at all.",
    no_args_is_help=True,
)
rules_app = typer.Typer(
    help="Adoption-sequence rules of a model version; `nbo rules mine` explores a basket file."
)
models_app = typer.Typer(
    help="The model registry: list, show, promote, roll back.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(rules_app, name="rules")
app.add_typer(models_app, name="models")
app.add_typer(import_app, name="import")
app.add_typer(keys_app, name="keys")
app.add_typer(report_app, name="report")
app.add_typer(simulate_app, name="simulate")

console = Console()
err_console = Console(stderr=True)


def _settings() -> Settings:
    return Settings()


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _engine_ready(settings: Settings) -> Any:
    engine = db.engine_from_settings(settings)
    if not db.has_schema(engine):
        # Migrations are cheap and idempotent; a fresh SQLite file needs them before anything else.
        db.upgrade(settings.resolved_database_url)
    return engine


def _print_summary(summary: ImportSummary) -> None:
    table = Table(title=f"import {summary.kind}: {summary.file}", show_header=False)
    table.add_row("rows read", f"{summary.rows_read:,}")
    table.add_row("added", f"{summary.added:,}")
    table.add_row("updated", f"{summary.updated:,}")
    table.add_row("unchanged", f"{summary.unchanged:,}")
    table.add_row("rejected", f"{summary.rejected:,}")
    for key, value in summary.extra.items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.rows_per_second:,.0f} rows/s)")
    console.print(table)


def _run_import(
    kind: str, path: Path, run: Callable[[Callable[[int], None]], ImportSummary]
) -> None:
    try:
        with _progress(f"import {kind}", count_rows(path) if path.exists() else None) as advance:
            summary = run(advance)
    except ImportFailed as exc:
        err_console.print(f"[red]import {kind} failed; nothing was written.[/red]")
        for problem in exc.problems:
            err_console.print(f"  {problem}", markup=False, highlight=False)
        if exc.truncated:
            err_console.print("  (more problems not shown)")
        raise typer.Exit(code=1) from None
    _print_summary(summary)


FileArg = Annotated[Path, typer.Argument(help="CSV (optionally .gz) or Parquet file.")]


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    settings = _settings()
    db.upgrade(settings.resolved_database_url, revision)
    engine = db.engine_from_settings(settings)
    console.print(f"database at revision {db.current_revision(engine)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, or 'base' to drop everything.")],
) -> None:
    """Revert migrations down to REVISION."""
    settings = _settings()
    db.downgrade(settings.resolved_database_url, revision)
    console.print(f"database at revision {db.current_revision(db.engine_from_settings(settings))}")


@db_app.command("current")
def db_current() -> None:
    """Show the database URL's backend and its schema revision."""
    settings = _settings()
    engine = db.engine_from_settings(settings)
    console.print(
        f"{engine.url.render_as_string(hide_password=True)}: {db.current_revision(engine)}"
    )


@import_app.command("products")
def import_products_cmd(file: FileArg) -> None:
    """Import the product catalogue: product_code,name,category,value[,business_weight,active,
    min_age,max_age,segments,requires,excludes] (lists |-separated)."""
    settings = _settings()
    engine = _engine_ready(settings)
    _run_import(
        "products",
        file,
        lambda advance: import_products(
            engine,
            file,
            chunk_rows=settings.import_chunk_rows,
            max_errors=settings.import_max_errors,
            progress=advance,
        ),
    )


@import_app.command("customers")
def import_customers_cmd(
    file: FileArg,
    categorical: Annotated[
        list[str] | None, typer.Option(help="Attribute column to import as text even if numeric.")
    ] = None,
    numeric: Annotated[
        list[str] | None, typer.Option(help="Attribute column that must be numeric.")
    ] = None,
) -> None:
    """Import customers: customer_id[,segment,branch_id,joined_at,birth_date] plus any
    attribute columns (numeric or categorical, whatever the bank has)."""
    settings = _settings()
    engine = _engine_ready(settings)
    _run_import(
        "customers",
        file,
        lambda advance: import_customers(
            engine,
            file,
            chunk_rows=settings.import_chunk_rows,
            max_errors=settings.import_max_errors,
            categorical=categorical or (),
            numeric=numeric or (),
            max_attributes=settings.max_attributes,
            progress=advance,
        ),
    )


@import_app.command("adoptions")
def import_adoptions_cmd(file: FileArg) -> None:
    """Import adoptions: customer_id,product_code,adopted_at[,closed_at] (dates YYYY-MM-DD)."""
    settings = _settings()
    engine = _engine_ready(settings)
    _run_import(
        "adoptions",
        file,
        lambda advance: import_adoptions(
            engine,
            file,
            chunk_rows=settings.import_chunk_rows,
            max_errors=settings.import_max_errors,
            bulk_rows=settings.import_bulk_rows,
            progress=advance,
        ),
    )


@import_app.command("snapshots")
def import_snapshots_cmd(
    file: FileArg,
    products: Annotated[
        list[str],
        typer.Option(
            "--products",
            help="Product flag column name or glob pattern (repeatable), e.g. 'ind_*_ult1'.",
        ),
    ],
    id_column: Annotated[str, typer.Option(help="Column with the customer id.")] = "customer_id",
    date_column: Annotated[
        str, typer.Option(help="Column with the snapshot date.")
    ] = "snapshot_date",
    map_: Annotated[
        list[str] | None,
        typer.Option("--map", help="COLUMN=PRODUCT_CODE: the product a flag column stands for."),
    ] = None,
    create_products: Annotated[
        bool, typer.Option(help="Add product codes missing from the catalogue (value 0).")
    ] = False,
) -> None:
    """Import monthly holding snapshots (one row per customer per month, one 0/1 column per
    product): 0->1 flips become adoptions, 1->0 flips closures."""
    mapping: dict[str, str] = {}
    for item in map_ or ():
        column, sep, code = item.partition("=")
        if not sep or not column or not code:
            err_console.print(f"--map expects COLUMN=PRODUCT_CODE, got '{item}'")
            raise typer.Exit(code=2)
        mapping[column.strip()] = code.strip()
    options = SnapshotOptions(
        id_column=id_column,
        date_column=date_column,
        product_columns=tuple(products),
        product_map=mapping,
        create_products=create_products,
    )
    settings = _settings()
    engine = _engine_ready(settings)
    _run_import(
        "snapshots",
        file,
        lambda advance: import_snapshots(
            engine,
            file,
            options,
            chunk_rows=settings.import_chunk_rows,
            max_errors=settings.import_max_errors,
            progress=advance,
        ),
    )


def _bank_file(directory: Path, name: str) -> Path:
    for suffix in (".csv", ".parquet", ".csv.gz"):
        candidate = directory / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    err_console.print(f"{directory}: no {name}.csv or {name}.parquet")
    raise typer.Exit(code=1)


@import_app.command("bank")
def import_bank_cmd(
    directory: Annotated[
        Path, typer.Argument(help="Folder with products, customers and adoptions files.")
    ],
) -> None:
    """Import a whole bank folder (as `nbo generate` or examples/berka write it): products,
    then customers, then adoptions."""
    files = [_bank_file(directory, n) for n in ("products", "customers", "adoptions")]
    import_products_cmd(files[0])
    import_customers_cmd(files[1], None, None)
    import_adoptions_cmd(files[2])


@app.command()
def generate(
    customers: Annotated[int, typer.Option(min=1, help="Number of customers.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bank.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("data/bank"),
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    start: Annotated[str, typer.Option(help="First day of the bank's history.")] = "2019-01-01",
    end: Annotated[str, typer.Option(help="Last day of the bank's history.")] = "2025-12-31",
    offers_per_month: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help=(
                "Also simulate an offer history: each month a customer is offered a product "
                "with this chance and answers by the ground truth (writes an outcomes file)."
            ),
        ),
    ] = 0.0,
    offer_targeting: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of those offers chosen by the true propensity (the rest at random).",
        ),
    ] = 0.5,
) -> None:
    """Write a realistic synthetic bank in the import format, with its ground truth."""
    from models.synthetic import generate_bank, write_bank

    if fmt not in ("csv", "parquet"):
        err_console.print("--format must be csv or parquet")
        raise typer.Exit(code=2)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("simulating months", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        bank = generate_bank(
            customers,
            seed,
            start=dt.date.fromisoformat(start),
            end=dt.date.fromisoformat(end),
            progress=advance,
            offers_per_month=offers_per_month,
            offer_targeting=offer_targeting,
        )
        progress.update(task, description="writing files")
        written = write_bank(bank, out, fmt=fmt)  # type: ignore[arg-type]
    table = Table(title=f"synthetic bank (seed {seed}) in {out}", show_header=False)
    table.add_row("products", f"{len(bank.products):,}")
    table.add_row("customers", f"{len(bank.customers):,}")
    table.add_row("adoptions", f"{len(bank.adoptions):,}")
    if bank.outcomes is not None:
        accepted = int((bank.outcomes["outcome"] == "accepted").sum())
        table.add_row("offers (accepted)", f"{len(bank.outcomes):,} ({accepted:,})")
    table.add_row("history", f"{bank.start} .. {bank.end}")
    for name, path in written.items():
        table.add_row(name, str(path))
    console.print(table)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=100, help="Customers in the demo bank.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    port: Annotated[int, typer.Option(help="Port of the service started at the end.")] = 8000,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the service at the end.")
    ] = True,
) -> None:
    """The main job: generate a bank, import it, train a model, and serve next best offers."""
    settings = _settings()
    out = settings.data_dir / "demo-bank"
    console.rule("1. generate a synthetic bank")
    generate(
        customers=customers, seed=seed, out=out, fmt="csv", start="2019-01-01", end="2025-12-31"
    )
    console.rule(f"2. migrate the database ({settings.resolved_database_url})")
    db_upgrade("head")
    console.rule("3. import the bank")
    import_bank_cmd(out)
    console.rule("4. evaluate on a holdout, train, register the model version")
    train(as_of=None, horizon_days=90, truth=out, report=settings.data_dir / "evaluation.html")
    console.rule("5. an API key for a teller system, and the service")
    from service.auth import ROLES, create_key

    with db.unit_of_work(_engine_ready(settings)) as session:
        key = create_key(session, name="demo teller", scopes=list(ROLES["admin"]))
    curl = (
        f"curl -s -X POST http://127.0.0.1:{port}/v1/customers/C0000042/decisions "
        f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        '-d \'{"channel": "branch", "max_offers": 3, "explain": true}\''
    )
    console.print("[green]demo ready.[/green] Ask for the next best offers of customer C0000042:")
    print(curl, flush=True)
    console.print(
        f"(an admin key for the demo; report: {settings.data_dir / 'evaluation.html'}; "
        "Ctrl-C stops the service)"
    )
    if serve_after:
        serve(host="127.0.0.1", port=port, workers=1)


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
    return TrainConfig(forced_sales=choice)  # type: ignore[arg-type]


@contextmanager
def _stage_progress() -> Iterator[Callable[[str, float], None]]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("loading the bank", total=1.0)

        def advance(stage: str, fraction: float) -> None:
            progress.update(task, description=stage, completed=fraction)

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


@app.command()
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

    settings = _settings()
    config = _train_config(forced_sales, settings)
    engine = _engine_ready(settings)
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


@app.command()
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

    settings = _settings()
    config = _train_config(forced_sales, settings)
    day = _parse_day(as_of, "--as-of")
    if bank is not None and truth is None and (bank / "truth" / "model.json").exists():
        truth = bank
    with _stage_progress() as advance:
        data = (
            BankData.from_folder(bank) if bank is not None else load_bank(_engine_ready(settings))
        )
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


@app.command()
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

    settings = _settings()
    engine = _engine_ready(settings)
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

    settings = _settings()
    try:
        version_id, rules = model_rules(
            _engine_ready(settings),
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


def _registry_session() -> Any:
    settings = _settings()
    return db.unit_of_work(_engine_ready(settings))


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

    with _registry_session() as session:
        rows = registry.list_versions(session)
        if not rows:
            console.print("no model versions yet")
            return
        console.print(_version_table(rows))


@models_app.command("show")
def models_show(version: Annotated[str, typer.Argument(help="Version id.")]) -> None:
    """Show one version: status, data window, parameters, holdout metrics."""
    from service.data import registry

    with _registry_session() as session:
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

    with _registry_session() as session:
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

    with _registry_session() as session:
        try:
            now_active, retired = registry.rollback(session)
        except registry.RegistryError as exc:
            err_console.print(str(exc), markup=False)
            raise typer.Exit(code=1) from None
        console.print(f"{now_active.version} is active again ({retired.version} retired)")


def uvicorn_options(settings: Settings, *, host: str, port: int, workers: int) -> dict[str, Any]:
    """The options ``nbo serve`` gives uvicorn (besides the app factory).

    Proxy headers (X-Forwarded-Proto, X-Forwarded-For) are trusted only from the
    addresses in ``settings.forwarded_allow_ips``, and not at all when it is empty:
    otherwise any client could claim to have come over HTTPS. Behind a TLS proxy
    they are what tells nbo the request was https (the dashboard's cookie is then
    ``Secure`` and its Origin check expects ``https://``).
    """
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": "warning",
        "access_log": False,
        # uvicorn trusts 127.0.0.1 by default: off unless configured.
        "proxy_headers": False,
    }
    if settings.forwarded_allow_ips:
        options["proxy_headers"] = True
        options["forwarded_allow_ips"] = list(settings.forwarded_allow_ips)
    return options


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Run the HTTP service (uvicorn) on the configured database, after migrating it."""
    import uvicorn

    settings = _settings()
    db.upgrade(settings.resolved_database_url)
    export_workers(workers)
    metrics_dir: Path | None = None
    if workers > 1:  # one worker serves in-process and needs no shared metric files
        from service import metrics

        metrics_dir = Path(tempfile.mkdtemp(prefix="nbo-metrics-"))
        metrics.prepare_multiprocess(metrics_dir)
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            **uvicorn_options(settings, host=host, port=port, workers=workers),
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def openapi(
    out: Annotated[Path, typer.Option(help="Where to write the spec.")] = Path("openapi.yaml"),
) -> None:
    """Write the OpenAPI spec the service serves (kept in the repository as openapi.yaml)."""
    from service.app import create_app
    from service.openapi import render_openapi

    out.write_text(render_openapi(create_app(Settings())))
    console.print(f"wrote {out}")


def main() -> None:
    """Entry point of the ``nbo`` console script."""
    app()


if __name__ == "__main__":
    main()
