"""The FastAPI application factory: nothing happens at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route

from service import dashboard, db, metrics
from service.api import catalogue, data, decisions, feedback, health, reports
from service.audit import AuditWriter, audit_writer
from service.auth import KeyStore
from service.errors import install_error_handlers
from service.metrics import MetricsMiddleware
from service.serving import ServingState
from service.settings import Settings

log = logging.getLogger("nbo.app")

API_VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = db.engine_from_settings(settings)
    app.state.engine = engine
    app.state.keys = KeyStore(engine, ttl_seconds=settings.api_key_ttl_seconds)
    state = ServingState(engine, settings)
    app.state.serving = state
    audit = audit_writer(engine, settings.data_dir / "spool", lanes=settings.audit_commit_lanes)
    app.state.audit = audit
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
    try:
        yield
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await audit.close()
        engine.dispose()
        metrics.mark_worker_dead(os.getpid())


async def _load(state: ServingState) -> None:
    """Load the snapshot; a worker that cannot (database down, no schema) still starts,
    answers decisions degraded, and retries from the poll loop."""
    try:
        snapshot = await asyncio.to_thread(state.load)
    except Exception:  # noqa: BLE001 - start anyway; readiness reports the fault
        log.exception("serving state could not be loaded; retrying in the background")
        metrics.MODEL_LOADS.labels("failure").inc()
        return
    metrics.MODEL_LOADS.labels("success" if snapshot.model is not None else "failure").inc()
    metrics.set_active_model(snapshot.version)


async def _poll_forever(state: ServingState, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
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
            log.warning("change poll failed", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the nbo application for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    app = FastAPI(
        title="nbo",
        version=API_VERSION,
        summary="Next-best-offer recommendations for banks.",
        description=(
            "Every /v1 operation needs an API key (`nbo keys create`), sent as "
            "`Authorization: Bearer <key>` or `X-API-Key: <key>`, holding the scope the "
            "operation names. Errors are RFC 9457 problem details."
        ),
        lifespan=lifespan,
        responses=_PROBLEM_RESPONSES,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # The decision hot path, served by a plain route ahead of its documented twin.
    app.router.routes.insert(
        0,
        Route(
            "/v1/customers/{customer_id}/decisions",
            decisions.serve_decision,
            methods=["POST"],
            include_in_schema=False,
        ),
    )
    app.include_router(decisions.router)
    app.include_router(data.router)
    app.include_router(catalogue.router)
    app.include_router(feedback.router)
    app.include_router(reports.router)
    app.include_router(dashboard.router)
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
