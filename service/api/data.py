"""The bank's systems push changes: POST /v1/adoptions, PUT /v1/customers/{customer_id}.

Each write commits with a change event, and the worker re-reads and re-scores the
customers before answering, so the next decision (on any worker, within the poll
interval) never offers what the customer took this morning.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from sqlalchemy import select, text

from service.auth import Principal, require
from service.db import unit_of_work
from service.errors import Invalid
from service.schemas import (
    AdoptionsRequest,
    AdoptionsResponse,
    CustomerRequest,
    CustomerResponse,
    Text,
)
from service.serving import ServingState, record_event
from service.tables import Adoption, AttributeDefinition, Customer, Product

router = APIRouter(prefix="/v1", tags=["data"])


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
    request: Request,
    body: AdoptionsRequest,
    principal: Annotated[Principal, Depends(require("data"))],
) -> AdoptionsResponse:
    state: ServingState = request.app.state.serving
    today = state.clock().date()
    added = updated = 0
    with unit_of_work(request.app.state.engine) as session:
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
                    f"adoptions.{i}.customer_id: unknown customer '{item.customer_id}'",
                    errors=[{"field": f"adoptions.{i}.customer_id", "message": "unknown customer"}],
                )
            if item.product_code not in products:
                raise Invalid(
                    f"adoptions.{i}.product_code: unknown product '{item.product_code}'",
                    errors=[{"field": f"adoptions.{i}.product_code", "message": "unknown product"}],
                )
            adopted = item.adopted_at or today
            if item.closed_at is not None and item.closed_at < adopted:
                raise Invalid(
                    f"adoptions.{i}.closed_at: {item.closed_at} is before adopted_at {adopted}",
                    errors=[{"field": f"adoptions.{i}.closed_at", "message": "before adopted_at"}],
                )
            if adopted > today:
                raise Invalid(
                    f"adoptions.{i}.adopted_at: {adopted} is in the future",
                    errors=[{"field": f"adoptions.{i}.adopted_at", "message": "in the future"}],
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
        "201 when created, 200 when updated. Needs scope 'data'."
    ),
    response_model=CustomerResponse,
    responses={201: {"description": "Created.", "model": CustomerResponse}},
)
def put_customer(
    request: Request,
    response: Response,
    customer_id: Annotated[Text, Path(min_length=1, max_length=128)],
    body: CustomerRequest,
    principal: Annotated[Principal, Depends(require("data"))],
) -> CustomerResponse:
    state: ServingState = request.app.state.serving
    with unit_of_work(request.app.state.engine) as session:
        kinds = dict(
            session.execute(select(AttributeDefinition.name, AttributeDefinition.kind)).all()
        )
        for name, value in body.attributes.items():
            kind = kinds.get(name)
            if kind == "numeric" and value is not None and not isinstance(value, int | float):
                raise Invalid(
                    f"attributes.{name}: must be a number, not {value!r}",
                    errors=[{"field": f"attributes.{name}", "message": "must be a number"}],
                )
        row = session.scalar(select(Customer).where(Customer.external_id == customer_id))
        created = row is None
        if row is None:
            row = Customer(external_id=customer_id, attributes={})
            session.add(row)
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
                if name not in kinds:
                    kind = "numeric" if isinstance(value, int | float) else "categorical"
                    session.add(AttributeDefinition(name=name, kind=kind))
                    kinds[name] = kind
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
