"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import text

from service import db
from service.db import read_only
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


@router.get("/health/ready", operation_id="health_ready", response_model=Health)
def ready(request: Request) -> Health:
    """The database answers and its schema is migrated; 503 problem otherwise."""
    engine = request.app.state.engine
    try:
        with read_only(engine).connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = db.current_revision(engine)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        raise Unavailable(f"database unreachable: {type(exc).__name__}") from None
    if revision is None:
        raise Unavailable("database schema not migrated: run `nbo db upgrade`")
    snapshot = getattr(request.app.state, "serving", None)
    snapshot = None if snapshot is None else snapshot.snapshot
    return Health(
        status="ok",
        database=engine.dialect.name,
        schema_revision=revision,
        model_version=None if snapshot is None else snapshot.version,
        degraded=True if snapshot is None else snapshot.degraded,
        customers=None if snapshot is None else len(snapshot.customers),
    )
