"""Product-adoption sequences as customers x products matrices.

The rule miner (:mod:`models.rules`) and the feature builder share these helpers, so
training and scoring read adoption histories the same way.

Contracts
---------
Adoptions frame
    One row per adoption, with columns ``customer_id``, ``product_code`` and
    ``adopted_at`` (datetime64, never missing), plus ``closed_at`` (datetime64, ``NaT``
    while the product is still held) wherever closures matter. A customer may adopt the
    same product more than once; the first adoption is the one that orders a sequence.
Product codes
    Compared as strings; other values are converted with ``str``.
Days
    Time is counted in whole calendar days since 1970-01-01, taken from the wall-clock
    date (time-zone aware timestamps keep their local date). Two adoptions on the same
    day are simultaneous: neither came before the other.
Cutoffs
    An event has happened at instant ``t`` if and only if its timestamp is strictly
    before ``t``. ``as_of`` (training on history before a cutoff) and ``at`` (holdings
    at a date) both follow this rule, so an adoption stamped exactly at the cutoff is
    not seen.
Never
    A product the customer has not adopted has first-adoption day :data:`NEVER`, which
    is larger than every real day, so ``first_days[:, j] > t`` reads "not adopted on or
    before day t".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "NEVER",
    "AdoptionMatrix",
    "adoption_sequences",
    "first_adoption_matrix",
    "held_matrix",
    "to_days",
    "to_timestamp",
]

NEVER: Final[int] = int(np.iinfo(np.int32).max)
"""First-adoption day of a product that was never adopted (int32 maximum)."""

_DAY_MIN: Final[int] = -(2**31) + 1
_ADOPTION_COLUMNS: Final[tuple[str, ...]] = ("customer_id", "product_code", "adopted_at")

DateLike: TypeAlias = pd.Timestamp | dt.datetime | dt.date | str
"""Anything :func:`to_timestamp` turns into a timestamp."""


@dataclass(frozen=True, eq=False)
class AdoptionMatrix:
    """First adoption day of every product for every customer.

    Attributes
    ----------
    customer_ids : numpy.ndarray
        Shape ``(n_customers,)``; row ``i`` belongs to ``customer_ids[i]``.
    product_codes : tuple of str
        Column ``j`` belongs to ``product_codes[j]``.
    first_days : numpy.ndarray
        Shape ``(n_customers, n_products)``, int32: the day (see the module contract) of
        the customer's first adoption of the product, :data:`NEVER` if none was seen.
    as_of : pandas.Timestamp or None
        The cutoff the matrix was built with: only adoptions strictly before it are in.
    horizon_day : int
        The first day that is not fully observed: every adoption on a day before it is
        in the matrix. ``floor(as_of)`` when ``as_of`` is given (a cutoff at noon leaves
        its own day half seen), else the day after the last adoption in the data.
    """

    customer_ids: npt.NDArray[np.generic]
    product_codes: tuple[str, ...]
    first_days: npt.NDArray[np.int32]
    as_of: pd.Timestamp | None
    horizon_day: int

    def __post_init__(self) -> None:
        n_customers, n_products = self.first_days.shape
        if self.first_days.dtype != np.int32:
            raise TypeError(f"first_days must be int32, got {self.first_days.dtype}")
        if len(self.customer_ids) != n_customers or len(self.product_codes) != n_products:
            raise ValueError(
                f"first_days has shape {self.first_days.shape} but there are "
                f"{len(self.customer_ids)} customer ids and {len(self.product_codes)} "
                "product codes"
            )

    @property
    def adopted(self) -> npt.NDArray[np.bool_]:
        """Customers x products: adopted at least once before ``as_of``."""
        return np.asarray(self.first_days != NEVER)

    @property
    def n_customers(self) -> int:
        """Number of customers (rows)."""
        return int(self.first_days.shape[0])


def to_timestamp(value: DateLike) -> pd.Timestamp:
    """Convert a date-like value to a time-zone naive wall-clock timestamp.

    Parameters
    ----------
    value : pandas.Timestamp, datetime.datetime, datetime.date or str
        The instant. A date means midnight at its start; an aware timestamp keeps its
        local wall-clock time and drops the zone.

    Returns
    -------
    pandas.Timestamp
        Naive timestamp.
    """
    ts = pd.Timestamp(value)
    if ts is pd.NaT:
        raise ValueError("a cutoff date is required, got NaT")
    if ts.tzinfo is not None:
        ts = ts.tz_localize(None)
    return ts


def to_days(values: pd.Series | pd.DatetimeIndex | Sequence[DateLike]) -> npt.NDArray[np.int64]:
    """Whole calendar days since 1970-01-01 (floored), one per value.

    Parameters
    ----------
    values : pandas.Series, pandas.DatetimeIndex or sequence of date-likes
        Timestamps; aware ones use their local wall-clock date. Missing values are
        not allowed.

    Returns
    -------
    numpy.ndarray
        int64 day numbers.

    Raises
    ------
    ValueError
        If a value is missing.
    """
    if isinstance(values, pd.Series | pd.DatetimeIndex) and pd.api.types.is_datetime64_any_dtype(
        values
    ):
        stamps = _naive(pd.Series(values))
    else:
        stamps = pd.Series([pd.NaT if pd.isna(v) else to_timestamp(v) for v in values])
    if stamps.isna().any():
        raise ValueError("dates must not be missing")
    return np.asarray(stamps.to_numpy().astype("datetime64[D]").astype(np.int64))


def first_adoption_matrix(
    adoptions: pd.DataFrame,
    *,
    as_of: DateLike | None = None,
    product_codes: Sequence[str] | None = None,
    customer_ids: Sequence[object] | npt.NDArray[np.generic] | None = None,
) -> AdoptionMatrix:
    """Build the customers x products matrix of first-adoption days.

    Parameters
    ----------
    adoptions : pandas.DataFrame
        Adoptions frame (see the module contract); ``closed_at`` is not needed.
    as_of : date-like, optional
        Use only adoptions strictly before this instant.
    product_codes : sequence of str, optional
        Columns, in this order; adoptions of other products are ignored. Default: the
        sorted codes among the adoptions used.
    customer_ids : sequence, optional
        Rows, in this order (must be unique); adoptions of other customers are ignored
        and customers without adoptions get a row of :data:`NEVER`. Default: the sorted
        ids of customers with at least one adoption used. That default is the customer
        base the rule miner counts support against.

    Returns
    -------
    AdoptionMatrix
        The matrix with its labels, cutoff and observation horizon.

    Raises
    ------
    ValueError
        On missing columns, missing adoption dates, duplicate requested ids or codes.
    """
    frame = _validated(adoptions, _ADOPTION_COLUMNS)
    cutoff = to_timestamp(as_of) if as_of is not None else None
    adopted_at = _naive(frame["adopted_at"])
    if adopted_at.isna().any():
        raise ValueError("adoptions.adopted_at must not be missing")
    keep = np.ones(len(frame), dtype=bool) if cutoff is None else (adopted_at < cutoff).to_numpy()
    codes = frame["product_code"].astype(str).to_numpy()[keep]
    customers = frame["customer_id"].to_numpy()[keep]
    days = adopted_at.to_numpy()[keep].astype("datetime64[D]").astype(np.int64)

    rows, row_ids = _positions(customers, customer_ids, "customer_ids")
    cols, col_codes = _positions(codes, product_codes, "product_codes")
    used = (rows >= 0) & (cols >= 0)
    rows, cols, used_days = rows[used], cols[used], days[used]
    if used_days.size and (used_days.min() < _DAY_MIN or used_days.max() >= NEVER):
        raise ValueError("adoption dates out of the supported range")

    first = np.full((len(row_ids), len(col_codes)), NEVER, dtype=np.int32)
    np.minimum.at(first.reshape(-1), rows * len(col_codes) + cols, used_days.astype(np.int32))

    if cutoff is not None:
        horizon = int(cutoff.to_datetime64().astype("datetime64[D]").astype(np.int64))
    else:
        horizon = int(days.max()) + 1 if days.size else 0
    return AdoptionMatrix(
        customer_ids=row_ids,
        product_codes=tuple(str(code) for code in col_codes),
        first_days=first,
        as_of=cutoff,
        horizon_day=horizon,
    )


def held_matrix(
    adoptions: pd.DataFrame,
    *,
    at: DateLike,
    product_codes: Sequence[str] | None = None,
    customer_ids: Sequence[object] | npt.NDArray[np.generic] | None = None,
) -> npt.NDArray[np.bool_]:
    """Which products each customer holds at an instant.

    A product is held at ``at`` if one of its adoptions happened before ``at`` and that
    holding was not closed before ``at``: ``adopted_at < at`` and (``closed_at`` is
    ``NaT`` or ``closed_at >= at``). Any one open holding is enough.

    Parameters
    ----------
    adoptions : pandas.DataFrame
        Adoptions frame with ``closed_at``.
    at : date-like
        The instant.
    product_codes, customer_ids : sequence, optional
        Columns and rows as in :func:`first_adoption_matrix`; the defaults are those of
        ``first_adoption_matrix(adoptions, as_of=at)``, so the two matrices align.

    Returns
    -------
    numpy.ndarray
        Bool, customers x products.
    """
    frame = _validated(adoptions, (*_ADOPTION_COLUMNS, "closed_at"))
    instant = to_timestamp(at)
    adopted_at = _naive(frame["adopted_at"])
    if adopted_at.isna().any():
        raise ValueError("adoptions.adopted_at must not be missing")
    closed_at = _naive(frame["closed_at"])
    seen = (adopted_at < instant).to_numpy()
    open_ = (closed_at.isna() | (closed_at >= instant)).to_numpy()
    codes = frame["product_code"].astype(str).to_numpy()
    customers = frame["customer_id"].to_numpy()

    # Default labels come from every adoption seen, open or closed, as in
    # first_adoption_matrix: a customer who closed everything still has a row.
    _, row_ids = _positions(customers[seen], customer_ids, "customer_ids")
    _, col_codes = _positions(codes[seen], product_codes, "product_codes")
    held_rows = seen & open_
    rows = pd.Index(row_ids).get_indexer(customers[held_rows])
    cols = pd.Index(col_codes).get_indexer(codes[held_rows])
    used = (rows >= 0) & (cols >= 0)
    held = np.zeros((len(row_ids), len(col_codes)), dtype=bool)
    held[rows[used], cols[used]] = True
    return held


def adoption_sequences(matrix: AdoptionMatrix) -> pd.Series:
    """Each customer's adopted products in order of first adoption.

    Parameters
    ----------
    matrix : AdoptionMatrix
        First-adoption days.

    Returns
    -------
    pandas.Series
        Indexed by customer id, one tuple of product codes per customer, earliest first.
        Products first adopted on the same day keep the matrix's column order, an
        arbitrary tie-break: ordered rules treat them as simultaneous.
    """
    first = matrix.first_days
    order = np.argsort(first, axis=1, kind="stable")
    ordered_days = np.take_along_axis(first, order, axis=1)
    counts = (ordered_days != NEVER).sum(axis=1)
    codes = matrix.product_codes
    sequences = [
        tuple(codes[j] for j in row[:count])
        for row, count in zip(order.tolist(), counts.tolist(), strict=True)
    ]
    return pd.Series(
        sequences, index=pd.Index(matrix.customer_ids, name="customer_id"), name="sequence"
    )


def _validated(adoptions: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    missing = [column for column in columns if column not in adoptions.columns]
    if missing:
        raise ValueError(
            f"adoptions is missing column(s) {missing}; it has {list(adoptions.columns)}"
        )
    return adoptions


def _naive(stamps: pd.Series) -> pd.Series:
    """Datetime series without time zone (wall-clock time kept)."""
    if not pd.api.types.is_datetime64_any_dtype(stamps):
        if stamps.isna().all():
            return pd.Series(pd.NaT, index=stamps.index, dtype="datetime64[ns]")
        raise TypeError(f"expected datetime64 values, got dtype {stamps.dtype}")
    if isinstance(stamps.dtype, pd.DatetimeTZDtype):
        return stamps.dt.tz_localize(None)
    return stamps


def _positions(
    values: npt.NDArray[np.generic],
    labels: Sequence[object] | npt.NDArray[np.generic] | None,
    name: str,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.generic]]:
    """Position of each value among ``labels`` (-1 if absent) and the labels used."""
    if labels is None:
        positions, uniques = pd.factorize(values, sort=True)
        return positions.astype(np.intp), np.asarray(uniques)
    index = pd.Index(np.asarray(labels) if name == "customer_ids" else [str(x) for x in labels])
    if not index.is_unique:
        raise ValueError(f"{name} must be unique")
    return index.get_indexer(values).astype(np.intp), np.asarray(index)
