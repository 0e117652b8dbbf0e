"""The change-event log: one ``change_events`` row per write other workers must apply.

A write appends its event in its own transaction, so the event exists exactly when the
write does; every serving worker polls the log (service.decision.state) and applies
what other workers wrote within its poll interval.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, text


def record_event(
    conn: Connection,
    *,
    kind: str,
    origin: str,
    customer: str | None = None,
    product: str | None = None,
    detail: str | None = None,
    at: dt.datetime | None = None,
) -> None:
    """Append one change event inside the caller's transaction."""
    conn.execute(
        text(
            "INSERT INTO change_events (kind, customer_external_id, product_code, detail, "
            "origin, occurred_at) VALUES (:kind, :customer, :product, :detail, :origin, :at)"
        ),
        {
            "kind": kind,
            "customer": customer,
            "product": product,
            "detail": detail,
            "origin": origin,
            "at": at or dt.datetime.now(dt.UTC),
        },
    )
