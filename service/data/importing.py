"""Getting the bank's data in: products, customers, adoptions and holding snapshots.

Every import follows the same shape, so that it loads whole or not at all:

1. the file is read in chunks of ``import_chunk_rows`` rows (bounded memory);
   each row is checked and the good ones go into a temporary staging table;
2. checks that need the whole file (duplicate keys, unknown customers) run as
   SQL over the staging table;
3. if any problem was found, the transaction is rolled back and an
   :class:`ImportFailed` lists the problems with file, row, column and reason;
   otherwise the staged rows are merged (insert new, update changed) and the
   transaction commits.

A bank's first big load of adoptions on PostgreSQL skips the staging table: each
checked chunk is COPied straight into ``adoptions`` inside a savepoint, and the unique
key rebuilt at the end catches a repeated row (then the staged path runs to say where);
see :func:`_load_adoptions_directly`. CSV files are read by Arrow's streaming reader
(:func:`read_text_chunks`) for adoptions.

Row numbers count data rows from 1 (the header is not a row), so row N is on
line N + 1 of a CSV file. Importing the same file twice adds nothing: rows are
matched by their natural key (product code, customer id, or customer +
product + adoption date). A customer's changed attribute, segment or branch keeps the
value it replaced, dated (see :mod:`service.data.history`).
"""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import io
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from sqlalchemy import (
    Connection,
    Engine,
    ForeignKeyConstraint,
    Index,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import AddConstraint, DropConstraint

from models.data import ADOPTION_COLUMNS, CUSTOMER_FIXED_COLUMNS, PRODUCT_COLUMNS
from service import validation
from service.data import history

ProgressFn = Callable[[int], None]
"""Called with the number of rows just read."""

PRODUCT_REQUIRED = ("product_code", "name", "category", "value")
CUSTOMER_FIXED = CUSTOMER_FIXED_COLUMNS
VALID_FROM = "valid_from"
"""The customers file's optional column: the first day of the row's values (not an
attribute)."""
ADOPTION_REQUIRED = ("customer_id", "product_code", "adopted_at")

_CODE_RE = validation.PRODUCT_CODE_RE
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
_MISSING = validation.MISSING_TOKENS


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with an input file: a row, a cell, or (``row`` None) the file itself."""

    file: str
    row: int | None
    column: str | None
    reason: str

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.reason}"


class ImportFailed(Exception):
    """The file was rejected; nothing was written."""

    def __init__(self, problems: Sequence[RowProblem], *, truncated: bool = False) -> None:
        self.problems = list(problems)
        self.truncated = truncated
        lines = [str(p) for p in self.problems]
        if truncated:
            lines.append("(more problems not shown)")
        super().__init__("\n".join(lines))


class _Collector:
    """Collects problems up to a limit; the import fails if any were seen."""

    def __init__(self, file: str, limit: int) -> None:
        self.file = file
        self.limit = limit
        self.problems: list[RowProblem] = []
        self.truncated = False
        self.rejected_rows: set[int] = set()

    def add(self, row: int | None, column: str | None, reason: str) -> None:
        if row is not None:
            self.rejected_rows.add(row)
        if len(self.problems) < self.limit:
            self.problems.append(RowProblem(self.file, row, column, reason))
        else:
            self.truncated = True

    @property
    def full(self) -> bool:
        return len(self.problems) >= self.limit

    def raise_if_any(self) -> None:
        if self.problems:
            raise ImportFailed(self.problems, truncated=self.truncated)


@dataclass
class ImportSummary:
    """What an import did."""

    kind: str
    file: str
    rows_read: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    seconds: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else math.inf


# --------------------------------------------------------------------------- reading


def count_rows(path: Path) -> int | None:
    """Data rows in ``path`` when cheap to know (Parquet metadata, plain CSV lines)."""
    if path.suffix.lower() == ".parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    if path.suffix.lower() in {".csv", ".txt"}:
        with path.open("rb") as handle:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        return max(lines - 1, 0)
    return None


def read_chunks(path: Path, chunk_rows: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(first_row_number, frame)`` chunks of ``path``, every cell as text.

    CSV (optionally compressed) and Parquet are read; cells are stripped of
    surrounding spaces and missing values become empty strings, so every
    check below sees one representation whatever the source format.
    """
    if not path.exists():
        raise ImportFailed([RowProblem(str(path), None, None, "file not found")])
    first = 1
    if path.suffix.lower() == ".parquet":
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            frame = _as_text(batch.to_pandas())
            yield first, frame
            first += len(frame)
        return
    try:
        reader = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            chunksize=chunk_rows,
            skipinitialspace=True,
        )
        for frame in reader:
            frame.columns = [str(c).strip() for c in frame.columns]
            yield first, _strip(frame)
            first += len(frame)
    except pd.errors.EmptyDataError:
        raise ImportFailed([RowProblem(str(path), None, None, "the file is empty")]) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ImportFailed(
            [RowProblem(str(path), None, None, f"not a readable CSV file: {exc}")]
        ) from None


_ARROW_SUFFIXES = (".csv", ".txt")
_MISSING_VALUES = pa.array(sorted(_MISSING), type=pa.string())
_EPOCH = dt.date(1970, 1, 1)
_FIRST_DAY = dt.date(1, 1, 1).toordinal() - _EPOCH.toordinal()


def read_text_chunks(
    path: Path, chunk_rows: int
) -> tuple[list[str], Iterator[tuple[int, pa.Table]]]:
    """The header of ``path`` and its ``(first_row_number, table)`` chunks of at most
    ``chunk_rows`` rows: every cell as stripped text (``""`` when empty), as Arrow tables.

    The same cells as :func:`read_chunks`, faster: a plain CSV file is read by Arrow's
    streaming reader in blocks of about ``chunk_rows`` rows (memory bounded whatever the
    file's size); other formats (Parquet, compressed CSV) go through :func:`read_chunks`.
    """
    if not path.exists():
        raise ImportFailed([RowProblem(str(path), None, None, "file not found")])
    if path.suffix.lower() == ".parquet":
        header = [str(n).strip() for n in pq.ParquetFile(path).schema_arrow.names]
        return header, _tables_of(read_chunks(path, chunk_rows))
    if path.suffix.lower() not in _ARROW_SUFFIXES:
        frames = read_chunks(path, chunk_rows)
        peeked = next(frames, None)
        if peeked is None:
            raise ImportFailed([RowProblem(str(path), None, None, "the file has no rows")])
        header = [str(c) for c in peeked[1].columns]

        def chained() -> Iterator[tuple[int, pd.DataFrame]]:
            yield peeked
            yield from frames

        return header, _tables_of(chained())
    header = _csv_header(path)
    return header, _arrow_csv_chunks(path, header, chunk_rows)


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            names = next(csv.reader(handle, skipinitialspace=True), None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImportFailed(
            [RowProblem(str(path), None, None, f"not a readable CSV file: {exc}")]
        ) from None
    if not names:
        raise ImportFailed([RowProblem(str(path), None, None, "the file is empty")])
    return [name.strip() for name in names]


def _arrow_csv_chunks(
    path: Path, header: list[str], chunk_rows: int
) -> Iterator[tuple[int, pa.Table]]:
    with path.open("rb") as handle:
        sample = handle.read(1 << 20)
    per_row = len(sample) / max(sample.count(b"\n"), 1)
    block = int(min(max(per_row * chunk_rows * 1.1, 1 << 20), 64 << 20))
    names = [f"c{i}" for i in range(len(header))]  # the header may repeat a name
    try:
        reader = pcsv.open_csv(
            str(path),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=block),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        first = 1
        for batch in reader:
            table = pa.Table.from_arrays(
                [pc.utf8_trim_whitespace(column) for column in batch.columns], names=header
            )
            for offset in range(0, table.num_rows, chunk_rows):
                piece = table.slice(offset, chunk_rows)
                yield first, piece
                first += piece.num_rows
    except pa.ArrowInvalid as exc:
        raise ImportFailed(
            [RowProblem(str(path), None, None, f"not a readable CSV file: {exc}")]
        ) from None


def _tables_of(frames: Iterator[tuple[int, pd.DataFrame]]) -> Iterator[tuple[int, pa.Table]]:
    for first, frame in frames:
        yield first, pa.Table.from_pandas(frame.astype(object), preserve_index=False)


def _column(table: pa.Table, name: str) -> pa.Array:
    """A text column of ``table`` as one Arrow string array."""
    column = table.column(name).combine_chunks()
    return column.cast(pa.string()) if column.type != pa.string() else column


def _arrow_bool(values: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _arrow_missing(column: pa.Array) -> np.ndarray:
    return _arrow_bool(pc.is_in(pc.utf8_lower(column), value_set=_MISSING_VALUES))


def _arrow_dates(
    raw: pa.Array,
    column: str,
    first: int,
    problems: _Collector,
    *,
    required: bool,
    today: dt.date,
    future: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Parse a column of dates as :func:`_parse_dates` does (past dates only unless
    ``future``), with the same problems reported; returns (days since 1970-01-01, which
    are dates).

    ``YYYY-MM-DD`` cells are parsed by Arrow, and kept only if the day of the month is
    the one written (Arrow alone takes 2021-02-30 for 2021-03-02); the rest (other ISO 8601 forms,
    errors) by pandas, as before.
    """
    n = len(raw)
    missing = _arrow_missing(raw)
    parsed = pc.strptime(raw, format="%Y-%m-%d", unit="s", error_is_null=True)
    shaped = pc.match_substring_regex(raw, r"^\d{4}-\d\d-\d\d$")
    day_of_month = pc.if_else(shaped, pc.utf8_slice_codeunits(raw, 8, 10), "0").cast(pa.int32())
    ok = _arrow_bool(pc.and_(shaped, pc.equal(pc.day(parsed), day_of_month)))
    days = np.asarray(
        pc.fill_null(parsed.cast(pa.date32()).cast(pa.int32()), 0).to_numpy(zero_copy_only=False),
        dtype=np.int32,
    ).copy()
    ok &= days >= _FIRST_DAY  # year 0 parses, but is no date
    slow = np.flatnonzero(~ok & ~missing)
    if slow.size:
        texts = raw.take(pa.array(slow)).to_pylist()
        again = pd.to_datetime(pd.Series(texts, dtype=object), format="ISO8601", errors="coerce")
        for i, text_value, value in zip(slow.tolist(), texts, again.tolist(), strict=True):
            try:
                days[i] = value.date().toordinal() - _EPOCH.toordinal()
                ok[i] = True
            except (AttributeError, ValueError, NotImplementedError):  # NaT, year 0
                problems.add(
                    first + i, column, f"unparsable date '{text_value}' (expected YYYY-MM-DD)"
                )
    low = validation.EARLIEST_DATE.toordinal() - _EPOCH.toordinal()
    latest = validation.latest_date(today) if future else today
    high = latest.toordinal() - _EPOCH.toordinal()
    outside = ok & ((days < low) | (days > high))
    for i in np.flatnonzero(outside).tolist():
        day = _EPOCH + dt.timedelta(days=int(days[i]))
        reason = validation.date_problem(day, today=today, future=future)
        problems.add(first + i, column, reason or f"implausible date '{raw[i].as_py()}'")
    ok &= ~outside
    if required:
        for i in np.flatnonzero(missing).tolist():
            problems.add(first + i, column, "missing value")
    days[~ok] = 0
    assert len(days) == n
    return days, ok


def _strip(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(lambda s: s.str.strip())


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for name, column in frame.items():
        if pd.api.types.is_datetime64_any_dtype(column):
            text_col = column.dt.strftime("%Y-%m-%d")
        elif (
            column.dtype == object
            and len(column)
            and isinstance(column.dropna().iloc[0] if column.notna().any() else None, dt.date)
        ):
            text_col = column.map(lambda d: d.isoformat() if isinstance(d, dt.date) else d)
        elif pd.api.types.is_float_dtype(column):
            # Whole floats print without ".0" so integer columns survive Parquet's NaN upcast.
            text_col = column.map(
                lambda v: "" if pd.isna(v) else (str(int(v)) if v == int(v) else repr(v))
            )
        else:
            text_col = column
        out[str(name).strip()] = text_col.astype("string").fillna("").str.strip()
    return pd.DataFrame(out)


def _missing(series: pd.Series) -> np.ndarray:
    return np.asarray(series.str.lower().isin(_MISSING))


def _parse_dates(
    frame: pd.DataFrame,
    column: str,
    first: int,
    problems: _Collector,
    *,
    required: bool,
    today: dt.date,
    future: bool = True,
) -> pd.Series:
    """Parse an ISO date column; report unparsable, implausible (see
    :func:`service.validation.date_problem`) and, when required, empty cells.

    Implausible dates come back as NaT, so no later check reports them twice.
    """
    raw = frame[column]
    missing = _missing(raw)
    parsed = pd.to_datetime(raw.where(~missing, None), format="ISO8601", errors="coerce")
    bad = parsed.isna().to_numpy() & ~missing
    for i in np.flatnonzero(bad).tolist():
        problems.add(
            first + int(i), column, f"unparsable date '{raw.iloc[i]}' (expected YYYY-MM-DD)"
        )
    latest = validation.latest_date(today) if future else today
    outside = (
        (parsed < pd.Timestamp(validation.EARLIEST_DATE))
        | (parsed >= pd.Timestamp(latest) + pd.Timedelta(days=1))
    ).to_numpy()
    for i in np.flatnonzero(outside).tolist():
        reason = validation.date_problem(parsed.iloc[i].date(), today=today, future=future)
        problems.add(first + int(i), column, reason or f"implausible date '{raw.iloc[i]}'")
    if required:
        for i in np.flatnonzero(missing).tolist():
            problems.add(first + int(i), column, "missing value")
    return parsed.where(~outside).dt.normalize()


def _parse_numbers(
    frame: pd.DataFrame,
    column: str,
    first: int,
    problems: _Collector,
    *,
    required: bool,
    minimum: float | None = None,
    maximum: float = validation.MAX_MAGNITUDE,
    integer: bool = False,
) -> pd.Series:
    """Parse a number column; report what is not a finite number within the bounds, and
    (when required) empty cells. Infinite and too large values come back as NaN."""
    raw = frame[column]
    missing = _missing(raw)
    parsed = pd.to_numeric(raw.where(~missing, None), errors="coerce")
    bad = parsed.isna().to_numpy() & ~missing
    for i in np.flatnonzero(bad).tolist():
        problems.add(first + int(i), column, f"not a number: '{raw.iloc[i]}'")
    values = _finite_numbers(parsed, raw, column, first, problems)
    for i in np.flatnonzero(~np.isnan(values) & (values > maximum)).tolist():
        problems.add(first + int(i), column, f"value {raw.iloc[i]} too large (at most {maximum:g})")
    if integer:
        not_int = ~np.isnan(values) & (values != np.round(values))
        for i in np.flatnonzero(not_int).tolist():
            problems.add(first + int(i), column, f"not a whole number: '{raw.iloc[i]}'")
    if minimum is not None:
        for i in np.flatnonzero(~np.isnan(values) & (values < minimum)).tolist():
            kind = "negative value" if minimum == 0 else "value too small"
            problems.add(first + int(i), column, f"{kind} {raw.iloc[i]} (must be >= {minimum:g})")
    if required:
        for i in np.flatnonzero(missing).tolist():
            problems.add(first + int(i), column, "missing value")
    return pd.Series(values, index=frame.index)


def _finite_numbers(
    parsed: pd.Series, raw: pd.Series, column: str, first: int, problems: _Collector
) -> np.ndarray:
    """``parsed`` as floats, with infinite and out-of-bound values reported and made NaN
    (``inf`` and ``1e400`` parse, and would break every later load of the bank)."""
    values = parsed.to_numpy(dtype=float, na_value=np.nan, copy=True)
    with np.errstate(invalid="ignore"):
        outside = ~np.isnan(values) & ~(np.abs(values) <= validation.MAX_MAGNITUDE)
    for i in np.flatnonzero(outside).tolist():
        reason = validation.number_problem(float(values[i])) or "not a storable number"
        problems.add(first + int(i), column, f"{reason}: '{raw.iloc[i]}'")
    values[outside] = np.nan
    return values  # type: ignore[no-any-return]  # pandas types to_numpy as Any


def _check_lengths(
    frame: pd.DataFrame, limits: dict[str, int], first: int, problems: _Collector
) -> None:
    """Report text cells longer than their column allows, or holding a NUL character."""
    for column, limit in limits.items():
        if column not in frame:
            continue
        raw = frame[column]
        for i in np.flatnonzero((raw.str.len() > limit).to_numpy()).tolist():
            problems.add(first + int(i), column, f"longer than {limit} characters")
        for i in np.flatnonzero(raw.str.contains("\x00", regex=False).to_numpy()).tolist():
            problems.add(first + int(i), column, "contains the NUL character (U+0000)")


def _check_columns(
    columns: Sequence[str],
    problems: _Collector,
    *,
    required: Sequence[str],
    allowed: Sequence[str] | None = None,
) -> None:
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            problems.add(None, name, "column appears twice in the header")
        seen.add(name)
    for name in required:
        if name not in seen:
            problems.add(None, name, f"missing column (required: {', '.join(required)})")
    if allowed is not None:
        for name in columns:
            if name not in allowed:
                problems.add(None, name, f"unknown column (allowed: {', '.join(allowed)})")


def _date_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        day: str = value.date().isoformat()
        return day
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _as_date(value: Any) -> dt.date | None:
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


# --------------------------------------------------------------------------- staging


class _Stage:
    """A temporary table on the import's connection, filled in bulk."""

    def __init__(self, conn: Connection, name: str, columns: Sequence[tuple[str, str]]) -> None:
        self.conn = conn
        self.name = name
        self.columns = [c for c, _ in columns]
        self.postgres = conn.dialect.name == "postgresql"
        column_sql = ", ".join(f"{c} {t}" for c, t in columns)
        suffix = " ON COMMIT DROP" if self.postgres else ""
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} ({column_sql}){suffix}")

    def insert(self, rows: pd.DataFrame | Sequence[tuple[Any, ...]]) -> None:
        """Append rows (a frame with the table's columns in order, or tuples)."""
        if len(rows) == 0:
            return
        # psycopg's connection: its cursor is a context manager and has copy().
        raw: Any = self.conn.connection.dbapi_connection
        assert raw is not None
        if self.postgres:
            frame = (
                rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=self.columns)
            )
            # CSV through COPY: one C-speed serialisation instead of a Python call per row.
            # Empty unquoted fields are NULL in COPY's CSV format.
            cols = ", ".join(self.columns)
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY {self.name} ({cols}) FROM STDIN WITH (FORMAT csv)") as copy,
            ):
                copy.write(frame.to_csv(header=False, index=False))
        else:
            if isinstance(rows, pd.DataFrame):
                rows = list(
                    rows.astype(object).where(rows.notna(), None).itertuples(index=False, name=None)
                )
            marks = ", ".join("?" for _ in self.columns)
            cursor = raw.cursor()
            cursor.executemany(f"INSERT INTO {self.name} VALUES ({marks})", rows)
            cursor.close()

    @contextmanager
    def writer(self) -> Iterator[Callable[[pa.Table], None]]:
        """A function appending Arrow tables (the table's columns in order): on
        PostgreSQL through one COPY held open for all of them, so the server stores
        one chunk while the next is read and checked."""
        if not self.postgres:
            yield self._insert_arrow
            return
        with _copy_writer(self.conn, self.name, self.columns) as write:
            yield write

    def _insert_arrow(self, table: pa.Table) -> None:
        columns = [c.cast(pa.string()) if pa.types.is_date(c.type) else c for c in table.columns]
        self.insert(list(zip(*(c.to_pylist() for c in columns), strict=True)))

    def analyze(self) -> None:
        """Give PostgreSQL's planner statistics (temporary tables have none until analysed)."""
        if self.postgres:
            self.conn.exec_driver_sql(f"ANALYZE {self.name}")

    def index(self, *columns: str) -> None:
        name = f"ix_{self.name}_{'_'.join(columns)}"
        self.conn.exec_driver_sql(f"CREATE INDEX {name} ON {self.name} ({', '.join(columns)})")

    def drop(self) -> None:
        if not self.postgres:
            self.conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.name}")


@contextmanager
def _copy_writer(
    conn: Connection, table: str, columns: Sequence[str]
) -> Iterator[Callable[[pa.Table], None]]:
    """A function appending Arrow tables (``columns`` in order) to ``table`` through one
    COPY held open for all of them (PostgreSQL), so the server stores one chunk while
    the next is read and checked. ``table`` and ``columns`` are the code's names."""
    raw: Any = conn.connection.dbapi_connection
    assert raw is not None
    options = pcsv.WriteOptions(include_header=False)
    with (
        raw.cursor() as cursor,
        cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)") as copy,
    ):

        def write(rows: pa.Table) -> None:
            if rows.num_rows:
                # Arrow's CSV: nulls unquoted and empty (NULL to COPY), text quoted.
                sink = io.BytesIO()
                pcsv.write_csv(rows, sink, write_options=options)
                copy.write(sink.getbuffer())

        yield write


_PG_EPOCH_DAYS = (dt.date(2000, 1, 1) - _EPOCH).days
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags, no extension
_CLOSED = np.dtype(
    [("n", ">i2"), ("l1", ">i4"), ("customer", ">i8"), ("l2", ">i4"), ("product", ">i4"),
     ("l3", ">i4"), ("adopted", ">i4"), ("l4", ">i4"), ("closed", ">i4")]
)  # fmt: skip
_OPEN = np.dtype(
    [("n", ">i2"), ("l1", ">i4"), ("customer", ">i8"), ("l2", ">i4"), ("product", ">i4"),
     ("l3", ">i4"), ("adopted", ">i4"), ("l4", ">i4")]
)  # fmt: skip


def _days(column: Any) -> np.ndarray:
    """An Arrow int32 or date32 column as int32 numbers (nulls as 0)."""
    values = pc.fill_null(column.cast(pa.int32()), 0)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int32)


def _adoption_records(
    customer: np.ndarray, product: np.ndarray, adopted: np.ndarray, closed: np.ndarray,
    has_closed: np.ndarray,
) -> bytes:  # fmt: skip
    """Rows of ``(customer_id, product_id, adopted_at, closed_at)`` in PostgreSQL's binary
    COPY format, built by NumPy: the server parses no text. Open adoptions (a null
    ``closed_at``, written as length -1) are shorter rows and come after the closed ones
    of the chunk. Days count from 1970-01-01 here, from 2000-01-01 in PostgreSQL."""
    parts = []
    for dtype, mask in ((_CLOSED, has_closed), (_OPEN, ~has_closed)):
        records = np.empty(int(mask.sum()), dtype=dtype)
        records["n"] = 4
        records["l1"], records["l2"], records["l3"] = 8, 4, 4
        records["customer"] = customer[mask]
        records["product"] = product[mask]
        records["adopted"] = adopted[mask] - _PG_EPOCH_DAYS
        if dtype is _CLOSED:
            records["l4"] = 4
            records["closed"] = closed[mask] - _PG_EPOCH_DAYS
        else:
            records["l4"] = -1
        parts.append(records.tobytes())
    return b"".join(parts)


@contextmanager
def _copy_binary(
    conn: Connection, table: str, columns: Sequence[str], *, queued: bool = False
) -> Iterator[Callable[[bytes | memoryview], None]]:
    """A function appending rows already in binary COPY format to ``table`` through one
    COPY (PostgreSQL); the header and trailer are written here.

    ``queued`` hands the rows to a thread of psycopg's that sends them (at most 1024
    blocks of 128 kB wait, so memory stays bounded): the caller checks the next chunk
    while the server stores this one, instead of waiting for the server to take it.
    """
    from psycopg.copy import QueuedLibpqWriter

    raw: Any = conn.connection.dbapi_connection
    assert raw is not None
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT binary)"
    with raw.cursor() as cursor:
        writer = QueuedLibpqWriter(cursor) if queued else None
        with cursor.copy(sql, writer=writer) as copy:
            copy.write(_COPY_HEADER)

            def write(records: bytes | memoryview) -> None:
                if records:
                    copy.write(records)

            yield write
            copy.write(b"\xff\xff")


def _distinct(conn: Connection, a: str, b: str) -> str:
    return f"{a} IS DISTINCT FROM {b}" if conn.dialect.name == "postgresql" else f"{a} IS NOT {b}"


def _catalogue(conn: Connection) -> dict[str, int]:
    return {code: pid for code, pid in conn.execute(text("SELECT code, id FROM products"))}


# --------------------------------------------------------------------------- products


def import_products(
    engine: Engine,
    path: Path,
    *,
    chunk_rows: int = 100_000,
    max_errors: int = 20,
    progress: ProgressFn | None = None,
) -> ImportSummary:
    """Import the product catalogue (``product_code,name,category,value,...``).

    Lists (``segments``, ``requires``, ``excludes``) are ``|``-separated.
    Products are matched by ``product_code``; a changed row updates the product.
    """
    started = time.perf_counter()
    problems = _Collector(str(path), max_errors)
    summary = ImportSummary("products", str(path))
    rows: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    for first, frame in read_chunks(path, chunk_rows):
        if first == 1:
            _check_columns(
                frame.columns, problems, required=PRODUCT_REQUIRED, allowed=PRODUCT_COLUMNS
            )
            problems.raise_if_any()
        summary.rows_read += len(frame)
        value = _parse_numbers(frame, "value", first, problems, required=True, minimum=0)
        weight = (
            _parse_numbers(frame, "business_weight", first, problems, required=False, minimum=0)
            if "business_weight" in frame
            else pd.Series(np.nan, index=frame.index)
        )
        ages = {
            c: (
                _parse_numbers(
                    frame, c, first, problems, required=False, minimum=0, maximum=130, integer=True
                )
                if c in frame
                else pd.Series(np.nan, index=frame.index)
            )
            for c in ("min_age", "max_age")
        }
        _check_lengths(
            frame,
            {"name": validation.MAX_PRODUCT_NAME, "category": validation.MAX_LABEL},
            first,
            problems,
        )
        for i, record in enumerate(frame.to_dict("records")):
            row = first + i
            code = record["product_code"]
            if not code:
                problems.add(row, "product_code", "missing value")
                continue
            if not _CODE_RE.match(code):
                problems.add(
                    row, "product_code", f"invalid code '{code}' (letters, digits, _ . - only)"
                )
                continue
            problem = validation.identifier_problem(code)
            if problem is not None:
                problems.add(row, "product_code", problem)
                continue
            if code in first_seen:
                problems.add(
                    row, "product_code", f"duplicate key '{code}' (also on row {first_seen[code]})"
                )
                continue
            first_seen[code] = row
            for column in ("name", "category"):
                if not record[column]:
                    problems.add(row, column, "missing value")
            active_text = record.get("active", "").lower()
            if active_text and active_text not in _TRUE | _FALSE:
                problems.add(row, "active", f"not a boolean: '{record['active']}' (use true/false)")
            for column in ("segments", "requires", "excludes"):
                problem = _list_problem(record.get(column, ""))
                if problem is not None:
                    problems.add(row, column, problem)
            min_age, max_age = ages["min_age"].iloc[i], ages["max_age"].iloc[i]
            if not np.isnan(min_age) and not np.isnan(max_age) and min_age > max_age:
                problems.add(row, "max_age", f"max_age {max_age:g} is below min_age {min_age:g}")
            rows.append(
                {
                    "row": row,
                    "code": code,
                    "name": record["name"],
                    "category": record["category"],
                    "value": float(value.iloc[i]),
                    "business_weight": 1.0 if np.isnan(weight.iloc[i]) else float(weight.iloc[i]),
                    "active": active_text not in _FALSE,
                    "min_age": None if np.isnan(min_age) else int(min_age),
                    "max_age": None if np.isnan(max_age) else int(max_age),
                    "segments": _split_list(record.get("segments", "")),
                    "requires": _split_list(record.get("requires", "")),
                    "excludes": _split_list(record.get("excludes", "")),
                }
            )
        if progress:
            progress(len(frame))
    if summary.rows_read == 0:
        problems.add(None, None, "the file has no rows")

    with engine.begin() as conn:
        known = set(_catalogue(conn)) | set(first_seen)
        for product in rows:
            for column in ("requires", "excludes"):
                for code in product[column] or ():
                    if code not in known:
                        problems.add(product["row"], column, f"unknown product '{code}'")
                    elif code == product["code"]:
                        problems.add(product["row"], column, f"product '{code}' refers to itself")
        summary.rejected = len(problems.rejected_rows)
        problems.raise_if_any()
        existing = {
            r.code: r
            for r in conn.execute(
                text(
                    "SELECT id, code, name, category, value, business_weight, active, min_age, "
                    "max_age, segments, requires, excludes FROM products"
                )
            )
        }
        now = dt.datetime.now(dt.UTC)
        for product in rows:
            params = {k: v for k, v in product.items() if k != "row"}
            for key in ("segments", "requires", "excludes"):
                params[key] = json.dumps(params[key]) if params[key] is not None else None
            old = existing.get(product["code"])
            if old is None:
                conn.execute(
                    text(
                        "INSERT INTO products (code, name, category, value, business_weight, active, "
                        "min_age, max_age, segments, requires, excludes) VALUES (:code, :name, "
                        ":category, :value, :business_weight, :active, :min_age, :max_age, "
                        ":segments, :requires, :excludes)"
                    ),
                    params,
                )
                summary.added += 1
            elif _product_changed(old, product):
                conn.execute(
                    text(
                        "UPDATE products SET name = :name, category = :category, value = :value, "
                        "business_weight = :business_weight, active = :active, min_age = :min_age, "
                        "max_age = :max_age, segments = :segments, requires = :requires, "
                        "excludes = :excludes, updated_at = :now WHERE code = :code"
                    ),
                    {**params, "now": now},
                )
                summary.updated += 1
            else:
                summary.unchanged += 1
    summary.seconds = time.perf_counter() - started
    return summary


def _split_list(cell: str) -> list[str] | None:
    items = [item.strip() for item in cell.split("|") if item.strip()] if cell else []
    return items or None


def _list_problem(cell: str) -> str | None:
    """Why a ``|``-separated list cell is too big, or None (the API's limits)."""
    items = _split_list(cell) or []
    if len(items) > validation.MAX_LIST_ITEMS:
        return f"more than {validation.MAX_LIST_ITEMS} items"
    if any(len(item) > validation.MAX_PRODUCT_CODE for item in items):
        return f"an item is longer than {validation.MAX_PRODUCT_CODE} characters"
    return None


def _json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _product_changed(old: Any, new: dict[str, Any]) -> bool:
    return (
        old.name != new["name"]
        or old.category != new["category"]
        or not math.isclose(old.value, new["value"])
        or not math.isclose(old.business_weight, new["business_weight"])
        or bool(old.active) != new["active"]
        or old.min_age != new["min_age"]
        or old.max_age != new["max_age"]
        or _json_value(old.segments) != new["segments"]
        or _json_value(old.requires) != new["requires"]
        or _json_value(old.excludes) != new["excludes"]
    )


# --------------------------------------------------------------------------- customers


def import_customers(
    engine: Engine,
    path: Path,
    *,
    chunk_rows: int = 100_000,
    max_errors: int = 20,
    categorical: Sequence[str] = (),
    numeric: Sequence[str] = (),
    max_attributes: int = validation.DEFAULT_MAX_ATTRIBUTES,
    valid_from: dt.date | None = None,
    today: dt.date | None = None,
    direct: bool = True,
    bulk_rows: int = 200_000,
    progress: ProgressFn | None = None,
) -> ImportSummary:
    """Import customers: ``customer_id`` plus any attribute columns.

    ``segment``, ``branch_id``, ``joined_at`` and ``birth_date`` are known
    columns; every other column is a bank attribute. An attribute's kind
    (numeric or categorical) is what it was first imported as; a new
    attribute is numeric when every value in the first chunk that has values
    is a number, unless named in ``categorical`` (or forced by ``numeric``).
    Attributes present in the file replace the stored ones; others are kept.
    An empty cell removes the attribute for that customer. Names, dates, numbers and
    texts follow the API's rules (:mod:`service.validation`); the bank has at most
    ``max_attributes`` attributes.

    History: a changed attribute, segment or branch of a known customer keeps the value
    it replaced (:mod:`service.data.history`). The new value holds from the row's
    ``valid_from`` cell (an optional column, ``YYYY-MM-DD``, not after tomorrow), else
    from ``valid_from``, else from ``today`` (the import day). A value no one knew
    before (a new customer, a new attribute) counts as valid from the start of history;
    a value equal to the one held that day adds nothing.

    The file is read ``chunk_rows`` rows at a time (CSV by Arrow's streaming reader)
    and each chunk checked with vectorised code. A first load on PostgreSQL (no customer
    stored) COPies the checked rows straight into ``customers``
    (:func:`_load_customers_directly`; ``direct=False`` turns it off), setting the
    unique key aside for a file of ``bulk_rows`` rows or more (0: never); otherwise the
    rows go through a staging table and are merged.
    """
    started = time.perf_counter()
    problems = _Collector(str(path), max_errors)
    summary = ImportSummary("customers", str(path))
    today = today or validation.utc_today()
    # A change is an event that happened: not after today (one day of grace for clocks
    # in other time zones), as adoptions.
    until = today + dt.timedelta(days=1)
    if valid_from is not None:
        problem = validation.date_problem(valid_from, today=until, future=False)
        if problem is not None:
            problems.add(None, VALID_FROM, f"the day given for the whole file: {problem}")
            problems.raise_if_any()
    header, chunks = read_text_chunks(path, chunk_rows)
    # The first rows are read before the header is checked: a file unreadable from its
    # start is said to be so, and a file of no rows is said to have none.
    peeked = next(chunks, None)
    if peeked is None:
        raise ImportFailed([RowProblem(str(path), None, None, "the file has no rows")])
    chunks = itertools.chain([peeked], chunks)
    with engine.begin() as conn:
        stored_kinds: dict[str, str] = {
            name: kind
            for name, kind in conn.execute(text("SELECT name, kind FROM attribute_definitions"))
        }
        checks = _CustomerChecks(
            problems=problems,
            summary=summary,
            attribute_columns=_customer_attributes(
                header, problems, stored_kinds, categorical, numeric, max_attributes
            ),
            kinds=dict(stored_kinds),
            stored_kinds=stored_kinds,
            categorical=categorical,
            numeric=numeric,
            today=today,
            progress=progress,
        )
        if direct and _load_customers_directly(conn, path, checks, chunks, bulk_rows):
            _add_attribute_definitions(conn, checks.kinds, stored_kinds)
            summary.seconds = time.perf_counter() - started
            return summary
        if checks.summary.rows_read:  # the direct load was tried and gave way: start again
            problems = _Collector(str(path), max_errors)
            summary.rows_read = 0
            checks.problems, checks.kinds = problems, dict(stored_kinds)
            _, chunks = read_text_chunks(path, chunk_rows)
        stage = _Stage(conn, "stage_customers", _CUSTOMER_STAGE)
        with stage.writer() as write:
            for staged in checks.checked(chunks):
                if not problems.full:
                    write(staged)
        if summary.rows_read == 0:
            problems.add(None, None, "the file has no rows")
        problems.raise_if_any()

        # A first load (no customer stored) needs no per-customer merge: every row is new.
        first_load = conn.exec_driver_sql("SELECT 1 FROM customers LIMIT 1").first() is None
        if stage.postgres:
            conn.exec_driver_sql("SET LOCAL work_mem = '256MB'")  # the checks hash every row
        if not (first_load and stage.postgres):
            stage.index("external_id")
        for ext, lo, hi in conn.exec_driver_sql(
            "SELECT external_id, MIN(row_no), MAX(row_no) FROM stage_customers "
            "GROUP BY external_id HAVING COUNT(*) > 1 ORDER BY MIN(row_no) LIMIT 50"
        ):
            problems.add(hi, "customer_id", f"duplicate key '{ext}' (also on row {lo})")
        summary.rejected = len(problems.rejected_rows)
        problems.raise_if_any()

        _add_attribute_definitions(conn, checks.kinds, stored_kinds)
        if first_load:
            summary.extra["attribute_changes"] = 0
            summary.added = _insert_new_customers(conn, dt.datetime.now(dt.UTC))
        else:
            stage.index("row_no")
            stage.analyze()
            _merge_customers(conn, summary, summary.rows_read, valid_from or today)
        stage.drop()
    summary.seconds = time.perf_counter() - started
    return summary


_CUSTOMER_STAGE = [
    ("row_no", "BIGINT"),
    ("external_id", "VARCHAR(128)"),
    ("segment", "TEXT"),
    ("branch_id", "TEXT"),
    ("joined_at", "DATE"),
    ("birth_date", "DATE"),
    ("attributes", "TEXT"),
    ("present", "TEXT"),
    ("valid_from", "DATE"),
]
"""The staging table's columns, in the order :func:`_stage_customer_chunk` returns them."""
_CUSTOMER_DIRECT = ("external_id", "segment", "branch_id", "joined_at", "birth_date", "attributes")
"""The columns of ``customers`` the direct load writes (``id`` and ``updated_at`` default)."""


def _customer_attributes(
    header: Sequence[str],
    problems: _Collector,
    stored_kinds: dict[str, str],
    categorical: Sequence[str],
    numeric: Sequence[str],
    max_attributes: int,
) -> list[str]:
    """Check the customers file's header; return its attribute columns."""
    _check_columns(header, problems, required=("customer_id",))
    attribute_columns = [c for c in header if c not in CUSTOMER_FIXED and c != VALID_FROM]
    _check_attribute_names(attribute_columns, stored_kinds, max_attributes, problems)
    for name in set(categorical) | set(numeric):
        if name not in attribute_columns:
            problems.add(
                None, name, "named as categorical/numeric but not an attribute column of the file"
            )
    problems.raise_if_any()
    return attribute_columns


def _add_attribute_definitions(
    conn: Connection, kinds: dict[str, str], stored_kinds: dict[str, str]
) -> None:
    for name, kind in kinds.items():
        if name not in stored_kinds:
            conn.execute(
                text("INSERT INTO attribute_definitions (name, kind) VALUES (:n, :k)"),
                {"n": name, "k": kind},
            )


@dataclass
class _CustomerChecks:
    """What checking a customers file needs, and learns as it goes (attribute kinds)."""

    problems: _Collector
    summary: ImportSummary
    attribute_columns: list[str]
    kinds: dict[str, str]
    stored_kinds: dict[str, str]
    categorical: Sequence[str]
    numeric: Sequence[str]
    today: dt.date
    progress: ProgressFn | None

    def checked(self, chunks: Iterator[tuple[int, pa.Table]]) -> Iterator[pa.Table]:
        """Each chunk's rows to store (see :func:`_stage_customer_chunk`), counted."""
        for first, table in chunks:
            self.summary.rows_read += table.num_rows
            yield _stage_customer_chunk(
                table,
                first,
                self.problems,
                self.attribute_columns,
                self.kinds,
                self.stored_kinds,
                self.categorical,
                self.numeric,
                self.today,
            )
            if self.progress:
                self.progress(table.num_rows)


def _load_customers_directly(
    conn: Connection,
    path: Path,
    checks: _CustomerChecks,
    chunks: Iterator[tuple[int, pa.Table]],
    bulk_rows: int,
) -> bool:
    """A bank's first load of customers on PostgreSQL: COPY each checked chunk straight
    into ``customers`` (binary COPY, see :func:`_customer_records`), with no staging
    table and no merge; True if done.

    Applies when no customer is stored: then every row of the file is new, and the
    merge would insert each as it is and record no history. Everything happens in a
    savepoint. The unique key on ``external_id`` rejects an id repeated in the file (or
    stored by someone else meanwhile), and then the caller's staged path runs instead,
    to report the repeated id with its rows (or to merge with what the other writer
    stored). A file of at least ``bulk_rows`` rows (0: none) loads with the keys (the
    unique key, the primary key and the foreign keys that refer to it) and the indexes
    set aside and built again at the end, by one sort instead of a lookup per row; the
    customers table and the tables referring to it are then locked against readers
    until the import commits (customers was empty). Other problems fail the import as
    usual.
    """
    if conn.dialect.name != "postgresql" or _customers_stored(conn):
        return False
    import psycopg

    rows = count_rows(path)  # for a CSV file, its lines: at least its rows
    problems, summary = checks.problems, checks.summary
    try:
        with conn.begin_nested():
            unique = None
            indexes: list[Index] = []
            if rows is not None and 0 < bulk_rows <= rows:
                from service.data.tables import Customer

                table: Table = Customer.__table__  # type: ignore[assignment]  # a declarative class's __table__ is its Table
                # The primary key too, with the foreign keys that refer to it: kept, each
                # row went into its index (0.14 s of the server's 0.37 s for 250k rows;
                # built after the load, 0.06 s). The tables whose keys refer to customers
                # are locked first, as a writer of one of them (feedback) takes it and
                # then checks its key against customers: the other order could deadlock.
                referring = _referring(table)
                quote = conn.dialect.identifier_preparer.format_table
                tables = dict.fromkeys(quote(fk.table) for fk in referring)
                conn.exec_driver_sql(
                    f"LOCK TABLE {', '.join([*tables, quote(table)])} IN ACCESS EXCLUSIVE MODE"
                )
                for fk in referring:
                    conn.execute(DropConstraint(fk))
                conn.execute(DropConstraint(table.primary_key))
                unique = next(c for c in table.constraints if isinstance(c, UniqueConstraint))
                conn.execute(DropConstraint(unique))
                # The table's indexes (updated_at) are built once after the load too:
                # kept, each row went into them (2.4 to 2.9 s for 1M rows, one run).
                indexes = list(table.indexes)
                for index in indexes:
                    index.drop(conn)
                if _customers_stored(conn):  # stored before the lock was taken
                    raise _NotDirect
            first_id = _reserve_customer_ids(conn, rows) if rows else None
            columns = _CUSTOMER_DIRECT if first_id is None else ("id", *_CUSTOMER_DIRECT)
            with _copy_binary(conn, "customers", columns, queued=True) as write:
                for staged in checks.checked(chunks):
                    if not problems.problems:
                        if first_id is None:
                            write(_customer_records(staged, None))
                        elif rows is not None and summary.added + staged.num_rows <= rows:
                            write(_customer_records(staged, first_id + summary.added))
                        else:  # more rows than ids taken: not a file count_rows counted
                            raise _NotDirect
                        summary.added += staged.num_rows
            if summary.rows_read == 0:
                problems.add(None, None, "the file has no rows")
            problems.raise_if_any()
            if unique is not None:
                # The sort of every id in memory rather than in files on disk.
                conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
                conn.execute(AddConstraint(table.primary_key))
                conn.execute(AddConstraint(unique))
                for index in indexes:
                    index.create(conn)
                for fk in referring:
                    conn.execute(AddConstraint(fk))
    except (_NotDirect, psycopg.IntegrityError, IntegrityError):
        summary.added = 0
        return False
    summary.extra["attribute_changes"] = 0
    return True


def _referring(table: Table) -> list[ForeignKeyConstraint]:
    """The foreign keys of other tables that refer to ``table``."""
    return [
        fk
        for other in table.metadata.sorted_tables
        for fk in other.foreign_key_constraints
        if fk.referred_table is table and other is not table
    ]


def _customers_stored(conn: Connection) -> bool:
    return conn.exec_driver_sql("SELECT 1 FROM customers LIMIT 1").first() is not None


def _reserve_customer_ids(conn: Connection, count: int) -> int:
    """Take ``count`` consecutive customer ids from their sequence at once; return the
    first.

    The COPY then gives each row its id, instead of the server calling ``nextval`` for
    each (a fifth of its work). The sequence moves past them in one statement; a writer
    calling ``nextval`` inside that statement could get one of them too, and then the
    primary key rejects the second row holding it (the load gives way to the staged
    path). Ids not used (blank lines, a failed import) are a gap, as after a rollback.
    """
    sequence = "pg_get_serial_sequence('customers', 'id')"
    return int(
        conn.execute(
            text(f"SELECT setval({sequence}, nextval({sequence}) + :n - 1) - :n + 1"),
            {"n": count},
        ).scalar_one()
    )


_ID_FIELD = np.dtype([("length", ">i4"), ("id", ">i8")])


def _customer_records(rows: pa.Table, first_id: int | None) -> memoryview:
    """The :data:`_CUSTOMER_DIRECT` columns of ``rows`` in PostgreSQL's binary COPY
    format, after their ids (numbered from ``first_id``; None: none, the server numbers
    them), built by Arrow: each field is its length in bytes (-1 for null) and its
    bytes, and one join glues them row by row. The server parses no CSV and no date:
    texts go as UTF-8, dates as days since 2000-01-01, ``attributes`` as JSONB (format
    version 1, then the text)."""
    n = rows.num_rows
    fields = len(_CUSTOMER_DIRECT) + (first_id is not None)
    pieces = [pa.repeat(pa.scalar(fields.to_bytes(2, "big"), pa.binary()), n)]
    if first_id is not None:
        ids = np.empty(n, dtype=_ID_FIELD)
        ids["length"] = 8
        ids["id"] = np.arange(first_id, first_id + n, dtype=np.int64)
        fixed = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(_ID_FIELD.itemsize), n, [None, pa.py_buffer(ids.tobytes())]
        )
        pieces.append(fixed.cast(pa.binary()))
    for name in _CUSTOMER_DIRECT:
        column = rows.column(name).combine_chunks()
        if pa.types.is_date32(column.type):
            valid = _arrow_bool(pc.is_valid(column))
            data = pc.if_else(pa.array(valid), _big_endian(_days(column) - _PG_EPOCH_DAYS), b"")
            lengths = np.where(valid, 4, -1)
        else:
            data = column.cast(pa.binary())
            if name == "attributes":
                data = pc.binary_join_element_wise(b"\x01", data, b"")
            lengths = np.asarray(
                pc.fill_null(pc.binary_length(data), -1).to_numpy(zero_copy_only=False)
            )
            data = pc.fill_null(data, b"")
        pieces += [_big_endian(lengths), data]
    joined = pc.binary_join_element_wise(*pieces, b"")
    if n == 0:
        return memoryview(b"")
    _, offsets, data = joined.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32)[joined.offset : joined.offset + n + 1]
    return memoryview(data)[int(bounds[0]) : int(bounds[-1])]


def _big_endian(values: np.ndarray) -> pa.Array:
    """Numbers as 4-byte big-endian binary values (the int32 of binary COPY)."""
    raw = np.ascontiguousarray(values, dtype=">i4").tobytes()
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(4), len(values), [None, pa.py_buffer(raw)]
    )
    return fixed.cast(pa.binary())


def _check_attribute_names(
    columns: Sequence[str], stored: dict[str, str], limit: int, problems: _Collector
) -> None:
    """Report attribute columns whose name is invalid, differs from another only in case,
    or would take the bank past ``limit`` attributes."""
    seen: list[str] = list(stored)
    new = 0
    for name in columns:
        problem = validation.attribute_name_problem(name)
        if problem is None and name not in stored:
            clash = validation.case_clash(name, seen)
            if clash is not None:
                problem = f"differs only in case from attribute '{clash}'"
            else:
                new += 1
                problem = validation.attribute_cap_problem(len(stored), new, limit)
        if problem is not None:
            problems.add(None, name, problem)
        seen.append(name)


def _stage_customer_chunk(
    table: pa.Table,
    first: int,
    problems: _Collector,
    attribute_columns: Sequence[str],
    kinds: dict[str, str],
    stored_kinds: dict[str, str],
    categorical: Sequence[str],
    numeric: Sequence[str],
    today: dt.date,
) -> pa.Table:
    """Check one chunk of customers (Arrow text columns, first row numbered ``first``);
    return its rows to store, as the columns of :data:`_CUSTOMER_STAGE`.

    Vectorised (Arrow and NumPy): Python runs once per problem, not per row. Problems
    are reported column by column in the file's order of checks (ids, dates, labels,
    attributes, then ids too long). A row without an id is left out; attributes become
    one JSON object per row, as ``orjson.dumps(..., OPT_SORT_KEYS)`` writes it, without
    the attributes the row has no value for.
    """
    n = table.num_rows
    names = table.column_names
    ids = _column(table, "customer_id")
    for i in np.flatnonzero(_arrow_missing(ids)).tolist():
        problems.add(first + i, "customer_id", "missing value")
    days: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in ("joined_at", "birth_date"):
        if name in names:
            days[name] = _arrow_dates(
                _column(table, name),
                name,
                first,
                problems,
                required=False,
                today=today,
                future=name != "birth_date",
            )
    if VALID_FROM in names:
        days[VALID_FROM] = _arrow_dates(
            _column(table, VALID_FROM),
            VALID_FROM,
            first,
            problems,
            required=False,
            today=today + dt.timedelta(days=1),
        )
    labels = {name: _column(table, name) for name in ("segment", "branch_id") if name in names}
    for name, raw in labels.items():
        _arrow_lengths(raw, name, validation.MAX_LABEL, first, problems)
    values: dict[str, pa.Array] = {}
    for name in attribute_columns:
        raw = _column(table, name)
        missing = _arrow_missing(raw)
        parsed: tuple[np.ndarray, np.ndarray] | None = None
        if name not in kinds and (~missing).any():
            parsed = _arrow_numbers(raw, missing)
            if name in categorical:
                kinds[name] = "categorical"
            elif name in numeric or not parsed[1].any():
                kinds[name] = "numeric"
            else:
                kinds[name] = "categorical"
        if kinds.get(name) == "numeric":
            numbers, not_number = parsed or _arrow_numbers(raw, missing)
            origin = (
                "is numeric" if name in stored_kinds else "was taken as numeric from earlier rows"
            )
            for i in np.flatnonzero(not_number).tolist():
                problems.add(
                    first + i,
                    name,
                    f"not a number: '{raw[i].as_py()}' (attribute '{name}' {origin}; "
                    "use --categorical to import it as text)",
                )
            outside = ~np.isnan(numbers) & ~(np.abs(numbers) <= validation.MAX_MAGNITUDE)
            for i in np.flatnonzero(outside).tolist():
                reason = validation.number_problem(float(numbers[i])) or "not a storable number"
                problems.add(first + i, name, f"{reason}: '{raw[i].as_py()}'")
            numbers[outside] = np.nan
            values[name] = _json_numbers(numbers)
        else:
            _arrow_lengths(raw, name, validation.MAX_ATTRIBUTE_TEXT, first, problems)
            values[name] = _json_texts(raw, missing)
    empty = _arrow_bool(pc.equal(ids, ""))
    long = _arrow_bool(pc.greater(pc.utf8_length(ids), validation.MAX_CUSTOMER_ID)) & ~empty
    for i in np.flatnonzero(long).tolist():
        problems.add(
            first + i, "customer_id", f"longer than {validation.MAX_CUSTOMER_ID} characters"
        )

    def label(name: str) -> pa.Array:
        raw = labels.get(name)
        if raw is None:
            return pa.nulls(n, pa.string())
        return pc.if_else(pc.equal(raw, ""), pa.scalar(None, pa.string()), raw)

    def day(name: str) -> pa.Array:
        if name not in days:
            return pa.nulls(n, pa.date32())
        number, ok = days[name]
        return pa.array(number, type=pa.int32(), mask=~ok).cast(pa.date32())

    rows = pa.table(
        {
            "row_no": pa.array(np.arange(first, first + n, dtype=np.int64)),
            "external_id": ids,
            "segment": label("segment"),
            "branch_id": label("branch_id"),
            "joined_at": day("joined_at"),
            "birth_date": day("birth_date"),
            "attributes": _attributes_json(values, n),
            "present": pa.repeat(pa.scalar(json.dumps(sorted(attribute_columns))), n),
            "valid_from": day(VALID_FROM),
        }
    )
    return rows.filter(pa.array(~empty & ~long))


def _arrow_lengths(
    raw: pa.Array, column: str, limit: int, first: int, problems: _Collector
) -> None:
    """Report cells longer than ``limit`` characters, or holding a NUL character."""
    for i in np.flatnonzero(_arrow_bool(pc.greater(pc.utf8_length(raw), limit))).tolist():
        problems.add(first + i, column, f"longer than {limit} characters")
    for i in np.flatnonzero(_arrow_bool(pc.match_substring(raw, "\x00"))).tolist():
        problems.add(first + i, column, "contains the NUL character (U+0000)")


_PLAIN_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def _arrow_numbers(raw: pa.Array, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells of ``raw`` as pandas' ``to_numeric`` reads them: (floats, NaN where none;
    which are neither numbers nor missing).

    Plain decimals (``-12``, ``3.5e-2``) are parsed by Arrow, which rounds as pandas
    does; any other text (``inf``, ``1_000``, words) by pandas itself.
    """
    values = np.full(len(raw), np.nan)
    plain = _arrow_bool(pc.match_substring_regex(raw, _PLAIN_NUMBER)) & ~missing
    if plain.any():
        parsed = pc.cast(raw.filter(pa.array(plain)), pa.float64())
        values[plain] = parsed.to_numpy(zero_copy_only=False)
        values[values == 0] = 0.0  # -0 as 0, as PostgreSQL stores it
    other = np.flatnonzero(~plain & ~missing)
    if other.size:
        # Each distinct text once: a column of words (a region, a grade) is all "other",
        # and made Python strings one per row it took 60 ms of a 100k-row chunk.
        encoded = pc.dictionary_encode(raw.take(pa.array(other)))
        texts = pd.Series(encoded.dictionary.to_pylist(), dtype=object)
        again = pd.to_numeric(texts, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        values[other] = again[encoded.indices.to_numpy()]
    return values, np.isnan(values) & ~missing


def _json_numbers(values: np.ndarray) -> pa.Array:
    """Each number as orjson writes it (null where NaN): one orjson call for the chunk,
    split at its commas."""
    valid = ~np.isnan(values)
    dumped = orjson.dumps(np.ascontiguousarray(values[valid]), option=orjson.OPT_SERIALIZE_NUMPY)
    texts = pc.list_flatten(pc.split_pattern(pa.array([dumped[1:-1].decode()]), ","))
    position = np.cumsum(valid) - 1
    return texts.take(pa.array(position, mask=~valid))


def _json_texts(raw: pa.Array, missing: np.ndarray) -> pa.Array:
    """Each text as a JSON string, as orjson writes it (null where missing)."""
    escaped = pc.replace_substring(pc.replace_substring(raw, "\\", "\\\\"), '"', '\\"')
    quoted = pc.binary_join_element_wise('"', escaped, '"', "")
    control = np.flatnonzero(_arrow_bool(pc.match_substring_regex(raw, r"[\x00-\x1f]")))
    if control.size:  # rare: orjson's own escapes (\n, \u001f...)
        texts = quoted.to_pylist()
        for i in control.tolist():
            texts[i] = orjson.dumps(raw[i].as_py()).decode()
        quoted = pa.array(texts, type=pa.string())
    return pc.if_else(pa.array(missing), pa.scalar(None, pa.string()), quoted)


def _attributes_json(values: dict[str, pa.Array], n: int) -> pa.Array:
    """Each row's attributes as one JSON object, keys sorted, nulls left out: built
    column by column from each value's JSON text (null where the row has none)."""
    # Each value present as ',"name":value', absent as '', all joined; then the first
    # comma dropped. (Arrow's join with null_handling="skip" loses rows that are all null.)
    pieces = [
        pc.fill_null(
            pc.binary_join_element_wise("," + orjson.dumps(name).decode() + ":", values[name], ""),
            "",
        )
        for name in sorted(values)
    ]
    if not pieces:
        return pa.repeat(pa.scalar("{}"), n)
    body = pc.binary_join_element_wise(*pieces, "") if len(pieces) > 1 else pieces[0]
    return pc.binary_join_element_wise("{", pc.utf8_slice_codeunits(body, 1), "}", "")


def _merge_customers(
    conn: Connection, summary: ImportSummary, total_rows: int, default_day: dt.date
) -> None:
    """Update existing customers (merging attributes and their history in Python, page by
    page, so memory stays bounded), then insert the new ones with one INSERT ... SELECT.

    A changed attribute, segment or branch goes through :func:`history.apply_change`
    from the row's ``valid_from`` (else ``default_day``); its stored changes are read
    for the page's customers in one query (customers without any cost nothing).
    """
    has_column = {
        name: conn.exec_driver_sql(
            f"SELECT 1 FROM stage_customers WHERE {name} IS NOT NULL LIMIT 1"
        ).first()
        is not None
        for name in ("segment", "branch_id", "joined_at", "birth_date")
    }
    now = dt.datetime.now(dt.UTC)
    page = 50_000
    writes = history.HistoryWrites()
    for low in range(0, total_rows, page):
        window = {"low": low, "high": low + page}
        rows = conn.execute(
            text(
                "SELECT s.segment, s.branch_id, s.joined_at, s.birth_date, s.attributes, "
                "s.present, s.valid_from, c.id, c.segment, c.branch_id, c.joined_at, "
                "c.birth_date, c.attributes FROM stage_customers s "
                "JOIN customers c ON c.external_id = s.external_id "
                "WHERE s.row_no > :low AND s.row_no <= :high"
            ),
            window,
        ).fetchall()
        stored = history.read_changes(
            conn,
            "ch.customer_id IN (SELECT c.id FROM stage_customers s JOIN customers c "
            "ON c.external_id = s.external_id WHERE s.row_no > :low AND s.row_no <= :high)",
            window,
        )
        updates: list[dict[str, Any]] = []
        for seg, branch, joined, born, attrs, present, day, cid, *old_values in rows:
            o_seg, o_branch, o_joined, o_born, o_attrs = old_values
            old = {
                "segment": o_seg,
                "branch_id": o_branch,
                "joined_at": _as_date(o_joined),
                "birth_date": _as_date(o_born),
            }
            new = {
                "segment": seg,
                "branch_id": branch,
                "joined_at": _as_date(joined),
                "birth_date": _as_date(born),
            }
            for name in old:
                if not has_column[name]:
                    new[name] = old[name]
            old_attrs = _json_value(o_attrs) or {}
            staged = json.loads(attrs)
            merged = dict(old_attrs)
            # The values this row sets: its attribute columns (an empty cell is unknown),
            # and the segment and branch when the file has them.
            values = [(name, old_attrs.get(name), staged.get(name)) for name in json.loads(present)]
            values += [(f, old[f], new[f]) for f in history.HISTORY_FIELDS if has_column[f]]
            first_day = _as_date(day) or default_day
            history_changed = False
            for name, current, value in values:
                before = stored.get((cid, name), [])
                result = history.apply_change(before, current, first_day, value)
                if result is None:
                    current_value = current
                else:
                    changes, current_value = result
                    if changes != before:
                        writes.replace(cid, name, before, changes)
                        history_changed = True
                if name in history.HISTORY_FIELDS:
                    new[name] = current_value
                elif current_value is None:
                    merged.pop(name, None)
                else:
                    merged[name] = current_value
            if old == new and merged == old_attrs and not history_changed:
                summary.unchanged += 1
                continue
            updates.append(
                {**new, "attributes": json.dumps(merged, sort_keys=True), "id": cid, "now": now}
            )
        if updates:
            conn.execute(
                text(
                    "UPDATE customers SET segment = :segment, branch_id = :branch_id, "
                    "joined_at = :joined_at, birth_date = :birth_date, attributes = :attributes, "
                    "updated_at = :now WHERE id = :id"
                ),
                updates,
            )
            summary.updated += len(updates)
        writes.write(conn)
    summary.extra["attribute_changes"] = writes.added
    summary.added = _insert_new_customers(conn, now)


def _insert_new_customers(conn: Connection, now: dt.datetime) -> int:
    """Insert the staged customers not stored yet; returns how many."""
    attributes = (
        "CAST(s.attributes AS JSONB)" if conn.dialect.name == "postgresql" else "s.attributes"
    )
    return int(
        conn.execute(
            text(
                "INSERT INTO customers (external_id, segment, branch_id, joined_at, birth_date, "
                f"attributes, updated_at) SELECT s.external_id, s.segment, s.branch_id, s.joined_at, "
                f"s.birth_date, {attributes}, :now FROM stage_customers s WHERE NOT EXISTS "
                "(SELECT 1 FROM customers c WHERE c.external_id = s.external_id)"
            ),
            {"now": now},
        ).rowcount
    )


# --------------------------------------------------------------------------- adoptions


def import_adoptions(
    engine: Engine,
    path: Path,
    *,
    chunk_rows: int = 100_000,
    max_errors: int = 20,
    today: dt.date | None = None,
    bulk_rows: int = 200_000,
    progress: ProgressFn | None = None,
) -> ImportSummary:
    """Import adoptions: ``customer_id,product_code,adopted_at[,closed_at]``.

    An adoption is identified by customer, product and adoption date; a
    re-imported adoption whose ``closed_at`` changed is updated. Customers and
    products must exist already. Files of ``bulk_rows`` rows or more take the
    bulk path on PostgreSQL (see :func:`_bulk_constraints`); 0 turns it off.

    The file is read ``chunk_rows`` rows at a time (CSV by Arrow's streaming
    reader), each chunk checked with vectorised code and streamed into the
    staging table through one COPY, so memory does not grow with the file.
    """
    started = time.perf_counter()
    problems = _Collector(str(path), max_errors)
    summary = ImportSummary("adoptions", str(path))
    today = today or dt.date.today()
    header, chunks = read_text_chunks(path, chunk_rows)
    _check_columns(header, problems, required=ADOPTION_REQUIRED, allowed=ADOPTION_COLUMNS)
    problems.raise_if_any()
    with engine.begin() as conn:
        catalogue = _catalogue(conn)
        if _load_adoptions_directly(
            conn, path, chunk_rows, problems, summary, catalogue, today, bulk_rows, progress
        ):
            summary.seconds = time.perf_counter() - started
            return summary
        summary.rows_read = 0
        _, chunks = read_text_chunks(path, chunk_rows)
        stage = _Stage(
            conn,
            "stage_adoptions",
            [
                ("row_no", "BIGINT"),
                ("external_id", "TEXT"),
                ("product_id", "INTEGER"),
                ("adopted_at", "DATE"),
                ("closed_at", "DATE"),
            ],
        )
        with stage.writer() as write:
            for first, table in chunks:
                summary.rows_read += table.num_rows
                staged = _stage_adoption_chunk(table, first, problems, catalogue, today)
                if not problems.full:
                    write(staged)
                if progress:
                    progress(table.num_rows)
        problems.raise_if_any()
        if stage.postgres:
            summary.updated, summary.added = _merge_adoptions_postgres(
                conn, problems, catalogue, rows=summary.rows_read, bulk_rows=bulk_rows
            )
        else:
            resolved = _resolve_customers(conn, stage.name, problems)
            _report_duplicate_adoptions(conn, resolved, problems, catalogue)
            summary.rejected = len(problems.rejected_rows)
            problems.raise_if_any()
            summary.updated, summary.added = _merge_adoptions(conn, resolved, "import")
            _drop_temp(conn, resolved)
        summary.unchanged = summary.rows_read - summary.added - summary.updated
        stage.drop()
    summary.seconds = time.perf_counter() - started
    return summary


class _NotDirect(Exception):
    """The direct load does not apply (the stage path follows)."""


_DIRECT_MAX_CUSTOMERS = 2_000_000
"""Most customers whose ids the direct load holds in memory (about 100 bytes each)."""


def _load_adoptions_directly(
    conn: Connection,
    path: Path,
    chunk_rows: int,
    problems: _Collector,
    summary: ImportSummary,
    catalogue: dict[str, int],
    today: dt.date,
    bulk_rows: int,
    progress: ProgressFn | None,
) -> bool:
    """A bank's first load of adoptions on PostgreSQL: COPY each checked chunk straight
    into ``adoptions``, with no staging table; True if done.

    Applies to a file of at least ``bulk_rows`` rows when ``adoptions`` is empty (checked
    under the lock that dropping its constraints takes, so no row can match a stored
    one) and the bank has at most ``_DIRECT_MAX_CUSTOMERS`` customers (their ids are
    resolved in memory). Everything happens in a savepoint: a row repeated in the file
    fails the rebuild of the unique key, and then the staging path runs instead and
    reports it with its rows. Other problems fail the import as usual.
    """
    rows = count_rows(path)
    if conn.dialect.name != "postgresql" or bulk_rows <= 0 or rows is None or rows < bulk_rows:
        return False
    try:
        with conn.begin_nested(), _bulk_constraints(conn, rows, bulk_rows) as bulk:
            if bulk.unique is None:  # the table holds rows already
                raise _NotDirect
            if conn.exec_driver_sql("SELECT 1 FROM adoptions LIMIT 1").first() is not None:
                raise _NotDirect
            customers = _customer_index(conn)
            if customers is None:
                raise _NotDirect
            known, ids = customers
            lookup = IdLookup(known)
            _, chunks = read_text_chunks(path, chunk_rows)
            columns = ("customer_id", "product_id", "adopted_at", "closed_at")
            with _copy_binary(conn, "adoptions", columns) as write:
                for first, table in chunks:
                    summary.rows_read += table.num_rows
                    staged = _stage_adoption_chunk(table, first, problems, catalogue, today)
                    position = lookup.positions(staged.column("external_id"))
                    found = position >= 0
                    rows_of = staged.column("row_no").to_numpy()
                    for i in np.flatnonzero(~found).tolist():
                        ext = staged.column("external_id")[i].as_py()
                        problems.add(
                            int(rows_of[i]),
                            "customer_id",
                            f"unknown customer '{ext}' (import customers first)",
                        )
                    if not problems.problems:
                        closed = staged.column("closed_at")
                        write(
                            _adoption_records(
                                ids[position[found]],
                                _days(staged.column("product_id"))[found],
                                _days(staged.column("adopted_at"))[found],
                                _days(closed)[found],
                                _arrow_bool(pc.is_valid(closed))[found],
                            )
                        )
                    if progress:
                        progress(table.num_rows)
            summary.rejected = len(problems.rejected_rows)
            problems.raise_if_any()
            bulk.restore_unique()
    except (_NotDirect, IntegrityError):
        return False
    summary.added = summary.rows_read
    return True


def _customer_index(conn: Connection) -> tuple[pa.StringArray, np.ndarray] | None:
    """Every customer's external id and id, or None for a bank of more than
    ``_DIRECT_MAX_CUSTOMERS`` customers."""
    estimate = float(
        conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE oid = CAST('customers' AS regclass)"
        ).scalar_one()
    )
    if estimate > _DIRECT_MAX_CUSTOMERS:
        return None
    # Three long values, not a Python object per customer: the ids concatenated, and
    # their lengths in bytes and their numbers as big-endian binary (a customer id has
    # at most 128 characters, so at most 512 bytes: a smallint). Each aggregate reads
    # the rows in one order. At 1M customers this took 0.47 s where the lengths and
    # numbers as zero-padded decimal text took 0.95 s (0.38 s of it making the text).
    count, names, lengths, numbers = conn.exec_driver_sql(
        "SELECT COUNT(*), string_agg(external_id, ''), "
        "string_agg(int2send(CAST(octet_length(external_id) AS smallint)), ''::bytea), "
        "string_agg(int8send(id), ''::bytea) FROM customers"
    ).one()
    if count > _DIRECT_MAX_CUSTOMERS:
        return None
    if count == 0:
        return pa.array([], type=pa.string()), np.zeros(0, dtype=np.int64)
    data = names.encode()
    sizes = np.frombuffer(lengths, dtype=">i2").astype(np.int64)
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    external = pa.LargeStringArray.from_buffers(
        count, pa.py_buffer(offsets), pa.py_buffer(data)
    ).cast(pa.string())
    ids = np.frombuffer(numbers, dtype=">i8").astype(np.int64)
    return external, ids


_PACKED_MAX_BYTES = 64
"""Longest id (UTF-8 bytes) :class:`IdLookup` packs into integers; longer ones are
looked up as Python strings."""
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(31))


class IdLookup:
    """Positions of ids among a fixed set of distinct ids, for millions of lookups.

    Looked up as Python strings (a :class:`pandas.Index` of objects), each id costs
    making a ``str`` and hashing it: 0.48 s of a 3 s import of a million adoptions.
    Here each id's UTF-8 bytes are packed into 64-bit words with NumPy, a column of
    bytes at a time (an id has no NUL character, so the zero padding is unambiguous),
    the words folded into one 64-bit key, and the keys matched in an integer index; a
    match is then checked word for word, so two ids whose keys collide are never
    taken for one another. Ids longer than :data:`_PACKED_MAX_BYTES`, or known keys
    that collide, fall back to the string index.
    """

    def __init__(self, known: pa.Array) -> None:
        known = _plain_strings(known)
        self._strings: pd.Index | None = None
        self._words = np.zeros((0, 1), dtype=np.uint64)
        longest = int(pc.max(pc.binary_length(known)).as_py() or 0) if len(known) else 0
        if longest > _PACKED_MAX_BYTES:
            self._strings = pd.Index(known.to_pandas())
            return
        self._width = max(1, -(-longest // 8))
        words, _ = _packed(known, self._width)
        keys = pd.Index(_folded(words))
        if not keys.is_unique:
            self._strings = pd.Index(known.to_pandas())
            return
        self._words = words
        self._keys = keys

    def positions(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each id's position among the known ids (int64), -1 where it is not one."""
        ids = _plain_strings(ids)
        if self._strings is not None:
            return np.asarray(self._strings.get_indexer(ids.to_pandas()), dtype=np.int64)
        words, lengths = _packed(ids, self._width)
        found = np.asarray(self._keys.get_indexer(_folded(words)), dtype=np.int64)
        hit = np.flatnonzero(found >= 0)
        same = (self._words[found[hit]] == words[hit]).all(axis=1)
        found[hit[~same]] = -1
        found[lengths > self._width * 8] = -1  # cut short by the packing: no known id
        return found


def _plain_strings(values: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """``values`` as one ``string`` array (not chunked, not ``large_string``)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.type != pa.string():
        values = values.cast(pa.string())
    return values


def _packed(values: pa.StringArray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each string's UTF-8 bytes in ``width`` little-endian 64-bit words, zero-padded
    (cut at ``8 * width`` bytes), one row a string; and each string's length in bytes."""
    n = len(values)
    _, offsets_buffer, data_buffer = values.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[values.offset : values.offset + n + 1]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, dtype=np.uint8)
    )
    starts = offsets[:-1].astype(np.int64)
    lengths = offsets[1:] - offsets[:-1]
    out = np.zeros((n, width * 8), dtype=np.uint8)
    for j in range(width * 8):
        rows = np.flatnonzero(lengths > j)
        if not len(rows):
            break
        out[rows, j] = data[starts[rows] + j]
    return out.view("<u8"), lengths


def _folded(words: np.ndarray) -> np.ndarray:
    """One 64-bit key a row of words (a multiply-xorshift mix, wrapping)."""
    multiply, again, shift = _MIX
    key = words[:, 0] * multiply
    for k in range(1, words.shape[1]):
        key = (key ^ (key >> shift)) * again + words[:, k]
    return (key ^ (key >> shift)) * multiply


def _report_duplicate_adoptions(
    conn: Connection, table: str, problems: _Collector, catalogue: dict[str, int]
) -> None:
    """Report rows of ``table`` (a staging table with ``customer_id``) sharing one
    adoption key; the first 50 keys."""
    codes = {pid: code for code, pid in catalogue.items()}
    for ext, pid, adopted, lo, hi in conn.exec_driver_sql(
        # Integers grouped (no text compared); the id is looked up for a duplicate only.
        "SELECT (SELECT c.external_id FROM customers c WHERE c.id = s.customer_id), "
        f"s.product_id, s.adopted_at, MIN(s.row_no), MAX(s.row_no) FROM {table} s "
        "GROUP BY s.customer_id, s.product_id, s.adopted_at HAVING COUNT(*) > 1 "
        "ORDER BY MIN(s.row_no) LIMIT 50"
    ):
        problems.add(
            hi,
            None,
            f"duplicate key: customer '{ext}', product '{codes.get(pid, pid)}', "
            f"adopted_at {_date_text(adopted)} (also on row {lo})",
        )


def _merge_adoptions_postgres(
    conn: Connection, problems: _Collector, catalogue: dict[str, int], *, rows: int, bulk_rows: int
) -> tuple[int, int]:
    """Merge ``stage_adoptions`` into ``adoptions`` on PostgreSQL; returns (updated, added).

    Set-based and with as few passes over the rows as the checks allow. Into an empty
    table, one INSERT joins the customers: a duplicate key is caught by the unique
    constraint (kept, or rebuilt on the bulk path) and an unknown customer by
    ``customer_id``'s NOT NULL, inside a savepoint, and then explained by the
    diagnostic queries. Otherwise rows may match stored adoptions (two equal rows of
    a stored adoption break no constraint), so the staged rows are resolved and
    checked whole first, as on SQLite.
    """
    stage = "stage_adoptions"
    # The joins below hash every customer: let them in memory at once (a spilled
    # batch doubles the join), and spare them JIT compilation (tens of ms, no gain).
    conn.exec_driver_sql("SET LOCAL work_mem = '256MB'")
    conn.exec_driver_sql("SET LOCAL jit = off")
    join = f"FROM {stage} s LEFT JOIN customers c ON c.external_id = s.external_id"
    with _bulk_constraints(conn, rows, bulk_rows) as bulk:
        if conn.exec_driver_sql("SELECT 1 FROM adoptions LIMIT 1").first() is not None:
            # Rows may match stored adoptions: resolve customers once into a table, check
            # it whole, then update changed closures and add the new rows.
            resolved = _resolve_customers(conn, stage, problems)
            _report_duplicate_adoptions(conn, resolved, problems, catalogue)
            problems.raise_if_any()
            try:
                with conn.begin_nested():
                    updated, added = _merge_adoptions(conn, resolved, "import")
                    bulk.restore_unique()
            except IntegrityError:
                _concurrent_write(problems)
            _drop_temp(conn, resolved)
            return updated, added
        try:
            with conn.begin_nested():
                added = conn.exec_driver_sql(
                    "INSERT INTO adoptions (customer_id, product_id, adopted_at, closed_at, source) "
                    f"SELECT c.id, s.product_id, s.adopted_at, s.closed_at, 'import' {join}"
                ).rowcount
                bulk.restore_unique()
        except IntegrityError:
            _report_adoption_problems(conn, problems, catalogue)
            _concurrent_write(problems)
    return 0, int(added)


def _concurrent_write(problems: _Collector) -> None:
    """Raise for a constraint broken though the checks passed: someone else wrote."""
    if not problems.problems:
        problems.add(
            None,
            None,
            "an adoption of the file was stored by someone else during the import "
            "(import the file again)",
        )
    problems.raise_if_any()


def _report_adoption_problems(
    conn: Connection, problems: _Collector, catalogue: dict[str, int]
) -> None:
    """Report staged adoptions of unknown customers and duplicate keys (PostgreSQL)."""
    for row, ext in conn.exec_driver_sql(
        "SELECT s.row_no, s.external_id FROM stage_adoptions s LEFT JOIN customers c "
        "ON c.external_id = s.external_id WHERE c.id IS NULL ORDER BY s.row_no LIMIT 50"
    ):
        problems.add(row, "customer_id", f"unknown customer '{ext}' (import customers first)")
    codes = {pid: code for code, pid in catalogue.items()}
    for ext, pid, adopted, lo, hi in conn.exec_driver_sql(
        "SELECT external_id, product_id, adopted_at, MIN(row_no), MAX(row_no) FROM "
        "stage_adoptions GROUP BY external_id, product_id, adopted_at "
        "HAVING COUNT(*) > 1 ORDER BY MIN(row_no) LIMIT 50"
    ):
        problems.add(
            hi,
            None,
            f"duplicate key: customer '{ext}', product '{codes.get(pid, pid)}', "
            f"adopted_at {_date_text(adopted)} (also on row {lo})",
        )


def _stage_adoption_chunk(
    table: pa.Table,
    first: int,
    problems: _Collector,
    catalogue: dict[str, int],
    today: dt.date,
) -> pa.Table:
    """Check one chunk of adoptions (Arrow text columns); return its good rows as
    ``row_no, external_id, product_id, adopted_at, closed_at``."""
    n = table.num_rows
    ids = _column(table, "customer_id")
    missing_ids = _arrow_missing(ids)
    for i in np.flatnonzero(missing_ids).tolist():
        problems.add(first + i, "customer_id", "missing value")
    nul = _arrow_bool(pc.match_substring(ids, "\x00"))
    for i in np.flatnonzero(nul).tolist():
        problems.add(first + i, "customer_id", "contains the NUL character (U+0000)")
    codes = _column(table, "product_code")
    known = pa.array(list(catalogue), type=pa.string())
    position = pc.index_in(codes, value_set=known)
    unknown = _arrow_bool(pc.is_null(position))
    for i in np.flatnonzero(unknown).tolist():
        shown = codes[i].as_py()
        problems.add(
            first + i,
            "product_code",
            f"unknown product '{shown}'" if shown else "missing value",
        )
    ids_of = np.array(list(catalogue.values()) or [0], dtype=np.int32)
    product_ids = ids_of[pc.fill_null(position, 0).to_numpy(zero_copy_only=False)]
    # An adoption or closure is an event that happened: not after today (one day of
    # grace for clocks in other time zones).
    until = today + dt.timedelta(days=1)
    adopted, adopted_ok = _arrow_dates(
        _column(table, "adopted_at"), "adopted_at", first, problems, required=True, today=until
    )
    if "closed_at" in table.column_names:
        closed, closed_ok = _arrow_dates(
            _column(table, "closed_at"), "closed_at", first, problems, required=False, today=until
        )
    else:
        closed, closed_ok = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=bool)
    before = adopted_ok & closed_ok & (closed < adopted)
    for i in np.flatnonzero(before).tolist():
        problems.add(
            first + i,
            "closed_at",
            f"closed_at {_EPOCH + dt.timedelta(days=int(closed[i]))} is before adopted_at "
            f"{_EPOCH + dt.timedelta(days=int(adopted[i]))}",
        )
    ok = ~unknown & ~missing_ids & ~nul & adopted_ok
    keep = pa.array(ok)
    return pa.table(
        {
            "row_no": pa.array(np.arange(first, first + n, dtype=np.int64)[ok]),
            "external_id": ids.filter(keep),
            "product_id": pa.array(product_ids[ok], type=pa.int32()),
            "adopted_at": pa.array(adopted[ok], type=pa.int32()).cast(pa.date32()),
            "closed_at": pa.array(closed[ok], type=pa.int32(), mask=~closed_ok[ok]).cast(
                pa.date32()
            ),
        }
    )


def _drop_temp(conn: Connection, name: str) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")


def _resolve_customers(conn: Connection, table: str, problems: _Collector) -> str:
    """Report external ids no customer has; return a temporary table of the staged
    rows of ``table`` with their ``customer_id`` (one join, not a lookup per row)."""
    postgres = conn.dialect.name == "postgresql"
    resolved = f"{table}_resolved"
    suffix = " ON COMMIT DROP" if postgres else ""
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {resolved}")
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {resolved}{suffix} AS SELECT s.*, c.id AS customer_id "
        f"FROM {table} s LEFT JOIN customers c ON c.external_id = s.external_id"
    )
    for row, ext in conn.exec_driver_sql(
        f"SELECT row_no, external_id FROM {resolved} WHERE customer_id IS NULL "
        "ORDER BY row_no LIMIT 50"
    ):
        problems.add(row, "customer_id", f"unknown customer '{ext}' (import customers first)")
    if problems.problems:  # the caller raises; unknown rows must not count as duplicates
        conn.exec_driver_sql(f"DELETE FROM {resolved} WHERE customer_id IS NULL")
    if postgres:
        conn.exec_driver_sql(f"ANALYZE {resolved}")
    return resolved


class _BulkLoad:
    """The adoptions constraints a bulk load set aside; :meth:`restore_unique` puts the
    unique constraint back (inside the caller's savepoint, so a duplicate is reported)."""

    def __init__(self, conn: Connection, unique: UniqueConstraint | None) -> None:
        self.conn = conn
        self.unique = unique

    def restore_unique(self) -> None:
        if self.unique is not None:
            self.conn.execute(AddConstraint(self.unique))
            self.unique = None


@contextmanager
def _bulk_constraints(conn: Connection, rows: int, bulk_rows: int) -> Iterator[_BulkLoad]:
    """On PostgreSQL, for a batch of at least ``bulk_rows`` rows, drop the adoptions
    foreign keys for the load and add them back after it; when the batch is larger
    than the table already is, drop and rebuild its unique key too.

    Adding a foreign key back validates every row in one set-based pass, where
    keeping it costs a locking lookup per inserted row (more than half the
    import's time at 1M rows); building a unique index once by sorting is cheaper
    than inserting each row into it at random places, when the table is not much
    bigger than the batch. Both happen in the import's transaction, so a failure
    restores the constraints with everything else; the price is that the adoptions
    table is locked against readers until the import commits.
    """
    if conn.dialect.name != "postgresql" or bulk_rows <= 0 or rows < bulk_rows:
        yield _BulkLoad(conn, None)
        return
    from service.data.tables import Adoption

    table: Table = Adoption.__table__  # type: ignore[assignment]  # a declarative class's __table__ is its Table
    constraints = [c for c in table.constraints if isinstance(c, ForeignKeyConstraint)]
    for constraint in constraints:
        conn.execute(DropConstraint(constraint))
    # reltuples is the planner's estimate (-1 before the first ANALYZE, then 0 is
    # checked directly); an estimate is enough to choose the cheaper path.
    stored = float(
        conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE oid = CAST('adoptions' AS regclass)"
        ).scalar_one()
    )
    if stored < 0:
        empty = conn.exec_driver_sql("SELECT 1 FROM adoptions LIMIT 1").first() is None
        stored = 0 if empty else math.inf
    unique = None
    if stored < rows:
        unique = next(c for c in table.constraints if isinstance(c, UniqueConstraint))
        conn.execute(DropConstraint(unique))
    bulk = _BulkLoad(conn, unique)
    yield bulk
    bulk.restore_unique()
    for constraint in constraints:
        conn.execute(AddConstraint(constraint))


def _merge_adoptions(conn: Connection, table: str, source: str) -> tuple[int, int]:
    """Update changed closures, then insert new adoptions; returns (updated, added)."""
    distinct = _distinct(conn, "adoptions.closed_at", "s.closed_at")
    updated = conn.exec_driver_sql(
        f"UPDATE adoptions SET closed_at = s.closed_at FROM {table} s "
        "WHERE adoptions.customer_id = s.customer_id AND adoptions.product_id = s.product_id "
        f"AND adoptions.adopted_at = s.adopted_at AND {distinct}"
    ).rowcount
    added = conn.exec_driver_sql(
        "INSERT INTO adoptions (customer_id, product_id, adopted_at, closed_at, source) "
        f"SELECT s.customer_id, s.product_id, s.adopted_at, s.closed_at, '{source}' FROM {table} s "
        "WHERE NOT EXISTS (SELECT 1 FROM adoptions a WHERE a.customer_id = s.customer_id "
        "AND a.product_id = s.product_id AND a.adopted_at = s.adopted_at)"
    ).rowcount
    return int(updated), int(added)


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class SnapshotOptions:
    """How to read a monthly holdings snapshot file.

    ``product_columns`` are column names or glob patterns (``ind_*_ult1``);
    ``product_map`` renames a column to a product code (default: the column
    name itself). With ``create_products``, product codes not in the catalogue
    are added (name = code, category ``unknown``, value 0) instead of failing.
    """

    id_column: str = "customer_id"
    date_column: str = "snapshot_date"
    product_columns: tuple[str, ...] = ()
    product_map: dict[str, str] = field(default_factory=dict)
    create_products: bool = False


def import_snapshots(
    engine: Engine,
    path: Path,
    options: SnapshotOptions,
    *,
    chunk_rows: int = 100_000,
    max_errors: int = 20,
    today: dt.date | None = None,
    progress: ProgressFn | None = None,
) -> ImportSummary:
    """Derive adoptions from monthly holding snapshots (one 0/1 column per product).

    Each customer's rows must come in date order (any interleaving of
    customers is fine). A 0 -> 1 flip between consecutive snapshots is an
    adoption dated at the later snapshot, a 1 -> 0 flip closes it. Products
    held at a customer's first snapshot in the file are recorded as held
    since that date (source ``snapshot_initial``: the true adoption date is
    unknown), unless an adoption already open at that date is on record.
    Empty or ``NA`` flags carry the previous month's value. Customers not yet
    known are created.
    """
    started = time.perf_counter()
    problems = _Collector(str(path), max_errors)
    summary = ImportSummary("snapshots", str(path))
    today = today or dt.date.today()
    state: dict[str, tuple[int, int]] = {}  # external id -> (last date ordinal, holdings bitmask)
    with engine.begin() as conn:
        catalogue = _catalogue(conn)
        opens = _Stage(
            conn,
            "stage_snapshot_opens",
            [
                ("row_no", "BIGINT"),
                ("external_id", "VARCHAR(128)"),
                ("product_id", "INTEGER"),
                ("adopted_at", "DATE"),
                ("closed_at", "DATE"),
                ("initial", "INTEGER"),
            ],
        )
        closes = _Stage(
            conn,
            "stage_snapshot_closes",
            [("external_id", "VARCHAR(128)"), ("product_id", "INTEGER"), ("closed_at", "DATE")],
        )
        columns: list[str] = []
        codes: list[str] = []
        for first, frame in read_chunks(path, chunk_rows):
            if first == 1:
                columns, codes = _snapshot_header(frame.columns, options, problems)
                problems.raise_if_any()
                unknown = [c for c in codes if c not in catalogue]
                if unknown and options.create_products:
                    for code in unknown:
                        conn.execute(
                            text(
                                "INSERT INTO products (code, name, category, value) "
                                "VALUES (:c, :c, 'unknown', 0)"
                            ),
                            {"c": code},
                        )
                    summary.extra["products_created"] = len(unknown)
                    catalogue = _catalogue(conn)
                elif unknown:
                    for column, code in zip(columns, codes, strict=True):
                        if code in unknown:
                            problems.add(
                                None,
                                column,
                                f"unknown product '{code}' (import it in the catalogue, map the "
                                "column with --map COLUMN=CODE, or pass --create-products)",
                            )
                    problems.raise_if_any()
            summary.rows_read += len(frame)
            opened, closed = _snapshot_chunk(
                frame,
                first,
                problems,
                options,
                columns,
                [catalogue[c] for c in codes],
                state,
                today,
            )
            if not problems.full:
                opens.insert(opened)
                closes.insert(closed)
            if progress:
                progress(len(frame))
        if summary.rows_read == 0:
            problems.add(None, None, "the file has no rows")
        summary.rejected = len(problems.rejected_rows)
        problems.raise_if_any()

        # Customers not yet known are created bare; attributes come from `import customers`.
        empty = "CAST('{}' AS JSONB)" if conn.dialect.name == "postgresql" else "'{}'"
        created = conn.exec_driver_sql(
            f"INSERT INTO customers (external_id, attributes) SELECT DISTINCT o.external_id, {empty} "
            "FROM stage_snapshot_opens o WHERE NOT EXISTS "
            "(SELECT 1 FROM customers c WHERE c.external_id = o.external_id)"
        ).rowcount
        summary.extra["customers_created"] = int(created)
        _resolve_customers(conn, opens.name, problems)
        problems.raise_if_any()
        closes.index("external_id", "product_id", "closed_at")
        # Opens and closes of one customer and product alternate, so each open's
        # closure is the first close after it.
        conn.exec_driver_sql(
            "UPDATE stage_snapshot_opens_resolved SET closed_at = (SELECT MIN(c.closed_at) FROM "
            "stage_snapshot_closes c WHERE c.external_id = stage_snapshot_opens_resolved.external_id "
            "AND c.product_id = stage_snapshot_opens_resolved.product_id "
            "AND c.closed_at > stage_snapshot_opens_resolved.adopted_at)"
        )
        # A product already held when the file starts continues the open adoption on record.
        distinct = _distinct(conn, "adoptions.closed_at", "s.closed_at")
        continued = conn.exec_driver_sql(
            f"UPDATE adoptions SET closed_at = s.closed_at FROM stage_snapshot_opens_resolved s "
            "WHERE s.initial = 1 AND adoptions.customer_id = s.customer_id "
            "AND adoptions.product_id = s.product_id AND adoptions.adopted_at < s.adopted_at "
            "AND (adoptions.closed_at IS NULL OR adoptions.closed_at >= s.adopted_at) "
            f"AND {distinct}"
        ).rowcount
        conn.exec_driver_sql(
            "DELETE FROM stage_snapshot_opens_resolved WHERE initial = 1 AND EXISTS (SELECT 1 FROM adoptions a "
            "WHERE a.customer_id = stage_snapshot_opens_resolved.customer_id "
            "AND a.product_id = stage_snapshot_opens_resolved.product_id "
            "AND a.adopted_at < stage_snapshot_opens_resolved.adopted_at "
            "AND (a.closed_at IS NULL OR a.closed_at >= stage_snapshot_opens_resolved.adopted_at))"
        )
        updated_initial, added_initial = _merge_adoptions_where(
            conn, "initial = 1", "snapshot_initial"
        )
        updated_flips, added_flips = _merge_adoptions_where(conn, "initial = 0", "snapshot")
        summary.added = added_initial + added_flips
        summary.updated = updated_initial + updated_flips + int(continued)
        summary.extra["adoptions_from_flips"] = added_flips
        summary.extra["held_at_first_snapshot"] = added_initial
        summary.extra["closures"] = int(
            conn.exec_driver_sql("SELECT COUNT(*) FROM stage_snapshot_closes").scalar_one()
        )
        opens.drop()
        _drop_temp(conn, "stage_snapshot_opens_resolved")
        closes.drop()
    summary.seconds = time.perf_counter() - started
    return summary


def _merge_adoptions_where(conn: Connection, condition: str, source: str) -> tuple[int, int]:
    conn.exec_driver_sql("DROP TABLE IF EXISTS stage_snapshot_part")
    suffix = " ON COMMIT DROP" if conn.dialect.name == "postgresql" else ""
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE stage_snapshot_part{suffix} AS SELECT customer_id, product_id, "
        f"adopted_at, closed_at FROM stage_snapshot_opens_resolved WHERE {condition}"
    )
    result = _merge_adoptions(conn, "stage_snapshot_part", source)
    conn.exec_driver_sql("DROP TABLE stage_snapshot_part")
    return result


def _snapshot_header(
    header: Sequence[str], options: SnapshotOptions, problems: _Collector
) -> tuple[list[str], list[str]]:
    _check_columns(header, problems, required=(options.id_column, options.date_column))
    columns: list[str] = []
    for pattern in options.product_columns:
        matched = [c for c in header if fnmatch.fnmatchcase(c, pattern)]
        if not matched:
            problems.add(None, pattern, "no column matches this product column name or pattern")
        columns.extend(c for c in matched if c not in columns)
    if not options.product_columns:
        problems.add(None, None, "no product columns given (use --products COLUMN_OR_PATTERN)")
    for column in options.product_map:
        if column not in columns:
            problems.add(None, column, "mapped with --map but not among the product columns")
    codes = [options.product_map.get(c, c) for c in columns]
    for column, code in zip(columns, codes, strict=True):
        if not _CODE_RE.match(code) or validation.identifier_problem(code) is not None:
            problems.add(None, column, f"invalid product code '{code}' (map it with --map)")
    if len(set(codes)) != len(codes):
        problems.add(None, None, "two product columns map to the same product code")
    if len(columns) > 62:
        problems.add(None, None, "at most 62 product columns per snapshot file")
    return columns, codes


def _snapshot_chunk(
    frame: pd.DataFrame,
    first: int,
    problems: _Collector,
    options: SnapshotOptions,
    columns: Sequence[str],
    product_ids: Sequence[int],
    state: dict[str, tuple[int, int]],
    today: dt.date,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    ids = frame[options.id_column]
    for i in np.flatnonzero(_missing(ids)).tolist():
        problems.add(first + int(i), options.id_column, "missing value")
    dates = _parse_dates(
        frame,
        options.date_column,
        first,
        problems,
        required=True,
        today=today + dt.timedelta(days=1),  # a snapshot is of a past day (one day of grace)
        future=False,
    )
    flags = np.zeros((len(frame), len(columns)), dtype=np.int64)
    known = np.zeros((len(frame), len(columns)), dtype=bool)
    for j, column in enumerate(columns):
        raw = frame[column]
        missing = _missing(raw)
        numbers = pd.to_numeric(raw.where(~missing, None), errors="coerce").to_numpy(
            dtype=float, na_value=np.nan
        )
        bad = ~missing & ~np.isin(numbers, (0.0, 1.0))
        for i in np.flatnonzero(bad).tolist():
            problems.add(
                first + int(i), column, f"holding flag must be 0 or 1, got '{raw.iloc[i]}'"
            )
        known[:, j] = ~missing & ~bad
        flags[:, j] = np.where(known[:, j], numbers, 0).astype(np.int64)
    bits = 1 << np.arange(len(columns), dtype=np.int64)
    masks = (flags * bits).sum(axis=1).tolist()
    known_masks = (known * bits).sum(axis=1).tolist()
    ordinals = [d.toordinal() if not pd.isna(d) else None for d in dates.dt.date.tolist()]
    opened: list[tuple[Any, ...]] = []
    closed: list[tuple[Any, ...]] = []
    for i, ext in enumerate(ids.tolist()):
        ordinal = ordinals[i]
        if not ext or ordinal is None:
            continue
        row = first + i
        day = dt.date.fromordinal(ordinal).isoformat()
        previous = state.get(ext)
        if previous is None:
            mask = masks[i]
            for j, pid in enumerate(product_ids):
                if mask >> j & 1:
                    opened.append((row, ext, pid, day, None, 1))
        else:
            last_ordinal, last_mask = previous
            if ordinal <= last_ordinal:
                what = "duplicate snapshot" if ordinal == last_ordinal else "out of date order"
                problems.add(
                    row,
                    options.date_column,
                    f"{what}: customer '{ext}' already has a snapshot on "
                    f"{dt.date.fromordinal(last_ordinal)} (each customer's rows must come in date order)",
                )
                continue
            # Unknown flags carry last month's value.
            mask = (masks[i] & known_masks[i]) | (last_mask & ~known_masks[i])
            changed = mask ^ last_mask
            if changed:
                for j, pid in enumerate(product_ids):
                    if changed >> j & 1:
                        if mask >> j & 1:
                            opened.append((row, ext, pid, day, None, 0))
                        else:
                            closed.append((ext, pid, day))
        state[ext] = (ordinal, mask)
    return opened, closed
