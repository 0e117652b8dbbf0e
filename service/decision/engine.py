"""The decision engine: what to offer a customer at contact, and its audit record.

One decision: find the customer (the worker's snapshot, else one database read), decide
their control-group membership, rank what they may be offered now (the contact policy
of :mod:`service.decision.policy`), say each offer's reasons and talking point, build
the audit rows and write them (:mod:`service.decision.audit`) before anything is
answered. A keyed request (``Idempotency-Key``) is decided once: a retry gets the answer
already made, from this worker's memory or rebuilt from the audit tables.

Requests reach it through :func:`service.decision.lane.serve_decision`, which parses them
for the fast lane and for the documented route alike (:mod:`service.api.decisions`) and
calls :func:`decide` or :func:`decide_once`; nothing else decides.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import Engine, select

from service import logs, metrics, tracing
from service.auth import Principal
from service.data.db import read_only, unit_of_work
from service.data.tables import Decision, Offer, Product
from service.decision.audit import AuditRecord, AuditSink, NotRecorded, derived_id, new_id
from service.decision.idempotency import DecisionReplays, ScopedKey, check_same_request
from service.decision.policy import Choice, in_control_group, popular_products
from service.decision.state import (
    CustomerEntry,
    Pitch,
    ServingState,
    Snapshot,
    talking_point,
)
from service.errors import NotFound, Unavailable
from service.schemas import DecisionRequest
from service.settings import Settings

log = logging.getLogger("nbo.decisions")


@functools.cache
def _stage(name: str) -> metrics.Tally:
    return metrics.tally(metrics.DECISION_STAGE_SECONDS, name)


async def decide(
    customer_id: str,
    body: DecisionRequest,
    principal: Principal,
    *,
    serving: ServingState,
    settings: Settings,
    audit: AuditSink,
    trace: tracing.DecisionTrace | None = None,
) -> bytes:
    """Decide for ``customer_id`` now and record it: the JSON answer. Its stages and
    facts go to ``trace``, if it is traced.

    Raises
    ------
    NotFound
        The customer is unknown and cold start is off.
    Unavailable
        The decision could not be recorded (database and spool both failed): nothing
        is offered.
    """
    answer = await _respond(serving, settings, audit, customer_id, body, principal, None, trace)
    return orjson.dumps(answer)


async def decide_once(
    customer_id: str,
    body: DecisionRequest,
    principal: Principal,
    key: str,
    *,
    serving: ServingState,
    settings: Settings,
    audit: AuditSink,
    database: Engine,
    replays: DecisionReplays,
    trace: tracing.DecisionTrace | None = None,
) -> bytes:
    """:func:`decide` for a request sent with Idempotency-Key ``key``: the decision
    already made with it (by this caller, for this customer and body), else a new one.

    This worker's recent answers come from ``replays``; a decision made by another
    worker, or before a restart, is rebuilt from its audit record in ``database``.
    Concurrent attempts with one key wait for the first. Raises as :func:`decide`, and
    :class:`~service.errors.Conflict` when the key was used for another customer or body.
    """
    scoped = (principal.prefix, key)
    while True:
        kept = replays.get(scoped)
        if kept is not None:
            if trace is not None:
                trace.note(channel=body.channel, result="replayed")
            return kept.answer_for(key, customer_id, body)
        deciding = replays.deciding(scoped)
        if deciding is None:
            break
        # A concurrent attempt with this key is being decided: wait for its answer (or
        # its failure, after which this one decides).
        await deciding.wait()
    replays.begin(scoped)
    try:
        answer = await _recorded_answer(serving, database, scoped, customer_id, body)
        if answer is None:
            answer = orjson.dumps(
                await _respond(
                    serving, settings, audit, customer_id, body, principal, scoped, trace
                )
            )
        elif trace is not None:
            trace.note(channel=body.channel, result="replayed")
        replays.put(scoped, customer_id, body, answer)
        return answer
    finally:
        replays.end(scoped)


async def _recorded_answer(
    serving: ServingState,
    database: Engine,
    scoped: ScopedKey,
    customer_id: str,
    body: DecisionRequest,
) -> bytes | None:
    """The answer of the decision recorded with ``scoped`` (made by another worker, or
    before a restart), rebuilt from the audit tables; None when there is none.

    A database that cannot be read counts as "none": the decision is made (degraded),
    as every decision is during an outage, rather than refused.
    """
    try:
        found = await asyncio.to_thread(_read_keyed_decision, database, scoped)
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
    return orjson.dumps(_rebuilt_answer(serving.snapshot, decision, offers))


def _read_keyed_decision(database: Engine, scoped: ScopedKey) -> tuple[Any, list[Any]] | None:
    """The first decision recorded with ``scoped`` and its offers (blocking)."""
    prefix, key = scoped
    with unit_of_work(read_only(database)) as session:
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
    said again from the recorded reasons (the rule sentence, else the profile sentence,
    else the snapshot's line for an offer without a reason); ``suppressed`` and ``note``
    are not recorded."""
    names = {} if snapshot is None else snapshot.names
    kind = (
        "cold_start" if decision.cold_start else ("model" if decision.model_version else "degraded")
    )
    answered = []
    for offer in offers:
        reasons = offer.reasons or {}
        name = names.get(offer.code, offer.code)
        sentence, profile = reasons.get("rule"), reasons.get("profile")
        if snapshot is None or sentence or profile:
            line = talking_point(name, sentence, profile)
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
    state: ServingState,
    settings: Settings,
    audit: AuditSink,
    customer_id: str,
    body: DecisionRequest,
    principal: Principal,
    scoped: ScopedKey | None,
    trace: tracing.DecisionTrace | None = None,
) -> dict[str, Any]:
    """The answer to one decision, recorded (or spooled) before it is returned; its
    ``ranking`` and ``audit commit`` spans and its facts go to ``trace``, if traced."""
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
    stamp = audit.stamp(now)
    with tracing.stage(trace, "ranking"):
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
            stamp,
            scoped,
        )
    record = answer.pop("_record")
    result = answer["result"]
    recorded_at = time.perf_counter()
    if record is not None:
        try:
            with tracing.stage(trace, "audit commit"):
                durable = await audit.write(record)
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
    if trace is not None:
        trace.note(
            id=answer["decision_id"],
            channel=body.channel,
            result=result,
            offers=len(answer["offers"]),
            model_version=answer["model_version"],
        )
    if log.isEnabledFor(logging.DEBUG):  # not at INFO: one line a decision is the bulk
        log.debug(
            "decision made",
            extra={
                "decision_id": answer["decision_id"],
                "channel": body.channel,
                "result": result,
                "offers": len(answer["offers"]),
            },
        )
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
    logs.note_decision(decision_id)  # on any line logged for the rest of the request
    # Other processes (workers, replicas) learn of this decision's offers only through
    # change_events: without them their frequency caps would not count it.
    announce = settings.workers > 1 or (
        settings.announce_offers == "always"
        or (settings.announce_offers == "auto" and state.not_alone)
    )
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
        counts: Mapping[str, int] = (
            snapshot.popularity.get(entry.segment) or snapshot.popularity.get(None) or {}
        )
        total = max(sum(counts.values()), 1)
        propensity = propensity.copy()
        for code, k in catalogue.index.items():
            if propensity[k] == propensity[k]:
                propensity[k] = counts.get(code, 0) / total
    explain = principal.allows("models")
    ranking = snapshot.arbiter.rank(
        propensity,  # float32 from the store (policy reads .tolist())
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
    """The answer's offers and their audit rows.

    Each offer says the most persuasive true reason there is: the rule worth saying
    (:meth:`Snapshot.pitches`), else the profile claim (:meth:`Snapshot.profile_pitch`),
    else nothing. ``explain`` lists the model's top factors too, without changing what
    is said.
    """
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
        pitched = said.get(code)
        if pitched is None and not degraded:
            pitched = snapshot.profile_pitch(entry, code, choice.propensity)
        if pitched is None:
            pitched = snapshot.plain(code, kind)
        factors = contributions.get(code)
        if factors:
            pitched = pitched.with_factors(factors)
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
    counts: Mapping[str, int] = snapshot.popularity.get(None) or {}
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
