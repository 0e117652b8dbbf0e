"""POST /v1/customers/{customer_id}/decisions and POST /v1/offers/{offer_id}/outcome."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Path, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from service import metrics
from service.auth import Principal, _api_key_scheme, _bearer_scheme, require
from service.data.db import read_only, unit_of_work
from service.data.tables import FINAL_OUTCOMES, Adoption, Decision, Offer, OfferOutcome, Product
from service.decision.audit import AuditRecord, NotRecorded, derived_id, new_id
from service.decision.idempotency import DecisionReplays, ScopedKey, check_same_request
from service.decision.policy import Choice, in_control_group, popular_products
from service.decision.state import (
    CustomerEntry,
    Pitch,
    ServingState,
    Snapshot,
    pitch,
    record_event,
    talking_point,
)
from service.errors import Conflict, NotFound, TooLarge, Unavailable
from service.schemas import (
    DecisionRequest,
    DecisionResponse,
    Identifier,
    OutcomeRequest,
    OutcomeResponse,
    Text,
)
from service.settings import Settings

log = logging.getLogger("nbo.decisions")

router = APIRouter(prefix="/v1", tags=["decisions"])

MAX_CUSTOMER_ID = 128
MAX_DECISION_BODY = 64 * 1024
CustomerId = Annotated[
    Identifier,
    Path(min_length=1, max_length=MAX_CUSTOMER_ID, description="The bank's customer id."),
]
# The same rules, for the fast lane (which reads the id from the path itself): an id no
# import could hold (" C1", "NaN") is a 422, not a cold-start decision recorded for it.
_CUSTOMER_ID = TypeAdapter(Annotated[Identifier, Field(min_length=1, max_length=MAX_CUSTOMER_ID)])
MAX_IDEMPOTENCY_KEY = 128
_IDEMPOTENCY_KEY = TypeAdapter(Annotated[Text, Field(min_length=1, max_length=MAX_IDEMPOTENCY_KEY)])
IdempotencyKey = Annotated[
    Text | None,
    Header(
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY,
        description=(
            "Makes retries safe: a retry with the same key (from the same API key, for the "
            "same customer and body) answers the same decision, counted once."
        ),
    ),
]


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
async def create_decision(
    request: Request,
    customer_id: CustomerId,
    body: DecisionRequest,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    # The contract as documented; requests are served by serve_decision (same answer).
    principal = await request.app.state.keys.authenticate_async(
        request.headers.get("authorization"), request.headers.get("x-api-key"), "decisions"
    )
    answer = await _answer(request.app, customer_id, body, principal, idempotency_key)
    return Response(answer, media_type="application/json")


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
    authorization = api_key = idempotency_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
        elif name == b"idempotency-key" and idempotency_key is None:
            idempotency_key = value.decode("latin-1")
    # A key in memory is checked right here; a miss reads the database in a thread.
    principal = await app.state.keys.authenticate_async(authorization, api_key, "decisions")
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
    if idempotency_key is not None:
        try:
            _IDEMPOTENCY_KEY.validate_python(idempotency_key)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": ("header", "idempotency-key")} for error in exc.errors()]
            ) from None
    return await _answer(app, customer_id, body, principal, idempotency_key)


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


async def _answer(
    app: Any, customer_id: str, body: DecisionRequest, principal: Principal, key: str | None
) -> bytes:
    """The JSON answer: decided now, or, for a retry of a keyed request, the decision
    already made (see :func:`create_decision` for the guarantee)."""
    if key is None:
        return orjson.dumps(await _respond(app, customer_id, body, principal, None))
    replays = _replays(app)
    scoped = (principal.prefix, key)
    while True:
        kept = replays.get(scoped)
        if kept is not None:
            return kept.answer_for(key, customer_id, body)
        deciding = replays.deciding(scoped)
        if deciding is None:
            break
        # A concurrent attempt with this key is being decided: wait for its answer (or
        # its failure, after which this one decides).
        await deciding.wait()
    replays.begin(scoped)
    try:
        answer = await _recorded_answer(app, scoped, customer_id, body)
        if answer is None:
            answer = orjson.dumps(await _respond(app, customer_id, body, principal, scoped))
        replays.put(scoped, customer_id, body, answer)
        return answer
    finally:
        replays.end(scoped)


def _replays(app: Any) -> DecisionReplays:
    """The app's keyed answers, made with the first keyed request."""
    try:
        replays: DecisionReplays = app.state.decision_replays
    except AttributeError:
        replays = app.state.decision_replays = DecisionReplays()
    return replays


async def _recorded_answer(
    app: Any, scoped: ScopedKey, customer_id: str, body: DecisionRequest
) -> bytes | None:
    """The answer of the decision recorded with ``scoped`` (made by another worker, or
    before a restart), rebuilt from the audit tables; None when there is none.

    A database that cannot be read counts as "none": the decision is made (degraded),
    as every decision is during an outage, rather than refused.
    """
    state: ServingState = app.state.serving
    try:
        found = await asyncio.to_thread(_read_keyed_decision, app.state.engine, scoped)
    except Exception:  # noqa: BLE001 - the database is down: decide (degraded) instead
        log.warning("keyed decision lookup failed; deciding", exc_info=True)
        return None
    if found is None:
        return None
    decision, offers = found
    # The recorded request, as far as the audit record holds it (not max_offers, explain).
    recorded = DecisionRequest.model_construct(
        channel=decision.channel,
        staff_id=decision.staff_id,
        branch_id=decision.branch_id,
        context=decision.context,
        max_offers=body.max_offers,
        explain=body.explain,
    )
    check_same_request(scoped[1], (decision.customer_external_id, recorded), (customer_id, body))
    return orjson.dumps(_rebuilt_answer(state.snapshot, decision, offers))


def _read_keyed_decision(engine: Any, scoped: ScopedKey) -> tuple[Any, list[Any]] | None:
    """The first decision recorded with ``scoped`` and its offers (blocking)."""
    prefix, key = scoped
    with unit_of_work(read_only(engine)) as session:
        decision = session.execute(
            select(
                Decision.id,
                Decision.customer_external_id,
                Decision.channel,
                Decision.staff_id,
                Decision.branch_id,
                Decision.context,
                Decision.model_version,
                Decision.control,
                Decision.degraded,
                Decision.cold_start,
                Decision.created_at,
            )
            .where(Decision.api_key_prefix == prefix, Decision.idempotency_key == key)
            .order_by(Decision.created_at, Decision.id)
            .limit(1)
        ).first()
        if decision is None:
            return None
        offers = session.execute(
            select(
                Offer.id,
                Product.code,
                Offer.rank,
                Offer.propensity,
                Offer.expected_value,
                Offer.score,
                Offer.reasons,
            )
            .join(Product, Product.id == Offer.product_id)
            .where(Offer.decision_id == decision.id)
            .order_by(Offer.rank)
        ).all()
    return decision, list(offers)


def _rebuilt_answer(snapshot: Snapshot | None, decision: Any, offers: list[Any]) -> dict[str, Any]:
    """A recorded decision as its answer: what the audit record holds, talking points
    said again from the recorded reasons; ``suppressed`` and ``note`` are not recorded."""
    names = {} if snapshot is None else snapshot.names
    kind = (
        "cold_start" if decision.cold_start else ("model" if decision.model_version else "degraded")
    )
    answered = []
    for offer in offers:
        reasons = offer.reasons or {}
        name = names.get(offer.code, offer.code)
        sentence, factors = reasons.get("rule"), reasons.get("factors") or []
        if snapshot is None or sentence or factors:
            line = talking_point(name, sentence, factors)
        else:
            line = snapshot.plain(offer.code, kind).talking_point
        answered.append(
            {
                "offer_id": offer.id,
                "product_code": offer.code,
                "product_name": name,
                "rank": offer.rank,
                "propensity": offer.propensity,
                "expected_value": offer.expected_value,
                "score": offer.score,
                "reasons": reasons,
                "talking_point": line,
            }
        )
    created = decision.created_at
    created = created.replace(tzinfo=dt.UTC) if created.tzinfo is None else created
    return {
        "decision_id": decision.id,
        "customer_id": decision.customer_external_id,
        "model_version": decision.model_version,
        "control": decision.control,
        "degraded": decision.degraded,
        "cold_start": decision.cold_start,
        "offers": answered,
        "suppressed": None,
        "note": None,
        "created_at": created.astimezone(dt.UTC),
    }


async def _respond(
    app: Any,
    customer_id: str,
    body: DecisionRequest,
    principal: Principal,
    scoped: ScopedKey | None,
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
        scoped,
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
    scoped: ScopedKey | None = None,
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
        base["_record"] = _record(base, body, None, [], [], state, stamp, announce, scoped)
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
        base["_record"] = _record(base, body, None, offers, rows, state, stamp, announce, scoped)
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
        base["_record"] = _record(base, body, entry, [], [], state, stamp, announce, scoped)
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
    base["_record"] = _record(base, body, entry, offers, rows, state, stamp, announce, scoped)
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
    scoped: ScopedKey | None,
) -> AuditRecord:
    """The audit rows, as driver-ready tuples (see :class:`service.decision.audit.AuditRecord`);
    ``rows`` are the offers' (made with them, by :func:`_offer`); ``scoped``, the
    request's (API key prefix, Idempotency-Key), if it sent one."""
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
    decision.extend(scoped or (None, None))  # api_key_prefix, idempotency_key
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
    ask = _OutcomeAsk(offer_id, body, principal.prefix, idempotency_key, now)
    try:
        outcome, duplicate = _store_outcome(engine, state, ask)
    except IntegrityError:
        # A concurrent request won the race (a retry, or another answer to the offer):
        # the unique indexes let only one in; answer against what it stored.
        outcome, duplicate = _store_outcome(engine, state, ask)
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


@dataclass(frozen=True, slots=True)
class _OutcomeAsk:
    """One outcome request: what is said about which offer, by which API key."""

    offer_id: str
    body: OutcomeRequest
    api_key_prefix: str
    idempotency_key: str | None
    now: dt.datetime


def _store_outcome(
    engine: Any, state: ServingState, ask: _OutcomeAsk
) -> tuple[OutcomeResponse, bool]:
    """Record ``ask`` unless it repeats what is recorded: (the answer, whether a repeat).

    Raises :class:`NotFound` for an unknown offer and :class:`Conflict` for an answer
    that contradicts the recorded one, or a reused Idempotency-Key.
    """
    offer_id, body, now = ask.offer_id, ask.body, ask.now
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
        existing = _recorded_outcome(session, ask)
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
                api_key_prefix=ask.api_key_prefix,
                idempotency_key=ask.idempotency_key,
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


def _recorded_outcome(session: Any, ask: _OutcomeAsk) -> OfferOutcome | None:
    """The recorded outcome ``ask`` repeats, or None when it is new.

    Raises
    ------
    Conflict
        The caller's own Idempotency-Key was used for something else, or the offer
        already holds a different final outcome. Only this API key's idempotency keys
        are looked at, so the answer says nothing about other callers' requests.
    """
    offer_id, outcome, key = ask.offer_id, ask.body.outcome, ask.idempotency_key
    if key is not None:
        mine = session.scalar(
            select(OfferOutcome).where(
                OfferOutcome.api_key_prefix == ask.api_key_prefix,
                OfferOutcome.idempotency_key == key,
            )
        )
        if mine is not None:
            if mine.offer_id != offer_id or mine.outcome != outcome:
                which = "this offer" if mine.offer_id == offer_id else "another offer"
                raise Conflict(
                    f"Idempotency-Key '{key}' was already used by this API key for outcome "
                    f"'{mine.outcome}' of {which}; use a new key for a new request"
                )
            return mine  # type: ignore[no-any-return]
    kinds = FINAL_OUTCOMES if outcome in FINAL_OUTCOMES else (outcome,)
    existing: OfferOutcome | None = session.scalars(
        select(OfferOutcome)
        .where(OfferOutcome.offer_id == offer_id, OfferOutcome.outcome.in_(kinds))
        .order_by(OfferOutcome.id)
    ).first()
    if existing is not None and existing.outcome != outcome:
        raise Conflict(
            f"offer '{offer_id}' already has the final outcome '{existing.outcome}'; "
            "an offer takes one answer",
            recorded_outcome=existing.outcome,
        )
    return existing
