"""POST /v1/customers/{customer_id}/decisions and POST /v1/offers/{offer_id}/outcome."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Path, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from service import metrics
from service.audit import AuditRecord, NotRecorded, derived_id, new_id
from service.auth import Principal, _api_key_scheme, _bearer_scheme, require
from service.db import unit_of_work
from service.decisioning import Choice, in_control_group, popular_products
from service.errors import Conflict, NotFound, TooLarge, Unavailable
from service.schemas import (
    DecisionRequest,
    DecisionResponse,
    OutcomeRequest,
    OutcomeResponse,
    Text,
)
from service.serving import (
    CustomerEntry,
    Pitch,
    ServingState,
    Snapshot,
    pitch,
    record_event,
    talking_point,
)
from service.settings import Settings
from service.tables import Adoption, Decision, Offer, OfferOutcome, Product

router = APIRouter(prefix="/v1", tags=["decisions"])

MAX_CUSTOMER_ID = 128
MAX_DECISION_BODY = 64 * 1024
CustomerId = Annotated[
    Text, Path(min_length=1, max_length=MAX_CUSTOMER_ID, description="The bank's customer id.")
]
# The same rules, for the fast lane (which reads the id from the path itself).
_CUSTOMER_ID = TypeAdapter(Annotated[Text, Field(min_length=1, max_length=MAX_CUSTOMER_ID)])


@functools.cache
def _stage(name: str) -> metrics.Tally:
    return metrics.tally(metrics.DECISION_STAGE_SECONDS, name)


@router.post(
    "/customers/{customer_id}/decisions",
    operation_id="createDecision",
    summary="Next best offers for a customer at contact",
    description=(
        "Ranks the products the customer may be offered now (eligible, not held, not "
        "recently declined, under the frequency caps, above the minimum propensity) by "
        "propensity x value x business weight, records the decision and its offers, and "
        "answers with each offer's reasons. An empty list is a valid answer. Needs scope "
        "'decisions'."
    ),
    response_model=DecisionResponse,
    responses={
        404: {"description": "Unknown customer (unless cold start is configured)."},
        401: {"description": "Missing or invalid API key."},
        403: {"description": "The key lacks scope 'decisions'."},
        503: {
            "description": "The decision could not be recorded (database and local spool "
            "both failed): no offer is made."
        },
    },
    dependencies=[Security(_bearer_scheme), Security(_api_key_scheme)],
)
async def create_decision(
    request: Request, customer_id: CustomerId, body: DecisionRequest
) -> Response:
    # The contract as documented; requests are served by serve_decision (same answer).
    principal = request.app.state.keys.authenticate(
        request.headers.get("authorization"), request.headers.get("x-api-key"), "decisions"
    )
    answer = await _respond(request.app, customer_id, body, principal)
    return Response(orjson.dumps(answer), media_type="application/json")


async def serve_decision(app: Any, scope: Any, receive: Any, customer_id: str) -> bytes:
    """``POST /v1/customers/{customer_id}/decisions`` as served (by the app's fast lane):
    the JSON body of the 200 answer.

    The hot path of the service. FastAPI's parameter and dependency machinery, and even
    Starlette's request and response objects, cost as much per request as the decision
    itself, so this reads the key, the path and the body straight from the ASGI scope
    and messages, validating them with the same rules (the pydantic model of
    :func:`create_decision`, which documents the operation in the OpenAPI spec);
    failures raise the same problems, field named as FastAPI does.
    """
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    principal = app.state.keys.authenticate(authorization, api_key, "decisions")
    try:
        _CUSTOMER_ID.validate_python(customer_id)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("path", "customer_id")} for error in exc.errors()]
        ) from None
    try:
        body = DecisionRequest.model_validate_json(await _bounded_body(receive))
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None
    return orjson.dumps(await _respond(app, customer_id, body, principal))


async def _bounded_body(receive: Any) -> bytes:
    """The request body, read from ASGI ``http.request`` messages (at most
    ``MAX_DECISION_BODY`` bytes)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_DECISION_BODY:
            raise TooLarge(f"the request body is over {MAX_DECISION_BODY:,} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    app: Any, customer_id: str, body: DecisionRequest, principal: Principal
) -> dict[str, Any]:
    state: ServingState = app.state.serving
    settings: Settings = app.state.settings
    started = time.perf_counter()
    snapshot = state.snapshot
    entry: CustomerEntry | None = None
    lookup_failed = False
    if snapshot is not None:
        entry = snapshot.customers.get(customer_id)
        if entry is None:
            try:
                entry = await asyncio.to_thread(state.lookup, customer_id)
            except Exception:  # noqa: BLE001 - the database is down: answer degraded
                lookup_failed = True
    _stage("lookup").observe(time.perf_counter() - started)
    now = state.clock()
    answer = _decide(
        state,
        snapshot,
        entry,
        customer_id,
        body,
        principal,
        settings,
        now,
        lookup_failed,
        app.state.audit.stamp(now),
    )
    record = answer.pop("_record")
    result = answer["result"]
    recorded_at = time.perf_counter()
    if record is not None:
        try:
            durable = await app.state.audit.write(record)
        except NotRecorded:
            metrics.tally(metrics.DECISIONS, body.channel, "failed").inc()
            raise Unavailable(
                "the decision could not be recorded (the database and the local audit spool "
                "both failed), so no offer is made; retry shortly"
            ) from None
        if not durable:
            answer["degraded"] = True
            result = "degraded"
        if answer["offers"]:
            state.remember_offers(customer_id, answer["offers"], now)
    _stage("record").observe(time.perf_counter() - recorded_at)
    metrics.tally(metrics.DECISIONS, body.channel, result).inc()
    for offer in answer["offers"]:
        metrics.tally(metrics.OFFERS, offer["product_code"]).inc()
    del answer["result"]
    return answer


def _decide(
    state: ServingState,
    snapshot: Snapshot | None,
    entry: CustomerEntry | None,
    customer_id: str,
    body: DecisionRequest,
    principal: Principal,
    settings: Settings,
    now: dt.datetime,
    lookup_failed: bool,
    stamp: str,
) -> dict[str, Any]:
    decision_id = new_id()
    announce = settings.workers > 1
    base: dict[str, Any] = {
        "decision_id": decision_id,
        "customer_id": customer_id,
        "model_version": None if snapshot is None else snapshot.version,
        "control": False,
        "degraded": snapshot is None or snapshot.degraded or lookup_failed,
        "cold_start": False,
        "offers": [],
        "suppressed": None,
        "note": None,
        "created_at": now,
    }
    if snapshot is None or lookup_failed:
        # Nothing known about the customer: offering anything could offer a held product.
        base["note"] = "customer data unavailable; no offers rather than a wrong one"
        base["result"] = "degraded"
        base["_record"] = _record(base, body, None, [], [], state, stamp, announce)
        return base
    control = None if entry is None else entry.control
    if control is None:  # a hash per customer, not per request
        control = in_control_group(
            customer_id, share=settings.control_share, salt=settings.control_salt
        )
        if entry is not None:
            entry.control = control
    if entry is None:
        if not settings.cold_start:
            raise NotFound(
                f"customer '{customer_id}' is not known; push it with PUT /v1/customers/{customer_id}"
            )
        base["cold_start"] = True
        base["control"] = control
        offers: list[dict[str, Any]] = []
        rows: list[tuple[Any, ...]] = []
        if not control:
            offers, rows = _cold_start_offers(snapshot, body, decision_id, stamp)
        base["offers"] = offers
        base["result"] = "control" if control else ("cold_start" if offers else "empty")
        if not offers:
            base["note"] = "control group" if control else "no popular product to offer"
        base["_record"] = _record(base, body, None, offers, rows, state, stamp, announce)
        return base
    started = time.perf_counter()
    catalogue = snapshot.catalogue
    propensity = entry.propensity
    if snapshot.degraded:
        # No model: the segment's most adopted eligible products, in popularity order.
        counts = snapshot.popularity.get(entry.state.segment) or snapshot.popularity.get(None, {})
        total = max(sum(counts.values()), 1)
        propensity = propensity.copy()
        for code, k in catalogue.index.items():
            if propensity[k] == propensity[k]:
                propensity[k] = counts.get(code, 0) / total
    explain = principal.allows("models")
    ranking = snapshot.arbiter.rank(
        propensity,
        history=state.history.get(customer_id),
        now=now,
        limit=body.max_offers,
        explain=explain,
    )
    _stage("policy").observe(time.perf_counter() - started)
    base["control"] = control
    if explain:
        base["suppressed"] = dict(ranking.suppressed)
    if control:
        base["note"] = "control group: no model offers, by design"
        base["result"] = "control"
        base["_record"] = _record(base, body, entry, [], [], state, stamp, announce)
        return base
    started = time.perf_counter()
    offers, rows = _offers(
        snapshot, entry, ranking.offers, body.explain, decision_id=decision_id, stamp=stamp
    )
    _stage("scoring").observe(time.perf_counter() - started)
    base["offers"] = offers
    if ranking.detractor_until is not None:
        # Why is the customer's own feedback: said to callers allowed to see reports or
        # models; a teller system hears only that the contact policy holds offers back.
        if principal.allows("reports") or principal.allows("models"):
            base["note"] = (
                f"no offers until {ranking.detractor_until:%Y-%m-%d}: the customer gave a "
                "detractor NPS answer (0-6) after an offer"
            )
        else:
            base["note"] = "contact policy: no offers to this customer at the moment"
    elif not offers and any(r in _POLICY_REASONS for r in ranking.suppressed.values()):
        base["note"] = (
            "contact policy: the products worth offering were declined or offered recently enough"
        )
    elif not offers:
        base["note"] = "no product is likely enough to be worth offering now"
    base["result"] = "degraded" if snapshot.degraded else ("normal" if offers else "empty")
    base["_record"] = _record(base, body, entry, offers, rows, state, stamp, announce)
    return base


_POLICY_REASONS = frozenset({"declined_recently", "frequency_cap"})


def _offers(
    snapshot: Snapshot,
    entry: CustomerEntry,
    choices: tuple[Choice, ...],
    explain: bool,
    *,
    decision_id: str,
    stamp: str,
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """The answer's offers and their audit rows."""
    if not choices:
        return [], []
    degraded = snapshot.degraded
    said = {} if degraded else snapshot.pitches(entry)
    contributions: dict[str, list[dict[str, Any]]] = {}
    model = snapshot.model
    if explain and model is not None and not degraded:
        codes = [c.product_code for c in choices if c.product_code in model.product_codes]
        try:
            found = model.explain_many(
                entry.state,
                codes,
                as_of=entry.as_of if entry.as_of is not None else snapshot.as_of,
                catalogue=snapshot.catalogue,
            )
        except (KeyError, ValueError):
            found = []
        contributions = {
            e.product_code: [
                {
                    "feature": c.feature,
                    "label": c.label,
                    "value": c.value,
                    "contribution": round(c.contribution, 4),
                }
                for c in e.contributions
            ]
            for e in found
        }
    kind = "degraded" if degraded else "model"
    offers: list[dict[str, Any]] = []
    rows: list[tuple[Any, ...]] = []
    for position, choice in enumerate(choices, start=1):
        code = choice.product_code
        pitched = said.get(code) or snapshot.plain(code, kind)
        factors = contributions.get(code)
        if factors:
            rule = pitched.rule
            sentence = pitched.reasons["rule"]
            name = snapshot.names.get(code, code)
            pitched = pitch(rule, sentence, talking_point(name, sentence, factors), factors)
        _offer(snapshot, entry.db_id, choice, position, pitched, decision_id, stamp, offers, rows)
    return offers, rows


def _offer(
    snapshot: Snapshot,
    customer_db_id: int | None,
    choice: Choice,
    position: int,
    pitched: Pitch,
    decision_id: str,
    stamp: str,
    offers: list[dict[str, Any]],
    rows: list[tuple[Any, ...]],
) -> None:
    """Add one offer to the answer's ``offers``, and its audit row to ``rows``."""
    code = choice.product_code
    offer_id = derived_id(decision_id, position)
    propensity = round(choice.propensity, 6)
    expected = round(choice.expected_value, 4)
    score = round(choice.score, 6)
    offers.append(
        {
            "offer_id": offer_id,
            "product_code": code,
            "product_name": snapshot.names.get(code, code),
            "rank": position,
            "propensity": propensity,
            "expected_value": expected,
            "score": score,
            "reasons": pitched.reasons,
            "talking_point": pitched.talking_point,
        }
    )
    rows.append(
        (
            offer_id,
            decision_id,
            customer_db_id,
            snapshot.product_ids[code],
            position,
            propensity,
            expected,
            score,
            pitched.reasons_json,
            stamp,
        )
    )


def _cold_start_offers(
    snapshot: Snapshot, body: DecisionRequest, decision_id: str, stamp: str
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    catalogue = snapshot.catalogue
    counts = snapshot.popularity.get(None, {})
    total = max(sum(counts.values()), 1)
    inactive = frozenset(
        c for c, ok in zip(catalogue.product_codes, catalogue.active, strict=True) if not ok
    )
    # Without the customer's holdings, only products with no requirement are safe to offer.
    unsafe = frozenset(
        code
        for code, requires, segments, lo, hi in zip(
            catalogue.product_codes,
            catalogue.requires,
            catalogue.segments,
            catalogue.min_age,
            catalogue.max_age,
            strict=True,
        )
        if requires or segments is not None or lo == lo or hi == hi
    )
    codes = popular_products(counts, exclude=inactive | unsafe, limit=body.max_offers)
    offers: list[dict[str, Any]] = []
    rows: list[tuple[Any, ...]] = []
    for position, code in enumerate(codes, start=1):
        k = catalogue.index[code]
        share = counts.get(code, 0) / total
        expected = share * float(catalogue.values[k])
        choice = Choice(k, code, share, expected, expected * float(catalogue.business_weights[k]))
        pitched = snapshot.plain(code, "cold_start")
        _offer(snapshot, None, choice, position, pitched, decision_id, stamp, offers, rows)
    return offers, rows


def _record(
    answer: dict[str, Any],
    body: DecisionRequest,
    entry: CustomerEntry | None,
    offers: list[dict[str, Any]],
    rows: list[tuple[Any, ...]],
    state: ServingState,
    stamp: str,
    announce: bool,
) -> AuditRecord:
    """The audit rows, as driver-ready tuples (see :class:`service.audit.AuditRecord`);
    ``rows`` are the offers' (made with them, by :func:`_offer`)."""
    customer = answer["customer_id"]
    decision = [
        answer["decision_id"],
        None if entry is None else entry.db_id,
        customer,
        body.channel,
        body.staff_id,
        body.branch_id,
        None if body.context is None else orjson.dumps(body.context).decode(),
        answer["model_version"],
        answer["control"],
        answer["degraded"],
        answer["cold_start"],
        stamp,
    ]
    events = []
    if announce:
        origin = state.origin
        events = [
            ("offer", customer, offer["product_code"], offer["offer_id"], origin, stamp)
            for offer in offers
        ]
    return AuditRecord(decision, rows, events)


# --------------------------------------------------------------------------- outcomes


@router.post(
    "/offers/{offer_id}/outcome",
    operation_id="recordOutcome",
    summary="Record what the customer said to an offer",
    description=(
        "presented, accepted, declined or not_now. Idempotent: a retry with the same "
        "Idempotency-Key, or the same outcome for the same offer, is recorded once and "
        "answered 200 with duplicate=true. An accepted offer adds the product to the "
        "customer's holdings; a decline stops the product being offered to the customer "
        "for the cooldown. Needs scope 'outcomes'."
    ),
    response_model=OutcomeResponse,
    status_code=201,
    responses={
        200: {"description": "Already recorded (a retry).", "model": OutcomeResponse},
        404: {"description": "Unknown offer."},
        409: {"description": "The Idempotency-Key was used for a different outcome."},
    },
)
def record_outcome(
    request: Request,
    response: Response,
    offer_id: Annotated[Text, Path(min_length=1, max_length=36)],
    body: OutcomeRequest,
    principal: Annotated[Principal, Depends(require("outcomes"))],
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> OutcomeResponse:
    state: ServingState = request.app.state.serving
    engine = request.app.state.engine
    now = state.clock()
    try:
        result = _store_outcome(engine, state, offer_id, body, idempotency_key, now)
    except IntegrityError:
        # A concurrent retry won the race: answer with what it stored.
        result = _store_outcome(engine, state, offer_id, body, idempotency_key, now)
    outcome, duplicate = result
    if duplicate:
        response.status_code = 200
    else:
        metrics.OUTCOMES.labels(outcome.product_code, outcome.outcome).inc()
        refresh: set[str] = set()
        detail = outcome.outcome
        state.apply_event(
            "outcome", outcome.customer_id, outcome.product_code, detail, now, refresh
        )
        if refresh:
            state.refresh_customers(refresh)
    return outcome


def _store_outcome(
    engine: Any,
    state: ServingState,
    offer_id: str,
    body: OutcomeRequest,
    key: str | None,
    now: dt.datetime,
) -> tuple[OutcomeResponse, bool]:
    with unit_of_work(engine) as session:
        row = session.execute(
            select(
                Offer.id,
                Offer.customer_id,
                Offer.product_id,
                Product.code,
                Decision.customer_external_id,
            )
            .join(Product, Product.id == Offer.product_id)
            .join(Decision, Decision.id == Offer.decision_id)
            .where(Offer.id == offer_id)
        ).first()
        if row is None:
            raise NotFound(f"offer '{offer_id}' does not exist")
        _, customer_db_id, product_db_id, code, customer = row
        existing = None
        if key is not None:
            existing = session.scalar(
                select(OfferOutcome).where(OfferOutcome.idempotency_key == key)
            )
            if existing is not None and (
                existing.offer_id != offer_id or existing.outcome != body.outcome
            ):
                raise Conflict(
                    f"Idempotency-Key '{key}' was already used for outcome "
                    f"'{existing.outcome}' of offer '{existing.offer_id}'"
                )
        if existing is None:
            existing = session.scalar(
                select(OfferOutcome).where(
                    OfferOutcome.offer_id == offer_id, OfferOutcome.outcome == body.outcome
                )
            )
        if existing is not None:
            return (
                OutcomeResponse(
                    offer_id=offer_id,
                    outcome=existing.outcome,  # type: ignore[arg-type]
                    product_code=code,
                    customer_id=customer,
                    duplicate=True,
                    recorded_at=existing.created_at,
                ),
                True,
            )
        session.add(
            OfferOutcome(
                offer_id=offer_id,
                outcome=body.outcome,
                reason=body.reason,
                staff_id=body.staff_id,
                idempotency_key=key,
                created_at=now,
            )
        )
        session.flush()
        conn = session.connection()
        if body.outcome == "accepted" and customer_db_id is not None:
            held = conn.execute(
                text(
                    "SELECT 1 FROM adoptions WHERE customer_id = :c AND product_id = :p "
                    "AND closed_at IS NULL"
                ),
                {"c": customer_db_id, "p": product_db_id},
            ).first()
            if held is None:
                session.add(
                    Adoption(
                        customer_id=customer_db_id,
                        product_id=product_db_id,
                        adopted_at=now.date(),
                        source="offer",
                    )
                )
                session.flush()
        record_event(
            conn,
            kind="outcome",
            origin=state.origin,
            customer=customer,
            product=code,
            detail=body.outcome,
            at=now,
        )
    return (
        OutcomeResponse(
            offer_id=offer_id,
            outcome=body.outcome,
            product_code=code,
            customer_id=customer,
            duplicate=False,
            recorded_at=now,
        ),
        False,
    )
