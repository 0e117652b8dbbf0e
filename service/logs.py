"""Structured logs: JSON lines (or text on a terminal), request ids, the access log.

``nbo serve`` configures logging through uvicorn's ``log_config``
(:func:`log_config`), in the server process and in every worker: one handler on
standard error writing each record as one JSON object per line (``ts``, ``level``,
``logger``, ``msg``, then the record's ``extra=`` fields and, for an exception, its
``traceback``), or as a readable line when standard error is a terminal. nbo's own
loggers (``nbo.*``) and uvicorn's write at the ``log_level`` setting; every other
library at WARNING (SQLAlchemy's statement log would carry customer data).

Each HTTP request has an id: the client's ``X-Request-ID`` when it is a sane token
(:func:`request_id_of`), else a new one. It is echoed in the response's
``X-Request-ID``, put in every problem body (:mod:`service.errors`), and added by
:class:`ContextFilter` to every line logged while the request is served, with the
decision id once a decision has one. :class:`RequestLogs` (pure ASGI middleware) does
this for routed requests and writes their access lines; the decision fast lane, which
runs before any middleware, does it itself (:mod:`service.decision.lane`).

An access line holds the method, the route template (never the path: a customer id
is personal data), the status, the duration and the request id; never the query
string, a body or a header.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
import traceback
from contextvars import ContextVar, Token
from typing import Any, Final, Literal, TextIO

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import _RouteTemplates

access_log = logging.getLogger("nbo.access")

REQUEST_ID_HEADER: Final = "X-Request-ID"
"""The request header a client may set an id in, and the response header echoing it."""

MAX_REQUEST_ID = 128
"""Longest request id taken from a client, in characters."""

# Printable ASCII without spaces: safe in a header, a JSON string and a log line.
_SANE_REQUEST_ID = re.compile(rb"[!-~]{1,%d}" % MAX_REQUEST_ID)
_HEADER = b"x-request-id"

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestContext:
    """What the log lines of one request carry: its id, and its decision's id."""

    __slots__ = ("request_id", "decision_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.decision_id: str | None = None


_CURRENT: ContextVar[RequestContext | None] = ContextVar("nbo_request", default=None)


class _RequestIds:
    """Request ids of one process: a random prefix and a counter, 16 hexadecimal digits.

    A random id per request (``os.urandom``, ``uuid4``) cost several times a counter
    on the decision lane's hot path. Ids need to be unique, not secret: 32 random bits
    per process (drawn again in a forked child) tell the workers apart.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(4).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFF:08x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reseed)


def new_request_id() -> str:
    """A fresh request id: 16 hexadecimal digits, unique in practice."""
    return _request_ids.next()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The request id of a request with ASGI ``headers``: its ``X-Request-ID`` when that
    is 1 to :data:`MAX_REQUEST_ID` printable ASCII characters without spaces, else a new
    one (an id that could break a log line or a header is not echoed)."""
    for name, value in headers:
        if name == _HEADER:
            if _SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


def begin_request(request_id: str) -> Token[RequestContext | None]:
    """Make ``request_id`` the id of what is logged from here on in this context; pass
    the token to :func:`end_request`."""
    return _CURRENT.set(RequestContext(request_id))


def end_request(token: Token[RequestContext | None]) -> None:
    """Undo the :func:`begin_request` that gave ``token``."""
    _CURRENT.reset(token)


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    context = _CURRENT.get()
    return None if context is None else context.request_id


def note_decision(decision_id: str) -> None:
    """Put ``decision_id`` on the lines logged for the rest of the current request."""
    context = _CURRENT.get()
    if context is not None:
        context.decision_id = decision_id


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``decision_id`` of the request being served (if any) to
    each record; a handler filter, so that it sees the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _CURRENT.get()
        if context is not None:
            if not hasattr(record, "request_id"):
                record.request_id = context.request_id
            if context.decision_id is not None and not hasattr(record, "decision_id"):
                record.decision_id = context.decision_id
        return True


# The attributes every LogRecord has: anything else on a record came from ``extra=``
# (or a filter) and is written as a field.
_RECORD_ATTRIBUTES = frozenset(
    {
        *vars(logging.LogRecord("", 0, "", 0, "", (), None)),
        "message",
        "asctime",
        "taskName",
        "color_message",  # uvicorn's message with terminal colours
    }
)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of ``record`` beyond the standard ones: its ``extra=`` and the
    request and decision ids."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}


def _timestamp(record: logging.LogRecord) -> str:
    """``record``'s time as ISO-8601 UTC with milliseconds (``2026-01-31T09:15:02.123Z``)."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, the fields
    (:func:`fields_of`), and ``traceback`` (and ``stack``) when the record has them.
    A field that JSON cannot hold is written as its ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = fields_of(record)
        line.update(
            ts=_timestamp(record),
            level=record.levelname,
            logger=record.name,
            msg=record.getMessage(),
        )
        if record.exc_info:
            line["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        # The fixed keys first, for a reader's eye; the fields after.
        ordered = {k: line.pop(k) for k in ("ts", "level", "logger", "msg")} | line
        return orjson.dumps(ordered, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """A readable line per record: time, level, logger, message, ``key=value`` fields,
    then the traceback on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        text = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += "  " + fields
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def chosen_format(
    log_format: Literal["auto", "json", "text"], stream: TextIO | None = None
) -> Literal["json", "text"]:
    """The format the ``log_format`` setting asks for: 'auto' is text when ``stream``
    (standard error by default) is a terminal, JSON otherwise."""
    if log_format != "auto":
        return log_format
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def log_config(
    log_format: Literal["auto", "json", "text"],
    log_level: str,
    *,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` configuration (uvicorn's ``log_config``):
    one handler on standard error in the chosen format (:func:`chosen_format`, decided
    here, so that every worker writes as the server process decided), with
    :class:`ContextFilter`; ``nbo`` and ``uvicorn`` loggers at ``log_level``, others at
    WARNING. Loggers configured before are left enabled."""
    level = log_level.upper()
    formatter = JsonFormatter if chosen_format(log_format, stream) == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": f"{__name__}.ContextFilter"}},
        "formatters": {"nbo": {"class": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "nbo",
                "filters": ["context"],
            }
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "nbo": {"level": level},
            # uvicorn's own handlers (set by its default configuration) go: its lines
            # reach the one handler above.
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            # Off: nbo writes its own access lines (route templates, no query strings).
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }


def access_line(method: str, route: str, status: int, started: float) -> None:
    """Log the access line of one request (the request id comes from the context)."""
    access_log.info(
        "request",
        extra={
            "method": method if method in _KNOWN_METHODS else "other",
            "route": route,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


class RequestLogs:
    """Pure ASGI middleware: each HTTP request's id (taken or made, set for its log
    lines, echoed in ``X-Request-ID``) and its access line.

    Install it outermost (``app.add_middleware`` last). When the application raises,
    the id stays set for the error handler outside the middleware stack (Starlette's
    server-error middleware) to log it and put it in the 500 problem; the context ends
    with the request's task.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._templates = _RouteTemplates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        request_id = request_id_of(scope["headers"])
        echoed = request_id.encode("ascii")
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name.lower() == _HEADER for name, _ in headers):
                    headers.append((_HEADER, echoed))
                message = {**message, "headers": headers}
            await send(message)

        token = begin_request(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # 500 unless an answer had started (the status it sent).
            access_line(scope["method"], self._route(scope, path, root_path), status, started)
            raise
        access_line(scope["method"], self._route(scope, path, root_path), status, started)
        end_request(token)

    def _route(self, scope: Scope, path: str, root_path: str) -> str:
        return self._templates.template(scope, path, root_path)
