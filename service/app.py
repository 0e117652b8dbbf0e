"""The FastAPI application factory: nothing happens at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import db
from service.api import health
from service.errors import install_error_handlers
from service.settings import Settings

API_VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.engine = db.engine_from_settings(settings)
    try:
        yield
    finally:
        app.state.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the nbo application for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    app = FastAPI(
        title="nbo",
        version=API_VERSION,
        summary="Next-best-offer recommendations for banks.",
        lifespan=lifespan,
        responses=_PROBLEM_RESPONSES,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    return app


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
                    },
                }
            }
        },
    }
}
