"""Day numbers, calendar months and the array types the generator computes with.

Dates are held as day numbers since 1970-01-01 (int64), so that ages, tenures and gaps
for a million customers are array arithmetic; ``_NEVER`` stands for a date that never
comes (an adoption still open).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from datetime import date, timedelta

import numpy as np
import pandas as pd
from numpy.typing import NDArray

#: Mean length of a month in days; converts day gaps to months in time profiles.
DAYS_PER_MONTH = 30.4375
_NEVER = np.iinfo(np.int32).max
_EPOCH = date(1970, 1, 1)

IntArray = NDArray[np.int64]
Int32Array = NDArray[np.int32]
BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
Float32Array = NDArray[np.float32]


def _day(d: date) -> int:
    return (d - _EPOCH).days


def _date(day: int) -> date:
    return _EPOCH + timedelta(days=int(day))


def _days(column: pd.Series) -> IntArray:
    """Day numbers of a date column (strings, dates or datetimes); NaT -> _NEVER."""
    values = np.asarray(pd.to_datetime(column, format="ISO8601"), dtype="datetime64[D]")
    out: IntArray = values.astype(np.int64)
    out[np.isnat(values)] = _NEVER
    return out


def _ymd(days: IntArray) -> tuple[IntArray, IntArray]:
    """Calendar year and ``month * 100 + day`` of day numbers."""
    d = days.astype("datetime64[D]")
    months = d.astype("datetime64[M]")
    year = months.astype("datetime64[Y]").astype(np.int64) + 1970
    month = months.astype(np.int64) % 12 + 1
    day_of_month = (d - months).astype(np.int64) + 1
    return year, month * 100 + day_of_month


def _months(start: date, end: date) -> Iterator[tuple[int, int]]:
    """``(first_day, last_day)`` day numbers of every calendar month touching [start, end]."""
    year, month = start.year, start.month
    while (year, month) <= (end.year, end.month):
        last = calendar.monthrange(year, month)[1]
        yield _day(date(year, month, 1)), _day(date(year, month, last))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
