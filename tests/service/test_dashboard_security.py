"""Dashboard sessions, cookie flags behind a proxy, Origin checks, and bounded NPS labels.

Issue 13, finding 7: the dashboard cookie held the raw API key (an admin key worked),
was never ``Secure`` behind a TLS proxy (``nbo serve`` turned proxy headers off), its
sign-in and sign-out accepted cross-site posts, and the NPS gauge was labelled by any
branch id a caller sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from service import auth, metrics
from service.app import _publish_figures, create_app
from service.cli.main import app as cli_app
from service.cli.main import uvicorn_options
from service.data.db import unit_of_work
from service.data.tables import Customer, DashboardSession, Feedback
from service.reports import measures as reports
from service.settings import Settings
from tests.uvicorn_thread import uvicorn_thread

SITE = "http://testserver"
PAGE = "/dashboard/?day=2024-05-14"


def new_key(engine: Engine, scopes: list[str]) -> str:
    with unit_of_work(engine) as session:
        return auth.create_key(session, name="dashboard-security", scopes=scopes)


def prefix_of(key: str) -> str:
    return key.split("_")[1]


def sessions(engine: Engine) -> list[DashboardSession]:
    with unit_of_work(engine) as session:
        return list(session.scalars(select(DashboardSession)))


@pytest.fixture
def app_settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path, dashboard_session_hours=2)


@pytest.fixture
def client(app_settings: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings), follow_redirects=False) as client:
        yield client


@pytest.fixture
def reports_key(engine: Engine) -> str:
    return new_key(engine, ["reports"])


def sign_in(client: TestClient, key: str, **headers: str) -> httpx.Response:
    return client.post(
        "/dashboard/login",
        data={"key": key, "next": PAGE},
        headers={"Origin": SITE, **headers},
    )


def session_cookie(response: httpx.Response) -> tuple[str, str]:
    """The session id the response set, and the whole Set-Cookie header."""
    header = response.headers["set-cookie"]
    assert header.startswith("nbo_session="), header
    return header.split(";", 1)[0].removeprefix("nbo_session="), header


# ------------------------------------------------------------------ sessions


def test_the_cookie_holds_a_session_id_and_the_database_only_its_hash(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    response = sign_in(client, reports_key)
    assert response.status_code == 303 and response.headers["location"] == PAGE
    token, header = session_cookie(response)
    key_hash = hashlib.sha256(reports_key.encode()).hexdigest()
    secret = reports_key.split("_", 2)[2]  # the secret itself may hold "_"
    for material in (reports_key, key_hash, secret, prefix_of(reports_key)):
        assert material not in header
    assert len(token) == 43
    # Max-Age is the configured session lifetime (2 hours here), the cookie as tight as can be.
    assert "Max-Age=7200" in header and "HttpOnly" in header
    assert "SameSite=strict" in header and "Path=/dashboard" in header
    assert "Secure" not in header  # plain http

    (row,) = sessions(engine)
    assert row.id_hash == hashlib.sha256(token.encode()).hexdigest()
    stored = " ".join(str(value) for value in vars(row).values())
    assert token not in stored and reports_key not in stored
    expires = row.expires_at.replace(tzinfo=row.expires_at.tzinfo or dt.UTC)
    assert expires - dt.datetime.now(dt.UTC) == pytest.approx(
        dt.timedelta(hours=2), abs=dt.timedelta(minutes=1)
    )

    assert client.get(PAGE).status_code == 200  # the client sends the cookie back


def test_an_expired_session_is_refused(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    sign_in(client, reports_key)
    assert client.get(PAGE).status_code == 200
    with unit_of_work(engine) as session:
        session.execute(
            update(DashboardSession).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
    refused = client.get(PAGE)
    assert refused.status_code == 303
    assert refused.headers["location"].startswith("/dashboard/login?next=")
    assert 'nbo_session=""' in refused.headers["set-cookie"]
    # The next sign-in clears expired sessions away.
    sign_in(client, reports_key)
    assert len(sessions(engine)) == 1


def test_revoking_the_key_ends_its_sessions_at_once(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    sign_in(client, reports_key)
    assert client.get(PAGE).status_code == 200
    with unit_of_work(engine) as session:
        auth.revoke_key(session, prefix=prefix_of(reports_key))
    # No waiting for the key cache: the session is read with its key each time.
    assert client.get(PAGE).status_code == 303


def test_signing_out_deletes_the_session(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    token, _ = session_cookie(sign_in(client, reports_key))
    signed_out = client.post("/dashboard/logout", headers={"Origin": SITE})
    assert signed_out.status_code == 303
    assert 'nbo_session=""' in signed_out.headers["set-cookie"]
    assert sessions(engine) == []
    # A copy of the cookie taken before signing out opens nothing.
    client.cookies.set("nbo_session", token, path="/dashboard")
    assert client.get(PAGE).status_code == 303


def test_admin_keys_cannot_open_a_dashboard_session(client: TestClient, engine: Engine) -> None:
    admin = new_key(engine, ["admin"])
    refused = sign_in(client, admin)
    assert refused.status_code == 403 and "admin" in refused.text
    assert "set-cookie" not in refused.headers
    assert sessions(engine) == []
    both = new_key(engine, ["admin", "reports"])
    assert sign_in(client, both).status_code == 403
    # Sent as a header, by a script rather than typed into a browser, it reads as on /v1.
    assert client.get(PAGE, headers={"X-API-Key": admin}).status_code == 200


def test_a_key_left_in_an_old_cookie_is_neither_used_nor_kept(
    client: TestClient, reports_key: str
) -> None:
    client.cookies.set("nbo_key", reports_key, path="/dashboard")
    response = client.get(PAGE)
    assert response.status_code == 303
    assert 'nbo_key=""' in response.headers["set-cookie"]
    client.cookies.set("nbo_session", reports_key, path="/dashboard")
    assert client.get(PAGE).status_code == 303


def test_at_most_a_bounded_number_of_sessions_per_key(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    from service.reports.sessions import MAX_SESSIONS_PER_KEY

    for _ in range(MAX_SESSIONS_PER_KEY + 3):
        assert sign_in(client, reports_key).status_code == 303
    assert len(sessions(engine)) == MAX_SESSIONS_PER_KEY
    assert client.get(PAGE).status_code == 200  # the newest one is kept


# --------------------------------------------------------------------- CSRF


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "http://testserver:8080"},
        {"Origin": "https://testserver"},
        {"Referer": "https://evil.example/dashboard/login"},
        {},
    ],
    ids=["foreign", "null", "suffix", "port", "scheme", "foreign-referer", "none"],
)
def test_cross_site_posts_are_refused(
    client: TestClient, engine: Engine, reports_key: str, headers: dict[str, str]
) -> None:
    login = client.post("/dashboard/login", data={"key": reports_key}, headers=headers)
    assert login.status_code == 403
    assert login.headers["content-type"] == "application/problem+json"
    assert login.json()["type"].endswith("/cross-site")
    assert "set-cookie" not in login.headers
    assert sessions(engine) == []

    sign_in(client, reports_key)
    logout = client.post("/dashboard/logout", headers=headers)
    assert logout.status_code == 403
    assert len(sessions(engine)) == 1
    assert client.get(PAGE).status_code == 200  # still signed in


def test_same_origin_posts_work_with_origin_or_referer(
    client: TestClient, engine: Engine, reports_key: str
) -> None:
    assert sign_in(client, reports_key, Origin="HTTP://TestServer:80").status_code == 303
    referer = {"Referer": f"{SITE}/dashboard/login?next=%2Fdashboard%2F"}
    response = client.post("/dashboard/login", data={"key": reports_key}, headers=referer)
    assert response.status_code == 303
    assert client.post("/dashboard/logout", headers=referer).status_code == 303


def test_pages_let_a_browser_send_its_origin_with_their_forms(client: TestClient) -> None:
    # Under "no-referrer" a browser posts "Origin: null" (Fetch standard), which the
    # Origin check must refuse: the pages say "same-origin" instead.
    assert client.get("/dashboard/login").headers["referrer-policy"] == "same-origin"


# -------------------------------------------------------------- proxy headers


def test_serve_trusts_proxy_headers_only_from_configured_addresses() -> None:
    plain = uvicorn_options(Settings(), host="0.0.0.0", port=8000, workers=2)
    assert plain["proxy_headers"] is False and "forwarded_allow_ips" not in plain
    assert (plain["host"], plain["port"], plain["workers"]) == ("0.0.0.0", 8000, 2)
    proxied = uvicorn_options(
        Settings(forwarded_allow_ips="10.0.0.5, 192.168.0.0/16"), host="h", port=1, workers=1
    )
    assert proxied["proxy_headers"] is True
    assert proxied["forwarded_allow_ips"] == ["10.0.0.5", "192.168.0.0/16"]


@pytest.mark.parametrize("value", ["nginx", "10.0.0.1/8", "*,10.0.0.1"])
def test_unusable_proxy_addresses_are_refused_at_start(value: str) -> None:
    with pytest.raises(ValueError, match="forwarded_allow_ips"):
        Settings(forwarded_allow_ips=value)


def test_nbo_serve_passes_the_proxy_options_to_uvicorn(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    monkeypatch.setenv("NBO_DATABASE_URL", database_url)
    monkeypatch.setenv("NBO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NBO_WORKERS", "1")  # serve exports it; restored afterwards
    monkeypatch.setenv("NBO_FORWARDED_ALLOW_IPS", "127.0.0.1")
    result = CliRunner().invoke(cli_app, ["serve", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert seen["proxy_headers"] is True and seen["forwarded_allow_ips"] == ["127.0.0.1"]
    assert seen["port"] == 8123 and seen["factory"] is True


def _served_sign_in(settings: Settings, key: str, *, origin_scheme: str) -> httpx.Response:
    """Sign in through a real uvicorn configured as ``nbo serve`` configures it, posted
    as a TLS proxy on 127.0.0.1 forwards a browser's post (X-Forwarded-Proto: https),
    from a page whose origin has ``origin_scheme``."""
    options = uvicorn_options(settings, host="127.0.0.1", port=0, workers=1)
    for served_elsewhere in ("host", "port", "workers"):
        del options[served_elsewhere]
    with uvicorn_thread(create_app(settings), **options) as (host, port):
        return httpx.post(
            f"http://{host}:{port}/dashboard/login",
            data={"key": key},
            headers={"Origin": f"{origin_scheme}://{host}:{port}", "X-Forwarded-Proto": "https"},
        )


def test_the_cookie_is_secure_over_https_from_a_trusted_proxy(
    app_settings: Settings, reports_key: str
) -> None:
    trusted = app_settings.model_copy(update={"forwarded_allow_ips": ["127.0.0.1"]})
    response = _served_sign_in(trusted, reports_key, origin_scheme="https")
    assert response.status_code == 303
    assert "Secure" in session_cookie(response)[1]


@pytest.mark.parametrize("allowed", [[], ["10.1.2.3"]], ids=["default", "other-proxy"])
def test_forwarded_https_from_an_untrusted_client_is_ignored(
    app_settings: Settings, reports_key: str, allowed: list[str]
) -> None:
    untrusted = app_settings.model_copy(update={"forwarded_allow_ips": allowed})
    # The header is ignored: the request is plain http, so an https Origin is foreign...
    assert _served_sign_in(untrusted, reports_key, origin_scheme="https").status_code == 403
    # ...and an http one signs in, without Secure (the connection was not https).
    response = _served_sign_in(untrusted, reports_key, origin_scheme="http")
    assert response.status_code == 303
    assert "Secure" not in session_cookie(response)[1]


# ------------------------------------------------------------ bounded labels

TODAY = dt.date(2026, 12, 1)


def seed_feedback(
    engine: Engine, branches: dict[str, list[int]], customers: dict[str, int]
) -> None:
    """NPS answers (scores) by branch, given today, and customers per branch."""
    when = dt.datetime.combine(TODAY, dt.time(12), tzinfo=dt.UTC)
    with unit_of_work(engine) as session:
        session.add_all(
            Customer(external_id=f"{branch}-{i}", branch_id=branch)
            for branch, count in customers.items()
            for i in range(count)
        )
        session.add_all(
            Feedback(kind="nps", score=score, branch_id=branch or None, created_at=when)
            for branch, scores in branches.items()
            for score in scores
        )


def published_branches() -> dict[str, float]:
    (family,) = metrics.NPS.collect()
    return {sample.labels["branch"]: sample.value for sample in family.samples}


@pytest.fixture
def clean_nps_gauge() -> Iterator[None]:
    metrics.NPS.clear()
    metrics._nps_branches.clear()
    yield
    metrics.NPS.clear()
    metrics._nps_branches.clear()


def test_nps_of_a_thousand_made_up_branches_is_pooled_under_other(
    engine: Engine, clean_nps_gauge: None
) -> None:
    made_up = {f"X{i:04d}": [10] for i in range(1000)}
    seed_feedback(
        engine,
        {"B1": [10, 0], "B2": [9], "B3": [0], "": [10], **made_up},
        customers={"B1": 3, "B2": 2, "B3": 1},
    )
    limit = 2
    conversion, nps = reports.rolling_figures(engine, TODAY, branch_limit=limit)
    metrics.set_business_figures(conversion, nps)
    shown = published_branches()
    # The two branches with most customers, the answers without a branch, and "other".
    assert len(shown) <= limit + 2
    assert shown == {
        "B1": 0.0,
        "B2": 100.0,
        "(none)": 100.0,
        # B3's detractor and 1,000 promoters, pooled as answers (not as an average of scores).
        "other": pytest.approx(100.0 * 999 / 1001),
    }


def test_configured_known_branches_label_the_gauge(
    engine: Engine, tmp_path: Path, clean_nps_gauge: None
) -> None:
    seed_feedback(
        engine,
        {"B1": [10], "B3": [0], **{f"X{i}": [5] for i in range(300)}},
        customers={"B1": 5},
    )
    settings = Settings(data_dir=tmp_path, known_branches="B3, B9")
    state = types.SimpleNamespace(
        clock=lambda: dt.datetime.combine(TODAY, dt.time(13), tzinfo=dt.UTC),
        engine=engine,
        settings=settings,
        snapshot=None,
    )
    asyncio.run(_publish_figures(state))  # type: ignore[arg-type]
    assert published_branches() == {
        "B3": -100.0,
        # B1 (not configured, whatever its customers) with the 300 made-up branches.
        "other": pytest.approx(100.0 * (1 - 300) / 301),
    }

    # A branch gone from the window drops out of the gauge (single process).
    metrics.set_business_figures({}, {"other": 1.0})
    assert published_branches() == {"other": 1.0}


def test_known_branches_are_split_on_commas() -> None:
    assert Settings(known_branches=" B1 ,B2,, ").known_branches == ["B1", "B2"]
