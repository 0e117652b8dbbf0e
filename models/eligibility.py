"""Which products a customer may be offered at an instant, and why not.

A product is eligible for a customer at instant ``at`` when all of these hold:

- the product is active;
- the customer does not hold it at ``at`` (held as in
  :func:`models.sequences.held_matrix`: adopted before ``at``, not closed before);
- the customer's age on the date of ``at`` (whole years) is within
  ``[min_age, max_age]``; an unknown birth date passes the age rules;
- the product lists no segments, or the customer's segment is one of them;
- every product in ``requires`` is held at ``at``;
- no product in ``excludes`` is held at ``at``.

Each rule is written once (:func:`rule_failures`), vectorised over customers x
products; :func:`eligible_matrix` combines it for a whole bank and
:func:`check_eligibility` runs it on one customer and words every failure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.data import (
    NAT_NS,
    NS_PER_DAY,
    AdoptionIndex,
    BankData,
    CustomerState,
    DateInput,
    instant,
    snapshot_of_state,
    to_ns,
)

__all__ = [
    "RULES",
    "Catalogue",
    "Eligibility",
    "ages_at",
    "check_eligibility",
    "eligible_matrix",
    "eligible_products",
    "rule_failures",
]

RULES: Final[tuple[str, ...]] = (
    "inactive",
    "held",
    "too_young",
    "too_old",
    "segment",
    "requires",
    "excludes",
)
"""Names of the eligibility rules, in the order their reasons are reported."""

_ORDINAL_EPOCH: Final[int] = dt.date(1970, 1, 1).toordinal()
_RULE_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(RULES)}
_LOOKUP_ONE_BY_ONE: Final[int] = 1_000
"""Up to this many customers, segments are looked up one by one (serving asks for one)."""


@dataclass(frozen=True, eq=False)
class Catalogue:
    """The product catalogue compiled for vectorised eligibility checks.

    Attributes
    ----------
    product_codes, names, categories : tuple of str
        One entry per product, in catalogue order (the column order of every matrix).
    values, business_weights : numpy.ndarray
        float64 per product.
    active : numpy.ndarray
        bool per product.
    min_age, max_age : numpy.ndarray
        float64 per product, NaN when there is no limit.
    segments : tuple of (tuple of str or None)
        Segments allowed per product; None allows every segment.
    requires, excludes : tuple of tuple of str
        Products that must all be held / must none be held, per product.
    """

    product_codes: tuple[str, ...]
    names: tuple[str, ...]
    categories: tuple[str, ...]
    values: npt.NDArray[np.float64]
    business_weights: npt.NDArray[np.float64]
    active: npt.NDArray[np.bool_]
    min_age: npt.NDArray[np.float64]
    max_age: npt.NDArray[np.float64]
    segments: tuple[tuple[str, ...] | None, ...]
    requires: tuple[tuple[str, ...], ...]
    excludes: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.product_codes)
        if len(set(self.product_codes)) != n:
            raise ValueError("product codes must be unique")
        index = {code: j for j, code in enumerate(self.product_codes)}
        for name, lists in (("requires", self.requires), ("excludes", self.excludes)):
            for code, items in zip(self.product_codes, lists, strict=True):
                unknown = [item for item in items if item not in index]
                if unknown:
                    raise ValueError(f"product {code!r} {name} unknown product(s) {unknown}")
        levels = sorted({s for allowed in self.segments if allowed for s in allowed})
        allowed_matrix = np.ones((len(levels) + 1, n), dtype=bool)
        for j, allowed in enumerate(self.segments):
            if allowed is not None:
                allowed_matrix[:, j] = False
                for segment in allowed:
                    allowed_matrix[levels.index(segment), j] = True
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "segment_levels", {s: i for i, s in enumerate(levels)})
        object.__setattr__(self, "segment_allowed", allowed_matrix)
        # requires_t[q, p] = 1 where p requires q (likewise excludes_t), so that
        # (~held) @ requires_t counts each product's missing requirements.
        requires_t = np.zeros((n, n), dtype=np.float32)
        excludes_t = np.zeros((n, n), dtype=np.float32)
        for j in range(n):
            for code in self.requires[j]:
                requires_t[index[code], j] = 1.0
            for code in self.excludes[j]:
                excludes_t[index[code], j] = 1.0
        object.__setattr__(self, "requires_t", requires_t)
        object.__setattr__(self, "n_required", requires_t.sum(axis=0) - 0.5)
        object.__setattr__(self, "excludes_t", excludes_t)
        object.__setattr__(self, "inactive", ~self.active)

    # Derived in __post_init__, not constructor arguments.
    index: dict[str, int] = field(init=False, repr=False)
    segment_levels: dict[str, int] = field(init=False, repr=False)
    segment_allowed: npt.NDArray[np.bool_] = field(init=False, repr=False)
    requires_t: npt.NDArray[np.float32] = field(init=False, repr=False)
    n_required: npt.NDArray[np.float32] = field(init=False, repr=False)
    excludes_t: npt.NDArray[np.float32] = field(init=False, repr=False)
    inactive: npt.NDArray[np.bool_] = field(init=False, repr=False)

    def __len__(self) -> int:
        return len(self.product_codes)

    @classmethod
    def from_products(cls, products: pd.DataFrame) -> Catalogue:
        """Compile a normalised products frame (see :class:`models.data.BankData`).

        Raises
        ------
        ValueError
            If a product requires or excludes a product not in the frame.
        """

        def ages(column: str) -> npt.NDArray[np.float64]:
            return np.asarray(products[column].to_numpy(dtype=np.float64, na_value=np.nan))

        def codes(column: str) -> tuple[tuple[str, ...], ...]:
            return tuple(tuple(v) if v else () for v in products[column].to_numpy(dtype=object))

        return cls(
            product_codes=tuple(str(c) for c in products["product_code"]),
            names=tuple(str(c) for c in products["name"]),
            categories=tuple(str(c) for c in products["category"]),
            values=products["value"].to_numpy(dtype=np.float64),
            business_weights=products["business_weight"].to_numpy(dtype=np.float64),
            active=products["active"].to_numpy(dtype=bool),
            min_age=ages("min_age"),
            max_age=ages("max_age"),
            segments=tuple(
                tuple(v) if v else None for v in products["segments"].to_numpy(dtype=object)
            ),
            requires=codes("requires"),
            excludes=codes("excludes"),
        )

    @classmethod
    def from_data(cls, data: BankData) -> Catalogue:
        """Compile ``data.products``."""
        return cls.from_products(data.products)

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready rows, one per product (inverse: :meth:`from_records`)."""

        def age(value: float) -> int | None:
            return None if np.isnan(value) else int(value)

        return [
            {
                "product_code": code,
                "name": self.names[j],
                "category": self.categories[j],
                "value": float(self.values[j]),
                "business_weight": float(self.business_weights[j]),
                "active": bool(self.active[j]),
                "min_age": age(self.min_age[j]),
                "max_age": age(self.max_age[j]),
                "segments": None if self.segments[j] is None else list(self.segments[j] or ()),
                "requires": list(self.requires[j]),
                "excludes": list(self.excludes[j]),
            }
            for j, code in enumerate(self.product_codes)
        ]

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> Catalogue:
        """Rebuild a catalogue from :meth:`to_records`."""

        def age(value: Any) -> float:
            return np.nan if value is None else float(value)

        return cls(
            product_codes=tuple(str(r["product_code"]) for r in records),
            names=tuple(str(r["name"]) for r in records),
            categories=tuple(str(r["category"]) for r in records),
            values=np.asarray([float(r["value"]) for r in records], dtype=np.float64),
            business_weights=np.asarray(
                [float(r["business_weight"]) for r in records], dtype=np.float64
            ),
            active=np.asarray([bool(r["active"]) for r in records], dtype=bool),
            min_age=np.asarray([age(r["min_age"]) for r in records], dtype=np.float64),
            max_age=np.asarray([age(r["max_age"]) for r in records], dtype=np.float64),
            segments=tuple(
                None if r["segments"] is None else tuple(r["segments"]) for r in records
            ),
            requires=tuple(tuple(r["requires"]) for r in records),
            excludes=tuple(tuple(r["excludes"]) for r in records),
        )

    def segment_codes(
        self, segments: Sequence[object] | npt.NDArray[np.object_]
    ) -> npt.NDArray[np.intp]:
        """Row of :attr:`segment_allowed` for each customer's segment (unknown: last)."""
        other = len(self.segment_levels)
        levels = self.segment_levels
        if len(segments) < _LOOKUP_ONE_BY_ONE:
            return np.array(
                [levels.get(s, other) if isinstance(s, str) else other for s in segments],
                dtype=np.intp,
            )
        # A bank's customers: each distinct segment looked up once.
        codes, uniques = pd.factorize(np.asarray(segments, dtype=object), use_na_sentinel=True)
        lookup = [levels.get(s, other) if isinstance(s, str) else other for s in uniques]
        return np.asarray(np.array([*lookup, other], dtype=np.intp)[codes], dtype=np.intp)


# --------------------------------------------------------------------------- the rules


def ages_at(birth_ns: npt.NDArray[np.int64], at_ns: int) -> npt.NDArray[np.float64]:
    """Age in whole years on the date of an instant.

    Parameters
    ----------
    birth_ns : numpy.ndarray
        int64 nanoseconds of each birth date; :data:`models.data.NAT_NS` if unknown.
    at_ns : int
        The instant, in nanoseconds; its calendar date counts (a birthday on that
        date has been reached).

    Returns
    -------
    numpy.ndarray
        float64 ages, NaN where the birth date is unknown.
    """
    on = dt.date.fromordinal(int(at_ns // NS_PER_DAY) + _ORDINAL_EPOCH)
    on_month_day = on.month * 100 + on.day
    if birth_ns.shape == (1,):
        # One customer (decision time): the same formula on Python scalars, faster.
        if birth_ns[0] == NAT_NS:
            return np.asarray([np.nan])
        born = dt.date.fromordinal(int(birth_ns[0] // NS_PER_DAY) + _ORDINAL_EPOCH)
        return np.asarray(
            [on.year - born.year - (on_month_day < born.month * 100 + born.day)], dtype=np.float64
        )
    known = birth_ns != NAT_NS
    days = np.where(known, birth_ns // NS_PER_DAY, 0).astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    year = months.astype("datetime64[Y]").astype(np.int64) + 1970
    month_day = (months.astype(np.int64) % 12 + 1) * 100 + (days - months).astype(np.int64) + 1
    age = (on.year - year - (on_month_day < month_day)).astype(np.float64)
    age[~known] = np.nan
    return np.asarray(age, dtype=np.float64)


def rule_failures(
    catalogue: Catalogue,
    *,
    held: npt.NDArray[np.bool_],
    ages: npt.NDArray[np.float64],
    segment_codes: npt.NDArray[np.intp],
) -> Mapping[str, npt.NDArray[np.bool_]]:
    """Where each eligibility rule fails, customers x products.

    Parameters
    ----------
    catalogue : Catalogue
        The products (columns).
    held : numpy.ndarray
        bool, customers x products: held at the instant.
    ages : numpy.ndarray
        float64 per customer, NaN if unknown.
    segment_codes : numpy.ndarray
        Per customer, from :meth:`Catalogue.segment_codes`.

    Returns
    -------
    mapping of str to numpy.ndarray
        One bool customers x products matrix per name in :data:`RULES`; True where the
        rule fails.
    """
    n, p = held.shape
    # One (rules x customers x products) block, so that combining is one reduction.
    out = np.empty((len(RULES), n, p), dtype=bool)
    out[0] = catalogue.inactive
    out[1] = held
    age = ages[:, None]
    # Comparisons with NaN (unknown age, no limit) are False: the age rules pass.
    np.less(age, catalogue.min_age, out=out[2])
    np.greater(age, catalogue.max_age, out=out[3])
    np.logical_not(catalogue.segment_allowed[segment_codes], out=out[4])
    # Held counts of at most len(catalogue) are exact in float32.
    held_f = held.astype(np.float32)
    np.less(held_f @ catalogue.requires_t, catalogue.n_required, out=out[5])
    np.greater(held_f @ catalogue.excludes_t, 0.5, out=out[6])
    return _Failures(out)


class _Failures(Mapping[str, npt.NDArray[np.bool_]]):
    """Rule name -> failures, backed by one stacked array (``block``)."""

    def __init__(self, block: npt.NDArray[np.bool_]) -> None:
        self.block = block

    def __getitem__(self, name: str) -> npt.NDArray[np.bool_]:
        return np.asarray(self.block[_RULE_INDEX[name]])

    def __iter__(self) -> Iterator[str]:
        return iter(RULES)

    def __len__(self) -> int:
        return len(RULES)


def combine(failures: Mapping[str, npt.NDArray[np.bool_]]) -> npt.NDArray[np.bool_]:
    """Eligible where no rule fails."""
    if isinstance(failures, _Failures):
        return np.asarray(~failures.block.any(axis=0))
    fails = np.zeros(failures["held"].shape, dtype=bool)
    for name in RULES:
        fails |= failures[name]
    return ~fails


def eligible_matrix(
    data: BankData, *, at: DateInput, catalogue: Catalogue | None = None
) -> npt.NDArray[np.bool_]:
    """Which products each customer may be offered at an instant.

    Parameters
    ----------
    data : BankData
        The bank.
    at : date-like
        The instant.
    catalogue : Catalogue, optional
        Products (columns) and their rules; default ``data.products``.

    Returns
    -------
    numpy.ndarray
        bool, ``len(data.customers)`` x products, rows in ``data.customers`` order.
    """
    catalogue = catalogue if catalogue is not None else Catalogue.from_data(data)
    at_ns = instant(at, name="at")
    customers = data.customers
    index = AdoptionIndex.from_frame(
        data.adoptions,
        customer_ids=customers["customer_id"].to_numpy(dtype=object),
        product_codes=catalogue.product_codes,
    )
    birth = customers["birth_date"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    failures = rule_failures(
        catalogue,
        held=index.held(at_ns),
        ages=ages_at(birth, at_ns),
        segment_codes=catalogue.segment_codes(customers["segment"].to_numpy(dtype=object)),
    )
    return combine(failures)


@dataclass(frozen=True)
class Eligibility:
    """One customer's eligibility at an instant.

    Attributes
    ----------
    eligible : tuple of str
        Eligible product codes, in catalogue order.
    reasons : dict of str to tuple of str
        For every other product, each failed rule in words, in :data:`RULES` order
        (e.g. ``"already held"``, ``"age 17 below minimum 18"``,
        ``"requires current_account"``).
    """

    eligible: tuple[str, ...]
    reasons: dict[str, tuple[str, ...]]


def check_eligibility(state: CustomerState, catalogue: Catalogue, at: DateInput) -> Eligibility:
    """Check every product for one customer, with the reasons for each refusal.

    Parameters
    ----------
    state : CustomerState
        The customer.
    catalogue : Catalogue
        The products.
    at : date-like
        The instant.

    Returns
    -------
    Eligibility
    """
    at_ns = instant(at, name="at")
    held, ages, segments = state_arrays(state, catalogue, at_ns)
    failures = rule_failures(catalogue, held=held, ages=ages, segment_codes=segments)
    return describe(catalogue, failures, held=held[0], age=float(ages[0]), segment=state.segment)


def eligible_products(state: CustomerState, catalogue: Catalogue, at: DateInput) -> list[str]:
    """The product codes one customer may be offered at an instant, in catalogue order.

    See :func:`check_eligibility` for the reasons behind the others.
    """
    return list(check_eligibility(state, catalogue, at).eligible)


def state_arrays(
    state: CustomerState, catalogue: Catalogue, at_ns: int
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """One customer's held row (1 x products), age and segment code at an instant."""
    held = snapshot_of_state(
        state, product_index=catalogue.index, n_products=len(catalogue), at_ns=at_ns
    ).held
    ages = ages_at(np.asarray([to_ns(state.birth_date)], dtype=np.int64), at_ns)
    segments = catalogue.segment_codes(np.asarray([state.segment], dtype=object))
    return held, ages, segments


def describe(
    catalogue: Catalogue,
    failures: Mapping[str, npt.NDArray[np.bool_]],
    *,
    held: npt.NDArray[np.bool_],
    age: float,
    segment: str | None,
) -> Eligibility:
    """Word the failures of one customer (row 0 of ``failures``)."""
    eligible: list[str] = []
    reasons: dict[str, tuple[str, ...]] = {}
    codes = catalogue.product_codes
    for j, code in enumerate(codes):
        words: list[str] = []
        for name in RULES:
            if not failures[name][0, j]:
                continue
            if name == "inactive":
                words.append("not active")
            elif name == "held":
                words.append("already held")
            elif name == "too_young":
                words.append(f"age {age:.0f} below minimum {catalogue.min_age[j]:.0f}")
            elif name == "too_old":
                words.append(f"age {age:.0f} above maximum {catalogue.max_age[j]:.0f}")
            elif name == "segment":
                allowed = "|".join(catalogue.segments[j] or ())
                who = "unknown" if segment is None else segment
                words.append(f"segment {who} not in {allowed}")
            elif name == "requires":
                missing = [c for c in catalogue.requires[j] if not held[catalogue.index[c]]]
                words.append(f"requires {', '.join(missing)}")
            else:
                holding = [c for c in catalogue.excludes[j] if held[catalogue.index[c]]]
                words.append(f"excluded by {', '.join(holding)} held")
        if words:
            reasons[code] = tuple(words)
        else:
            eligible.append(code)
    return Eligibility(eligible=tuple(eligible), reasons=reasons)
