"""The measurement reports, on SQLite and PostgreSQL, against figures worked out by hand.

Three small banks are seeded with direct inserts: ``seed_month`` (conversion, NPS and
CSAT over 2026-03-02 .. 2026-03-15), ``seed_day`` (staff and branch daily figures on
2026-04-07) and ``seed_uplift`` (200 customers contacted in May 2026, half in control).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert
from typer.testing import CliRunner

from service import auth
from service.app import create_app
from service.cli.main import app as cli_app
from service.data.db import unit_of_work
from service.data.tables import Base
from service.reports import measures as reports
from service.reports.measures import (
    ConversionRow,
    CsatRow,
    DayFigures,
    NpsRow,
    Period,
    difference_interval,
)
from service.settings import Settings

T = Base.metadata.tables
UTC = dt.UTC
MONTH = Period(dt.date(2026, 3, 2), dt.date(2026, 3, 15))
DAY = dt.date(2026, 4, 7)
MAY = Period(dt.date(2026, 5, 1), dt.date(2026, 5, 31))

runner = CliRunner()


def at(day: str, time: str = "10:00") -> dt.datetime:
    return dt.datetime.fromisoformat(f"{day}T{time}").replace(tzinfo=UTC)


def day_of(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


# --------------------------------------------------------------------------- seeding

PRODUCTS = [
    {"id": 1, "code": "CUR", "name": "Current account", "category": "accounts", "value": 100.0},
    {"id": 2, "code": "SAV", "name": "Savings", "category": "savings", "value": 50.0},
    {"id": 3, "code": "CC", "name": "Credit card", "category": "cards", "value": 200.0},
    {
        "id": 4,
        "code": "INS",
        "name": "Insurance",
        "category": "insurance",
        "value": 10.0,
        "active": False,
    },
]
PRODUCT_ID = {p["code"]: p["id"] for p in PRODUCTS}


def insert_rows(engine: Engine, rows: dict[str, list[dict[str, Any]]]) -> None:
    with engine.begin() as connection:
        for table in (
            "products",
            "customers",
            "adoptions",
            "decisions",
            "offers",
            "offer_outcomes",
            "feedback",
        ):
            if rows.get(table):
                connection.execute(insert(T[table]), rows[table])


def catalogue(customers: int) -> dict[str, list[dict[str, Any]]]:
    return {
        "products": [{"active": True, **p} for p in PRODUCTS],
        "customers": [
            {"id": i, "external_id": f"C{i:04d}", "attributes": {}} for i in range(1, customers + 1)
        ],
    }


def decision(
    ident: str,
    customer: int,
    when: dt.datetime,
    *,
    staff: str | None = "S1",
    branch: str | None = "B1",
    channel: str = "branch",
    model: str | None = "v1",
    control: bool = False,
    cold_start: bool = False,
) -> dict[str, Any]:
    return {
        "id": ident,
        "customer_id": customer,
        "customer_external_id": f"C{customer:04d}",
        "channel": channel,
        "staff_id": staff,
        "branch_id": branch,
        "model_version": model,
        "control": control,
        "degraded": False,
        "cold_start": cold_start,
        "created_at": when,
    }


class Bank:
    """Collects rows, then inserts them in one transaction."""

    def __init__(self, customers: int) -> None:
        self.rows = catalogue(customers)
        self.decisions: dict[str, dict[str, Any]] = {}

    def decide(self, ident: str, customer: int, when: dt.datetime, **kwargs: Any) -> None:
        row = decision(ident, customer, when, **kwargs)
        self.decisions[ident] = row
        self.rows.setdefault("decisions", []).append(row)

    def offer(self, ident: str, decision_id: str, product: str, *outcomes: str) -> None:
        made = self.decisions[decision_id]
        self.rows.setdefault("offers", []).append(
            {
                "id": ident,
                "decision_id": decision_id,
                "customer_id": made["customer_id"],
                "product_id": PRODUCT_ID[product],
                "rank": 1,
                "propensity": 0.5,
                "expected_value": 1.0,
                "score": 1.0,
                "created_at": made["created_at"],
            }
        )
        for outcome in outcomes:
            self.rows.setdefault("offer_outcomes", []).append(
                {"offer_id": ident, "outcome": outcome, "created_at": made["created_at"]}
            )

    def adopt(
        self, customer: int, product: str, adopted: dt.date, closed: dt.date | None = None
    ) -> None:
        self.rows.setdefault("adoptions", []).append(
            {
                "customer_id": customer,
                "product_id": PRODUCT_ID[product],
                "adopted_at": adopted,
                "closed_at": closed,
                "source": "import",
            }
        )

    def feedback(
        self,
        kind: str,
        score: int,
        when: dt.datetime,
        decision_id: str | None = None,
        *,
        staff: str | None = None,
        branch: str | None = None,
    ) -> None:
        made = self.decisions.get(decision_id or "")
        self.rows.setdefault("feedback", []).append(
            {
                "kind": kind,
                "score": score,
                "decision_id": decision_id,
                "customer_id": made["customer_id"] if made else None,
                "staff_id": staff,
                "branch_id": branch,
                "created_at": when,
            }
        )

    def save(self, engine: Engine) -> None:
        insert_rows(engine, self.rows)


def seed_month(engine: Engine) -> None:
    """Offers and feedback over 2026-03-02 (Monday, ISO week 10) .. 2026-03-15 (week 11)."""
    bank = Bank(customers=10)
    bank.decide("D0", 1, at("2026-03-01", "23:59:59"))  # the day before: excluded
    bank.offer("O0", "D0", "CUR", "presented", "accepted")
    bank.decide("D1", 1, at("2026-03-02"), staff="S1", branch="B1", model="v1")
    bank.offer("O1", "D1", "CUR", "presented", "accepted")
    bank.offer("O2", "D1", "SAV", "presented", "declined")
    bank.decide("D2", 2, at("2026-03-03", "11:00"), staff="S1", branch="B1", model="v1")
    bank.offer("O3", "D2", "CUR", "not_now")  # answered without a 'presented' row
    bank.offer("O4", "D2", "CC")  # never answered
    bank.decide(
        "D3", 3, at("2026-03-10", "09:00"), staff="S2", branch="B1", channel="contact_centre"
    )
    bank.decisions["D3"]["model_version"] = "v2"
    bank.offer("O5", "D3", "SAV", "presented", "accepted")
    bank.decide(
        "D4",
        4,
        at("2026-03-12", "23:59:59"),
        staff=None,
        branch=None,
        channel="digital",
        model="v2",
    )
    bank.offer("O6", "D4", "CC", "declined")
    bank.decide("D5", 5, at("2026-03-15", "12:00"), staff="S3", branch="B2", model="v1")
    bank.offer("O7", "D5", "CUR", "presented")
    bank.decide("D9", 6, at("2026-03-16", "00:00"))  # the day after: excluded
    bank.offer("O9", "D9", "CUR", "presented", "accepted")

    bank.adopt(1, "CUR", day_of("2026-03-02"))  # O1 adopted the same day: 0 days
    bank.adopt(1, "SAV", day_of("2026-02-01"), day_of("2026-02-20"))  # before O2: not counted
    bank.adopt(2, "CC", day_of("2026-03-13"))  # O4 (03-03) adopted after 10 days
    bank.adopt(2, "CUR", day_of("2026-01-10"))  # held before O3: not counted
    bank.adopt(3, "SAV", day_of("2026-06-20"))  # O5 (03-10) after 102 days: outside 90
    bank.adopt(4, "CC", day_of("2026-03-20"))  # O6 (03-12) after 8 days, though declined

    # NPS: 10 P, 9 P, 7 passive, 8 passive, 0 D, 9 P, 6 D.
    bank.feedback("nps", 10, at("2026-03-02", "18:00"), "D1", staff="S1", branch="B1")
    bank.feedback("nps", 9, at("2026-03-03", "18:00"), "D2", staff="S1", branch="B1")
    bank.feedback("nps", 7, at("2026-03-10", "18:00"), "D3", staff="S2", branch="B1")
    bank.feedback("nps", 8, at("2026-03-15", "18:00"), "D5", staff="S3", branch="B2")
    bank.feedback("nps", 0, at("2026-03-15", "19:00"), None, branch="B2")
    bank.feedback("nps", 9, at("2026-03-12", "23:59:59"), "D4")
    bank.feedback("nps", 6, at("2026-03-04", "08:00"), "D2")  # staff, branch from D2: S1, B1
    bank.feedback("nps", 10, at("2026-03-16", "00:00"), "D9")  # the day after: excluded
    # CSAT: 5, 4, 2, 3, 1.
    bank.feedback("csat", 5, at("2026-03-02", "18:00"), "D1", staff="S1", branch="B1")
    bank.feedback("csat", 4, at("2026-03-10", "18:00"), "D3", staff="S2", branch="B1")
    bank.feedback("csat", 2, at("2026-03-15", "18:00"), "D5", staff="S3", branch="B2")
    bank.feedback("csat", 3, at("2026-03-15", "19:00"), None, branch="B2")
    bank.feedback("csat", 1, at("2026-03-12", "20:00"), "D4")
    bank.save(engine)


def seed_day(engine: Engine) -> None:
    """Staff S1, S2 (branch B1) and S3 (B2) on Tuesday 2026-04-07, and the days before."""
    bank = Bank(customers=10)
    bank.decide("E1", 1, at("2026-04-07", "09:00"), staff="S1", branch="B1")
    bank.offer("P1", "E1", "CUR", "presented", "accepted")
    bank.offer("P2", "E1", "SAV", "presented", "declined")
    bank.decide("E2", 2, at("2026-04-07", "10:00"), staff="S1", branch="B1")
    bank.offer("P3", "E2", "CC", "presented")
    bank.decide("E3", 3, at("2026-04-07", "11:00"), staff="S1", branch="B2")
    bank.offer("P4", "E3", "CUR", "not_now")
    bank.decide("E4", 4, at("2026-04-07", "12:00"), staff="S2", branch="B1")
    bank.offer("P5", "E4", "CUR", "presented", "accepted")
    bank.offer("P6", "E4", "SAV")
    bank.decide(
        "E5", 5, at("2026-04-07", "13:00"), staff="S3", branch="B2", channel="contact_centre"
    )
    bank.offer("P7", "E5", "CC", "presented", "accepted")
    bank.decide("E6", 6, at("2026-04-07", "14:00"), staff="S1", branch="B1", control=True)
    bank.decide("E7", 7, at("2026-04-05"), staff="S2", branch="B1")
    bank.offer("P8", "E7", "SAV", "presented", "accepted")
    bank.decide("E8", 8, at("2026-03-31"), staff="S1", branch="B1")  # before the trend
    bank.offer("P9", "E8", "CUR", "presented")
    bank.decide("E9", 1, at("2026-04-01", "00:00"), staff="S1", branch="B1")  # first trend day
    bank.offer("P10", "E9", "SAV", "declined")

    bank.adopt(1, "CUR", DAY)  # P1: 0 days
    bank.adopt(3, "CUR", day_of("2026-04-10"))  # P4: 3 days

    bank.feedback("nps", 10, at("2026-04-07", "18:00"), "E1", staff="S1", branch="B1")
    bank.feedback("nps", 5, at("2026-04-07", "18:00"), "E3", staff="S1", branch="B2")
    bank.feedback("nps", 9, at("2026-04-07", "18:00"), "E4", staff="S2", branch="B1")
    bank.feedback("nps", 2, at("2026-04-07", "18:00"), "E5", staff="S3", branch="B2")
    bank.feedback("csat", 4, at("2026-04-07", "18:00"), "E1", staff="S1", branch="B1")
    bank.feedback("csat", 2, at("2026-04-07", "18:00"), "E2", staff="S1", branch="B1")
    bank.feedback("csat", 5, at("2026-04-07", "18:00"), "E5", staff="S3", branch="B2")
    bank.feedback("nps", 8, at("2026-04-05", "18:00"), "E7", staff="S2", branch="B1")
    bank.save(engine)


def seed_uplift(engine: Engine) -> None:
    """Customers 1-100 treated, 101-200 control, first contacted on May (1 + i % 10)."""
    bank = Bank(customers=202)
    contact: dict[int, dt.date] = {}
    for i in range(1, 201):
        when = at(f"2026-05-{1 + i % 10:02d}")
        contact[i] = when.date()
        bank.decide(f"U{i}", i, when, control=i > 100)
    # A later control decision does not move customer 1 out of the treated arm.
    bank.decide("U1-later", 1, at("2026-05-20"), control=True)
    bank.decide("U201", 201, at("2026-05-03"), cold_start=True)  # cold start: not counted
    bank.decide("U202", 202, at("2026-04-30"))  # before the period: not counted

    def after(i: int, days: int) -> dt.date:
        return contact[i] + dt.timedelta(days=days)

    # CUR, treated: 1-28 after 5 days, 29 the same day, 30 on the window's last day (30
    # days), 31 one day too late -> 30 of 100. Customer 100 held CUR but closed it
    # before contact, so stays eligible.
    for i in range(1, 29):
        bank.adopt(i, "CUR", after(i, 5))
    bank.adopt(29, "CUR", after(29, 0))
    bank.adopt(30, "CUR", after(30, 30))
    bank.adopt(31, "CUR", after(31, 31))
    bank.adopt(100, "CUR", day_of("2025-01-01"), day_of("2026-04-01"))
    # CUR, control: 101-105 after 5 days; 150 holds CUR (open) -> 5 of 99.
    for i in range(101, 106):
        bank.adopt(i, "CUR", after(i, 5))
    bank.adopt(150, "CUR", day_of("2025-06-01"))
    # SAV, treated: 41-50 adopt; 91-100 hold it -> 10 of 90. Control: 111-118 -> 8 of 100.
    for i in range(41, 51):
        bank.adopt(i, "SAV", after(i, 10))
    for i in range(91, 101):
        bank.adopt(i, "SAV", day_of("2026-01-01"))
    for i in range(111, 119):
        bank.adopt(i, "SAV", after(i, 10))
    bank.save(engine)


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10.
        ((56, 70, 48, 80), (0.2000, 0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.6000, 0.1705, 0.8090)),
        ((5, 56, 0, 29), (0.0893, -0.0381, 0.1926)),
        ((0, 10, 0, 20), (0.0000, -0.1611, 0.2775)),
    ],
)
def test_difference_interval_matches_newcombe_table_ii(
    counts: tuple[int, int, int, int], expected: tuple[float, float, float]
) -> None:
    assert difference_interval(*counts) == pytest.approx(expected, abs=5e-5)


def test_difference_interval_widens_with_confidence_and_checks_input() -> None:
    _, low95, high95 = difference_interval(56, 70, 48, 80, 0.95)
    _, low99, high99 = difference_interval(56, 70, 48, 80, 0.99)
    assert low99 < low95 and high99 > high95
    with pytest.raises(ValueError, match="at least one trial"):
        difference_interval(0, 0, 1, 2)
    with pytest.raises(ValueError, match="between 0 and n=2"):
        difference_interval(1, 2, 3, 2)
    with pytest.raises(ValueError, match="confidence"):
        difference_interval(1, 2, 1, 2, confidence=1.0)


def test_period_and_choices_are_checked(engine: Engine) -> None:
    with pytest.raises(ValueError, match="after its end"):
        Period(dt.date(2026, 3, 2), dt.date(2026, 3, 1))
    with pytest.raises(ValueError, match="by must be one of product, channel, branch, staff"):
        reports.conversion(engine, MONTH, by="colour")
    with pytest.raises(ValueError, match="by must be one of staff, branch, product, day"):
        reports.nps(engine, MONTH, by="channel")
    with pytest.raises(ValueError, match="adoption_window_days"):
        reports.conversion(engine, MONTH, adoption_window_days=-1)


# --------------------------------------------------------------------------- conversion


def row(key: str, *counts: int, conversion: float | None, median: float | None) -> ConversionRow:
    offers, presented, accepted, declined, not_now, adopted = counts
    return ConversionRow(
        key, offers, presented, accepted, declined, not_now, conversion, adopted, median
    )


# The month: O1 CUR P+A (adopted day 0), O2 SAV P+D, O3 CUR not_now, O4 CC unanswered
# (adopted day 10), O5 SAV P+A (adopted day 102), O6 CC declined (adopted day 8), O7 CUR P.
MONTH_TOTAL = row("(total)", 7, 6, 2, 2, 1, 3, conversion=2 / 6, median=8.0)  # median(0, 10, 8)
BY = {
    "product": [
        row("CC", 2, 1, 0, 1, 0, 2, conversion=0.0, median=9.0),  # O4, O6; median(10, 8)
        row("CUR", 3, 3, 1, 0, 1, 1, conversion=1 / 3, median=0.0),  # O1, O3, O7
        row("SAV", 2, 2, 1, 1, 0, 0, conversion=0.5, median=None),  # O2, O5 (102 > 90 days)
    ],
    "channel": [
        row("branch", 5, 4, 1, 1, 1, 2, conversion=0.25, median=5.0),  # O1-O4, O7
        row("contact_centre", 1, 1, 1, 0, 0, 0, conversion=1.0, median=None),  # O5
        row("digital", 1, 1, 0, 1, 0, 1, conversion=0.0, median=8.0),  # O6
    ],
    "staff": [
        row("S1", 4, 3, 1, 1, 1, 2, conversion=1 / 3, median=5.0),  # O1-O4
        row("S2", 1, 1, 1, 0, 0, 0, conversion=1.0, median=None),  # O5
        row("S3", 1, 1, 0, 0, 0, 0, conversion=0.0, median=None),  # O7
        row("(none)", 1, 1, 0, 1, 0, 1, conversion=0.0, median=8.0),  # O6
    ],
    "branch": [
        row("B1", 5, 4, 2, 1, 1, 2, conversion=0.5, median=5.0),  # O1-O5
        row("B2", 1, 1, 0, 0, 0, 0, conversion=0.0, median=None),  # O7
        row("(none)", 1, 1, 0, 1, 0, 1, conversion=0.0, median=8.0),  # O6
    ],
    "model_version": [
        row("v1", 5, 4, 1, 1, 1, 2, conversion=0.25, median=5.0),  # O1-O4, O7
        row("v2", 2, 2, 1, 1, 0, 1, conversion=0.5, median=8.0),  # O5, O6
    ],
    "week": [
        row("2026-W10", 4, 3, 1, 1, 1, 2, conversion=1 / 3, median=5.0),  # O1-O4
        row("2026-W11", 3, 3, 1, 1, 0, 1, conversion=1 / 3, median=8.0),  # O5-O7
    ],
}


@pytest.mark.parametrize("by", list(BY))
def test_conversion_by_every_dimension(engine: Engine, by: str) -> None:
    seed_month(engine)
    report = reports.conversion(engine, MONTH, by=by)
    assert report.by == by and report.period == MONTH
    assert report.rows == BY[by]
    assert report.total == MONTH_TOTAL


def test_conversion_window_decides_what_counts_as_adopted(engine: Engine) -> None:
    seed_month(engine)
    wide = reports.conversion(engine, MONTH, by="product", adoption_window_days=120)
    sav = next(r for r in wide.rows if r.key == "SAV")
    assert (sav.adopted, sav.median_days_to_adoption) == (1, 102.0)  # O5 now counts
    assert (wide.total.adopted, wide.total.median_days_to_adoption) == (4, 9.0)  # 0 8 10 102
    narrow = reports.conversion(engine, MONTH, by="product", adoption_window_days=0)
    assert [(r.key, r.adopted) for r in narrow.rows] == [("CC", 0), ("CUR", 1), ("SAV", 0)]


def test_conversion_of_an_empty_period(engine: Engine) -> None:
    seed_month(engine)
    report = reports.conversion(engine, Period(dt.date(2025, 1, 1), dt.date(2025, 1, 31)))
    assert report.rows == []
    assert report.total == row("(total)", 0, 0, 0, 0, 0, 0, conversion=None, median=None)


# --------------------------------------------------------------------------- NPS and CSAT

# NPS answers: 10 (D1 S1 B1, 03-02), 9 (D2 S1 B1, 03-03), 7 (D3 S2 B1, 03-10),
# 8 (D5 S3 B2, 03-15), 0 (no decision, B2, 03-15), 9 (D4, no staff or branch, 03-12),
# 6 (D2, staff and branch taken from D2: S1 B1, 03-04).
NPS_TOTAL = NpsRow("(total)", 7, 3, 2, 2, pytest.approx(100 * (3 - 2) / 7))
NPS_BY = {
    "branch": [
        NpsRow("B1", 4, 2, 1, 1, 25.0),  # 10 9 7 6
        NpsRow("B2", 2, 0, 1, 1, -50.0),  # 8 0
        NpsRow("(none)", 1, 1, 0, 0, 100.0),  # 9
    ],
    "staff": [
        NpsRow("S1", 3, 2, 0, 1, pytest.approx(100 / 3)),  # 10 9 6
        NpsRow("S2", 1, 0, 1, 0, 0.0),  # 7
        NpsRow("S3", 1, 0, 1, 0, 0.0),  # 8
        NpsRow("(none)", 2, 1, 0, 1, 0.0),  # 0 9
    ],
    "product": [  # D1 offered CUR, SAV; D2 CUR, CC; D3 SAV; D4 CC; D5 CUR
        NpsRow("CC", 3, 2, 0, 1, pytest.approx(100 / 3)),  # 9 (D2), 9 (D4), 6 (D2)
        NpsRow("CUR", 4, 2, 1, 1, 25.0),  # 10 9 8 6
        NpsRow("SAV", 2, 1, 1, 0, 50.0),  # 10 7
        NpsRow("(none)", 1, 0, 0, 1, -100.0),  # 0
    ],
    "day": [
        NpsRow("2026-03-02", 1, 1, 0, 0, 100.0),
        NpsRow("2026-03-03", 1, 1, 0, 0, 100.0),
        NpsRow("2026-03-04", 1, 0, 0, 1, -100.0),
        NpsRow("2026-03-10", 1, 0, 1, 0, 0.0),
        NpsRow("2026-03-12", 1, 1, 0, 0, 100.0),
        NpsRow("2026-03-15", 2, 0, 1, 1, -50.0),
    ],
}


@pytest.mark.parametrize("by", list(NPS_BY))
def test_nps_by_every_dimension(engine: Engine, by: str) -> None:
    seed_month(engine)
    report = reports.nps(engine, MONTH, by=by)
    assert report.rows == NPS_BY[by]
    assert report.total == NPS_TOTAL


# CSAT answers: 5 (D1 S1 B1), 4 (D3 S2 B1), 2 (D5 S3 B2), 3 (no decision, B2), 1 (D4).
CSAT_BY = {
    "branch": [
        CsatRow("B1", 2, 4.5, 1.0),
        CsatRow("B2", 2, 2.5, 0.0),
        CsatRow("(none)", 1, 1.0, 0.0),
    ],
    "product": [
        CsatRow("CC", 1, 1.0, 0.0),  # D4
        CsatRow("CUR", 2, 3.5, 0.5),  # D1, D5
        CsatRow("SAV", 2, 4.5, 1.0),  # D1, D3
        CsatRow("(none)", 1, 3.0, 0.0),
    ],
}


@pytest.mark.parametrize("by", list(CSAT_BY))
def test_csat_mean_and_satisfied_share(engine: Engine, by: str) -> None:
    seed_month(engine)
    report = reports.csat(engine, MONTH, by=by)
    assert report.rows == CSAT_BY[by]
    assert report.total == CsatRow("(total)", 5, 3.0, 0.4)  # (5+4+2+3+1)/5; 2 of 5 are 4-5


def test_feedback_of_an_empty_period(engine: Engine) -> None:
    seed_month(engine)
    empty = Period(dt.date(2025, 1, 1), dt.date(2025, 1, 2))
    assert reports.nps(engine, empty).total == NpsRow("(total)", 0, 0, 0, 0, None)
    assert reports.csat(engine, empty, by="day").rows == []


# --------------------------------------------------------------------------- daily figures

# 2026-04-07. S1: P1 CUR P+A, P2 SAV P+D, P3 CC P (branch B1), P4 CUR not_now (B2);
# S2 (B1): P5 CUR P+A, P6 SAV unanswered; S3 (B2): P7 CC P+A. E6: S1, B1, no offers.
# NPS: S1 10 (B1) and 5 (B2); S2 9 (B1); S3 2 (B2). CSAT: S1 4 and 2 (B1); S3 5 (B2).
S1_DAY = DayFigures(4, 4, 1, 0.25, 0.0, 2, 3.0, 2)
B1_DAY = DayFigures(5, 4, 2, 0.5, 100.0, 2, 3.0, 2)  # P1 P2 P3 P5 P6; NPS 10 9; CSAT 4 2
BANK_DAY = DayFigures(7, 6, 3, 0.5, 0.0, 4, pytest.approx(11 / 3), 3)


def test_staff_daily_against_branch_and_bank(engine: Engine) -> None:
    seed_day(engine)
    daily = reports.staff_daily(engine, "S1", DAY)
    # S1 made 3 decisions in B1 (E1, E2, E6) and 1 in B2 (E3).
    assert (daily.staff_id, daily.branch_id, daily.day) == ("S1", "B1", DAY)
    assert daily.staff == S1_DAY
    assert daily.branch == B1_DAY
    assert daily.bank == BANK_DAY
    assert daily.by_product == [
        row("CC", 1, 1, 0, 0, 0, 0, conversion=0.0, median=None),  # P3
        row("CUR", 2, 2, 1, 0, 1, 2, conversion=0.5, median=1.5),  # P1 (0 d), P4 (3 d)
        row("SAV", 1, 1, 0, 1, 0, 0, conversion=0.0, median=None),  # P2
    ]


def test_staff_daily_branch_ties_and_absence(engine: Engine) -> None:
    seed_day(engine)
    bank = Bank(customers=0)
    bank.rows = {"decisions": [decision("T1", 9, at("2026-04-07"), staff="S9", branch="B7")]}
    bank.rows["decisions"].append(decision("T2", 9, at("2026-04-07"), staff="S9", branch="B3"))
    bank.save(engine)
    assert reports.staff_daily(engine, "S9", DAY).branch_id == "B3"  # one each: smallest id
    nobody = reports.staff_daily(engine, "S404", DAY)
    assert nobody.branch_id is None
    assert nobody.staff == nobody.branch == reports.NO_FIGURES
    assert nobody.by_product == []


def test_branch_daily_staff_products_and_trend(engine: Engine) -> None:
    seed_day(engine)
    daily = reports.branch_daily(engine, "B1", DAY)
    assert daily.branch == B1_DAY
    assert daily.bank == BANK_DAY
    assert daily.staff == [
        ("S1", DayFigures(3, 3, 1, pytest.approx(1 / 3), 100.0, 1, 3.0, 2)),  # in B1 only
        ("S2", DayFigures(2, 1, 1, 1.0, 100.0, 1, None, 0)),
    ]
    assert daily.by_product == [
        row("CC", 1, 1, 0, 0, 0, 0, conversion=0.0, median=None),  # P3
        row("CUR", 2, 2, 2, 0, 0, 1, conversion=1.0, median=0.0),  # P1 (adopted), P5
        row("SAV", 2, 1, 0, 1, 0, 0, conversion=0.0, median=None),  # P2, P6
    ]
    empty = reports.NO_FIGURES
    assert daily.trend == [
        (dt.date(2026, 4, 1), DayFigures(1, 1, 0, 0.0, None, 0, None, 0)),  # P10 declined
        (dt.date(2026, 4, 2), empty),
        (dt.date(2026, 4, 3), empty),
        (dt.date(2026, 4, 4), empty),
        (dt.date(2026, 4, 5), DayFigures(1, 1, 1, 1.0, 0.0, 1, None, 0)),  # P8; NPS 8
        (dt.date(2026, 4, 6), empty),
        (DAY, B1_DAY),
    ]


def test_rolling_figures_for_the_gauges(engine: Engine) -> None:
    seed_day(engine)
    # Named: this bank's customers have no branch, so by default (the branches with most
    # customers) every branch would be pooled under "other".
    conversion, nps = reports.rolling_figures(engine, DAY, days=7, branches=("B1", "B2"))
    # 04-01 .. 04-07: CUR presented P1 P4 P5 (accepted P1 P5); SAV presented P2 P8 P10
    # (accepted P8; P6 never presented); CC by branch P3 (not accepted), by contact
    # centre P7 (accepted). P9 (03-31) is outside.
    assert conversion == pytest.approx(
        {
            ("CUR", "branch"): 2 / 3,
            ("SAV", "branch"): 1 / 3,
            ("CC", "branch"): 0.0,
            ("CC", "contact_centre"): 1.0,
        }
    )
    # B1: 10 9 8 -> 2 promoters of 3; B2: 5 2 -> all detractors.
    assert nps == pytest.approx({"B1": 200 / 3, "B2": -100.0})
    assert reports.rolling_figures(engine, dt.date(2020, 1, 1)) == ({}, {})


# --------------------------------------------------------------------------- uplift


def test_uplift_significant_and_not(engine: Engine) -> None:
    seed_uplift(engine)
    report = reports.uplift(engine, MAY, window_days=30)
    assert (report.window_days, report.confidence) == (30, 0.95)
    rows = {r.product_code: r for r in report.rows}
    assert list(rows) == ["CC", "CUR", "SAV"]  # active products; INS is inactive, unadopted

    cur = rows["CUR"]  # 30 of 100 treated vs 5 of 99 control (150 held it)
    assert (cur.treated_adopters, cur.treated_customers) == (30, 100)
    assert (cur.control_adopters, cur.control_customers) == (5, 99)
    assert cur.treated_rate == 0.30 and cur.control_rate == pytest.approx(5 / 99)
    difference, low, high = difference_interval(30, 100, 5, 99)
    assert cur.difference == pytest.approx(0.30 - 5 / 99)  # 0.2495
    assert (cur.ci_low, cur.ci_high) == pytest.approx((low, high))
    assert cur.ci_low > 0 and cur.significant
    assert cur.incremental_adoptions == pytest.approx(100 * (0.30 - 5 / 99))  # 24.95
    assert cur.incremental_value == pytest.approx(100 * (0.30 - 5 / 99) * 100.0)
    assert cur.verdict.startswith(
        "significant: treated customers adopted 24.9 points more often than the control "
        "group (30.0% vs 5.1%; 95% CI "
    )

    sav = rows["SAV"]  # 10 of 90 (91-100 held it) vs 8 of 100
    assert (sav.treated_adopters, sav.treated_customers) == (10, 90)
    assert (sav.control_adopters, sav.control_customers) == (8, 100)
    assert sav.difference == pytest.approx(10 / 90 - 0.08)
    assert sav.ci_low < 0 < sav.ci_high and not sav.significant
    assert sav.incremental_value == pytest.approx(90 * (10 / 90 - 0.08) * 50.0)
    assert sav.verdict.startswith("not significant: treated customers adopted 3.1 points more")
    assert "includes no difference" in sav.verdict

    cc = rows["CC"]
    assert (cc.treated_customers, cc.control_customers, cc.treated_adopters) == (100, 100, 0)
    assert not cc.significant and cc.incremental_value == 0.0
    assert cc.verdict.startswith("not significant: no customer adopted it")

    total = report.total  # any product: 1-30 or 41-50 treated; 101-105 or 111-118 control
    assert total.product_code == "(any)"
    assert (total.treated_adopters, total.treated_customers) == (40, 100)
    assert (total.control_adopters, total.control_customers) == (13, 100)
    assert total.difference == pytest.approx(0.27) and total.significant
    assert total.incremental_adoptions == pytest.approx(27.0)
    assert total.incremental_value == pytest.approx(cur.incremental_value + sav.incremental_value)


def test_uplift_window_and_confidence(engine: Engine) -> None:
    seed_uplift(engine)
    short = reports.uplift(engine, MAY, window_days=29)
    cur = next(r for r in short.rows if r.product_code == "CUR")
    assert cur.treated_adopters == 29  # customer 30 adopted on day 30
    strict = reports.uplift(engine, MAY, confidence=0.999)
    sav = next(r for r in strict.rows if r.product_code == "SAV")
    assert "99.9% CI" in sav.verdict


def test_uplift_without_control_is_not_enough_data(engine: Engine) -> None:
    seed_uplift(engine)
    bank = Bank(customers=0)
    bank.rows = {"decisions": [decision("X1", 1, at("2026-07-01"))]}  # one treated customer
    bank.save(engine)
    report = reports.uplift(engine, Period(dt.date(2026, 7, 1), dt.date(2026, 7, 1)))
    total = report.total
    assert (total.treated_customers, total.control_customers) == (1, 0)
    assert total.difference is None and total.ci_low is None and not total.significant
    assert total.incremental_adoptions == 0.0
    assert total.verdict == (
        "not enough data: no control-group customer to compare with "
        "(0 of 1 treated customers adopted)"
    )


# --------------------------------------------------------------------------- API


@pytest.fixture
def api(database_url: str, engine: Engine, tmp_path: Path) -> Iterator[tuple[TestClient, dict]]:
    with unit_of_work(engine) as session:
        keys = {
            "analyst": auth.create_key(
                session, name="analyst", scopes=auth.resolve_scopes(role="data-scientist")
            ),
            "teller": auth.create_key(
                session, name="teller", scopes=auth.resolve_scopes(role="teller")
            ),
        }
    settings = Settings(database_url=database_url, data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        yield client, {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}


MONTH_QUERY = {"start": "2026-03-02", "end": "2026-03-15"}


def test_api_needs_the_reports_scope(api: tuple[TestClient, dict]) -> None:
    client, headers = api
    url = "/v1/reports/conversion"
    assert client.get(url, params=MONTH_QUERY).status_code == 401
    forbidden = client.get(url, params=MONTH_QUERY, headers=headers["teller"])
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/problem+json"
    assert forbidden.json()["scope"] == "reports"


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("conversion", {"start": "2026-03-15", "end": "2026-03-02"}, "query.end"),
        ("uplift", {"start": "2026-03-15", "end": "2026-03-02"}, "query.end"),
        ("conversion", {**MONTH_QUERY, "by": "colour"}, "query.by"),
        ("nps", {**MONTH_QUERY, "by": "channel"}, "query.by"),
        ("csat", {"end": "2026-03-15"}, "query.start"),
        ("uplift", {**MONTH_QUERY, "confidence": "1.5"}, "query.confidence"),
        ("staff/S1/daily", {"day": "yesterday"}, "query.day"),
    ],
)
def test_api_invalid_parameters_are_problems_naming_the_field(
    api: tuple[TestClient, dict], path: str, params: dict[str, str], field: str
) -> None:
    client, headers = api
    response = client.get(f"/v1/reports/{path}", params=params, headers=headers["analyst"])
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert field in [error["field"] for error in response.json()["errors"]]


def test_api_reports(api: tuple[TestClient, dict], engine: Engine) -> None:
    client, headers = api
    seed_month(engine)
    reader = headers["analyst"]

    body = client.get(
        "/v1/reports/conversion", params={**MONTH_QUERY, "by": "week"}, headers=reader
    ).json()
    assert body["period"] == MONTH_QUERY and body["by"] == "week"
    assert body["adoption_window_days"] == 90
    assert [(r["key"], r["offers"], r["adopted"]) for r in body["rows"]] == [
        ("2026-W10", 4, 2),
        ("2026-W11", 3, 1),
    ]
    assert body["total"]["median_days_to_adoption"] == 8.0

    body = client.get("/v1/reports/nps", params=MONTH_QUERY, headers=reader).json()
    assert [(r["key"], r["nps"]) for r in body["rows"]] == [
        ("B1", 25.0),
        ("B2", -50.0),
        ("(none)", 100.0),
    ]
    body = client.get(
        "/v1/reports/csat", params={**MONTH_QUERY, "by": "product"}, headers=reader
    ).json()
    assert body["total"] == {"key": "(total)", "responses": 5, "mean": 3.0, "satisfied_share": 0.4}


def test_api_uplift(api: tuple[TestClient, dict], engine: Engine) -> None:
    client, headers = api
    seed_uplift(engine)
    body = client.get(
        "/v1/reports/uplift",
        params={"start": "2026-05-01", "end": "2026-05-31", "window_days": 30},
        headers=headers["analyst"],
    ).json()
    cur = next(r for r in body["rows"] if r["product_code"] == "CUR")
    assert cur["significant"] is True and cur["verdict"].startswith("significant:")
    assert body["total"]["product_code"] == "(any)" and body["confidence"] == 0.95


def test_api_daily(api: tuple[TestClient, dict], engine: Engine) -> None:
    client, headers = api
    seed_day(engine)
    reader = headers["analyst"]
    body = client.get("/v1/reports/staff/S1/daily", params={"day": "2026-04-07"}, headers=reader)
    assert body.status_code == 200, body.text
    daily = body.json()
    assert daily["branch_id"] == "B1" and daily["day"] == "2026-04-07"
    assert daily["staff"]["conversion"] == 0.25 and daily["branch"]["nps"] == 100.0
    assert daily["bank"]["offers"] == 7
    assert [r["key"] for r in daily["by_product"]] == ["CC", "CUR", "SAV"]

    branch = client.get(
        "/v1/reports/branches/B1/daily", params={"day": "2026-04-07"}, headers=reader
    ).json()
    assert [s["staff_id"] for s in branch["staff"]] == ["S1", "S2"]
    assert [t["day"] for t in branch["trend"]][0] == "2026-04-01"
    assert branch["trend"][-1]["figures"]["offers"] == 5

    yesterday = client.get("/v1/reports/staff/S1/daily", headers=reader).json()
    expected = dt.datetime.now(UTC).date() - dt.timedelta(days=1)
    assert yesterday["day"] == expected.isoformat()


# --------------------------------------------------------------------------- CLI


def nbo(args: list[str], database_url: str, tmp_path: Path) -> Any:
    return runner.invoke(
        cli_app,
        ["report", *args],
        env={"NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(tmp_path), "COLUMNS": "250"},
    )


def test_cli_conversion_table_and_csv(database_url: str, engine: Engine, tmp_path: Path) -> None:
    seed_month(engine)
    period = ["--start", "2026-03-02", "--end", "2026-03-15"]
    shown = nbo(["conversion", *period, "--by", "channel"], database_url, tmp_path)
    assert shown.exit_code == 0, shown.output
    assert "contact_centre" in shown.output and "(total)" in shown.output
    assert "25.0%" in shown.output  # branch: 1 accepted of 4 presented

    out = tmp_path / "conversion.csv"
    written = nbo(["conversion", *period, "--csv", str(out)], database_url, tmp_path)
    assert written.exit_code == 0, written.output
    rows = list(csv.DictReader(out.open()))
    assert [r["key"] for r in rows] == ["CC", "CUR", "SAV", "(total)"]
    assert rows[-1]["offers"] == "7" and rows[-1]["median_days_to_adoption"] == "8.0"

    piped = nbo(["nps", *period, "--by", "staff", "--format", "csv"], database_url, tmp_path)
    assert piped.exit_code == 0, piped.output
    rows = list(csv.DictReader(io.StringIO(piped.stdout)))
    assert [(r["key"], r["responses"]) for r in rows] == [
        ("S1", "3"),
        ("S2", "1"),
        ("S3", "1"),
        ("(none)", "2"),
        ("(total)", "7"),
    ]
    csat = nbo(["csat", *period], database_url, tmp_path)
    assert csat.exit_code == 0 and "4.50" in csat.output


def test_cli_uplift_prints_verdicts(database_url: str, engine: Engine, tmp_path: Path) -> None:
    seed_uplift(engine)
    result = nbo(["uplift", "--start", "2026-05-01", "--end", "2026-05-31"], database_url, tmp_path)
    assert result.exit_code == 0, result.output
    assert "CUR: significant: treated customers adopted 24.9 points more often" in result.output
    assert "SAV: not significant:" in result.output


def test_cli_staff_and_branch(database_url: str, engine: Engine, tmp_path: Path) -> None:
    seed_day(engine)
    staff = nbo(["staff", "S1", "--day", "2026-04-07"], database_url, tmp_path)
    assert staff.exit_code == 0, staff.output
    assert "branch B1" in staff.output and "25.0%" in staff.output
    branch = nbo(["branch", "B1", "--day", "2026-04-07"], database_url, tmp_path)
    assert branch.exit_code == 0, branch.output
    assert "S2" in branch.output and "Tue 07 Apr" in branch.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["conversion", "--start", "2026-13-01", "--end", "2026-03-15"], "not a date"),
        (["nps", "--start", "2026-03-15", "--end", "2026-03-01"], "before --start"),
        (["conversion", "--start", "2026-03-01", "--end", "2026-03-15", "--by", "x"], "--by"),
        (["staff", "S1", "--day", "monday"], "not a date"),
        (
            ["uplift", "--start", "2026-05-01", "--end", "2026-05-31", "--confidence", "95"],
            "0 and 1",
        ),
    ],
)
def test_cli_bad_parameters_exit_2(
    database_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    result = nbo(args, database_url, tmp_path)
    assert result.exit_code == 2
    assert message in result.output
