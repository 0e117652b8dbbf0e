"""Typed dependencies: what a route may ask for, in one place.

The application keeps its per-worker services on ``app.state`` (settings from
:func:`service.app.create_app`, the rest from its lifespan). Routes never reach into
``request.app.state`` (typed ``Any``); they declare what they need::

    @router.get("/v1/things")
    async def things(engine: EngineDep, serving: ServingDep) -> ...:

Each getter is ``async`` so FastAPI calls it on the event loop rather than in a
worker thread.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from sqlalchemy import Engine

from service.auth import KeyStore
from service.decision.audit import AuditSink
from service.decision.state import ServingState
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


async def get_engine(request: Request) -> Engine:
    return cast(Engine, request.app.state.engine)


async def get_serving(request: Request) -> ServingState:
    return cast(ServingState, request.app.state.serving)


async def get_keys(request: Request) -> KeyStore:
    return cast(KeyStore, request.app.state.keys)


async def get_audit(request: Request) -> AuditSink:
    return cast(AuditSink, request.app.state.audit)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ServingDep = Annotated[ServingState, Depends(get_serving)]
KeysDep = Annotated[KeyStore, Depends(get_keys)]
AuditDep = Annotated[AuditSink, Depends(get_audit)]
