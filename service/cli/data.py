"""``nbo db``, ``nbo import`` and ``nbo generate``: the database schema, the bank's data
going in, and a synthetic bank to put in it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from service.cli.context import (
    UserError,
    check_output,
    console,
    err_console,
    load_settings,
    progress,
    ready_engine,
)
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

db_app = typer.Typer(help="Database schema: apply or revert migrations.", no_args_is_help=True)
import_app = typer.Typer(
    help="Load the bank's data (CSV or Parquet). An import loads whole or not at all.",
    no_args_is_help=True,
)


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with progress(remaining=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


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


FileArg = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, help="CSV (optionally .gz) or Parquet file.")
]


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    settings = load_settings()
    db.upgrade(settings.resolved_database_url, revision)
    engine = db.engine_from_settings(settings)
    console.print(f"database at revision {db.current_revision(engine)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, or 'base' to drop everything.")],
) -> None:
    """Revert migrations down to REVISION."""
    settings = load_settings()
    db.downgrade(settings.resolved_database_url, revision)
    console.print(f"database at revision {db.current_revision(db.engine_from_settings(settings))}")


@db_app.command("current")
def db_current() -> None:
    """Show the database URL's backend and its schema revision."""
    settings = load_settings()
    engine = db.engine_from_settings(settings)
    console.print(
        f"{engine.url.render_as_string(hide_password=True)}: {db.current_revision(engine)}"
    )


@import_app.command("products")
def import_products_cmd(file: FileArg) -> None:
    """Import the product catalogue: product_code,name,category,value[,business_weight,active,
    min_age,max_age,segments,requires,excludes] (lists |-separated)."""
    settings = load_settings()
    engine = ready_engine(settings)
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
    valid_from: Annotated[
        dt.datetime | None,
        typer.Option(
            formats=["%Y-%m-%d"],
            metavar="DAY",
            help=(
                "First day of the file's values (YYYY-MM-DD) where a row has no valid_from "
                "cell; default: today. Changed values keep the ones they replace."
            ),
        ),
    ] = None,
) -> None:
    """Import customers: customer_id[,segment,branch_id,joined_at,birth_date,valid_from] plus
    any attribute columns (numeric or categorical, whatever the bank has)."""
    settings = load_settings()
    engine = ready_engine(settings)
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
            valid_from=valid_from.date() if valid_from is not None else None,
            bulk_rows=settings.import_bulk_rows,
            progress=advance,
        ),
    )


@import_app.command("adoptions")
def import_adoptions_cmd(file: FileArg) -> None:
    """Import adoptions: customer_id,product_code,adopted_at[,closed_at] (dates YYYY-MM-DD)."""
    settings = load_settings()
    engine = ready_engine(settings)
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
    settings = load_settings()
    engine = ready_engine(settings)
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
    raise UserError(
        f"{directory}: no {name}.csv or {name}.parquet",
        hint="a bank folder holds products, customers and adoptions files (as nbo generate writes)",
    )


@import_app.command("bank")
def import_bank_cmd(
    directory: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            help="Folder with products, customers and adoptions files.",
        ),
    ],
) -> None:
    """Import a whole bank folder (as `nbo generate` or examples/berka write it): products,
    then customers, then adoptions."""
    files = [_bank_file(directory, n) for n in ("products", "customers", "adoptions")]
    import_products_cmd(files[0])
    import_customers_cmd(files[1], None, None)
    import_adoptions_cmd(files[2])


def _day(value: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option}: {value!r} is not a date", hint="write it YYYY-MM-DD") from None


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
    first, last = _day(start, "--start"), _day(end, "--end")
    if last <= first:
        raise UserError(f"--end {last} is not after --start {first}")
    check_output(out, "--out", folder=True)
    with progress() as bar:
        task = bar.add_task("simulating months", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        bank = generate_bank(
            customers,
            seed,
            start=first,
            end=last,
            progress=advance,
            offers_per_month=offers_per_month,
            offer_targeting=offer_targeting,
        )
        bar.update(task, description="writing files")
        # A str to typer, checked above to be csv or parquet.
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


def export(
    directory: Annotated[
        Path, typer.Argument(file_okay=False, help="Folder to write (new, or empty).")
    ],
    fmt: Annotated[str, typer.Option("--format", help="parquet (the only format).")] = "parquet",
    partitions: Annotated[
        int,
        typer.Option(
            min=1,
            max=100_000,
            help="Parts per table (customers hashed by id, each with all of its rows): "
            "a Dask worker reads one part at a time, so a large bank wants parts of a few "
            "hundred thousand customers.",
        ),
    ] = 8,
) -> None:
    """Write the bank (products, customers, adoptions, outcomes, attribute history and
    kinds) as a Parquet export, for `nbo train --dask ADDRESS --parquet DIR`.

    The export is written beside DIR and moved into place whole. Every Dask worker must
    see DIR at the same path (a shared file system or mount).
    """
    from service.distributed import DaskError, export_parquet

    if fmt != "parquet":
        raise UserError(f"--format {fmt!r}: nbo export writes parquet", hint="--format parquet")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(
            f"{directory}: exists and is not an empty folder",
            hint="give a new folder, or remove the old export first",
        )
    settings = load_settings()
    engine = ready_engine(settings)
    with progress(counted=False) as bar:
        bar.add_task("reading and writing the bank", total=None)
        try:
            manifest = export_parquet(engine, directory, partitions=partitions)
        except DaskError as exc:
            raise UserError(str(exc), code=1) from exc
    table = Table(title=f"bank exported to {directory}", show_header=False)
    table.add_row("format", f"{manifest['format']} v{manifest['version']}")
    table.add_row("partitions", f"{manifest['partitions']:,}")
    table.add_row("products", f"{manifest['products']:,}")
    for name, rows in manifest["rows"].items():
        table.add_row(name.replace("_", " "), f"{rows:,}")
    console.print(table)
