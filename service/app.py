"""The FastAPI application factory: nothing happens at import time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import Receive, Scope, Send

from service import child, metrics, tracing
from service.api import catalogue, data, decisions, feedback, health
from service.auth import KeyStore, ops_access
from service.data import db
from service.decision import lane
from service.decision.audit import AuditWriter, audit_writer
from service.decision.contacts import SWEEP_SLICE
from service.decision.sharing import sharing_the_interpreter
from service.decision.spool import record_counts
from service.decision.state import ServingState, release_memory, sweep_budget
from service.errors import TooLarge, install_error_handlers, render_problem
from service.metrics import MetricsMiddleware
from service.reports import api as report_routes
from service.reports import dashboard
from service.reports import measures as reports
from service.settings import Settings

log = logging.getLogger("nbo.app")

API_VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.otlp_endpoint:
        try:
            tracing.start(settings.otlp_endpoint)
        except Exception:  # noqa: BLE001 - a worker without traces still serves
            log.warning("tracing could not start; decisions are not traced", exc_info=True)
    engine = db.engine_from_settings(settings, serving=True)
    app.state.engine = engine
    app.state.keys = KeyStore(engine, ttl_seconds=settings.api_key_ttl_seconds)
    state = ServingState(engine, settings)
    app.state.serving = state
    audit = audit_writer(engine, settings.data_dir / "spool", lanes=settings.audit_commit_lanes)
    app.state.audit = audit
    # When the server was told to stop: uvicorn's own signal handlers, wrapped. The
    # shutdown below gets what uvicorn's wait for requests in flight left of
    # shutdown_timeout_seconds, so that the worker exits within it. Wrapped before the
    # load: a stop during start-up ends the load's long work (a store build in a child
    # takes minutes at a million customers), and uvicorn, told to exit, shuts down once
    # the start-up returns.
    signalled: list[float] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if callable(handler):

                def noted(sig: int, frame: FrameType | None, handler: Any = handler) -> None:
                    signalled.append(time.monotonic())
                    state.stop()
                    handler(sig, frame)

                signal.signal(signum, noted)
    await _load(state)
    try:
        await audit.start()
    except Exception:  # noqa: BLE001 - the spool stays for the next commit to replay
        log.warning("audit spool replay failed at start-up", exc_info=True)
    if isinstance(audit, AuditWriter):
        # The audit writer thread needs the GIL several times per commit (the driver
        # releases it around each call); at the default 5 ms switch interval a busy
        # event loop made each commit wait ~25 ms for it. A short interval lets it in.
        sys.setswitchinterval(0.0002)
    poller = asyncio.create_task(_poll_forever(state, settings.poll_interval_seconds))
    figures = asyncio.create_task(_figures_forever(state, settings.figures_interval_seconds))
    try:
        yield
    finally:
        since = signalled[0] if signalled else time.monotonic()
        # At least a second: enough to spool what the database has not taken.
        budget = max(1.0, since + settings.shutdown_timeout_seconds - time.monotonic())
        for task in (poller, figures):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # close() waits at most three times close_seconds (its commits, their
        # cancellation, its connections); the timeout bounds it whatever it does.
        audit.close_seconds = min(audit.close_seconds, budget / 3)
        try:
            async with asyncio.timeout(budget):
                await audit.close()
        except TimeoutError:
            log.error("audit writer did not stop in time", extra={"seconds": round(budget, 1)})
        # After the audit writer: the last decisions' spans are queued by now.
        await asyncio.to_thread(tracing.shutdown)
        engine.dispose()
        metrics.flush_tallies()  # a worker's counts outlive it in the multiprocess sums
        metrics.mark_worker_dead(os.getpid())


async def _load(state: ServingState) -> None:
    """Load the snapshot; a worker that cannot (database down, no schema) still starts,
    answers decisions degraded, and retries from the poll loop."""
    # The folder the lifespan gives the audit writer.
    spool = record_counts(state.settings.data_dir / "spool")
    metrics.watch_worker(state.settings, state.engine, spool=spool, held=state.held)
    snapshot = await asyncio.to_thread(state.load)  # never raises: logs and counts its failure
    metrics.MODEL_LOADS.labels("success" if snapshot.model is not None else "failure").inc()
    metrics.set_active_model(snapshot.version)


class _RepeatedFailure:
    """Logs a failing periodic task once with its traceback, then quietly (debug) until
    it succeeds again: through an outage the change poll fails twice a second, and a
    traceback each time buried everything else in the log."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.failing = False

    def failed(self) -> None:
        if self.failing:
            log.debug(self.message, exc_info=True)
        else:
            self.failing = True
            log.warning(self.message, exc_info=True)

    def succeeded(self) -> None:
        if self.failing:
            self.failing = False
            log.info("periodic task recovered", extra={"task": self.message})


async def _poll_forever(state: ServingState, interval: float) -> None:
    poll_failure = _RepeatedFailure("change poll failed")
    prune_failure = _RepeatedFailure("change log pruning failed")
    sweep_failure = _RepeatedFailure("contact history sweep failed")
    while True:
        await asyncio.sleep(interval)
        try:
            metrics.flush_tallies()
            metrics.refresh_worker()
        except Exception:  # noqa: BLE001 - metrics must never stop the change poll
            log.warning("metrics flush failed", exc_info=True)
        try:
            if state.snapshot is None:
                await _load(state)
            else:
                before = state.snapshot
                await asyncio.to_thread(state.poll)
                if state.snapshot is not before:
                    metrics.set_active_model(state.snapshot.version)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep polling; the next round may succeed
            poll_failure.failed()
        else:
            poll_failure.succeeded()
            try:
                await asyncio.to_thread(state.prune_events)
            except Exception:  # noqa: BLE001 - an unpruned log only grows; try again later
                prune_failure.failed()
            else:
                prune_failure.succeeded()
            try:
                await _sweep_history(state, interval)
            except Exception:  # noqa: BLE001 - an unswept history only holds more
                sweep_failure.failed()
            else:
                sweep_failure.succeeded()


async def _figures_forever(state: ServingState, every: float) -> None:
    """The business figures every ``every`` seconds (never when 0), the first ten
    seconds after the start, not while the worker warms up.

    A task of its own, not a step of the change poll: at a million customers the figures
    take seconds of work (a child's, at low priority, longer still on a busy machine),
    and while the poll waited for them this worker saw no decision, decline or model
    change made by another, and its contact policy answered on what it knew before.
    """
    if not every:
        return
    await asyncio.sleep(min(every, 10.0))
    while True:
        started = time.monotonic()
        try:
            await _publish_figures(state)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the gauges wait for the next round
            log.warning("business figures could not be published", exc_info=True)
        await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))


async def _sweep_history(state: ServingState, interval: float) -> None:
    """A little of the contact history forgotten at a poll every ``interval`` seconds
    (:func:`~service.decision.state.sweep_budget` customers: a pass in about ten
    minutes), on the event loop a slice of :data:`~service.decision.contacts.SWEEP_SLICE`
    customers at a time, the requests served between two slices.

    On the poll's thread the same work (about 4 ms at a million customers, and 18 ms
    at the start of each pass for a copy of the book's keys, no longer made) held the
    interpreter for up to its 5 ms switch interval at a time twice a second, while the
    requests in flight waited. With a million customers held, a coroutine sleeping 1 ms
    on the loop woke more than 3 ms late 152 times a minute beside the thread's sweep,
    27 times beside this one and 33 times with no sweep at all (the machine's own
    noise); a request here waits at most one slice, about 0.1 ms.
    """
    budget = sweep_budget(len(state.history), interval)
    for _ in range(math.ceil(budget / SWEEP_SLICE)):
        if not state.sweep_history(SWEEP_SLICE):
            return  # the pass ended: the next poll begins the next one
        await asyncio.sleep(0)


class NboApp(FastAPI):
    """The FastAPI application, with the decision fast lane in front.

    ``POST /v1/customers/{customer_id}/decisions`` goes straight to
    :func:`service.decision.lane.serve`, ahead of the middleware stack and routing
    (see :mod:`service.decision.lane` for why, and what it means for middleware);
    everything else is served the usual way.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        customer_id = lane.decision_customer(scope)
        if customer_id is not None:
            await lane.serve(self, scope, receive, send, customer_id)
            return
        await super().__call__(scope, receive, send)


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with a 413 problem, on every route,
    before anything reads it (FastAPI reads a body before it checks the key).

    A declared ``Content-Length`` over the limit is answered at once, unread. A body
    sent without one (chunked) is counted as it arrives: the chunk that crosses the
    limit is answered 413 and the application is told the client went away, so it
    stops reading; anything it sends after that is dropped. Pure ASGI, so it costs a
    header scan per request and nothing per chunk but an addition.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = refused = False

        async def bounded_receive() -> Any:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            elif refused:
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if refused and not started:
                return  # the 413 was the answer
            started = True
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        problem = TooLarge(f"the request body is over {self.max_bytes:,} bytes")
        # The client may still be sending: close the connection after the answer
        # rather than read (and discard) the rest.
        response = render_problem(problem, scope["path"])
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Any) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


FIGURES_LOCK = "figures.lock"
"""The file in the data folder whose lock says which worker of a machine computes the
business figures, and whose time says when one last did."""


@contextlib.contextmanager
def _figures_turn(state: ServingState) -> Iterator[bool]:
    """Whether this worker computes the business figures now (held while inside).

    One worker of a machine does, under a lock in the data folder, and none again
    before half the interval has passed since one did: each computation reads a week of
    contacts and their customers' adoptions (about a gigabyte of frames at a million
    customers), so every worker doing it every interval cost each worker that much
    memory and paused its requests. The gauges are shared by the workers of a machine
    (multiprocess mode keeps the most recent value), so one computation serves all.
    When the lock cannot be opened, the worker computes them itself.
    """
    path = state.settings.data_dir / FIGURES_LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+b")
    except OSError:
        yield True
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # another worker is computing them
            return
        try:
            every = state.settings.figures_interval_seconds
            held = os.fstat(handle.fileno())
            last = held.st_mtime if held.st_size else 0.0
            if every and time.time() - last < every / 2:
                yield False  # another worker computed them a moment ago
                return
            handle.truncate(0)
            handle.write(str(time.time()).encode())
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


async def _publish_figures(state: ServingState) -> None:
    """Rolling 7-day conversion by product and channel, NPS by branch, adoption by arm
    (treated, control), as gauges; by one worker of a machine at a time (see
    :func:`_figures_turn`).

    For a large bank (from :data:`service.child.CHILD_CUSTOMERS` customers) they are
    computed in a child process at low priority: on a thread of the worker, their
    seconds of Python work took turns with the requests and halved the decisions the
    worker answered for as long as they ran (18 s every five minutes at 1M customers).
    """
    today = state.clock().date()
    with _figures_turn(state) as mine:
        if not mine:
            return
        snapshot = state.snapshot
        large = snapshot is not None and len(snapshot.customers) >= child.CHILD_CUSTOMERS
        try:
            if large:
                found = await asyncio.to_thread(
                    child.run,
                    state.settings,
                    "service.reports.measures:rolling_gauges_in_child",
                    today=today.isoformat(),
                )
            else:
                found = await asyncio.to_thread(_gauges, state, today)
        except child.ChildStopped:
            return  # the worker is stopping
        except Exception:  # noqa: BLE001 - a report failing must not stop the poll loop
            log.warning("business figures could not be computed", exc_info=True)
            return
        if found["conversion"] is not None:
            metrics.set_business_figures(
                {(product, channel): rate for product, channel, rate in found["conversion"]},
                found["nps"],
            )
        if found["uplift"] is not None:
            metrics.set_uplift_figures(found["uplift"])
    if not large:
        # The frames' memory back to the system (a child's went with it).
        await asyncio.to_thread(release_memory)


def _gauges(state: ServingState, today: dt.date) -> dict[str, Any]:
    """The gauges' figures computed here, taking turns with the requests."""
    with sharing_the_interpreter():
        return reports.rolling_gauges(
            state.engine,
            today,
            branches=state.settings.known_branches,
            branch_limit=state.settings.metric_branch_limit,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the nbo application for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    app = NboApp(
        title="nbo",
        version=API_VERSION,
        summary="Next-best-offer recommendations for banks.",
        description=(
            "Every /v1 operation needs an API key (`nbo keys create`), sent as "
            "`Authorization: Bearer <key>` or `X-API-Key: <key>`, holding the scope the "
            "operation names. So do /metrics, /docs, /redoc and /openapi.json (scope "
            "'ops'), unless the service runs with `NBO_OPS_ENDPOINTS=open`. Errors are "
            "RFC 9457 problem details; a 503 carries Retry-After."
        ),
        lifespan=lifespan,
        responses=_PROBLEM_RESPONSES,
        # Served by _docs_router instead, behind the ops_endpoints setting.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    # Inside the metrics middleware, so that refused bodies are counted too.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    from service.logs import RequestLogs

    # Outermost: the request id is set for every line logged below it, and echoed.
    app.add_middleware(RequestLogs)
    app.include_router(health.router)
    app.include_router(metrics.router, dependencies=[Depends(ops_access)], responses=_OPS_RESPONSES)
    app.include_router(_docs_router(app))
    app.include_router(decisions.router)
    app.include_router(data.router)
    app.include_router(catalogue.router)
    app.include_router(feedback.router)
    app.include_router(report_routes.router)
    app.include_router(dashboard.router)
    return app


OPENAPI_URL = "/openapi.json"


def _docs_router(app: FastAPI) -> APIRouter:
    """``/openapi.json``, ``/docs`` and ``/redoc`` as FastAPI serves them, behind
    :func:`service.auth.ops_access` (the spec maps every operation an attacker could
    try, so by default it takes a key with scope 'ops')."""
    router = APIRouter(include_in_schema=False, dependencies=[Depends(ops_access)])

    @router.get(OPENAPI_URL)
    async def openapi(request: Request) -> JSONResponse:
        schema = app.openapi()
        root_path = request.scope.get("root_path", "").rstrip("/")
        if root_path and root_path not in {s.get("url") for s in schema.get("servers", [])}:
            schema = {**schema, "servers": [{"url": root_path}, *schema.get("servers", [])]}
        return JSONResponse(schema)

    @router.get("/docs")
    async def swagger(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root_path + OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=None,
        )

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=root_path + OPENAPI_URL, title=f"{app.title} - ReDoc")

    return router


_OPS_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key (unless ops_endpoints is 'open')."},
    403: {"description": "The key lacks scope 'ops'."},
}

_PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {
        "description": "An RFC 9457 problem: type, title, status, detail.",
        "content": {
            "application/problem+json": {
                "schema": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                        "request_id": {
                            "type": "string",
                            "description": "The request's id (as in X-Request-ID), for logs.",
                        },
                    },
                }
            }
        },
    }
}
