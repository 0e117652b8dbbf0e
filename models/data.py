"""The bank's data as plain frames, and fast indexes over its adoption history.

:class:`BankData` holds the four import-format tables (products, customers, adoptions
and, later, offer outcomes) with normalised dtypes, and the customers' attribute history
when the bank keeps one. It is built from files
(:meth:`BankData.from_folder`) or from frames the service reads from its database
(:meth:`BankData.from_frames`). :class:`CustomerState` is one customer's record, as read
at decision time; :class:`AdoptionIndex` turns either into customers x products arrays
("held at t", "first adopted before t", "adopted in [t1, t2)"), with one implementation
for a million customers and for one.

Time follows :mod:`models.sequences`: an event has happened at instant ``t`` only if its
timestamp is strictly before ``t``; a holding is open at ``t`` if it was adopted before
``t`` and not closed before ``t``. Timestamps are time-zone naive wall-clock times
(aware ones keep their local time); days are whole days since 1970-01-01, floored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.sequences import NEVER

__all__ = [
    "ADOPTION_COLUMNS",
    "ATTRIBUTE_HISTORY_COLUMNS",
    "HISTORY_FIXED_COLUMNS",
    "CUSTOMER_FIXED_COLUMNS",
    "NS_PER_DAY",
    "OUTCOME_COLUMNS",
    "PRODUCT_COLUMNS",
    "Adoption",
    "AdoptionIndex",
    "AttributeKind",
    "BankData",
    "CustomerState",
    "OfferOutcome",
    "Snapshot",
    "instant",
    "snapshot_of_state",
    "to_ns",
]

AttributeKind: TypeAlias = Literal["numeric", "categorical"]
"""How a customer attribute column is read: numbers, or labels."""

PRODUCT_COLUMNS: Final[tuple[str, ...]] = (
    "product_code",
    "name",
    "category",
    "value",
    "business_weight",
    "active",
    "min_age",
    "max_age",
    "segments",
    "requires",
    "excludes",
)
CUSTOMER_FIXED_COLUMNS: Final[tuple[str, ...]] = (
    "customer_id",
    "segment",
    "branch_id",
    "joined_at",
    "birth_date",
)
ADOPTION_COLUMNS: Final[tuple[str, ...]] = (
    "customer_id",
    "product_code",
    "adopted_at",
    "closed_at",
)
OUTCOME_COLUMNS: Final[tuple[str, ...]] = ("customer_id", "product_code", "outcome", "occurred_at")
ATTRIBUTE_HISTORY_COLUMNS: Final[tuple[str, ...]] = (
    "customer_id",
    "attribute",
    "changed_at",
    "previous",
)
HISTORY_FIXED_COLUMNS: Final[tuple[str, ...]] = ("segment", "branch_id")
"""The fixed customer columns an attribute history may hold besides the attributes."""

NS_PER_DAY: Final[int] = 86_400 * 10**9
"""Nanoseconds in a day."""

NAT_NS: Final[int] = int(np.iinfo(np.int64).min)
"""Integer value of ``NaT`` in int64 nanoseconds."""

OPEN_NS: Final[int] = int(np.iinfo(np.int64).max)
"""Closing instant of a holding that is still open (later than every real instant)."""

_MISSING: Final[frozenset[str]] = frozenset({"", "na", "nan", "null", "none", "nat"})
_TRUE: Final[frozenset[str]] = frozenset({"true", "1", "yes", "y", "t"})
_FALSE: Final[frozenset[str]] = frozenset({"false", "0", "no", "n", "f"})
_LIST_COLUMNS: Final[tuple[str, ...]] = ("segments", "requires", "excludes")
_SUFFIXES: Final[tuple[str, ...]] = (".parquet", ".csv", ".csv.gz")

DateInput: TypeAlias = pd.Timestamp | dt.datetime | dt.date | np.datetime64 | str | None
"""A timestamp as a caller may hold it; None (or NaT) is missing."""


# --------------------------------------------------------------------------- one customer


class Adoption(NamedTuple):
    """One adoption of a product by a customer (a row of the adoptions table)."""

    product_code: str
    adopted_at: DateInput
    closed_at: DateInput = None


class OfferOutcome(NamedTuple):
    """One recorded outcome of an offer (a row of the optional outcomes table)."""

    product_code: str
    outcome: str
    occurred_at: DateInput


@dataclass(frozen=True)
class CustomerState:
    """Everything the models read about one customer at decision time.

    Attributes
    ----------
    customer_id : str
        The customer.
    segment, branch_id : str or None
        As in the customers table; None when unknown.
    joined_at, birth_date : date-like or None
        As in the customers table; None when unknown.
    attributes : mapping of str to float, int, str or None
        The bank attribute columns, by name; a missing key or None is unknown.
    adoptions : sequence of Adoption
        The customer's rows of the adoptions table, in any order, including ones after
        the decision instant (they are ignored there).
    outcomes : sequence of OfferOutcome
        The customer's recorded offer outcomes; empty when not tracked.
    """

    customer_id: str
    segment: str | None = None
    branch_id: str | None = None
    joined_at: DateInput = None
    birth_date: DateInput = None
    attributes: Mapping[str, float | int | str | None] = field(default_factory=dict)
    adoptions: Sequence[Adoption] = ()
    outcomes: Sequence[OfferOutcome] = ()


def to_ns(value: DateInput) -> int:
    """A timestamp as int64 nanoseconds since the epoch, wall-clock time.

    Parameters
    ----------
    value : date-like or None
        ``datetime.date`` means midnight; aware timestamps keep their local time.

    Returns
    -------
    int
        Nanoseconds; :data:`NAT_NS` when ``value`` is None or ``NaT``.
    """
    if value is None or value is pd.NaT:
        return NAT_NS
    if isinstance(value, pd.Timestamp):
        naive = value.tz_localize(None) if value.tzinfo is not None else value
        return int(naive.value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.replace(tzinfo=None)
        seconds = (value.toordinal() - 719_163) * 86_400 + (
            value.hour * 3600 + value.minute * 60 + value.second
        )
        return seconds * 10**9 + value.microsecond * 1000
    if isinstance(value, dt.date):
        return (value.toordinal() - 719_163) * NS_PER_DAY
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            return NAT_NS
        return int(value.astype("datetime64[ns]").astype(np.int64))
    stamp = pd.Timestamp(value)
    if stamp is pd.NaT:
        return NAT_NS
    if stamp.tzinfo is not None:
        stamp = stamp.tz_localize(None)
    return int(stamp.as_unit("ns").value)


def instant(value: DateInput, *, name: str = "as_of") -> int:
    """A required instant as :func:`to_ns` reads it.

    Features, eligibility and scoring read what happened strictly before an instant;
    a missing one reads as :data:`NAT_NS`, before everything, and would answer as if
    nothing had happened, so it is refused.

    Parameters
    ----------
    value : date-like
        The instant.
    name : str
        The caller's argument, named in the error.

    Returns
    -------
    int
        Nanoseconds since the epoch, wall-clock time.

    Raises
    ------
    ValueError
        If ``value`` is None or ``NaT``.
    """
    value_ns = to_ns(value)
    if value_ns == NAT_NS:
        raise ValueError(f"{name} is required, got a missing value")
    return value_ns


def floor_day(ns: int) -> int:
    """The day number (days since 1970-01-01, floored) of an instant in nanoseconds."""
    return ns // NS_PER_DAY


# --------------------------------------------------------------------------- the index


class Snapshot(NamedTuple):
    """Customers x products state at an instant (see :meth:`AdoptionIndex.snapshot`)."""

    held: npt.NDArray[np.bool_]
    first_days: npt.NDArray[np.int32]
    last_col: npt.NDArray[np.intp]
    last_day: npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class AdoptionIndex:
    """Adoptions as integer arrays, for customers x products questions at any instant.

    Rows are sorted by customer row, then adoption instant, then product column.

    Attributes
    ----------
    n_customers, n_products : int
        Shape of every matrix the index answers with.
    rows, cols : numpy.ndarray
        intp: customer row and product column of each adoption.
    adopted : numpy.ndarray
        int64 nanoseconds of each adoption.
    closed : numpy.ndarray
        int64 nanoseconds of each closure, :data:`OPEN_NS` while open.
    """

    n_customers: int
    n_products: int
    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    adopted: npt.NDArray[np.int64]
    closed: npt.NDArray[np.int64]
    cells: npt.NDArray[np.intp] = field(init=False, repr=False)
    days: npt.NDArray[np.int32] = field(init=False, repr=False)
    _last: list[tuple[int, Snapshot]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Flat customers x products cell and adoption day of every row, used at every
        # instant.
        object.__setattr__(self, "cells", self.rows * self.n_products + self.cols)
        object.__setattr__(self, "days", (self.adopted // NS_PER_DAY).astype(np.int32))
        # The latest snapshot: training asks for the same instant several times in a row
        # (rules, eligibility, features).
        object.__setattr__(self, "_last", [])

    @classmethod
    def from_frame(
        cls,
        adoptions: pd.DataFrame,
        *,
        customer_ids: Sequence[str] | npt.NDArray[np.generic],
        product_codes: Sequence[str],
    ) -> AdoptionIndex:
        """Index a normalised adoptions frame (see :class:`BankData`).

        Parameters
        ----------
        adoptions : pandas.DataFrame
            ``customer_id, product_code, adopted_at, closed_at`` with datetime64 dates.
        customer_ids : sequence of str
            Row labels; adoptions of other customers are dropped.
        product_codes : sequence of str
            Column labels; adoptions of other products are dropped.

        Returns
        -------
        AdoptionIndex
        """
        rows = pd.Index(np.asarray(customer_ids, dtype=object)).get_indexer(
            adoptions["customer_id"].to_numpy(dtype=object)
        )
        cols = pd.Index(list(product_codes), dtype=object).get_indexer(
            adoptions["product_code"].to_numpy(dtype=object)
        )
        adopted = _ns_array(adoptions["adopted_at"])
        if (adopted == NAT_NS).any():
            raise ValueError("adoptions.adopted_at must not be missing")
        closed = _ns_array(adoptions["closed_at"])
        closed[closed == NAT_NS] = OPEN_NS
        keep = (rows >= 0) & (cols >= 0)
        rows, cols, adopted, closed = rows[keep], cols[keep], adopted[keep], closed[keep]
        order = np.lexsort((cols, adopted, rows))
        return cls(
            n_customers=len(customer_ids),
            n_products=len(product_codes),
            rows=rows[order].astype(np.intp),
            cols=cols[order].astype(np.intp),
            adopted=adopted[order],
            closed=closed[order],
        )

    @classmethod
    def from_state(
        cls, state: CustomerState, *, product_index: Mapping[str, int], n_products: int
    ) -> AdoptionIndex:
        """Index one customer's adoptions (one row).

        Parameters
        ----------
        state : CustomerState
            The customer.
        product_index : mapping of str to int
            Column of each product code; adoptions of other products are dropped.
        n_products : int
            Number of columns.

        Returns
        -------
        AdoptionIndex
        """
        found: list[tuple[int, int, int]] = []
        for adoption in state.adoptions:
            col = product_index.get(str(adoption.product_code))
            if col is None:
                continue
            start = to_ns(adoption.adopted_at)
            if start == NAT_NS:
                raise ValueError(f"customer {state.customer_id}: adoption date missing")
            end = to_ns(adoption.closed_at)
            found.append((start, col, OPEN_NS if end == NAT_NS else end))
        found.sort()
        n = len(found)
        return cls(
            n_customers=1,
            n_products=n_products,
            rows=np.zeros(n, dtype=np.intp),
            cols=np.fromiter((f[1] for f in found), dtype=np.intp, count=n),
            adopted=np.fromiter((f[0] for f in found), dtype=np.int64, count=n),
            closed=np.fromiter((f[2] for f in found), dtype=np.int64, count=n),
        )

    def snapshot(self, at_ns: int) -> Snapshot:
        """Holdings, first adoptions and last adoption at an instant, in one pass.

        Returns
        -------
        Snapshot
            ``held`` (customers x products, as :meth:`held`), ``first_days`` (as
            :meth:`first_days`), ``last_col`` and ``last_day`` (as
            :meth:`last_adoption`); read-only arrays, shared by the calls at the same
            instant in a row.
        """
        # One read of the entry: another thread may replace it meanwhile.
        entry = self._last[0] if self._last else None
        if entry is not None and entry[0] == at_ns:
            return entry[1]
        snapshot = self._snapshot(at_ns)
        for array in snapshot:
            array.flags.writeable = False
        self._last[:] = [(at_ns, snapshot)]
        return snapshot

    def _snapshot(self, at_ns: int) -> Snapshot:
        n, p = self.n_customers, self.n_products
        before = self.adopted < at_ns
        held = np.zeros(n * p, dtype=bool)
        held[self.cells[before & (self.closed >= at_ns)]] = True
        first = np.full(n * p, NEVER, dtype=np.int32)
        np.minimum.at(first, self.cells[before], self.days[before])
        # Rows are sorted by customer then instant: the last row seen per customer wins.
        seen = np.flatnonzero(before)
        last = np.full(n, -1, dtype=np.intp)
        np.maximum.at(last, self.rows[seen], seen)
        has = last >= 0
        # Index only where a row exists: with no adoptions at all, ``self.cols`` is empty.
        last_col = np.full(n, -1, dtype=self.cols.dtype)
        last_col[has] = self.cols[last[has]]
        last_day = np.full(n, NEVER, dtype=np.int64)
        last_day[has] = self.days[last[has]]
        return Snapshot(held.reshape(n, p), first.reshape(n, p), last_col, last_day)

    def held(self, at_ns: int) -> npt.NDArray[np.bool_]:
        """Customers x products: held at the instant (adopted before, not closed before).

        Equals :func:`models.sequences.held_matrix` on the same rows and columns.
        """
        return self.snapshot(at_ns).held

    def first_days(self, as_of_ns: int, *, keep: bool = True) -> npt.NDArray[np.int32]:
        """Customers x products: day of the first adoption before the instant, else NEVER.

        Equals :attr:`models.sequences.AdoptionMatrix.first_days` on the same labels.
        ``keep=False`` leaves the latest snapshot (:meth:`snapshot`) as it was: for a
        caller on another thread than the one reading snapshots instant after instant.
        """
        if not keep:
            return self._snapshot(as_of_ns).first_days
        return self.snapshot(as_of_ns).first_days

    def last_adoption(self, as_of_ns: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
        """Each customer's latest adoption before the instant.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            The product column (-1 if none) and the day (:data:`NEVER` if none).
            Adoptions at the same instant: the highest column wins.
        """
        snapshot = self.snapshot(as_of_ns)
        return snapshot.last_col, snapshot.last_day

    def adopted_between(self, start_ns: int, end_ns: int) -> npt.NDArray[np.bool_]:
        """Customers x products: adopted at an instant in ``[start, end)``."""
        out = np.zeros(self.n_customers * self.n_products, dtype=bool)
        out[self.cells[(self.adopted >= start_ns) & (self.adopted < end_ns)]] = True
        return out.reshape(self.n_customers, self.n_products)


def snapshot_of_state(
    state: CustomerState, *, product_index: Mapping[str, int], n_products: int, at_ns: int
) -> Snapshot:
    """One customer's :class:`Snapshot` at an instant, straight from their records.

    The same definitions as :meth:`AdoptionIndex.snapshot` on a one-customer index,
    computed on Python scalars: a customer has a handful of adoptions, and array
    operations cost more than they save at that size.

    Parameters
    ----------
    state : CustomerState
        The customer.
    product_index : mapping of str to int
        Column of each product code; adoptions of other products are ignored.
    n_products : int
        Number of columns.
    at_ns : int
        The instant, in nanoseconds.

    Returns
    -------
    Snapshot
        Arrays with one row.
    """
    held = np.zeros((1, n_products), dtype=bool)
    first = np.full((1, n_products), NEVER, dtype=np.int32)
    first_row: dict[int, int] = {}
    last: tuple[int, int] | None = None
    for adoption in state.adoptions:
        col = product_index.get(str(adoption.product_code))
        if col is None:
            continue
        start = to_ns(adoption.adopted_at)
        if start == NAT_NS:
            raise ValueError(f"customer {state.customer_id}: adoption date missing")
        if start >= at_ns:
            continue
        end = to_ns(adoption.closed_at)
        if end == NAT_NS or end >= at_ns:
            held[0, col] = True
        day = start // NS_PER_DAY
        if day < first_row.get(col, NEVER):
            first_row[col] = day
        # Latest instant wins; at the same instant the highest column (as the index).
        if last is None or (start, col) > last:
            last = (start, col)
    for col, day in first_row.items():
        first[0, col] = day
    if last is None:
        return Snapshot(held, first, np.full(1, -1, dtype=np.intp), np.full(1, NEVER, np.int64))
    return Snapshot(
        held,
        first,
        np.full(1, last[1], dtype=np.intp),
        np.full(1, last[0] // NS_PER_DAY, dtype=np.int64),
    )


# --------------------------------------------------------------------------- the bank


@dataclass(frozen=True, eq=False)
class BankData:
    """A bank's products, customers and adoptions, with normalised dtypes.

    Build it with :meth:`from_frames` or :meth:`from_folder`, which validate and
    normalise; treat the frames as read-only.

    Attributes
    ----------
    products : pandas.DataFrame
        :data:`PRODUCT_COLUMNS`, one row per product: ``product_code``, ``name`` and
        ``category`` (str), ``value`` and ``business_weight`` (float64), ``active``
        (bool), ``min_age`` and ``max_age`` (nullable Int64), ``segments``,
        ``requires`` and ``excludes`` (object: a tuple of str, or None for none).
    customers : pandas.DataFrame
        ``customer_id`` (str, unique), ``segment`` and ``branch_id`` (str, missing as
        NaN), ``joined_at`` and ``birth_date`` (datetime64[ns], missing as NaT), then
        one column per attribute: float64 for numeric, str for categorical.
    attribute_kinds : dict of str to {"numeric", "categorical"}
        The attribute columns of ``customers``, in column order.
    adoptions : pandas.DataFrame
        :data:`ADOPTION_COLUMNS`: ``customer_id`` and ``product_code`` (str),
        ``adopted_at`` (datetime64[ns], never missing), ``closed_at`` (datetime64[ns],
        NaT while open).
    outcomes : pandas.DataFrame or None
        :data:`OUTCOME_COLUMNS` (``occurred_at`` datetime64[ns]) when offer outcomes
        are tracked, else None.
    attribute_history : pandas.DataFrame or None
        :data:`ATTRIBUTE_HISTORY_COLUMNS`, one row per change of a customer's attribute
        (or ``segment``, ``branch_id``): from ``changed_at`` (datetime64[ns]) on,
        ``attribute`` took a new value, and before it was ``previous`` (object: a float
        for numeric attributes, a str otherwise; NaN when unknown). ``customers`` holds
        the values after each customer's last change, and the value before the first
        change counts as valid from the start of history; so the value at an instant
        ``t`` is ``previous`` of the first change at or after ``t`` (a change at ``t``
        has not happened yet at ``t``), else the one in ``customers``. Sorted by
        customer, attribute and ``changed_at``. None (or no rows) when the bank keeps
        no history: every instant reads ``customers``.
    """

    products: pd.DataFrame
    customers: pd.DataFrame
    attribute_kinds: dict[str, AttributeKind]
    adoptions: pd.DataFrame
    outcomes: pd.DataFrame | None = None
    attribute_history: pd.DataFrame | None = None

    @property
    def product_codes(self) -> tuple[str, ...]:
        """Product codes in catalogue order."""
        return tuple(str(code) for code in self.products["product_code"])

    @classmethod
    def from_frames(
        cls,
        products: pd.DataFrame,
        customers: pd.DataFrame,
        adoptions: pd.DataFrame,
        *,
        attribute_kinds: Mapping[str, AttributeKind] | None = None,
        outcomes: pd.DataFrame | None = None,
        attribute_history: pd.DataFrame | None = None,
    ) -> BankData:
        """Validate and normalise import-format frames.

        Text cells may hold anything the import format allows: lists ``|``-separated,
        booleans as ``true/false/1/0/yes/no``, missing as empty, ``NA``, ``null``.

        Parameters
        ----------
        products, customers, adoptions : pandas.DataFrame
            Import-format tables (see :class:`BankData` for the columns). Products need
            at least ``product_code``; missing optional columns get defaults (name =
            code, business weight 1, active, no limits). Customers need
            ``customer_id``; every column beyond the fixed five is an attribute.
            Adoptions need ``customer_id, product_code, adopted_at``.
        attribute_kinds : mapping, optional
            Kind of each attribute; by default numeric if every present value is a
            number (numeric dtypes always are), else categorical.
        outcomes : pandas.DataFrame, optional
            Offer outcomes (:data:`OUTCOME_COLUMNS`).
        attribute_history : pandas.DataFrame, optional
            Changes of customers' attributes (:data:`ATTRIBUTE_HISTORY_COLUMNS`, see
            :class:`BankData`); ``previous`` is read by the attribute's kind.

        Returns
        -------
        BankData

        Raises
        ------
        ValueError
            On missing required columns, missing or duplicate keys, unparseable values,
            adoptions naming unknown customers or products, or history naming unknown
            customers or attributes.
        """
        product_frame = _normalise_products(products)
        customer_frame, kinds = _normalise_customers(customers, attribute_kinds)
        adoption_frame = _normalise_adoptions(adoptions)
        outcome_frame = None if outcomes is None else _normalise_outcomes(outcomes)
        known_customers = pd.Index(customer_frame["customer_id"].to_numpy(dtype=object))
        known_products = pd.Index(product_frame["product_code"].to_numpy(dtype=object))
        checked = [(adoption_frame, "adoptions")]
        if outcome_frame is not None:
            checked.append((outcome_frame, "outcomes"))
        for frame, name in checked:
            _check_known(frame, "customer_id", known_customers, name)
            _check_known(frame, "product_code", known_products, name)
        history_frame = None
        if attribute_history is not None:
            history_frame = _normalise_history(attribute_history, kinds)
            _check_known(history_frame, "customer_id", known_customers, "attribute_history")
        return cls(
            products=product_frame,
            customers=customer_frame,
            attribute_kinds=kinds,
            adoptions=adoption_frame,
            outcomes=outcome_frame,
            attribute_history=history_frame,
        )

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        attribute_kinds: Mapping[str, AttributeKind] | None = None,
    ) -> BankData:
        """Read ``products``, ``customers``, ``adoptions`` (and optional ``outcomes`` and
        ``attribute_history``).

        Each table is ``<name>.parquet``, ``<name>.csv`` or ``<name>.csv.gz`` in
        ``path``. CSV cells are read as text and parsed as in :meth:`from_frames`.

        Parameters
        ----------
        path : str or pathlib.Path
            The folder.
        attribute_kinds : mapping, optional
            As in :meth:`from_frames`.

        Returns
        -------
        BankData

        Raises
        ------
        FileNotFoundError
            If a required table is missing.
        ValueError
            As :meth:`from_frames`.
        """
        folder = Path(path)
        tables = {
            name: _read_table(folder, name, required=name in ("products", "customers", "adoptions"))
            for name in ("products", "customers", "adoptions", "outcomes", "attribute_history")
        }
        products, customers, adoptions = (
            tables["products"],
            tables["customers"],
            tables["adoptions"],
        )
        assert products is not None and customers is not None and adoptions is not None
        return cls.from_frames(
            products,
            customers,
            adoptions,
            attribute_kinds=attribute_kinds,
            outcomes=tables["outcomes"],
            attribute_history=tables["attribute_history"],
        )

    def customer_state(self, customer_id: str) -> CustomerState:
        """One customer's record as a :class:`CustomerState` (a linear scan: for tests
        and tools, not for serving).

        Raises
        ------
        KeyError
            If the customer is unknown.
        """
        rows = self.customers.index[self.customers["customer_id"] == customer_id]
        if len(rows) == 0:
            raise KeyError(customer_id)
        row = self.customers.loc[rows[0]]
        mine = self.adoptions[self.adoptions["customer_id"] == customer_id]
        outcomes: tuple[OfferOutcome, ...] = ()
        if self.outcomes is not None:
            theirs = self.outcomes[self.outcomes["customer_id"] == customer_id]
            outcomes = tuple(
                OfferOutcome(str(p), str(o), _nat_to_none(t))
                for p, o, t in zip(
                    theirs["product_code"], theirs["outcome"], theirs["occurred_at"], strict=True
                )
            )
        return CustomerState(
            customer_id=customer_id,
            segment=_none_if_missing(row["segment"]),
            branch_id=_none_if_missing(row["branch_id"]),
            joined_at=_nat_to_none(row["joined_at"]),
            birth_date=_nat_to_none(row["birth_date"]),
            attributes={name: _none_if_missing(row[name]) for name in self.attribute_kinds},
            adoptions=tuple(
                Adoption(str(p), _nat_to_none(a), _nat_to_none(c))
                for p, a, c in zip(
                    mine["product_code"], mine["adopted_at"], mine["closed_at"], strict=True
                )
            ),
            outcomes=outcomes,
        )


# --------------------------------------------------------------------------- normalising


def _read_table(folder: Path, name: str, *, required: bool) -> pd.DataFrame | None:
    for suffix in _SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.exists():
            if suffix == ".parquet":
                return pd.read_parquet(path)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
            frame.columns = [str(column).strip() for column in frame.columns]
            return frame
    if required:
        raise FileNotFoundError(f"{folder}: no {name}.parquet, {name}.csv or {name}.csv.gz")
    return None


def _require(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {list(frame.columns)}")


def _text(values: pd.Series) -> pd.Series:
    """Strings with surrounding spaces stripped; missing tokens become NaN."""
    text = values.astype("str").str.strip()
    return text.mask(text.isna() | text.str.lower().isin(_MISSING))


def _keys(values: pd.Series, column: str, name: str) -> pd.Series:
    keys = _text(values)
    if keys.isna().any():
        raise ValueError(f"{name}.{column} must not be missing")
    return keys


def _dates(values: pd.Series, column: str) -> pd.Series:
    try:
        if pd.api.types.is_datetime64_any_dtype(values):
            stamps = values
        elif _is_date_objects(values):
            stamps = pd.to_datetime(values.astype(object), utc=False)
        else:
            stamps = pd.to_datetime(_text(values), format="ISO8601")
    except (ValueError, TypeError) as error:
        raise ValueError(f"{column}: unparseable date ({error})") from None
    if isinstance(stamps.dtype, pd.DatetimeTZDtype):
        stamps = stamps.dt.tz_localize(None)
    return stamps.astype("datetime64[ns]")


def _is_date_objects(values: pd.Series) -> bool:
    present = values.dropna()
    return len(present) > 0 and all(isinstance(v, dt.date) for v in present.head(100))


def _floats(values: pd.Series, column: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return values.astype("float64")
    text = _text(values)
    numbers = pd.to_numeric(text, errors="coerce")
    bad = numbers.isna() & text.notna()
    if bad.any():
        raise ValueError(f"{column}: not a number: {text[bad].iloc[0]!r}")
    return numbers.astype("float64")


def _bools(values: pd.Series, column: str, default: bool) -> pd.Series:
    if pd.api.types.is_bool_dtype(values) and not values.isna().any():
        return values.astype(bool)
    out = []
    for value in values.to_numpy(dtype=object):
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
            out.append(default)
            continue
        text = str(value).strip().lower()
        if text in _MISSING:
            out.append(default)
        elif text in _TRUE:
            out.append(True)
        elif text in _FALSE:
            out.append(False)
        else:
            raise ValueError(f"{column}: not a boolean: {value!r}")
    return pd.Series(out, index=values.index, dtype=bool)


def _code_list(value: object) -> tuple[str, ...] | None:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        items = [item.strip() for item in value.split("|")]
    else:
        items = [str(item).strip() for item in np.asarray(value, dtype=object).ravel()]
    items = [item for item in items if item and item.lower() not in _MISSING]
    return tuple(dict.fromkeys(items)) or None


def _normalise_products(products: pd.DataFrame) -> pd.DataFrame:
    _require(products, ("product_code",), "products")
    codes = _keys(products["product_code"], "product_code", "products")
    if codes.duplicated().any():
        raise ValueError(f"products.product_code repeats {codes[codes.duplicated()].iloc[0]!r}")
    n = len(products)

    def column(name: str) -> pd.Series:
        if name in products.columns:
            return products[name]
        return pd.Series([None] * n, index=products.index, dtype=object)

    names = _text(column("name"))
    names = names.where(names.notna(), codes)
    category = _text(column("category")).fillna("")
    value = _floats(column("value"), "products.value").fillna(0.0)
    weight = _floats(column("business_weight"), "products.business_weight").fillna(1.0)
    ages = {
        name: _floats(column(name), f"products.{name}").round().astype("Int64")
        for name in ("min_age", "max_age")
    }
    frame = pd.DataFrame(
        {
            "product_code": codes,
            "name": names.astype("str"),
            "category": category.astype("str"),
            "value": value,
            "business_weight": weight,
            "active": _bools(column("active"), "products.active", default=True),
            "min_age": ages["min_age"],
            "max_age": ages["max_age"],
        }
    )
    for name in _LIST_COLUMNS:
        frame[name] = pd.Series(
            [_code_list(v) for v in column(name).to_numpy(dtype=object)],
            index=frame.index,
            dtype=object,
        )
    return frame.reset_index(drop=True)


def _normalise_customers(
    customers: pd.DataFrame, attribute_kinds: Mapping[str, AttributeKind] | None
) -> tuple[pd.DataFrame, dict[str, AttributeKind]]:
    _require(customers, ("customer_id",), "customers")
    ids = _keys(customers["customer_id"], "customer_id", "customers")
    if ids.duplicated().any():
        raise ValueError(f"customers.customer_id repeats {ids[ids.duplicated()].iloc[0]!r}")
    n = len(customers)

    def column(name: str) -> pd.Series:
        if name in customers.columns:
            return customers[name]
        return pd.Series([None] * n, index=customers.index, dtype=object)

    frame = pd.DataFrame(
        {
            "customer_id": ids,
            "segment": _text(column("segment")),
            "branch_id": _text(column("branch_id")),
            "joined_at": _dates(column("joined_at"), "customers.joined_at"),
            "birth_date": _dates(column("birth_date"), "customers.birth_date"),
        }
    )
    names = [c for c in customers.columns if c not in CUSTOMER_FIXED_COLUMNS]
    if attribute_kinds is not None:
        unknown = sorted(set(attribute_kinds) - set(names))
        if unknown:
            raise ValueError(f"attribute_kinds names unknown customer column(s) {unknown}")
    kinds: dict[str, AttributeKind] = {}
    columns: dict[str, pd.Series] = {}
    for name in names:
        values = customers[name]
        kind = attribute_kinds.get(name) if attribute_kinds is not None else None
        if kind is None:
            kind = _infer_kind(values)
        if kind == "numeric":
            columns[name] = _floats(values, f"customers.{name}")
        elif kind == "categorical":
            columns[name] = _categorical_text(values)
        else:
            raise ValueError(f"attribute kind of {name!r} must be numeric or categorical")
        kinds[str(name)] = kind
    # Joined at once: inserting thousands of attribute columns one by one fragments
    # the frame and slows every later operation on it.
    frame = pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)
    return frame.reset_index(drop=True), kinds


def _infer_kind(values: pd.Series) -> AttributeKind:
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return "numeric"
    text = _text(values)
    numbers = pd.to_numeric(text, errors="coerce")
    return "numeric" if not (numbers.isna() & text.notna()).any() else "categorical"


def _categorical_text(values: pd.Series) -> pd.Series:
    if pd.api.types.is_float_dtype(values):
        # 1.0 and 1 are the same label.
        as_int = values.dropna()
        if (as_int == np.round(as_int)).all():
            values = values.astype("Int64")
    return _text(values.astype(object))


def _normalise_adoptions(adoptions: pd.DataFrame) -> pd.DataFrame:
    _require(adoptions, ("customer_id", "product_code", "adopted_at"), "adoptions")
    n = len(adoptions)
    closed = (
        adoptions["closed_at"]
        if "closed_at" in adoptions.columns
        else pd.Series([None] * n, index=adoptions.index, dtype=object)
    )
    frame = pd.DataFrame(
        {
            "customer_id": _keys(adoptions["customer_id"], "customer_id", "adoptions"),
            "product_code": _keys(adoptions["product_code"], "product_code", "adoptions"),
            "adopted_at": _dates(adoptions["adopted_at"], "adoptions.adopted_at"),
            "closed_at": _dates(closed, "adoptions.closed_at"),
        }
    )
    if frame["adopted_at"].isna().any():
        raise ValueError("adoptions.adopted_at must not be missing")
    return frame.reset_index(drop=True)


def _normalise_outcomes(outcomes: pd.DataFrame) -> pd.DataFrame:
    _require(outcomes, OUTCOME_COLUMNS, "outcomes")
    frame = pd.DataFrame(
        {
            "customer_id": _keys(outcomes["customer_id"], "customer_id", "outcomes"),
            "product_code": _keys(outcomes["product_code"], "product_code", "outcomes"),
            "outcome": _keys(outcomes["outcome"], "outcome", "outcomes"),
            "occurred_at": _dates(outcomes["occurred_at"], "outcomes.occurred_at"),
        }
    )
    if frame["occurred_at"].isna().any():
        raise ValueError("outcomes.occurred_at must not be missing")
    return frame.reset_index(drop=True)


def _normalise_history(history: pd.DataFrame, kinds: Mapping[str, AttributeKind]) -> pd.DataFrame:
    _require(history, ATTRIBUTE_HISTORY_COLUMNS, "attribute_history")
    frame = pd.DataFrame(
        {
            "customer_id": _keys(history["customer_id"], "customer_id", "attribute_history"),
            "attribute": _keys(history["attribute"], "attribute", "attribute_history"),
            "changed_at": _dates(history["changed_at"], "attribute_history.changed_at"),
            "previous": pd.Series([None] * len(history), index=history.index, dtype=object),
        }
    )
    if frame["changed_at"].isna().any():
        raise ValueError("attribute_history.changed_at must not be missing")
    names = frame["attribute"].to_numpy(dtype=object)
    unknown = sorted({str(n) for n in names} - set(kinds) - set(HISTORY_FIXED_COLUMNS))
    if unknown:
        raise ValueError(f"attribute_history.attribute names unknown attribute(s) {unknown[:3]}")
    previous = history["previous"]
    for name in pd.unique(names):
        mask = names == name
        values = previous[mask]
        if kinds.get(str(name)) == "numeric":
            converted = _floats(values, f"attribute_history.previous of {name}")
        else:
            converted = _categorical_text(values)
        frame.loc[mask, "previous"] = converted.to_numpy(dtype=object)
    frame = frame.sort_values(["customer_id", "attribute", "changed_at"], kind="stable")
    return frame.reset_index(drop=True)


def _check_known(frame: pd.DataFrame, column: str, known: pd.Index, name: str) -> None:
    unknown = known.get_indexer(frame[column].to_numpy(dtype=object)) < 0
    if unknown.any():
        values = pd.unique(frame[column].to_numpy(dtype=object)[unknown])
        raise ValueError(
            f"{name}.{column} names {len(values)} unknown value(s), e.g. {list(values[:3])}"
        )


def _ns_array(values: pd.Series) -> npt.NDArray[np.int64]:
    return np.asarray(values.to_numpy(dtype="datetime64[ns]").astype(np.int64))


def _none_if_missing(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def _nat_to_none(value: Any) -> pd.Timestamp | None:
    if value is None or pd.isna(value):
        return None
    return pd.Timestamp(value)
