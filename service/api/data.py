"""The bank's systems push changes: POST /v1/adoptions, PUT /v1/customers/{customer_id}.

Each write commits with a change event, and the worker re-reads and re-scores the
customers before answering, so the next decision (on any worker, within the poll
interval) never offers what the customer took this morning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service import validation
from service.api.deps import EngineDep, ServingDep, SettingsDep
from service.auth import Principal, require
from service.data.db import unit_of_work
from service.data.tables import Adoption, AttributeDefinition, Customer, Product
from service.decision.state import record_event
from service.errors import Invalid
from service.schemas import (
    AdoptionsRequest,
    AdoptionsResponse,
    CustomerRequest,
    CustomerResponse,
    Identifier,
)

router = APIRouter(prefix="/v1", tags=["data"])

CustomerIdPath = Annotated[
    Identifier,
    Path(
        min_length=1, max_length=validation.MAX_CUSTOMER_ID, description="The bank's customer id."
    ),
]
AttributeValue = float | int | str | None


@router.post(
    "/adoptions",
    operation_id="pushAdoptions",
    summary="Push new adoptions (and closures)",
    description=(
        "Up to 1,000 adoptions of known customers and products. A row already recorded "
        "(same customer, product and day) updates its closing day. Needs scope 'data'."
    ),
    response_model=AdoptionsResponse,
    responses={422: {"description": "Unknown customer or product (the field is named)."}},
)
def push_adoptions(
    body: AdoptionsRequest,
    principal: Annotated[Principal, Depends(require("data"))],
    engine: EngineDep,
    state: ServingDep,
) -> AdoptionsResponse:
    today = state.clock().date()
    added = updated = 0
    with unit_of_work(engine) as session:
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
                    errors=[
                        {"field": f"body.adoptions.{i}.closed_at", "message": "before adopted_at"}
                    ],
                )
            for name, day in (("adopted_at", adopted), ("closed_at", item.closed_at)):
                if day is not None and day > today:
                    raise Invalid(
                        f"body.adoptions.{i}.{name}: {day} is in the future",
                        errors=[
                            {"field": f"body.adoptions.{i}.{name}", "message": "in the future"}
                        ],
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
                origin=state.origin,
                customer=item.customer_id,
                product=item.product_code,
            )
    state.refresh_customers(a.customer_id for a in body.adoptions)
    return AdoptionsResponse(received=len(body.adoptions), added=added, updated=updated)


@router.put(
    "/customers/{customer_id}",
    operation_id="putCustomer",
    summary="Create or update a customer",
    description=(
        "Sets the customer's segment, branch, dates and attributes (attributes are merged "
        "with those held; a null removes one). Numeric attributes must be numbers. "
        "Attribute names are letters, digits and _ (not starting with a digit, at most 63 "
        "characters, not a fixed column); dates lie between 1900-01-01 and a year from "
        "today (a birth date not after today); numbers are finite, within +-1e15. "
        "Concurrent updates of one customer are applied one after the other. "
        "201 when created, 200 when updated. Needs scope 'data'."
    ),
    response_model=CustomerResponse,
    responses={
        201: {"description": "Created.", "model": CustomerResponse},
        422: {"description": "A field is invalid (the field is named)."},
    },
)
def put_customer(
    response: Response,
    customer_id: CustomerIdPath,
    body: CustomerRequest,
    principal: Annotated[Principal, Depends(require("data"))],
    engine: EngineDep,
    state: ServingDep,
    settings: SettingsDep,
) -> CustomerResponse:
    with unit_of_work(engine) as session:
        _define_attributes(session, body.attributes, limit=settings.max_attributes)
        row, created = _locked_customer(session, customer_id)
        fields = body.model_fields_set
        for name in ("segment", "branch_id", "joined_at", "birth_date"):
            if name in fields or created:
                setattr(row, name, getattr(body, name))
        merged: dict[str, Any] = dict(row.attributes or {})
        for name, value in body.attributes.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        row.attributes = merged
        session.flush()
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
        record_event(
            session.connection(), kind="customer", origin=state.origin, customer=customer_id
        )
        answer = CustomerResponse(
            customer_id=customer_id,
            created=created,
            segment=row.segment,
            branch_id=row.branch_id,
            joined_at=row.joined_at,
            birth_date=row.birth_date,
            attributes=merged,
            holdings=holdings,
        )
    state.refresh_customers([customer_id])
    response.status_code = 201 if created else 200
    return answer


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
