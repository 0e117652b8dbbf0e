"""What a caller or a file may send: the limits and checks, written once.

Every value stored is read again by every load of the bank (start-up, each catalogue or
model change, ``nbo train``), so one bad value accepted once turns offers off for
everyone: a date pandas cannot hold, an infinite number, an attribute name that is not
a plain identifier or one that collides with a fixed column, thousands of attribute
columns. The HTTP schemas (:mod:`service.schemas`) and the bulk importer
(:mod:`service.data.importing`) both check through the functions here, so the API and the
importer cannot drift. Nothing here imports FastAPI or pydantic.

Each ``*_problem`` function returns ``None`` for a good value, else the reason in
words, which the caller attaches to the field (API) or to the row and column (import).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from typing import Final

from models.data import CUSTOMER_FIXED_COLUMNS

EARLIEST_DATE: Final = dt.date(1900, 1, 1)
"""No date before this is taken: older ones are typing errors, and pandas' nanosecond
timestamps (used by every load of the bank) cannot hold dates before 1677."""

FUTURE_MARGIN: Final = dt.timedelta(days=366)
"""How far past today a date may lie (a joining date keyed in ahead, a clock a little
off); 9999-12-31 is a placeholder, not a date, and breaks the same loads."""

MAX_MAGNITUDE: Final = 1e15
"""Largest absolute number stored (attribute values, product value and weight): far
above any balance, and small enough that value x propensity x weight and sums over
millions of customers stay finite."""

MISSING_TOKENS: Final = frozenset({"", "na", "nan", "null", "none", "nat"})
"""Cells the models library reads as missing (models.data, any case, spaces stripped): a
customer id or product code spelled so would be a missing key, and fail every load."""

MAX_CUSTOMER_ID: Final = 128
MAX_PRODUCT_CODE: Final = 64
PRODUCT_CODE_PATTERN: Final = r"^[A-Za-z0-9_.\-]{1,64}$"
PRODUCT_CODE_RE: Final = re.compile(PRODUCT_CODE_PATTERN)

MAX_ATTRIBUTE_NAME: Final = 63
"""PostgreSQL's identifier length (63 bytes): a name stays usable as a column wherever an
attribute becomes one (an export, a feature table), and two names cannot merge there."""
ATTRIBUTE_NAME_PATTERN: Final = rf"^[A-Za-z_][A-Za-z0-9_]{{0,{MAX_ATTRIBUTE_NAME - 1}}}$"
ATTRIBUTE_NAME_RE: Final = re.compile(ATTRIBUTE_NAME_PATTERN)
RESERVED_ATTRIBUTE_NAMES: Final = frozenset(name.lower() for name in CUSTOMER_FIXED_COLUMNS)
"""The fixed customer columns: an attribute of the same name (in any case) would give
the loaded customer table two columns of one name."""

MAX_ATTRIBUTES_PER_REQUEST: Final = 200
DEFAULT_MAX_ATTRIBUTES: Final = 500
"""Default of ``Settings.max_attributes``: every attribute is a column of the loaded bank
and a value held per customer in each worker, and a table holds at most 1,600 columns."""
MAX_ATTRIBUTE_TEXT: Final = 256
MAX_LABEL: Final = 64
"""Segments, branch, staff ids and product categories."""
MAX_PRODUCT_NAME: Final = 200
MAX_LIST_ITEMS: Final = 100
MAX_CONTEXT_ITEMS: Final = 20
MAX_CONTEXT_KEY: Final = 64
MAX_CONTEXT_TEXT: Final = 256


def utc_today() -> dt.date:
    """Today's date in UTC, the service's calendar."""
    return dt.datetime.now(dt.UTC).date()


def latest_date(today: dt.date | None = None) -> dt.date:
    """The last date accepted where future dates are allowed."""
    return (today or utc_today()) + FUTURE_MARGIN


def date_problem(
    value: dt.date, *, today: dt.date | None = None, future: bool = True
) -> str | None:
    """Why ``value`` is not a plausible date, or None.

    ``future`` allows dates up to :data:`FUTURE_MARGIN` past ``today``; without it (dates
    of birth) the date must not be after ``today``.
    """
    today = today or utc_today()
    latest = latest_date(today) if future else today
    if value < EARLIEST_DATE:
        return f"date {value.isoformat()} is before {EARLIEST_DATE.isoformat()}"
    if value > latest:
        if not future:
            return f"date {value.isoformat()} is in the future"
        return f"date {value.isoformat()} is after {latest.isoformat()}"
    return None


def number_problem(value: float) -> str | None:
    """Why ``value`` cannot be stored as a number, or None (finite, within the bound)."""
    if not math.isfinite(value):
        return f"must be a finite number, not {value!r}"
    if abs(value) > MAX_MAGNITUDE:
        return f"must be between {-MAX_MAGNITUDE:g} and {MAX_MAGNITUDE:g}"
    return None


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None.

    PostgreSQL text holds no NUL character, and a lone surrogate (``"\\ud800"`` in JSON)
    cannot be encoded to UTF-8 at all; either fails the statement it is written in.
    """
    if "\x00" in value:
        return "must not contain the NUL character (U+0000): it cannot be stored"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must not contain a lone surrogate (U+D800 to U+DFFF): it is not text"
    return None


def identifier_problem(value: str) -> str | None:
    """Why ``value`` cannot be a customer id or product code, or None.

    The bank is loaded through pandas, which strips keys and reads ``NaN``, ``null`` and
    the like as missing; such a key (or ``" C1"`` beside ``"C1"``) fails the load.
    """
    if value != value.strip():
        return "must not start or end with a space"
    if value.lower() in MISSING_TOKENS:
        return f"'{value}' reads as a missing value; choose another id"
    return None


def attribute_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a customer attribute, or None."""
    if not ATTRIBUTE_NAME_RE.match(name):
        return (
            f"invalid attribute name (1 to {MAX_ATTRIBUTE_NAME} letters, digits or _, "
            "not starting with a digit)"
        )
    if name.lower() in RESERVED_ATTRIBUTE_NAMES:
        return f"'{name}' is a fixed customer column, not an attribute"
    return None


def case_clash(name: str, known: Iterable[str]) -> str | None:
    """The known attribute spelled like ``name`` but for case, or None.

    ``Income`` beside ``income`` would be two columns that any case-folding reader (a
    spreadsheet, an unquoted SQL alias) takes for one.
    """
    folded = name.lower()
    for other in known:
        if other != name and other.lower() == folded:
            return other
    return None


def attribute_cap_problem(known: int, new: int, limit: int) -> str | None:
    """Why adding ``new`` attribute definitions to ``known`` ones passes ``limit``, or None."""
    if known + new > limit:
        return (
            f"too many attributes: the bank has {known} of at most {limit} "
            "(setting max_attributes); reuse an existing attribute"
        )
    return None
