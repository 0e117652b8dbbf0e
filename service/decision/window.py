"""The policy windows' offers and declines, read from PostgreSQL in bulk when a worker
starts.

A worker's contact history starts with every offer and decline of the policy windows
(see :meth:`service.decision.state.ServingState._load_history`). A busy bank makes
millions of offers a month; read as rows, each cost a tuple from the driver, a
datetime, a UUID parsed and a record grown in Python, and the database joined every
offer to its decision for the customer's external id and sorted them all: 4M offers
took most of a minute at start-up.

Here the database sends binary ``COPY`` rows of fixed width: the customer's database
id, the product's id, the offer's id as 36 characters and the instant as a
``timestamptz`` (microseconds since 2000), unsorted and without joins; NumPy reads them
in batches, keeps the lowercase UUIDs as 16 bytes (:func:`_uuids`), names each customer
through the serving store's database ids, orders them by customer and instant, and
:meth:`~service.decision.contacts.ContactBook.load_packed` makes one record per
customer from slices of the packed columns. (Picking and casting the UUIDs in SQL
doubled the database's part; a regular expression, ``decode``/``replace`` and
``EXTRACT(EPOCH ...)`` made it four times slower again.)

What this path cannot name is left to the row reader (:func:`rest_offers`,
:func:`rest_declines`): offers without a customer id (unknown customers served cold),
ids that are not lowercase UUIDs (the book holds them as text, see
:func:`~service.decision.contacts._offer_key`), and customers deleted since.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import select
from collections.abc import Generator
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import pq
from sqlalchemy import Connection, text

from service.data.tables import unnamed_offers
from service.decision.contacts import ContactBook
from service.decision.store import ColumnStore

_OFFERS = (
    "COPY (SELECT o.customer_id, o.product_id, o.id, o.created_at FROM offers o "
    "WHERE o.created_at >= %(since)s AND o.customer_id IS NOT NULL AND char_length(o.id) = 36) "
    "TO STDOUT (FORMAT binary)"
)
"""The offers of the windows with a customer and an id of 36 characters: the ids come
as text and :func:`_uuids` picks and decodes the lowercase UUIDs among them, which the
database did for each row with ``LIKE``, ``lower`` and a ``::uuid`` cast at nearly the
cost of reading the rows (4.2 s against 2.4 s for 6M offers). An id of 36 characters
that are not all ASCII is longer than 36 bytes: the rows are no longer of one width,
the bulk read fails and the row reader reads every offer."""
_DECLINES = (
    "COPY (SELECT o.customer_id, o.product_id, oo.created_at FROM offer_outcomes oo "
    "JOIN offers o ON o.id = oo.offer_id WHERE oo.outcome = 'declined' "
    "AND oo.created_at >= %(since)s AND o.customer_id IS NOT NULL) "
    "TO STDOUT (FORMAT binary)"
)


def rest_offers(unnamed: list[int]) -> str:
    """The condition on ``offers o`` of what :func:`read_offers` leaves to the row reader
    (``unnamed``: the customer ids it returned, the parameter ``:unnamed``).

    Without such customers (nearly always) it is the predicate of the partial index
    ``ix_offers_unnamed_created_at`` alone, so the row reader's query reads that small
    index instead of every offer of the windows a second time (2.5 s of three processes
    at 5.7M offers, for no rows)."""
    condition = unnamed_offers("o")
    return f"({condition} OR o.customer_id = ANY(:unnamed))" if unnamed else f"({condition})"


def rest_declines(unnamed: list[int]) -> str:
    """The condition on ``offers o`` of the declines :func:`read_declines` leaves to the
    row reader (``unnamed`` as for :func:`rest_offers`)."""
    if unnamed:
        return "(o.customer_id IS NULL OR o.customer_id = ANY(:unnamed))"
    return "(o.customer_id IS NULL)"


def _row(fields: list[tuple[str, str]]) -> tuple[np.dtype[Any], dict[str, int]]:
    """The dtype of a binary COPY row of NOT NULL fixed-width ``fields`` (network byte
    order: the field count, then each field's length and value), and the value each
    count and length must have."""
    layout: list[tuple[str, str]] = [("fields", ">i2")]
    sizes = {"fields": len(fields)}
    for name, kind in fields:
        layout += [(f"{name}_size", ">i4"), (name, kind)]
        sizes[f"{name}_size"] = np.dtype(kind).itemsize
    return np.dtype(layout), sizes


_OFFER_ROW = _row([("customer", ">i8"), ("product", ">i4"), ("key", "V36"), ("at", ">i8")])
_DECLINE_ROW = _row([("customer", ">i8"), ("product", ">i4"), ("at", ">i8")])
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = len(_SIGNATURE) + 8  # the signature, flags (int32), extension length (int32)
_TRAILER = b"\xff\xff"
_EPOCH_US = 946_684_800_000_000
"""2000-01-01 (PostgreSQL's timestamp epoch) in POSIX microseconds."""
BATCH_ROWS = 100_000
"""Rows read into arrays at a time (about 5 MB of COPY data)."""
COPY_BLOCK = 1 << 20
"""Bytes of COPY data gathered from libpq before they are handed on (a few thousand
rows)."""
DENSE_SPAN = 4
"""See :func:`_distinct`."""
_NAME_BATCH = 10_000
"""Customer ids named per query, for customers the store does not hold."""


_DASHES = np.array([8, 13, 18, 23])
_DIGITS = np.setdiff1d(np.arange(36), _DASHES)
_FOUR_DASHES = np.frombuffer(b"----", dtype=np.uint32)[0]


def _uuids(ids: npt.NDArray[Any]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[Any]]:
    """Of 36-byte offer ids (``V36``): which are lowercase UUIDs as the book holds them
    (what ``LIKE`` on the dashed layout and ``id = lower(id)`` keep: ASCII, dashes in
    their four places, no capital), and their 16 bytes (``V16``, for those rows).

    Nearly every batch is all such ids, which a few passes over the bytes show; a batch
    that is not is sorted out row by row. (Every check made row by row on every batch,
    with a table lookup per digit, took 2.6 s for 10.9M offers' ids; this 0.8 s.)

    Raises
    ------
    ValueError
        For an id of that shape that is not hexadecimal, as the database's ``::uuid``
        cast did: the row reader then reads every offer (it holds such ids as text).
    """
    raw = np.ascontiguousarray(ids).view(np.uint8).reshape(len(ids), 36)
    digits = np.take(raw, _DIGITS, axis=1)
    # A hexadecimal digit's value: its low four bits, plus 9 for a letter. Any other
    # byte gives a value that does not spell that byte again (or is over 15).
    nibbles = (digits & np.uint8(0x0F)) + np.uint8(9) * (digits >> 6)
    spelled = nibbles + np.uint8(ord("0")) + np.uint8(ord("a") - ord("0") - 10) * (nibbles > 9)
    shaped = (np.ascontiguousarray(raw[:, _DASHES]).view(np.uint32) == _FOUR_DASHES).reshape(-1)
    if len(ids) and shaped.all() and nibbles.max() <= 15 and np.array_equal(spelled, digits):
        chosen = np.ones(len(ids), dtype=bool)
    else:
        # Row by row: ASCII and no capital, dashes in place, then hexadecimal digits.
        ascii_ = (raw < 0x80).all(axis=1)
        lower = ~((raw >= ord("A")) & (raw <= ord("Z"))).any(axis=1)
        chosen = ascii_ & shaped & lower
        nibbles = nibbles[chosen]
        if nibbles.max(initial=0) > 15 or not np.array_equal(spelled[chosen], digits[chosen]):
            raise ValueError("an offer id of a UUID's shape is not hexadecimal")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return chosen, np.ascontiguousarray(packed).view("V16").reshape(-1)


def _wait(pgconn: Any) -> None:
    """Wait, not holding the interpreter, until the connection's socket has data, then
    hand it to libpq. (``poll``, not ``select``: no limit on the descriptor's number.)"""
    waiting = select.poll()
    waiting.register(pgconn.socket, select.POLLIN)
    waiting.poll()
    pgconn.consume_input()


def _result(pgconn: Any) -> Any:
    """The connection's next result, waiting for the socket while the server has not
    sent it whole."""
    while pgconn.is_busy():
        _wait(pgconn)
    return pgconn.get_result()


def _finish(pgconn: Any) -> None:
    """Take the results the connection has left, until it is ready for a command."""
    while _result(pgconn) is not None:
        pass


def _copy_out(raw: Any, query: str, params: dict[str, Any]) -> Generator[bytes, None, None]:
    """The data of ``query`` (a ``COPY ... TO STDOUT``) in blocks of about
    :data:`COPY_BLOCK` bytes, read from libpq itself.

    PostgreSQL sends a message per row, and psycopg's ``copy()`` hands each one on
    through several Python calls and generators: 0.75 us of CPU a row, 7.4 s of a
    start-up with 10M offers in the windows. Here libpq takes the rows out of what each
    read of the socket brought (``PQgetCopyData`` without blocking) and only the wait for
    the socket is left to the loop: 3.1 s for the same rows, which then come as fast as
    the database sends them. Should the reader fail or stop part-way, the COPY is
    cancelled and what is left of it drained, so the transaction can be rolled back as
    after any failed statement.
    """
    pgconn = raw.pgconn
    statement = psycopg.ClientCursor(raw).mogrify(query, params)
    pgconn.send_query(statement.encode())
    done = False
    try:
        started = _result(pgconn)
        if started is None or started.status != pq.ExecStatus.COPY_OUT:
            message = b"" if started is None else started.error_message
            _finish(pgconn)
            done = True
            why = message.decode(errors="replace")
            raise psycopg.OperationalError(f"COPY did not start: {why}")
        pending = bytearray()
        get = pgconn.get_copy_data
        while True:
            size, data = get(1)
            if size > 0:
                pending += data
                if len(pending) >= COPY_BLOCK:
                    yield bytes(pending)
                    pending.clear()
            elif size == 0:  # no whole row buffered: wait for the socket
                _wait(pgconn)
            else:
                break
        outcome = _result(pgconn)
        _finish(pgconn)
        done = True  # the COPY is over on both sides: the connection takes commands
        if size != -1 or outcome is None or outcome.status != pq.ExecStatus.COMMAND_OK:
            why = pgconn.error_message if outcome is None else outcome.error_message
            raise psycopg.OperationalError(f"COPY failed: {why.decode(errors='replace')}")
        if pending:
            yield bytes(pending)
    finally:
        if not done:
            _abandon(pgconn)


def _abandon(pgconn: Any) -> None:
    """Cancel a COPY in progress and drain it (errors ignored: the caller is failing
    already, and a connection left broken fails its rollback)."""
    with contextlib.suppress(Exception):
        pgconn.get_cancel().cancel()
    with contextlib.suppress(Exception):
        while True:
            size, _ = pgconn.get_copy_data(1)
            if size < 0:
                break
            if size == 0:
                _wait(pgconn)
        _finish(pgconn)


def _copy(
    conn: Connection,
    query: str,
    since: dt.datetime,
    row: tuple[np.dtype[Any], dict[str, int]],
) -> dict[str, npt.NDArray[Any]]:
    """Stream a binary COPY of fixed-width rows into one array per field (read a batch
    at a time: bounded memory): ``customer`` int64, ``product`` int32, ``key`` 16-byte
    voids, ``at`` POSIX seconds (float64)."""
    dtype, sizes = row
    parts: dict[str, list[npt.NDArray[Any]]] = {
        name: [] for name in dtype.names or () if name in ("customer", "product", "key", "at")
    }

    def add(block: bytes) -> None:
        rows = np.frombuffer(block, dtype=dtype)
        for name, size in sizes.items():
            if not (rows[name] == size).all():
                raise ValueError(f"unexpected binary COPY layout ({name})")
        keys = None
        if "key" in parts:
            chosen, keys = _uuids(rows["key"])
            rows = rows[chosen]
        for name, found in parts.items():
            column = rows[name]
            if name == "at":
                # Exact in int64, then one correctly rounded division: the same float64
                # as the database's EXTRACT(EPOCH ...)::float8.
                found.append((column.astype(np.int64) + _EPOCH_US) / 1e6)
            elif name == "key" and keys is not None:
                found.append(keys)
            else:
                found.append(column.astype(np.int64 if name == "customer" else np.int32))

    pending = bytearray()
    header = False
    raw: Any = conn.connection.driver_connection  # psycopg's
    with contextlib.closing(_copy_out(raw, query, {"since": since})) as blocks:
        for data in blocks:
            pending += data
            if not header:
                if len(pending) < _HEADER:
                    continue
                if bytes(pending[: len(_SIGNATURE)]) != _SIGNATURE:
                    raise ValueError("not a binary COPY stream")
                extension = int.from_bytes(pending[_HEADER - 4 : _HEADER], "big")
                if len(pending) < _HEADER + extension:
                    continue
                del pending[: _HEADER + extension]
                header = True
            whole = len(pending) // dtype.itemsize
            if whole >= BATCH_ROWS:
                size = whole * dtype.itemsize
                add(bytes(pending[:size]))
                del pending[:size]
    # What is left: the last rows and the trailer (shorter than a row, so never taken
    # for one above).
    if not header or not pending.endswith(_TRAILER):
        raise ValueError("binary COPY stream ended early")
    body = len(pending) - len(_TRAILER)
    if body % dtype.itemsize:
        raise ValueError("binary COPY stream ended inside a row")
    if body:
        add(bytes(pending[:body]))
    empty: dict[str, np.dtype[Any]] = {
        "customer": np.dtype(np.int64),
        "product": np.dtype(np.int32),
        "key": np.dtype("V16"),
        "at": np.dtype(np.float64),
    }
    return {
        name: np.concatenate(found) if found else np.zeros(0, dtype=empty[name])
        for name, found in parts.items()
    }


def _distinct(ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """``np.unique(ids, return_inverse=True)``: the distinct ids, sorted, and each id's
    index among them. Database ids are dense (a sequence from 1), so where the largest
    is at most :data:`DENSE_SPAN` times the ids' count (plus a million) they are marked
    in an array as long as the largest instead of sorted: 0.1 s for 10.9M offers'
    customers, where the sort took 2.7 s of a start-up."""
    if not len(ids) or int(ids.min()) < 0 or int(ids.max()) > DENSE_SPAN * len(ids) + 2**20:
        distinct, inverse = np.unique(ids, return_inverse=True)
        return distinct, inverse.reshape(-1)
    seen = np.zeros(int(ids.max()) + 1, dtype=np.bool_)
    seen[ids] = True
    distinct = np.flatnonzero(seen).astype(np.int64)
    position = np.full(len(seen), -1, dtype=np.intp)
    position[distinct] = np.arange(len(distinct), dtype=np.intp)
    return distinct, position[ids]


def _runs(sorted_: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """``np.unique(sorted_, return_index=True)`` of an array already sorted: each
    distinct value and where its run starts, without sorting again."""
    if not len(sorted_):
        return sorted_[:0], np.zeros(0, dtype=np.intp)
    starts = np.flatnonzero(np.concatenate(([True], sorted_[1:] != sorted_[:-1])))
    return sorted_[starts], starts


def _names(
    conn: Connection, ids: npt.NDArray[np.int64], store: ColumnStore | None
) -> tuple[list[str], npt.NDArray[np.intp]]:
    """Each customer database id's external id: the distinct names, and for each id
    its index into them (-1: no such customer, deleted since)."""
    distinct, inverse = _distinct(ids)
    index = np.full(len(distinct), -1, dtype=np.intp)
    names: list[str] = []
    if store is not None and store.n:
        order = np.argsort(store.db_ids, kind="stable")
        held = store.db_ids[order]
        at = np.minimum(np.searchsorted(held, distinct), len(held) - 1)
        found = held[at] == distinct
        rows = order[at[found]]
        index[found] = np.arange(len(rows))
        names = [store.external_id(int(row)) for row in rows.tolist()]
    rest = np.flatnonzero(index < 0)
    for first in range(0, len(rest), _NAME_BATCH):
        chunk = rest[first : first + _NAME_BATCH]
        known = {
            int(row[0]): str(row[1])
            for row in conn.execute(
                text("SELECT id, external_id FROM customers WHERE id = ANY(:ids)"),
                {"ids": distinct[chunk].tolist()},
            )
        }
        for position, db_id in zip(chunk.tolist(), distinct[chunk].tolist(), strict=True):
            name = known.get(db_id)
            if name is not None:
                index[position] = len(names)
                names.append(name)
    return names, index[inverse]


def _products(conn: Connection) -> tuple[list[str], npt.NDArray[np.int32]]:
    """The product codes, and by product id the index of its code (-1: none)."""
    found = {int(r[0]): str(r[1]) for r in conn.execute(text("SELECT id, code FROM products"))}
    ids = sorted(found)
    lookup = np.full(max(ids, default=0) + 1, -1, dtype=np.int32)
    lookup[np.asarray(ids, dtype=np.int64)] = np.arange(len(ids), dtype=np.int32)
    return [found[i] for i in ids], lookup


def _coded(product: npt.NDArray[np.int32], lookup: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """Each product id's code index; -1 for an id not in the table (the row reader's
    join with products skips those rows, and so do the callers)."""
    inside = (product >= 0) & (product < len(lookup))
    return np.where(inside, lookup[np.where(inside, product, 0)], -1).astype(np.int32)


class _Read:
    """One bulk query's rows, named: ``who`` indexes ``names`` (-1: not named),
    ``product`` indexes ``codes`` (-1: no such product), ``keep`` the rows with both."""

    def __init__(
        self,
        conn: Connection,
        query: str,
        since: dt.datetime,
        row: tuple[np.dtype[Any], dict[str, int]],
        store: ColumnStore | None,
    ) -> None:
        self.codes, lookup = _products(conn)
        self.columns = _copy(conn, query, since, row)
        customer = self.columns["customer"]
        self.names, self.who = _names(conn, customer, store)
        self.unnamed = [int(i) for i in np.unique(customer[self.who < 0]).tolist()]
        self.product = _coded(self.columns.pop("product"), lookup)
        del self.columns["customer"]  # named: who and unnamed hold what the rest needs
        self.keep = np.flatnonzero((self.who >= 0) & (self.product >= 0))


def _by_customer_and_time(
    who: npt.NDArray[np.intp], at: npt.NDArray[np.float64]
) -> npt.NDArray[np.intp]:
    """The order of rows by customer index ``who``, then instant ``at`` (POSIX seconds
    of microsecond instants, as :func:`_copy` reads them), rows of the same instant in
    their order: ``np.lexsort((at, who))``. Where both fit in 63 bits (the customer
    index, and microseconds since the earliest row: 99 days at a million customers) it
    is one stable sort of a key holding both: 3.8-4.2 s against 6.8 s for 18.4M offers."""
    if not len(who):
        return np.zeros(0, dtype=np.intp)
    micros = np.rint(at * 1e6).astype(np.int64)  # each instant's microseconds, exactly
    micros -= micros.min()
    shift = int(micros.max()).bit_length()
    if int(who.min()) < 0 or int(who.max()).bit_length() + shift > 63:
        return np.lexsort((at, who))
    micros |= who.astype(np.int64) << shift
    order: npt.NDArray[np.intp] = np.argsort(micros, kind="stable")
    return order


def _latest(
    who: npt.NDArray[np.intp], product: npt.NDArray[np.integer[Any]], at: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """Each customer's latest decline of each product (what the cooldown counts from),
    of declines by customer index ``who`` (at least 0) and product index ``product``
    at ``at``: the customer, product and instant of each, by customer, then product."""
    if not len(who):
        return who[:0], np.zeros(0, dtype=np.intp), at[:0]
    products = int(product.max()) + 1
    pair = who.astype(np.int64) * products + product  # customers x products: far below 2**63
    order = np.argsort(pair)
    pair, starts = _runs(pair[order])
    latest = np.maximum.reduceat(at[order], starts)
    return (pair // products).astype(np.intp), (pair % products).astype(np.intp), latest


def read_offers(
    conn: Connection, since: dt.datetime, book: ContactBook, store: ColumnStore | None
) -> list[int]:
    """Add the offers made since ``since`` that the bulk path can read to ``book``;
    returns the database ids of customers it could not name (read them with
    :func:`rest_offers`)."""
    read = _Read(conn, _OFFERS, since, _OFFER_ROW, store)
    # Each column is replaced by its sorted copy as soon as that is made, and handed on
    # as a view, not copied into bytes: at 10.9M offers a worker's start-up peaked at
    # 2.2 GB, its columns held three times over. What the records are not made from is
    # let go before they are (the unsorted columns, the order, the customer indexes):
    # with 10M offers the peak of arrays and objects was 996 MiB, now 721.
    columns, keep = read.columns, read.keep
    if len(keep) == len(read.who):  # every row named (nearly always): no copies to sort
        order = _by_customer_and_time(read.who, columns["at"])
    else:
        order = keep[_by_customer_and_time(read.who[keep], columns["at"][keep])]
    del keep, read.keep
    who = read.who[order]
    present, starts = _runs(who)  # sorted by customer: runs, not another sort
    rows = len(who)
    del who, read.who
    stamps = columns.pop("at")[order]
    product = read.product[order].astype(np.uint16)
    del read.product
    keys = columns.pop("key")[order]
    del order
    columns.clear()
    names = [read.names[i] for i in present.tolist()]
    del read.names
    book.load_packed(
        names,
        [*starts.tolist(), rows],
        stamps.view(np.uint8).data,
        read.codes,
        product.view(np.uint8).data,
        keys.view(np.uint8).data,
    )
    return read.unnamed


def read_declines(
    conn: Connection, since: dt.datetime, book: ContactBook, store: ColumnStore | None
) -> list[int]:
    """Add the declines made since ``since`` of offers the bulk path can name to
    ``book``; returns the database ids of customers it could not name (read them with
    :func:`rest_declines`)."""
    read = _Read(conn, _DECLINES, since, _DECLINE_ROW, store)
    who, product, at = _latest(
        read.who[read.keep], read.product[read.keep], read.columns["at"][read.keep]
    )
    present, starts = _runs(who)
    book.load_packed_marks(
        [read.names[i] for i in present.tolist()],
        [*starts.tolist(), len(who)],
        at,
        read.codes,
        product,
    )
    return read.unnamed
