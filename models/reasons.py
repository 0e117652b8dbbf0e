"""Profile reasons: how much more often customers like this one took a product up.

When no adoption rule worth saying applies to a customer (see
:meth:`models.rules.RuleSet.reasons_for`), an offer may still rest on a true comparison
that a teller can say out loud: "customers with similar age and income took a credit
card 3.1x as often as customers overall in the past year". :class:`ProfileRates`
measures such comparisons from the bank itself, once per snapshot:

- the profile columns of each product are the model's own: the columns a customer can
  be described by (age, time with the bank, segment, attributes), ranked by the gain
  they bring to the product's booster (:func:`profile_columns`), at most
  :data:`MAX_COLUMNS` of them; attributes that must never be argued from (gender,
  marital status and the like, :data:`UNSPOKEN`) are left out;
- each column is cut into bands: age in ten-year bands, time with the bank in four,
  a numeric attribute in quintiles (or its values, when it has few), a categorical one
  in its levels; a missing value is in no band and never gets a claim;
- for each product, over the :data:`WINDOW_DAYS` before the scoring day: the customers
  at risk (customers since before the window who did not hold the product at its
  start) and the adopters among them (took it up inside the window). The take-up rate
  of a group is adopters / at risk, and its ratio is that rate over the rate of all
  customers at risk;
- a group is one band of one column or of two columns at once, and counts only with at
  least :data:`MIN_CUSTOMERS` adopters (so that the rate is not a fluke of a few) and a
  ratio of at least :data:`MIN_RATIO` (below, the comparison is too weak to say).

A customer's claim for a product is the qualifying group they belong to with the
highest ratio. Every number said is computed from counts: the multiplier printed is the
group's ratio rounded down to one decimal (to a whole number from 10 on), never more.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.data import NAT_NS, NS_PER_DAY, BankData, CustomerState, DateInput, instant, to_ns
from models.eligibility import ages_at

__all__ = [
    "MAX_COLUMNS",
    "MIN_CUSTOMERS",
    "MIN_RATIO",
    "UNSPOKEN",
    "WINDOW_DAYS",
    "ProfileClaim",
    "ProfileColumn",
    "ProfileRates",
    "multiplier_text",
    "profile_columns",
    "profile_sentence",
]

WINDOW_DAYS: Final[int] = 365
"""Take-up is counted over this many days before the scoring day ("the past year")."""
MIN_CUSTOMERS: Final[int] = 30
"""Fewest adopters a group's rate rests on before it is said out loud."""
MIN_RATIO: Final[float] = 1.5
"""Weakest ratio said: below it "1.2x as often" is within the noise of a year's counts
and persuades no one, so nothing is said instead."""
MAX_COLUMNS: Final[int] = 3
"""Profile columns per product (the model's strongest), so pairs of them as well."""
QUANTILES: Final[int] = 5
"""Bands of a numeric attribute (with more distinct values than this)."""
MAX_LEVELS: Final[int] = 200
"""Levels of a categorical column kept (the most frequent); rarer ones are in no band."""
AGE_EDGES: Final[tuple[float, ...]] = (25.0, 35.0, 45.0, 55.0, 65.0)
TENURE_EDGES: Final[tuple[float, ...]] = (365.0, 3 * 365.0, 10 * 365.0)
UNSPOKEN: Final[frozenset[str]] = frozenset(
    {
        "gender",
        "sex",
        "race",
        "ethnicity",
        "ethnic_origin",
        "religion",
        "belief",
        "marital_status",
        "civil_status",
        "nationality",
        "citizenship",
        "disability",
        "health",
        "sexual_orientation",
        "pregnancy",
    }
)
"""Attributes (names compared lower case, spaces and dashes as underscores) never given
as a reason to a customer, whatever the model learnt from them."""

_Cells = tuple[tuple[int, ...], dict[tuple[int, ...], "ProfileClaim"]]
"""A group (positions of its columns among a product's) and its qualifying cells."""

_FIXED_NOUNS: Final[dict[str, str]] = {
    "age": "age",
    "tenure_days": "time with the bank",
    "segment": "segment",
}


@dataclass(frozen=True)
class ProfileColumn:
    """One model column cut into bands; band 0 is "unknown" and never claimed.

    Attributes
    ----------
    column : str
        The model's column: ``age``, ``tenure_days``, ``segment`` or ``attr_<name>``.
    noun : str
        What it is called aloud: "age", "time with the bank", "income".
    edges : tuple of float or None
        Numeric columns: band ``1 + i`` holds values in ``[edges[i-1], edges[i])``.
    levels : tuple of str
        Categorical columns (and numeric ones with few values, as text): band
        ``1 + i`` is ``levels[i]``.
    """

    column: str
    noun: str
    edges: tuple[float, ...] | None
    levels: tuple[str, ...] = ()
    _index: dict[str | None, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str | None, int] = {v: i + 1 for i, v in enumerate(self.levels)}
        object.__setattr__(self, "_index", index)

    def bands(self, values: npt.NDArray[Any]) -> npt.NDArray[np.int16]:
        """The band of each value (0 where missing or unknown)."""
        if self.edges is not None:
            numbers = _numbers(values)
            out = 1 + np.searchsorted(np.asarray(self.edges), numbers, side="right")
            return np.where(np.isnan(numbers), 0, out).astype(np.int16)
        texts = pd.Series(values, dtype=object)
        if not all(isinstance(v, str) for v in pd.unique(texts.dropna())):
            texts = texts.map(_text)
        codes = np.asarray(pd.Categorical(texts, categories=self.levels).codes, dtype=np.int16)
        return np.asarray(codes + 1, dtype=np.int16)

    def band(self, value: Any) -> int:
        """The band of one value: :meth:`bands` on Python scalars (decision time)."""
        if self.edges is not None:
            number = _number(value)
            return 0 if number != number else 1 + bisect.bisect_right(self.edges, number)
        return self._index.get(_text(value), 0)


@dataclass(frozen=True)
class ProfileClaim:
    """A true comparison about a group of customers and one product.

    Attributes
    ----------
    product_code : str
    nouns : tuple of str
        The group's columns as said ("age", "income").
    rate : float
        ``n_customers / n_at_risk``: the group's take-up over the window.
    overall : float
        The take-up of all customers at risk over the window.
    ratio : float
        ``rate / overall``.
    n_customers : int
        Adopters in the group.
    n_at_risk : int
        Customers at risk in the group.
    """

    product_code: str
    nouns: tuple[str, ...]
    rate: float
    overall: float
    ratio: float
    n_customers: int
    n_at_risk: int


@dataclass(frozen=True, eq=False)
class ProfileRates:
    """Take-up ratios of customer groups per product, measured from one bank.

    Build it with :meth:`measure`. Immutable; safe to share between threads.

    Attributes
    ----------
    columns : tuple of ProfileColumn
        Every column some product is described by.
    groups : dict of str to tuple
        Per product, its qualifying groups: (positions of the group's columns among
        the product's, {the group's bands: claim}).
    positions : dict of str to tuple of int
        Per product, the positions of its profile columns in :attr:`columns`.
    as_of : pandas.Timestamp
        The scoring day the bands (age, time with the bank) are taken at.
    """

    columns: tuple[ProfileColumn, ...]
    groups: dict[str, tuple[_Cells, ...]]
    positions: dict[str, tuple[int, ...]]
    as_of: pd.Timestamp
    _getters: dict[str, Callable[[Sequence[int]], tuple[int, ...]]] = field(init=False, repr=False)
    _as_of_ns: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_as_of_ns", to_ns(self.as_of))
        object.__setattr__(
            self, "_getters", {code: _getter(p) for code, p in self.positions.items()}
        )

    @classmethod
    def measure(
        cls,
        data: BankData,
        *,
        as_of: DateInput,
        columns: Mapping[str, Sequence[str]],
        window_days: int = WINDOW_DAYS,
        min_customers: int = MIN_CUSTOMERS,
        min_ratio: float = MIN_RATIO,
    ) -> ProfileRates:
        """Measure every product's group take-up in ``data`` over the window before
        ``as_of``.

        Parameters
        ----------
        data : BankData
            The bank (customers with their current attributes, adoptions).
        as_of : date-like
            The scoring day: the window is ``[as_of - window_days, as_of)``, and ages and
            time with the bank are taken on it.
        columns : mapping of str to sequence of str
            Per product, its profile columns, strongest first (see
            :func:`profile_columns`); products not in ``data`` are skipped.
        window_days, min_customers, min_ratio
            See :data:`WINDOW_DAYS`, :data:`MIN_CUSTOMERS`, :data:`MIN_RATIO`.

        Returns
        -------
        ProfileRates
        """
        if window_days < 1:
            raise ValueError(f"window_days must be positive, got {window_days}")
        as_of_ns = instant(as_of)
        start_ns = as_of_ns - window_days * NS_PER_DAY
        customers = data.customers
        used = list(dict.fromkeys(c for cols in columns.values() for c in cols))
        profile = tuple(
            _column(c, _batch_values(customers, c, as_of_ns), data.attribute_kinds)
            for c in used
            if _available(c, customers)
        )
        index = {c.column: i for i, c in enumerate(profile)}
        bands = (
            np.stack(
                [c.bands(_batch_values(customers, c.column, as_of_ns)) for c in profile], axis=1
            )
            if profile
            else np.zeros((len(customers), 0), dtype=np.int16)
        )
        at_risk, adopted = _take_up(data, start_ns, as_of_ns)
        groups: dict[str, tuple[_Cells, ...]] = {}
        positions: dict[str, tuple[int, ...]] = {}
        for code, wanted in columns.items():
            if code not in at_risk:
                continue
            chosen = tuple(index[c] for c in wanted if c in index)
            if not chosen:
                continue
            positions[code] = chosen
            groups[code] = _groups(
                code,
                [profile[i] for i in chosen],
                bands[:, list(chosen)],
                at_risk[code],
                adopted[code],
                min_customers,
                min_ratio,
            )
        return cls(profile, groups, positions, pd.Timestamp(as_of_ns))

    def bands(self, data: BankData) -> npt.NDArray[np.int16]:
        """Every customer's band on each of :attr:`columns` (customers x columns, in
        ``data.customers`` order)."""
        as_of_ns = to_ns(self.as_of)
        if not self.columns:
            return np.zeros((len(data.customers), 0), dtype=np.int16)
        return np.stack(
            [c.bands(_batch_values(data.customers, c.column, as_of_ns)) for c in self.columns],
            axis=1,
        )

    def bands_of(self, state: CustomerState) -> tuple[int, ...]:
        """One customer's bands, equal to their row of :meth:`bands`."""
        as_of_ns = self._as_of_ns
        return tuple(c.band(_state_value(state, c.column, as_of_ns)) for c in self.columns)

    def key(self, product_code: str, bands: Sequence[int]) -> tuple[int, ...] | None:
        """A customer's bands on ``product_code``'s columns (all a claim about the product
        depends on); None if the product has no profile columns."""
        getter = self._getters.get(product_code)
        return None if getter is None else getter(bands)

    def claim(self, product_code: str, key: tuple[int, ...]) -> ProfileClaim | None:
        """The best claim about ``product_code`` for customers with ``key`` (see
        :meth:`key`): the highest ratio among the qualifying groups they are in, then
        the most adopters."""
        best: ProfileClaim | None = None
        for group, cells in self.groups.get(product_code, ()):
            found = cells.get(tuple(key[i] for i in group))
            if found is not None and (
                best is None or (found.ratio, found.n_customers) > (best.ratio, best.n_customers)
            ):
                best = found
        return best


def profile_columns(
    importance: pd.DataFrame, attributes: Iterable[str] = (), *, limit: int = MAX_COLUMNS
) -> dict[str, tuple[str, ...]]:
    """Each product's profile columns the model relies on most.

    Parameters
    ----------
    importance : pandas.DataFrame
        ``product_code, feature, gain`` (:meth:`models.propensity.PropensityModel.
        feature_importance`).
    attributes : iterable of str
        The bank's attribute names; ``attr_<name>`` columns of others are skipped.
    limit : int
        Columns per product.

    Returns
    -------
    dict of str to tuple of str
        Per product with a booster, up to ``limit`` columns among ``age``,
        ``tenure_days``, ``segment`` and ``attr_<name>`` (not :data:`UNSPOKEN`), with
        positive gain, strongest first.
    """
    known = {f"attr_{a}" for a in attributes if _normal(a) not in UNSPOKEN}
    out: dict[str, tuple[str, ...]] = {}
    for code, group in importance.groupby("product_code", sort=False, observed=True):
        ranked = group.sort_values("gain", ascending=False, kind="stable")
        chosen = [
            str(f)
            for f, gain in zip(ranked["feature"], ranked["gain"], strict=True)
            if gain > 0 and (f in _FIXED_NOUNS or f in known)
        ]
        out[str(code)] = tuple(chosen[:limit])
    return out


def multiplier_text(ratio: float) -> str:
    """The ratio as said: rounded down to one decimal ("3.1x"), to a whole number from 10
    on ("12x"), so it never says more than the counts do."""
    if ratio >= 10:
        return f"{math.floor(round(ratio, 6))}\N{MULTIPLICATION SIGN}"
    return f"{math.floor(round(ratio * 10, 6)) / 10:.1f}\N{MULTIPLICATION SIGN}"


def profile_sentence(claim: ProfileClaim, product_name: str, ratio: float | None = None) -> str:
    """The claim as a sentence a teller can say, without a final full stop.

    For example "Customers with similar age and income took a credit card 3.1x as often
    as customers overall in the past year". ``product_name`` reads after "took";
    ``ratio`` (default the claim's) is the value the multiplier is printed from.
    """
    said = claim.ratio if ratio is None else ratio
    nouns = _join_and(claim.nouns)
    return (
        f"Customers with similar {nouns} took {product_name} {multiplier_text(said)} as "
        "often as customers overall in the past year"
    )


# --------------------------------------------------------------------------- helpers


def _normal(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _text(value: Any) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _available(column: str, customers: pd.DataFrame) -> bool:
    if column in ("age", "tenure_days"):
        return True
    name = column[5:] if column.startswith("attr_") else column
    return name in customers.columns


def _batch_values(customers: pd.DataFrame, column: str, as_of_ns: int) -> npt.NDArray[Any]:
    if column == "age":
        return ages_at(_ns(customers["birth_date"]), as_of_ns)
    if column == "tenure_days":
        return _tenure(_ns(customers["joined_at"]), as_of_ns)
    name = column[5:] if column.startswith("attr_") else column
    return np.asarray(customers[name].to_numpy())


def _state_value(state: CustomerState, column: str, as_of_ns: int) -> Any:
    if column == "age":
        return float(ages_at(np.asarray([to_ns(state.birth_date)], dtype=np.int64), as_of_ns)[0])
    if column == "tenure_days":
        joined = to_ns(state.joined_at)
        return (
            math.nan if joined == NAT_NS else float(as_of_ns // NS_PER_DAY - joined // NS_PER_DAY)
        )
    if column == "segment":
        return state.segment
    return state.attributes.get(column[5:])


def _number(value: Any) -> float:
    if value is None or value is pd.NA:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _tenure(joined_ns: npt.NDArray[np.int64], as_of_ns: int) -> npt.NDArray[np.float64]:
    known = joined_ns != NAT_NS
    days = as_of_ns // NS_PER_DAY - np.where(known, joined_ns, 0) // NS_PER_DAY
    return np.where(known, days.astype(np.float64), np.nan)


def _numbers(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    if values.dtype != object:
        return np.asarray(values, dtype=np.float64)
    return np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)


def _ns(values: pd.Series) -> npt.NDArray[np.int64]:
    return np.asarray(values.to_numpy(dtype="datetime64[ns]").astype(np.int64))


def _column(column: str, values: npt.NDArray[Any], kinds: Mapping[str, str]) -> ProfileColumn:
    if column == "age":
        return ProfileColumn(column, "age", AGE_EDGES)
    if column == "tenure_days":
        return ProfileColumn(column, "time with the bank", TENURE_EDGES)
    if column == "segment":
        return ProfileColumn(column, "segment", None, _levels(values))
    name = column[5:]
    noun = name.replace("_", " ")
    if kinds.get(name) != "numeric":
        return ProfileColumn(column, noun, None, _levels(values))
    numbers = _numbers(values)
    numbers = numbers[~np.isnan(numbers)]
    distinct = np.unique(numbers)
    if distinct.size <= QUANTILES:
        # A band per value seen (a value between two falls in the lower one's band).
        return ProfileColumn(column, noun, tuple(float(v) for v in distinct[1:]))
    cuts = np.quantile(numbers, np.arange(1, QUANTILES) / QUANTILES)
    return ProfileColumn(column, noun, tuple(float(c) for c in np.unique(cuts)))


def _levels(values: npt.NDArray[Any]) -> tuple[str, ...]:
    texts = pd.Series(values, dtype=object).dropna().map(_text)
    top = texts.value_counts().index[:MAX_LEVELS]
    return tuple(sorted(str(t) for t in top))


def _take_up(
    data: BankData, start_ns: int, as_of_ns: int
) -> tuple[dict[str, npt.NDArray[np.bool_]], dict[str, npt.NDArray[np.bool_]]]:
    """Per product: customers at risk over the window, and the adopters among them."""
    customers = data.customers
    n = len(customers)
    joined = _ns(customers["joined_at"])
    present = (joined == NAT_NS) | (joined < start_ns)
    row = pd.Index(customers["customer_id"].astype(str))
    frame = data.adoptions
    rows = row.get_indexer(frame["customer_id"].astype(str))
    adopted_ns = _ns(frame["adopted_at"])
    closed_ns = _ns(frame["closed_at"])
    open_at_start = (adopted_ns < start_ns) & ((closed_ns == NAT_NS) | (closed_ns >= start_ns))
    inside = (adopted_ns >= start_ns) & (adopted_ns < as_of_ns)
    codes = frame["product_code"].astype(str).to_numpy()
    at_risk: dict[str, npt.NDArray[np.bool_]] = {}
    adopted: dict[str, npt.NDArray[np.bool_]] = {}
    known = rows >= 0
    for code in data.product_codes:
        mine = known & (codes == code)
        held = np.zeros(n, dtype=bool)
        held[rows[mine & open_at_start]] = True
        took = np.zeros(n, dtype=bool)
        took[rows[mine & inside]] = True
        risk = present & ~held
        at_risk[code] = risk
        adopted[code] = risk & took
    return at_risk, adopted


def _groups(
    code: str,
    columns: Sequence[ProfileColumn],
    bands: npt.NDArray[np.int16],
    at_risk: npt.NDArray[np.bool_],
    adopted: npt.NDArray[np.bool_],
    min_customers: int,
    min_ratio: float,
) -> tuple[_Cells, ...]:
    """Per group of ``columns`` (positions among them), its qualifying cells."""
    total_risk = int(at_risk.sum())
    total_adopted = int(adopted.sum())
    if total_risk == 0 or total_adopted == 0:
        return ()
    overall = total_adopted / total_risk
    sizes = [_size(c) for c in columns]
    groups = [g for r in (1, 2) for g in itertools.combinations(range(len(columns)), r)]
    # Per group: its qualifying cells (bands on the group's columns) -> claim.
    found: list[_Cells] = []
    for group in groups:
        cell = np.zeros(len(bands), dtype=np.int64)
        for i in group:
            cell = cell * sizes[i] + bands[:, i]
        width = math.prod(sizes[i] for i in group)
        risk = np.bincount(cell[at_risk], minlength=width)
        hits = np.bincount(cell[adopted], minlength=width)
        cells: dict[tuple[int, ...], ProfileClaim] = {}
        for flat in np.flatnonzero(hits >= max(min_customers, 1)):
            where = _unflatten(int(flat), [sizes[i] for i in group])
            if 0 in where:
                continue  # an unknown value is no group
            rate = int(hits[flat]) / int(risk[flat])
            ratio = rate / overall
            if ratio < min_ratio:
                continue
            cells[where] = ProfileClaim(
                product_code=code,
                nouns=tuple(columns[i].noun for i in group),
                rate=rate,
                overall=overall,
                ratio=ratio,
                n_customers=int(hits[flat]),
                n_at_risk=int(risk[flat]),
            )
        if cells:
            found.append((group, cells))
    return tuple(found)


def _size(column: ProfileColumn) -> int:
    return 1 + (len(column.edges) + 1 if column.edges is not None else len(column.levels))


def _unflatten(flat: int, sizes: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(sizes):
        flat, rest = divmod(flat, size)
        out.append(rest)
    return tuple(reversed(out))


def _getter(positions: tuple[int, ...]) -> Callable[[Sequence[int]], tuple[int, ...]]:
    if len(positions) == 1:
        (only,) = positions
        return lambda bands: (bands[only],)
    return operator.itemgetter(*positions)


def _join_and(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} and {names[-1]}"
