"""A bank on disk: the import-format files and its truth under ``truth/``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from models.synthetic.generation import SyntheticBank
from models.synthetic.oracle import true_propensities
from models.synthetic.truth import TruthModel


def write_bank(
    bank: SyntheticBank, out_dir: Path, *, fmt: Literal["csv", "parquet"] = "csv"
) -> dict[str, Path]:
    """Write the bank in the import format, and its truth under ``truth/``.

    Writes ``products``, ``customers`` and ``adoptions`` (``.csv`` or
    ``.parquet``), ``outcomes`` when the bank has an offer history,
    ``truth/model.json``, ``truth/personas.csv`` and
    ``truth/propensities.parquet`` (the oracle on ``bank.end`` over 90 days).
    CSV dates are ``YYYY-MM-DD``, empty cells are missing values, booleans
    are ``true``/``false``; Parquet dates are ``date32``.

    Parameters
    ----------
    bank : SyntheticBank
    out_dir : pathlib.Path
        Created if missing; existing files of these names are replaced.
    fmt : {"csv", "parquet"}

    Returns
    -------
    dict of str to pathlib.Path
        Keys ``products, customers, adoptions, model, personas, propensities``,
        and ``outcomes`` with an offer history.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', not {fmt!r}")
    out_dir = Path(out_dir)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = [
        ("products", bank.products),
        ("customers", bank.customers),
        ("adoptions", bank.adoptions),
    ]
    if bank.outcomes is not None:
        tables.append(("outcomes", bank.outcomes))
    for name, frame in tables:
        path = out_dir / f"{name}.{fmt}"
        _write_table(_to_arrow(frame), path, fmt)
        written[name] = path
    model_path = truth_dir / "model.json"
    model_path.write_text(bank.truth.to_json())
    written["model"] = model_path
    personas_path = truth_dir / "personas.csv"
    _write_table(_to_arrow(bank.personas), personas_path, "csv")
    written["personas"] = personas_path
    oracle = true_propensities(
        bank.truth,
        bank.customers,
        bank.adoptions,
        bank.personas,
        as_of=bank.end,
        horizon_days=90,
        outcomes=bank.outcomes,
    )
    propensities_path = truth_dir / "propensities.parquet"
    _write_table(_to_arrow(oracle), propensities_path, "parquet")
    written["propensities"] = propensities_path
    return written


def read_truth(out_dir: Path) -> tuple[TruthModel, pd.DataFrame]:
    """Read the truth model and personas that :func:`write_bank` wrote.

    Returns
    -------
    (TruthModel, pandas.DataFrame)
        The model and ``customer_id, persona``.
    """
    truth_dir = Path(out_dir) / "truth"
    model = TruthModel.from_json((truth_dir / "model.json").read_text())
    personas = pd.read_csv(truth_dir / "personas.csv", dtype=str, keep_default_na=False)
    return model, personas


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    for i, column in enumerate(table.schema):
        if pa.types.is_timestamp(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.date32()))
        elif pa.types.is_large_string(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
    return table


def _write_table(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path)
        return
    with path.open("wb") as handle:
        handle.write((",".join(table.column_names) + "\n").encode())
        pa_csv.write_csv(
            table,
            handle,
            write_options=pa_csv.WriteOptions(include_header=False, quoting_style="none"),
        )
