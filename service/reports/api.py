"""GET /v1/reports/...: conversion, uplift against control, NPS and CSAT, staff daily.

Every report covers an explicit, inclusive range of UTC days (``start`` and ``end`` are
required). Handlers are plain ``def``: FastAPI runs them in its thread pool, so the
report's queries never block the event loop. The definitions behind each figure are in
:mod:`service.reports.measures`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from service.api.deps import EngineDep
from service.auth import Principal, require
from service.errors import Invalid
from service.reports import measures as reports
from service.reports.measures import ConversionDimension, FeedbackDimension, Period
from service.schemas import Date, Text

router = APIRouter(prefix="/v1/reports", tags=["reports"])

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key lacks scope 'reports'."},
    422: {"description": "A parameter is invalid, e.g. end before start (the field is named)."},
}

# Days from 1900-01-01 to a year past today, like every date nbo stores: a report of
# 0001-01-01 or 9999-12-31 overflows the date arithmetic behind it.
Start = Annotated[Date, Query(description="First day of the report (UTC), YYYY-MM-DD.")]
End = Annotated[Date, Query(description="Last day of the report (UTC, included), YYYY-MM-DD.")]
Day = Annotated[Date | None, Query(description="The day (UTC), YYYY-MM-DD; default yesterday.")]
Reader = Annotated[Principal, Depends(require("reports"))]

MAX_CONFIDENCE = 0.9999
"""Above this, 0.5 + confidence / 2 rounds to 1.0 in floating point (0.9999999999999999
did) and the normal quantile of the interval is infinite; no report needs more."""


# --------------------------------------------------------------------------- response models


class PeriodOut(BaseModel):
    start: dt.date
    end: dt.date


class ConversionRowOut(BaseModel):
    key: str = Field(description="The group's value; '(none)' when null, '(total)' for totals.")
    offers: int = Field(description="Offers made in the period (by decision day).")
    presented: int = Field(description="Offers with any outcome recorded.")
    accepted: int
    declined: int
    not_now: int
    conversion: float | None = Field(description="accepted / presented; null when none presented.")
    adopted: int = Field(description="Offers whose product was adopted within the window.")
    median_days_to_adoption: float | None


class ConversionReportOut(BaseModel):
    period: PeriodOut
    by: str
    adoption_window_days: int
    rows: list[ConversionRowOut]
    total: ConversionRowOut


class UpliftRowOut(BaseModel):
    product_code: str = Field(description="'(any)' for the total: adoption of any product.")
    treated_customers: int
    treated_adopters: int
    treated_rate: float | None
    control_customers: int
    control_adopters: int
    control_rate: float | None
    difference: float | None = Field(description="treated_rate - control_rate.")
    ci_low: float | None
    ci_high: float | None
    significant: bool = Field(description="Whether the confidence interval excludes zero.")
    incremental_adoptions: float
    incremental_value: float
    verdict: str = Field(description="The result in plain words.")


class UpliftReportOut(BaseModel):
    period: PeriodOut
    window_days: int
    confidence: float
    rows: list[UpliftRowOut]
    total: UpliftRowOut


class NpsRowOut(BaseModel):
    key: str
    responses: int
    promoters: int
    passives: int
    detractors: int
    nps: float | None = Field(description="% promoters - % detractors, -100 to 100.")


class NpsReportOut(BaseModel):
    period: PeriodOut
    by: str
    rows: list[NpsRowOut]
    total: NpsRowOut


class CsatRowOut(BaseModel):
    key: str
    responses: int
    mean: float | None
    satisfied_share: float | None = Field(description="Share of answers scoring 4 or 5.")


class CsatReportOut(BaseModel):
    period: PeriodOut
    by: str
    rows: list[CsatRowOut]
    total: CsatRowOut


class DayFiguresOut(BaseModel):
    offers: int
    presented: int
    accepted: int
    conversion: float | None
    nps: float | None
    nps_responses: int
    csat_mean: float | None
    csat_responses: int


class StaffDailyOut(BaseModel):
    staff_id: str
    branch_id: str | None = Field(description="Where the staff member made most decisions.")
    day: dt.date
    staff: DayFiguresOut
    branch: DayFiguresOut
    bank: DayFiguresOut
    by_product: list[ConversionRowOut]


class StaffFiguresOut(BaseModel):
    staff_id: str
    figures: DayFiguresOut


class DayTrendOut(BaseModel):
    day: dt.date
    figures: DayFiguresOut


class BranchDailyOut(BaseModel):
    branch_id: str
    day: dt.date
    branch: DayFiguresOut
    bank: DayFiguresOut
    staff: list[StaffFiguresOut]
    by_product: list[ConversionRowOut]
    trend: list[DayTrendOut] = Field(description="The branch's last 7 days, oldest first.")


# --------------------------------------------------------------------------- helpers


def _period(start: dt.date, end: dt.date) -> Period:
    if end < start:
        raise Invalid(
            f"query.end: {end} is before start {start}",
            errors=[{"field": "query.end", "message": f"before start {start}"}],
        )
    return Period(start, end)


def _yesterday() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def _fields(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value)


def _figures(value: reports.DayFigures) -> DayFiguresOut:
    return DayFiguresOut(**_fields(value))


def _conversion_rows(rows: list[reports.ConversionRow]) -> list[ConversionRowOut]:
    return [ConversionRowOut(**_fields(row)) for row in rows]


# --------------------------------------------------------------------------- routes


@router.get(
    "/conversion",
    operation_id="getConversionReport",
    summary="Offers, outcomes, conversion and adoption by a dimension",
    description=(
        "Offers made in the period (by decision day), how many were presented (any outcome "
        "recorded), accepted, declined or put off, conversion (accepted / presented), and "
        "how many were followed by an adoption of the product within adoption_window_days "
        "(any source), with the median days to it. Needs scope 'reports'."
    ),
    response_model=ConversionReportOut,
    responses=_AUTH_RESPONSES,
)
def get_conversion(
    principal: Reader,
    engine: EngineDep,
    start: Start,
    end: End,
    by: ConversionDimension = "product",
    adoption_window_days: Annotated[int, Query(ge=0, le=3650)] = 90,
) -> ConversionReportOut:
    report = reports.conversion(
        engine,
        _period(start, end),
        by=by,
        adoption_window_days=adoption_window_days,
    )
    return ConversionReportOut(
        period=PeriodOut(start=start, end=end),
        by=report.by,
        adoption_window_days=adoption_window_days,
        rows=_conversion_rows(report.rows),
        total=ConversionRowOut(**_fields(report.total)),
    )


@router.get(
    "/uplift",
    operation_id="getUpliftReport",
    summary="Adoption by customers who got model offers versus the control group",
    description=(
        "Customers contacted in the period (not cold start), in the arm of their first "
        "decision; for each product, those who did not hold it then, and how many adopted "
        "it within window_days of that first contact (any source). The difference of "
        "rates has a Newcombe hybrid score interval; 'significant' means it excludes zero. "
        "The total row '(any)' is adoption of any product. Needs scope 'reports'."
    ),
    response_model=UpliftReportOut,
    responses=_AUTH_RESPONSES,
)
def get_uplift(
    principal: Reader,
    engine: EngineDep,
    start: Start,
    end: End,
    window_days: Annotated[int, Query(ge=0, le=3650)] = 30,
    confidence: Annotated[
        float, Query(gt=0, le=MAX_CONFIDENCE, description="Level of the interval, at most 0.9999.")
    ] = 0.95,
) -> UpliftReportOut:
    report = reports.uplift(
        engine,
        _period(start, end),
        window_days=window_days,
        confidence=confidence,
    )
    return UpliftReportOut(
        period=PeriodOut(start=start, end=end),
        window_days=report.window_days,
        confidence=report.confidence,
        rows=[UpliftRowOut(**_fields(row)) for row in report.rows],
        total=UpliftRowOut(**_fields(report.total)),
    )


@router.get(
    "/nps",
    operation_id="getNpsReport",
    summary="Net promoter score by staff member, branch, product or day",
    description=(
        "NPS answers given in the period: promoters (9-10), passives (7-8), detractors "
        "(0-6) and % promoters - % detractors. By product, an answer counts once for each "
        "product offered in its decision. Needs scope 'reports'."
    ),
    response_model=NpsReportOut,
    responses=_AUTH_RESPONSES,
)
def get_nps(
    principal: Reader,
    engine: EngineDep,
    start: Start,
    end: End,
    by: FeedbackDimension = "branch",
) -> NpsReportOut:
    report = reports.nps(engine, _period(start, end), by=by)
    return NpsReportOut(
        period=PeriodOut(start=start, end=end),
        by=report.by,
        rows=[NpsRowOut(**_fields(row)) for row in report.rows],
        total=NpsRowOut(**_fields(report.total)),
    )


@router.get(
    "/csat",
    operation_id="getCsatReport",
    summary="Customer satisfaction by staff member, branch, product or day",
    description=(
        "CSAT answers (1-5) given in the period: mean score and share of 4s and 5s. "
        "Needs scope 'reports'."
    ),
    response_model=CsatReportOut,
    responses=_AUTH_RESPONSES,
)
def get_csat(
    principal: Reader,
    engine: EngineDep,
    start: Start,
    end: End,
    by: FeedbackDimension = "branch",
) -> CsatReportOut:
    report = reports.csat(engine, _period(start, end), by=by)
    return CsatReportOut(
        period=PeriodOut(start=start, end=end),
        by=report.by,
        rows=[CsatRowOut(**_fields(row)) for row in report.rows],
        total=CsatRowOut(**_fields(report.total)),
    )


@router.get(
    "/staff/{staff_id}/daily",
    operation_id="getStaffDaily",
    summary="A staff member's day beside their branch and the bank",
    description=(
        "Offers, presented, accepted, conversion, NPS and CSAT of the staff member on the "
        "day, of the branch where they made most decisions, and of the whole bank; and "
        "their offers by product. The day defaults to yesterday (UTC). Needs scope 'reports'."
    ),
    response_model=StaffDailyOut,
    responses=_AUTH_RESPONSES,
)
def get_staff_daily(
    principal: Reader,
    engine: EngineDep,
    staff_id: Annotated[Text, Path(min_length=1, max_length=64)],
    day: Day = None,
) -> StaffDailyOut:
    daily = reports.staff_daily(engine, staff_id, day or _yesterday())
    return StaffDailyOut(
        staff_id=daily.staff_id,
        branch_id=daily.branch_id,
        day=daily.day,
        staff=_figures(daily.staff),
        branch=_figures(daily.branch),
        bank=_figures(daily.bank),
        by_product=_conversion_rows(daily.by_product),
    )


@router.get(
    "/branches/{branch_id}/daily",
    operation_id="getBranchDaily",
    summary="A branch's day: its staff, its products and its last 7 days",
    description=(
        "The branch's figures on the day beside the bank's, each staff member's figures in "
        "the branch, its offers by product, and its figures on each of the 7 days ending "
        "at the day. The day defaults to yesterday (UTC). Needs scope 'reports'."
    ),
    response_model=BranchDailyOut,
    responses=_AUTH_RESPONSES,
)
def get_branch_daily(
    principal: Reader,
    engine: EngineDep,
    branch_id: Annotated[Text, Path(min_length=1, max_length=64)],
    day: Day = None,
) -> BranchDailyOut:
    daily = reports.branch_daily(engine, branch_id, day or _yesterday())
    return BranchDailyOut(
        branch_id=daily.branch_id,
        day=daily.day,
        branch=_figures(daily.branch),
        bank=_figures(daily.bank),
        staff=[
            StaffFiguresOut(staff_id=staff_id, figures=_figures(figures))
            for staff_id, figures in daily.staff
        ],
        by_product=_conversion_rows(daily.by_product),
        trend=[DayTrendOut(day=d, figures=_figures(figures)) for d, figures in daily.trend],
    )
