"""The bank after its history, day by day: what the simulation serves and measures.

:class:`LiveBank` answers offers and adopts products daily from the shared hazard, beside
a counterfactual twin never offered anything; :class:`NpsRule` says how a customer scores
a contact. ``service.simulation`` drives both against the running service.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from models.synthetic.dates import (
    BoolArray,
    Float32Array,
    Int32Array,
    IntArray,
    _date,
    _day,
    _days,
)
from models.synthetic.generation import SyntheticBank
from models.synthetic.hazard import (
    _adoption_hazard,
    _compile,
    _declines,
    _holdings,
    _population,
    _resolve_exclusions,
)


@dataclass(frozen=True)
class NpsRule:
    """How a customer answers an NPS survey after a contact (0-10).

    Promoters answer 9-10, passives 7-8, detractors 0-6. A customer who accepted
    an offer is a promoter with ``promoter_accepted`` and a detractor with
    ``detractor_accepted``; one offered nothing (or who declined relevant
    offers) with ``promoter`` and ``detractor``. Irrelevant offers make
    detractors: the detractor chance grows by up to ``irrelevant_detractor`` as
    the best acceptance probability of the offers falls from ``relevant`` to 0.
    """

    promoter: float = 0.30
    detractor: float = 0.12
    promoter_accepted: float = 0.55
    detractor_accepted: float = 0.06
    irrelevant_detractor: float = 0.30
    relevant: float = 0.05

    def chances(self, *, offered: bool, accepted: bool, best: float) -> tuple[float, float]:
        """``(P(promoter), P(detractor))`` of one contact."""
        if accepted:
            return self.promoter_accepted, self.detractor_accepted
        if not offered:
            return self.promoter, self.detractor
        shortfall = 1.0 - min(1.0, max(best, 0.0) / self.relevant)
        return self.promoter, self.detractor + self.irrelevant_detractor * shortfall

    def draw(self, rng: np.random.Generator, *, offered: bool, accepted: bool, best: float) -> int:
        """One NPS answer."""
        promoter, detractor = self.chances(offered=offered, accepted=accepted, best=best)
        u = rng.random()
        if u < promoter:
            return int(rng.integers(9, 11))
        if u < promoter + detractor:
            return int(rng.integers(0, 7))
        return int(rng.integers(7, 9))


class LiveBank:
    """A synthetic bank going on day by day after its history, with offers.

    Customers adopt products by the truth's hazard, now drawn daily (the monthly
    hazard ``h`` becomes ``1 - (1 - h) ** (1 / days in the month)`` a day, from the
    holdings at the end of the previous day); offers are answered as
    :class:`OfferResponse` says, on the state at that moment. Products do not
    close and no customer joins while it runs (over weeks both are rare; it keeps
    the bank and a service fed from it trivially in step).

    Every customer has a counterfactual twin: the same customer with the same
    random draws, never offered anything. The twins' adoptions give the true
    effect of the offers (:meth:`adopted_within`), which an experiment with a
    control group should recover.

    Parameters
    ----------
    bank : SyntheticBank
        The history; the live bank starts the day after ``bank.end``.
    seed : int
        Seeds the daily draws and the answers to offers.
    """

    def __init__(self, bank: SyntheticBank, *, seed: int = 0) -> None:
        self.truth = bank.truth
        self._comp = _compile(bank.truth)
        customers = bank.customers.reset_index(drop=True)
        self.customer_ids = customers["customer_id"].astype(str).to_numpy(dtype=object)
        self._position = {cid: i for i, cid in enumerate(self.customer_ids)}
        persona_of = pd.Series(
            bank.personas["persona"].astype(str).to_numpy(),
            index=bank.personas["customer_id"].astype(str),
        )
        names = persona_of.reindex(self.customer_ids)
        if names.isna().any():
            raise ValueError(f"no persona for customer '{names.index[names.isna()][0]}'")
        self._pop = _population(
            self._comp, customers, names.map(self._comp.persona_index).to_numpy(dtype=np.int8)
        )
        self.day = bank.end
        end_day = _day(bank.end)
        self._since = _holdings(self._comp, customers["customer_id"], bank.adoptions, end_day)
        self._twin = self._since.copy()
        outcomes = bank.outcomes if bank.outcomes is not None else pd.DataFrame()
        self._declined = (
            _declines(self._comp, customers["customer_id"], outcomes, end_day)
            if not outcomes.empty
            else np.full_like(self._since, -1)
        )
        self._daily_rng = np.random.default_rng([seed, 0xDA1])
        self._answer_rng = np.random.default_rng([seed, 0xA45])
        self.adoptions: list[tuple[int, int, int, str]] = []
        """``(customer position, product index, day, source)`` since the start;
        source ``organic`` or ``offer``."""
        self.twin_adoptions: list[tuple[int, int, int]] = []

    # ----------------------------------------------------------------- lookups

    @property
    def product_codes(self) -> tuple[str, ...]:
        """Products in truth order."""
        return self._comp.codes

    def position(self, customer_id: str) -> int:
        """A customer's position (KeyError when unknown)."""
        return self._position[customer_id]

    def holds(self, customer_id: str, product_code: str) -> bool:
        """Whether the customer holds the product now."""
        return bool(self._since[self._comp.index[product_code], self._position[customer_id]] >= 0)

    def _today(self) -> int:
        return _day(self.day) + 1

    def _hazard_of(
        self, rows: IntArray, since: Int32Array, declined: Int32Array | None
    ) -> Float32Array:
        today = self._today()
        return _adoption_hazard(
            self._comp,
            self._pop.take(rows),
            since[:, rows],
            month_start=today,
            month_end=today,
            declined=None if declined is None else declined[:, rows],
        )

    # ----------------------------------------------------------------- offers

    def acceptance(self, customer_id: str, product_code: str) -> float:
        """The chance the customer accepts an offer of the product now (today)."""
        k = self._comp.index.get(product_code)
        if k is None:
            return 0.0
        row = np.array([self._position[customer_id]])
        hazard = self._hazard_of(row, self._since, self._declined)
        return float(self.truth.offer_response.acceptance(hazard[k, 0]))

    def answer(self, customer_id: str, product_code: str) -> tuple[str, float]:
        """The customer's answer to an offer made today, applied to the bank.

        Returns
        -------
        (str, float)
            ``accepted`` (the product is held from today), ``declined`` (its hazard is
            damped) or ``not_now``; and the acceptance probability it was drawn with.
        """
        chance = self.acceptance(customer_id, product_code)
        c, k = self._position[customer_id], self._comp.index.get(product_code, -1)
        today = self._today()
        response = self.truth.offer_response
        if k >= 0 and self._answer_rng.random() < chance:
            self._since[k, c] = today
            self.adoptions.append((c, k, today, "offer"))
            return "accepted", chance
        if self._answer_rng.random() < response.not_now_share:
            return "not_now", chance
        if k >= 0:
            self._declined[k, c] = today
        return "declined", chance

    def feedback(self, rule: NpsRule, *, offered: bool, accepted: bool, best: float) -> int:
        """An NPS answer (0-10) after a contact today, drawn by ``rule``."""
        return rule.draw(self._answer_rng, offered=offered, accepted=accepted, best=best)

    # ----------------------------------------------------------------- days

    def end_day(self) -> list[tuple[str, str]]:
        """Draw today's adoptions (after the day's offers), then move to the next day.

        Returns
        -------
        list of (str, str)
            ``(customer_id, product_code)`` of today's organic adoptions.
        """
        today = self._today()
        when = _date(today)
        days_in_month = calendar.monthrange(when.year, when.month)[1]
        rows = np.flatnonzero(self._pop.joined < today)
        draw = self._daily_rng.random((len(self._comp.codes), rows.size), dtype=np.float32)
        found = []
        for since, declined in ((self._since, self._declined), (self._twin, None)):
            hazard = self._hazard_of(rows, since, declined).astype(np.float64)
            daily = -np.expm1(np.log1p(-np.minimum(hazard, 1 - 1e-9)) / days_in_month)
            product, column = np.nonzero(draw < daily)
            customer = rows[column]
            day = np.full(customer.size, today, dtype=np.int64)
            keep = _resolve_exclusions(self._comp, customer, product, day)
            customer, product = customer[keep], product[keep]
            since[product, customer] = today
            found.append((customer, product))
        (customer, product), (twin_customer, twin_product) = found
        self.adoptions += [
            (int(c), int(k), today, "organic") for c, k in zip(customer, product, strict=True)
        ]
        self.twin_adoptions += [
            (int(c), int(k), today) for c, k in zip(twin_customer, twin_product, strict=True)
        ]
        self.day = when
        codes = self._comp.codes
        return [
            (str(self.customer_ids[c]), codes[k]) for c, k in zip(customer, product, strict=True)
        ]

    # ----------------------------------------------------------------- the truth

    def adopted_within(
        self,
        pairs: pd.DataFrame,
        *,
        window_days: int,
        until: date,
        counterfactual: bool = False,
    ) -> BoolArray:
        """Whether each pair's customer adopted its product in a window, live or as twin.

        Parameters
        ----------
        pairs : pandas.DataFrame
            ``customer_id, product_code, start`` (a date).
        window_days : int
            The window is ``[start, start + window_days)``, cut at ``until``.
        until : datetime.date
            Last day counted.
        counterfactual : bool
            Ask about the twins (never offered anything) instead.
        """
        if counterfactual:
            events = [(c, k, d) for c, k, d in self.twin_adoptions]
        else:
            events = [(c, k, d) for c, k, d, _ in self.adoptions]
        if pairs.empty:
            return np.zeros(0, dtype=bool)
        frame = pd.DataFrame(events, columns=["c", "k", "day"])
        c = pairs["customer_id"].astype(str).map(self._position).to_numpy(dtype=np.int64)
        k = pairs["product_code"].astype(str).map(self._comp.index).to_numpy(dtype=np.int64)
        start = _days(pairs["start"])
        last = np.minimum(start + window_days - 1, _day(until))
        query = pd.DataFrame({"row": np.arange(len(pairs)), "c": c, "k": k})
        hits = query.merge(frame, on=["c", "k"])
        inside = (hits["day"].to_numpy() >= start[hits["row"]]) & (
            hits["day"].to_numpy() <= last[hits["row"]]
        )
        out = np.zeros(len(pairs), dtype=bool)
        out[hits["row"].to_numpy()[inside]] = True
        return out
