"""POST /v1/feedback: a customer's NPS or CSAT answer after a contact.

A detractor NPS answer (0-6) about a contact in which the customer was offered
something is the contact-policy guardrail: it suppresses offers to that customer for
``detractor_suppress_days``. The answer is recorded (service.data.feedback) with a
change event in one transaction, so every serving worker applies the suppression within
its poll interval; this worker applies it at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response

from service import metrics
from service.api.deps import EngineDep, ServingDep
from service.auth import Principal, require
from service.data import feedback
from service.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(prefix="/v1", tags=["feedback"])


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
    now = state.clock()
    result, duplicate = feedback.record_answer(
        engine,
        body=body,
        api_key_prefix=principal.prefix,
        idempotency_key=idempotency_key,
        now=now,
        origin=state.origin,
        suppress_days=state.settings.detractor_suppress_days,
    )
    if duplicate:
        response.status_code = 200
    else:
        metrics.FEEDBACK.labels(body.kind).inc()
        if result.offers_suppressed_until is not None and result.customer_id is not None:
            state.history[result.customer_id].add_detractor(now)
    if not (principal.allows("reports") or principal.allows("models")):
        result = result.model_copy(update={"offers_suppressed_until": None})
    return result
