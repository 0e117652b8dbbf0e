"""Liveness and readiness probes.

Both are open: orchestrators and load balancers call them without a key. The
readiness figures (database, schema revision, model version, customers) tell an
outsider what runs and how big the bank is, so they are added only for a key
with scope 'ops' (or with ``ops_endpoints="open"``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import text

from service.api.deps import AuditDep, EngineDep, ServingDep
from service.auth import sees_ops_figures
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
def ready(
    figures: Annotated[bool, Depends(sees_ops_figures)],
    engine: EngineDep,
    state: ServingDep,
    audit: AuditDep,
) -> Health:
    """Ready to serve: the database answers and is migrated, this worker loaded its
    snapshot and the active model version (if one is active), and the audit writer runs;
    503 problem otherwise. Only ``status`` without a key; with a key holding 'ops' (or
    when ops endpoints are open), the figures too."""
    try:
        with read_only(engine).connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = db.current_revision(engine)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        raise Unavailable(f"database unreachable: {type(exc).__name__}") from None
    if revision is None:
        raise Unavailable("database schema not migrated: run `nbo db upgrade`")
    snapshot = state.snapshot
    if snapshot is None:
        raise Unavailable("this worker has not loaded its serving snapshot yet")
    if state.load_error is not None:
        # The message may name files and versions: it is in this worker's log.
        raise Unavailable("this worker could not load the active model version")
    if not audit.healthy:
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
