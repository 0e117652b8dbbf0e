"""The oracle: what the truth says a customer will do, for judging models and policies.

:func:`true_propensities` gives each customer's true probability of adopting each
product within a horizon from any day's state; :func:`offer_acceptance` the chance each
offer is accepted. Both evaluate the hazard the bank was drawn from
(:mod:`models.synthetic.hazard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from numpy.typing import NDArray

from models.synthetic.dates import (
    _NEVER,
    FloatArray,
    Int32Array,
    IntArray,
    _date,
    _day,
    _days,
    _months,
)
from models.synthetic.hazard import (
    _adoption_hazard,
    _compile,
    _Compiled,
    _declines,
    _eligible,
    _holdings,
    _Population,
    _population,
)
from models.synthetic.truth import TruthModel

CHUNK_CUSTOMERS = 1 << 17
"""Customers whose hazards :func:`true_propensities` works out at once: its month-by-month
matrices (products x customers, float64) are then a few tens of MB whatever the bank's
size, rather than hundreds of MB each at a million customers."""


def true_propensities(
    truth: TruthModel,
    customers: pd.DataFrame,
    adoptions: pd.DataFrame,
    personas: pd.DataFrame,
    *,
    as_of: date,
    horizon_days: int = 90,
    outcomes: pd.DataFrame | None = None,
    customer_ids: Literal["text", "categorical"] = "text",
) -> pd.DataFrame:
    """Each customer's true probability of adopting each product within a horizon.

    The state on ``as_of`` (customers joined by then, adoptions open on that
    day with their adoption dates, ages, personas, attributes) is run
    through the same monthly hazard the simulation drew from, for every
    calendar month overlapping ``(as_of, as_of + horizon_days]``, each month
    weighted by the fraction of its days inside the horizon.

    Approximation: holdings are frozen at ``as_of`` over the horizon; the
    oracle ignores that an adoption or closure inside the horizon changes
    later months' hazards (e.g. a car loan taken in month 1 raising car
    insurance in month 2, or a closed card taken again), so it slightly
    underestimates products that follow others closely. It also uses the
    ``as_of`` holdings for the month containing ``as_of``, where the
    simulation used that month's opening holdings. Ages, months since
    adoption and tenure do advance month by month.

    Parameters
    ----------
    truth : TruthModel
        The bank's hazard model.
    customers, adoptions : pandas.DataFrame
        In the import format, as in memory or as read back from the files
        (dates may be text).
    personas : pandas.DataFrame
        ``customer_id, persona`` for every customer.
    as_of : datetime.date
        The day the state is taken (its end).
    horizon_days : int
        Length of the horizon after ``as_of``.
    outcomes : pandas.DataFrame, optional
        The bank's offer outcomes (:attr:`SyntheticBank.outcomes`): declines on or
        before ``as_of`` damp their products' hazards as in the simulation.
    customer_ids : {"text", "categorical"}
        ``customer_id`` of the result as text, or categorical over the customers
        (a code a row: at a million customers the text is a few hundred MB).

    Returns
    -------
    pandas.DataFrame
        ``customer_id, product_code, probability`` for every product a
        customer joined by ``as_of`` does not hold and is eligible for on
        ``as_of``; ordered by customer as in ``customers``, then catalogue
        order. ``product_code`` is categorical over the catalogue (12 million
        rows for a million customers, so the codes are not repeated as text).
    """
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    if customer_ids not in ("text", "categorical"):
        raise ValueError(f"customer_ids is 'text' or 'categorical', not {customer_ids!r}")
    comp = _compile(truth)
    as_of_day = _day(as_of)
    joined = _days(customers["joined_at"])
    present = customers.loc[joined <= as_of_day].reset_index(drop=True)
    persona_of = pd.Series(
        personas["persona"].astype(str).to_numpy(), index=personas["customer_id"].astype(str)
    )
    names = persona_of.reindex(present["customer_id"].astype(str).to_numpy())
    if names.isna().any():
        missing = names.index[names.isna()][0]
        raise ValueError(f"no persona for customer '{missing}'")
    unknown = set(names.unique()) - set(comp.persona_index)
    if unknown:
        raise ValueError(f"personas not in the truth model: {sorted(unknown)}")
    persona = names.map(comp.persona_index).to_numpy(dtype=np.int8)
    pop = _population(comp, present, persona)
    since = _holdings(comp, present["customer_id"], adoptions, as_of_day)
    declined = None
    if outcomes is not None:
        declined = _declines(comp, present["customer_id"], outcomes, as_of_day)

    months = list(_months(_date(as_of_day + 1), _date(as_of_day + horizon_days)))
    parts = [
        _chunk_propensities(
            comp,
            pop.window(start, stop),
            since[:, start:stop],
            None if declined is None else declined[:, start:stop],
            months,
            as_of_day=as_of_day,
            horizon_days=horizon_days,
            offset=start,
        )
        for start, stop in _chunks(len(present), CHUNK_CUSTOMERS)
    ]
    del since, declined
    rows = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int32)
    cols = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int16)
    probability = np.concatenate([p[2] for p in parts]) if parts else np.empty(0)
    del parts
    ids = present["customer_id"].astype(str)
    customer: pd.Series | pd.Categorical
    if customer_ids == "categorical":
        customer = pd.Categorical.from_codes(rows, categories=pd.Index(ids, dtype="str"))
    else:
        customer = pa.array(ids, pa.string()).take(pa.array(rows)).to_pandas()
    return pd.DataFrame(
        {
            "customer_id": customer,
            "product_code": pd.Categorical.from_codes(
                cols, categories=pd.Index(comp.codes, dtype="str")
            ),
            "probability": probability,
        },
        copy=False,
    )


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _chunk_propensities(
    comp: _Compiled,
    pop: _Population,
    since: Int32Array,
    declined: Int32Array | None,
    months: list[tuple[int, int]],
    *,
    as_of_day: int,
    horizon_days: int,
    offset: int,
) -> tuple[Int32Array, NDArray[np.int16], FloatArray]:
    """:func:`true_propensities` of some customers: each eligible pair's customer
    (``offset`` plus its position among them), product and probability, customer by
    customer in catalogue order."""
    eligible = _eligible(comp, pop, since >= 0, day_from=as_of_day, day_to=as_of_day)
    survival = np.ones(since.shape, dtype=np.float64)
    first, last = as_of_day + 1, as_of_day + horizon_days
    for month_start, month_end in months:
        hazard = _adoption_hazard(
            comp, pop, since, month_start=month_start, month_end=month_end, declined=declined
        )
        lo = np.maximum(np.maximum(pop.joined + 1, month_start), first)
        exposed = np.maximum(min(month_end, last) - lo + 1, 0)
        fraction = exposed / (month_end - month_start + 1)
        escape = hazard.astype(np.float64)
        del hazard
        escape *= fraction
        np.subtract(1.0, escape, out=escape)
        survival *= escape
        del escape
    # Customer-major order: transpose, then flat indices of the (customers, products) view.
    rows, cols = np.divmod(np.flatnonzero(eligible.T), eligible.shape[0])
    probability = 1.0 - survival[cols, rows]
    # Narrow: the bank's rows (fewer than 2**31 customers, 2**15 products) are held whole.
    return (rows + offset).astype(np.int32), cols.astype(np.int16), probability


def offer_acceptance(
    truth: TruthModel,
    customers: pd.DataFrame,
    adoptions: pd.DataFrame,
    personas: pd.DataFrame,
    offers: pd.DataFrame,
    *,
    outcomes: pd.DataFrame | None = None,
) -> FloatArray:
    """The probability that each customer accepts the offer made to them.

    Parameters
    ----------
    truth : TruthModel
        The bank's hazard model; its :attr:`TruthModel.offer_response` says how
        customers answer offers.
    customers, adoptions, personas : pandas.DataFrame
        The bank, as for :func:`true_propensities`.
    offers : pandas.DataFrame
        ``customer_id, product_code, offered_at``: one offer a row.
    outcomes : pandas.DataFrame, optional
        Earlier offer outcomes; declines before an offer's day damp the hazard.

    Returns
    -------
    numpy.ndarray
        float64, one probability per row of ``offers``:
        :meth:`OfferResponse.acceptance` of the customer's monthly hazard of
        the product on the offer's day, from their holdings at the start of
        that day (0 for a product held, not eligible or unknown).

    Notes
    -----
    :func:`generate_bank` judges the offers of its history on the state at the
    start of the offer's month, as it does the month's adoptions; this function
    (and :class:`LiveBank`) on the offer's day.
    """
    comp = _compile(truth)
    out = np.zeros(len(offers), dtype=np.float64)
    if offers.empty:
        return out
    ids = customers["customer_id"].astype(str)
    persona_of = pd.Series(
        personas["persona"].astype(str).to_numpy(), index=personas["customer_id"].astype(str)
    )
    names = persona_of.reindex(ids.to_numpy())
    if names.isna().any():
        raise ValueError(f"no persona for customer '{names.index[names.isna()][0]}'")
    pop = _population(
        comp,
        customers.reset_index(drop=True),
        names.map(comp.persona_index).to_numpy(dtype=np.int8),
    )
    position = pd.Index(ids)
    events = _Timeline.of(comp, position, adoptions, outcomes)
    offered = _days(offers["offered_at"])
    columns = pd.Index(list(comp.codes)).get_indexer(offers["product_code"].astype(str))
    rows = position.get_indexer(offers["customer_id"].astype(str))
    known = (columns >= 0) & (rows >= 0)
    for day in np.unique(offered[known]):
        mine = np.flatnonzero(known & (offered == day))
        who = np.unique(rows[mine])
        # The state at the start of the offer's day: events of the days before.
        since, declined = events.state(who, int(day) - 1)
        hazard = _adoption_hazard(
            comp,
            pop.take(who),
            since,
            month_start=int(day),
            month_end=int(day),
            declined=declined,
        )
        out[mine] = truth.offer_response.acceptance(
            hazard[columns[mine], np.searchsorted(who, rows[mine])]
        )
    return out


@dataclass(frozen=True, eq=False)
class _Timeline:
    """Adoptions and declines as arrays, to read any customers' state on any day."""

    customer: IntArray
    product: IntArray
    adopted: IntArray
    closed: IntArray
    declined_customer: IntArray
    declined_product: IntArray
    declined_day: IntArray
    n_products: int

    @classmethod
    def of(
        cls,
        comp: _Compiled,
        position: pd.Index,
        adoptions: pd.DataFrame,
        outcomes: pd.DataFrame | None,
    ) -> _Timeline:
        codes = pd.Index(list(comp.codes))
        customer = position.get_indexer(adoptions["customer_id"].astype(str))
        product = codes.get_indexer(adoptions["product_code"].astype(str))
        adopted = _days(adoptions["adopted_at"])
        closed = (
            _days(adoptions["closed_at"])
            if "closed_at" in adoptions
            else np.full_like(adopted, _NEVER)
        )
        keep = (customer >= 0) & (product >= 0)
        empty = np.empty(0, dtype=np.int64)
        d_customer, d_product, d_day = empty, empty, empty
        if outcomes is not None and not outcomes.empty:
            d_customer = position.get_indexer(outcomes["customer_id"].astype(str))
            d_product = codes.get_indexer(outcomes["product_code"].astype(str))
            d_day = _days(outcomes["occurred_at"])
            said_no = (
                (outcomes["outcome"].astype(str).to_numpy() == "declined")
                & (d_customer >= 0)
                & (d_product >= 0)
            )
            d_customer, d_product, d_day = d_customer[said_no], d_product[said_no], d_day[said_no]
        return cls(
            customer[keep].astype(np.int64),
            product[keep].astype(np.int64),
            adopted[keep],
            closed[keep],
            d_customer.astype(np.int64),
            d_product.astype(np.int64),
            d_day.astype(np.int64),
            len(comp.codes),
        )

    def state(self, who: IntArray, day: int) -> tuple[Int32Array, Int32Array]:
        """Holdings (adoption day, -1) and latest declines (day, -1) of the customers at
        positions ``who`` (sorted) at the end of ``day``."""
        since = np.full((self.n_products, who.size), -1, dtype=np.int32)
        declined = np.full((self.n_products, who.size), -1, dtype=np.int32)
        open_ = np.isin(self.customer, who) & (self.adopted <= day) & (self.closed > day)
        columns = np.searchsorted(who, self.customer[open_])
        since[self.product[open_], columns] = self.adopted[open_]
        said_no = np.isin(self.declined_customer, who) & (self.declined_day <= day)
        np.maximum.at(
            declined,
            (self.declined_product[said_no], np.searchsorted(who, self.declined_customer[said_no])),
            self.declined_day[said_no].astype(np.int32),
        )
        return since, declined
