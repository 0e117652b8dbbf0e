"""Idempotent decisions: a retry with the same ``Idempotency-Key`` gets the same answer.

A teller system that lost an answer (a timeout, a dropped connection) asks again; the
retry must not make a second decision, which would count the offers twice against the
frequency caps and in the metrics. Each worker keeps the recent keyed answers in memory
(:class:`DecisionReplays`), because a retry usually comes to the same worker within
seconds and must cost no more than a dict lookup there; a retry reaching another worker
finds the decision in the database instead (see :mod:`service.decision.engine`).

Keys belong to the API key that sent them: the scoped key is (API key prefix,
Idempotency-Key), so one caller's keys never collide with another's.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from starlette.applications import Starlette

from service.errors import Conflict

ScopedKey = tuple[str, str]
"""(API key prefix, Idempotency-Key)."""

MAX_ENTRIES = 10_000
"""Answers kept per worker (an answer is 1-2 KB: about 20 MB at most)."""

TTL_SECONDS = 24 * 3600.0
"""How long a worker answers a retry from memory."""


@dataclass(frozen=True, slots=True)
class Replay:
    """A keyed decision's answer, and the request it answered."""

    customer_id: str
    body: Any  # the DecisionRequest: equal requests are the same request
    answer: bytes
    expires_at: float

    def answer_for(self, key: str, customer_id: str, body: Any) -> bytes:
        """The kept answer, if ``customer_id`` and ``body`` are the request it answered
        (else :class:`Conflict`, see :func:`check_same_request`)."""
        check_same_request(key, (self.customer_id, self.body), (customer_id, body))
        return self.answer


def check_same_request(key: str, recorded: tuple[str, Any], asked: tuple[str, Any]) -> None:
    """Refuse a request reusing ``key`` unless it is the ``recorded`` (customer id, body).

    Raises
    ------
    Conflict
        The key was used for another customer or another body. The message does not
        name the other customer.
    """
    if asked[0] != recorded[0]:
        raise Conflict(
            f"Idempotency-Key '{key}' was already used by this API key for a decision "
            "about another customer; use a new key for a new request"
        )
    if asked[1] != recorded[1]:
        raise Conflict(
            f"Idempotency-Key '{key}' was already used by this API key for a decision "
            "with a different request body; use a new key for a new request"
        )


class DecisionReplays:
    """This worker's recent keyed decisions: a bounded LRU with a TTL, and the keys whose
    first attempt is still being decided (so that a concurrent retry waits for it rather
    than deciding again).

    Used on the event loop only (no lock): every method is synchronous, so none runs
    between another's steps.

    Parameters
    ----------
    max_entries
        Answers kept; the least recently used go first.
    ttl_seconds
        How long an answer is kept.
    clock
        Monotonic seconds; replaceable in tests.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        ttl_seconds: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._ttl = ttl_seconds
        self._clock = clock
        self._answers: OrderedDict[ScopedKey, Replay] = OrderedDict()
        self._deciding: dict[ScopedKey, asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: ScopedKey) -> Replay | None:
        """The answer kept for ``key``, if it has not expired."""
        found = self._answers.get(key)
        if found is None:
            return None
        if found.expires_at <= self._clock():
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        return found

    def put(self, key: ScopedKey, customer_id: str, body: Any, answer: bytes) -> None:
        """Keep ``answer`` to the request (``customer_id``, ``body``) made with ``key``."""
        self._answers[key] = Replay(customer_id, body, answer, self._clock() + self._ttl)
        self._answers.move_to_end(key)
        while len(self._answers) > self._max_entries:
            self._answers.popitem(last=False)

    def deciding(self, key: ScopedKey) -> asyncio.Event | None:
        """Set when the attempt deciding ``key`` now ends (None: no attempt is)."""
        return self._deciding.get(key)

    def begin(self, key: ScopedKey) -> None:
        """Mark ``key`` as being decided by the caller, who must call :meth:`end`."""
        self._deciding[key] = asyncio.Event()

    def end(self, key: ScopedKey) -> None:
        """The attempt deciding ``key`` ended (answered or failed): wake its waiters."""
        event = self._deciding.pop(key, None)
        if event is not None:
            event.set()


def replays_of(app: Starlette) -> DecisionReplays:
    """The worker's :class:`DecisionReplays`, made on first use."""
    state = app.state
    replays = getattr(state, "decision_replays", None)
    if replays is None:
        replays = state.decision_replays = DecisionReplays()
    return cast(DecisionReplays, replays)
