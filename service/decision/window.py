"""The policy windows' offers, read from PostgreSQL in bulk when a worker starts.

A worker's contact history starts with every offer of the policy windows (see
:meth:`service.decision.state.ServingState._load_history`). A busy bank makes millions
of them a month; read as rows, each offer cost a tuple from the driver, a datetime, a
UUID parsed and a record grown in Python, and the database sorted them all by customer
first: 4M offers took most of a minute at start-up.

Here the database sends the offers as binary ``COPY`` rows of fixed width (the
customer's database id, the product's id, the offer id's 16 bytes, the instant as
float64 seconds), unsorted; NumPy reads them in batches, names each customer through
the serving store's database ids, orders them by customer and instant, and
:meth:`~service.decision.contacts.ContactBook.load_packed` makes one record per
customer from slices of the packed columns. What this path cannot name is left to the
row reader: offers without a customer id (unknown customers served cold), with an id
that is not a lowercase UUID (held as text, see :func:`~service.decision.contacts
._offer_key`), and offers of customers deleted since (:data:`REST` selects them).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, text

from service.decision.contacts import ContactBook
from service.decision.store import ColumnStore

UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
"""Offer ids the bulk path reads: lowercase UUIDs, which the book holds as 16 bytes."""

_COPY = (
    "COPY (SELECT o.customer_id, o.product_id, decode(replace(o.id, '-', ''), 'hex'), "
    "EXTRACT(EPOCH FROM o.created_at)::float8 FROM offers o "
    "WHERE o.created_at >= %(since)s AND o.customer_id IS NOT NULL AND o.id ~ %(uuid)s) "
    "TO STDOUT (FORMAT binary)"
)

REST = "(o.customer_id IS NULL OR o.id !~ :uuid OR o.customer_id = ANY(:unnamed))"
"""The offers :func:`read_offers` leaves to the row reader (``uuid``: :data:`UUID_PATTERN`,
``unnamed``: the customer ids it returned)."""

# One row of the binary COPY (network byte order): the field count, then each field's
# length and value. Every field is NOT NULL and of fixed width, so rows are 54 bytes.
_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("customer_size", ">i4"),
        ("customer", ">i8"),
        ("product_size", ">i4"),
        ("product", ">i4"),
        ("key_size", ">i4"),
        ("key", "V16"),
        ("at_size", ">i4"),
        ("at", ">f8"),
    ]
)
_SIZES = {"fields": 4, "customer_size": 8, "product_size": 4, "key_size": 16, "at_size": 8}
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = len(_SIGNATURE) + 8  # the signature, flags (int32), extension length (int32)
_TRAILER = b"\xff\xff"
BATCH_ROWS = 100_000
"""Rows read into arrays at a time (5.4 MB of COPY data)."""
_NAME_BATCH = 10_000
"""Customer ids named per query, for customers the store does not hold."""


class _Columns:
    """The offers read so far, one array per column, in batches."""

    def __init__(self) -> None:
        self.customer: list[npt.NDArray[np.int64]] = []
        self.product: list[npt.NDArray[np.int32]] = []
        self.key: list[bytes] = []
        self.at: list[npt.NDArray[np.float64]] = []

    def add(self, block: bytes) -> None:
        rows = np.frombuffer(block, dtype=_ROW)
        for name, size in _SIZES.items():
            if not (rows[name] == size).all():
                raise ValueError(f"unexpected binary COPY layout ({name})")
        self.customer.append(rows["customer"].astype(np.int64))
        self.product.append(rows["product"].astype(np.int32))
        self.key.append(np.ascontiguousarray(rows["key"]).tobytes())
        self.at.append(rows["at"].astype(np.float64))


def _copy(conn: Connection, since: dt.datetime) -> _Columns:
    """Stream the bulk query's rows into arrays (a batch at a time: bounded memory)."""
    columns = _Columns()
    pending = bytearray()
    header = False
    raw: Any = conn.connection.driver_connection  # psycopg's: its cursor has copy()
    with raw.cursor() as cursor, cursor.copy(_COPY, {"since": since, "uuid": UUID_PATTERN}) as copy:
        for data in copy:
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
            whole = len(pending) // _ROW.itemsize
            if whole >= BATCH_ROWS:
                size = whole * _ROW.itemsize
                columns.add(bytes(pending[:size]))
                del pending[:size]
    # What is left: the last rows and the trailer (shorter than a row, so never
    # taken for one above).
    if not header or not pending.endswith(_TRAILER):
        raise ValueError("binary COPY stream ended early")
    body = len(pending) - len(_TRAILER)
    if body % _ROW.itemsize:
        raise ValueError("binary COPY stream ended inside a row")
    if body:
        columns.add(bytes(pending[:body]))
    return columns


def _names(
    conn: Connection, ids: npt.NDArray[np.int64], store: ColumnStore | None
) -> tuple[list[str], npt.NDArray[np.intp]]:
    """Each customer database id's external id: the distinct names, and for each id
    its index into them (-1: no such customer, deleted since)."""
    distinct, inverse = np.unique(ids, return_inverse=True)
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
    return names, index[inverse.reshape(-1)]


def read_offers(
    conn: Connection, since: dt.datetime, book: ContactBook, store: ColumnStore | None
) -> list[int]:
    """Add the offers made since ``since`` that the bulk path can read to ``book``;
    returns the database ids of customers it could not name (read them with
    :data:`REST`)."""
    products = {
        int(row[0]): str(row[1]) for row in conn.execute(text("SELECT id, code FROM products"))
    }
    columns = _copy(conn, since)
    if not columns.customer:
        return []
    customer = np.concatenate(columns.customer)
    columns.customer.clear()
    names, who = _names(conn, customer, store)
    unnamed = np.unique(customer[who < 0]).tolist()
    del customer
    product_ids = np.concatenate(columns.product)
    columns.product.clear()
    codes: Sequence[int] = sorted(products)
    lookup = np.full(max(codes, default=0) + 1, -1, dtype=np.int32)
    lookup[np.asarray(codes, dtype=np.int64)] = np.arange(len(codes))
    product = lookup[np.clip(product_ids, 0, len(lookup) - 1)]
    product[(product_ids < 0) | (product_ids >= len(lookup))] = -1
    at = np.concatenate(columns.at)
    columns.at.clear()
    keys = np.frombuffer(b"".join(columns.key), dtype="V16")
    columns.key.clear()
    # An offer of a product no longer in the table is skipped, as the row reader's
    # join with products skips it.
    keep = np.flatnonzero((who >= 0) & (product >= 0))
    order = keep[np.lexsort((at[keep], who[keep]))]
    who, at, product, keys = who[order], at[order], product[order], keys[order]
    present, starts = np.unique(who, return_index=True)
    bounds = [*starts.tolist(), len(who)]
    book.load_packed(
        [names[i] for i in present.tolist()],
        bounds,
        at.tobytes(),
        [str(products[c]) for c in codes],
        product.astype(np.uint16).tobytes(),
        keys.tobytes(),
    )
    return [int(i) for i in unnamed]
