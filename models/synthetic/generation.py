"""Generating a bank: its history simulated month by month, with or without offers.

:func:`generate_bank` draws customers (:mod:`models.synthetic.customers`), then each month
closes held products and draws adoptions from the shared hazard
(:mod:`models.synthetic.hazard`), vectorised over all customers; with an offer history it
also makes offers and draws the answers. The result is a :class:`SyntheticBank` of
import-format tables plus the truth they were drawn from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from numpy.typing import NDArray

from models.synthetic.customers import _draw_customers
from models.synthetic.dates import (
    _NEVER,
    BoolArray,
    Float32Array,
    Int32Array,
    IntArray,
    _day,
    _months,
)
from models.synthetic.hazard import (
    _adoption_hazard,
    _ages,
    _compile,
    _Compiled,
    _Population,
    _population,
    _resolve_exclusions,
)
from models.synthetic.truth import OfferResponse, TruthModel
from models.synthetic.world import default_truth

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class SyntheticBank:
    """A generated bank: import-format tables plus the truth they were drawn from.

    Attributes
    ----------
    products : pandas.DataFrame
        Columns :data:`models.data.PRODUCT_COLUMNS`.
    customers : pandas.DataFrame
        Columns :data:`CUSTOMER_COLUMNS`, ordered by ``customer_id`` (which is
        also joining order); dates are ``datetime64``.
    adoptions : pandas.DataFrame
        Columns :data:`models.data.ADOPTION_COLUMNS`, sorted by ``customer_id`` then
        ``adopted_at``; ``closed_at`` is ``NaT`` while the adoption is open.
    personas : pandas.DataFrame
        ``customer_id, persona``: the hidden truth, not a customer column.
    truth : TruthModel
        The hazard model the bank was drawn from.
    start, end : datetime.date
        First and last day of the simulated history.
    outcomes : pandas.DataFrame or None
        With an offer history: :data:`models.data.OUTCOME_COLUMNS`, the offers'
        answers (``accepted``, ``declined``, ``not_now``) by day, sorted by
        ``customer_id`` then ``occurred_at``; accepted offers are also adoptions.
    """

    products: pd.DataFrame
    customers: pd.DataFrame
    adoptions: pd.DataFrame
    personas: pd.DataFrame
    truth: TruthModel
    start: date
    end: date
    outcomes: pd.DataFrame | None = None


def generate_bank(
    n_customers: int,
    seed: int = 0,
    *,
    start: date = date(2019, 1, 1),
    end: date = date(2025, 12, 31),
    progress: ProgressFn | None = None,
    offers_per_month: float = 0.0,
    offer_targeting: float = 0.5,
    offer_response: OfferResponse | None = None,
) -> SyntheticBank:
    """Simulate a retail bank's customers adopting products over ``[start, end]``.

    Customers join on days spread over ``[start, end]`` (more early than
    late; ``customer_id`` follows joining order), get a segment from their
    age and income at joining, and open their first account (current,
    student or premium, as their persona prefers and eligibility allows) on
    the joining day. Then, month by month and
    vectorised over all customers, each held product may close and each
    eligible product may be adopted with the probability given by
    :func:`default_truth`'s hazard model (see :class:`TruthModel`).

    Two refinements keep eligibility exact at adoption time: a product whose
    required product closes during the month is not adopted that month, and
    when two products excluding each other are both drawn in one month, the
    later one is dropped.

    With ``offers_per_month`` the bank also has an offer history: each month a
    customer is offered one product they are eligible for with that
    probability (chosen with probability ``offer_targeting`` in proportion to
    their true hazards, else uniformly), on a day of the month, and answers as
    :class:`OfferResponse` says: an acceptance is an adoption that day, a
    decline damps the product's hazard for months. Offers draw from their own
    random stream, so without offers the bank is exactly the one drawn before
    offers existed.

    Parameters
    ----------
    n_customers : int
        Number of customers (at least 1).
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed and arguments
        give the same bank.
    start, end : datetime.date
        First and last day of the history.
    progress : callable, optional
        Called as ``progress(done, total)`` after each simulated month.
    offers_per_month : float
        Chance that a customer is offered a product in a month (0: no offers,
        no ``outcomes``).
    offer_targeting : float
        Share of the offers targeted by the true hazard, in [0, 1].
    offer_response : OfferResponse, optional
        How customers answer offers (default ``OfferResponse()``); part of the
        returned truth.

    Returns
    -------
    SyntheticBank
    """
    if n_customers < 1:
        raise ValueError("n_customers must be at least 1")
    if end <= start:
        raise ValueError("end must be after start")
    if not 0.0 <= offers_per_month <= 1.0 or not 0.0 <= offer_targeting <= 1.0:
        raise ValueError("offers_per_month and offer_targeting must be in [0, 1]")
    truth = default_truth()
    if offer_response is not None:
        truth = replace(truth, offer_response=offer_response)
    comp = _compile(truth)
    rng = np.random.default_rng(seed)
    customers, persona, first_product = _draw_customers(comp, rng, n_customers, start, end)
    pop = _population(comp, customers, persona)
    plan = None
    if offers_per_month > 0:
        plan = _OfferPlan(
            offers_per_month, offer_targeting, np.random.default_rng([seed, _OFFER_STREAM])
        )
    events, log = _simulate(comp, pop, first_product, rng, start, end, progress, plan)
    ids = pa.array(customers["customer_id"].to_numpy(dtype=object), pa.string())
    names = np.asarray(truth.persona_names, dtype=object)
    personas = pd.DataFrame(
        {"customer_id": customers["customer_id"], "persona": pd.Series(names[persona], dtype="str")}
    )
    return SyntheticBank(
        products=_products_frame(truth, end),
        customers=customers,
        adoptions=_adoptions_frame(comp, ids, events),
        personas=personas,
        truth=truth,
        start=start,
        end=end,
        outcomes=None if log is None else _outcomes_frame(comp, ids, log),
    )


_OFFER_STREAM = 0x0FFE  # second seed word of the offers' random stream


def _outcomes_frame(comp: _Compiled, ids: pa.Array, log: _OfferLog) -> pd.DataFrame:
    """The offer history as an import-format outcomes table."""

    def joined(parts: list[Any], dtype: Any) -> NDArray[Any]:
        return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)

    customer = joined(log.customer, np.int64)
    product = joined(log.product, np.int64)
    outcome = joined(log.outcome, np.int64)
    day = joined(log.day, np.int64)
    order = np.lexsort((product, day, customer))
    codes = pa.array(list(comp.codes), pa.string())
    values = pa.array(list(OUTCOME_VALUES), pa.string())
    return pd.DataFrame(
        {
            "customer_id": ids.take(pa.array(customer[order])).to_pandas(),
            "product_code": codes.take(pa.array(product[order])).to_pandas(),
            "outcome": values.take(pa.array(outcome[order])).to_pandas(),
            "occurred_at": day[order].astype("datetime64[D]").astype("datetime64[s]"),
        }
    )


@dataclass
class _Events:
    """Adoption and closure events in simulation order."""

    customer: list[Int32Array] = field(default_factory=list)
    product: list[NDArray[np.int8]] = field(default_factory=list)
    day: list[Int32Array] = field(default_factory=list)
    closed_customer: list[Int32Array] = field(default_factory=list)
    closed_product: list[NDArray[np.int8]] = field(default_factory=list)
    closed_day: list[Int32Array] = field(default_factory=list)

    def adopt(self, customer: IntArray, product: IntArray, day: IntArray) -> None:
        self.customer.append(customer.astype(np.int32))
        self.product.append(product.astype(np.int8))
        self.day.append(day.astype(np.int32))

    def close(self, customer: IntArray, product: IntArray, day: IntArray) -> None:
        self.closed_customer.append(customer.astype(np.int32))
        self.closed_product.append(product.astype(np.int8))
        self.closed_day.append(day.astype(np.int32))


@dataclass(frozen=True)
class _OfferPlan:
    """How the generator makes offers to its customers (an offer history)."""

    rate: float  # offers per customer-month
    targeting: float  # share of offers chosen by the true hazard, the rest uniformly
    rng: np.random.Generator


@dataclass
class _OfferLog:
    """Offers made and what the customers said, in simulation order."""

    customer: list[Int32Array] = field(default_factory=list)
    product: list[NDArray[np.int8]] = field(default_factory=list)
    outcome: list[NDArray[np.int8]] = field(default_factory=list)  # index in OUTCOME_VALUES
    day: list[Int32Array] = field(default_factory=list)


OUTCOME_VALUES = ("accepted", "declined", "not_now")
"""The answers a synthetic customer gives to an offer."""


def _simulate(
    comp: _Compiled,
    pop: _Population,
    first_product: IntArray,
    rng: np.random.Generator,
    start: date,
    end: date,
    progress: ProgressFn | None,
    offers: _OfferPlan | None = None,
) -> tuple[_Events, _OfferLog | None]:
    """Run the monthly simulation; customers are sorted by joining day."""
    n_products, n = pop.rate.shape
    since = np.full((n_products, n), -1, dtype=np.int32)
    declined = np.full((n_products, n), -1, dtype=np.int32) if offers is not None else None
    log = _OfferLog() if offers is not None else None
    events = _Events()
    end_day = _day(end)
    months = list(_months(start, end))
    active = 0
    for step, (month_start, month_last) in enumerate(months):
        month_end = min(month_last, end_day)
        days_in_month = month_last - month_start + 1
        joining = int(np.searchsorted(pop.joined, month_end, side="right"))
        if joining > active:
            new = np.arange(active, joining)
            since[first_product[new], new] = pop.joined[new]
            events.adopt(new, first_product[new], pop.joined[new])
            active = joining
        if active:
            month = _simulate_month(
                comp,
                pop.head(active),
                since[:, :active],
                rng,
                events,
                month_start,
                month_end,
                days_in_month,
                declined=None if declined is None else declined[:, :active],
            )
            if offers is not None and log is not None and declined is not None:
                _offer_month(
                    comp,
                    pop.head(active),
                    since[:, :active],
                    declined[:, :active],
                    month,
                    offers,
                    events,
                    log,
                    month_start,
                    month_end,
                    days_in_month,
                )
        if progress:
            progress(step + 1, len(months))
    return events, log


@dataclass(frozen=True, eq=False)
class _Month:
    """What one simulated month drew: its opening hazard (with offers) and its events."""

    hazard: Float32Array | None
    adopt_customer: IntArray
    adopt_product: IntArray
    close_customer: IntArray
    close_product: IntArray


def _offer_month(
    comp: _Compiled,
    pop: _Population,
    state: Int32Array,
    declined: Int32Array,
    month: _Month,
    plan: _OfferPlan,
    events: _Events,
    log: _OfferLog,
    month_start: int,
    month_end: int,
    days_in_month: int,
) -> None:
    """Make the month's offers, draw the answers and apply them to ``state`` in place.

    An offer is made on a day drawn uniformly from the customer's exposed days and
    judged on the month's opening hazard, like the month's organic adoptions. Offers
    that would clash with the month's organic events (the product itself adopted, an
    excluded product adopted, a required product closed) are not made, so eligibility
    holds at every adoption.
    """
    assert month.hazard is not None
    rng = plan.rng
    n_products, n = state.shape
    exposure_start = np.maximum(pop.joined + 1, month_start)
    exposed = np.maximum(month_end - exposure_start + 1, 0)
    chance = plan.rate * exposed / days_in_month
    customer = np.flatnonzero(rng.random(n) < chance)
    hazard = month.hazard[:, customer].astype(np.float64)
    eligible = hazard > 0
    counts = eligible.sum(axis=0)
    has = counts > 0
    customer, hazard, eligible, counts = (
        customer[has],
        hazard[:, has],
        eligible[:, has],
        counts[has],
    )
    if customer.size == 0:
        return
    weights = (1.0 - plan.targeting) * eligible / counts
    weights += plan.targeting * hazard / hazard.sum(axis=0)
    cumulative = np.cumsum(weights, axis=0)
    u = rng.random(customer.size) * cumulative[-1]
    product = np.minimum((u[None, :] >= cumulative).sum(axis=0), n_products - 1)
    product = np.where(eligible[product, np.arange(customer.size)], product, hazard.argmax(axis=0))
    lo = exposure_start[customer]
    day = lo + np.floor(rng.random(customer.size) * (month_end - lo + 1)).astype(np.int64)
    accept = comp.truth.offer_response.acceptance(hazard[product, np.arange(customer.size)])
    draw = rng.random(customer.size)
    not_now = rng.random(customer.size) < comp.truth.offer_response.not_now_share
    outcome = np.where(draw < accept, 0, np.where(not_now, 2, 1)).astype(np.int8)

    clash = _clashes(comp, month, customer, product, n_products)
    keep = ~clash
    customer, product, day, outcome = customer[keep], product[keep], day[keep], outcome[keep]
    taken = outcome == 0
    state[product[taken], customer[taken]] = day[taken]
    events.adopt(customer[taken], product[taken], day[taken])
    said_no = outcome == 1
    declined[product[said_no], customer[said_no]] = day[said_no]
    log.customer.append(customer.astype(np.int32))
    log.product.append(product.astype(np.int8))
    log.outcome.append(outcome)
    log.day.append(day.astype(np.int32))


def _clashes(
    comp: _Compiled, month: _Month, customer: IntArray, product: IntArray, n_products: int
) -> BoolArray:
    """Offers that clash with the month's organic adoptions and closures."""
    adopted = month.adopt_customer.astype(np.int64) * n_products + month.adopt_product
    closed = month.close_customer.astype(np.int64) * n_products + month.close_product
    key = customer.astype(np.int64) * n_products
    clash = np.isin(key + product, adopted)
    partners: dict[int, set[int]] = {}
    for p, excluded in comp.excludes:
        for q in excluded:
            partners.setdefault(p, set()).add(q)
            partners.setdefault(q, set()).add(p)
    for p, qs in partners.items():
        mine = np.flatnonzero(product == p)
        for q in qs:
            clash[mine] |= np.isin(key[mine] + q, adopted)
    for p, r in comp.requires:
        mine = np.flatnonzero(product == p)
        clash[mine] |= np.isin(key[mine] + r, closed)
    return clash


def _simulate_month(
    comp: _Compiled,
    pop: _Population,
    state: Int32Array,
    rng: np.random.Generator,
    events: _Events,
    month_start: int,
    month_end: int,
    days_in_month: int,
    *,
    declined: Int32Array | None = None,
) -> _Month:
    """Draw one month's closures and adoptions and apply them to ``state`` in place.

    One uniform per (product, customer) serves both: it is compared with
    the closing hazard where the product is held since before the month,
    and with the adoption hazard where it is not held. With ``declined``
    (an offer history), the month's opening hazard is returned too.
    """
    held = state >= 0
    closable = held & (state < month_start)
    del held
    draw = rng.random(state.shape, dtype=np.float32)
    window = (month_end - month_start + 1) / days_in_month
    close_threshold = (comp.close_rate * np.float32(window)).astype(np.float32)
    over_age: dict[int, Float32Array] = {}
    if comp.close_over_max_age:
        age = _ages(pop, month_start)
        for p, rate in comp.close_over_max_age:
            row = np.where(age > comp.max_age[p], rate, comp.close_rate[p]) * window
            over_age[p] = row.astype(np.float32)

    hazard = _adoption_hazard(
        comp, pop, state, month_start=month_start, month_end=month_end, declined=declined
    )
    opening = hazard.copy() if declined is not None else None
    # A product whose required product closes this month is not adopted this month.
    for p, r in comp.requires:
        closing = closable[r] & (draw[r] < over_age.get(r, close_threshold[r]))
        hazard[p] *= ~closing
    exposure_start = np.maximum(pop.joined + 1, month_start)
    exposed = np.maximum(month_end - exposure_start + 1, 0)
    partial = np.flatnonzero(exposed != days_in_month)
    if partial.size:
        hazard[:, partial] *= (exposed[partial] / days_in_month).astype(np.float32)
    np.copyto(hazard, close_threshold[:, None], where=closable)
    for p, threshold in over_age.items():
        np.copyto(hazard[p], threshold, where=closable[p])

    product, customer = np.divmod(np.flatnonzero(draw < hazard), state.shape[1])
    del draw, hazard
    closes = closable[product, customer]
    close_p, close_c = product[closes], customer[closes]
    adopt_p, adopt_c = product[~closes], customer[~closes]

    lo = exposure_start[adopt_c]
    adopt_day = lo + np.floor(rng.random(adopt_c.size) * (month_end - lo + 1)).astype(np.int64)
    keep = _resolve_exclusions(comp, adopt_c, adopt_p, adopt_day)
    adopt_c, adopt_p, adopt_day = adopt_c[keep], adopt_p[keep], adopt_day[keep]
    close_day = month_start + np.floor(
        rng.random(close_c.size) * (month_end - month_start + 1)
    ).astype(np.int64)

    state[close_p, close_c] = -1
    state[adopt_p, adopt_c] = adopt_day
    events.close(close_c, close_p, close_day)
    events.adopt(adopt_c, adopt_p, adopt_day)
    return _Month(opening, adopt_c, adopt_p, close_c, close_p)


def _adoptions_frame(comp: _Compiled, ids: pa.Array, events: _Events) -> pd.DataFrame:
    """Pair closures with adoptions and build the sorted adoptions table."""
    customer = np.concatenate(events.customer).astype(np.int64)
    product = np.concatenate(events.product).astype(np.int64)
    adopted = np.concatenate(events.day).astype(np.int64)
    closed = np.full(customer.size, _NEVER, dtype=np.int64)
    if events.closed_customer:
        c_customer = np.concatenate(events.closed_customer).astype(np.int64)
        c_product = np.concatenate(events.closed_product).astype(np.int64)
        c_day = np.concatenate(events.closed_day).astype(np.int64)
        # A closure belongs to the latest adoption of that (customer, product) before it.
        stride = np.int64(1 << 20)
        key = (customer * len(comp.codes) + product) * stride + adopted
        order = np.argsort(key, kind="stable")
        ckey = (c_customer * len(comp.codes) + c_product) * stride + c_day
        match = order[np.searchsorted(key[order], ckey, side="left") - 1]
        closed[match] = c_day
    order = np.lexsort((product, adopted, customer))
    codes = pa.array(list(comp.codes), pa.string())
    closed_sorted = closed[order]
    closed_dates = closed_sorted.astype("datetime64[D]").astype("datetime64[s]")
    closed_dates[closed_sorted == _NEVER] = np.datetime64("NaT")
    return pd.DataFrame(
        {
            "customer_id": ids.take(pa.array(customer[order])).to_pandas(),
            "product_code": codes.take(pa.array(product[order])).to_pandas(),
            "adopted_at": adopted[order].astype("datetime64[D]").astype("datetime64[s]"),
            "closed_at": closed_dates,
        }
    )


def _products_frame(truth: TruthModel, end: date) -> pd.DataFrame:
    rows = truth.products
    return pd.DataFrame(
        {
            "product_code": pd.Series([p.code for p in rows], dtype="str"),
            "name": pd.Series([p.name for p in rows], dtype="str"),
            "category": pd.Series([p.category for p in rows], dtype="str"),
            "value": np.array([p.value for p in rows], dtype=np.float64),
            "business_weight": np.array([p.business_weight for p in rows], dtype=np.float64),
            "active": np.array([p.withdrawn is None or p.withdrawn > end for p in rows]),
            "min_age": pd.array([p.min_age for p in rows], dtype="Int64"),
            "max_age": pd.array([p.max_age for p in rows], dtype="Int64"),
            "segments": pd.Series(["|".join(p.segments) for p in rows], dtype="str"),
            "requires": pd.Series(["|".join(p.requires) for p in rows], dtype="str"),
            "excludes": pd.Series(["|".join(p.excludes) for p in rows], dtype="str"),
        }
    )
