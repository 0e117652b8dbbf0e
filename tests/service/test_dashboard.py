"""The /dashboard pages: sign-in, security headers, escaping, and the numbers of a seeded day.

The numbers in ``EXPECTED`` were worked out by hand from ``DECISIONS`` and
``FEEDBACK`` below; the browser test reads them back from the page as a
headless chromium renders it, and saves a screenshot under ``test-artifacts/``
(or ``$NBO_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from websockets.sync.client import ClientConnection, connect

from service import auth
from service.app import create_app
from service.data.db import unit_of_work
from service.data.tables import Customer, Decision, Feedback, Offer, OfferOutcome, Product
from service.reports import dashboard
from service.settings import Settings
from tests.uvicorn_thread import uvicorn_thread

REPO = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

DAY = dt.date(2024, 5, 14)
PAGE = f"/dashboard/branches/B1?day={DAY.isoformat()}"


def at(days: int, hour: int, minute: int = 0, second: int = 0) -> dt.datetime:
    """A moment ``days`` after DAY, in UTC."""
    return dt.datetime.combine(
        DAY + dt.timedelta(days=days), dt.time(hour, minute, second), tzinfo=dt.UTC
    )


PRODUCTS = {"CARD": "Credit card", "SAVE": "Savings account", "LOAN": "Personal loan"}

# Staff, branch, made at, and the offers: product and the outcomes recorded for it.
DECISIONS: list[tuple[str, str, dt.datetime, list[tuple[str, ...]]]] = [
    ("S1", "B1", at(0, 9), [("CARD", "presented", "accepted"), ("SAVE", "presented", "declined")]),
    ("S1", "B1", at(0, 11), [("CARD", "accepted"), ("LOAN",)]),
    ("S2", "B1", at(0, 10), [("SAVE", "not_now"), ("CARD", "declined")]),
    ("S2", "B1", at(0, 23, 59, 59), [("LOAN", "accepted")]),
    ("S3", "B2", at(0, 0), [("CARD", "declined"), ("SAVE", "declined"), ("LOAN", "accepted")]),
    ("S3", "B2", at(0, 15), [("CARD",)]),
    # Outside the day: the evening before (in B1's trend) and the first second after.
    ("S1", "B1", at(-1, 23, 30), [("CARD", "presented", "accepted")]),
    ("S1", "B1", at(1, 0, 0, 1), [("SAVE", "accepted")]),
]
# Kind, score, the index of the decision it follows, answered at.
FEEDBACK: list[tuple[str, int, int, dt.datetime]] = [
    ("nps", 10, 0, at(0, 12)),
    ("nps", 9, 0, at(0, 12)),
    ("nps", 3, 1, at(0, 12)),
    ("nps", 8, 2, at(0, 12)),
    ("nps", 10, 3, at(0, 23, 59, 59)),
    ("nps", 2, 4, at(0, 12)),
    ("nps", 5, 4, at(0, 12)),
    ("nps", 9, 5, at(0, 16)),
    ("nps", 10, 5, at(0, 16)),
    ("csat", 5, 0, at(0, 12)),
    ("csat", 4, 1, at(0, 12)),
    ("csat", 3, 2, at(0, 12)),
    ("csat", 2, 4, at(0, 12)),
    ("nps", 0, 6, at(-1, 23, 45)),
    ("csat", 1, 7, at(1, 0, 30)),
]

# By hand, for DAY:
#   S1: offers 4, with an outcome 3, accepted 2 -> 66.7%; NPS 10 9 3 -> (2-1)/3 = +33; CSAT 5 4 -> 4.5
#   S2: offers 3, with an outcome 3, accepted 1 -> 33.3%; NPS 8 10 -> (1-0)/2 = +50; CSAT 3 -> 3.0
#   B1 = S1 + S2: 7, 6, 3 -> 50.0%; NPS 10 9 3 8 10 -> (3-1)/5 = +40; CSAT 5 4 3 -> 4.0
#   S3 (B2): 4, 3, 1 -> 33.3%; NPS 2 5 9 10 -> 0; CSAT 2
#   bank: 11, 9, 4 -> 44.4%; NPS (5-3)/9 = +22; CSAT 5 4 3 2 -> 3.5
EXPECTED = {
    "branch-offers": ("7", 7),
    "branch-accepted": ("3", 3),
    "branch-conversion": ("50.0%", 0.5),
    "branch-nps": ("+40", 40.0),
    "branch-csat": ("4.0", 4.0),
    "bank-offers": ("11", 11),
    "bank-accepted": ("4", 4),
    "bank-conversion": ("44.4%", 4 / 9),
    "bank-nps": ("+22", 200 / 9),
    "bank-csat": ("3.5", 3.5),
}
EXPECTED_STAFF = {
    "S1": {
        "offers": "4",
        "accepted": "2",
        "conversion": "66.7%",
        "nps": "+33",
        "nps_responses": "3",
        "csat": "4.5",
    },
    "S2": {
        "offers": "3",
        "accepted": "1",
        "conversion": "33.3%",
        "nps": "+50",
        "nps_responses": "2",
        "csat": "3.0",
    },
}
# Product: offers, with an outcome, accepted, declined, not now, conversion.
EXPECTED_PRODUCTS = {
    "CARD": ("3", "3", "2", "1", "0", "66.7%"),
    "SAVE": ("2", "2", "0", "1", "1", "0.0%"),
    "LOAN": ("2", "1", "1", "0", "0", "100.0%"),
}


def seed(
    engine: Engine, decisions: list[tuple[str, str, dt.datetime, list[tuple[str, ...]]]]
) -> None:
    """Insert products, one customer per decision, the decisions, offers, outcomes, feedback."""
    with unit_of_work(engine) as session:
        products = {
            code: Product(code=code, name=name, category="retail", value=100.0)
            for code, name in PRODUCTS.items()
        }
        session.add_all(products.values())
        session.flush()
        made: list[Decision] = []
        for i, (staff, branch, when, offers) in enumerate(decisions):
            customer = Customer(external_id=f"C{i}", segment="mass", branch_id=branch)
            session.add(customer)
            session.flush()
            decision = Decision(
                id=str(uuid.uuid4()),
                customer_id=customer.id,
                customer_external_id=customer.external_id,
                channel="branch",
                staff_id=staff,
                branch_id=branch,
                created_at=when,
            )
            session.add(decision)
            made.append(decision)
            session.flush()
            for rank, (code, *outcomes) in enumerate(offers, start=1):
                offer = Offer(
                    id=str(uuid.uuid4()),
                    decision_id=decision.id,
                    customer_id=customer.id,
                    product_id=products[code].id,
                    rank=rank,
                    propensity=0.2,
                    expected_value=20.0,
                    score=20.0,
                    created_at=when,
                )
                session.add(offer)
                session.flush()
                session.add_all(
                    OfferOutcome(
                        offer_id=offer.id, outcome=outcome, staff_id=staff, created_at=when
                    )
                    for outcome in outcomes
                )
        if decisions is DECISIONS:
            for kind, score, index, when in FEEDBACK:
                decision = made[index]
                session.add(
                    Feedback(
                        kind=kind,
                        score=score,
                        decision_id=decision.id,
                        customer_id=decision.customer_id,
                        staff_id=decision.staff_id,
                        branch_id=decision.branch_id,
                        created_at=when,
                    )
                )


def new_key(engine: Engine, scopes: list[str]) -> str:
    with unit_of_work(engine) as session:
        return auth.create_key(session, name="dashboard-test", scopes=scopes)


@pytest.fixture
def app_settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path)


@pytest.fixture
def client(app_settings: Settings, engine: Engine) -> Iterator[TestClient]:
    seed(engine, DECISIONS)
    # As a browser posts the dashboard's forms: from the dashboard's own origin.
    with TestClient(
        create_app(app_settings),
        follow_redirects=False,
        headers={"Origin": "http://testserver"},
    ) as client:
        yield client


@pytest.fixture
def reports_key(engine: Engine) -> str:
    return new_key(engine, ["reports"])


_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "wbr",
}


class _Elements(HTMLParser):
    """Every element with an ``id`` (attributes and text), and the cells of each row
    marked ``data-staff`` or ``data-product`` by their ``data-metric``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, tuple[dict[str, str], str]] = {}
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self._open: list[tuple[str, dict[str, str], list[str]]] = []
        self._row: tuple[str, str] | None = None
        self._metric: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "tr":
            for kind in ("data-staff", "data-product"):
                if attributes.get(kind):
                    self._row = (kind, attributes[kind])
                    self.rows[self._row] = {}
        if tag == "td" and self._row is not None and "data-metric" in attributes:
            self._metric = attributes["data-metric"]
            self.rows[self._row][self._metric] = ""
        if tag not in _VOID:
            self._open.append((tag, attributes, []))
        elif "id" in attributes:
            self.by_id[attributes["id"]] = (attributes, "")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        while self._open:
            open_tag, attributes, text = self._open.pop()
            if "id" in attributes:
                self.by_id[attributes["id"]] = (attributes, "".join(text).strip())
            if open_tag == tag:
                break
        if tag == "td":
            self._metric = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)
        if self._row is not None and self._metric is not None:
            self.rows[self._row][self._metric] += data


def elements(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


def number(parsed: _Elements, ident: str) -> tuple[str, str]:
    """The text and ``data-value`` of the element ``ident``."""
    attributes, text = parsed.by_id[ident]
    return text, attributes["data-value"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "—"), (0.0, "0"), (-0.4, "0"), (12.5, "+13"), (-12.5, "-13"), (200 / 9, "+22")],
)
def test_nps_is_rounded_as_people_round(value: float | None, shown: str) -> None:
    assert dashboard.fmt_nps(value) == shown


def test_numbers_are_formatted_for_people() -> None:
    assert dashboard.fmt_count(1234567) == "1,234,567"
    assert dashboard.fmt_percent(3 / 7) == "42.9%"
    assert dashboard.fmt_percent(1.0) == "100.0%"
    assert dashboard.fmt_percent(None) == dashboard.fmt_csat(None) == "—"
    assert dashboard.fmt_csat(4.0) == "4.0"
    assert dashboard.fmt_day(DAY) == "Tuesday 14 May 2024"


# ------------------------------------------------------------------ HTTP tests


def test_pages_redirect_to_sign_in_without_a_key(client: TestClient) -> None:
    for path in (PAGE, "/dashboard/", "/dashboard/staff/S1"):
        response = client.get(path)
        assert response.status_code == 303, path
        location = response.headers["location"]
        assert location.startswith("/dashboard/login?next=")
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["next"] == [path]
    wrong = client.get(PAGE, headers={"Authorization": "Bearer nbo_abcdefgh_" + "x" * 43})
    assert wrong.status_code == 303


def test_sign_in_sets_a_strict_http_only_cookie_and_returns(
    client: TestClient, reports_key: str
) -> None:
    form = client.get(f"/dashboard/login?next={urllib.parse.quote(PAGE)}")
    assert form.status_code == 200 and 'name="key"' in form.text
    assert f'value="{PAGE.replace("&", "&amp;")}"' in form.text

    response = client.post("/dashboard/login", data={"key": reports_key, "next": PAGE})
    assert response.status_code == 303
    assert response.headers["location"] == PAGE
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("nbo_session=") and reports_key not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here; set when the request came over https

    page = client.get(PAGE)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")

    signed_out = client.post("/dashboard/logout")
    assert signed_out.status_code == 303
    assert 'nbo_session=""' in signed_out.headers["set-cookie"]
    assert client.get(PAGE).status_code == 303


def test_sign_in_refuses_bad_keys_and_foreign_redirects(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    bad = client.post("/dashboard/login", data={"key": "nbo_abcdefgh_" + "y" * 43})
    assert bad.status_code == 401 and "not accepted" in bad.text
    assert "set-cookie" not in bad.headers
    teller = new_key(engine, list(auth.ROLES["teller"]))
    lacking = client.post("/dashboard/login", data={"key": teller})
    assert lacking.status_code == 403 and "reports" in lacking.text
    assert "set-cookie" not in lacking.headers
    assert client.post("/dashboard/login", content=b"{}").status_code == 400

    for target in ("https://evil.example/", "//evil.example/dashboard/", "/v1/models", ""):
        response = client.post("/dashboard/login", data={"key": reports_key, "next": target})
        assert response.headers["location"] == "/dashboard/", target


def test_a_key_without_the_reports_scope_gets_a_403_page(
    client: TestClient, engine: Engine
) -> None:
    teller = new_key(engine, list(auth.ROLES["teller"]))
    for headers in ({"Authorization": f"Bearer {teller}"}, {"X-API-Key": teller}):
        response = client.get(PAGE, headers=headers)
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("text/html")
        assert "<title>Not allowed" in response.text
    # A key in the cookie opens nothing: the cookie holds a session id.
    client.cookies.set("nbo_session", teller, path="/dashboard")
    assert client.get(PAGE).status_code == 303


def test_security_headers_forbid_anything_external(client: TestClient, reports_key: str) -> None:
    signed_in = {"X-API-Key": reports_key}
    for response in (
        client.get(PAGE, headers=signed_in),
        client.get("/dashboard/", headers=signed_in),
        client.get("/dashboard/login"),
        client.get(PAGE),
    ):
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "form-action 'self'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    page = client.get(PAGE, headers=signed_in).text
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page


def test_branch_page_shows_the_days_numbers(client: TestClient, reports_key: str) -> None:
    response = client.get(PAGE, headers={"Authorization": f"Bearer {reports_key}"})
    assert response.status_code == 200
    parsed = elements(response.text)
    for ident, (shown, value) in EXPECTED.items():
        text, raw = number(parsed, ident)
        assert text == shown, ident
        assert float(raw) == pytest.approx(value), ident
    assert "<title>Branch B1 · 2024-05-14 · nbo</title>" in response.text
    assert parsed.by_id["day"][0]["data-value"] == DAY.isoformat()
    for staff, figures in EXPECTED_STAFF.items():
        assert parsed.rows[("data-staff", staff)] == figures, staff
    assert ("data-staff", "S3") not in parsed.rows
    for code, (
        offers,
        presented,
        accepted,
        declined,
        not_now,
        conversion,
    ) in EXPECTED_PRODUCTS.items():
        row = parsed.rows[("data-product", code)]
        assert (
            row["offers"],
            row["presented"],
            row["accepted"],
            row["declined"],
            row["not_now"],
            row["conversion"],
        ) == (offers, presented, accepted, declined, not_now, conversion), code
    assert 'href="/dashboard/staff/S1?day=2024-05-14"' in response.text
    assert 'href="/dashboard/branches/B1?day=2024-05-13"' in response.text
    assert 'href="/dashboard/branches/B1?day=2024-05-15"' in response.text
    assert '<svg id="chart-conversion"' in response.text
    assert '<svg id="chart-trend"' in response.text
    trend = dict(re.findall(r'data-day="([\d-]+)" data-value="(\d+)"', response.text))
    assert trend == {
        (DAY - dt.timedelta(days=n)).isoformat(): {0: "7", 1: "1"}.get(n, "0") for n in range(7)
    }


def test_staff_page_compares_with_branch_and_bank(client: TestClient, reports_key: str) -> None:
    response = client.get(
        f"/dashboard/staff/S1?day={DAY.isoformat()}", headers={"X-API-Key": reports_key}
    )
    assert response.status_code == 200
    parsed = elements(response.text)
    assert number(parsed, "staff-offers") == ("4", "4")
    assert number(parsed, "staff-conversion")[0] == "66.7%"
    assert number(parsed, "staff-nps")[0] == "+33"
    assert number(parsed, "staff-csat")[0] == "4.5"
    assert number(parsed, "branch-conversion")[0] == "50.0%"
    assert number(parsed, "bank-conversion")[0] == "44.4%"
    assert 'href="/dashboard/branches/B1?day=2024-05-14"' in response.text


def test_a_day_without_decisions_is_a_page_saying_so(client: TestClient, reports_key: str) -> None:
    headers = {"X-API-Key": reports_key}
    for path in ("/dashboard/branches/NOPE?day=2024-05-14", "/dashboard/staff/S1?day=2024-01-01"):
        response = client.get(path, headers=headers)
        assert response.status_code == 200, path
        assert 'id="no-data"' in response.text and "No decisions were recorded" in response.text
    bad = client.get("/dashboard/branches/B1?day=14/05/2024", headers=headers)
    assert bad.status_code == 400 and "14/05/2024" in bad.text


def test_values_are_html_escaped(app_settings: Settings, engine: Engine, reports_key: str) -> None:
    seed(engine, [("<b>x", "B&1", at(0, 9), [("CARD", "accepted")])])
    with TestClient(create_app(app_settings), follow_redirects=False) as client:
        headers = {"X-API-Key": reports_key}
        branch = client.get("/dashboard/branches/B%261?day=2024-05-14", headers=headers)
        staff = client.get("/dashboard/staff/%3Cb%3Ex?day=2024-05-14", headers=headers)
        evil = client.get('/dashboard/branches/"><i>?day=2024-05-14', headers=headers)
    assert branch.status_code == staff.status_code == evil.status_code == 200
    assert "&lt;b&gt;x" in branch.text and "<b>x" not in branch.text
    assert 'href="/dashboard/staff/%3Cb%3Ex?day=2024-05-14"' in branch.text
    assert "B&amp;1" in branch.text and "B&1" not in branch.text
    assert "&lt;b&gt;x" in staff.text and "<b>x" not in staff.text
    assert "&quot;&gt;&lt;i&gt;" in evil.text and '"><i>' not in evil.text


def test_index_form_leads_to_the_page(client: TestClient, reports_key: str) -> None:
    headers = {"X-API-Key": reports_key}
    form = client.get("/dashboard/", headers=headers)
    assert form.status_code == 200 and 'name="branch"' in form.text and 'name="staff"' in form.text
    response = client.get("/dashboard/?branch=B1&day=2024-05-14", headers=headers)
    assert response.status_code == 303 and response.headers["location"] == PAGE
    response = client.get("/dashboard/?staff=a/b&day=2024-05-14", headers=headers)
    assert response.headers["location"] == "/dashboard/staff/a%2Fb?day=2024-05-14"


# ---------------------------------------------------------------- browser test


class Browser:
    """One page of a headless chromium, driven over the DevTools protocol."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        ident = self._next_id
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(deadline - time.monotonic(), 0)))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy in a fully loaded document."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Between two documents there is no context to evaluate in: try again.
            with contextlib.suppress(RuntimeError):
                value = self.evaluate(f"document.readyState === 'complete' && ({expression})")
                if value:
                    return value
            time.sleep(0.05)
        raise TimeoutError(expression)


@contextlib.contextmanager
def chromium(executable: str, profile: Path, timeout: float = 15.0) -> Iterator[Browser]:
    """Start a headless chromium, attach to its page, and kill it afterwards."""
    process = subprocess.Popen(
        [
            executable,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        # Read stderr all along, so chromium never blocks on a full pipe.
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        port, seen = None, []
        while port is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                raise RuntimeError(f"chromium did not start: {''.join(seen)[-2000:]}")
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=min(remaining, 0.5)))
                found = re.search(r"DevTools listening on ws://[\d.]+:(\d+)/", seen[-1])
                port = int(found[1]) if found else None
        # No proxy: the endpoint is local, whatever the environment says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        with connect(
            page["webSocketDebuggerUrl"], proxy=None, max_size=None, open_timeout=5
        ) as socket:
            yield Browser(socket)
    finally:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """Run nbo with uvicorn on a free local port in a thread; yield its base URL."""
    with uvicorn_thread(create_app(settings), lifespan="on") as (host, port):
        yield f"http://{host}:{port}"


def artifacts_dir() -> Path:
    configured = os.environ.get("NBO_TEST_ARTIFACTS")
    folder = Path(configured) if configured else REPO / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium_or_skip() -> str:
    executable = shutil.which("chromium")
    if executable is None:
        message = "chromium is not installed (scripts/test-services installs it: apt-get install chromium)"
        if ON_CI:
            pytest.fail(f"{message}; it is required on CI")
        pytest.skip(message)
    return executable


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_branch_page_in_a_real_browser(
    app_settings: Settings, engine: Engine, reports_key: str, tmp_path: Path
) -> None:
    executable = chromium_or_skip()
    seed(engine, DECISIONS)
    with serve(app_settings) as base, chromium(executable, tmp_path / "chromium") as browser:
        browser.call("Page.enable")
        browser.call("Log.enable")
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        # Sign in the way a person does: the page sends us to the form, the form back.
        browser.call("Page.navigate", url=base + PAGE)
        browser.wait_for("location.pathname === '/dashboard/login'")
        browser.evaluate(
            f"document.getElementById('key').value = {json.dumps(reports_key)};"
            "document.querySelector('form.login').submit(); true"
        )
        browser.wait_for("location.pathname === '/dashboard/branches/B1'")
        assert browser.evaluate("document.title") == "Branch B1 · 2024-05-14 · nbo"
        assert browser.evaluate("document.cookie") == ""  # HttpOnly: no script sees it

        shown = browser.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('[id][data-value]'))"
            ".map(e => [e.id, [e.textContent.trim(), e.dataset.value]]))"
        )
        for ident, (text, value) in EXPECTED.items():
            assert shown[ident][0] == text, ident
            assert float(shown[ident][1]) == pytest.approx(value), ident
        staff = browser.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('tr[data-staff]'))"
            ".filter(r => r.dataset.staff).map(r => [r.dataset.staff, Object.fromEntries("
            "Array.from(r.querySelectorAll('td')).map(c => [c.dataset.metric,"
            " c.textContent.trim()]))]))"
        )
        assert staff == EXPECTED_STAFF

        # The product table fits its card at 1280 px and names the products (codes beneath).
        fit = browser.evaluate(
            "(() => { const t = document.getElementById('product-table');"
            " return [t.scrollWidth, t.parentElement.clientWidth,"
            " document.documentElement.scrollWidth, window.innerWidth]; })()"
        )
        assert fit[0] <= fit[1] and fit[2] <= fit[3], fit
        shown_products = browser.evaluate(
            "Array.from(document.querySelectorAll('#product-table tbody tr')).map(r =>"
            " [r.dataset.product, r.querySelector('th .product-name').textContent.trim(),"
            " r.querySelector('th .product-code').textContent.trim(),"
            " r.querySelector('th').title])"
        )
        assert sorted(shown_products) == sorted(
            [code, PRODUCTS[code], code, code] for code in EXPECTED_PRODUCTS
        )

        for chart in ("chart-conversion", "chart-trend"):
            box = browser.evaluate(
                f"(() => {{ const r = document.getElementById('{chart}')"
                ".getBoundingClientRect(); return [r.width, r.height]; })()"
            )
            assert box[0] > 200 and box[1] > 50, (chart, box)
        bars = browser.evaluate(
            "Array.from(document.querySelectorAll('#chart-conversion rect')).map(r =>"
            " [r.dataset.kind, Number(r.dataset.value), r.getBoundingClientRect().width])"
        )
        assert sorted(kind for kind, _, _ in bars) == ["bank", "branch", "staff", "staff"]
        # Drawn to scale: every bar's width is the same multiple of its conversion.
        per_unit = [width / value for _, value, width in bars]
        assert min(per_unit) > 0 and max(per_unit) == pytest.approx(min(per_unit), rel=0.02)

        offers_bars = browser.evaluate(
            "Array.from(document.querySelectorAll('#chart-trend rect.offers-bar'))"
            ".map(r => Math.round(r.getBoundingClientRect().height))"
        )
        assert len(offers_bars) == 7 and offers_bars[-1] > offers_bars[-2] > 0 == offers_bars[0]

        height = browser.evaluate("document.documentElement.scrollHeight")
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = browser.call("Page.captureScreenshot", format="png")
        path = artifacts_dir() / "dashboard-branch.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 10_000

        # A resource the Content-Security-Policy blocked, or any other page error, shows here.
        errors = [
            e["params"]["entry"]
            for e in browser.events
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        assert errors == []
