"""``nbo train``, ``evaluate``, ``score``, ``rules`` and ``models``: learning a model
version, measuring it, using it offline, and the registry that holds the versions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import Engine, func, select

from models.errors import TooLittleData
from service.cli.context import (
    UserError,
    check_output,
    console,
    err_console,
    load_settings,
    open_engine,
    open_session,
    progress,
    ready_engine,
    replacing,
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
    typer.Option(
        exists=True,
        file_okay=False,
        help="A synthetic bank folder (from `nbo generate`): adds the oracle row.",
    ),
]
ReportHelp = "An existing file is replaced, and the command says so."
DaskOption = Annotated[
    str | None,
    typer.Option(
        "--dask",
        metavar="ADDRESS",
        help=(
            "Run on the Dask cluster whose scheduler is at ADDRESS (tcp://HOST:8786): "
            "features per partition and LightGBM on the workers, which need this nbo "
            "version installed."
        ),
    ),
]
PartitionsOption = Annotated[
    int,
    typer.Option(
        min=1,
        max=100_000,
        help="With --dask and the database: how many partitions the bank is sent in "
        "(customers hashed by id); a Parquet export keeps its own.",
    ),
]
ParquetOption = Annotated[
    Path | None,
    typer.Option(
        exists=True,
        file_okay=False,
        help="With --dask: read the bank from this Parquet export (nbo export) instead of "
        "the database; every worker must see the folder at this path.",
    ),
]

MIN_HOLDOUT_CUSTOMERS = 100
"""Below this many customers with an adoption in the holdout window, the comparison is
noise: a hit rate near 0.5 measured on 100 customers has a 95% interval of +-0.10,
wider than the gaps between the models it ranks."""
MIN_PRODUCT_ADOPTERS = 20
"""Below this many adopters of a product in the window, its own figures (per-product
hit rate, calibration) rest on too few cases to read: one adopter more or less moves
them by 5 points or more."""
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
        raise UserError(
            f"--forced-sales must be keep or drop, not {choice!r}",
            hint="(the default comes from NBO_FORCED_SALES when set)" if not forced_sales else None,
        )
    return TrainConfig(forced_sales=choice)  # type: ignore[arg-type]  # checked above: keep or drop


def _check_truth(truth: Path | None) -> None:
    if truth is not None and not (truth / "truth" / "model.json").is_file():
        raise UserError(
            f"--truth {truth}: not a synthetic bank folder (it has no truth/model.json)",
            hint="give a folder written by `nbo generate`, or leave --truth out",
        )


def _require_history(engine: Engine) -> None:
    """Refuse at once a database with nothing to learn from, before any loading."""
    from service.data.tables import Adoption, Customer

    with engine.connect() as conn:
        customers = conn.scalar(select(func.count()).select_from(Customer)) or 0
        adoptions = conn.scalar(select(func.count()).select_from(Adoption)) or 0
    if customers == 0 or adoptions == 0:
        raise UserError(
            f"nothing to learn from: the database holds {customers:,} customers and "
            f"{adoptions:,} adoptions",
            hint="import the bank first: nbo import bank DIR, or nbo import products / "
            "customers / adoptions FILE",
            code=1,
        )


@contextmanager
def _training_errors() -> Iterator[None]:
    """Too little data for training or evaluation as one or two lines (exit 1), with
    what to do about it. Any other ``ValueError`` (a damaged ``--truth`` bank, say), for
    which that advice would mislead, is explained as every command's is
    (:func:`service.cli.errors.explain`)."""
    try:
        yield
    except TooLittleData as exc:
        raise UserError(
            str(exc),
            hint="import more history, or choose another --as-of or --horizon-days "
            "(--debug shows where this came from)",
            code=1,
        ) from exc


def holdout_warnings(holdout: Any) -> list[str]:
    """What makes a holdout too small to mean much: fewer than
    :data:`MIN_HOLDOUT_CUSTOMERS` customers with an adoption in the window, and the
    products with fewer than :data:`MIN_PRODUCT_ADOPTERS` adopters in it."""
    warnings: list[str] = []
    customers = int(holdout.comparison["n_customers"].iloc[0])
    window = f"{holdout.cutoff} + {holdout.horizon_days} days"
    if customers < MIN_HOLDOUT_CUSTOMERS:
        warnings.append(
            f"only {customers:,} customers adopted a product in the holdout window "
            f"({window}), fewer than {MIN_HOLDOUT_CUSTOMERS}: the comparison is noise. "
            "Give an --as-of whose window holds the bank's adoptions, or a longer --horizon-days."
        )
    adopters = holdout.actual.groupby("product_code")["customer_id"].nunique()
    thin = [
        f"{code} ({int(adopters.get(code, 0))})"
        for code in holdout.model.product_codes
        if int(adopters.get(code, 0)) < MIN_PRODUCT_ADOPTERS
    ]
    if thin and customers >= MIN_HOLDOUT_CUSTOMERS:
        warnings.append(
            f"{len(thin)} of {len(holdout.model.product_codes)} products have fewer than "
            f"{MIN_PRODUCT_ADOPTERS} adopters in the holdout window, too few for their own "
            f"figures: {', '.join(thin)}"
        )
    return warnings


def _say_report(report: Path, replaced: str | None) -> None:
    said = f"report: {report}" + (f" ({replaced})" if replaced else "")
    console.print(said, markup=False, highlight=False, soft_wrap=True)


def _warn(holdout: Any) -> None:
    for warning in holdout_warnings(holdout):
        err_console.print(f"warning: {warning}", markup=False, highlight=False, style="yellow")


@contextmanager
def _stage_progress() -> Iterator[Callable[[str, float], None]]:
    with progress(counted=False) as bar:
        task = bar.add_task("loading the bank", total=1.0)

        def advance(stage: str, fraction: float) -> None:
            bar.update(task, description=stage, completed=fraction)

        yield advance


def _comparison_table(holdout: Any) -> Table:
    """The holdout's comparison: ranking measures on a temporal holdout; on a random
    split of customers (a campaign) AUC and the responders found in the top 10% and 20%
    of the ranking, with MAP@3 only when more than one product had responders (with one
    product every ranking of it is perfect)."""
    table = Table(
        title=f"holdout: {holdout.describe_holdout()} "
        f"({int(holdout.comparison['n_customers'].iloc[0]):,} customers with an adoption)"
    )
    if holdout.holdout_kind == "random_customers":
        several = holdout.actual["product_code"].nunique() > 1
        columns = ("AUC", *(("MAP@3",) if several else ())) + (
            "top10% hits",
            "top10% share",
            "top20% hits",
            "top20% share",
        )
    else:
        columns = ("MAP@1", "MAP@3", "MAP@5", "NDCG@3", "hit@3", "AUC", "top10% share")
    table.add_column("model")
    for column in columns:
        table.add_column(column.replace(" ", "\n"), justify="right")
    for name, row in holdout.comparison.iterrows():
        table.add_row(str(name), *(_measure(c, row.get(c)) for c in columns))
    return table


def _measure(column: str, value: Any) -> str:
    if value is None or value != value:  # missing, or NaN
        return ""
    if column.endswith("hits"):
        return f"{value:,.1f}"
    if column.endswith("share"):
        return f"{value:.1%}"
    return f"{value:.4f}"


def _parse_day(value: str | None, option: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option}: {value!r} is not a date", hint="write it YYYY-MM-DD") from None


def train(
    as_of: AsOfOption = None,
    horizon_days: HorizonOption = 90,
    truth: TruthOption = None,
    report: Annotated[
        Path | None, typer.Option(help=f"Also write the holdout's HTML report here. {ReportHelp}")
    ] = None,
    forced_sales: ForcedSalesOption = None,
    dask: DaskOption = None,
    partitions: PartitionsOption = 8,
    parquet: ParquetOption = None,
) -> None:
    """Evaluate on a holdout, train on all history, register a model version (activated if not worse).

    The new version is compared with the active one on the same holdout. Recorded offer
    outcomes are learnt from: a recent decline of a product is a feature, and accepted
    offers are positives (unless --forced-sales drop).

    A holdout with fewer than 100 customers adopting in its window, or products with
    fewer than 20 adopters there, is reported with a warning: its figures are noise.

    With --dask ADDRESS the same is done on a Dask cluster (from the database, or from
    a Parquet export with --parquet), and the same kind of version is registered.
    """
    from service.data.bank import load_bank
    from service.training import train_and_register, write_evaluation_report

    settings = load_settings()
    config = _train_config(forced_sales, settings)
    day = _parse_day(as_of, "--as-of")
    _check_truth(truth)
    if report is not None:
        check_output(report, "--report")
    if dask is None and parquet is not None:
        raise UserError("--parquet reads an export on a Dask cluster", hint="add --dask ADDRESS")
    if dask is not None and truth is not None:
        raise UserError("--truth is not available with --dask", hint="leave --truth out")
    engine = ready_engine(settings)
    if parquet is None:
        _require_history(engine)
    replaced = None
    if dask is not None:
        outcome, replaced = _train_on_dask(
            engine,
            settings,
            address=dask,
            partitions=partitions,
            parquet=parquet,
            day=day,
            horizon_days=horizon_days,
            config=config,
            report=report,
        )
        _said_training(outcome, report, replaced)
        return
    with _stage_progress() as advance:
        with _training_errors():
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
            replaced = replacing(report)
            write_evaluation_report(
                outcome.holdout, report, data=load_bank(engine), card=outcome.card
            )
    _said_training(outcome, report, replaced)


def _said_training(outcome: Any, report: Path | None, replaced: str | None) -> None:
    console.print(_comparison_table(outcome.holdout))
    _warn(outcome.holdout)
    state = "active" if outcome.activated else outcome.version.status
    console.print(f"model version {outcome.version.version}: {state} ({outcome.reason})")
    if report is not None:
        _say_report(report, replaced)


@contextmanager
def _dask_errors() -> Iterator[None]:
    """Dask failures as one or two lines: a usage error (exit 2) for a malformed
    address, else exit 1."""
    from service.distributed import BadAddress, DaskError

    try:
        yield
    except BadAddress as exc:
        raise UserError(str(exc)) from exc
    except DaskError as exc:
        raise UserError(
            str(exc),
            hint="check the scheduler address and that its workers run this nbo version "
            "(see the README: training on a Dask cluster)",
            code=1,
        ) from exc


def _train_on_dask(
    engine: Engine,
    settings: Settings,
    *,
    address: str,
    partitions: int,
    parquet: Path | None,
    day: dt.date | None,
    horizon_days: int,
    config: Any,
    report: Path | None,
) -> tuple[Any, str | None]:
    from service.distributed import card_bank, cluster, open_bank, train_and_register_dask
    from service.training import write_evaluation_report

    replaced = None
    with _dask_errors(), cluster(address) as client, _stage_progress() as advance:
        advance("reading the bank", 0.0)
        bank = open_bank(client, engine=engine, parquet=parquet, partitions=partitions)
        with _training_errors():
            outcome = train_and_register_dask(
                engine,
                bank,
                artifacts_dir=settings.artifacts_dir,
                as_of=day,
                horizon_days=horizon_days,
                tolerance=settings.promotion_tolerance,
                config=config,
                progress=advance,
            )
        if report is not None:
            advance("writing the report", 1.0)
            replaced = replacing(report)
            write_evaluation_report(
                outcome.holdout, report, data=card_bank(bank), card=outcome.card
            )
    return outcome, replaced


def evaluate(
    report: Annotated[
        Path, typer.Option(help=f"Where to write the HTML report. {ReportHelp}")
    ] = Path("data/evaluation.html"),
    as_of: AsOfOption = None,
    horizon_days: HorizonOption = 90,
    truth: TruthOption = None,
    bank: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
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

    A holdout with fewer than 100 customers adopting in its window, or products with
    fewer than 20 adopters there, is reported with a warning: its figures are noise.
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
    _check_truth(truth)
    check_output(report, "--report")
    engine = None if bank is not None else ready_engine(settings)
    if engine is not None:
        _require_history(engine)
    with _stage_progress() as advance:
        if bank is not None:
            data = BankData.from_folder(bank)
        else:
            assert engine is not None  # made above when there is no --bank
            data = load_bank(engine)
        with _training_errors():
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
        replaced = replacing(report)
        write_evaluation_report(holdout, report, data=data)
    console.print(_comparison_table(holdout))
    _warn(holdout)
    _say_report(report, replaced)


def score(
    out: Annotated[
        Path,
        typer.Option(help=f"Output file: .csv, .csv.gz or .parquet. {ReportHelp}"),
    ],
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
    rank_by: Annotated[
        Literal["expected-value", "propensity"],
        typer.Option(
            help="expected-value: by score = propensity x value x business weight, as "
            "the decision API ranks offers; or propensity."
        ),
    ] = "expected-value",
    dask: DaskOption = None,
    partitions: PartitionsOption = 8,
    parquet: ParquetOption = None,
) -> None:
    """Score every customer with a model version and write the ranked offers.

    Each row has the propensity, the expected value (propensity x the product's value)
    and the score (expected value x business weight), as the decision API gives them;
    rank 1 is the customer's best offer by --rank-by.
    """
    from service.scoring import ScoringError, UnknownName, score_bank

    day = _parse_day(as_of, "--as-of")
    check_output(out, "--out")
    if dask is None and parquet is not None:
        raise UserError("--parquet reads an export on a Dask cluster", hint="add --dask ADDRESS")
    replaced = replacing(out)
    settings = load_settings()
    engine = ready_engine(settings)
    try:
        with _stage_progress() as advance:
            if dask is None:
                result = score_bank(
                    engine,
                    out=out,
                    version=version,
                    product=product,
                    top_k=top_k,
                    as_of=day,
                    rank_by=rank_by,
                    progress=advance,
                )
            else:
                from service.distributed import cluster, open_bank

                with _dask_errors(), cluster(dask) as client:
                    advance("reading the bank", 0.1)
                    result = score_bank(
                        engine,
                        out=out,
                        version=version,
                        product=product,
                        top_k=top_k,
                        as_of=day,
                        rank_by=rank_by,
                        progress=advance,
                        cluster_bank=open_bank(
                            client, engine=engine, parquet=parquet, partitions=partitions
                        ),
                    )
    except ScoringError as exc:
        raise UserError(str(exc), code=2 if isinstance(exc, UnknownName) else 1) from exc
    table = Table(title=f"scored with model version {result.version} as of {result.as_of}")
    table.add_column("what")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("customers scored", f"{result.customers:,}")
    table.add_row("rows written", f"{result.rows:,}")
    table.add_row("ranked by", rank_by)
    table.add_row("file", escape(str(out)))
    console.print(table)
    if replaced:
        console.print(f"{out}: {replaced}", markup=False, highlight=False, soft_wrap=True)


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
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Also list the rules never said to a customer (lift 1 or below, few customers).",
        ),
    ] = False,
) -> None:
    """List the adoption-sequence rules of a model version (`nbo rules mine` explores baskets).

    Rules come in the order decisions choose their reasons: only rules with a lift above
    1 and enough customers behind them, the highest lift first (then conviction and
    confidence). The others are counted below the table; --all lists them too.
    """
    if ctx.invoked_subcommand is not None:
        return
    from service.scoring import ScoringError, UnknownName, model_rules

    if csv is not None:
        check_output(csv, "--csv")
    settings = load_settings()
    try:
        version_id, rules, left_out = model_rules(
            ready_engine(settings),
            version=version,
            consequents=consequent or None,
            min_confidence=min_confidence,
            min_lift=min_lift,
            ordered=ordered,
            everything=everything,
        )
    except ScoringError as exc:
        raise UserError(str(exc), code=2 if isinstance(exc, UnknownName) else 1) from exc
    if csv is not None:
        rules.to_csv(csv, index=False)
    shown = rules.head(top)
    codes = [c for items in shown["antecedent"] for c in items.split()] + list(shown["consequent"])
    widest = max((len(c) for c in codes), default=4)
    table = Table(
        title=f"{len(rules):,} rules of model version {version_id}",
        caption="conf.: share of the customers holding the first products who took the "
        "next; days: median days it took",
    )
    # Product codes are never cut: an antecedent wraps between its products, and the
    # numbers take no more room than they need.
    table.add_column("if the customer holds", min_width=widest, overflow="fold")
    table.add_column("then", min_width=widest, no_wrap=True)
    for column in ("conf.", "lift", "customers", "days"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in shown.itertuples(index=False):
        table.add_row(
            escape(str(row.antecedent)),
            escape(str(row.consequent)),
            f"{row.confidence:.3f}",
            f"{row.lift:.2f}",
            f"{row.n_customers:,}",
            "" if row.median_days != row.median_days else f"{row.median_days:.0f}",
        )
    console.print(table)
    if len(rules) > len(shown):
        console.print(f"{len(rules) - len(shown):,} more: --top {len(rules)} prints them all")
    if left_out:
        from models.rules import REASON_MIN_CUSTOMERS

        console.print(
            f"{left_out:,} rules left out: lift 1 or below, or fewer than "
            f"{REASON_MIN_CUSTOMERS} customers behind them, so never said to a customer "
            "(--all lists them)"
        )
    if csv is not None:
        console.print(f"wrote {len(rules):,} rules to {csv}")


@rules_app.command("mine")
def rules_mine(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="Basket CSV: transaction_id,item rows."),
    ],
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

    if out is not None:
        check_output(out, "--out")
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
        raise UserError(
            f"{file}: {exc}", hint="a basket file is a CSV of transaction_id,item rows", code=1
        ) from exc
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
    # The version id is what `nbo models promote` takes: never cut. It starts with its
    # UTC registration time, so no "created" column is needed; the gate's reason wraps.
    table = Table()
    table.add_column("version", no_wrap=True, min_width=max(len(r.version) for r in rows))
    table.add_column("status", no_wrap=True)
    table.add_column("as of", no_wrap=True)
    table.add_column("days", justify="right", no_wrap=True)
    table.add_column("gate", ratio=1, min_width=12, overflow="fold")
    for row in rows:
        table.add_row(
            row.version,
            row.status,
            row.as_of.isoformat(),
            str(row.horizon_days),
            escape(str((row.metrics or {}).get("gate", {}).get("reason", ""))),
        )
    return table


@models_app.command("list")
def models_list() -> None:
    """List model versions, newest first (a version id starts with its UTC time of registration)."""
    from service.data import registry

    with open_session() as session:
        rows = registry.list_versions(session)
        if not rows:
            console.print("no model versions yet")
            return
        console.print(_version_table(rows))


def _unknown_version(exc: Exception) -> UserError:
    return UserError(str(exc), hint="`nbo models list` shows the versions")


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="Version id.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the registry row as JSON, the card included.")
    ] = False,
) -> None:
    """Show one version: its registry row and its model card.

    The card is what a model-risk review reads: the data window and kind of holdout,
    the products and feature columns, the holdout metrics next to the baselines,
    calibration, metrics by segment and by age band, and the training parameters and
    library versions.
    """
    from service.data import registry

    with open_session() as session:
        try:
            row = registry.get_version(session, version)
        except registry.RegistryError as exc:
            raise _unknown_version(exc) from exc
        described = registry.describe(row)
        stored_files, stored_bytes = registry.stored_size(session, version)
    if as_json:
        console.print_json(registry.dumps(described))
        return
    gate = (described["metrics"] or {}).get("gate", {})
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold", no_wrap=True)
    header.add_column(overflow="fold")
    for label, value in (
        ("version", described["version"]),
        ("status", described["status"]),
        ("as of", f"{described['as_of']} (horizon {described['horizon_days']} days)"),
        ("registered", described["created_at"]),
        ("activated", described["activated_at"] or "never"),
        (
            "bundle",
            f"{described['path']} (in the database: {stored_files} files, "
            f"{stored_bytes / 1e6:.1f} MB)"
            if stored_files
            else described["path"],
        ),
        ("gate", gate.get("reason", "")),
    ):
        header.add_row(label, escape(str(value)))
    console.print(header)
    card = (described["params"] or {}).get("card")
    if card is None:
        console.print(
            "no model card: this version was registered before cards were kept "
            "(`--json` shows what it recorded)"
        )
        return
    from models.model_card import render_text

    try:
        parts = render_text(card, width=console.width)
    except ValueError as exc:
        raise UserError(
            f"the model card of {version} cannot be shown: {exc}",
            hint="`--json` prints it as recorded",
            code=1,
        ) from exc
    for part in parts:
        console.print(part)


@models_app.command("promote")
def models_promote(version: Annotated[str, typer.Argument(help="Version id.")]) -> None:
    """Make VERSION active by hand, whatever the gate said; the active one retires.

    The version's bundle must load first (its stored files and manifest are checked),
    so a version no worker could serve never becomes active.
    """
    from service.data import registry
    from service.errors import Invalid, NotFound

    settings = load_settings()
    with open_session() as session:
        try:
            previous = registry.activate_version(
                session,
                version=version,
                origin=registry.OFFLINE_ORIGIN,
                cache_dir=settings.artifacts_dir,
            )
        except NotFound as exc:
            raise _unknown_version(exc) from exc
        except Invalid as exc:
            raise UserError(
                f"{version} was not promoted: {exc}",
                hint="`nbo models list` shows the versions; train a new one with `nbo train`",
                code=1,
            ) from exc
        retired = f" ({previous} retired)" if previous else ""
        console.print(f"{version} is active{retired}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Re-activate the version that was active before the current one."""
    from service.data import registry

    with open_session() as session:
        try:
            now_active, retired = registry.rollback(session)
        except registry.RegistryError as exc:
            raise UserError(
                str(exc), hint="`nbo models promote V` activates any version", code=1
            ) from exc
        console.print(f"{now_active.version} is active again ({retired.version} retired)")


@models_app.command("prepare")
def models_prepare(
    version: Annotated[
        str | None,
        typer.Option(
            help="Build the store of this version instead of the active one, ahead of "
            "`nbo models promote` (the API's activation does this itself)."
        ),
    ] = None,
) -> None:
    """Build this machine's serving store for the active version now, so that `nbo serve`
    (every worker) maps it and is ready in seconds instead of building it at start-up.

    Run it on each serving machine after an activation (`nbo train`, `promote`,
    `rollback`), or with --version before one, with the same NBO_DATABASE_URL and
    NBO_DATA_DIR as `nbo serve`. Without it the first worker to start builds the store
    and the others wait for it.
    """
    import time

    from service.data import registry
    from service.decision.state import build_snapshot, prepare_store, serving_dir

    settings = load_settings()
    started = time.perf_counter()
    with open_engine() as engine, err_console.status("building the serving store"):
        if version is not None:
            with open_session() as session:
                try:
                    registry.get_version(session, version)
                except registry.RegistryError as exc:
                    raise _unknown_version(exc) from exc
            try:
                built = prepare_store(engine, settings, version)
            except registry.RegistryError as exc:
                raise UserError(f"{version}: {exc}", code=1) from exc
            console.print(
                f"serving store of {version} {'built' if built else 'already current'} in "
                f"{serving_dir(settings)}, {time.perf_counter() - started:.1f} s"
            )
            return
        snapshot = build_snapshot(engine, settings)
    served = snapshot.version or "no model (degraded: popularity)"
    console.print(
        f"serving store ready in {serving_dir(settings)}: {len(snapshot.customers):,} customers, "
        f"{served}, {time.perf_counter() - started:.1f} s"
    )
