"""Every customer's contact history in a worker, packed: one ``bytes`` record each.

The contact policy needs, per customer, when each product was offered (the frequency
cap), the last decline of each product (the cooldown) and the last detractor answer.
:class:`ContactBook` holds exactly that for a million customers in a few hundred
bytes each, where a :class:`~service.decision.policy.ContactHistory` per customer took
well over a kilobyte in Python objects (see ``bench/contacts.py``).

A customer's record (native byte order, standard sizes)::

    head    oldest, newest (float64 POSIX seconds over every entry),
            offers held, trim_at (uint32)
    stamps  float64 per offer: when it was made
    codes   uint16 per offer: the product (an index into the book's code table);
            the top bit says the id below is text, not a UUID
    ids     16 bytes per offer: the offer's UUID; or a short id's UTF-8 (length first,
            zero padded), or 0xFF and a 120-bit digest of a longer one
    marks   (float64, uint16) per product last declined, and code 0xFFFF for the last
            detractor answer

Times are kept as float64 POSIX seconds, as ``ContactHistory`` keeps offers: between
1970 and 2100 a float64 second count resolves better than a microsecond, so two
datetimes compare as their timestamps do and every window behaves to the microsecond
as it did. An offer's id is kept while its entry is (so an event applied twice, or an
offer read at start-up and seen again in the change log, counts once); once an entry
is older than every window a duplicate of it could arrive only with the same old
instant, outside every window too, so forgetting both loses nothing.

The records are immutable: a change builds the customer's new record and swaps it
in under the book's lock, so a decision reads a consistent record without locking,
and a request thread and the change-log poll adding offers of one customer at once
lose neither. The book's dict maps ``str`` to ``bytes``, atomic values only: the
garbage collector never tracks it, whatever its size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import operator
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.decision.policy import HISTORY_TRIM, Policy

_HEAD = struct.Struct("=ddII")
_HEAD_SIZE = _HEAD.size  # 24
_ENDS = struct.Struct("=dd")  # oldest, newest
_FIRST = struct.Struct("=ddIIdH")  # the head and stamp and code of a first offer
_STAMP = struct.Struct("=d")
_CODE = struct.Struct("=H")
_EMPTY = _HEAD.pack(float("inf"), -float("inf"), 0, HISTORY_TRIM)
_OFFER_SIZE = 8 + 2 + 16
_MARK = struct.Struct("=dH")
_MARK_SIZE = _MARK.size  # 10
_MARK_ROW = np.dtype([("at", "=f8"), ("code", "=u2")])
"""A mark as NumPy packs it: the bytes of :data:`_MARK`."""
_ID_SIZE = 16
_TEXT_ID = 0x8000
"""Top bit of an offer's code: its id slot holds text (or a digest), not a UUID."""
_CODE_MASK = 0x7FFF
_DETRACTOR = 0xFFFF
"""The mark code of the last detractor answer."""
MAX_CODES = _CODE_MASK + 1
"""Distinct product codes a book can name."""
LOAD_CHUNK = 4096
"""Customers loaded per hold of the lock at start-up (a fraction of a millisecond)."""
PASS_CHUNK = 4096
"""Customers per chunk of a sweep pass's list (see :class:`ContactBook`)."""
SWEEP_SLICE = 256
"""Customers a sweep examines per hold of the lock (about 0.1 ms), and what a serving
worker sweeps at a time on its event loop between requests (see
:func:`service.app._sweep_history`)."""


def _offer_key(offer_id: str) -> tuple[bytes, int]:
    """The 16 bytes an offer id is held as, and the code flag saying how to read them.

    The server's ids are lowercase UUIDs (36 characters), held as their 16 bytes; any
    other id is held as its UTF-8 if it fits in 15 bytes, else as a digest (offered to
    ``offers`` readers as ``#`` and the digest's hex).
    """
    if len(offer_id) == 36 and offer_id[8] == offer_id[13] == offer_id[18] == offer_id[23] == "-":
        compact = offer_id.replace("-", "")
        if len(compact) == 32 and (offer_id.islower() or offer_id == offer_id.lower()):
            try:
                return bytes.fromhex(compact), 0
            except ValueError:
                pass  # not hex: held as text below
    raw = offer_id.encode()
    if len(raw) < _ID_SIZE:
        return bytes((len(raw),)) + raw + bytes(_ID_SIZE - 1 - len(raw)), _TEXT_ID
    return b"\xff" + hashlib.blake2b(raw, digest_size=_ID_SIZE - 1).digest(), _TEXT_ID


def _offer_id(key: bytes, flag: int) -> str:
    """The id :func:`_offer_key` made ``key`` from (a digest for long non-UUID ids)."""
    if not flag:
        h = key.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if key[0] == 0xFF:
        return "#" + key[1:].hex()
    return key[1 : 1 + key[0]].decode()


class _Record:
    """One record unpacked into its sections, for changing it (reading needs none).

    ``oldest`` and ``newest`` bound every entry's instant (exact after an add or a
    trim; a decline replaced by a later one may leave ``oldest`` below the oldest
    entry, which only makes the next sweep look at the record again).
    """

    __slots__ = ("codes", "ids", "marks", "n", "newest", "oldest", "stamps", "trim_at")

    def __init__(self, record: bytes) -> None:
        self.oldest, self.newest, n, self.trim_at = _HEAD.unpack_from(record)
        self.n = n
        codes_at = _HEAD_SIZE + 8 * n
        ids_at = codes_at + 2 * n
        marks_at = ids_at + _ID_SIZE * n
        self.stamps = record[_HEAD_SIZE:codes_at]
        self.codes = record[codes_at:ids_at]
        self.ids = record[ids_at:marks_at]
        self.marks = record[marks_at:]

    def bound(self) -> None:
        """Set ``oldest`` and ``newest`` from the entries held (after dropping some;
        call only when not :meth:`empty`)."""
        stamps = [*memoryview(self.stamps).cast("d")]
        stamps += [stamp for stamp, _ in _MARK.iter_unpack(self.marks)]
        self.oldest, self.newest = min(stamps), max(stamps)

    def empty(self) -> bool:
        return not self.n and not self.marks

    def pack(self) -> bytes:
        head = _HEAD.pack(self.oldest, self.newest, self.n, self.trim_at)
        return b"".join((head, self.stamps, self.codes, self.ids, self.marks))


class Contacts:
    """One customer's contact history, read from and written to its book.

    What ``book[customer]`` and ``book.get(customer)`` give: the methods and attributes
    of :class:`~service.decision.policy.ContactHistory` that serving uses, over the
    customer's packed record. It holds no state of its own (every call reads the
    record as it is now), so it is cheap to make and never stale.
    """

    __slots__ = ("_book", "customer")

    def __init__(self, book: ContactBook, customer: str) -> None:
        self._book = book
        self.customer = customer

    # ------------------------------------------------------------------ writing

    def add_offer(self, offer_id: str, product_code: str, at: dt.datetime) -> None:
        self._book._add_offer(self.customer, at.timestamp(), product_code, offer_id)

    def add_offer_at(self, offer_id: str, product_code: str, stamp: float) -> None:
        """:meth:`add_offer` with the time as POSIX seconds."""
        self._book._add_offer(self.customer, stamp, product_code, offer_id)

    def add_offers_at(self, offers: Iterable[tuple[str, str, float]]) -> None:
        """Add many offers at once: ``(offer id, product code, POSIX seconds)`` triples
        (the offers of one decision: one new record instead of one per offer)."""
        self._book._add_offers(self.customer, offers)

    def add_offers(self, product_code: str, offers: Sequence[tuple[float, str]]) -> None:
        """Add many offers of one product at once: ``(POSIX seconds, offer id)`` pairs
        (reading the history at start-up). As read from the database they are all
        inside the windows: no trim before the history has doubled."""
        self._book._add_offers(
            self.customer, [(key, product_code, stamp) for stamp, key in offers], loaded=True
        )

    def add_decline(self, product_code: str, at: dt.datetime) -> None:
        self._book._mark(self.customer, product_code, at.timestamp())

    def add_detractor(self, at: dt.datetime) -> None:
        self._book._mark(self.customer, None, at.timestamp())

    def forget_before(self, cutoff: dt.datetime) -> None:
        """Drop offers made before ``cutoff`` (declines and detractor answers stay), and
        put the next trim off until the offers held have doubled (as
        :meth:`~service.decision.policy.ContactHistory.forget_before`)."""
        self._book._forget(self.customer, cutoff.timestamp(), marks=False, retrim=True)

    # ------------------------------------------------------------------ reading

    @property
    def offers(self) -> OfferIds:
        """The ids of the offers held (``len`` reads one field; iterating decodes)."""
        return OfferIds(self._book._records.get(self.customer))

    @property
    def trim_at(self) -> int:
        """Offers held past which the next :meth:`forget_before` is due."""
        record = self._book._records.get(self.customer)
        return HISTORY_TRIM if record is None else int(_HEAD.unpack_from(record)[3])

    @property
    def detractor_at(self) -> dt.datetime | None:
        """When the customer last answered as a detractor (UTC), if ever held."""
        record = self._book._records.get(self.customer)
        if record is None:
            return None
        stamp = _mark_of(record, _DETRACTOR)
        return None if stamp is None else dt.datetime.fromtimestamp(stamp, dt.UTC)

    @property
    def declines(self) -> dict[str, dt.datetime]:
        """Product code -> when it was last declined (UTC)."""
        record = self._book._records.get(self.customer)
        names = self._book._names
        return {
            names[code]: dt.datetime.fromtimestamp(stamp, dt.UTC)
            for stamp, code in _marks(record)
            if code != _DETRACTOR
        }

    def offers_since(self, product_code: str, since: dt.datetime) -> int:
        """Offers of ``product_code`` made at or after ``since``."""
        record = self._book._records.get(self.customer)
        code = self._book._code_ids.get(product_code)
        if record is None or code is None:
            return 0
        n = _HEAD.unpack_from(record)[2]
        limit = since.timestamp()
        return sum(
            1
            for stamp, c in zip(_stamps(record, n), _codes(record, n), strict=True)
            if c & _CODE_MASK == code and stamp >= limit
        )

    def capped(self, product_code: str, since: dt.datetime, cap: int) -> bool:
        """Whether ``product_code`` was offered ``cap`` times or more since ``since``."""
        record = self._book._records.get(self.customer)
        code = self._book._code_ids.get(product_code)
        if record is None or code is None:
            return False
        n = _HEAD.unpack_from(record)[2]
        held = sum(1 for c in _codes(record, n) if c & _CODE_MASK == code)
        return held > 0 and held >= cap and self.offers_since(product_code, since) >= cap

    def blocked(self, now: dt.datetime, policy: Policy) -> dict[str, str]:
        """Products the contact policy holds back at ``now``, and why (see
        :meth:`~service.decision.policy.ContactRecord.blocked`)."""
        record = self._book._records.get(self.customer)
        return {} if record is None else _blocked(record, self._book._names, now, policy)


class OfferIds:
    """The ids of one customer's offers held: sized, iterable, searchable."""

    __slots__ = ("_record",)

    def __init__(self, record: bytes | None) -> None:
        self._record = record

    def __len__(self) -> int:
        return 0 if self._record is None else int(_HEAD.unpack_from(self._record)[2])

    def __iter__(self) -> Iterator[str]:
        if self._record is None:
            return
        held = _Record(self._record)
        for k, code in enumerate(memoryview(held.codes).cast("H")):
            yield _offer_id(held.ids[_ID_SIZE * k : _ID_SIZE * (k + 1)], code & _TEXT_ID)

    def __contains__(self, offer_id: object) -> bool:
        if self._record is None or not isinstance(offer_id, str):
            return False
        key, flag = _offer_key(offer_id)
        return _holds(self._record, int(_HEAD.unpack_from(self._record)[2]), key, flag)


def _holds(record: bytes, n: int, key: bytes, flag: int) -> bool:
    """Whether the record (holding ``n`` offers) holds the offer ``key`` (with its
    code flag): a search of the ids section, in C."""
    codes_at = _HEAD_SIZE + 8 * n
    ids_at = codes_at + 2 * n
    marks_at = ids_at + _ID_SIZE * n
    at = record.find(key, ids_at, marks_at)
    while at >= 0:
        k, misaligned = divmod(at - ids_at, _ID_SIZE)
        if not misaligned and _CODE.unpack_from(record, codes_at + 2 * k)[0] & _TEXT_ID == flag:
            return True
        at = record.find(key, at + 1, marks_at)
    return False


def _marks(record: bytes | None) -> Iterator[tuple[float, int]]:
    if record is None:
        return iter(())
    n = _HEAD.unpack_from(record)[2]
    return _MARK.iter_unpack(memoryview(record)[_HEAD_SIZE + _OFFER_SIZE * n :])


def _mark_of(record: bytes, code: int) -> float | None:
    n = _HEAD.unpack_from(record)[2]
    at = _HEAD_SIZE + _OFFER_SIZE * n
    if at == len(record):
        return None  # the usual case: no decline, no detractor
    for stamp, mark in _MARK.iter_unpack(memoryview(record)[at:]):
        if mark == code:
            return float(stamp)
    return None


def _blocked(record: bytes, names: list[str], now: dt.datetime, policy: Policy) -> dict[str, str]:
    """Products held back at ``now`` by the decline cooldown or the frequency cap.

    The windows' bounds are worked out only when the record could hold something
    back: most customers hold fewer offers of any one product than the cap, and no
    decline.
    """
    oldest, newest, n, _ = _HEAD.unpack_from(record)
    blocked: dict[str, str] = {}
    cap = policy.frequency_cap
    if n >= cap:
        codes = _codes(record, n)
        counts: dict[int, int] = {}
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
        if len(counts) > 1 and any(code & _TEXT_ID for code in counts):
            merged: dict[int, int] = {}  # ids held as text beside UUIDs
            for code, count in counts.items():
                merged[code & _CODE_MASK] = merged.get(code & _CODE_MASK, 0) + count
            counts = merged
        if cap > 0 and max(counts.values()) >= cap:
            since = (now - dt.timedelta(days=policy.frequency_window_days)).timestamp()
            if newest < since:
                counts = {}
            elif oldest < since:
                counts = {}
                for stamp, code in zip(_stamps(record, n), codes, strict=True):
                    if stamp >= since:
                        counts[code & _CODE_MASK] = counts.get(code & _CODE_MASK, 0) + 1
        if cap <= 0 or max(counts.values(), default=0) >= cap:
            for code, count in counts.items():
                if count >= cap:
                    blocked[names[code & _CODE_MASK]] = "frequency_cap"
    marks_at = _HEAD_SIZE + _OFFER_SIZE * n
    if marks_at < len(record):
        since = (now - dt.timedelta(days=policy.decline_cooldown_days)).timestamp()
        for stamp, code in _MARK.iter_unpack(record[marks_at:]):
            if code != _DETRACTOR and stamp >= since:
                blocked[names[code]] = "declined_recently"
    return blocked


_customer = operator.itemgetter(0)
_SHORT = 64
_CODES = [struct.Struct(f"={k}H") for k in range(_SHORT)]
_STAMPS = [struct.Struct(f"={k}d") for k in range(_SHORT)]


def _codes(record: bytes, n: int) -> tuple[int, ...]:
    """The codes of a record's ``n`` offers."""
    layout = _CODES[n] if n < _SHORT else struct.Struct(f"={n}H")
    return layout.unpack_from(record, _HEAD_SIZE + 8 * n)


def _stamps(record: bytes, n: int) -> tuple[float, ...]:
    """When a record's ``n`` offers were made."""
    layout = _STAMPS[n] if n < _SHORT else struct.Struct(f"={n}d")
    return layout.unpack_from(record, _HEAD_SIZE)


class ContactBook:
    """Every customer's contact history: a drop-in for ``defaultdict(ContactHistory)``.

    ``book[customer]`` gives the customer's :class:`Contacts` (a record is made by the
    first thing added, so a customer only looked up is not held), ``book.get(customer)``
    gives them or None when nothing is held; ``in`` and ``len`` count customers held (a
    customer whose offers :meth:`Contacts.forget_before` trimmed all away is held, empty,
    until the next sweep). :meth:`sweep` drops what every policy window has left behind.
    """

    __slots__ = (
        "_code_ids",
        "_cursor",
        "_fresh",
        "_lock",
        "_names",
        "_next",
        "_pending",
        "_records",
    )

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        self._names: list[str] = []
        """Product code by index (append-only: readers index it without the lock)."""
        self._code_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        # The sweep's passes walk the customers in the order they were first held, not a
        # copy of the dict's keys (a tuple of a million took 18 ms holding the
        # interpreter). Only the sweep drops a customer (see _forget_locked), so each is
        # in exactly one of these, once. They are tuples of PASS_CHUNK customers, which
        # the collector stops tracking at its first look: a list of a million would add
        # 14 ms to every full collection.
        self._pending: list[tuple[str, ...]] = []
        """The pass under way: its customers, chunk by chunk (a chunk read is emptied)."""
        self._cursor = (0, 0)
        """Where the pass goes on: a chunk of :attr:`_pending` and a place in it."""
        self._next: list[tuple[str, ...]] = []
        """The next pass: this pass's customers kept so far and those held since."""
        self._fresh: list[str] = []
        """The latest of them, until there are :data:`PASS_CHUNK` to make a chunk."""

    def __getitem__(self, customer: str) -> Contacts:
        return Contacts(self, customer)

    def get(self, customer: str, default: None = None) -> Contacts | None:
        return Contacts(self, customer) if customer in self._records else default

    def __contains__(self, customer: object) -> bool:
        return customer in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def nbytes(self) -> int:
        """Bytes held by the records (their payload: what grows with offers)."""
        return sum(len(record) for record in list(self._records.values()))

    def load_offers(self, rows: Iterable[tuple[str, str, str, float]]) -> None:
        """Add offers read at start-up: ``(customer, product code, offer id, POSIX
        seconds)`` rows, each customer's together (ordered by customer). One record is
        built per customer, where :meth:`Contacts.add_offers` builds one per product;
        as there, the next trim waits until a customer's offers have doubled."""
        for customer, group in itertools.groupby(rows, key=_customer):
            self._add_offers(
                customer,
                [(offer_id, code, stamp) for _, code, offer_id, stamp in group],
                loaded=True,
            )

    def load_marks(self, rows: Iterable[tuple[str, str | None, float]]) -> None:
        """Add declines read at start-up, ``(customer, product code, POSIX seconds)``
        rows (product None: a detractor answer), each customer's together: one record
        change per customer, where :meth:`Contacts.add_decline` makes one per row (and
        copies the customer's record each time)."""
        for customer, group in itertools.groupby(rows, key=_customer):
            latest: dict[str | None, float] = {}
            for _, code, stamp in group:
                if stamp > latest.get(code, -float("inf")):
                    latest[code] = stamp
            self._marks(customer, latest)

    def load_packed(
        self,
        customers: Sequence[str],
        starts: Sequence[int],
        stamps: bytes | memoryview,
        codes: Sequence[str],
        product: bytes | memoryview,
        keys: bytes | memoryview,
    ) -> None:
        """Add offers read at start-up in bulk, already packed: customer ``i``'s offers
        are ``starts[i]`` to ``starts[i + 1]`` of ``stamps`` (native float64 POSIX
        seconds), ``product`` (native uint16 indexes into ``codes``) and ``keys`` (the
        16 bytes of each offer's lowercase UUID id). The same records as
        :meth:`load_offers` of the same rows, made with a few slices per customer
        instead of Python work per offer. Each customer's offers must be distinct and
        the customers distinct (as read from the offers table); a customer already held
        is added offer by offer, as :meth:`load_offers` would. The three columns may be
        views (of bytes) of the caller's arrays: each record copies its slices.
        """
        table = np.array([self._code_id(code) for code in codes], dtype=np.uint16)
        ours = np.frombuffer(product, dtype=np.uint16)
        # The book's own code for each offer (never _TEXT_ID: the ids are UUIDs), in one
        # array operation (a generator over 10M offers took 0.7 s of a start-up).
        packed = table[ours].tobytes() if len(codes) else b""
        bounds = list(starts)
        records = self._records
        again: list[int] = []  # customers held already: added offer by offer below
        for first in range(0, len(customers), LOAD_CHUNK):
            last = min(first + LOAD_CHUNK, len(customers))
            with self._lock:
                for i in range(first, last):
                    customer = customers[i]
                    start, end = bounds[i], bounds[i + 1]
                    n = end - start
                    if not n:
                        continue
                    if customer in records:
                        again.append(i)
                        continue
                    held = stamps[8 * start : 8 * end]
                    when = memoryview(held).cast("d")
                    records[customer] = b"".join(
                        (
                            _HEAD.pack(min(when), max(when), n, max(HISTORY_TRIM, 2 * n)),
                            held,
                            packed[2 * start : 2 * end],
                            keys[16 * start : 16 * end],
                        )
                    )
                    self._hold(customer)
        for i in again:
            self._add_offers(
                customers[i],
                [
                    (
                        _offer_id(bytes(keys[16 * k : 16 * k + 16]), 0),
                        codes[int(ours[k])],
                        _STAMP.unpack_from(stamps, 8 * k)[0],
                    )
                    for k in range(bounds[i], bounds[i + 1])
                ],
                loaded=True,
            )

    def load_packed_marks(
        self,
        customers: Sequence[str],
        starts: Sequence[int],
        stamps: npt.NDArray[np.float64],
        codes: Sequence[str],
        product: npt.NDArray[np.integer[Any]],
    ) -> None:
        """Add declines read at start-up in bulk, already reduced to each product's
        latest: customer ``i``'s are ``starts[i]`` to ``starts[i + 1]`` of ``stamps``
        (POSIX seconds) and ``product`` (indexes into ``codes``), one per product. The
        same records as :meth:`load_marks` of the declines they were reduced from, made
        with a few slices per customer instead of a dict and a record rebuilt per
        customer (5 s of a start-up for 1.84M declines). The customers must be distinct;
        one whose record holds marks already is added as :meth:`load_marks` would.
        """
        table = np.array([self._code_id(code) for code in codes], dtype=np.uint16)
        marks = np.empty(len(stamps), dtype=_MARK_ROW)
        marks["at"] = stamps
        marks["code"] = table[product] if len(codes) else 0
        packed = marks.tobytes()
        bounds = list(starts)
        # Each customer's earliest and latest instant, for the head.
        edges = np.asarray(bounds, dtype=np.intp)
        held = np.flatnonzero(edges[1:] > edges[:-1])
        lows, highs = np.zeros(len(customers)), np.zeros(len(customers))
        if len(held):
            lows[held] = np.minimum.reduceat(stamps[: bounds[-1]], edges[held])
            highs[held] = np.maximum.reduceat(stamps[: bounds[-1]], edges[held])
        low, high = lows.tolist(), highs.tolist()
        records = self._records
        again: list[int] = []  # customers holding marks already: merged as load_marks does
        for first in range(0, len(customers), LOAD_CHUNK):
            last = min(first + LOAD_CHUNK, len(customers))
            with self._lock:
                for i in range(first, last):
                    start, end = bounds[i], bounds[i + 1]
                    if start == end:
                        continue
                    customer = customers[i]
                    record = records.get(customer)
                    if record is None:
                        records[customer] = (
                            _HEAD.pack(low[i], high[i], 0, HISTORY_TRIM)
                            + packed[_MARK_SIZE * start : _MARK_SIZE * end]
                        )
                        self._hold(customer)
                        continue
                    oldest, newest, n, trim_at = _HEAD.unpack_from(record)
                    if len(record) != _HEAD_SIZE + _OFFER_SIZE * n:
                        again.append(i)
                        continue
                    records[customer] = b"".join(
                        (
                            _HEAD.pack(min(oldest, low[i]), max(newest, high[i]), n, trim_at),
                            record[_HEAD_SIZE:],
                            packed[_MARK_SIZE * start : _MARK_SIZE * end],
                        )
                    )
        for i in again:
            self._marks(
                customers[i],
                {codes[int(product[k])]: float(stamps[k]) for k in range(bounds[i], bounds[i + 1])},
            )

    # ------------------------------------------------------------------ sweeping

    def sweep(self, now: dt.datetime, keep_seconds: float, *, budget: int | None = None) -> int:
        """Forget what is older than ``now`` less ``keep_seconds`` (pass the longest
        policy window): customers whose every entry is older are dropped, others lose
        their older entries. Returns how many customers were dropped.

        ``budget`` None examines every customer (about 0.4 s a million); a number
        examines at most that many, going on where the last call stopped, so that a
        poll can sweep a little at a time; a pass ends once it has seen every customer
        held when it began (:attr:`sweeping` is then False), and the next starts at the
        next call (customers first held meanwhile wait for it). The lock is held for
        :data:`SWEEP_SLICE` customers at a time. One caller at a time (the poll).
        """
        cutoff = (now - dt.timedelta(seconds=keep_seconds)).timestamp()
        if budget is None:
            # Every customer: the rest of a pass under way (else a whole pass), then a
            # whole pass.
            under_way = bool(self._pending)
            dropped = self._sweep(cutoff, None)
            return dropped + (self._sweep(cutoff, None) if under_way else 0)
        return self._sweep(cutoff, budget) if budget > 0 else 0

    @property
    def sweeping(self) -> bool:
        """Whether a sweep pass is under way (begun and not yet over)."""
        return bool(self._pending)

    def _hold(self, customer: str) -> None:
        """Put ``customer`` in the next pass (under the lock)."""
        fresh = self._fresh
        fresh.append(customer)
        if len(fresh) >= PASS_CHUNK:
            self._next.append(tuple(fresh))
            fresh.clear()

    def _sweep(self, cutoff: float, budget: int | None) -> int:
        """:meth:`sweep` within one pass: at most ``budget`` customers (None: to its end)."""
        records = self._records
        dropped = 0
        over = False
        while not over and (budget is None or budget > 0):
            with self._lock:
                if not self._pending:  # a pass begins
                    if self._fresh:
                        self._next.append(tuple(self._fresh))
                        self._fresh.clear()
                    self._pending, self._next, self._cursor = self._next, [], (0, 0)
                    if not self._pending:
                        break
                chunk_at, start = self._cursor
                chunk = self._pending[chunk_at]
                stop = min(len(chunk), start + SWEEP_SLICE)
                if budget is not None:
                    stop = min(stop, start + budget)
                    budget -= stop - start
                for customer in chunk[start:stop]:
                    record = records.get(customer)
                    if record is None:
                        continue
                    oldest, newest = _ENDS.unpack_from(record)
                    if newest < cutoff:
                        del records[customer]
                        dropped += 1
                    elif oldest < cutoff and not self._forget_locked(
                        customer, record, cutoff, marks=True, retrim=False
                    ):
                        dropped += 1
                    else:
                        self._hold(customer)
                if stop < len(chunk):
                    self._cursor = (chunk_at, stop)
                    continue
                self._pending[chunk_at] = ()  # read: the pass holds it no longer
                over = chunk_at + 1 == len(self._pending)
                if over:
                    self._pending, self._cursor = [], (0, 0)
                else:
                    self._cursor = (chunk_at + 1, 0)
        return dropped

    # ------------------------------------------------------------------ changing

    def _code_id(self, code: str) -> int:
        found = self._code_ids.get(code)
        if found is not None:
            return found
        if len(self._names) >= MAX_CODES:
            raise ValueError(f"a contact book names at most {MAX_CODES} product codes")
        self._names.append(code)
        self._code_ids[code] = len(self._names) - 1
        return len(self._names) - 1

    def _add_offer(self, customer: str, stamp: float, product_code: str, offer_id: str) -> None:
        """Add one offer unless held (the common case, made in a few C calls)."""
        key, flag = _offer_key(offer_id)
        with self._lock:
            code = self._code_ids.get(product_code)
            if code is None:
                code = self._code_id(product_code)
            record = self._records.get(customer)
            if record is None:
                self._records[customer] = (
                    _FIRST.pack(stamp, stamp, 1, HISTORY_TRIM, stamp, code | flag) + key
                )
                self._hold(customer)
                return
            oldest, newest, n, trim_at = _HEAD.unpack_from(record)
            if _holds(record, n, key, flag):
                return
            codes_at = _HEAD_SIZE + 8 * n
            ids_at = codes_at + 2 * n
            marks_at = ids_at + _ID_SIZE * n
            self._records[customer] = b"".join(
                (
                    _HEAD.pack(min(oldest, stamp), max(newest, stamp), n + 1, trim_at),
                    record[_HEAD_SIZE:codes_at],
                    _STAMP.pack(stamp),
                    record[codes_at:ids_at],
                    _CODE.pack(code | flag),
                    record[ids_at:marks_at],
                    key,
                    record[marks_at:],
                )
            )

    def _add_offers(
        self, customer: str, offers: Iterable[tuple[str, str, float]], *, loaded: bool = False
    ) -> None:
        """Add ``(offer id, product code, POSIX seconds)`` offers not held yet."""
        stamps: list[float] = []
        codes: list[int] = []
        ids: list[bytes] = []
        code_ids = self._code_ids
        with self._lock:
            record = self._records.get(customer)
            new = record is None
            if record is None:
                record = _EMPTY
            oldest, newest, n, trim_at = _HEAD.unpack_from(record)
            codes_at = _HEAD_SIZE + 8 * n
            ids_at = codes_at + 2 * n
            marks_at = ids_at + _ID_SIZE * n
            for offer_id, product_code, stamp in offers:
                key, flag = _offer_key(offer_id)
                if record.find(key, ids_at, marks_at) >= 0 and _holds(record, n, key, flag):
                    continue
                if key in ids and any(
                    held == key and code & _TEXT_ID == flag
                    for held, code in zip(ids, codes, strict=True)
                ):
                    continue  # twice in this batch
                code = code_ids.get(product_code)
                if code is None:
                    code = self._code_id(product_code)
                stamps.append(stamp)
                codes.append(code | flag)
                ids.append(key)
            if not stamps:
                return
            k = len(stamps)
            if loaded:
                trim_at = max(trim_at, 2 * (n + k))
            self._records[customer] = b"".join(
                (
                    _HEAD.pack(min(oldest, *stamps), max(newest, *stamps), n + k, trim_at),
                    record[_HEAD_SIZE:codes_at],
                    (_STAMPS[k] if k < _SHORT else struct.Struct(f"={k}d")).pack(*stamps),
                    record[codes_at:ids_at],
                    (_CODES[k] if k < _SHORT else struct.Struct(f"={k}H")).pack(*codes),
                    record[ids_at:marks_at],
                    *ids,
                    record[marks_at:],
                )
            )
            if new:
                self._hold(customer)

    def _mark(self, customer: str, product_code: str | None, stamp: float) -> None:
        """Keep ``stamp`` as the product's last decline (None: the last detractor
        answer) unless a later one is held."""
        self._marks(customer, {product_code: stamp})

    def _marks(self, customer: str, latest: dict[str | None, float]) -> None:
        """:meth:`_mark` of every ``product code -> stamp`` of ``latest`` at once."""
        with self._lock:
            wanted = {
                _DETRACTOR if code is None else self._code_id(code): stamp
                for code, stamp in latest.items()
            }
            record = self._records.get(customer)
            held = _Record(_EMPTY if record is None else record)
            marks = {code: stamp for stamp, code in _MARK.iter_unpack(held.marks)}
            for code, stamp in wanted.items():
                previous = marks.get(code)
                if previous is None:
                    held.oldest = min(held.oldest, stamp)
                elif stamp <= previous:
                    continue
                marks[code] = stamp
                held.newest = max(held.newest, stamp)
            held.marks = b"".join(_MARK.pack(stamp, code) for code, stamp in marks.items())
            self._records[customer] = held.pack()
            if record is None:
                self._hold(customer)

    def _forget(self, customer: str, cutoff: float, *, marks: bool, retrim: bool) -> None:
        with self._lock:
            record = self._records.get(customer)
            if record is not None:
                self._forget_locked(customer, record, cutoff, marks=marks, retrim=retrim)

    def _forget_locked(
        self, customer: str, record: bytes, cutoff: float, *, marks: bool, retrim: bool
    ) -> bool:
        """Drop offers (and with ``marks`` declines and detractor answers) older than
        ``cutoff``; with ``retrim`` put the next trim off until the offers double.
        Returns whether the customer is still held: with ``marks`` (only the sweep
        passes it) a customer left with nothing is dropped."""
        held = _Record(record)
        keep = [k for k, stamp in enumerate(memoryview(held.stamps).cast("d")) if stamp >= cutoff]
        if len(keep) < held.n:
            stamps, codes, ids = held.stamps, held.codes, held.ids
            held.stamps = b"".join(stamps[8 * k : 8 * k + 8] for k in keep)
            held.codes = b"".join(codes[2 * k : 2 * k + 2] for k in keep)
            held.ids = b"".join(ids[_ID_SIZE * k : _ID_SIZE * (k + 1)] for k in keep)
            held.n = len(keep)
        if marks and held.marks:
            held.marks = b"".join(
                _MARK.pack(stamp, code)
                for stamp, code in _MARK.iter_unpack(held.marks)
                if stamp >= cutoff
            )
        if retrim:
            held.trim_at = max(HISTORY_TRIM, 2 * held.n)
        if not held.empty():
            held.bound()
            self._records[customer] = held.pack()
            return True
        if marks:  # the sweep, which drops the customer from its passes too
            del self._records[customer]
            return False
        # Held on, empty, for the sweep to drop: a customer dropped here and held again
        # would be in its passes twice.
        self._records[customer] = _HEAD.pack(float("inf"), -float("inf"), 0, held.trim_at)
        return True
