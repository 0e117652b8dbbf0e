"""What each worker holds in memory so a decision needs no database read.

At start-up (and whenever a model version is activated or the catalogue changes) a
worker loads the active model and maps the serving store of the machine
(:mod:`service.decision.store`): every customer's propensities and state in columns,
built once (the bank read and every customer scored in one batch) by the first worker
that needs it and memory-mapped by all. A :class:`Snapshot` is immutable once built and
replaced whole (load fully, then swap), so a request that started on the old one
finishes on it; customers changed since the store was built live in the snapshot's
small overlay (:class:`Customers`).

Changes to one customer (an adoption, an attribute, an outcome, an offer) are applied
at once by the worker that made them and, through the ``change_events`` log polled every
``poll_interval_seconds``, by every other worker: the customer is re-read and re-scored.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import gc
import logging
import math
import threading
import time
import uuid
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
from sqlalchemy import Connection, Engine, bindparam, text

from models.data import Adoption, BankData, CustomerState, OfferOutcome, to_ns
from models.eligibility import Catalogue
from models.propensity import PropensityModel
from models.reasons import ProfileRates, profile_sentence
from models.rules import Rule
from service import child, metrics
from service.data import registry
from service.data import rows as bank_rows
from service.data.bank import default_as_of, load_bank
from service.data.db import read_only, unit_of_work
from service.data.events import record_event
from service.data.rows import RowAudit
from service.decision import store as columns
from service.decision import window
from service.decision.contacts import SWEEP_SLICE, ContactBook
from service.decision.policy import Arbiter, Policy
from service.decision.sharing import pace, sharing_the_interpreter
from service.settings import Settings

log = logging.getLogger("nbo.serving")


class CustomerEntry:
    """One customer as a worker holds it: an overlay entry (read from the database), or
    a view of a row of the serving store, made on each look-up.

    Attributes
    ----------
    db_id : int
    propensity : numpy.ndarray
        Per catalogue product; NaN where not a candidate. A store row is float32 (a
        read-only view of the mapped file); a re-read customer's, float64.
    as_of : date-like or None
        The day the customer was scored as of, when later than the snapshot's.
    sequence : tuple of str or None
        Products in order of first adoption before the scoring day (made on first use).
    control : bool or None
        Whether the customer is in the control group (worked out on first use).
    pitches : dict or None
        The snapshot's pitches for the customer's adoption sequence (found on first use).
    bands : tuple of int or None
        The customer's profile bands (:meth:`models.reasons.ProfileRates.bands_of`), all a
        profile reason depends on; made at load, or on first use.
    """

    __slots__ = (
        "_row",
        "_state",
        "_store",
        "as_of",
        "bands",
        "control",
        "db_id",
        "pitches",
        "propensity",
        "sequence",
    )

    def __init__(
        self,
        db_id: int,
        state: CustomerState | None,
        propensity: columns.FloatArray,
        as_of: dt.date | pd.Timestamp | None = None,
        sequence: tuple[str, ...] | None = None,
        control: bool | None = None,
        pitches: dict[str, Pitch] | None = None,
        bands: tuple[int, ...] | None = None,
        *,
        store: columns.ColumnStore | None = None,
        row: int = -1,
    ) -> None:
        if state is None and store is None:
            raise ValueError("a customer entry needs a state or a store row")
        self.db_id = db_id
        self._state = state
        self.propensity = propensity
        self.as_of = as_of
        self.sequence = sequence
        self.control = control
        self.pitches = pitches
        self.bands = bands
        self._store = store
        self._row = row

    @property
    def state(self) -> CustomerState:
        """The customer's :class:`~models.data.CustomerState` (rebuilt from the store on
        first use: ``explain``, and the degraded and test paths, read it)."""
        state = self._state
        if state is None:
            assert self._store is not None  # __init__ has one or the other
            state = self._state = self._store.state(self._row)
        return state

    @property
    def segment(self) -> str | None:
        """The customer's segment (read without rebuilding the state)."""
        if self._state is None and self._store is not None:
            return self._store.segment_of(self._row)
        return self.state.segment

    def __repr__(self) -> str:
        return f"CustomerEntry(db_id={self.db_id}, row={self._row})"


OVERLAY_LIMIT = 50_000
"""Customers a snapshot holds as Python objects, over the store: those changed since it
was built (or not in it). About 2-4 KB each; the oldest is dropped beyond it."""


class Customers(Mapping[str, CustomerEntry]):
    """A snapshot's customers, read-only as a mapping: the overlay of customers re-read
    since the store was built first, then the store.

    Only :class:`ServingState` adds entries (``customers[id] = entry``: a re-read
    customer, atomic under the GIL for readers). Beyond ``limit`` entries the oldest
    is dropped; a dropped store customer is marked stale, so a look-up misses and
    :meth:`ServingState.lookup` reads it again rather than serving the store's out of
    date row.
    """

    def __init__(self, store: columns.ColumnStore | None, limit: int = OVERLAY_LIMIT) -> None:
        self.store = store
        self.limit = limit
        # Ordered oldest first. A plain dict dropped its oldest as next(iter(dict)),
        # which walks past every slot emptied since the dict last grew: 7-14 us a drop
        # once full at 50,000, against under 1 us for popitem here.
        self.overlay: OrderedDict[str, CustomerEntry] = OrderedDict()
        self.sequence_pitches: list[dict[str, Pitch]] | SequencePitches = []
        """Per distinct adoption sequence of the store, its pitches (set at load)."""
        self._stale = np.zeros(0 if store is None else store.n, dtype=bool)
        self._n_stale = 0
        self._added = 0  # overlay entries of customers the store does not hold
        self._lock = threading.Lock()

    def get(  # type: ignore[override]
        self, key: str, default: CustomerEntry | None = None
    ) -> CustomerEntry | None:
        entry = self.overlay.get(key)
        if entry is not None:
            return entry
        store = self.store
        if store is None:
            return default
        row = store.find(key)
        if row < 0 or self._stale[row]:
            return default
        return self._view(store, row)

    def _view(self, store: columns.ColumnStore, row: int) -> CustomerEntry:
        sequence = int(store.sequence[row])
        pitches = self.sequence_pitches
        said = pitches[sequence] if sequence < len(pitches) else None
        band = int(store.band[row])
        return CustomerEntry(
            int(store.db_ids[row]),
            None,
            store.propensities[row],
            # Only read to find the pitches (Snapshot.pitches) when there are none here.
            sequence=store.sequences[sequence] if said is None else None,
            pitches=said,
            bands=store.band_table[band] if band >= 0 else None,
            store=store,
            row=row,
        )

    def __getitem__(self, key: str) -> CustomerEntry:
        entry: CustomerEntry | None = self.get(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        held = 0 if self.store is None else self.store.n
        return held - self._n_stale + self._added

    def __iter__(self) -> Iterator[str]:
        store = self.store
        overlay = dict(self.overlay)
        if store is not None:
            for row, key in enumerate(store.external_ids()):
                if key in overlay or not self._stale[row]:
                    yield key
        for key in overlay:
            if store is None or store.find(key) < 0:
                yield key

    def __setitem__(self, key: str, entry: CustomerEntry) -> None:
        with self._lock:
            overlay = self.overlay
            if overlay.pop(key, None) is None:
                row = -1 if self.store is None else self.store.find(key)
                if row < 0:
                    self._added += 1
                elif self._stale[row]:
                    self._stale[row] = False
                    self._n_stale -= 1
            overlay[key] = entry  # the newest last: the oldest is dropped first
            while len(overlay) > self.limit:
                oldest, _ = overlay.popitem(last=False)
                row = -1 if self.store is None else self.store.find(oldest)
                if row < 0:
                    self._added -= 1
                else:
                    self._stale[row] = True
                    self._n_stale += 1


@dataclass(frozen=True, slots=True)
class Pitch:
    """What an offer of one product says: the answer's ``reasons`` object, the same as
    JSON text for the audit row, and the talking point.

    An offer says the most persuasive true thing there is (see :meth:`Snapshot.pitches`
    and :meth:`Snapshot.profile_pitch`): an adoption rule with a lift above 1 that
    applies to the customer, else how much more often customers with a similar profile
    took the product, else nothing (a talking point that claims nothing).

    Made once per rule (or profile claim, or product, for the answers with neither) and
    shared by every answer that says it, so a decision builds no reasons of its own: the
    dict is read-only by convention and must never be changed.
    """

    rule: Rule | None
    reasons: dict[str, Any]
    reasons_json: str
    talking_point: str

    def with_factors(self, factors: list[dict[str, Any]]) -> Pitch:
        """This pitch with the model's top ``factors`` listed (``explain``); what is said
        does not change."""
        reasons = {**self.reasons, "factors": factors}
        return Pitch(self.rule, reasons, orjson.dumps(reasons).decode(), self.talking_point)


class SequencePitches:
    """Per distinct adoption sequence of a serving store, the pitches of its reason
    rules (the store's CSR ``starts`` and ``rules``: sequence ``i`` says the rules
    ``rules[starts[i] : starts[i + 1]]``, by index), each made the first time a decision
    needs it.

    Made all at once when a version was loaded, the dicts of 250k sequences at 1M
    customers took 80 ms of the interpreter (paced, about a quarter of an activation's
    work beside the requests); one costs about a microsecond the first time a customer
    on its path is asked about, nothing after. Filling a slot is atomic under
    the interpreter lock; two requests filling the same one make equal dicts.
    """

    def __init__(
        self,
        starts: npt.NDArray[np.int64],
        rules: npt.NDArray[np.int64],
        said_for: Callable[[int], tuple[str, Pitch]],
    ) -> None:
        self._starts = starts
        self._rules = rules
        self._said_for = said_for
        self.made: list[dict[str, Pitch] | None] = [None] * max(len(starts) - 1, 0)
        """A slot per sequence, None until made; emptied a slice at a time when the
        snapshot is retired (a shorter list: the rest are not here)."""

    def __len__(self) -> int:
        return len(self.made)

    def __getitem__(self, sequence: int) -> dict[str, Pitch]:
        made = self.made
        try:
            found = made[sequence]
        except IndexError:  # retired, and a request still holds the snapshot
            found = None
        if found is None:
            start, end = self._starts[sequence : sequence + 2].tolist()
            found = _NO_PITCHES
            if end > start:
                found = dict(self._said_for(i) for i in self._rules[start:end].tolist())
            with contextlib.suppress(IndexError):
                made[sequence] = found
        return found

    def __iter__(self) -> Iterator[dict[str, Pitch]]:
        for sequence in range(len(self.made)):
            yield self[sequence]


_NO_PITCHES: dict[str, Pitch] = {}
"""The pitches of a sequence with no reason rule (shared: every pitches dict is read-only)."""


def pitch(
    rule: Rule | None,
    sentence: str | None,
    talking_point: str,
    factors: list[dict[str, Any]] | None = None,
    *,
    profile: str | None = None,
    profile_lift: float | None = None,
) -> Pitch:
    """A :class:`Pitch` for ``rule`` (said as ``sentence``), or a profile claim (said as
    ``profile``, with its ratio ``profile_lift``), and explanation ``factors``."""
    reasons = {
        "rule": sentence,
        "rule_confidence": None if rule is None else round(rule.confidence, 4),
        "rule_lift": None if rule is None else round(rule.lift, 3),
        "profile": profile,
        "profile_lift": profile_lift,
        "factors": factors or [],
    }
    return Pitch(rule, reasons, orjson.dumps(reasons).decode(), talking_point)


def talking_point(
    name: str, sentence: str | None, profile: str | None = None, *, degraded: bool = False
) -> str:
    """A short line the teller can say about product ``name``: the rule ``sentence``,
    else the ``profile`` sentence, else a question that claims nothing."""
    if degraded:
        return f"{name} is one of the products customers like this one take most often."
    if sentence:
        return f"{name}: {sentence[0].upper()}{sentence[1:]}."
    if profile:
        return f"{name}: {profile[0].upper()}{profile[1:]}."
    return f"{name}: ask whether it would be useful to them."


@dataclass
class Snapshot:
    """Everything a decision reads, built together; replaced whole, never edited except
    for single customers' entries (a dict assignment, atomic under the GIL)."""

    version: str | None
    model: PropensityModel | None
    as_of: dt.date
    catalogue: Catalogue
    product_ids: dict[str, int]
    customers: Customers
    popularity: dict[str | None, Counter[str]]
    arbiter: Arbiter
    load_error: str | None = None
    names: dict[str, str] = field(default_factory=dict)

    profiles: ProfileRates | None = None
    """Take-up of customer groups per product, for profile reasons (with a model)."""
    base_rates: dict[str, float] = field(default_factory=dict)
    """Per product, the model's base rate: a profile reason is said only to customers
    whose propensity is at least this (the model agrees they are above average)."""

    rule_cache: dict[tuple[str, ...], dict[str, Pitch]] = field(default_factory=dict)
    """Adoption sequence -> product -> the pitch of its rule worth saying."""
    rule_pitches: dict[Rule, Pitch] = field(default_factory=dict)
    """One pitch per rule, shared by every sequence the rule is said for."""
    profile_pitches: dict[tuple[str, tuple[int, ...]], Pitch | None] = field(default_factory=dict)
    """(product, the customer's bands on its profile columns) -> the pitch of the best
    profile claim, None when there is none."""
    plain_pitches: dict[tuple[str, str], Pitch] = field(default_factory=dict)
    """(kind, product) -> the pitch of an offer without a reason (see :meth:`plain`)."""

    def warm_rules(self) -> int:
        """Fill the reason caches for every customer held (at load, before anyone asks):
        a decision then never looks for its reasons on the request path. The store's
        customers take their sequences' reason rules from the store when it holds
        them. Returns the number of distinct rules said."""
        customers = self.customers
        distinct: set[tuple[int, ...]] = set()
        store = customers.store
        if store is not None:
            stored = self._stored_pitches(store)
            customers.sequence_pitches = (
                stored
                if stored is not None
                else [self._sequence_pitches(s) for s in store.sequences]
            )
            distinct.update(store.band_table)
        for done, entry in enumerate(list(customers.overlay.values())):
            if not done % PACE_EVERY:
                pace()
            self.pitches(entry)
            if entry.bands is not None:
                distinct.add(entry.bands)
        profiles = self.profiles
        if profiles is not None:
            for code in profiles.positions:
                for done, key in enumerate({profiles.key(code, bands) for bands in distinct}):
                    if not done % PACE_EVERY:
                        pace()
                    if key is not None:
                        self._profile_pitch(profiles, code, key)
        return len(self.rule_pitches)

    def pitches(self, entry: CustomerEntry) -> dict[str, Pitch]:
        """The pitch of the rule worth saying for every product the customer may take
        next (:meth:`models.rules.RuleSet.reasons_for`: lift above 1, enough customers,
        the highest lift first); products without one are absent.

        Cached by adoption sequence: customers on the same path share one entry, so a
        decision usually costs a dict lookup here.
        """
        if entry.pitches is not None:
            return entry.pitches
        model = self.model
        if model is None or model.rules is None:
            return {}
        if entry.sequence is None:
            cutoff = to_ns(entry.as_of if entry.as_of is not None else self.as_of)
            ordered = sorted(
                (to_ns(a.adopted_at), a.product_code)
                for a in entry.state.adoptions
                if to_ns(a.adopted_at) < cutoff
            )
            entry.sequence = tuple(dict.fromkeys(code for _, code in ordered))
        found = entry.pitches = self._sequence_pitches(entry.sequence)
        return found

    def _sequence_pitches(self, sequence: tuple[str, ...]) -> dict[str, Pitch]:
        """The pitches of customers whose adoption sequence is ``sequence`` (cached)."""
        model = self.model
        if model is None or model.rules is None:
            return {}
        found = self.rule_cache.get(sequence)
        if found is None:
            if len(self.rule_cache) > 200_000:
                self.rule_cache.clear()
            found = {
                code: self._rule_pitch(model, rule)
                for code, rule in model.rules.reasons_for(sequence).items()
            }
            self.rule_cache[sequence] = found
        return found

    def _rule_pitch(self, model: PropensityModel, rule: Rule) -> Pitch:
        """The one pitch of ``rule``, shared by every sequence it is said for."""
        said = self.rule_pitches.get(rule)
        if said is None:
            sentence = model.rule_sentence(rule)
            name = self.names.get(rule.consequent, rule.consequent)
            said = self.rule_pitches[rule] = pitch(rule, sentence, talking_point(name, sentence))
        return said

    def _stored_pitches(self, store: columns.ColumnStore) -> SequencePitches | None:
        """The pitches of the store's distinct sequences, from the reason rules it holds
        (found when it was built), each made when a decision first needs it; None when
        the store holds none for this model's rules."""
        model = self.model
        if model is None or model.rules is None or store.reasons is None:
            return None
        if store.reasons != columns.reason_terms(model.rules):
            return None
        rules = model.rules.rules
        # By rule index: hashing a Rule (a dataclass) for each of the 100k sequence
        # reasons at 1M customers took half of making them.
        made: dict[int, tuple[str, Pitch]] = {}

        def said_for(index: int) -> tuple[str, Pitch]:
            pair = made.get(index)
            if pair is None:
                rule = rules[index]
                pair = made[index] = (rule.consequent, self._rule_pitch(model, rule))
            return pair

        return SequencePitches(store.reason_start, store.reason_rule, said_for)

    def profile_pitch(self, entry: CustomerEntry, code: str, propensity: float) -> Pitch | None:
        """The pitch of the best profile claim about ``code`` for the customer ("customers
        with similar age and income took it 3.1x as often ..."; see
        :mod:`models.reasons`), or None: no claim is strong enough, or the customer's
        ``propensity`` is below the product's base rate (the model does not see them as
        above average, so the group they are in is no argument for them).

        Cached by the customer's bands on the product's profile columns: a dict lookup.
        """
        profiles = self.profiles
        if profiles is None or propensity < self.base_rates.get(code, 1.0):
            return None
        bands = entry.bands
        if bands is None:
            bands = entry.bands = profiles.bands_of(entry.state)
        key = profiles.key(code, bands)
        if key is None:
            return None
        try:
            return self.profile_pitches[(code, key)]
        except KeyError:
            return self._profile_pitch(profiles, code, key)

    def _profile_pitch(
        self, profiles: ProfileRates, code: str, key: tuple[int, ...]
    ) -> Pitch | None:
        if len(self.profile_pitches) > 200_000:
            self.profile_pitches.clear()
        claim = profiles.claim(code, key)
        found = None
        if claim is not None and self.model is not None:
            ratio = round(claim.ratio, 3)  # printed from the ratio the answer gives
            said = profile_sentence(claim, self.model.spoken_name(code), ratio)
            name = self.names.get(code, code)
            found = pitch(
                None, None, talking_point(name, None, said), profile=said, profile_lift=ratio
            )
        self.profile_pitches[(code, key)] = found
        return found

    def plain(self, code: str, kind: str = "model") -> Pitch:
        """The pitch of an offer of ``code`` with no reason to give: ``kind`` is
        ``model`` (the model's choice; the talking point claims nothing), ``degraded``
        (popularity, with no model) or ``cold_start`` (a customer not known yet)."""
        found = self.plain_pitches.get((kind, code))
        if found is None:
            name = self.names.get(code, code)
            if kind == "cold_start":
                line = f"{name} is one of the products new customers take most often."
            else:
                line = talking_point(name, None, degraded=kind == "degraded")
            found = self.plain_pitches[(kind, code)] = pitch(None, None, line)
        return found

    @property
    def degraded(self) -> bool:
        """No model: decisions come from popularity and are flagged."""
        return self.model is None


_EVENT_COLUMNS = "id, kind, customer_external_id, product_code, detail, occurred_at, origin"
_AFTER_LAST = f"SELECT {_EVENT_COLUMNS} FROM change_events WHERE id > :last"
_IN_ORDER = "ORDER BY id LIMIT 20000"
"""How every poll's read ends: the events in id order, at most this many a poll."""
_POLL = text(f"{_AFTER_LAST} {_IN_ORDER}")
"""A poll's read of the change log: the events after the last one seen, by the primary
key. Nearly always there are no gaps, and this is the whole query: written with the
gaps' ``OR id IN :gaps``, an empty list made PostgreSQL test that condition on every
row of the log, walking all of it twice a second (171 ms of the database's CPU a poll at
843k events, where this reads the few new ones in well under a millisecond)."""
_POLL_WITH_GAPS = text(
    f"{_AFTER_LAST} UNION ALL "
    f"SELECT {_EVENT_COLUMNS} FROM change_events WHERE id IN :gaps {_IN_ORDER}"
).bindparams(bindparam("gaps", expanding=True))
"""The same and the ids still missing (:data:`GAP_SECONDS`, all below ``:last``), each
read by the key (as one ``OR``, SQLite scanned the whole log)."""
_POLL_WITH_GAP_ARRAY = text(
    f"{_AFTER_LAST} UNION ALL "
    f"SELECT {_EVENT_COLUMNS} FROM change_events WHERE id = ANY(CAST(:gaps AS bigint[])) "
    f"{_IN_ORDER}"
)
""":data:`_POLL_WITH_GAPS` on PostgreSQL: the ids as one array parameter. Up to
:data:`MAX_GAPS` of them (a worker that loaded while the log was empty and then saw an
event far above its last one): sent as that many parameters, every poll's statement was
made and parsed anew for 30 s, and a worker under load answered with a p99 of 25-32 ms
instead of under 10. The array goes as its text (:func:`_bigint_array`)."""


def _bigint_array(ids: Iterable[int]) -> str:
    """``ids`` as the text of a PostgreSQL array (``{1,2,3}``), parsed by the server.

    Bound as a Python list, the array was dumped by the driver an element at a time in
    Python, on the poll's thread while it held the interpreter: 8.2-8.7 ms of it a poll for
    :data:`MAX_GAPS` ids, twice a second for :data:`GAP_SECONDS`, in stretches the event
    loop waited out (``bench/poll.py``: 1.8-2.1 ms as text). The ids are ints, so the text is
    digits and commas, and it is bound as a parameter all the same.
    """
    return "{" + ",".join(map(str, sorted(ids))) + "}"


_PRUNE = text(
    "DELETE FROM change_events WHERE id <= :upto AND id < (SELECT max(id) FROM change_events)"
)
"""What :meth:`ServingState.prune_events` deletes: the events seen long enough ago, all
but the newest (see there)."""

GAP_SECONDS = 30.0
"""How long a skipped change-event id is looked for (a transaction's longest commit)."""
MAX_GAPS = 10_000
EVENT_RETENTION_SECONDS = 3600.0
"""How long a change event is kept. A worker needs an event only until its next poll
(late commits: :data:`GAP_SECONDS`); a worker that (re)loads reads the tables
themselves, so older events serve no one, and with offers announced there are a few
per decision."""
PRUNE_EVERY_SECONDS = 300.0
HEARTBEAT_SECONDS = 15.0
"""How often a worker that announces offers only when it is not alone (announce_offers
'auto') writes a ``heartbeat`` change event, so that the others know it serves."""
OTHERS_FORGOTTEN_SECONDS = 60.0
"""How long after another worker's last event a worker still counts it as serving."""
GC_YOUNG_THRESHOLD = 20_000
HISTORY_SWEEP_BUDGET = 10_000
"""Customers of the contact history examined per poll at most (about 4 ms of Python at a
million customers, on the event loop a slice at a time: see
:func:`service.app._sweep_history`)."""
HISTORY_PASS_SECONDS = 600.0
"""How long a sweep pass over the contact history takes (see :func:`sweep_budget`): what
the windows no longer see is forgotten at most this long after (against windows of
days). A poll's share grows with the customers held, up to :data:`HISTORY_SWEEP_BUDGET`
(reached at 12M customers at the default poll interval)."""


def sweep_budget(held: int, poll_seconds: float) -> int:
    """Customers of a contact history of ``held`` to examine at a poll every
    ``poll_seconds``: enough for a pass every :data:`HISTORY_PASS_SECONDS`, at least one
    slice (:data:`~service.decision.contacts.SWEEP_SLICE`), at most
    :data:`HISTORY_SWEEP_BUDGET`.

    A fixed 10,000 a poll made a pass every 50 s at a million customers, over windows
    that hold weeks: 7 ms of a worker's event loop twice a second under load, taken
    from the requests in flight.
    """
    wanted = math.ceil(held * max(poll_seconds, 0.0) / HISTORY_PASS_SECONDS)
    return min(HISTORY_SWEEP_BUDGET, max(SWEEP_SLICE, wanted))


RETRY_SECONDS = 5.0
"""Wait before a failed snapshot load is tried again; doubles with each failure."""
MAX_RETRY_SECONDS = 300.0
MAX_REFRESH_ATTEMPTS = 10
"""Polls a customer whose refresh failed is re-read at; then its entry is left as is
until its next change (a customer that cannot be read must not cost every poll)."""
MAX_STALE = 100_000
NO_ACTIVE_VERSION = "no active model version"
WORKER_ORIGIN = "worker-"
"""How the origin of a serving worker's change events starts."""


RETIRE_SLICE = 2000
"""Cache entries of a replaced snapshot freed between two turns of the other threads."""
PACE_EVERY = 256
"""Steps (sequences' pitches made, customers warmed, profile claims) of a build between
two calls of :func:`~service.decision.sharing.pace`."""


def _retire(snapshot: Snapshot) -> None:
    """Free a replaced snapshot's caches a slice at a time, giving the interpreter to
    the requests between slices: dropped at once, the pitches of every adoption sequence
    (50k dicts at 1M customers) took 0.1 s of the GIL. A request still holding the
    snapshot finds the caches empty and makes what it needs again. Its store's pages
    are given back here too (:meth:`~service.decision.store.ColumnStore.let_go`), not
    wherever its last reference goes."""
    store = snapshot.customers.store
    if store is not None:
        store.let_go()
    sequences = snapshot.customers.sequence_pitches
    made = sequences.made if isinstance(sequences, SequencePitches) else sequences
    while made:  # the dicts made from the store's reasons are held here alone
        del made[-RETIRE_SLICE:]
        pace()
    caches: list[dict[Any, Any]] = [
        snapshot.rule_cache,
        snapshot.rule_pitches,
        snapshot.profile_pitches,
    ]
    for cache in caches:
        while cache:
            with contextlib.suppress(KeyError):  # emptied meanwhile
                for _ in range(min(RETIRE_SLICE, len(cache))):
                    cache.popitem()
            pace()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ServingState:
    """The worker's snapshot, contact history and change-log position."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.origin = f"{WORKER_ORIGIN}{uuid.uuid4().hex[:12]}"
        self.snapshot: Snapshot | None = None
        self.history = ContactBook()
        self.last_event = 0
        # Event id not seen yet -> when first missed; oldest first (see poll).
        self._gaps: OrderedDict[int, float] = OrderedDict()
        # (when, last event id seen then), oldest first: what prune_events may delete.
        self._marks: deque[tuple[float, int]] = deque()
        self._pruned_at = time.monotonic()
        self._heartbeat_due = 0.0  # the first poll says this worker is here
        self._others_until = 0.0  # another worker serves the database until then
        self._others: set[str] = set()
        self._reload_lock = threading.Lock()
        self.load_error: str | None = None
        """None while the served snapshot is current; else why not: the active model
        version could not be loaded, or the last (re)load failed and an older snapshot
        (or none) is served. Readiness reports it."""
        self._retry_at: float | None = None  # when a failed load is tried again (monotonic)
        self._failures = 0  # failed loads in a row, for the back-off
        self._stale: dict[str, int] = {}  # customer -> failed refreshes, retried by poll
        self._stale_lock = threading.Lock()
        # What "now" is for decisions, outcomes and policy windows: the wall clock, or
        # a simulated one (``nbo simulate`` replays days in minutes).
        self.clock: Callable[[], dt.datetime] = _utcnow

    def stop(self) -> None:
        """The worker is stopping: end the long work of a load under way (a store build
        in a child process, the contact history's reads between two of them), and start
        no more (:func:`service.child.stopping` then says so, for the whole worker).
        Safe in a signal handler: it only sets a flag and signals children."""
        child.stop_all()

    def _unless_stopping(self) -> None:
        if child.stopping():
            raise child.ChildStopped("the worker is stopping")

    def held(self) -> tuple[int, int]:
        """Customers held in memory: in the contact history, in the snapshot's overlay."""
        snapshot = self.snapshot
        return len(self.history), 0 if snapshot is None else len(snapshot.customers.overlay)

    # ------------------------------------------------------------------ loading

    def load(self) -> Snapshot:
        """Build a snapshot from the database and swap it in (blocking; run in a thread).

        Never raises: routes call it after committing a change, and their answer must
        say what happened to the change. When the build fails, the previous snapshot
        keeps serving, the failure is logged and counted, :attr:`load_error` says so
        and :meth:`poll` tries again (after :data:`RETRY_SECONDS`, doubling). Returns
        the snapshot served; before any was built, an empty one that offers nothing
        (not swapped in: the worker keeps answering degraded).
        """
        with self._reload_lock:
            loading = time.perf_counter()
            try:
                with sharing_the_interpreter(self.snapshot is not None):
                    snapshot = self._build()
            except Exception as exc:  # noqa: BLE001 - anything: keep serving what we have
                return self._load_failed(exc)
            self._failures = 0
            self._retry_at = None
            self.load_error = (
                None if snapshot.load_error == NO_ACTIVE_VERSION else snapshot.load_error
            )
            previous, self.snapshot = self.snapshot, snapshot
            # Long-lived objects out of the collector's way: without this, full
            # collections over the snapshot's objects dominate the p99 latency. At
            # start-up what is not frozen yet is collected first; while serving it is
            # frozen as it is, for even the new snapshot's own objects took a
            # collection of 0.25 s holding the GIL at 1M customers (the pitches of 50k
            # adoption sequences), while requests waited. The previous snapshot, frozen,
            # is freed by reference counting (see _retire); a build makes next to no
            # reference cycles to keep (12 objects over three reloads at 100k customers).
            if previous is None:
                gc.collect()
                # What the start-up's bulk reads freed lies in holes all over the heap,
                # which glibc keeps (270 MiB of a worker's 1.57 GB at 18M offers in the
                # windows). Given back here, before the worker takes requests (8 ms at
                # 18M offers holding the allocator's lock; not at a reload, while serving).
                _trim_heap()
            gc.freeze()
            # A request allocates a few hundred objects, nearly all freed by reference
            # counting; at the default threshold (700) the young generation was
            # collected several times per request batch, and its older generations
            # every few hundred requests, for ~7% of the worker's time and pauses of
            # up to 6 ms. Measured (bench/serve.py, PostgreSQL): +10% decisions/s and a
            # lower p99 at 20,000.
            gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
            metrics.SNAPSHOT_LOAD_SECONDS.observe(time.perf_counter() - loading)
            model = snapshot.model
            metrics.set_active_model(snapshot.version, None if model is None else model.as_of)
            if previous is not None:
                with sharing_the_interpreter():
                    _retire(previous)
            return snapshot

    def _build(self) -> Snapshot:
        started = self.last_event or _max_event(self.engine)
        # Building (and reading the contact history, at start-up) allocates millions of
        # long-lived objects: with the collector on, its full collections re-walked them
        # again and again (~6 s of a 100k customer load, holding the GIL while another
        # snapshot serves). One collection after the build does the same work once.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._unless_stopping()
            snapshot = build_snapshot(self.engine, self.settings)
            snapshot.warm_rules()
            if self.last_event == 0:
                self._unless_stopping()
                self._load_history(snapshot)
                self.last_event = started
        finally:
            if enabled:
                if self.snapshot is not None:
                    # Frozen before the collector is back on: its first young collection
                    # would otherwise walk every object of the build (0.47 s holding the
                    # GIL at 1M customers) while requests wait.
                    gc.freeze()
                gc.enable()
        return snapshot

    def _load_failed(self, exc: Exception) -> Snapshot:
        served = self.snapshot
        if child.stopping():
            # Not a failure: the worker was told to stop (SIGTERM during start-up).
            log.info("snapshot load stopped: the worker is stopping")
            return served if served is not None else empty_snapshot(self.settings, "stopping")
        self._failures += 1
        delay = min(RETRY_SECONDS * 2 ** (self._failures - 1), MAX_RETRY_SECONDS)
        self._retry_at = time.monotonic() + delay
        what = "reload" if served is not None else "load"
        # The exception's type, not its text: a driver's message may quote row values.
        self.load_error = f"snapshot {what} failed ({type(exc).__name__}); retrying"
        metrics.SNAPSHOT_RELOAD_FAILURES.labels("snapshot").inc()
        log.error(
            "snapshot load failed; the previous snapshot keeps serving",
            extra={
                "serving": None if served is None else served.version,
                "failures": self._failures,
                "retry_seconds": delay,
            },
            exc_info=True,
        )
        return served if served is not None else empty_snapshot(self.settings, self.load_error)

    def _history_days(self) -> int:
        """The longest policy window: what the contact history must remember."""
        return max(
            self.settings.decline_cooldown_days,
            self.settings.frequency_window_days,
            self.settings.detractor_suppress_days,
        )

    def _load_history(self, snapshot: Snapshot) -> None:
        since = self.clock() - dt.timedelta(days=self._history_days())
        with read_only(self.engine).connect() as conn:
            # On PostgreSQL most offers and declines come in bulk (_bulk); the rows left
            # are grouped by customer in the database and added a customer at a time: a
            # busy month is millions of offers, row-at-a-time work took most of a start-up.
            # PostgreSQL gives instants as POSIX seconds, sparing a datetime per row.
            postgresql = self.engine.dialect.name == "postgresql"

            def seconds(column: str) -> str:
                return f"EXTRACT(EPOCH FROM {column})::float8" if postgresql else column

            # Streamed in batches (a server-side cursor on PostgreSQL): millions of offers
            # read as one list of rows took ~0.7 KB an offer at start-up, memory the
            # worker's heap then kept (1.6 GB a worker for 1.6M offers at 1M customers).
            if postgresql:
                # Compiling these reads (planned at millions of rows) took longer than
                # running them.
                conn.execute(text("SET LOCAL jit = off"))
            # (execution_options changes conn itself: every statement from here on is a
            # server-side cursor, which a SET cannot go through; hence _planner below.)
            stream = conn.execution_options(stream_results=True, yield_per=20_000)
            rest, params = self._bulk(
                conn, window.read_offers, window.rest_offers, since, snapshot, "offers"
            )
            # After a bulk read that named every customer, the offers left are the few of
            # the partial index ix_offers_unnamed_created_at; PostgreSQL, whose estimate of
            # them is millions, read every offer of the windows again instead (2.5-3.8 s
            # at 5.7M offers, for none), so it is told not to. Each offer's customer and
            # product are looked up by key, not joined, for the same reason.
            narrow = postgresql and params.get("unnamed") == []
            if narrow:
                _planner(
                    conn, "SET LOCAL enable_seqscan = off", "SET LOCAL enable_bitmapscan = off"
                )
            offers = stream.execute(
                text(
                    "SELECT customer, code, id, at FROM (SELECT "
                    "(SELECT d.customer_external_id FROM decisions d WHERE d.id = o.decision_id) "
                    "AS customer, (SELECT p.code FROM products p WHERE p.id = o.product_id) "
                    f"AS code, o.id, {seconds('o.created_at')} AS at, o.created_at AS made "
                    f"FROM offers o WHERE o.created_at >= :since {rest}) AS r "
                    "WHERE customer IS NOT NULL AND code IS NOT NULL ORDER BY customer, code, made"
                ),
                params,
            )
            self.history.load_offers(
                (customer, code, offer_id, _posix(at)) for customer, code, offer_id, at in offers
            )
            if narrow:
                _planner(conn, "RESET enable_seqscan", "RESET enable_bitmapscan")
            self._unless_stopping()
            # Each customer's declines and detractor answers together, added one
            # customer at a time (a busy month has hundreds of thousands of declines).
            rest, params = self._bulk(
                conn, window.read_declines, window.rest_declines, since, snapshot, "declines"
            )
            declines = stream.execute(
                text(
                    f"SELECT d.customer_external_id, p.code, {seconds('oo.created_at')} "
                    "FROM offer_outcomes oo "
                    "JOIN offers o ON o.id = oo.offer_id JOIN decisions d ON d.id = o.decision_id "
                    "JOIN products p ON p.id = o.product_id "
                    f"WHERE oo.outcome = 'declined' AND oo.created_at >= :since {rest}"
                    "ORDER BY d.customer_external_id"
                ),
                params,
            )
            self.history.load_marks((c, code, _posix(at)) for c, code, at in declines)
            detractors = stream.execute(
                text(
                    f"SELECT c.external_id, {seconds('f.created_at')} FROM feedback f "
                    "JOIN customers c ON c.id = f.customer_id "
                    "WHERE f.kind = 'nps' AND f.score <= 6 AND f.created_at >= :since "
                    "AND EXISTS (SELECT 1 FROM offers o WHERE o.decision_id = f.decision_id) "
                    "ORDER BY c.external_id"
                ),
                {"since": since},
            )
            self.history.load_marks((c, None, _posix(at)) for c, at in detractors)

    def _bulk(
        self,
        conn: Connection,
        read: Callable[..., list[int]],
        rest: Callable[[list[int]], str],
        since: dt.datetime,
        snapshot: Snapshot,
        what: str,
    ) -> tuple[str, dict[str, Any]]:
        """On PostgreSQL, ``read`` (:mod:`service.decision.window`) what it can in bulk
        into the history; the condition and parameters of what the row reader still has
        to read (everything when not on PostgreSQL, or when the bulk read failed)."""
        params: dict[str, Any] = {"since": since}
        if self.engine.dialect.name != "postgresql":
            return "", params
        try:
            unnamed = read(conn, since, self.history, snapshot.customers.store)
        except Exception:  # noqa: BLE001 - the row reader reads them all
            log.warning("bulk read of the windows' %s failed", what, exc_info=True)
            conn.rollback()
            return "", params
        return f"AND {rest(unnamed)} ", params | {"unnamed": unnamed}

    def remember_offers(
        self, customer: str, offers: Iterable[dict[str, Any]], at: dt.datetime
    ) -> None:
        """Add offers just made to the customer's history; once it holds many, forget
        those older than the frequency window (nothing else reads them)."""
        history = self.history[customer]
        stamp = at.timestamp()
        history.add_offers_at([(o["offer_id"], o["product_code"], stamp) for o in offers])
        if len(history.offers) > history.trim_at:
            history.forget_before(at - dt.timedelta(days=self.settings.frequency_window_days))

    # ------------------------------------------------------------------ one customer

    def refresh_customers(self, external_ids: Iterable[str]) -> None:
        """Re-read and re-score customers after a change (blocking).

        Never raises: routes call it after committing the change. When the read fails
        the customers keep their current entries and are marked stale; :meth:`poll`
        tries them again (up to :data:`MAX_REFRESH_ATTEMPTS` times).
        """
        snapshot = self.snapshot
        if snapshot is None:
            return
        ids = sorted(set(external_ids))
        if not ids:
            return
        try:
            found = read_customers(self.engine, snapshot, ids)
        except Exception:  # noqa: BLE001 - the old entries serve until a retry succeeds
            self._mark_stale(ids)
            return
        for external_id, entry in found.items():
            snapshot.customers[external_id] = entry
        with self._stale_lock:
            for external_id in ids:
                self._stale.pop(external_id, None)

    def _mark_stale(self, ids: list[str]) -> None:
        metrics.SNAPSHOT_RELOAD_FAILURES.labels("customers").inc()
        dropped = 0
        with self._stale_lock:
            for external_id in ids:
                attempts = self._stale.get(external_id, 0) + 1
                if attempts > MAX_REFRESH_ATTEMPTS or len(self._stale) >= MAX_STALE:
                    self._stale.pop(external_id, None)
                    dropped += 1
                else:
                    self._stale[external_id] = attempts
            stale = len(self._stale)
        log.warning(
            "customer refresh failed; current entries keep serving",
            extra={"customers": len(ids), "stale": stale, "abandoned": dropped},
            exc_info=True,
        )

    def _take_stale(self) -> set[str]:
        with self._stale_lock:
            return set(self._stale)

    def lookup(self, external_id: str) -> CustomerEntry | None:
        """A customer not held yet (imported after start-up) is read from the database."""
        snapshot = self.snapshot
        if snapshot is None:
            return None
        entry = snapshot.customers.get(external_id)
        if entry is not None:
            return entry
        found = read_customers(self.engine, snapshot, [external_id])
        entry = found.get(external_id)
        if entry is not None:
            snapshot.customers[external_id] = entry
        return entry

    # ------------------------------------------------------------------ change log

    def poll(self) -> int:
        """Apply change events made by other workers since the last poll; returns how many.

        Event ids come from a sequence, so a transaction that commits after a later one
        leaves its id as a hole for a moment: ids skipped over are remembered as gaps and
        looked for again at each poll for :data:`GAP_SECONDS` (a rolled-back transaction
        leaves a hole for good), so no event is missed for committing late.
        """
        now = time.monotonic()
        if self._retry_at is not None and now >= self._retry_at:
            self.load()  # a failed load, tried again (it reads every change since)
        if self._beats() and now >= self._heartbeat_due:
            self._heartbeat_due = now + HEARTBEAT_SECONDS
            with unit_of_work(self.engine) as session:
                record_event(session.connection(), kind="heartbeat", origin=self.origin)
        for gap in [g for g, seen in self._gaps.items() if now - seen > GAP_SECONDS]:
            del self._gaps[gap]
        with read_only(self.engine).connect() as conn:
            if self._gaps:
                query, gaps = (
                    (_POLL_WITH_GAP_ARRAY, _bigint_array(self._gaps))
                    if conn.dialect.name == "postgresql"
                    else (_POLL_WITH_GAPS, sorted(self._gaps))
                )
                rows = conn.execute(query, {"last": self.last_event, "gaps": gaps}).all()
            else:
                rows = conn.execute(_POLL, {"last": self.last_event}).all()
        if not rows:
            if self._stale:
                self.refresh_customers(self._take_stale())
            return 0
        fresh = {int(row[0]) for row in rows if row[0] > self.last_event}
        if fresh:
            newest = max(fresh)
            # Only the MAX_GAPS ids below the newest can be kept, so only they are made
            # gaps. A worker that loaded while the log was empty (pruned, or emptied by
            # hand) has seen no event, and the first one's id may be in the millions: a
            # gap made for every id from 1, and the excess then dropped from the front of
            # a plain dict one at a time (each drop walking past the ones dropped
            # before), held the interpreter for minutes while decisions crawled.
            for missing in range(max(self.last_event + 1, newest - MAX_GAPS), newest):
                if missing not in fresh:
                    self._gaps[missing] = now
            while len(self._gaps) > MAX_GAPS:
                self._gaps.popitem(last=False)
            self.last_event = newest
        refresh: set[str] = set()
        reload = False
        applied = 0
        for event_id, kind, customer, product, detail, at, origin in rows:
            self._gaps.pop(int(event_id), None)
            if origin is not None and origin == self.origin:
                continue  # made here, applied when it was made
            if origin is not None and origin.startswith(WORKER_ORIGIN):
                # Another worker serves the database; one newly seen hears of this one
                # at once rather than at the next heartbeat.
                self._others_until = now + OTHERS_FORGOTTEN_SECONDS
                if origin not in self._others:
                    self._others.add(origin)
                    self._heartbeat_due = 0.0
            if kind == "heartbeat":
                continue
            self.apply_event(kind, customer, product, detail, _aware(at), refresh)
            reload |= kind in ("catalogue", "model")
            applied += 1
        if reload:
            self.load()
        elif refresh or self._stale:
            self.refresh_customers(refresh | self._take_stale())
        return applied

    @property
    def not_alone(self) -> bool:
        """Whether another worker (of this or another ``nbo serve``) has written to the
        change log in the last :data:`OTHERS_FORGOTTEN_SECONDS`."""
        return time.monotonic() < self._others_until

    def _beats(self) -> bool:
        """Whether this worker writes heartbeats: only when others need them to decide
        whether to announce their offers (announce_offers 'auto', one worker each)."""
        return self.settings.announce_offers == "auto"

    def sweep_history(self, budget: int) -> bool:
        """Examine up to ``budget`` customers of the contact history: those whose every
        entry has left the longest policy window are forgotten, others lose what no
        window sees, so memory follows the windows (:meth:`ContactBook.sweep`). Returns
        whether the sweep's pass is still under way (False: it ended here)."""
        self.history.sweep(self.clock(), self._history_days() * 86400.0, budget=budget)
        return self.history.sweeping

    def prune_events(self, now: float | None = None) -> int:
        """Delete the change events this worker saw more than
        :data:`EVENT_RETENTION_SECONDS` ago, at most every :data:`PRUNE_EVERY_SECONDS`;
        returns how many rows went.

        Every worker prunes (a delete of ids already gone deletes nothing), by id, so the
        delete walks the primary key rather than the table. Without it ``change_events``
        grows by a few rows a decision for good.

        The newest event always stays: SQLite gives a new row the largest id held plus
        one (1 in an empty table), so a log pruned empty handed out ids again that every
        worker had seen, and their polls (``id`` above the last seen) skipped the events
        that followed (an adoption imported after a quiet hour, never applied).
        """
        now = time.monotonic() if now is None else now
        if self.last_event and (not self._marks or self._marks[-1][1] != self.last_event):
            self._marks.append((now, self.last_event))
        if now - self._pruned_at < PRUNE_EVERY_SECONDS:
            return 0
        self._pruned_at = now
        upto = 0
        while self._marks and now - self._marks[0][0] >= EVENT_RETENTION_SECONDS:
            upto = self._marks.popleft()[1]
        if not upto:
            return 0
        with unit_of_work(self.engine) as session:
            result = session.execute(_PRUNE, {"upto": upto})
        return int(getattr(result, "rowcount", 0) or 0)

    def _learns_from_outcomes(self) -> bool:
        """Whether the served model has outcome features (a decline changes scores)."""
        snapshot = self.snapshot
        return bool(
            snapshot is not None
            and snapshot.model is not None
            and snapshot.model.spec.outcome_kinds
        )

    def apply_event(
        self,
        kind: str,
        customer: str | None,
        product: str | None,
        detail: str | None,
        at: dt.datetime,
        refresh: set[str],
    ) -> None:
        """Apply one change to the contact history; customers to re-read go to ``refresh``."""
        if customer is None:
            return
        if kind == "offer" and product is not None and detail is not None:
            self.history[customer].add_offer(detail, product, at)
        elif kind == "outcome" and detail == "detractor":
            self.history[customer].add_detractor(at)
        elif kind == "outcome" and product is not None:
            if detail == "declined":
                self.history[customer].add_decline(product, at)
                if self._learns_from_outcomes():
                    refresh.add(customer)
            elif detail == "accepted":
                refresh.add(customer)
        elif kind in ("adoption", "customer"):
            refresh.add(customer)


# --------------------------------------------------------------------------- building


def policy_from(settings: Settings) -> Policy:
    """The contact policy the settings configure."""
    return Policy(
        min_propensity=settings.min_propensity,
        decline_cooldown_days=settings.decline_cooldown_days,
        frequency_cap=settings.frequency_cap,
        frequency_window_days=settings.frequency_window_days,
        max_offers_per_contact=settings.max_offers_per_contact,
        detractor_suppress_days=settings.detractor_suppress_days,
    )


def empty_snapshot(settings: Settings, error: str) -> Snapshot:
    """A snapshot of nothing (no products, customers or model): what a worker that has
    never loaded one answers with, so a caller always gets a snapshot."""
    catalogue = Catalogue.from_records([])
    return Snapshot(
        version=None,
        model=None,
        as_of=dt.date.today(),
        catalogue=catalogue,
        product_ids={},
        customers=Customers(None),
        popularity={None: Counter()},
        arbiter=Arbiter.for_catalogue(
            product_codes=(),
            values=catalogue.values,
            weights=catalogue.business_weights,
            active=catalogue.active,
            policy=policy_from(settings),
        ),
        load_error=error,
    )


def serving_dir(settings: Settings) -> Path:
    """Where the machine's serving stores are written (``<data_dir>/serving``)."""
    return settings.data_dir / "serving"


def build_snapshot(engine: Engine, settings: Settings) -> Snapshot:
    """Load the active model and map the serving store of the model, catalogue and bank
    (building it first when there is none, or it cannot be brought up to date); the
    customers changed since it was built are re-read into the snapshot's overlay."""
    model: PropensityModel | None = None
    version: str | None = None
    error: str | None = None
    with unit_of_work(engine) as session:
        row = registry.active_version(session)
        if row is not None:
            session.expunge(row)
    if row is None:
        error = NO_ACTIVE_VERSION
    else:
        try:
            with read_only(engine).connect() as conn:
                model = registry.load_model(conn, row, cache_dir=settings.artifacts_dir)
            version = row.version
        except registry.RegistryError as exc:
            error = str(exc)
            log.error("model load failed", extra={"version": row.version, "error": error})
    with read_only(engine).connect() as conn:
        product_ids: dict[str, int] = dict(
            conn.execute(text("SELECT code, id FROM products")).all()
        )
    changed: set[str] = set()
    store, _ = _serving_store(
        engine,
        settings,
        model,
        version,
        None if model is None or row is None else row.checksum,
        changed,
    )
    # Every page in memory before the store serves (see ColumnStore.keep_in_memory).
    store.keep_in_memory(lock=settings.lock_serving_store)
    catalogue = store.catalogue
    base_rates: dict[str, float] = {}
    if model is not None:
        base_rates = {p.product_code: p.base_rate for p in model.products}
    snapshot = Snapshot(
        version=version,
        model=model,
        as_of=store.as_of,
        catalogue=catalogue,
        product_ids={str(k): int(v) for k, v in product_ids.items()},
        customers=Customers(store),
        popularity=store.popularity,
        arbiter=Arbiter.for_catalogue(
            product_codes=catalogue.product_codes,
            values=catalogue.values,
            weights=catalogue.business_weights,
            active=catalogue.active,
            policy=policy_from(settings),
        ),
        load_error=error,
        names=dict(zip(catalogue.product_codes, catalogue.names, strict=True)),
        profiles=store.profiles if model is not None else None,
        base_rates=base_rates,
    )
    ids = sorted(changed)
    for start in range(0, len(ids), 1000):
        pace()
        for external_id, entry in read_customers(
            engine, snapshot, ids[start : start + 1000]
        ).items():
            snapshot.customers[external_id] = entry
    if ids:
        log.info("customers changed since the serving store re-read", extra={"customers": len(ids)})
    return snapshot


def _serving_store(
    engine: Engine,
    settings: Settings,
    model: PropensityModel | None,
    version: str | None,
    checksum: str | None,
    changed: set[str],
) -> tuple[columns.ColumnStore, bool]:
    """The serving store of ``model`` (``version`` with its bundle ``checksum``) over
    the bank as it is now: mapped when this machine has a current one, else built;
    whether it was built. Customers changed since it was built are added to
    ``changed``."""
    with read_only(engine).connect() as conn:
        key = columns.store_key(
            conn, version=version, checksum=checksum, scoring_date=settings.scoring_date or None
        )

    def usable(store: columns.ColumnStore) -> bool:
        with read_only(engine).connect() as conn:
            found = columns.changes_since(conn, store.fingerprint)
        if found is None:
            return False
        changed.update(found)
        return True

    return columns.open_or_build(
        serving_dir(settings),
        key,
        build=lambda folder: _build_store(engine, settings, model, version, folder),
        usable=usable,
    )


def prepare_store(engine: Engine, settings: Settings, version: str) -> bool:
    """Build this machine's serving store of model ``version`` as it would be served if
    it were active, unless a current one is here already; whether it was built.

    An activation calls it before the version becomes active: the minutes a large bank's
    store takes are spent while the old version serves (the build runs in a child
    process at low priority, see :func:`_build_store`), and every worker then maps the
    new store in a second instead of waiting for it.

    Raises
    ------
    registry.RegistryError
        If there is no such version, or its bundle fails its checks.
    """
    with unit_of_work(engine) as session:
        row = registry.get_version(session, version)
        session.expunge(row)
    with read_only(engine).connect() as conn:
        model = registry.load_model(conn, row, cache_dir=settings.artifacts_dir)
    store, built = _serving_store(engine, settings, model, row.version, row.checksum, set())
    del store  # unmapped: the workers map it when they load the version
    return built


def _build_store(
    engine: Engine,
    settings: Settings,
    model: PropensityModel | None,
    version: str | None,
    folder: Path,
) -> None:
    with read_only(engine).connect() as conn:
        customers = int(conn.execute(text("SELECT count(*) FROM customers")).scalar() or 0)
    if customers < child.CHILD_CUSTOMERS:
        write_serving_store(engine, settings, model, folder)
        # Only a build made here left its frames' memory in this heap. Trimming it holds
        # the allocator's lock: after a build in the child it stalled every request of
        # a 1M-customer worker for 0.7 s, for nothing to give back.
        release_memory()
        return
    # In a child process at low priority (service.child), so that the build's frames
    # leave with it and it takes only the CPU the workers leave.
    try:
        child.run(
            settings,
            "service.decision.state:build_in_child",
            version=version if model is not None else None,
            folder=str(folder),
        )
    except child.ChildStopped:
        raise
    except child.ChildFailed as exc:
        raise RuntimeError(f"building the serving store in a child process failed: {exc}") from None


def build_in_child(settings: Settings, *, version: str | None, folder: str) -> None:
    """The child process of :func:`_build_store`: :func:`write_serving_store` of model
    ``version`` (None: no model) into ``folder``."""
    from service.data.db import engine_from_settings

    engine = engine_from_settings(settings)
    try:
        model = None
        if version is not None:
            with unit_of_work(engine) as session:
                row = registry.get_version(session, version)
                session.expunge(row)
            with read_only(engine).connect() as conn:
                model = registry.load_model(conn, row, cache_dir=settings.artifacts_dir)
        write_serving_store(engine, settings, model, Path(folder))
    finally:
        engine.dispose()


def write_serving_store(
    engine: Engine, settings: Settings, model: PropensityModel | None, folder: Path
) -> None:
    """Read the bank, score every customer with ``model`` in one batch and write the
    serving store to ``folder`` (:func:`service.decision.store.write_store`)."""
    with read_only(engine).connect() as conn:
        built = columns.fingerprint(conn)
    data = load_bank(engine, reader="snapshot")
    catalogue = Catalogue.from_data(data)
    if settings.scoring_date:
        as_of = dt.date.fromisoformat(settings.scoring_date)
    else:
        as_of = default_as_of(data)
        if model is not None:
            as_of = max(as_of, model.as_of.date())
    with read_only(engine).connect() as conn:
        ids: dict[str, int] = {
            str(k): int(v)
            for k, v in conn.execute(text("SELECT external_id, id FROM customers")).all()
        }
    matrix, _ = _score_matrix(model, data, catalogue, as_of)
    profiles = None
    bands = None
    if model is not None:
        profiles = ProfileRates.measure(data, as_of=as_of, columns=model.profile_columns())
        bands = profiles.bands(data)
    columns.write_store(
        folder,
        data=data,
        db_ids=ids,
        matrix=matrix,
        as_of=as_of,
        catalogue=catalogue,
        popularity=_popularity(data, as_of),
        profiles=profiles,
        bands=bands,
        built=built,
        rules=None if model is None else model.rules,
    )


def _trim_heap() -> None:
    """Give the heap's free memory back to the system (``malloc_trim``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_memory() -> None:
    """Give the heap a build left free back to the system (glibc keeps it otherwise,
    and every worker that built would stay gigabytes larger)."""
    gc.collect()
    _trim_heap()


def _score_matrix(
    model: PropensityModel | None, data: BankData, catalogue: Catalogue, as_of: dt.date
) -> tuple[npt.NDArray[np.float64], dict[str, int]]:
    """Propensity per (customer, catalogue product); NaN where not a candidate.

    Without a model, every eligible product gets 0 (popularity decides; see
    :mod:`service.decision.engine`), and held or ineligible products stay NaN.
    """
    customer_ids = data.customers["customer_id"].astype(str).tolist()
    index = {cid: i for i, cid in enumerate(customer_ids)}
    matrix = np.full((len(customer_ids), len(catalogue.product_codes)), np.nan)
    if model is not None:
        scores = model.score(data, as_of=as_of, catalogue=catalogue)
        rows = scores["customer_id"].astype(str).map(index).to_numpy()
        cols = scores["product_code"].astype(str).map(catalogue.index).to_numpy()
        matrix[rows, cols] = scores["propensity"].to_numpy()
    else:
        from models.eligibility import eligible_matrix

        eligible = eligible_matrix(data, at=as_of, catalogue=catalogue)
        matrix[np.asarray(eligible, dtype=bool)] = 0.0
    return matrix, index


def customer_states(data: BankData) -> dict[str, CustomerState]:
    """Every customer's :class:`CustomerState`, built in one pass over the frames."""
    customers = data.customers
    attributes = list(data.attribute_kinds)
    adoptions: dict[str, list[Adoption]] = defaultdict(list)
    frame = data.adoptions
    for cid, code, adopted, closed in zip(
        frame["customer_id"].astype(str),
        frame["product_code"].astype(str),
        frame["adopted_at"],
        frame["closed_at"],
        strict=True,
    ):
        adoptions[cid].append(Adoption(code, adopted, None if pd.isna(closed) else closed))
    outcomes: dict[str, list[OfferOutcome]] = defaultdict(list)
    if data.outcomes is not None:
        for cid, code, outcome, at in zip(
            data.outcomes["customer_id"].astype(str),
            data.outcomes["product_code"].astype(str),
            data.outcomes["outcome"].astype(str),
            data.outcomes["occurred_at"],
            strict=True,
        ):
            outcomes[cid].append(OfferOutcome(code, outcome, at))
    states: dict[str, CustomerState] = {}
    columns = [
        customers[c] for c in ("customer_id", "segment", "branch_id", "joined_at", "birth_date")
    ]
    values = [customers[a].tolist() for a in attributes]  # .iloc per value took seconds
    for i, (cid, segment, branch, joined, birth) in enumerate(zip(*columns, strict=True)):
        cid = str(cid)
        states[cid] = CustomerState(
            customer_id=cid,
            segment=None if pd.isna(segment) else str(segment),
            branch_id=None if pd.isna(branch) else str(branch),
            joined_at=None if pd.isna(joined) else joined,
            birth_date=None if pd.isna(birth) else birth,
            attributes={a: _scalar(v[i]) for a, v in zip(attributes, values, strict=True)},
            adoptions=tuple(adoptions.get(cid, ())),
            outcomes=tuple(outcomes.get(cid, ())),
        )
    return states


def read_customers(
    engine: Engine, snapshot: Snapshot, external_ids: list[str]
) -> dict[str, CustomerEntry]:
    """Read customers from the database and score them with the snapshot's model.

    Rows are cleaned as the batch load cleans them (:mod:`service.data.rows`).
    """
    audit = RowAudit("customer")
    try:
        with read_only(engine).connect() as conn:
            return _read_customers(conn, snapshot, external_ids, audit)
    finally:
        audit.close()


def _read_customers(
    conn: Connection, snapshot: Snapshot, external_ids: list[str], audit: RowAudit
) -> dict[str, CustomerEntry]:
    dialect = conn.dialect.name
    kinds = bank_rows.read_attribute_kinds(conn, audit)
    records = conn.execute(
        text(
            bank_rows.customer_query(dialect, with_id=True) + " WHERE external_id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": external_ids},
    ).all()
    if not records:
        return {}
    adoption_rows = conn.execute(
        text(
            f"SELECT c.external_id, p.code, {bank_rows.date_text('a.adopted_at', dialect)}, "
            f"{bank_rows.date_text('a.closed_at', dialect)} FROM adoptions a "
            "JOIN customers c ON c.id = a.customer_id JOIN products p ON p.id = a.product_id "
            "WHERE c.external_id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": external_ids},
    ).all()
    outcome_rows = conn.execute(
        text(
            # Customer -> decisions -> offers -> outcomes, each step by an index.
            "SELECT c.external_id, p.code, oo.outcome, oo.created_at FROM customers c "
            "JOIN decisions d ON d.customer_id = c.id JOIN offers o ON o.decision_id = d.id "
            "JOIN offer_outcomes oo ON oo.offer_id = o.id "
            "JOIN products p ON p.id = o.product_id WHERE c.external_id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": external_ids},
    ).all()
    adoptions: dict[str, list[Adoption]] = defaultdict(list)
    for cid, code, adopted, closed in adoption_rows:
        dates = bank_rows.adoption_dates(adopted, closed, audit, key=f"{cid}/{code}")
        if dates is not None:
            adoptions[cid].append(Adoption(code, *dates))
    outcomes: dict[str, list[OfferOutcome]] = defaultdict(list)
    for cid, code, outcome, at in outcome_rows:
        # Naive UTC, as the batch path reads them (service.data.bank.read_outcomes).
        utc = _aware(at).astimezone(dt.UTC).replace(tzinfo=None)
        outcomes[cid].append(OfferOutcome(code, outcome, utc))
    out: dict[str, CustomerEntry] = {}
    for db_id, *record in records:
        cid, segment, branch, joined, birth, attributes = bank_rows.customer_record(
            record, kinds, audit
        )
        state = CustomerState(
            customer_id=cid,
            segment=segment,
            branch_id=branch,
            joined_at=joined,
            birth_date=birth,
            attributes={name: attributes.get(name) for name in kinds},
            adoptions=tuple(adoptions.get(cid, ())),
            outcomes=tuple(outcomes.get(cid, ())),
        )
        row, scored_as_of = _score_one(snapshot, state)
        profiles = snapshot.profiles
        bands = None if profiles is None else profiles.bands_of(state)
        out[cid] = CustomerEntry(int(db_id), state, row, scored_as_of, bands=bands)
    return out


def _score_one(
    snapshot: Snapshot, state: CustomerState
) -> tuple[npt.NDArray[np.float64], pd.Timestamp]:
    """One customer's propensities, as of the snapshot's day or, when the customer has
    adoptions or offer outcomes after it (recorded since), the day after the latest, so
    they are seen. Every product the customer holds open is never a candidate, whatever
    its date."""
    catalogue = snapshot.catalogue
    row = np.full(len(catalogue.product_codes), np.nan)
    as_of = pd.Timestamp(snapshot.as_of)
    days = [pd.Timestamp(a.adopted_at) for a in state.adoptions]
    days += [pd.Timestamp(o.occurred_at).floor("D") for o in state.outcomes]
    latest = max(days, default=None)
    if latest is not None and latest >= as_of:
        as_of = latest + pd.Timedelta(days=1)
    if snapshot.model is not None:
        for score in snapshot.model.score_customer(state, as_of=as_of, catalogue=catalogue):
            row[catalogue.index[score.product_code]] = score.propensity
    else:
        from models.eligibility import eligible_products

        for code in eligible_products(state, catalogue, as_of):
            row[catalogue.index[code]] = 0.0
    for adoption in state.adoptions:
        if adoption.closed_at is None and adoption.product_code in catalogue.index:
            row[catalogue.index[adoption.product_code]] = np.nan
    return row, as_of


def _popularity(data: BankData, as_of: dt.date) -> dict[str | None, Counter[str]]:
    """Adoptions per product over the last year, per segment and overall (key None)."""
    frame = data.adoptions
    cutoff = pd.Timestamp(as_of)
    recent = frame.loc[
        (frame["adopted_at"] < cutoff) & (frame["adopted_at"] >= cutoff - pd.Timedelta(days=365))
    ]
    segments = data.customers.set_index("customer_id")["segment"]
    recent = recent.assign(segment=recent["customer_id"].map(segments))
    out: dict[str | None, Counter[str]] = {
        None: Counter(recent["product_code"].astype(str).tolist())
    }
    for segment, group in recent.groupby("segment", dropna=True):
        out[str(segment)] = Counter(group["product_code"].astype(str).tolist())
    return out


def _max_event(engine: Engine) -> int:
    with read_only(engine).connect() as conn:
        return int(
            conn.execute(text("SELECT coalesce(max(id), 0) FROM change_events")).scalar() or 0
        )


def _planner(conn: Connection, *statements: str) -> None:
    """Run planner settings on ``conn``'s transaction through the driver (``conn`` may
    stream its results, which a ``SET`` cannot go through)."""
    raw: Any = conn.connection.driver_connection
    for statement in statements:
        raw.execute(statement)


def _posix(value: float | dt.datetime | str) -> float:
    return value if isinstance(value, float) else _aware(value).timestamp()


def _aware(value: dt.datetime | str) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _scalar(value: Any) -> float | int | str | None:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        return value.item()  # type: ignore[no-any-return]
    return value  # type: ignore[no-any-return]
