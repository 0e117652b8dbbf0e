"""Stored rows of the bank, made safe to read: one sanitiser for every reader.

Whatever validation a write path does, the database may hold rows written before it
existed, by another tool, or by hand: a ``joined_at`` of 1542 or 9999, an attribute
that is text in a numeric attribute, ``Infinity`` as a product's value, a torn JSON
text. pandas timestamps cover only 1677-2262, LightGBM and the ranking want finite
numbers, and the catalogue refuses rules naming unknown products, so one such row
used to fail every load (training, scoring, the serving snapshot) and turn offers off
for everyone.

Every reader of the bank (:func:`service.data.bank.load_bank`,
:func:`service.decision.state.read_customers`, the reports) passes each row through the
functions here, so training and serving read the same values:

- a date outside :data:`MIN_DATE`..:data:`MAX_DATE`, or not a date, is unknown (None);
  an adoption without a usable ``adopted_at`` is skipped; a ``closed_at`` before its
  ``adopted_at`` is unknown (the holding counts as open: the product is not offered);
- a numeric attribute that is not a finite number within :data:`MAX_MAGNITUDE` is
  unknown; an attributes text that is not a JSON object leaves all its attributes
  unknown;
- a product whose value, weight or rules are unusable is kept (its history still
  counts) but inactive, so it is never offered, with value 0 and weight 1.

Each repair or skip is counted in ``nbo_rows_skipped_total{reader, reason}`` and
logged at WARNING with the row's key (customer id, product code), never its values.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, cast

import orjson
import pandas as pd
from sqlalchemy import Connection, text

from models.data import CUSTOMER_FIXED_COLUMNS, AttributeKind
from service import metrics, validation

log = logging.getLogger("nbo.rows")

Reader = Literal["snapshot", "training", "scoring", "customer", "report"]
"""Values of the ``reader`` label of ``nbo_rows_skipped_total``: who read the row."""

SkipReason = Literal[
    "date_out_of_range",
    "bad_date",
    "closed_before_adopted",
    "bad_attributes",
    "bad_attribute_value",
    "bad_attribute_name",
    "bad_number",
    "bad_product_rule",
]
"""Values of the ``reason`` label of ``nbo_rows_skipped_total``."""

MIN_DATE: Final = dt.date(1800, 1, 1)
MAX_DATE: Final = dt.date(2199, 12, 31)
"""Dates readers accept. pandas timestamps end in 1677 and 2262; the margin keeps a
model's arithmetic on dates (horizons, look-back windows) inside them."""

MAX_MAGNITUDE: Final = validation.MAX_MAGNITUDE
"""The largest absolute number readers accept in an attribute or a product's value
or weight, the bound every value was checked against when it came in: beyond it a
value is an error, and products of such values overflow."""

LOGGED_PER_REASON: Final = 20
"""Rows logged one by one per reason in one read; the rest are summed up in one line."""

AttributeValue = float | str | None


class RowAudit:
    """What one read (a bank load, a customer refresh, a report) skipped or repaired.

    Call :meth:`note` per problem and :meth:`close` once the read is done: the counter
    is incremented then (one call per reason, not per row) and a summary is logged
    when more rows were found than were logged one by one.
    """

    def __init__(self, reader: Reader) -> None:
        self.reader: Reader = reader
        self.counts: Counter[SkipReason] = Counter()

    def note(self, reason: SkipReason, *, table: str, key: str, field: str) -> None:
        """Record one bad field or row of ``table`` identified by ``key``."""
        self.counts[reason] += 1
        if self.counts[reason] <= LOGGED_PER_REASON:
            log.warning(
                "stored row skipped or repaired",
                extra={
                    "reader": self.reader,
                    "reason": reason,
                    "table": table,
                    "key": _short(key),
                    "field": _short(field),
                },
            )

    def close(self) -> None:
        """Publish the counts of this read (idempotent: counts are published once)."""
        for reason, count in self.counts.items():
            metrics.ROWS_SKIPPED.labels(self.reader, reason).inc(count)
            if count > LOGGED_PER_REASON:
                log.warning(
                    "stored rows skipped or repaired",
                    extra={"reader": self.reader, "reason": reason, "rows": count},
                )
        self.counts.clear()


def _short(text: str) -> str:
    # Keys and attribute names come from data: bound what a log line can carry.
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- reading

CUSTOMER_COLUMNS = (
    "SELECT {id}external_id, segment, branch_id, {joined_at}, {birth_date}, "
    "CAST(attributes AS TEXT) FROM customers"
)
"""A customer row as every reader selects it. Attributes come whole, as JSON text, and
are expanded in Python: no attribute name ever reaches SQL text (a name is data, and
was once pasted into this query), and any number of attributes reads in one column
(PostgreSQL allows 1,600 in a select list). Dates come as text, so that a date the
driver cannot represent reaches this module instead of failing the read."""


def date_text(column: str, dialect: str) -> str:
    """SQL reading the DATE ``column`` (one of ours, never data) as ISO text.

    PostgreSQL's own text depends on the server's DateStyle, hence ``to_char``;
    ``infinity`` has no ``to_char`` and comes as its name (a bad date).
    """
    if dialect == "postgresql":
        return f"coalesce(to_char({column}, 'YYYY-MM-DD'), CAST({column} AS TEXT))"
    return f"CAST({column} AS TEXT)"


def customer_query(dialect: str, *, with_id: bool = False) -> str:
    """:data:`CUSTOMER_COLUMNS` for ``dialect``; ``with_id`` puts the primary key first."""
    return CUSTOMER_COLUMNS.format(
        id="id, " if with_id else "",
        joined_at=date_text("joined_at", dialect),
        birth_date=date_text("birth_date", dialect),
    )


def read_attribute_kinds(conn: Connection, audit: RowAudit) -> dict[str, AttributeKind]:
    """The usable attribute definitions (see :func:`attribute_kinds`)."""
    rows = conn.execute(text("SELECT name, kind FROM attribute_definitions"))
    return attribute_kinds(((str(name), str(kind)) for name, kind in rows), audit)


def customer_record(
    row: Sequence[Any], kinds: Mapping[str, str], audit: RowAudit
) -> tuple[str, str | None, str | None, dt.date | None, dt.date | None, dict[str, Any]]:
    """One row of :data:`CUSTOMER_COLUMNS`, cleaned: ``(customer_id, segment, branch_id,
    joined_at, birth_date, attributes)``. Shared by the batch and per-customer reads."""
    cid, segment, branch, joined, birth, attributes = row
    cid = str(cid)
    return (
        cid,
        segment,
        branch,
        customer_date(joined, audit, key=cid, field="joined_at"),
        customer_date(birth, audit, key=cid, field="birth_date"),
        customer_attributes(attributes, kinds, audit, key=cid),
    )


# --------------------------------------------------------------------------- values


def parse_date(value: Any) -> tuple[dt.date | None, SkipReason | None]:
    """A stored date as a ``datetime.date`` within range, else None and why.

    Readers select dates as ISO text (see :func:`date_text`): a
    driver then never has to convert a date it cannot represent (PostgreSQL's
    ``infinity``, a date BC, a year past 9999 on SQLite). A missing value is None, or
    NaN/NaT where a frame stood in for it (pandas' ``str`` dtype holds a missing text as
    NaN).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return None, None
    if isinstance(value, str):
        try:
            day = dt.date.fromisoformat(value[:10])
        except ValueError:
            return None, "bad_date"
    elif isinstance(value, dt.datetime):
        day = value.date()
    elif isinstance(value, dt.date):
        day = value
    else:
        return None, "bad_date"
    if MIN_DATE <= day <= MAX_DATE:
        return day, None
    return None, "date_out_of_range"


def parse_dates(values: pd.Series) -> pd.Series:
    """:func:`parse_date` over a column of ISO texts, for the many well-formed rows:
    datetime64, NaT where the text is missing, malformed or out of range. A caller
    passes the rows that came out NaT with a text through :func:`parse_date`, which
    says why (and is the one judge of a date)."""
    stamps = pd.to_datetime(values, format="%Y-%m-%d", errors="coerce")
    return stamps.where(
        (stamps >= pd.Timestamp(MIN_DATE)) & (stamps <= pd.Timestamp(MAX_DATE))
    ).astype("datetime64[ns]")


def date_column(
    values: pd.Series, keys: pd.Series, audit: RowAudit, *, table: str, field: str
) -> pd.Series:
    """A column of stored dates (ISO texts, or None) as datetime64, NaT where unknown;
    each bad one is noted with its row's key from ``keys``."""
    stamps = parse_dates(values)
    for i in (stamps.isna() & values.notna()).to_numpy().nonzero()[0]:
        day, reason = parse_date(values.iloc[i])
        if reason is not None:
            audit.note(reason, table=table, key=str(keys.iloc[i]), field=field)
        stamps.iloc[i] = pd.NaT if day is None else pd.Timestamp(day)
    return stamps


def parse_number(value: Any) -> tuple[float | None, bool]:
    """A stored number as a finite float within :data:`MAX_MAGNITUDE`; ``(None, True)``
    when the value is present but not such a number, ``(None, False)`` when absent."""
    if value is None or value == "":
        return None, False
    if not isinstance(value, int | float | str):  # bool is an int: true is 1
        return None, True
    try:
        number = float(value)
    except (ValueError, OverflowError):  # text, or an integer of 400 digits
        return None, True
    if not math.isfinite(number) or abs(number) > MAX_MAGNITUDE:
        return None, True
    return number, False


def parse_json(value: Any) -> Any:
    """A JSON column as Python: drivers give PostgreSQL's JSONB parsed and SQLite's as
    text. Raises ``ValueError`` when the text is not JSON."""
    if not isinstance(value, str | bytes):
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    # Python's own parser also reads NaN and Infinity (which json.dumps writes): they
    # are then refused as numbers, one attribute at a time.
    try:
        return json.loads(value)
    except RecursionError:  # nested deeper than Python's stack
        raise ValueError("JSON nested too deep") from None


# --------------------------------------------------------------------------- rows


def attribute_kinds(rows: Iterable[tuple[str, str]], audit: RowAudit) -> dict[str, AttributeKind]:
    """The usable attribute definitions: a name that is also a fixed customer column
    (``segment``...) would clash with it in every frame, so it is left out."""
    kinds: dict[str, AttributeKind] = {}
    for name, kind in rows:
        if name in CUSTOMER_FIXED_COLUMNS or kind not in ("numeric", "categorical"):
            audit.note("bad_attribute_name", table="attribute_definitions", key=name, field="name")
            continue
        kinds[name] = cast(AttributeKind, kind)
    return kinds


def customer_attributes(
    raw: Any, kinds: Mapping[str, str], audit: RowAudit, *, key: str
) -> dict[str, AttributeValue]:
    """A customer's stored attributes, those defined in ``kinds``, cleaned.

    Only the attributes the customer has are returned (a missing one is unknown).
    """
    if raw is None:
        return {}
    try:
        attributes = parse_json(raw)
    except ValueError:
        audit.note("bad_attributes", table="customers", key=key, field="attributes")
        return {}
    if not isinstance(attributes, dict):
        audit.note("bad_attributes", table="customers", key=key, field="attributes")
        return {}
    out: dict[str, AttributeValue] = {}
    for name, value in attributes.items():
        kind = kinds.get(name)
        if kind is None or value is None:
            continue
        # The usual cases first, without a call: this runs for every attribute of
        # every customer at each snapshot load.
        value_type = type(value)
        if kind == "numeric":
            if (
                value_type is float or value_type is int
            ) and -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE:
                out[name] = float(value)
                continue
        elif value_type is str:
            out[name] = value
            continue
        out[name] = attribute_value(value, kind, audit, table="customers", key=key, name=name)
    return out


def attribute_value(
    value: Any, kind: str, audit: RowAudit, *, table: str, key: str, name: str
) -> AttributeValue:
    """One stored attribute value of ``kind`` cleaned: a finite number within
    :data:`MAX_MAGNITUDE` for a numeric one, a label (text) otherwise; None when absent
    or unusable (noted in ``audit``). Segments and branches read as labels."""
    if value is None:
        return None
    if kind == "numeric":
        number, bad = parse_number(value)
        if bad:
            audit.note("bad_attribute_value", table=table, key=key, field=name)
        return number
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _label(value)
    # A list or an object: not a label.
    audit.note("bad_attribute_value", table=table, key=key, field=name)
    return None


def _label(value: int | float) -> str | None:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return str(int(value))  # 1.0 and 1 are the same label
    return str(value)


def customer_date(value: Any, audit: RowAudit, *, key: str, field: str) -> dt.date | None:
    """A customer's ``joined_at`` or ``birth_date``; None when unknown or unusable."""
    day, reason = parse_date(value)
    if reason is not None:
        audit.note(reason, table="customers", key=key, field=field)
    return day


def adoption_dates(
    adopted: Any, closed: Any, audit: RowAudit, *, key: str
) -> tuple[dt.date, dt.date | None] | None:
    """An adoption's ``(adopted_at, closed_at)``, or None to skip the adoption.

    Without a usable ``adopted_at`` nothing is known of when the product was taken,
    so the row is skipped. An unusable ``closed_at``, or one before ``adopted_at``,
    is unknown: the holding counts as open, so the product is not offered again.
    """
    start, reason = parse_date(adopted)
    if start is None:
        audit.note(reason or "bad_date", table="adoptions", key=key, field="adopted_at")
        return None
    end, reason = parse_date(closed)
    if reason is not None:
        audit.note(reason, table="adoptions", key=key, field="closed_at")
    elif end is not None and end < start:
        audit.note("closed_before_adopted", table="adoptions", key=key, field="closed_at")
        end = None
    return start, end


def product_number(
    value: Any, default: float, audit: RowAudit, *, key: str, field: str
) -> tuple[float, bool]:
    """A product's ``value`` or ``business_weight``: ``(number, usable)``.

    An unusable number (not finite, negative, beyond :data:`MAX_MAGNITUDE`) gives
    ``default`` and ``usable`` False: the caller then makes the product inactive.
    """
    number, bad = parse_number(value)
    if number is None and not bad:
        return default, True
    if number is None or number < 0:
        audit.note("bad_number", table="products", key=key, field=field)
        return default, False
    return number, True


def product_codes(
    value: Any, known: frozenset[str] | None, audit: RowAudit, *, key: str, field: str
) -> tuple[list[str] | None, bool]:
    """A product's ``segments``, ``requires`` or ``excludes`` list: ``(list, usable)``.

    For ``requires``/``excludes`` (``known`` given) codes of products that do not
    exist are dropped and the list is unusable; so is a value that is not a list of
    strings. The caller makes a product with an unusable rule inactive: offering it
    against a rule nobody can read could break that rule.
    """
    try:
        items = parse_json(value)
    except ValueError:
        items = value  # not JSON: refused below
    if items is None:
        return None, True
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        audit.note("bad_product_rule", table="products", key=key, field=field)
        return None, False
    if known is not None and not set(items) <= known:
        audit.note("bad_product_rule", table="products", key=key, field=field)
        return [item for item in items if item in known], False
    return items, True
