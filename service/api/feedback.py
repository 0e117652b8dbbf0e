"""POST /v1/feedback: a customer's NPS or CSAT answer after a contact.

A detractor NPS answer (0-6) about a contact in which the customer was offered
something is the contact-policy guardrail: it suppresses offers to that customer for
``detractor_suppress_days``. The answer is recorded with a change event in one
transaction, so every serving worker applies the suppression within its poll interval.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metrics
from service.api.deps import EngineDep, ServingDep
from service.auth import Principal, require
from service.data.db import unit_of_work
from service.data.tables import Customer, Decision, Feedback
from service.decision.state import ServingState, record_event
from service.errors import Conflict, Invalid
from service.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(prefix="/v1", tags=["feedback"])

SCORE_RANGES = {"nps": (0, 10), "csat": (1, 5)}


def category(kind: str, score: int) -> str:
    """NPS: promoter 9-10, passive 7-8, detractor 0-6; CSAT: satisfied 4-5, neutral 3,
    dissatisfied 1-2."""
    if kind == "nps":
        return "promoter" if score >= 9 else ("passive" if score >= 7 else "detractor")
    return "satisfied" if score >= 4 else ("neutral" if score == 3 else "dissatisfied")


@router.post(
    "/feedback",
    operation_id="recordFeedback",
    summary="Record a customer's NPS or CSAT answer",
    description=(
        "An NPS answer (0-10) or CSAT answer (1-5) about a contact (`decision_id`) or a "
        "customer, with the staff member and branch (taken from the decision when not "
        "given) and an optional comment. A detractor NPS answer (0-6) about a contact "
        "with offers suppresses offers to the customer for the configured number of days. "
        "Idempotent with an `Idempotency-Key` header; keys belong to the API key that "
        "sends them (another caller's keys never collide with yours). Needs scope "
        "'outcomes'."
    ),
    status_code=201,
    response_model=FeedbackResponse,
    responses={
        200: {
            "description": "A retry: the answer was already recorded.",
            "model": FeedbackResponse,
        },
        401: {"description": "Missing or invalid API key."},
        403: {"description": "The key lacks scope 'outcomes'."},
        409: {"description": "This API key used the Idempotency-Key for a different answer."},
        422: {"description": "Score out of range, or unknown decision or customer (named)."},
    },
)
def record_feedback(
    response: Response,
    body: FeedbackRequest,
    principal: Annotated[Principal, Depends(require("outcomes"))],
    engine: EngineDep,
    state: ServingDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> FeedbackResponse:
    low, high = SCORE_RANGES[body.kind]
    if not low <= body.score <= high:
        raise Invalid(
            f"score: {body.score} is outside {low}-{high}, the range of kind '{body.kind}'",
            errors=[{"field": "body.score", "message": f"must be {low}-{high} for {body.kind}"}],
        )
    if body.decision_id is None and body.customer_id is None:
        raise Invalid(
            "decision_id: give the contact the answer is about, or at least customer_id",
            errors=[{"field": "body.decision_id", "message": "decision_id or customer_id needed"}],
        )
    now = state.clock()
    key = (principal.prefix, idempotency_key)
    try:
        result, duplicate = _store(engine, state, body, key, now)
    except IntegrityError:
        # A concurrent retry with the same key won the race: answer with what it stored.
        result, duplicate = _store(engine, state, body, key, now)
    if duplicate:
        response.status_code = 200
    else:
        metrics.FEEDBACK.labels(body.kind).inc()
        if result.offers_suppressed_until is not None and result.customer_id is not None:
            state.history[result.customer_id].add_detractor(now)
    if not (principal.allows("reports") or principal.allows("models")):
        result = result.model_copy(update={"offers_suppressed_until": None})
    return result


def _store(
    engine: Engine,
    state: ServingState,
    body: FeedbackRequest,
    scoped_key: tuple[str, str | None],
    now: dt.datetime,
) -> tuple[FeedbackResponse, bool]:
    """Record ``body`` unless this API key (prefix, idempotency key) already did.

    Only the caller's own idempotency keys are looked at, so a 409 says nothing about
    other callers' answers.
    """
    prefix, key = scoped_key
    with unit_of_work(engine) as session:
        if key is not None:
            existing = session.scalar(
                select(Feedback).where(
                    Feedback.api_key_prefix == prefix, Feedback.idempotency_key == key
                )
            )
            if existing is not None:
                if existing.kind != body.kind or existing.score != body.score:
                    raise Conflict(
                        f"Idempotency-Key '{key}' was already used by this API key for a "
                        f"{existing.kind} answer of {existing.score}"
                    )
                customer = None
                if existing.customer_id is not None:
                    customer = session.scalar(
                        select(Customer.external_id).where(Customer.id == existing.customer_id)
                    )
                return _answer(existing, customer, None, duplicate=True), True
        decision = None
        if body.decision_id is not None:
            decision = session.execute(
                select(
                    Decision.customer_id,
                    Decision.customer_external_id,
                    Decision.staff_id,
                    Decision.branch_id,
                ).where(Decision.id == body.decision_id)
            ).first()
            if decision is None:
                raise Invalid(
                    f"decision_id: decision '{body.decision_id}' does not exist",
                    errors=[{"field": "body.decision_id", "message": "unknown decision"}],
                )
        customer_external = body.customer_id
        customer_db_id = None
        if decision is not None:
            if customer_external is not None and customer_external != decision.customer_external_id:
                raise Invalid(
                    f"customer_id: decision '{body.decision_id}' was for another customer",
                    errors=[
                        {"field": "body.customer_id", "message": "not the decision's customer"}
                    ],
                )
            customer_external = decision.customer_external_id
            customer_db_id = decision.customer_id
        elif customer_external is not None:
            customer_db_id = session.scalar(
                select(Customer.id).where(Customer.external_id == customer_external)
            )
            if customer_db_id is None:
                raise Invalid(
                    f"customer_id: customer '{customer_external}' is not known",
                    errors=[{"field": "body.customer_id", "message": "unknown customer"}],
                )
        row = Feedback(
            kind=body.kind,
            score=body.score,
            decision_id=body.decision_id,
            customer_id=customer_db_id,
            staff_id=body.staff_id or (decision.staff_id if decision is not None else None),
            branch_id=body.branch_id or (decision.branch_id if decision is not None else None),
            comment=body.comment,
            api_key_prefix=prefix,
            idempotency_key=key,
            created_at=now,
        )
        session.add(row)
        session.flush()
        until = None
        if _is_detractor_after_offer(session, body) and customer_external is not None:
            until = now + dt.timedelta(days=state.settings.detractor_suppress_days)
            record_event(
                session.connection(),
                kind="outcome",
                origin=state.origin,
                customer=customer_external,
                detail="detractor",
                at=now,
            )
        return _answer(row, customer_external, until, duplicate=False), False


def _is_detractor_after_offer(session: Session, body: FeedbackRequest) -> bool:
    if body.kind != "nps" or category("nps", body.score) != "detractor":
        return False
    if body.decision_id is None:
        return False
    offered = session.execute(
        text("SELECT 1 FROM offers WHERE decision_id = :d LIMIT 1"), {"d": body.decision_id}
    ).first()
    return offered is not None


def _answer(
    row: Feedback, customer: str | None, until: dt.datetime | None, *, duplicate: bool
) -> FeedbackResponse:
    return FeedbackResponse(
        feedback_id=row.id,
        kind=row.kind,  # type: ignore[arg-type]
        score=row.score,
        category=category(row.kind, row.score),  # type: ignore[arg-type]
        decision_id=row.decision_id,
        customer_id=customer,
        staff_id=row.staff_id,
        branch_id=row.branch_id,
        duplicate=duplicate,
        offers_suppressed_until=until,
        recorded_at=row.created_at,
    )
