"""Pure decision logic: contact policy, arbitration and the control group.

Nothing here touches the database, HTTP or the clock: the caller passes the customer's
propensities, the live catalogue, the contact history and "now", and gets back the
offers and why every other product was left out. That keeps every policy testable on
its own, and the decision path free of hidden I/O.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Policy:
    """The contact policy, from :class:`service.settings.Settings`."""

    min_propensity: float = 0.01
    decline_cooldown_days: int = 30
    frequency_cap: int = 3
    frequency_window_days: int = 30
    max_offers_per_contact: int = 5
    detractor_suppress_days: int = 30


HISTORY_TRIM = 64
"""Offers a history holds before old ones are first trimmed."""


class ContactRecord(Protocol):
    """What the contact policy reads of one customer's history: a
    :class:`ContactHistory`, or the packed record a
    :class:`~service.decision.contacts.ContactBook` gives."""

    @property
    def detractor_at(self) -> dt.datetime | None:
        """When the customer last answered an offer as a detractor, if ever."""

    def blocked(self, now: dt.datetime, policy: Policy) -> dict[str, str]:
        """Product code -> why the policy holds it back at ``now``: ``declined_recently``
        (declined within ``decline_cooldown_days``) before ``frequency_cap`` (offered
        ``frequency_cap`` times or more within ``frequency_window_days``). Products not
        named are free; the detractor rule is the caller's (see :attr:`detractor_at`).
        """


@dataclass(slots=True)
class ContactHistory:
    """One customer's recent offers, declines and detractor answers (kept in memory).

    ``offers`` maps offer id to when it was offered (POSIX seconds), so that applying
    the same event twice changes nothing; ``times`` holds, per product, when it was
    offered (sorted POSIX seconds, packed as doubles in a ``bytearray``): the
    frequency cap counts by bisection.

    Every value held is atomic (floats, datetimes, bytearrays), never a tuple, list
    or array. A worker holds a history for every customer offered anything lately,
    and the garbage collector scans every container it tracks: a dict that gains a
    tuple is tracked again and a new list is one more object to scan, which under
    load made each young-generation collection a pause of tens of milliseconds.
    Dicts of atomic values and bytearrays are not tracked at all.

    A serving worker holds every customer's history packed in a
    :class:`~service.decision.contacts.ContactBook` (a sixth of the memory); this
    plain form is the reference the book is tested against.
    """

    offers: dict[str, float] = field(default_factory=dict)
    declines: dict[str, dt.datetime] = field(default_factory=dict)
    detractor_at: dt.datetime | None = None
    times: dict[str, bytearray] = field(default_factory=dict)
    trim_at: int = HISTORY_TRIM
    """Offers held past which the next trim is due (see :meth:`forget_before`)."""

    def add_offer(self, offer_id: str, product_code: str, at: dt.datetime) -> None:
        self.add_offer_at(offer_id, product_code, at.timestamp())

    def add_offer_at(self, offer_id: str, product_code: str, stamp: float) -> None:
        """:meth:`add_offer` with the time as POSIX seconds."""
        if offer_id in self.offers:
            return
        self.offers[offer_id] = stamp
        times = self.times.get(product_code)
        if times is None:
            self.times[product_code] = bytearray(_DOUBLE.pack(stamp))
        elif stamp >= _DOUBLE.unpack_from(times, len(times) - 8)[0]:
            times += _DOUBLE.pack(stamp)  # the usual case: offers arrive in time order
        else:
            with memoryview(times) as view, view.cast("d") as doubles:
                at_index = bisect.bisect_right(doubles, stamp)
            times[at_index * 8 : at_index * 8] = _DOUBLE.pack(stamp)

    def add_offers(self, product_code: str, offers: Sequence[tuple[float, str]]) -> None:
        """Add many offers of one product at once: ``(POSIX seconds, offer id)`` pairs,
        in time order (reading the history at start-up: a million offers)."""
        fresh = [(stamp, key) for stamp, key in offers if key not in self.offers]
        if not fresh:
            return
        self.offers.update((key, stamp) for stamp, key in fresh)
        stamps = [stamp for stamp, _ in fresh]
        times = self.times.get(product_code)
        if times:
            stamps = sorted([*memoryview(times).cast("d").tolist(), *stamps])
        self.times[product_code] = bytearray(struct.pack(f"{len(stamps)}d", *stamps))
        # Read from the database, they are all inside the windows: no trim before the
        # history has doubled (else each customer's first new offer would scan them).
        self.trim_at = max(self.trim_at, 2 * len(self.offers))

    def add_decline(self, product_code: str, at: dt.datetime) -> None:
        previous = self.declines.get(product_code)
        if previous is None or at > previous:
            self.declines[product_code] = at

    def add_detractor(self, at: dt.datetime) -> None:
        if self.detractor_at is None or at > self.detractor_at:
            self.detractor_at = at

    def offers_since(self, product_code: str, since: dt.datetime) -> int:
        times = self.times.get(product_code)
        return 0 if not times else len(times) // 8 - _count_before(times, since.timestamp())

    def capped(self, product_code: str, since: dt.datetime, cap: int) -> bool:
        """Whether ``product_code`` was offered ``cap`` times or more since ``since``."""
        times = self.times.get(product_code)
        if times is None or len(times) < cap * 8:
            return False  # too few offers ever to reach the cap: no need to count
        return self.offers_since(product_code, since) >= cap

    def blocked(self, now: dt.datetime, policy: Policy) -> dict[str, str]:
        """See :meth:`ContactRecord.blocked`."""
        blocked: dict[str, str] = {}
        if self.times:
            window_since = now - dt.timedelta(days=policy.frequency_window_days)
            for code in self.times:
                if self.capped(code, window_since, policy.frequency_cap):
                    blocked[code] = "frequency_cap"
        if self.declines:
            decline_since = now - dt.timedelta(days=policy.decline_cooldown_days)
            for code, declined in self.declines.items():
                if declined >= decline_since:
                    blocked[code] = "declined_recently"
        return blocked

    def forget_before(self, cutoff: dt.datetime) -> None:
        """Drop offers older than any window can look at (bounds memory), and put the
        next trim off until the offers held have doubled: a customer asked about often
        keeps many offers inside the window, and trimming at every new offer scanned
        them all each time to drop none."""
        limit = cutoff.timestamp()
        stale = [key for key, at in self.offers.items() if at < limit]
        for key in stale:
            del self.offers[key]
        for code, times in list(self.times.items()):
            del times[: _count_before(times, limit) * 8]
            if not times:
                del self.times[code]
        self.trim_at = max(HISTORY_TRIM, 2 * len(self.offers))


_DOUBLE = struct.Struct("d")


def _count_before(times: bytearray, stamp: float) -> int:
    """How many of the sorted packed doubles ``times`` are below ``stamp``."""
    with memoryview(times) as view, view.cast("d") as doubles:
        return bisect.bisect_left(doubles, stamp)


class Choice(NamedTuple):
    """One offer chosen for a contact (a named tuple: one is made per offer, and a
    frozen dataclass costs several times as much to build)."""

    product_index: int
    product_code: str
    propensity: float
    expected_value: float
    score: float


class Ranking(NamedTuple):
    """The outcome of arbitration: what to offer, and why the rest was not offered."""

    offers: tuple[Choice, ...]
    suppressed: Mapping[str, str]
    """Product code -> reason (``held_or_ineligible``, ``inactive``, ``low_propensity``,
    ``declined_recently``, ``frequency_cap``, ``detractor``)."""
    detractor_until: dt.datetime | None = None


def in_control_group(customer_id: str, *, share: float, salt: str) -> bool:
    """Whether a customer is in the control group: deterministic, uniform, salted.

    The first 8 bytes of sha256(salt:customer_id) as a fraction of 2**64 are compared
    with ``share``, so the same customer is always in the same group and the group is
    ``share`` of customers whatever their ids look like.
    """
    if share <= 0.0:
        return False
    digest = hashlib.sha256(f"{salt}:{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


@dataclass(frozen=True, slots=True)
class Arbiter:
    """Arbitration and the contact policy over one catalogue, prepared once.

    A worker makes one per snapshot (the catalogue changes only with a new snapshot),
    so a decision does not convert the catalogue's arrays again: with twenty-odd
    products, plain Python over tuples costs less than numpy's per-call overhead.
    Build it with :meth:`for_catalogue`.
    """

    product_codes: tuple[str, ...]
    values: tuple[float, ...]
    weights: tuple[float, ...]
    active: tuple[bool, ...]
    policy: Policy

    @classmethod
    def for_catalogue(
        cls,
        *,
        product_codes: Sequence[str],
        values: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        active: npt.NDArray[np.bool_],
        policy: Policy,
    ) -> Arbiter:
        """``values``, ``weights`` and ``active`` aligned with ``product_codes``."""
        return cls(
            tuple(product_codes),
            tuple(float(v) for v in values),
            tuple(float(w) for w in weights),
            tuple(bool(a) for a in active),
            policy,
        )

    def rank(
        self,
        propensity: npt.NDArray[np.floating[Any]],
        *,
        history: ContactRecord | None,
        now: dt.datetime,
        limit: int,
        explain: bool = True,
    ) -> Ranking:
        """Choose up to ``limit`` offers for one customer.

        Parameters
        ----------
        propensity : numpy.ndarray
            Per product (in ``product_codes`` order); NaN where the product is not a
            candidate (held, or not eligible by age, segment, required/excluded
            products).
        history : ContactRecord or None
            The customer's contact history (None: none recorded).
        now : datetime.datetime
            The decision instant (timezone-aware).
        limit : int
            Offers asked for; capped by ``policy.max_offers_per_contact``.
        explain : bool
            Give the reason of every product not offered in ``Ranking.suppressed``;
            when False only the products passed over while choosing are named
            (cheaper).

        Returns
        -------
        Ranking
            Offers by score = propensity x value x business weight, highest first
            (ties by product code); an empty tuple is a valid answer.
        """
        policy = self.policy
        codes = self.product_codes
        suppressed: dict[str, str] = {}
        detractor_at = None if history is None else history.detractor_at
        if detractor_at is not None:
            until = detractor_at + dt.timedelta(days=policy.detractor_suppress_days)
            if now < until:
                return Ranking((), {code: "detractor" for code in codes}, until)
        limit = min(limit, policy.max_offers_per_contact)
        floor = policy.min_propensity
        value = self.values
        weight = self.weights
        live = self.active
        p = propensity.tolist()
        # NaN (held or ineligible) fails the floor test; score = (p x value) x weight.
        candidates = sorted(  # highest score first, ties by product code
            [
                (-(pk * value[k] * weight[k]), codes[k], k)
                for k, pk in enumerate(p)
                if pk >= floor and live[k]
            ]
        )
        chosen: list[Choice] = []
        if candidates:
            # What the history holds back, read once (a packed record is decoded once
            # per decision, not once per candidate).
            blocked = None if history is None else history.blocked(now, policy)
            for negative_score, code, k in candidates:
                if blocked:
                    reason = blocked.get(code)
                    if reason is not None:
                        suppressed[code] = reason
                        continue
                if len(chosen) < limit:
                    chosen.append(Choice(k, code, p[k], p[k] * value[k], -negative_score))
                elif not explain:
                    break
        if explain:
            for k, code in enumerate(codes):
                pk = p[k]
                if pk != pk:  # NaN: held or not eligible
                    suppressed[code] = "held_or_ineligible"
                elif not live[k]:
                    suppressed[code] = "inactive"
                elif pk < floor:
                    suppressed[code] = "low_propensity"
        return Ranking(tuple(chosen), suppressed)


def popular_products(
    counts: Mapping[str, int], *, exclude: frozenset[str], limit: int
) -> list[str]:
    """The most adopted products not in ``exclude``, most first (ties by code)."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [code for code, _ in ranked if code not in exclude][:limit]
