"""/dashboard/...: server-rendered pages of yesterday's results for branches and staff."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dashboard", include_in_schema=False)
