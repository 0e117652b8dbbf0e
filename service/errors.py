"""Errors as RFC 9457 problem details (``application/problem+json``).

Code raises a typed :class:`Problem` subclass carrying its HTTP status; the
handlers installed by :func:`install_error_handlers` render every error, our
own, FastAPI's validation errors and unexpected exceptions, in that one
shape. A 500 says nothing internal; its traceback goes to the log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class Unavailable(Problem):
    status, title, slug = 503, "Service Unavailable", "unavailable"


class Invalid(Problem):
    """A request that parses but names something that does not fit (pass ``errors``)."""

    status, title, slug = 422, "Unprocessable Content", "validation"


class TooLarge(Problem):
    status, title, slug = 413, "Content Too Large", "too-large"


class Conflict(Problem):
    status, title, slug = 409, "Conflict", "conflict"


def problem_response(status: int, title: str, detail: str, slug: str, **extra: Any) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def render_problem(exc: Problem, path: str) -> JSONResponse:
    """The answer to a :class:`Problem` raised while serving ``path``."""
    return JSONResponse(
        exc.body(path), status_code=exc.status, media_type=PROBLEM_JSON, headers=exc.headers
    )


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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return render_unexpected(request.url.path)
