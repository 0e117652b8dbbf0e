"""Errors as RFC 9457 problem details (``application/problem+json``).

Code raises a typed :class:`Problem` subclass carrying its HTTP status; the
handlers installed by :func:`install_error_handlers` render every error, our
own, FastAPI's validation errors and unexpected exceptions, in that one
shape. A 500 says nothing internal; its traceback goes to the log.

Every problem answered while a request is served names the request's id
(:mod:`service.logs`): a ``request_id`` member (an RFC 9457 extension) and the
``X-Request-ID`` header, so that a client's report can be matched to the log lines.

A database that cannot be reached (refused or dropped connections, a timeout, a
full pool, a lock held too long) is a temporary outage, not a fault of the
request: :func:`is_outage` recognises it and the handlers answer 503 with
``Retry-After`` instead of 500.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logs import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger("nbo.errors")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://nbo.dev/problems/"


class Problem(Exception):
    """An error with an HTTP status, rendered as problem+json."""

    status: int = 500
    title: str = "Internal Server Error"
    slug: str = "internal"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extensions)
        return body


class NotFound(Problem):
    status, title, slug = 404, "Not Found", "not-found"


RETRY_AFTER_SECONDS = 5
"""What a 503 asks a client to wait before retrying (``Retry-After``)."""


class Unavailable(Problem):
    """503: something the request needs is down for now; carries ``Retry-After``."""

    status, title, slug = 503, "Service Unavailable", "unavailable"

    def __init__(
        self, detail: str, *, retry_after: int = RETRY_AFTER_SECONDS, **extensions: Any
    ) -> None:
        super().__init__(detail, **extensions)
        self.headers: dict[str, str] = {"Retry-After": str(retry_after)}


# PostgreSQL SQLSTATE classes and codes that say "try again later": connection
# exceptions (08), insufficient resources (53, e.g. too many connections),
# operator intervention (57: shutdown, cannot connect now, statement timeout),
# system errors (58), serialization failures and deadlocks, lock_timeout.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58"})
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "55006"})
# SQLite primary result codes of the same kind: busy, locked, I/O error, disk
# full, cannot open the file, lock protocol error.
_TRANSIENT_SQLITE_CODES = frozenset({5, 6, 10, 13, 14, 15})


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unreachable or overloaded for now.

    True for a pool timeout, a dropped connection, a client-side connection
    failure (no SQLSTATE: refused, timed out), and server errors whose SQLSTATE
    or SQLite code means "try again". False for errors a retry cannot fix (a
    constraint, a syntax error, a missing table), which stay 4xx/500.
    """
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
        return True
    if not isinstance(exc, sa_exc.OperationalError):
        return False
    original = exc.orig
    if isinstance(original, sqlite3.Error):
        code = getattr(original, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) in _TRANSIENT_SQLITE_CODES
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate is None:
        return True
    return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES


class Invalid(Problem):
    """A request that parses but names something that does not fit (pass ``errors``)."""

    status, title, slug = 422, "Unprocessable Content", "validation"


class TooLarge(Problem):
    status, title, slug = 413, "Content Too Large", "too-large"


class Conflict(Problem):
    status, title, slug = 409, "Conflict", "conflict"


def _answer(body: dict[str, Any], status: int, headers: dict[str, str] | None) -> JSONResponse:
    """The problem+json response of ``body``, with the request id of the request being
    served (if any) as its ``request_id`` member and its ``X-Request-ID`` header."""
    request_id = current_request_id()
    if request_id is not None:
        body["request_id"] = request_id
        headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_response(status: int, title: str, detail: str, slug: str, **extra: Any) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return _answer(body, status, None)


def render_problem(exc: Problem, path: str) -> JSONResponse:
    """The answer to a :class:`Problem` raised while serving ``path``."""
    return _answer(exc.body(path), exc.status, exc.headers)


def render_invalid(exc: RequestValidationError, path: str) -> JSONResponse:
    """The 422 answer to a validation error, each field named (``body.max_offers``)."""
    errors = [
        {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
        for error in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem_response(
        422, "Unprocessable Content", detail, "validation", errors=errors, instance=path
    )


def render_unexpected(path: str) -> JSONResponse:
    """The 500 answer: nothing internal is said (the caller logs the traceback)."""
    return problem_response(
        500,
        "Internal Server Error",
        "An unexpected error occurred; it has been logged.",
        "internal",
    )


def render_outage(exc: BaseException, path: str) -> JSONResponse:
    """The 503 answer to a database outage met while serving ``path`` (logged without
    the statement or its parameters, and without the path: it may hold a customer id;
    the request id on the line ties it to the request)."""
    log.warning("database unavailable", extra={"error": type(exc).__name__})
    return render_problem(Unavailable("the database is unavailable for now; retry shortly"), path)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error of ``app`` as problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return render_problem(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render_invalid(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 401: "unauthorized"}.get(
            exc.status_code, "http"
        )
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error")
        return problem_response(
            exc.status_code, title, str(exc.detail), slug, instance=request.url.path
        )

    # Registered on SQLAlchemy's own classes (not only Exception) so that an outage is
    # answered by the exception middleware: a handler for Exception runs in Starlette's
    # server-error middleware, which re-raises after answering.
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if is_outage(exc):
            return render_outage(exc, request.url.path)
        log.exception("unhandled error")
        return render_unexpected(request.url.path)

    app.add_exception_handler(sa_exc.DBAPIError, _database)
    app.add_exception_handler(sa_exc.TimeoutError, _database)
    app.add_exception_handler(sa_exc.DisconnectionError, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_outage(exc):
            return render_outage(exc, request.url.path)
        log.exception("unhandled error")
        return render_unexpected(request.url.path)
