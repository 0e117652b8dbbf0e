"""Recording a customer's NPS or CSAT answer, and the detractor guardrail it may trip.

The guardrail: a detractor NPS answer (0-6) about a contact in which the customer was
offered something suppresses offers to that customer for ``suppress_days``. Whether an
answer trips it is decided here, while the answer is recorded, because it must commit
together with the answer: the ``outcome``/``detractor`` change event written in the
same transaction is how every serving worker learns of it within its poll interval.
What a suppressed customer is then offered (nothing, until the date) is the contact
policy's rule, in service.decision.policy.
"""

from __future__ import annotations

import datetime as dt
import functools

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.data.db import unit_of_work
from service.data.events import record_event
from service.data.tables import Customer, Decision, Feedback
from service.errors import Conflict, Invalid
from service.schemas import (
    FeedbackCategory,
    FeedbackKind,
    FeedbackRequest,
    FeedbackResponse,
)

SCORE_RANGES: dict[FeedbackKind, tuple[int, int]] = {"nps": (0, 10), "csat": (1, 5)}
"""The scores each kind of answer allows, both ends included."""


def category(kind: FeedbackKind, score: int) -> FeedbackCategory:
    """NPS: promoter 9-10, passive 7-8, detractor 0-6; CSAT: satisfied 4-5, neutral 3,
    dissatisfied 1-2."""
    if kind == "nps":
        return "promoter" if score >= 9 else ("passive" if score >= 7 else "detractor")
    return "satisfied" if score >= 4 else ("neutral" if score == 3 else "dissatisfied")


def record_answer(
    engine: Engine,
    *,
    body: FeedbackRequest,
    api_key_prefix: str,
    idempotency_key: str | None,
    now: dt.datetime,
    origin: str,
    suppress_days: int,
) -> tuple[FeedbackResponse, bool]:
    """Check and record ``body`` in its own transaction; return the answer and whether
    this API key had already recorded it (a retry).

    Only the caller's own idempotency keys are looked at, so a :class:`Conflict` (the
    key was used for another answer) says nothing about other callers' answers. When a
    concurrent retry with the same key commits first, the unique constraint fails this
    transaction and a second one answers with what the other stored; that is why this
    function frames its own units of work rather than taking a session.

    Raises
    ------
    Invalid
        Score outside its kind's range, neither decision nor customer given, an
        unknown decision or customer, or a customer who is not the decision's.
    Conflict
        This API key used ``idempotency_key`` for a different answer.
    """
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
    store = functools.partial(
        _store,
        engine,
        body=body,
        api_key_prefix=api_key_prefix,
        idempotency_key=idempotency_key,
        now=now,
        origin=origin,
        suppress_days=suppress_days,
    )
    try:
        return store()
    except IntegrityError:
        # A concurrent retry with the same key won the race: answer with what it stored.
        return store()


def _store(
    engine: Engine,
    *,
    body: FeedbackRequest,
    api_key_prefix: str,
    idempotency_key: str | None,
    now: dt.datetime,
    origin: str,
    suppress_days: int,
) -> tuple[FeedbackResponse, bool]:
    """Record ``body`` in one transaction unless this API key already did."""
    with unit_of_work(engine) as session:
        if idempotency_key is not None:
            existing = session.scalar(
                select(Feedback).where(
                    Feedback.api_key_prefix == api_key_prefix,
                    Feedback.idempotency_key == idempotency_key,
                )
            )
            if existing is not None:
                if existing.kind != body.kind or existing.score != body.score:
                    raise Conflict(
                        f"Idempotency-Key '{idempotency_key}' was already used by this API "
                        f"key for a {existing.kind} answer of {existing.score}"
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
            api_key_prefix=api_key_prefix,
            idempotency_key=idempotency_key,
            created_at=now,
        )
        session.add(row)
        session.flush()
        until = None
        if _is_detractor_after_offer(session, body) and customer_external is not None:
            until = now + dt.timedelta(days=suppress_days)
            record_event(
                session.connection(),
                kind="outcome",
                origin=origin,
                customer=customer_external,
                detail="detractor",
                at=now,
            )
        return _answer(row, customer_external, until, duplicate=False), False


def _is_detractor_after_offer(session: Session, body: FeedbackRequest) -> bool:
    """Whether ``body`` trips the guardrail: a detractor NPS answer about a contact in
    which the customer was offered something."""
    if body.kind != "nps" or category("nps", body.score) != "detractor":
        return False
    if body.decision_id is None:
        return False
    offered = session.execute(
        text("SELECT 1 FROM offers WHERE decision_id = :d LIMIT 1"), {"d": body.decision_id}
    ).first()
    return offered is not None


def _stored_kind(kind: str) -> FeedbackKind:
    """The kind of a stored answer (the table's check constraint allows only these)."""
    if kind == "nps":
        return "nps"
    if kind == "csat":
        return "csat"
    raise ValueError(f"feedback has kind {kind!r}, neither 'nps' nor 'csat'")


def _answer(
    row: Feedback, customer: str | None, until: dt.datetime | None, *, duplicate: bool
) -> FeedbackResponse:
    kind = _stored_kind(row.kind)
    return FeedbackResponse(
        feedback_id=row.id,
        kind=kind,
        score=row.score,
        category=category(kind, row.score),
        decision_id=row.decision_id,
        customer_id=customer,
        staff_id=row.staff_id,
        branch_id=row.branch_id,
        duplicate=duplicate,
        offers_suppressed_until=until,
        recorded_at=row.created_at,
    )
