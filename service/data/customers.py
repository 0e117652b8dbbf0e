"""What the bank's systems push in about a customer: adoptions (and closures) and the
customer's own fields and attributes.

Each function writes inside the caller's transaction and appends the change event
there, so other workers learn of the write exactly when it commits; the caller
re-reads and re-scores the customers after the commit. A field that is wrong raises
:class:`service.errors.Invalid` naming it (``body.…``), as the route reports it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service import validation
from service.data import history
from service.data.events import record_event
from service.data.tables import Adoption, AttributeDefinition, Customer, Product
from service.errors import Invalid
from service.schemas import AdoptionsRequest, AdoptionsResponse, CustomerRequest, CustomerResponse

AttributeValue = float | int | str | None


def record_adoptions(
    session: Session, *, body: AdoptionsRequest, today: dt.date, origin: str
) -> AdoptionsResponse:
    """Add each adoption of a known customer and product, or update its closing day.

    An adoption is one (customer, product, adoption day); a row already recorded gets
    the closing day sent, and one that changes nothing records no event. The first
    invalid item (unknown customer or product, closed before adopted, a day after
    ``today``) raises :class:`Invalid` and the caller's transaction writes nothing.
    """
    added = updated = 0
    customers = dict(
        session.execute(
            select(Customer.external_id, Customer.id).where(
                Customer.external_id.in_({a.customer_id for a in body.adoptions})
            )
        ).all()
    )
    products = dict(session.execute(select(Product.code, Product.id)).all())
    for i, item in enumerate(body.adoptions):
        if item.customer_id not in customers:
            raise Invalid(
                f"body.adoptions.{i}.customer_id: unknown customer '{item.customer_id}'",
                errors=[
                    {"field": f"body.adoptions.{i}.customer_id", "message": "unknown customer"}
                ],
            )
        if item.product_code not in products:
            raise Invalid(
                f"body.adoptions.{i}.product_code: unknown product '{item.product_code}'",
                errors=[
                    {"field": f"body.adoptions.{i}.product_code", "message": "unknown product"}
                ],
            )
        adopted = item.adopted_at or today
        if item.closed_at is not None and item.closed_at < adopted:
            raise Invalid(
                f"body.adoptions.{i}.closed_at: {item.closed_at} is before adopted_at {adopted}",
                errors=[{"field": f"body.adoptions.{i}.closed_at", "message": "before adopted_at"}],
            )
        for name, day in (("adopted_at", adopted), ("closed_at", item.closed_at)):
            if day is not None and day > today:
                raise Invalid(
                    f"body.adoptions.{i}.{name}: {day} is in the future",
                    errors=[{"field": f"body.adoptions.{i}.{name}", "message": "in the future"}],
                )
        existing = session.scalar(
            select(Adoption).where(
                Adoption.customer_id == customers[item.customer_id],
                Adoption.product_id == products[item.product_code],
                Adoption.adopted_at == adopted,
            )
        )
        if existing is None:
            session.add(
                Adoption(
                    customer_id=customers[item.customer_id],
                    product_id=products[item.product_code],
                    adopted_at=adopted,
                    closed_at=item.closed_at,
                    source="api",
                )
            )
            added += 1
        elif existing.closed_at != item.closed_at:
            existing.closed_at = item.closed_at
            updated += 1
        else:
            continue
        session.flush()
        record_event(
            session.connection(),
            kind="adoption",
            origin=origin,
            customer=item.customer_id,
            product=item.product_code,
        )
    return AdoptionsResponse(received=len(body.adoptions), added=added, updated=updated)


def put_customer(
    session: Session,
    *,
    customer_id: str,
    body: CustomerRequest,
    origin: str,
    max_attributes: int,
    today: dt.date | None = None,
) -> CustomerResponse:
    """Create or update ``customer_id`` from ``body`` and answer what is now held.

    Fields sent replace those held (all of them when the customer is new); attributes
    are merged, a null removing one. New attribute names are defined on the way, at most
    ``max_attributes`` in all. ``created`` in the answer says whether the row is new.

    A changed attribute, segment or branch of a known customer keeps the value it
    replaced, the new one valid from ``today`` (default: today in UTC; see
    :mod:`service.data.history`); a value sent unchanged adds nothing.
    """
    _define_attributes(session, body.attributes, limit=max_attributes)
    row, created = _locked_customer(session, customer_id)
    fields = body.model_fields_set
    merged: dict[str, Any] = dict(row.attributes or {})
    sent: list[tuple[str, Any, Any]] = [
        (name, merged.get(name), value) for name, value in body.attributes.items()
    ]
    for name in ("segment", "branch_id", "joined_at", "birth_date"):
        if name in fields or created:
            if name in history.HISTORY_FIELDS and not created:
                sent.append((name, getattr(row, name), getattr(body, name)))
            else:
                setattr(row, name, getattr(body, name))
    stored = (
        {}
        if created or not sent
        else history.read_changes(session.connection(), "ch.customer_id = :c", {"c": row.id})
    )
    writes = history.HistoryWrites()
    day = today or validation.utc_today()
    for name, current, value in sent:
        before = stored.get((row.id, name), [])
        result = history.apply_change(before, current, day, value)
        if result is None:
            continue
        changes, now = result
        if changes != before:
            writes.replace(row.id, name, before, changes)
        if name in history.HISTORY_FIELDS:
            setattr(row, name, now)
        elif now is None:
            merged.pop(name, None)
        else:
            merged[name] = now
    row.attributes = merged
    # A serving store built before this change finds the customer by it, even once the
    # change log that also says so has been pruned (service.decision.store.changes_since).
    row.updated_at = dt.datetime.now(dt.UTC)
    session.flush()
    writes.write(session.connection())
    holdings = [
        code
        for (code,) in session.execute(
            text(
                "SELECT p.code FROM adoptions a JOIN products p ON p.id = a.product_id "
                "WHERE a.customer_id = :c AND a.closed_at IS NULL ORDER BY p.code"
            ),
            {"c": row.id},
        ).all()
    ]
    record_event(session.connection(), kind="customer", origin=origin, customer=customer_id)
    return CustomerResponse(
        customer_id=customer_id,
        created=created,
        segment=row.segment,
        branch_id=row.branch_id,
        joined_at=row.joined_at,
        birth_date=row.birth_date,
        attributes=merged,
        holdings=holdings,
    )


def _attribute_invalid(name: str, message: str) -> Invalid:
    field = f"body.attributes.{name}"
    return Invalid(f"{field}: {message}", errors=[{"field": field, "message": message}])


def _insert(session: Session) -> Any:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING on both databases."""
    return postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _define_attributes(
    session: Session, attributes: Mapping[str, AttributeValue], *, limit: int
) -> dict[str, str]:
    """Check ``attributes`` against the bank's definitions, define the new ones, and return
    the kind of every attribute.

    A new name is defined with ``ON CONFLICT DO NOTHING`` (in name order, so two callers
    defining several names cannot deadlock), then the kinds are read back: when another
    caller defined the same name at the same moment, its kind wins and the value is
    checked against it, instead of a unique violation answering 500.
    """
    kinds = dict(session.execute(select(AttributeDefinition.name, AttributeDefinition.kind)).all())
    new: dict[str, str] = {}
    for name, value in sorted(attributes.items()):
        if name in kinds or value is None:
            continue
        clash = validation.case_clash(name, [*kinds, *new])
        if clash is not None:
            raise _attribute_invalid(name, f"differs only in case from attribute '{clash}'")
        problem = validation.attribute_cap_problem(len(kinds), len(new) + 1, limit)
        if problem is not None:
            raise _attribute_invalid(name, problem)
        new[name] = "numeric" if isinstance(value, int | float) else "categorical"
    if new:
        insert = _insert(session)
        session.execute(
            insert(AttributeDefinition)
            .values([{"name": name, "kind": kind} for name, kind in new.items()])
            .on_conflict_do_nothing(index_elements=["name"])
        )
        kinds.update(
            session.execute(
                select(AttributeDefinition.name, AttributeDefinition.kind).where(
                    AttributeDefinition.name.in_(new)
                )
            ).all()
        )
    for name, value in attributes.items():
        if (
            kinds.get(name) == "numeric"
            and value is not None
            and not isinstance(value, int | float)
        ):
            raise _attribute_invalid(name, f"must be a number, not {value!r}")
    return kinds


def _locked_customer(session: Session, customer_id: str) -> tuple[Customer, bool]:
    """The customer's row, locked until the transaction ends, and whether it was created.

    Without the lock, two concurrent PUTs each merge their attributes into the row as
    they read it and the later commit drops the other's change. The row is first
    created if missing (``ON CONFLICT DO NOTHING``: of two concurrent creators one
    creates, the other waits and updates), then read ``FOR UPDATE`` (PostgreSQL; SQLite
    serialises writers with BEGIN IMMEDIATE, see service.data.db).
    """
    insert = _insert(session)
    created = (
        session.execute(
            insert(Customer)
            .values(external_id=customer_id, attributes={})
            .on_conflict_do_nothing(index_elements=["external_id"])
            .returning(Customer.id)
        ).first()
        is not None
    )
    row = session.scalars(
        select(Customer)
        .where(Customer.external_id == customer_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    return row, created
