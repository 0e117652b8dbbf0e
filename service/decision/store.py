"""The serving state of every customer in columns, written once per machine and
memory-mapped by every worker.

A worker used to hold each customer as Python objects (about 1 GB per 100k customers,
per worker). The store holds them as NumPy arrays in files under
``<data_dir>/serving/<key>/``: the external ids (sorted fixed-width bytes, found by
binary search), database ids, the propensities (float32, customers x catalogue
products, NaN where not a candidate), each customer's adoption sequence and profile
bands as an index into a small table of the distinct ones, and what it takes to rebuild
a :class:`~models.data.CustomerState` on demand (``explain``, refreshes): fixed
columns, typed attribute columns, adoptions and offer outcomes in CSR form.
``np.load(mmap_mode="r")`` maps the files, so the pages are shared by every worker of
the machine and a worker that (re)starts with a store present is ready in a second or
two.

``key`` is a digest of what the propensities depend on and no change event announces:
the model version and its bundle checksum, the catalogue, the attribute definitions and
the configured scoring day (:func:`store_key`). Customers change after a store is built
(pushed adoptions, outcomes, attributes, bulk imports): the store records a
:class:`Fingerprint` of the bank when it was read, and :func:`changes_since` says which
customers changed since (they are re-read into the worker's overlay), or that the store
must be built again (rows deleted, too many changes, adoptions closed with the change
log since pruned).

One process builds a key's store at a time (an ``fcntl`` lock beside it); the others
wait and map what it wrote. Files are written to a temporary folder, synced to disk and
renamed into place, so a store is complete or absent, after a crash of the machine too.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
from sqlalchemy import Connection, text

from models.data import NAT_NS, Adoption, BankData, CustomerState, OfferOutcome
from models.eligibility import Catalogue
from models.reasons import ProfileClaim, ProfileColumn, ProfileRates
from models.rules import REASON_MIN_CUSTOMERS, REASON_MIN_LIFT, RuleSet
from service.data.db import one_core
from service.data.tables import CUSTOMER_EVENTS
from service.decision.sharing import pace
from service.decision.spool import fsync_folder

log = logging.getLogger("nbo.serving")

FORMAT = 4
"""The layout of a store's files; a store of another format is built again. 2: the
distinct adoption sequences and profile bands in arrays, not in ``meta.json`` (parsing
28.8 MB of JSON at 1M customers was one call of 0.2-0.4 s holding the interpreter, while
a serving worker's requests waited to be answered). 3: each distinct sequence's reason
rules (finding them was 3.4 s of a worker's reload at 1M customers, 250k sequences).
4: the fingerprint holds the counters of ``bank_changes`` instead of table counts."""
META = "meta.json"
KEEP_STORES = 2
"""Stores of other keys kept after a build (the newest), for workers still on them."""
MAX_REREAD = 10_000
"""Changed customers a worker re-reads into its overlay when it maps a store; more, and
the store is built again (re-reading and re-scoring one customer costs about a ms)."""

FloatArray = npt.NDArray[np.floating[Any]]


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Fingerprint:
    """The bank as it stood when a store was read from it: enough to find what changed
    since with a few indexed queries (:func:`changes_since`)."""

    max_customer: int
    customers_updated: str | None
    """``max(customers.updated_at)`` as the database gave it (text)."""
    max_adoption: int
    max_outcome: int
    max_attribute_change: int
    watermark: int
    """The newest change event when the bank was read."""
    deleted: int
    """``bank_changes.deleted``: statements that deleted customers or adoptions or set
    an adoption's customer, product or day (-1: the row was missing)."""
    closed: int
    """``bank_changes.closed``: statements that updated adoptions (closing days)."""


def fingerprint(conn: Connection) -> Fingerprint:
    """The bank's :class:`Fingerprint` now: largest ids and ``updated_at`` from their
    indexes, and the counters the triggers of migration 0013 keep (on one core: see
    :func:`~service.data.db.one_core`)."""
    one_core(conn)
    max_customer, updated = conn.execute(
        text("SELECT coalesce(max(id), 0), max(updated_at) FROM customers")
    ).one()
    max_adoption = conn.execute(text("SELECT coalesce(max(id), 0) FROM adoptions")).scalar()
    max_outcome = conn.execute(text("SELECT coalesce(max(id), 0) FROM offer_outcomes")).scalar()
    max_change = conn.execute(text("SELECT coalesce(max(id), 0) FROM attribute_changes")).scalar()
    watermark = conn.execute(text("SELECT coalesce(max(id), 0) FROM change_events")).scalar()
    counters = conn.execute(text("SELECT deleted, closed FROM bank_changes WHERE id = 1")).first()
    if counters is None:
        # Someone deleted the row: no store can be checked, so every one is built again.
        log.warning("bank_changes holds no row: serving stores are built, not checked")
    deleted, closed = (-1, -1) if counters is None else (int(counters[0]), int(counters[1]))
    return Fingerprint(
        max_customer=int(max_customer),
        customers_updated=None if updated is None else _stamp_text(updated),
        max_adoption=int(max_adoption or 0),
        max_outcome=int(max_outcome or 0),
        max_attribute_change=int(max_change or 0),
        watermark=int(watermark or 0),
        deleted=deleted,
        closed=closed,
    )


def store_key(
    conn: Connection, *, version: str | None, checksum: str | None, scoring_date: str | None
) -> str:
    """The digest naming the store of the database ``conn`` reads (its URL, without
    password: two databases never share a store), the served model (``version`` with
    its bundle ``checksum``; None without a model), the catalogue and attribute
    definitions as stored now, and the configured ``scoring_date``."""
    products = conn.execute(
        text(
            "SELECT id, code, name, category, value, business_weight, active, min_age, "
            "max_age, segments, requires, excludes FROM products ORDER BY id"
        )
    ).all()
    kinds = conn.execute(text("SELECT name, kind FROM attribute_definitions ORDER BY name")).all()
    described = orjson.dumps(
        {
            "format": FORMAT,
            "database": conn.engine.url.render_as_string(hide_password=True),
            "version": version,
            "checksum": checksum,
            "scoring_date": scoring_date,
            "products": [[_plain(v) for v in row] for row in products],
            "kinds": [list(row) for row in kinds],
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(described).hexdigest()[:24]


def changes_since(
    conn: Connection, built: Fingerprint, *, limit: int = MAX_REREAD
) -> set[str] | None:
    """The external ids of customers changed since a store with fingerprint ``built``
    was read; None when the store cannot be brought up to date that way and must be
    built again.

    Changed: a newer ``updated_at`` (bulk imports), an attribute-history row, an
    adoption or offer outcome added since, or a change event after the store's
    watermark (pushed adoptions and customers; while the change log still holds them).
    Built again: rows were deleted, an old adoption was closed with the change log
    since pruned (nothing says whose), or more than ``limit`` customers changed.
    Customers added since are not listed: a worker reads an unknown customer on first
    use.

    Deleted rows and closings are told by the counters of ``bank_changes``
    (:class:`~service.data.tables.BankChanges`), not by counting the tables.
    """
    now = fingerprint(conn)  # which keeps the rest of the transaction on one core
    oldest = conn.execute(
        text("SELECT min(id) FROM change_events WHERE id > :w"), {"w": built.watermark}
    ).scalar()
    # Ids come from a sequence: the first one after the watermark is watermark + 1,
    # unless pruned (or rolled back, which reads as pruned: built again, to be safe).
    complete = oldest is None or int(oldest) == built.watermark + 1
    if not _counters_agree(now, built, complete=complete):
        return None
    queries: list[tuple[str, dict[str, Any]]] = [
        (
            "SELECT DISTINCT c.external_id FROM adoptions a JOIN customers c "
            "ON c.id = a.customer_id WHERE a.id > :m AND c.id <= :c",
            {"m": built.max_adoption, "c": built.max_customer},
        ),
        (
            "SELECT DISTINCT c.external_id FROM attribute_changes h JOIN customers c "
            "ON c.id = h.customer_id WHERE h.id > :m AND c.id <= :c",
            {"m": built.max_attribute_change, "c": built.max_customer},
        ),
        (
            "SELECT DISTINCT d.customer_external_id FROM offer_outcomes oo "
            "JOIN offers o ON o.id = oo.offer_id JOIN decisions d ON d.id = o.decision_id "
            "WHERE oo.id > :m",
            {"m": built.max_outcome},
        ),
    ]
    if built.customers_updated is not None:
        queries.append(
            (
                "SELECT external_id FROM customers WHERE updated_at > :u AND id <= :c",
                {"u": _stamp_param(conn, built.customers_updated), "c": built.max_customer},
            )
        )
    if complete:
        queries.append(
            (
                "SELECT DISTINCT customer_external_id FROM change_events WHERE id > :w "
                f"AND {CUSTOMER_EVENTS} AND customer_external_id IS NOT NULL",
                {"w": built.watermark},
            )
        )
    changed: set[str] = set()
    for query, params in queries:
        changed.update(
            str(row[0]) for row in conn.execute(text(query + f" LIMIT {limit + 1}"), params)
        )
        if len(changed) > limit:
            return None
    return changed


def _counters_agree(now: Fingerprint, built: Fingerprint, *, complete: bool) -> bool:
    """Whether nothing was deleted or moved since ``built``, and no adoption closed
    unless the change log since (``complete``) says whose."""
    if min(now.deleted, now.closed, built.deleted, built.closed) < 0:
        return False  # the counters' row was missing at one of the two reads
    return now.deleted == built.deleted and (now.closed == built.closed or complete)


def _stamp_text(value: Any) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def _stamp_param(conn: Connection, value: str) -> Any:
    # SQLite keeps the text it was given (compared as text); PostgreSQL a timestamp.
    return value if conn.dialect.name == "sqlite" else dt.datetime.fromisoformat(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class _Codes:
    """A column of small ints into ``values`` (-1: none)."""

    codes: npt.NDArray[np.int32]
    values: list[Any]


_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22
KEEP_CHUNK = 4 * 2**20
"""Bytes of a store read, locked or populated by one call (see
:meth:`ColumnStore.keep_in_memory`)."""


@functools.cache
def _libc() -> Any:
    """The C library's ``mlock``, ``munlock``, ``madvise`` and ``mincore``, typed (calls
    release the interpreter)."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Each takes an address and a length; madvise then its advice, mincore its vector.
    after: dict[str, list[Any]] = {
        "mlock": [],
        "munlock": [],
        "madvise": [ctypes.c_int],
        "mincore": [ctypes.c_void_p],
    }
    for name, rest in after.items():
        function = getattr(libc, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *rest]
    return libc


def _cached(path: Path) -> bool:
    """Whether every page of the file is in the page cache (``mincore`` over a read-only
    mapping of it; False when that cannot be told)."""
    size = path.stat().st_size
    if size == 0:
        return True
    pages = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
    with (
        path.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        view = np.frombuffer(mapped, dtype=np.uint8)
        told = _libc().mincore(view.__array_interface__["data"][0], size, pages.ctypes.data) == 0
        del view  # before the mapping closes
    return told and bool((pages & 1).all())


class ColumnStore:
    """One store, mapped: every customer's serving state by row (external ids sorted).

    Read-only and shared between threads. Rows are found with :meth:`find`; a row's
    propensities are a float32 view (:meth:`propensity`); :meth:`state` rebuilds the
    customer's :class:`~models.data.CustomerState` (a few tens of microseconds).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._mapped: list[np.ndarray[Any, Any]] = []
        self.kept = "mapped"
        """How its pages are held: see :meth:`keep_in_memory`."""
        meta = orjson.loads((folder / META).read_bytes())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder}: store format {meta.get('format')!r}, not {FORMAT}")
        self.fingerprint = Fingerprint(**meta["fingerprint"])
        self.as_of = dt.date.fromisoformat(meta["as_of"])
        self.catalogue = Catalogue.from_records(meta["catalogue"])
        self.popularity: dict[str | None, Counter[str]] = {
            key: Counter(counts) for key, counts in meta["popularity"]
        }
        self.profiles = None if meta["profiles"] is None else profiles_from_json(meta["profiles"])
        self.adoption_codes: list[str] = meta["adoption_codes"]
        self.band_table: list[tuple[int, ...]] = [
            tuple(b) for b in self._load("band_table").tolist()
        ]
        self.reasons: dict[str, Any] | None = meta["reasons"]
        """What the reason rules were found with (:func:`reason_terms`), None without."""
        if self.reasons is not None:
            self.reason_start = self._load("reason_start")
            self.reason_rule = self._load("reason_rule")
        self.attribute_names: list[str] = list(meta["attributes"])
        self.ids = self._load("ids")
        self.n = len(self.ids)
        self.db_ids = self._load("db_ids")
        self.propensities = self._load("propensities")
        self.sequence = self._load("sequence")
        self.band = self._load("band")
        self.segment = _Codes(self._load("segment"), meta["segments"])
        self.branch = _Codes(self._load("branch"), meta["branches"])
        self.joined = self._load("joined")
        self.birth = self._load("birth")
        self.attributes: list[np.ndarray[Any, Any] | _Codes] = []
        for i, values in enumerate(meta["attribute_values"]):
            column = self._load(f"attr_{i}")
            self.attributes.append(column if values is None else _Codes(column, values))
        self.adoption_start = self._load("adoption_start")
        self.adoption_product = self._load("adoption_product")
        self.adoption_at = self._load("adoption_at")
        self.adoption_closed = self._load("adoption_closed")
        self.outcome_codes: list[str] = meta["outcome_codes"]
        self.outcome_kinds: list[str] = meta["outcome_kinds"]
        self.outcome_start = self._load("outcome_start")
        self.outcome_product = self._load("outcome_product")
        self.outcome_kind = self._load("outcome_kind")
        self.outcome_at = self._load("outcome_at")
        self._width = self.ids.dtype.itemsize

    @functools.cached_property
    def sequences(self) -> list[tuple[str, ...]]:
        """The distinct adoption sequences, made on first use: a worker whose store holds
        the reason rules never needs them (and an activation only checking the store is
        there spares 0.2 s at 1M customers). Made in a Python loop over the arrays, not
        in one call, so a serving worker goes on answering meanwhile (see FORMAT)."""
        return _tuples(
            self._load("sequence_start"), self._load("sequence_codes"), self.adoption_codes
        )

    def _load(self, name: str) -> np.ndarray[Any, Any]:
        mapped = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        # A plain ndarray over the mapping: indexing np.memmap goes through Python.
        array: np.ndarray[Any, Any] = mapped.view(np.ndarray)
        self._mapped.append(array)
        return array

    def keep_in_memory(self, lock: bool = True) -> str:
        """Bring every page of the store into this process's memory now, and keep it
        there: ``"locked"`` (``mlock``: the kernel may not page it out), ``"populated"``
        (mapped now, but the kernel may reclaim pages left cold: ``lock`` off, or the
        lock refused) or ``"mapped"`` (neither was possible: pages come on first use).

        For a serving worker, called before the store serves. A decision reads a few
        pages of a random customer's rows, holding the interpreter: a page not mapped
        yet costs a page fault, and a page the kernel reclaimed meanwhile (a host with
        proactive reclaim pages out file pages left cold for seconds, and at a million
        customers a page of propensities is read every few seconds) costs a read from
        disk, while every other request waits. Done here, the faults are taken by the
        loading thread, without the interpreter (``read`` and ``ctypes`` release it):
        the files are read through first, so that what the mapping then takes is in the
        page cache, and they are locked (or populated) :data:`KEEP_CHUNK` bytes at a
        time, for each call holds the process's memory map, which a request allocating
        memory meanwhile may wait for. Locked pages count against ``RLIMIT_MEMLOCK``
        (``ulimit -l``) unless the process may lock memory (``CAP_IPC_LOCK``); a refused
        lock falls back to populating.
        """
        libc = _libc()
        buffer = bytearray(KEEP_CHUNK)
        for path in sorted(self.folder.glob("*.npy")):
            # A file the page cache holds whole (a store just built, or served by
            # another worker) is not read again: reading 264 MiB took 40 ms of CPU.
            with contextlib.suppress(OSError):
                if _cached(path):
                    continue
                with path.open("rb", buffering=0) as handle:
                    while handle.readinto(buffer):
                        pass
        how = "locked" if lock else "populated"
        for at, size in self._chunks():
            if how == "locked" and libc.mlock(at, size) != 0:
                how = "populated"
                log.warning(
                    "the serving store could not be locked in memory (mlock: %s); its "
                    "pages are mapped now but may be paged out when cold: raise the "
                    "process's locked-memory limit (ulimit -l) or give it CAP_IPC_LOCK",
                    os.strerror(ctypes.get_errno()),
                    extra={"store": self.folder.name, "megabytes": self.nbytes() // 2**20},
                )
            if how == "populated" and libc.madvise(at, size, _MADV_POPULATE_READ) != 0:
                how = "mapped"  # MADV_POPULATE_READ: Linux 5.14+
                break
        self.kept = how
        return how

    def let_go(self) -> None:
        """Give back this process's hold on the store's pages, :data:`KEEP_CHUNK` bytes
        a call without the interpreter: unlocked, and unmapped from the page tables
        (``MADV_DONTNEED``; the mapping stays valid, a later read maps the page again).

        For a replaced store, by the thread that swapped it out. Its mapping goes with
        the last reference to it, often dropped by a request still in flight, in the
        event loop: unmapping 264 MiB of locked pages there held the interpreter for
        over 100 ms, and even the pages only touched by requests cost a pause."""
        libc = _libc()
        for at, size in self._chunks():
            libc.munlock(at, size)  # also what a lock refused part-way had locked
            libc.madvise(at, size, _MADV_DONTNEED)
        self.kept = "mapped"

    def _chunks(self) -> Iterator[tuple[int, int]]:
        """The mapped arrays' memory as (address, bytes), :data:`KEEP_CHUNK` bytes at
        most, each from a page boundary (as ``madvise`` wants; ``mlock`` aligns itself)."""
        for array in self._mapped:
            if not array.nbytes:
                continue
            start = int(array.__array_interface__["data"][0])
            end = start + array.nbytes
            at = start - start % mmap.PAGESIZE
            while at < end:
                yield at, min(KEEP_CHUNK, end - at)
                at += KEEP_CHUNK

    def __len__(self) -> int:
        return self.n

    def find(self, external_id: str) -> int:
        """The customer's row, or -1 when the store does not hold them."""
        key = external_id.encode()
        if len(key) > self._width or not key or key[-1] == 0:
            return -1  # longer than any held id (or not representable): not held
        row = int(self.ids.searchsorted(key))
        if row < self.n and self.ids[row] == key:
            return row
        return -1

    def external_id(self, row: int) -> str:
        return bytes(self.ids[row]).decode()

    def external_ids(self) -> Iterator[str]:
        """Every held external id, in row order (decoded in chunks)."""
        for start in range(0, self.n, 65_536):
            for raw in self.ids[start : start + 65_536].tolist():
                yield raw.decode()

    def segment_of(self, row: int) -> str | None:
        value: str | None = _value(self.segment, row)
        return value

    def propensity(self, row: int) -> FloatArray:
        return self.propensities[row]  # type: ignore[no-any-return]

    def state(self, row: int) -> CustomerState:
        """The customer's state as the batch load read it (:func:`write_store`)."""
        attributes = {
            name: _value(column, row)
            for name, column in zip(self.attribute_names, self.attributes, strict=True)
        }
        start, end = int(self.adoption_start[row]), int(self.adoption_start[row + 1])
        codes = self.adoption_codes
        adoptions = tuple(
            Adoption(codes[p], pd.Timestamp(a), None if z == NAT_NS else pd.Timestamp(z))
            for p, a, z in zip(
                self.adoption_product[start:end].tolist(),
                self.adoption_at[start:end].tolist(),
                self.adoption_closed[start:end].tolist(),
                strict=True,
            )
        )
        start, end = int(self.outcome_start[row]), int(self.outcome_start[row + 1])
        outcomes = tuple(
            OfferOutcome(self.outcome_codes[p], self.outcome_kinds[k], pd.Timestamp(at))
            for p, k, at in zip(
                self.outcome_product[start:end].tolist(),
                self.outcome_kind[start:end].tolist(),
                self.outcome_at[start:end].tolist(),
                strict=True,
            )
        )
        joined, birth = int(self.joined[row]), int(self.birth[row])
        return CustomerState(
            customer_id=self.external_id(row),
            segment=_value(self.segment, row),
            branch_id=_value(self.branch, row),
            joined_at=None if joined == NAT_NS else pd.Timestamp(joined),
            birth_date=None if birth == NAT_NS else pd.Timestamp(birth),
            attributes=attributes,
            adoptions=adoptions,
            outcomes=outcomes,
        )

    def nbytes(self) -> int:
        """Bytes of the store's files (shared by every worker that maps them)."""
        return sum(p.stat().st_size for p in self.folder.iterdir())


def listed(values: npt.NDArray[Any], step: int = 8192) -> list[Any]:
    """``values.tolist()`` a slice at a time, for a worker that serves meanwhile: at
    once, a mapped array of 250k entries held the interpreter for 31 ms of a reload
    under load (its pages read meanwhile)."""
    found: list[Any] = []
    for start in range(0, len(values), step):
        pace()
        found.extend(values[start : start + step].tolist())
    return found


def _tuples(
    starts: npt.NDArray[np.int64], codes: npt.NDArray[np.int16], table: Sequence[str]
) -> list[tuple[str, ...]]:
    """The distinct adoption sequences (CSR form: sequence ``i`` is ``codes[starts[i] :
    starts[i + 1]]``, indexes into ``table``) as tuples of product codes."""
    found: list[tuple[str, ...]] = []
    bounds = listed(starts)
    flat = [table[c] for c in listed(codes)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        found.append(tuple(flat[start:end]))
    return found


def _value(column: np.ndarray[Any, Any] | _Codes, row: int) -> Any:
    if isinstance(column, _Codes):
        code = int(column.codes[row])
        return None if code < 0 else column.values[code]
    value = column[row].item()
    if isinstance(value, float) and value != value:
        return None
    return value


# --------------------------------------------------------------------------- writing


def write_store(
    folder: Path,
    *,
    data: BankData,
    db_ids: Mapping[str, int],
    matrix: npt.NDArray[np.float64],
    as_of: dt.date,
    catalogue: Catalogue,
    popularity: Mapping[str | None, Counter[str]],
    profiles: ProfileRates | None,
    bands: npt.NDArray[np.int16] | None,
    built: Fingerprint,
    rules: RuleSet | None = None,
) -> None:
    """Write the store of ``data`` to ``folder`` (created; must not exist).

    ``matrix`` holds the propensities and ``bands`` the profile bands, one row per row
    of ``data.customers``; customers without a database id in ``db_ids`` are left out.
    With the model's ``rules``, each distinct adoption sequence's reason rules
    (:meth:`~models.rules.RuleSet.reasons_for`, as indexes into ``rules.rules``) too.
    """
    folder.mkdir(parents=True)
    customers = data.customers
    cids = customers["customer_id"].astype(str).to_numpy()
    held = np.fromiter((c in db_ids for c in cids), dtype=bool, count=len(cids))
    encoded = np.array([c.encode() for c in cids[held]], dtype=bytes)
    if encoded.dtype.itemsize == 0:
        encoded = encoded.astype("S1")
    order = np.argsort(encoded, kind="stable")
    source = np.flatnonzero(held)[order]  # store row -> data.customers row
    n = len(source)
    frame = customers.iloc[source].reset_index(drop=True)
    ids = encoded[order]

    def save(name: str, array: np.ndarray[Any, Any]) -> None:
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)

    save("ids", ids)
    save("db_ids", np.array([db_ids[c] for c in cids[source]], dtype=np.int64))
    save("propensities", matrix[source].astype(np.float32))
    row_of = pd.Index(cids[source])

    segments = _codes(frame["segment"], str)
    branches = _codes(frame["branch_id"], str)
    save("segment", segments.codes)
    save("branch", branches.codes)
    save("joined", _ns(frame["joined_at"]))
    save("birth", _ns(frame["birth_date"]))
    attribute_values: list[list[Any] | None] = []
    for i, name in enumerate(data.attribute_kinds):
        column = frame[name]
        if column.dtype.kind in "biuf" and not isinstance(
            column.dtype, pd.api.extensions.ExtensionDtype
        ):
            save(f"attr_{i}", column.to_numpy())
            attribute_values.append(None)
        else:
            coded = _codes(column, _json_scalar)
            save(f"attr_{i}", coded.codes)
            attribute_values.append(coded.values)

    adoptions = data.adoptions
    rows = row_of.get_indexer(adoptions["customer_id"].astype(str))
    keep = rows >= 0
    a_rows = rows[keep]
    a_codes, a_table = pd.factorize(adoptions["product_code"].astype(str).to_numpy()[keep])
    a_at = _ns(adoptions["adopted_at"])[keep]
    a_closed = _ns(adoptions["closed_at"])[keep]
    by_row = np.argsort(a_rows, kind="stable")
    save("adoption_start", _starts(a_rows[by_row], n))
    save("adoption_product", a_codes[by_row].astype(np.int16))
    save("adoption_at", a_at[by_row])
    save("adoption_closed", a_closed[by_row])
    adoption_codes = [str(c) for c in a_table]
    sequence, sequences = _sequences(a_rows, a_codes, a_at, adoption_codes, n, as_of)
    save("sequence", sequence)
    save("sequence_start", _starts_of(sequences))
    save("sequence_codes", np.concatenate([np.zeros(0, dtype=np.int16), *sequences]))
    if rules is not None:
        position = {id(rule): i for i, rule in enumerate(rules.rules)}
        chosen = [
            np.array(
                [
                    position[id(r)]
                    for r in rules.reasons_for([adoption_codes[c] for c in s]).values()
                ],
                dtype=np.int32,
            )
            for s in sequences
        ]
        save("reason_start", _starts_of(chosen))
        save("reason_rule", np.concatenate([np.zeros(0, dtype=np.int32), *chosen]))

    outcomes = data.outcomes
    if outcomes is None:
        outcomes = pd.DataFrame(
            {"customer_id": [], "product_code": [], "outcome": [], "occurred_at": []}
        )
    rows = row_of.get_indexer(outcomes["customer_id"].astype(str))
    keep = rows >= 0
    o_rows = rows[keep]
    o_codes, o_table = pd.factorize(outcomes["product_code"].astype(str).to_numpy()[keep])
    o_kinds, o_kind_table = pd.factorize(outcomes["outcome"].astype(str).to_numpy()[keep])
    o_at = _ns(outcomes["occurred_at"])[keep]
    by_row = np.argsort(o_rows, kind="stable")
    save("outcome_start", _starts(o_rows[by_row], n))
    save("outcome_product", o_codes[by_row].astype(np.int16))
    save("outcome_kind", o_kinds[by_row].astype(np.int16))
    save("outcome_at", o_at[by_row])

    band_table = np.zeros((0, 0), dtype=np.int16)
    band = np.full(n, -1, dtype=np.int32)
    if bands is not None and n:
        ordered = np.asarray(bands, dtype=np.int16)[source]
        if ordered.shape[1]:
            band_table, inverse = np.unique(ordered, axis=0, return_inverse=True)
            band = inverse.reshape(-1).astype(np.int32)
        else:
            band = np.zeros(n, dtype=np.int32)
            band_table = np.zeros((1, 0), dtype=np.int16)
    save("band", band)
    save("band_table", band_table)

    meta = {
        "format": FORMAT,
        "written_at": dt.datetime.now(dt.UTC).isoformat(),
        "fingerprint": asdict(built),
        "as_of": as_of.isoformat(),
        "catalogue": catalogue.to_records(),
        "popularity": [[k, dict(v)] for k, v in popularity.items()],
        "profiles": None if profiles is None else profiles_to_json(profiles),
        "reasons": None if rules is None else reason_terms(rules),
        "attributes": list(data.attribute_kinds),
        "attribute_values": attribute_values,
        "segments": segments.values,
        "branches": branches.values,
        "adoption_codes": adoption_codes,
        "outcome_codes": [str(c) for c in o_table],
        "outcome_kinds": [str(c) for c in o_kind_table],
    }
    (folder / META).write_bytes(orjson.dumps(meta))


def reason_terms(rules: RuleSet) -> dict[str, Any]:
    """What a store's reason rules depend on besides the model version (in the key): a
    worker whose code finds reasons otherwise finds them itself."""
    return {
        "rules": len(rules.rules),
        "min_lift": REASON_MIN_LIFT,
        "min_customers": REASON_MIN_CUSTOMERS,
    }


def _codes(column: pd.Series, convert: Callable[[Any], Any]) -> _Codes:
    codes, uniques = pd.factorize(column.astype(object), use_na_sentinel=True)
    return _Codes(codes.astype(np.int32), [convert(v) for v in uniques])


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _ns(column: pd.Series) -> npt.NDArray[np.int64]:
    values = pd.to_datetime(column).to_numpy(dtype="datetime64[ns]")
    return np.asarray(values.view(np.int64))


def _starts(rows: npt.NDArray[np.intp], n: int) -> npt.NDArray[np.int64]:
    """CSR offsets (n + 1) of rows sorted by row."""
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=starts[1:])
    return starts


def _sequences(
    rows: npt.NDArray[np.intp],
    codes: npt.NDArray[np.intp],
    adopted: npt.NDArray[np.int64],
    table: Sequence[str],
    n: int,
    as_of: dt.date,
) -> tuple[npt.NDArray[np.int32], list[npt.NDArray[np.int16]]]:
    """Each row's adoption sequence before ``as_of`` (products in order of first adoption,
    ties by code, as :meth:`service.decision.state.Snapshot.pitches` makes it), as an
    index into the distinct sequences (the first is the empty one), each an array of
    indexes into ``table``."""
    cutoff = pd.Timestamp(as_of).value
    before = adopted < cutoff
    rows, codes, adopted = rows[before], codes[before], adopted[before]
    rank = np.empty(len(table), dtype=np.int64)
    rank[np.argsort(np.asarray(table, dtype=object))] = np.arange(len(table))
    order = np.lexsort((rank[codes], adopted, rows))
    rows, codes = rows[order], codes[order]
    # The first adoption of each (row, product) in that order.
    _, first = np.unique(rows.astype(np.int64) * max(len(table), 1) + codes, return_index=True)
    first.sort()
    rows, codes = rows[first], codes[first]
    sequence = np.zeros(n, dtype=np.int32)
    sequences: list[npt.NDArray[np.int16]] = [np.zeros(0, dtype=np.int16)]
    found: dict[bytes, int] = {b"": 0}
    packed = codes.astype(np.int16)
    bounds = np.flatnonzero(np.diff(rows)) + 1
    starts = np.concatenate(([0], bounds)) if len(rows) else np.zeros(0, dtype=np.intp)
    ends = np.concatenate((bounds, [len(rows)])) if len(rows) else np.zeros(0, dtype=np.intp)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        codes_of = packed[start:end]
        raw = codes_of.tobytes()
        index = found.get(raw)
        if index is None:
            index = found[raw] = len(sequences)
            sequences.append(codes_of)
        sequence[rows[start]] = index
    return sequence, sequences


def _starts_of(arrays: Sequence[npt.NDArray[Any]]) -> npt.NDArray[np.int64]:
    """CSR offsets of ``arrays`` laid end to end: array ``i`` is ``[starts[i] : starts[i + 1]]``."""
    starts = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=starts[1:])
    return starts


# --------------------------------------------------------------------------- profiles


def profiles_to_json(profiles: ProfileRates) -> dict[str, Any]:
    """:class:`~models.reasons.ProfileRates` as JSON-ready data (:func:`profiles_from_json`)."""
    return {
        "columns": [
            {
                "column": c.column,
                "noun": c.noun,
                "edges": None if c.edges is None else list(c.edges),
                "levels": list(c.levels),
            }
            for c in profiles.columns
        ],
        "groups": {
            code: [
                [list(group), [[list(cell), asdict(claim)] for cell, claim in cells.items()]]
                for group, cells in groups
            ]
            for code, groups in profiles.groups.items()
        },
        "positions": {code: list(p) for code, p in profiles.positions.items()},
        "as_of": int(pd.Timestamp(profiles.as_of).value),
    }


def profiles_from_json(data: Mapping[str, Any]) -> ProfileRates:
    columns = tuple(
        ProfileColumn(
            c["column"],
            c["noun"],
            None if c["edges"] is None else tuple(float(e) for e in c["edges"]),
            tuple(c["levels"]),
        )
        for c in data["columns"]
    )
    groups = {
        code: tuple(
            (
                tuple(group),
                {
                    tuple(cell): ProfileClaim(**{**claim, "nouns": tuple(claim["nouns"])})
                    for cell, claim in cells
                },
            )
            for group, cells in found
        )
        for code, found in data["groups"].items()
    }
    positions = {code: tuple(p) for code, p in data["positions"].items()}
    return ProfileRates(columns, groups, positions, pd.Timestamp(int(data["as_of"])))


# --------------------------------------------------------------------------- one per machine


@contextlib.contextmanager
def locked(folder: Path, key: str) -> Iterator[None]:
    """Hold the build lock of store ``key`` (blocking until the holder is done)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{key}.lock").open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_or_build(
    folder: Path,
    key: str,
    *,
    build: Callable[[Path], None],
    usable: Callable[[ColumnStore], bool],
) -> tuple[ColumnStore, bool]:
    """The store ``key`` under ``folder``: the one there if ``usable`` says so, else one
    ``build`` writes (into the folder it is given); and whether it was built here.

    Under the key's lock: of workers starting together one builds, the others wait and
    map its store. A store replaced while another process maps it stays readable by
    that process (its files are unlinked, not changed).
    """
    target = folder / key
    with locked(folder, key):
        if (target / META).exists():
            try:
                store = ColumnStore(target)
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("serving store unreadable; building it again", exc_info=True)
            else:
                if usable(store):
                    return store, False
        started = time.perf_counter()
        scratch = folder / f".build-{key}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            build(scratch)
            _sync(scratch)
            if target.exists():
                retired = folder / f".old-{key}-{os.getpid()}-{time.time_ns()}"
                target.rename(retired)
                shutil.rmtree(retired, ignore_errors=True)
            scratch.rename(target)
            fsync_folder(folder)  # the rename itself
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        store = ColumnStore(target)
        log.info(
            "serving store built",
            extra={
                "key": key,
                "customers": store.n,
                "megabytes": round(store.nbytes() / 2**20, 1),
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
    _forget_old(folder, keep=key)
    return store, True


def _sync(scratch: Path) -> None:
    """Write a built store's files and their folder to disk before the rename that makes
    it visible. Without it, a machine that lost power soon after a build could come back
    with the folder renamed but files empty or holding zeros (the data still unwritten
    in the page cache), which a worker would map and serve from: ids that find nobody,
    propensities of 0. 0.3 s for a store of 1M customers (264 MiB), once per build."""
    for path in scratch.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_folder(scratch)


def _forget_old(folder: Path, *, keep: str) -> None:
    """Delete stores of other keys but the newest :data:`KEEP_STORES` (workers mapping
    one keep reading it), and builds abandoned over an hour ago."""
    stores = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name != keep and (p / META).exists()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in stores[KEEP_STORES:]:
        # The lock file stays: a process may be waiting on it.
        with locked(folder, old.name):
            shutil.rmtree(old, ignore_errors=True)
    for scratch in folder.glob(".build-*"):
        if time.time() - scratch.stat().st_mtime > 3600:
            shutil.rmtree(scratch, ignore_errors=True)
