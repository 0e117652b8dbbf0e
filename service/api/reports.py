"""GET /v1/reports/...: conversion, uplift against control, NPS and CSAT, staff daily."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/reports", tags=["reports"])
