"""Liveness and readiness probes.

Both are open: orchestrators and load balancers call them without a key. The
readiness figures (database, schema revision, model version, customers) tell an
outsider what runs and how big the bank is, so they are added only for a key
with scope 'ops' (or with ``ops_endpoints="open"``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import text

from service.auth import OPS_SCOPE, KeyStore
from service.data import db
from service.data.db import read_only
from service.errors import Unavailable

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str | None = None
    schema_revision: str | None = None
    model_version: str | None = None
    degraded: bool | None = None
    customers: int | None = None


@router.get("/health/live", operation_id="health_live", response_model=Health)
def live() -> Health:
    """The process is up and answering."""
    return Health(status="ok")


@router.get(
    "/health/ready",
    operation_id="health_ready",
    response_model=Health,
    responses={
        401: {"description": "An API key was sent and is not valid."},
        403: {"description": "An API key was sent without scope 'ops'."},
        503: {
            "description": "Not ready: the database is unreachable or unmigrated, this "
            "worker could not load its snapshot or the active model version, or the audit "
            "writer is not running."
        },
    },
)
def ready(request: Request) -> Health:
    """Ready to serve: the database answers and is migrated, this worker loaded its
    snapshot and the active model version (if one is active), and the audit writer runs;
    503 problem otherwise. Only ``status`` without a key; with a key holding 'ops' (or
    when ops endpoints are open), the figures too."""
    figures = _may_see_figures(request)
    engine = request.app.state.engine
    try:
        with read_only(engine).connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = db.current_revision(engine)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        raise Unavailable(f"database unreachable: {type(exc).__name__}") from None
    if revision is None:
        raise Unavailable("database schema not migrated: run `nbo db upgrade`")
    state = getattr(request.app.state, "serving", None)
    if state is None or state.snapshot is None:
        raise Unavailable("this worker has not loaded its serving snapshot yet")
    snapshot = state.snapshot
    if state.load_error is not None:
        # The message may name files and versions: it is in this worker's log.
        raise Unavailable("this worker could not load the active model version")
    if not request.app.state.audit.healthy:
        raise Unavailable("the audit writer is not running: decisions cannot be recorded")
    if not figures:
        return Health(status="ok")
    return Health(
        status="ok",
        database=engine.dialect.name,
        schema_revision=revision,
        model_version=snapshot.version,
        degraded=snapshot.degraded,
        customers=len(snapshot.customers),
    )


def _may_see_figures(request: Request) -> bool:
    """Whether the caller may see the readiness figures: ops endpoints open, or a key with
    'ops'. No key: no figures (not an error, probes send none); a key that is invalid or
    lacks the scope: 401 or 403, so a misconfigured scraper hears about it."""
    settings: Any = request.app.state.settings
    if settings.ops_endpoints == "open":
        return True
    authorization = request.headers.get("authorization")
    api_key = request.headers.get("x-api-key")
    if authorization is None and api_key is None:
        return False
    keys: KeyStore = request.app.state.keys
    keys.authenticate(authorization, api_key, OPS_SCOPE)  # a plain def: runs in a thread
    return True
