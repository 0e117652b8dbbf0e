"""What a customer said to an offer: recorded once, and applied to the serving state.

An offer takes one final answer (accepted, declined or not_now); ``presented`` is a
sighting, recorded once whenever it arrives. Retries (the same outcome again, or the
same Idempotency-Key from the same API key) are recorded once. An acceptance adds the
product to the customer's holdings, and every new outcome reaches this worker's
contact history at once and the other workers through the change log.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metrics
from service.data.db import unit_of_work
from service.data.events import record_event
from service.data.tables import FINAL_OUTCOMES, Adoption, Decision, Offer, OfferOutcome, Product
from service.decision.state import ServingState
from service.errors import Conflict, NotFound
from service.schemas import OutcomeRequest, OutcomeResponse


def record_outcome(
    offer_id: str,
    body: OutcomeRequest,
    *,
    api_key_prefix: str,
    idempotency_key: str | None,
    serving: ServingState,
    database: Engine,
) -> tuple[OutcomeResponse, bool]:
    """Record ``body`` about offer ``offer_id``, sent by the API key ``api_key_prefix``
    (blocking): the answer, and whether it repeats what was already recorded.

    Raises
    ------
    NotFound
        No such offer.
    Conflict
        The offer already holds a different final outcome, or this API key used
        ``idempotency_key`` for another outcome or offer.
    """
    now = serving.clock()
    ask = _OutcomeAsk(offer_id, body, api_key_prefix, idempotency_key, now)
    try:
        outcome, duplicate = _store_outcome(database, serving, ask)
    except IntegrityError:
        # A concurrent request won the race (a retry, or another answer to the offer):
        # the unique indexes let only one in; answer against what it stored.
        outcome, duplicate = _store_outcome(database, serving, ask)
    if not duplicate:
        metrics.OUTCOMES.labels(outcome.product_code, outcome.outcome).inc()
        refresh: set[str] = set()
        detail = outcome.outcome
        serving.apply_event(
            "outcome", outcome.customer_id, outcome.product_code, detail, now, refresh
        )
        if refresh:
            serving.refresh_customers(refresh)
    return outcome, duplicate


@dataclass(frozen=True, slots=True)
class _OutcomeAsk:
    """One outcome request: what is said about which offer, by which API key."""

    offer_id: str
    body: OutcomeRequest
    api_key_prefix: str
    idempotency_key: str | None
    now: dt.datetime


def _store_outcome(
    database: Engine, state: ServingState, ask: _OutcomeAsk
) -> tuple[OutcomeResponse, bool]:
    """Record ``ask`` unless it repeats what is recorded: (the answer, whether a repeat).

    Raises :class:`NotFound` for an unknown offer and :class:`Conflict` for an answer
    that contradicts the recorded one, or a reused Idempotency-Key.
    """
    offer_id, body, now = ask.offer_id, ask.body, ask.now
    with unit_of_work(database) as session:
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


def _recorded_outcome(session: Session, ask: _OutcomeAsk) -> OfferOutcome | None:
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
            return mine
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
