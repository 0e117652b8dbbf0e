"""The decision fast lane: ``POST /v1/customers/{customer_id}/decisions`` served from raw
ASGI, ahead of the middleware stack and FastAPI's routing.

The decision route is most of the traffic and must answer in a few milliseconds. Routed
the usual way, each request crosses the middleware stack and FastAPI's parameter and
dependency machinery, and builds Starlette's request and response objects: together
they cost as much per request as the decision itself (see ``bench/decide.py``). So the
application (:class:`service.app.NboApp`) hands a decision request to :func:`serve`
before anything else sees it. :func:`serve_decision` reads the key, the path and the
body straight from the ASGI scope and messages and validates them with the same rules as
the documented route (the pydantic models its OpenAPI entry is made from); errors become
the same problem details, and the request is counted in
``nbo_http_request_duration_seconds`` like any other.

What that means for the rest of the app:

- Middleware added to the application never sees the lane's requests (nor does the
  body limit of :class:`service.app.BodyLimit`: the lane reads at most
  :data:`MAX_DECISION_BODY` bytes itself). Whatever a new middleware must do to every
  request, the lane must do too, or that middleware must be applied here.
- The request id and the access line of :class:`service.logs.RequestLogs` are done
  here too: the id (``X-Request-ID``, taken or made) is set for the lines logged while
  the decision is served, echoed in the answer and put in its problem bodies; an access
  line is written for the share ``access_log_sample`` of the lane's requests (none by
  default: they are the bulk of the traffic, and each decision has its audit row).
- The documented route (:mod:`service.api.decisions`) is served by
  :func:`serve_decision` as well, so that a request the lane does not take (an app
  mounted under another, a test calling FastAPI itself) gets the same answer: key
  checked first, then the path, the body (at most 64 KiB) and the Idempotency-Key.
- A decision is matched on the path as Starlette's routing matches it
  (``get_route_path``): with ``--root-path`` the server sends the path with the prefix
  (uvicorn) or without it, and both are decisions.

Served by uvicorn's httptools protocol without an access log (as ``nbo serve`` runs
it), a 200 answer is written to the socket at once (:func:`_send_whole`); any other
server, an access log, or any failure of that write sends the ASGI messages instead.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from starlette._utils import get_route_path
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service import logs, metrics, tracing
from service.decision import engine
from service.decision.idempotency import replays_of
from service.errors import (
    Problem,
    TooLarge,
    is_outage,
    render_invalid,
    render_outage,
    render_problem,
    render_unexpected,
)
from service.schemas import CustomerId, DecisionRequest, Text

log = logging.getLogger("nbo.decisions")

DECISION_ROUTE = "/v1/customers/{customer_id}/decisions"
"""The route template: the ``route`` label of the lane's requests."""

MAX_DECISION_BODY = 64 * 1024
"""Largest decision request body, in bytes (413 beyond)."""

MAX_IDEMPOTENCY_KEY = 128
"""Longest Idempotency-Key, in characters."""

_DECISION_PATH = re.compile(r"/v1/customers/([^/]+)/decisions")
# The path parameter's rules: an id no import could hold (" C1", "NaN") is a 422, not a
# cold-start decision recorded for it.
_CUSTOMER_ID: TypeAdapter[str] = TypeAdapter(CustomerId)
_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(
    Annotated[Text, Field(min_length=1, max_length=MAX_IDEMPOTENCY_KEY)]
)


def decision_customer(scope: Scope) -> str | None:
    """The customer id when ``scope`` asks for a decision, else None."""
    if scope["type"] == "http" and scope["method"] == "POST":
        match = _DECISION_PATH.fullmatch(get_route_path(scope))
        if match is not None:
            return match.group(1)
    return None


async def serve(app: Any, scope: Scope, receive: Receive, send: Send, customer_id: str) -> None:
    """Answer the decision request ``scope`` of ``app`` (the lane), count it, and log
    its access line if it is in the sampled share."""
    started = time.perf_counter()
    path = scope["path"]
    token = logs.begin_request(logs.request_id_of(scope["headers"]))
    response: Response | None = None
    try:
        try:
            body = await serve_decision(app, scope, receive, customer_id)
        except Problem as exc:
            response = render_problem(exc, path)
        except RequestValidationError as exc:
            response = render_invalid(exc, path)
        except Exception as exc:  # noqa: BLE001 - answered as a problem, logged
            if is_outage(exc):
                response = render_outage(exc, path)
            else:
                log.exception("unhandled error", extra={"route": DECISION_ROUTE})
                response = render_unexpected(path)
        else:
            await _answer(send, body)
        if response is None:
            status = 200
        else:
            await response(scope, receive, send)
            status = response.status_code
        metrics.observe_request("POST", DECISION_ROUTE, status, started)
        sample = app.state.settings.access_log_sample
        if sample and (sample >= 1.0 or random.random() < sample):
            logs.access_line("POST", DECISION_ROUTE, status, started)
    finally:
        logs.end_request(token)


async def serve_decision(app: Any, scope: Scope, receive: Receive, customer_id: str) -> bytes:
    """``POST /v1/customers/{customer_id}/decisions``: the JSON body of the 200 answer.

    Reads what ``app.state`` holds (the key store, the serving state, settings, the
    audit writer and the database) and the request from its ASGI ``scope`` and
    ``receive``, in this order: the key (401, 403), the customer id (422), the body (413
    over :data:`MAX_DECISION_BODY` bytes, 422), the Idempotency-Key (422); failures
    raise the problem, fields named as FastAPI names them. Traced (the ``decision``
    span) when :data:`service.tracing.tracer` is set.
    """
    if tracing.tracer is None:
        return await _serve_decision(app, scope, receive, customer_id, None)
    trace = tracing.DecisionTrace(tracing.tracer)
    try:
        answer = await _serve_decision(app, scope, receive, customer_id, trace)
    except BaseException as exc:
        trace.end(exc)
        raise
    trace.end()
    return answer


async def _serve_decision(
    app: Any,
    scope: Scope,
    receive: Receive,
    customer_id: str,
    trace: tracing.DecisionTrace | None,
) -> bytes:
    """:func:`serve_decision`, its spans added to ``trace`` if there is one."""
    state = app.state
    authorization = api_key = idempotency_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
        elif name == b"idempotency-key" and idempotency_key is None:
            idempotency_key = value.decode("latin-1")
    # A key in memory is checked right here; a miss reads the database in a thread.
    if trace is None:
        principal = await state.keys.authenticate_async(authorization, api_key, "decisions")
    else:
        with trace.stage("key check"):
            principal = await state.keys.authenticate_async(authorization, api_key, "decisions")
    try:
        _CUSTOMER_ID.validate_python(customer_id)
    except ValidationError as exc:
        raise _located(exc, "path", "customer_id") from None
    try:
        body = DecisionRequest.model_validate_json(await _bounded_body(receive))
    except ValidationError as exc:
        raise _located(exc, "body") from None
    if idempotency_key is None:
        return await engine.decide(
            customer_id,
            body,
            principal,
            serving=state.serving,
            settings=state.settings,
            audit=state.audit,
            trace=trace,
        )
    try:
        _IDEMPOTENCY_KEY.validate_python(idempotency_key)
    except ValidationError as exc:
        raise _located(exc, "header", "idempotency-key") from None
    return await engine.decide_once(
        customer_id,
        body,
        principal,
        idempotency_key,
        serving=state.serving,
        settings=state.settings,
        audit=state.audit,
        database=state.engine,
        replays=replays_of(app),
        trace=trace,
    )


def _located(exc: ValidationError, *where: str) -> RequestValidationError:
    """``exc`` as FastAPI reports it: each error's location prefixed with ``where`` (the
    request part and, for a single value, its name), so fields are named as elsewhere."""
    return RequestValidationError(
        [{**error, "loc": (*where, *error["loc"])} for error in exc.errors()]
    )


async def _bounded_body(receive: Receive) -> bytes:
    """The request body, read from ASGI ``http.request`` messages (at most
    :data:`MAX_DECISION_BODY` bytes)."""
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


async def _answer(send: Send, body: bytes) -> None:
    """Send the 200 answer ``body``: in one socket write if :func:`_send_whole` can,
    else as ASGI messages.

    The decision is recorded by now, so it must be answered: a failure of the one
    write (uvicorn changed, the transport refused) is logged and the answer goes the
    ordinary way, rather than out of the lane to the server, whose answer would be a
    plain 500 for a decision that was made.
    """
    try:
        if await _send_whole(send, body):
            return
    except Exception:  # noqa: BLE001 - uvicorn's own send still answers
        log.warning("one-write answer failed; sent as ASGI messages", exc_info=True)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    request_id = logs.current_request_id()
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode("ascii")))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@functools.cache
def _httptools_cycle() -> type[Any] | None:
    """uvicorn's httptools request cycle class, if it has the attributes
    :func:`_send_whole` uses (set in its ``__init__``)."""
    try:
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError:  # pragma: no cover - uvicorn without httptools
        return None
    needed = (
        "transport",
        "flow",
        "default_headers",
        "keep_alive",
        "response_started",
        "response_complete",
        "message_event",
        "on_response",
        "disconnected",
        "access_log",
        "waiting_for_100_continue",
    )
    init = RequestResponseCycle.__init__.__code__.co_names
    return RequestResponseCycle if all(name in init for name in needed) else None


_STATUS_200 = b"HTTP/1.1 200 OK\r\n"


async def _send_whole(send: Send, body: bytes) -> bool:
    """Send a 200 JSON answer as one write to the socket, when served by uvicorn's
    httptools protocol; False (nothing sent) otherwise, for the caller to send it as
    ASGI messages.

    Sent as ASGI messages, an answer costs uvicorn two socket writes (its head, then
    its body), and on loopback each write also wakes the client: measured on the
    decision benchmark, the two took a third of the worker's time per decision, and one
    write took 7% off it. This does what uvicorn's ``send`` does for a complete,
    fixed-length answer (its default headers, flow control, keep-alive, completion),
    on the cycle behind the bound ``send``; the class is checked to be the one whose
    attributes this reads, and anything unusual (an access log, an answer already
    started) takes the ASGI path. Everything is read before the write, and the cycle
    is changed only after it: an error up to and in the write leaves the cycle as it
    was, for uvicorn's own ``send`` to answer.
    """
    cycle: Any = getattr(send, "__self__", None)
    kind = _httptools_cycle()
    if kind is None or type(cycle) is not kind or cycle.access_log:
        return False
    if cycle.response_started:
        return False
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return True  # as uvicorn's send: an answer to a gone client is dropped
    transport = cycle.transport
    keep_alive = cycle.keep_alive
    completed = cycle.message_event
    on_response = cycle.on_response
    head = [_STATUS_200]
    for name, value in cycle.default_headers:
        head += (name, b": ", value, b"\r\n")
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    request_id = logs.current_request_id()
    if request_id is not None:
        head += (b"x-request-id: ", request_id.encode("ascii"), b"\r\n")
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head += (b"\r\n", body)
    transport.write(b"".join(head))
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.response_complete = True
    completed.set()
    if not keep_alive:
        transport.close()
    on_response()
    return True
