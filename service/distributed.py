"""Training and scoring on a Dask cluster: the bank read in partitions, the driver of
:mod:`models.propensity.distributed` run on it, and the result registered as the
single-machine path registers it.

Where the partitions come from
------------------------------
- A Parquet export (``nbo export --format parquet DIR``, :func:`export_parquet`): each
  worker reads its own partition files from ``DIR``, which every worker must see (a
  shared file system or mount). The client reads only the products.
- The database: the client reads the bank with the single-machine readers
  (:func:`service.data.bank.load_bank`, so rows are judged the same way), splits it by
  a hash of the customer id and sends each partition to a worker. The workers need no
  database access, but the client holds the bank once while sending it.

The Parquet layout
------------------
``manifest.json`` (format, version, partitions, customers, tables), ``products.parquet``,
``attribute_kinds.json``, and ``<table>/part-<k>.parquet`` for ``customers``,
``adoptions``, ``outcomes`` and ``attribute_history`` (k = 0 .. partitions - 1,
customers hashed by id: a customer's rows are all in the same k). Lists (segments,
requires, excludes) are ``|``-joined text and dates are timestamps, as the import
format reads them; every part is validated on reading (:meth:`BankData.from_frames`).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from models.data import BankData
from models.eligibility import Catalogue
from models.propensity import PropensityModel, TrainConfig
from models.propensity.distributed import (
    DaskError,
    check_workers,
    holdout_dask,
    load_partitions,
    scatter_partitions,
    score_partitions,
    split_bank,
    train_dask,
)

__all__ = [
    "PARQUET_FORMAT",
    "ClusterBank",
    "BadAddress",
    "DaskError",
    "cluster",
    "export_parquet",
    "open_bank",
    "read_parquet_partition",
]

PARQUET_FORMAT = "nbo-bank-parquet"
PARQUET_VERSION = 1
TABLES = ("customers", "adoptions", "outcomes", "attribute_history")
DEFAULT_PARTITIONS = 8
"""Partitions of a bank read from the database, and of an export, by default."""
CONNECT_SECONDS = 10.0
"""How long to wait for the scheduler before saying it cannot be reached."""

_ADDRESS = re.compile(r"^(?:(tcp|tls|ucx|inproc|ws|wss)://)?[\w.\-\[\]:]+:\d{1,5}$")


# --------------------------------------------------------------------------- the cluster


class BadAddress(DaskError):
    """``--dask`` was given something that is not a scheduler address (a usage error)."""


@contextmanager
def cluster(address: str) -> Iterator[Any]:
    """A client of the Dask scheduler at ``address`` (``tcp://host:8786`` or
    ``host:8786``), checked to have workers running this nbo version.

    Raises
    ------
    DaskError
        A malformed or unreachable address, no workers, workers without nbo.
    """
    if not _ADDRESS.match(address):
        raise BadAddress(
            f"--dask {address!r}: not a scheduler address; write it tcp://HOST:PORT "
            "(the scheduler's default port is 8786)"
        )
    try:
        # Untyped: used through Any.
        client_class: Any = importlib.import_module("distributed").Client
    except ImportError as exc:  # pragma: no cover - a dependency of nbo
        raise DaskError(f"Dask's distributed package cannot be loaded: {exc}") from None
    try:
        client = client_class(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise DaskError(
            f"cannot reach the Dask scheduler at {address} within {CONNECT_SECONDS:.0f} s "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'})"
        ) from None
    try:
        check_workers(client)
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class ClusterBank:
    """The bank on the cluster: partitions held by workers, and the products."""

    client: Any
    partitions: list[Any]
    products: pd.DataFrame
    source: str

    @property
    def catalogue(self) -> Catalogue:
        return Catalogue.from_products(self.products)


def open_bank(
    client: Any,
    *,
    engine: Engine | None = None,
    parquet: Path | None = None,
    partitions: int = DEFAULT_PARTITIONS,
) -> ClusterBank:
    """The bank on the cluster, from a Parquet export (read by the workers) or the
    database (read here, sent to the workers in ``partitions`` parts)."""
    if parquet is not None:
        manifest = read_manifest(parquet)
        sources = [
            partial(read_parquet_partition, str(parquet), k) for k in range(manifest["partitions"])
        ]
        futures = load_partitions(client, sources)
        return ClusterBank(client, futures, _read_products(parquet), f"Parquet {parquet}")
    if engine is None:
        raise ValueError("give an engine or a Parquet folder")
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    from service.data.bank import load_bank

    data = load_bank(engine)
    parts = split_bank(data, partitions)
    products = data.products
    del data
    return ClusterBank(client, scatter_partitions(client, parts), products, "database")


def last_adoption(bank: ClusterBank) -> pd.Timestamp | None:
    """The latest adoption in the bank (None without any)."""
    days = bank.client.gather(bank.client.map(_last_adoption, bank.partitions, pure=False))
    known = [d for d in days if d is not None]
    return max(known) if known else None


def _last_adoption(data: BankData) -> pd.Timestamp | None:
    if data.adoptions.empty:
        return None
    return pd.Timestamp(data.adoptions["adopted_at"].max())


def default_as_of(bank: ClusterBank) -> dt.date:
    """As :func:`service.data.bank.default_as_of`: the day after the last adoption."""
    last = last_adoption(bank)
    if last is None:
        return dt.date.today()
    day: dt.date = (last + pd.Timedelta(days=1)).date()
    return day


def _card_rows(data: BankData) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        data.customers.loc[:, ["customer_id", "segment", "branch_id", "joined_at", "birth_date"]],
        data.adoptions.loc[:, ["customer_id", "product_code", "adopted_at", "closed_at"]],
    )


def card_bank(bank: ClusterBank) -> BankData:
    """What the model card reads of the bank (customers' segments and birth dates, the
    adoption dates), gathered from the partitions; no attributes."""
    parts = bank.client.gather(bank.client.map(_card_rows, bank.partitions, pure=False))
    return BankData(
        products=bank.products,
        customers=pd.concat([p[0] for p in parts], ignore_index=True),
        attribute_kinds={},
        adoptions=pd.concat([p[1] for p in parts], ignore_index=True),
    )


# --------------------------------------------------------------------------- training


def train_and_register_dask(
    engine: Engine,
    bank: ClusterBank,
    *,
    artifacts_dir: Path,
    as_of: dt.date | None,
    horizon_days: int,
    tolerance: float,
    config: TrainConfig | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> Any:
    """:func:`service.training.train_and_register` on the cluster: holdout, final
    training, the same bundle and registry row (through the same registration code);
    the model card and metrics record the workers and partitions.

    Returns
    -------
    service.training.TrainOutcome
    """
    from models.model_card import build_card
    from service.training import active_on_holdout, register_model

    config = config or TrainConfig()
    client = bank.client
    as_of = as_of or default_as_of(bank)
    holdout = holdout_dask(
        client,
        bank.partitions,
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=(lambda stage, f: progress(f"holdout: {stage}", f)) if progress else None,
    )
    metrics = holdout.summary_metrics()

    def active_scores(model: PropensityModel, day: dt.date) -> pd.DataFrame:
        return pd.concat(
            client.gather(score_partitions(client, bank.partitions, model, as_of=day)),
            ignore_index=True,
        )

    active_value, active_note = active_on_holdout(
        engine, holdout, None, cache_dir=artifacts_dir, score=active_scores
    )
    model = train_dask(
        client,
        bank.partitions,
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=(lambda stage, f: progress(f"final: {stage}", f)) if progress else None,
    )
    if progress:
        progress("model card", 1.0)
    dask = dict(model.report.get("dask", {}))
    dask["source"] = bank.source
    metrics["trained_on"] = {"engine": "dask", **dask}
    card = build_card(model, holdout, card_bank(bank))
    card["training"]["dask"] = dask
    return register_model(
        engine,
        model,
        holdout,
        card,
        metrics=metrics,
        artifacts_dir=artifacts_dir,
        as_of=as_of,
        horizon_days=horizon_days,
        tolerance=tolerance,
        config=config,
        active_value=active_value,
        active_note=active_note,
    )


# --------------------------------------------------------------------------- scoring


def scores_on_cluster(
    bank: ClusterBank,
    model: PropensityModel,
    *,
    as_of: dt.date,
    catalogue: Catalogue,
    apply: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Every partition's scores, with ``apply`` (picklable, e.g. the decision API's
    values) run on the workers, gathered."""
    futures = score_partitions(
        bank.client, bank.partitions, model, as_of=as_of, catalogue=catalogue, apply=apply
    )
    frames = bank.client.gather(futures)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- Parquet


def read_manifest(folder: Path) -> dict[str, Any]:
    """The export's manifest, checked.

    Raises
    ------
    DaskError
        Not an nbo Parquet export, another format version, a missing part.
    """
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DaskError(
            f"{folder}: not an nbo Parquet export (no manifest.json); write one with nbo export"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DaskError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PARQUET_FORMAT:
        raise DaskError(f"{path}: not an nbo Parquet export manifest")
    if manifest.get("version") != PARQUET_VERSION:
        raise DaskError(
            f"{path}: export format version {manifest.get('version')!r}, this nbo reads "
            f"{PARQUET_VERSION}; export the bank again"
        )
    n = manifest.get("partitions")
    if not isinstance(n, int) or n < 1:
        raise DaskError(f"{path}: partitions must be a positive whole number, not {n!r}")
    for table in ("customers", "adoptions"):
        for k in range(n):
            if not _part(Path(folder), table, k).is_file():
                raise DaskError(f"{folder}: {table} part {k} is missing; export the bank again")
    return manifest


def _part(folder: Path, table: str, k: int) -> Path:
    return folder / table / f"part-{k:05d}.parquet"


def _read_products(folder: Path) -> pd.DataFrame:
    products = pd.read_parquet(folder / "products.parquet")
    empty = BankData.from_frames(
        products,
        pd.DataFrame({"customer_id": pd.Series([], dtype=object)}),
        pd.DataFrame({"customer_id": [], "product_code": [], "adopted_at": []}),
        attribute_kinds={},
    )
    return empty.products


def _read_kinds(folder: Path) -> dict[str, Any]:
    path = folder / "attribute_kinds.json"
    try:
        kinds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DaskError(f"{path}: unreadable attribute kinds ({exc})") from None
    if not isinstance(kinds, dict) or any(
        v not in ("numeric", "categorical") for v in kinds.values()
    ):
        raise DaskError(f"{path}: attribute kinds must map names to numeric or categorical")
    return kinds


def read_parquet_partition(folder: str, k: int) -> BankData:
    """Partition ``k`` of an export (run on a worker), validated as an import is."""
    root = Path(folder)
    kinds = _read_kinds(root)
    tables = {}
    for table in TABLES:
        path = _part(root, table, k)
        tables[table] = pd.read_parquet(path) if path.is_file() else None
    customers, adoptions = tables["customers"], tables["adoptions"]
    if customers is None or adoptions is None:
        raise DaskError(f"{folder}: partition {k} is missing its customers or adoptions")
    return BankData.from_frames(
        pd.read_parquet(root / "products.parquet"),
        customers,
        adoptions,
        attribute_kinds=kinds,
        outcomes=tables["outcomes"],
        attribute_history=tables["attribute_history"],
    )


def _joined(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return "|".join(str(v) for v in value)  # type: ignore[attr-defined]


def export_parquet(
    engine: Engine, folder: Path, *, partitions: int = DEFAULT_PARTITIONS
) -> dict[str, Any]:
    """Write the bank as a Parquet export (module docstring) and return its manifest.

    The folder must not exist or be empty; the export is written beside it and moved
    into place whole, so a reader never sees half an export.
    """
    from service.data.bank import load_bank

    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(folder)
    data = load_bank(engine)
    staging = folder.with_name(f".{folder.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    products = data.products.copy()
    for column in ("segments", "requires", "excludes"):
        products[column] = products[column].map(_joined)
    products["min_age"] = products["min_age"].astype("Float64")
    products["max_age"] = products["max_age"].astype("Float64")
    products.to_parquet(staging / "products.parquet", index=False)
    (staging / "attribute_kinds.json").write_text(
        json.dumps(dict(data.attribute_kinds)), encoding="utf-8"
    )
    counts: dict[str, int] = {table: 0 for table in TABLES}
    for k, part in enumerate(split_bank(data, partitions)):
        frames = {
            "customers": part.customers,
            "adoptions": part.adoptions,
            "outcomes": part.outcomes,
            "attribute_history": None
            if part.attribute_history is None
            else part.attribute_history.assign(
                previous=part.attribute_history["previous"].map(
                    lambda v: (
                        None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                    )
                )
            ),
        }
        for table, frame in frames.items():
            if frame is None:
                continue
            (staging / table).mkdir(exist_ok=True)
            frame.to_parquet(_part(staging, table, k), index=False)
            counts[table] += len(frame)
    manifest = {
        "format": PARQUET_FORMAT,
        "version": PARQUET_VERSION,
        "partitions": partitions,
        "partitioned_by": "hash of customer_id",
        "rows": counts,
        "products": len(data.products),
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if folder.exists():
        folder.rmdir()
    staging.rename(folder)
    return manifest
