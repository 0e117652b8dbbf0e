"""Loading the bank: the database read into the models library's :class:`BankData`.

One set of readers for training, scoring and serving, so the three see the same bank.
Rows the models cannot use are skipped or read as unknown (see :mod:`service.data.rows`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import pandas as pd
from sqlalchemy import Connection, Engine, text

from models.data import (
    ATTRIBUTE_HISTORY_COLUMNS,
    CUSTOMER_FIXED_COLUMNS,
    HISTORY_FIXED_COLUMNS,
    PRODUCT_COLUMNS,
    BankData,
)
from service.data import rows as bank_rows
from service.data.db import read_only
from service.data.rows import Reader, RowAudit


def _read_products(conn: Connection, audit: RowAudit) -> pd.DataFrame:
    rows = conn.execute(
        text(
            "SELECT code, name, category, value, business_weight, active, min_age, max_age, "
            "CAST(segments AS TEXT), CAST(requires AS TEXT), CAST(excludes AS TEXT) "
            "FROM products ORDER BY code"
        )
    ).all()
    known = frozenset(str(row[0]) for row in rows)
    records = []
    for code, name, category, value, weight, active, min_age, max_age, *lists in rows:
        key = str(code)
        value, good_value = bank_rows.product_number(value, 0.0, audit, key=key, field="value")
        weight, good_weight = bank_rows.product_number(
            weight, 1.0, audit, key=key, field="business_weight"
        )
        segments, good_segments = bank_rows.product_codes(
            lists[0], None, audit, key=key, field="segments"
        )
        requires, good_requires = bank_rows.product_codes(
            lists[1], known, audit, key=key, field="requires"
        )
        excludes, good_excludes = bank_rows.product_codes(
            lists[2], known, audit, key=key, field="excludes"
        )
        usable = good_value and good_weight and good_segments and good_requires and good_excludes
        records.append(
            (
                key,
                name,
                category,
                value if usable else 0.0,
                weight if usable else 1.0,
                bool(active) and usable,  # quarantined: kept for its history, never offered
                min_age,
                max_age,
                "|".join(segments or []),
                "|".join(requires or []),
                "|".join(excludes or []),
            )
        )
    return pd.DataFrame.from_records(records, columns=list(PRODUCT_COLUMNS))


def _read_customers(conn: Connection, kinds: Mapping[str, str], audit: RowAudit) -> pd.DataFrame:
    query = bank_rows.customer_query(conn.dialect.name) + " ORDER BY external_id"
    rows = conn.execute(text(query)).all()
    fixed = pd.DataFrame.from_records(
        [row[:5] for row in rows], columns=list(CUSTOMER_FIXED_COLUMNS)
    )
    ids = fixed["customer_id"]
    for field in ("joined_at", "birth_date"):
        fixed[field] = bank_rows.date_column(
            fixed[field], ids, audit, table="customers", field=field
        )
    attributes = pd.DataFrame.from_records(
        [bank_rows.customer_attributes(row[5], kinds, audit, key=str(row[0])) for row in rows],
        columns=list(kinds),
        nrows=len(rows),
    )
    return pd.concat([fixed, attributes], axis=1)


ADOPTION_CHUNK_ROWS = 250_000
"""Adoptions read and parsed per chunk: millions of rows as Python strings at once
would hold gigabytes before they are parsed into compact columns."""


def _read_adoptions(conn: Connection, audit: RowAudit) -> pd.DataFrame:
    dialect = conn.dialect.name
    chunks = pd.read_sql(
        text(
            "SELECT c.external_id AS customer_id, p.code AS product_code, "
            f"{bank_rows.date_text('a.adopted_at', dialect)} AS adopted_at, "
            f"{bank_rows.date_text('a.closed_at', dialect)} AS closed_at FROM adoptions a "
            "JOIN customers c ON c.id = a.customer_id JOIN products p ON p.id = a.product_id"
        ),
        conn,
        dtype=object,
        chunksize=ADOPTION_CHUNK_ROWS,
    )
    frames = [_parse_adoptions(raw, audit) for raw in chunks]
    if not frames:
        empty = pd.DataFrame(
            {name: pd.Series(dtype=object) for name in _ADOPTION_COLUMNS}, columns=_ADOPTION_COLUMNS
        )
        return _parse_adoptions(empty, audit)
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


_ADOPTION_COLUMNS = ["customer_id", "product_code", "adopted_at", "closed_at"]


def _parse_adoptions(raw: pd.DataFrame, audit: RowAudit) -> pd.DataFrame:
    """One chunk of adoption rows (texts) with parsed dates; keys as compact strings."""
    adopted = bank_rows.parse_dates(raw["adopted_at"])
    closed = bank_rows.parse_dates(raw["closed_at"])
    # Hundreds of thousands of rows: parsed as columns; the few that are not plain
    # (a bad or missing date, closed before adopted) go through the one-row judge.
    suspect = (
        adopted.isna() | (closed.isna() & raw["closed_at"].notna()) | (closed < adopted)
    ).to_numpy()
    frame = raw.assign(adopted_at=adopted, closed_at=closed)
    if suspect.any():
        keep = ~suspect
        for i in suspect.nonzero()[0]:
            cid, code, raw_adopted, raw_closed = raw.iloc[i]
            dates = bank_rows.adoption_dates(raw_adopted, raw_closed, audit, key=f"{cid}/{code}")
            if dates is not None:
                keep[i] = True
                frame.iloc[i, 2] = pd.Timestamp(dates[0])
                frame.iloc[i, 3] = pd.NaT if dates[1] is None else pd.Timestamp(dates[1])
        frame = frame.loc[keep].reset_index(drop=True)
    return frame.astype({"customer_id": "str", "product_code": "str"})


def _read_attribute_history(
    conn: Connection, kinds: Mapping[str, str], audit: RowAudit
) -> pd.DataFrame | None:
    """Every stored attribute change (see :mod:`service.data.history`) as
    :data:`models.data.ATTRIBUTE_HISTORY_COLUMNS`; None when there is none.

    Changes of attributes no longer defined are left out; a change without a usable day
    is skipped and an unusable earlier value reads as unknown (both counted in ``audit``).
    """
    dialect = conn.dialect.name
    rows = conn.execute(
        text(
            "SELECT c.external_id, ch.name, "
            f"{bank_rows.date_text('ch.changed_on', dialect)}, CAST(ch.previous AS TEXT) "
            "FROM attribute_changes ch JOIN customers c ON c.id = ch.customer_id"
        )
    ).all()
    if not rows:
        return None
    kinds_of = {**{name: "categorical" for name in HISTORY_FIXED_COLUMNS}, **kinds}
    records = []
    for cid, name, day, raw in rows:
        kind = kinds_of.get(str(name))
        if kind is None:
            continue
        key = f"{cid}/{name}"
        changed, reason = bank_rows.parse_date(day)
        if changed is None:
            audit.note(reason or "bad_date", table="attribute_changes", key=key, field="changed_on")
            continue
        try:
            value = bank_rows.parse_json(raw)
        except ValueError:
            audit.note("bad_attribute_value", table="attribute_changes", key=key, field="previous")
            value = None
        previous = bank_rows.attribute_value(
            value, kind, audit, table="attribute_changes", key=str(cid), name=str(name)
        )
        records.append((str(cid), str(name), pd.Timestamp(changed), previous))
    if not records:
        return None
    return pd.DataFrame.from_records(records, columns=list(ATTRIBUTE_HISTORY_COLUMNS))


def load_bank(
    engine: Engine, *, reader: Reader = "training", history: bool | None = None
) -> BankData:
    """The bank as the models library sees it, read in a few set-based queries.

    Rows the models cannot use are skipped or read as unknown, counted and logged
    (see :mod:`service.data.rows`); ``reader`` labels them. ``history`` reads the
    customers' attribute history too (``BankData.attribute_history``), so features at a
    past instant read the values of that instant; by default every reader but serving's
    (``"snapshot"``), which scores the values in force now.
    """
    audit = RowAudit(reader)
    with_history = reader != "snapshot" if history is None else history
    try:
        with read_only(engine).connect() as conn:
            kinds = bank_rows.read_attribute_kinds(conn, audit)
            products = _read_products(conn, audit)
            customers = _read_customers(conn, kinds, audit)
            adoptions = _read_adoptions(conn, audit)
            outcomes = read_outcomes(conn, audit)
            changes = _read_attribute_history(conn, kinds, audit) if with_history else None
    finally:
        audit.close()
    return BankData.from_frames(
        products,
        customers,
        adoptions,
        attribute_kinds=kinds,
        outcomes=outcomes,
        attribute_history=changes,
    )


def read_outcomes(conn: Connection, audit: RowAudit) -> pd.DataFrame | None:
    """Every recorded offer outcome as :data:`models.data.OUTCOME_COLUMNS`; None when
    the bank has recorded none (then models have no outcome features).

    ``occurred_at`` is when the outcome was recorded (UTC, time-zone naive). Offers to
    customers not in the database (cold start) are left out, and so are outcomes whose
    time pandas cannot hold (counted in ``audit``).
    """
    frame = pd.read_sql(
        text(
            "SELECT c.external_id AS customer_id, p.code AS product_code, oo.outcome, "
            "oo.created_at AS occurred_at FROM offer_outcomes oo "
            "JOIN offers o ON o.id = oo.offer_id JOIN customers c ON c.id = o.customer_id "
            "JOIN products p ON p.id = o.product_id ORDER BY oo.id"
        ),
        conn,
    )
    if frame.empty:
        return None
    occurred = pd.to_datetime(frame["occurred_at"], utc=True, format="ISO8601", errors="coerce")
    bad = occurred.isna().to_numpy()
    for cid, code in frame.loc[bad, ["customer_id", "product_code"]].itertuples(index=False):
        audit.note("date_out_of_range", table="offer_outcomes", key=f"{cid}/{code}", field="at")
    frame = frame.assign(occurred_at=occurred.dt.tz_localize(None)).loc[~bad]
    return None if frame.empty else frame.reset_index(drop=True)


def default_as_of(data: BankData) -> dt.date:
    """The end of the observed history: the day after the last recorded adoption."""
    if data.adoptions.empty:
        return dt.date.today()
    day: dt.date = (data.adoptions["adopted_at"].max() + pd.Timedelta(days=1)).date()
    return day
