"""Customers' attribute history: what a change of an attribute, segment or branch keeps.

A customer's values in force now live in ``customers`` (``attributes``, ``segment``,
``branch_id``), where serving reads them. :class:`service.data.tables.AttributeChange`
keeps, for each change, the day it took effect and the value it replaced. Read together,
they give each value's timeline::

    previous of the first change        until the first change's day
    previous of the second change       from the first change's day to the second's
    ...
    the value in customers              from the last change's day on

so the value before the first change counts as valid from the start of history: a bank
that imports one snapshot has no changes and loses nothing, and a value that appears
where none was ever known (a new attribute, a customer created bare) is taken as known
all along. A value set from a day on replaces, from that day to the next change, what
was held; a value equal to the one held that day adds nothing, so importing a file again
changes nothing. One function, :func:`apply_change`, decides this for the import and
for the API alike.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from models.data import HISTORY_FIXED_COLUMNS
from service.data import rows as bank_rows

HISTORY_FIELDS = HISTORY_FIXED_COLUMNS
"""The fixed customer columns whose changes are kept besides the attributes' (a fixed
column's name is never an attribute's, so they share one table)."""

Change = tuple[dt.date, Any]
"""A change of one value: ``(first day of the new value, the value before it)``."""

__all__ = ["HISTORY_FIELDS", "Change", "HistoryWrites", "apply_change", "read_changes"]


def apply_change(
    changes: Sequence[Change], current: Any, day: dt.date, value: Any
) -> tuple[list[Change], Any] | None:
    """Set one value to ``value`` from ``day`` on; None when that changes nothing.

    Parameters
    ----------
    changes : sequence of Change
        The value's stored changes, in day order (see the module).
    current : Any
        The value in force now (None: unknown).
    day : datetime.date
        The first day of ``value``.
    value : Any
        The new value (None: unknown, removing it).

    Returns
    -------
    (list of Change, Any) or None
        The value's changes and its value in force now, after the change; None when
        ``value`` is already the value held on ``day``. Where no value was ever known,
        ``value`` is taken as valid from the start of history (no change is kept).
        ``value`` holds from ``day`` until the next stored change, so a day before the
        last change corrects the past and leaves the value in force now as it is.
    """
    if not changes:  # the usual case, without building a timeline
        if value == current:
            return None
        return ([], value) if current is None else ([(day, current)], value)
    starts: list[dt.date | None] = [None, *(d for d, _ in changes)]
    values: list[Any] = [*(previous for _, previous in changes), current]
    if all(v is None for v in values):
        return None if value is None else ([], value)
    held = bisect.bisect_right([d for d, _ in changes], day)  # the segment holding ``day``
    if values[held] == value:
        return None
    if starts[held] == day:
        values[held] = value
    else:
        starts.insert(held + 1, day)
        values.insert(held + 1, value)
    # A change to the value already held is no change.
    kept_starts: list[dt.date | None] = [None]
    kept_values: list[Any] = [values[0]]
    for start, held_value in zip(starts[1:], values[1:], strict=True):
        if held_value != kept_values[-1]:
            kept_starts.append(start)
            kept_values.append(held_value)
    out: list[Change] = []
    for start, previous in zip(kept_starts[1:], kept_values[:-1], strict=True):
        assert start is not None
        out.append((start, previous))
    return out, kept_values[-1]


def read_changes(
    conn: Connection, where: str, params: dict[str, Any]
) -> dict[tuple[int, str], list[Change]]:
    """Stored changes by ``(customers.id, name)``, each list in day order.

    ``where`` is a condition on ``ch`` (``attribute_changes``) written by the caller
    from its own table and column names, never from data; values go in ``params``.
    """
    dialect = conn.dialect.name
    found: dict[tuple[int, str], list[Change]] = defaultdict(list)
    for cid, name, day, previous in conn.execute(
        text(
            f"SELECT ch.customer_id, ch.name, {bank_rows.date_text('ch.changed_on', dialect)}, "
            f"CAST(ch.previous AS TEXT) FROM attribute_changes ch WHERE {where} "
            "ORDER BY ch.customer_id, ch.name, ch.changed_on"
        ),
        params,
    ):
        found[(int(cid), str(name))].append(
            (dt.date.fromisoformat(str(day)[:10]), _stored_value(previous))
        )
    return found


def _stored_value(raw: Any) -> Any:
    try:
        return bank_rows.parse_json(raw)
    except ValueError:  # a torn value: unknown
        return None


@dataclass
class HistoryWrites:
    """Changes to write in one statement per kind: the values whose history changed."""

    replaced: list[tuple[int, str]] = field(default_factory=list)
    rows: list[tuple[int, str, dt.date, Any]] = field(default_factory=list)
    added: int = 0

    def replace(
        self, customer: int, name: str, stored: Sequence[Change], changes: Iterable[Change]
    ) -> None:
        """Replace the stored changes of one value by ``changes``."""
        new = list(changes)
        if stored:
            self.replaced.append((customer, name))
        self.rows.extend((customer, name, day, previous) for day, previous in new)
        self.added += len(set(new) - set(stored)) if _hashable(new) else len(new)

    def write(self, conn: Connection) -> None:
        """Delete the replaced changes and insert the new ones; then start afresh."""
        if self.replaced:
            conn.execute(
                text("DELETE FROM attribute_changes WHERE customer_id = :c AND name = :n"),
                [{"c": c, "n": n} for c, n in self.replaced],
            )
        if self.rows:
            value = "CAST(:p AS JSONB)" if conn.dialect.name == "postgresql" else ":p"
            conn.execute(
                text(
                    "INSERT INTO attribute_changes (customer_id, name, changed_on, previous) "
                    f"VALUES (:c, :n, :d, {value})"
                ),
                [
                    {"c": c, "n": n, "d": d, "p": None if p is None else json.dumps(p)}
                    for c, n, d, p in self.rows
                ],
            )
        self.replaced.clear()
        self.rows.clear()


def _hashable(changes: Sequence[Change]) -> bool:
    return all(isinstance(previous, str | int | float | None) for _, previous in changes)
