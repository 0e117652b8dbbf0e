"""The bank's systems push changes: POST /v1/adoptions, PUT /v1/customers/{customer_id}.

Each write commits with a change event, and the worker re-reads and re-scores the
customers before answering, so the next decision (on any worker, within the poll
interval) never offers what the customer took this morning.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from service import validation
from service.api.deps import EngineDep, ServingDep, SettingsDep
from service.auth import Principal, require
from service.data import customers
from service.data.db import unit_of_work
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
    with unit_of_work(engine) as session:
        answer = customers.record_adoptions(session, body=body, today=today, origin=state.origin)
    state.refresh_customers(a.customer_id for a in body.adoptions)
    return answer


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
        answer = customers.put_customer(
            session,
            customer_id=customer_id,
            body=body,
            origin=state.origin,
            max_attributes=settings.max_attributes,
        )
    state.refresh_customers([customer_id])
    response.status_code = 201 if answer.created else 200
    return answer
