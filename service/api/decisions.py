"""HTTP for decisions and their outcomes: thin routes over :mod:`service.decision`.

``POST /v1/customers/{customer_id}/decisions`` is documented here and served by the code
of the decision lane (:mod:`service.decision.lane`), which also answers it ahead of
routing: see :class:`_ServedByTheLane`. ``POST /v1/offers/{offer_id}/outcome`` records
what the customer said (:mod:`service.decision.outcomes`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response, Security
from fastapi.routing import APIRoute

from service.api.deps import EngineDep, ServingDep
from service.auth import Principal, _api_key_scheme, _bearer_scheme, require
from service.decision import lane, outcomes
from service.schemas import (
    DecisionRequest,
    DecisionResponse,
    Identifier,
    OutcomeRequest,
    OutcomeResponse,
    Text,
)
from service.validation import MAX_CUSTOMER_ID

router = APIRouter(prefix="/v1", tags=["decisions"])

CustomerId = Annotated[
    Identifier,
    Path(min_length=1, max_length=MAX_CUSTOMER_ID, description="The bank's customer id."),
]
IdempotencyKey = Annotated[
    Text | None,
    Header(
        min_length=1,
        max_length=lane.MAX_IDEMPOTENCY_KEY,
        description=(
            "Makes retries safe: a retry with the same key (from the same API key, for the "
            "same customer and body) answers the same decision, counted once."
        ),
    ),
]


class _ServedByTheLane(APIRoute):
    """A route whose OpenAPI entry FastAPI makes from its endpoint's signature, and whose
    requests :func:`service.decision.lane.serve_decision` serves, as the lane does.

    FastAPI reads and validates the path and the body before any dependency runs: served
    by FastAPI, the route would answer a caller without a key 422 for a bad body rather
    than 401, and read any body up to the application-wide limit. Served by the lane's
    code, a decision that reaches routing (an app mounted in another, a server that
    bypasses :class:`service.app.NboApp`) gets what the lane answers: the key checked
    first, at most 64 KiB read, the same problems. Routing, ``root_path``, middleware and
    the error handlers stay the framework's.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _decision


async def _decision(request: Request) -> Response:
    customer_id = request.path_params["customer_id"]
    answer = await lane.serve_decision(request.app, request.scope, request.receive, customer_id)
    return Response(answer, media_type="application/json")


async def create_decision(
    customer_id: CustomerId, body: DecisionRequest, idempotency_key: IdempotencyKey = None
) -> Response:
    """The operation as documented: its parameters, body and answer, for the OpenAPI spec.
    Never called: :class:`_ServedByTheLane` serves the route."""
    raise NotImplementedError("served by service.decision.lane.serve_decision")


router.add_api_route(
    "/customers/{customer_id}/decisions",
    create_decision,
    methods=["POST"],
    route_class_override=_ServedByTheLane,
    operation_id="createDecision",
    summary="Next best offers for a customer at contact",
    description=(
        "Ranks the products the customer may be offered now (eligible, not held, not "
        "recently declined, under the frequency caps, above the minimum propensity) by "
        "propensity x value x business weight, records the decision and its offers, and "
        "answers with each offer's reasons. An empty list is a valid answer. Needs scope "
        "'decisions'.\n\n"
        "Retries: send an `Idempotency-Key` (your own unique id for the request, at most "
        "128 characters). A retry with the same key from the same API key, for the same "
        "customer and body, answers the decision already made (same `decision_id` and "
        "offers) without deciding again, so its offers count once against the frequency "
        "caps; the same key with another customer or body is 409. The worker that "
        "answered keeps keyed answers for 24 hours (its most recent 10,000); any other "
        "worker finds a decision that was recorded in the database (not one spooled "
        "during a database outage, until the spool is replayed), rebuilt from the "
        "audit record: the same offers with `suppressed` and `note` left out. Two first "
        "attempts sent at the same moment to two different workers may each be decided."
    ),
    response_model=DecisionResponse,
    responses={
        404: {"description": "Unknown customer (unless cold start is configured)."},
        409: {"description": "The Idempotency-Key was used for another customer or body."},
        401: {"description": "Missing or invalid API key."},
        403: {"description": "The key lacks scope 'decisions'."},
        503: {
            "description": "The decision could not be recorded (database and local spool "
            "both failed): no offer is made."
        },
    },
    dependencies=[Security(_bearer_scheme), Security(_api_key_scheme)],
)


@router.post(
    "/offers/{offer_id}/outcome",
    operation_id="recordOutcome",
    summary="Record what the customer said to an offer",
    description=(
        "presented, accepted, declined or not_now. An offer takes one answer: the first "
        "of accepted, declined or not_now is final, and a different one afterwards is "
        "refused with 409 naming the recorded outcome. `presented` is not an answer: it "
        "is recorded once per offer whenever it arrives, before or after the answer. "
        "Idempotent: the same outcome again for the same offer, or a retry with the same "
        "Idempotency-Key, is recorded once and answered 200 with duplicate=true. "
        "Idempotency keys belong to the API key that sends them (another caller's keys "
        "never collide with yours). An accepted offer adds the product to the customer's "
        "holdings; a decline stops the product being offered to the customer for the "
        "cooldown. Needs scope 'outcomes'."
    ),
    response_model=OutcomeResponse,
    status_code=201,
    responses={
        200: {"description": "Already recorded (a retry).", "model": OutcomeResponse},
        404: {"description": "Unknown offer."},
        409: {
            "description": "The offer already has a different final outcome (named in "
            "`recorded_outcome`), or this API key used the Idempotency-Key for another "
            "outcome or offer."
        },
    },
)
def record_outcome(
    response: Response,
    offer_id: Annotated[Text, Path(min_length=1, max_length=36)],
    body: OutcomeRequest,
    principal: Annotated[Principal, Depends(require("outcomes"))],
    serving: ServingDep,
    database: EngineDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> OutcomeResponse:
    outcome, duplicate = outcomes.record_outcome(
        offer_id,
        body,
        api_key_prefix=principal.prefix,
        idempotency_key=idempotency_key,
        serving=serving,
        database=database,
    )
    if duplicate:
        response.status_code = 200
    return outcome
