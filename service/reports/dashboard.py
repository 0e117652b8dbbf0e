"""/dashboard/...: server-rendered pages of a day's results for branches and staff.

Each morning a branch manager or a member of staff opens their page and sees
yesterday's offers, acceptances, conversion, NPS and CSAT beside their
branch's and the bank's. The pages are plain HTML built here with the standard
library: every value passes through :func:`html.escape`, styles and charts
(SVG) are inline, and a Content-Security-Policy lets nothing else load, no
script, font or image from anywhere.

A browser cannot send an ``Authorization`` header, so ``POST /dashboard/login``
takes an API key holding the ``reports`` scope and opens a server-side session
(:mod:`service.reports.sessions`): the cookie holds a random session id, never
the key. The pages accept that cookie or the usual headers. A session ends
after ``dashboard_session_hours``, on signing out, or at once when its key is
revoked. Admin keys are refused at sign-in: they would pass every scope check,
and the most powerful key has no business being typed into a browser.

The cookie is HttpOnly, SameSite=Strict (the pages are only ever reached from
nbo's own; a link from a mail or chat asks to sign in again, which is the price
of sending nothing on any cross-site request), limited to ``/dashboard`` and
``Secure`` whenever the request came over HTTPS. Behind a TLS-terminating proxy
nbo sees HTTPS only through the proxy's headers, which ``nbo serve`` trusts
from the addresses in ``forwarded_allow_ips`` alone. Every POST must come from
a page of this site: its ``Origin`` (or, without one, its ``Referer``) must be
the request's own scheme, host and port, else it is refused with a 403.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import logging
import math
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Engine, select

from service.api.deps import EngineDep, KeysDep, SettingsDep
from service.auth import ADMIN_SCOPE, Forbidden, KeyStore, Principal, Unauthorized
from service.data.db import read_only, unit_of_work
from service.data.tables import Product
from service.errors import problem_response
from service.reports import measures as reports
from service.reports.measures import BranchDaily, ConversionRow, DayFigures, StaffDaily
from service.reports.sessions import close_session, find_session, open_session

log = logging.getLogger("nbo.dashboard")

router = APIRouter(prefix="/dashboard", include_in_schema=False)

COOKIE = "nbo_session"
"""The cookie holding the session id of a signed-in browser."""
LEGACY_COOKIE = "nbo_key"
"""Where earlier versions kept the API key itself: deleted from any browser still sending it."""
SCOPE = "reports"

SECURITY_HEADERS: dict[str, str] = {
    # Nothing but the page itself and its inline styles: no script runs, nothing
    # is fetched from anywhere, forms post only back to nbo.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": under it a browser sends "Origin: null" with the page's own
    # form posts, and the Origin check could not tell them from a cross-site post.
    # "same-origin" still sends nothing to any other site.
    "Referrer-Policy": "same-origin",
    # The pages show the bank's results: no shared or browser cache keeps them.
    "Cache-Control": "no-store",
}

_MAX_FORM_BYTES = 4096
_NONE = "—"


# ---------------------------------------------------------------------- routes


@router.get("/", name="dashboard_index")
def index(
    request: Request,
    keys: KeysDep,
    engine: EngineDep,
    branch: str = "",
    staff: str = "",
    day: str | None = None,
) -> Response:
    """The picker; submitted (``?branch=`` or ``?staff=``), a redirect to that page."""
    denied = _authorize(request, keys, engine)
    if denied is not None:
        return denied
    links = _Links.of(request)
    when = _parse_day(day)
    if when is None:
        return _bad_day(links, day)
    if branch.strip():
        return _redirect(links.branch(branch.strip(), when))
    if staff.strip():
        return _redirect(links.staff(staff.strip(), when))
    return _page(_render_index(links, when))


@router.get("/branches/{branch_id:path}", name="dashboard_branch")
def branch_page(
    request: Request, keys: KeysDep, engine: EngineDep, branch_id: str, day: str | None = None
) -> Response:
    """A branch's day: its figures beside the bank's, its staff, products and week."""
    denied = _authorize(request, keys, engine)
    if denied is not None:
        return denied
    links = _Links.of(request)
    when = _parse_day(day)
    if when is None:
        return _bad_day(links, day)
    report = reports.branch_daily(engine, branch_id, when)
    names = _product_names(engine)
    return _page(_render_branch(report, links, today=_today(), names=names))


@router.get("/staff/{staff_id:path}", name="dashboard_staff")
def staff_page(
    request: Request, keys: KeysDep, engine: EngineDep, staff_id: str, day: str | None = None
) -> Response:
    """A staff member's day beside their branch's and the bank's."""
    denied = _authorize(request, keys, engine)
    if denied is not None:
        return denied
    links = _Links.of(request)
    when = _parse_day(day)
    if when is None:
        return _bad_day(links, day)
    report = reports.staff_daily(engine, staff_id, when)
    names = _product_names(engine)
    return _page(_render_staff(report, links, today=_today(), names=names))


@router.get("/login", name="dashboard_login_form")
def login_form(request: Request, next_path: Annotated[str, Query(alias="next")] = "") -> Response:
    """The sign-in form: one field, an API key with the ``reports`` scope."""
    links = _Links.of(request)
    return _page(_render_login(links, next_path=_safe_next(links, next_path)))


@router.post("/login", name="dashboard_login")
async def login(
    request: Request, keys: KeysDep, engine: EngineDep, settings: SettingsDep
) -> Response:
    """Check the posted ``key``; if it holds ``reports``, open a session and go on."""
    links = _Links.of(request)
    if not _same_origin(request):
        return _cross_site(request)
    form = await _read_form(request)
    if form is None:
        return _page(
            _render_login(links, next_path=links.home, error="The form could not be read."),
            status=400,
        )
    key = form.get("key", "").strip()
    next_path = _safe_next(links, form.get("next", ""))
    try:
        # A cache miss reads the database: not on the event loop.
        principal = await asyncio.to_thread(keys.authenticate, None, key, SCOPE)
    except Unauthorized:
        error = "Enter an API key." if not key else "That key was not accepted."
        return _page(_render_login(links, next_path=next_path, error=error), status=401)
    except Forbidden:
        error = f"That key is valid but lacks the {SCOPE!r} scope the dashboard needs."
        return _page(_render_login(links, next_path=next_path, error=error), status=403)
    if not _may_sign_in(principal.scopes):
        error = (
            f"That is an {ADMIN_SCOPE!r} key: sign in with a key holding {SCOPE!r} "
            "instead, so that the key typed into a browser can do no more than read reports."
        )
        return _page(_render_login(links, next_path=next_path, error=error), status=403)
    lifetime = dt.timedelta(hours=settings.dashboard_session_hours)
    token = await asyncio.to_thread(_open, engine, principal, lifetime)
    if token is None:  # revoked since the key cache last read it
        error = "That key was not accepted."
        return _page(_render_login(links, next_path=next_path, error=error), status=401)
    log.info("dashboard session opened", extra={"prefix": principal.prefix})
    response = _redirect(next_path)
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(lifetime.total_seconds()),
        path=_cookie_path(links),
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    _forget_legacy_cookie(request, response, links)
    return response


@router.post("/logout", name="dashboard_logout")
def logout(request: Request, engine: EngineDep) -> Response:
    """Close the session, forget its cookie and show the sign-in form."""
    if not _same_origin(request):
        return _cross_site(request)
    links = _Links.of(request)
    token = request.cookies.get(COOKIE)
    if token is not None:
        with unit_of_work(engine) as session:
            close_session(session, token=token)
    response = _redirect(links.login())
    _forget_cookie(response, links)
    _forget_legacy_cookie(request, response, links)
    return response


# ------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class _Links:
    """The dashboard's URLs as paths under the application's root path."""

    home: str

    @classmethod
    def of(cls, request: Request) -> _Links:
        return cls(home=f"{request.scope.get('root_path', '')}{router.prefix}/")

    def branch(self, branch_id: str, day: dt.date) -> str:
        return f"{self.home}branches/{_quote(branch_id)}?day={day.isoformat()}"

    def staff(self, staff_id: str, day: dt.date) -> str:
        return f"{self.home}staff/{_quote(staff_id)}?day={day.isoformat()}"

    def login(self, next_path: str = "") -> str:
        if not next_path:
            return f"{self.home}login"
        return f"{self.home}login?{urllib.parse.urlencode({'next': next_path})}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _parse_day(value: str | None) -> dt.date | None:
    """The requested day (default yesterday, UTC), or None when it is not YYYY-MM-DD."""
    if value is None or not value.strip():
        return _today() - dt.timedelta(days=1)
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        return None


def _authorize(request: Request, keys: KeyStore, engine: Engine) -> Response | None:
    """None when the request carries a key with ``reports`` or an open session; otherwise
    the answer to send.

    A key in ``Authorization``/``X-API-Key``, when either is sent, is checked as on
    every ``/v1`` route; else the session cookie is looked up. Neither valid: a 303
    to the sign-in form. A key without the scope: a 403 page.
    """
    links = _Links.of(request)
    authorization = request.headers.get("authorization")
    api_key = request.headers.get("x-api-key")
    if authorization is None and api_key is None:
        return _authorize_session(request, links, engine)
    try:
        keys.authenticate(authorization, api_key, SCOPE)
    except Unauthorized:
        return _to_sign_in(request, links)
    except Forbidden:
        return _not_allowed(links)
    return None


def _authorize_session(request: Request, links: _Links, engine: Engine) -> Response | None:
    token = request.cookies.get(COOKIE)
    if token is None:
        return _to_sign_in(request, links)
    with unit_of_work(read_only(engine)) as session:
        signed_in = find_session(session, token=token)
    if signed_in is None:  # expired, signed out, or its key revoked
        response = _to_sign_in(request, links)
        _forget_cookie(response, links)
        return response
    if SCOPE not in signed_in.scopes or not _may_sign_in(signed_in.scopes):
        return _not_allowed(links)
    return None


def _may_sign_in(scopes: frozenset[str]) -> bool:
    """Whether a key with ``scopes`` may open a dashboard session: it must hold
    ``reports`` itself, and not ``admin``, which holds it only by implication."""
    return SCOPE in scopes and ADMIN_SCOPE not in scopes


def _open(engine: Engine, principal: Principal, lifetime: dt.timedelta) -> str | None:
    with unit_of_work(engine) as session:
        return open_session(session, key_prefix=principal.prefix, lifetime=lifetime)


def _to_sign_in(request: Request, links: _Links) -> Response:
    """A 303 to the sign-in form, which comes back here once signed in."""
    target = request.url.path
    if request.url.query:
        target += f"?{request.url.query}"
    response = _redirect(links.login(_safe_next(links, target)))
    _forget_legacy_cookie(request, response, links)
    return response


def _not_allowed(links: _Links) -> Response:
    body = (
        "<h1>Not allowed</h1>"
        f'<p class="notice">This API key does not hold the <code>{SCOPE}</code> scope the '
        "dashboard needs. Ask an administrator for a key with it.</p>"
        f'<p><a href="{_esc(links.login())}">Sign in with another key</a></p>'
    )
    return _page(_shell(links, body, title="Not allowed"), status=403)


def _origin(url: str) -> tuple[str, str, int] | None:
    """``url``'s origin as (scheme, host, port), or None when it has none (``null``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _same_origin(request: Request) -> bool:
    """Whether a POST came from a page of this very site (scheme, host and port).

    Browsers send ``Origin`` with every POST; ``Referer`` stands in when it is
    missing. Neither (a script, or a very old browser) counts as foreign: the
    form is only ever posted by a browser. Behind a proxy the request's own
    origin is what the proxy passes on: the Host header, and https when
    ``forwarded_allow_ips`` trusts its X-Forwarded-Proto.
    """
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if claimed is None:
        return False
    own = _origin(str(request.url))
    return own is not None and _origin(claimed) == own


def _cross_site(request: Request) -> Response:
    log.warning("dashboard cross-site post refused", extra={"path": request.url.path})
    return problem_response(
        403,
        "Forbidden",
        "This form must be posted from nbo's own dashboard pages (Origin check).",
        "cross-site",
        instance=request.url.path,
    )


def _safe_next(links: _Links, target: str) -> str:
    """``target`` if it is a dashboard path on this site, else the dashboard's home.

    Only local paths are followed after sign-in, so the form cannot send anyone elsewhere.
    """
    parsed = urllib.parse.urlsplit(target)
    if (
        parsed.scheme
        or parsed.netloc
        or not target.startswith(links.home)
        or "\\" in target
        or target.startswith("//")
    ):
        return links.home
    return target


async def _read_form(request: Request) -> dict[str, str] | None:
    """The urlencoded form in the body (first value of each field), or None if unreadable."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        return None
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > _MAX_FORM_BYTES:
            return None
    try:
        fields = urllib.parse.parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=10
        )
    except (UnicodeDecodeError, ValueError):
        return None
    return {name: values[0] for name, values in fields.items()}


def _redirect(location: str) -> Response:
    return RedirectResponse(location, status_code=303, headers=SECURITY_HEADERS)


def _cookie_path(links: _Links) -> str:
    return links.home.rstrip("/") or "/"


def _forget_cookie(response: Response, links: _Links, name: str = COOKIE) -> None:
    response.delete_cookie(name, path=_cookie_path(links), httponly=True, samesite="strict")


def _forget_legacy_cookie(request: Request, response: Response, links: _Links) -> None:
    """Delete an API key an earlier version left in the browser's cookie."""
    if LEGACY_COOKIE in request.cookies:
        _forget_cookie(response, links, LEGACY_COOKIE)


def _page(document: str, *, status: int = 200) -> HTMLResponse:
    return HTMLResponse(document, status_code=status, headers=SECURITY_HEADERS)


def _bad_day(links: _Links, value: str | None) -> HTMLResponse:
    body = (
        "<h1>Not a date</h1>"
        f'<p class="notice">{_esc(value or "")} is not a day: use YYYY-MM-DD, '
        "for example 2024-05-14.</p>"
        f'<p><a href="{_esc(links.home)}">Choose a branch or staff member</a></p>'
    )
    return _page(_shell(links, body, title="Not a date"), status=400)


# ----------------------------------------------------------------- formatting


def _esc(value: object) -> str:
    """``value`` as text safe in an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def fmt_count(value: int) -> str:
    """``1234`` as ``1,234``."""
    return f"{value:,}"


def fmt_percent(value: float | None) -> str:
    """A share (0 to 1) as ``42.9%``; ``—`` for none."""
    return _NONE if value is None else f"{value * 100:.1f}%"


def fmt_nps(value: float | None) -> str:
    """An NPS (-100 to 100) as ``+25``, ``-10`` or ``0``; ``—`` for none."""
    if value is None:
        return _NONE
    # Half away from zero, as people round (round() would make 12.5 into 12).
    rounded = int(math.copysign(math.floor(abs(value) + 0.5), value))
    return "0" if rounded == 0 else f"{rounded:+d}"


def fmt_csat(value: float | None) -> str:
    """A CSAT mean (1 to 5) as ``4.3``; ``—`` for none."""
    return _NONE if value is None else f"{value:.1f}"


def fmt_day(day: dt.date) -> str:
    """``Tuesday 14 May 2024``."""
    return f"{day:%A} {day.day} {day:%B %Y}"


def _raw(value: float | int | None) -> str:
    """A number as a ``data-value``: exact, machine-readable, empty for none."""
    # str, not repr: a NumPy number's repr names its type ("np.float64(0.5)").
    return "" if value is None else str(value)


def _number(element: str, ident: str, value: float | int | None, shown: str, cls: str = "") -> str:
    class_attr = f' class="{cls}"' if cls else ""
    return (
        f'<{element} id="{_esc(ident)}"{class_attr} data-value="{_raw(value)}">'
        f"{_esc(shown)}</{element}>"
    )


def _delta(value: float | None, other: float | None, *, scale: float, digits: int) -> str:
    """``▲ 4.9 pts vs bank``: how far ``value`` is above or below the bank's ``other``."""
    if value is None or other is None:
        return ""
    difference = round((value - other) * scale, digits)
    if difference == 0:
        return '<p class="delta same">level with the bank</p>'
    direction, cls = ("▲", "up") if difference > 0 else ("▼", "down")
    return f'<p class="delta {cls}">{direction} {abs(difference):.{digits}f} pts vs bank</p>'


# ------------------------------------------------------------------- rendering


def _render_index(links: _Links, day: dt.date) -> str:
    """The picker page: a branch or a staff id, and a day."""
    picker = (
        '<section class="pickers">'
        + _picker(links, "branch", "Branch", "e.g. B012", day)
        + _picker(links, "staff", "Staff member", "e.g. S0457", day)
        + "</section>"
    )
    body = (
        "<h1>Daily results</h1>"
        '<p class="lede">Offers made, accepted, conversion, NPS and CSAT for a branch or a '
        "member of staff, compared with the branch and the whole bank.</p>" + picker
    )
    return _shell(links, body, title="Daily results")


def _picker(links: _Links, field: str, label: str, example: str, day: dt.date) -> str:
    return (
        f'<form class="card picker" method="get" action="{_esc(links.home)}">'
        f"<h2>{_esc(label)}</h2>"
        f'<label for="pick-{field}">{_esc(label)} id</label>'
        f'<input id="pick-{field}" name="{field}" required maxlength="64" '
        f'placeholder="{_esc(example)}" autocomplete="off">'
        f'<label for="pick-{field}-day">Day</label>'
        f'<input id="pick-{field}-day" name="day" type="date" value="{day.isoformat()}">'
        f'<button type="submit">Show {_esc(label.lower())}</button>'
        "</form>"
    )


def _render_login(links: _Links, *, next_path: str, error: str = "") -> str:
    """The sign-in form, with ``error`` above it when the last attempt failed."""
    message = f'<p class="notice error" role="alert">{_esc(error)}</p>' if error else ""
    body = (
        '<form class="card login" method="post" '
        f'action="{_esc(links.login())}">'
        "<h1>Sign in</h1>"
        '<p class="lede">Use an nbo API key that holds the <code>reports</code> scope.</p>'
        f"{message}"
        '<label for="key">API key</label>'
        '<input id="key" name="key" type="password" required autocomplete="off" '
        'spellcheck="false" placeholder="nbo_…">'
        f'<input type="hidden" name="next" value="{_esc(next_path)}">'
        '<button type="submit">Sign in</button>'
        "</form>"
    )
    return _shell(links, body, title="Sign in", signed_in=False)


def _render_branch(
    report: BranchDaily,
    links: _Links,
    *,
    today: dt.date,
    names: Mapping[str, str] | None = None,
) -> str:
    """A branch's page for one day."""
    day, figures, bank = report.day, report.branch, report.bank
    heading = (
        f'<p class="eyebrow">Branch</p><h1 id="page-title">{_esc(report.branch_id)}</h1>'
        f'<p class="day" id="day" data-value="{day.isoformat()}">{_esc(fmt_day(day))}</p>'
    )
    nav = _day_nav(lambda d: links.branch(report.branch_id, d), day, today)
    parts = [f'<div class="title-row"><div>{heading}</div>{nav}</div>']
    if _is_empty(figures):
        parts.append(
            f'<p class="notice" id="no-data">No decisions were recorded for branch '
            f"{_esc(report.branch_id)} on {_esc(fmt_day(day))}.</p>"
        )
    parts.append(_tiles("branch", figures, [("bank", "Bank", bank)]))
    if report.staff:
        chart_rows: list[_BarRow] = [
            (staff_id, staff.conversion, "staff", links.staff(staff_id, day))
            for staff_id, staff in report.staff
        ]
        chart_rows.append(("Branch", figures.conversion, "branch", None))
        chart_rows.append(("Bank", bank.conversion, "bank", None))
        parts.append(
            '<div class="grid-2">'
            + _section(
                "Conversion by member of staff",
                _conversion_chart(chart_rows, label="Conversion of each member of staff"),
                ident="conversion",
            )
            + _section("Last 7 days", _trend_chart(report.trend), ident="trend")
            + "</div>"
        )
        parts.append(_section("Staff", _staff_table(report, links), ident="staff"))
    elif any(f.offers for _, f in report.trend):
        trend = _section("Last 7 days", _trend_chart(report.trend), ident="trend")
        parts.append(f'<div class="grid-2">{trend}</div>')
    if report.by_product:
        parts.append(
            _section(
                "Conversion by product",
                _product_table(report.by_product, names or {}),
                ident="products",
            )
        )
    return _shell(links, "".join(parts), title=f"Branch {report.branch_id} · {day.isoformat()}")


def _render_staff(
    report: StaffDaily,
    links: _Links,
    *,
    today: dt.date,
    names: Mapping[str, str] | None = None,
) -> str:
    """A staff member's page for one day."""
    day = report.day
    branch_line = ""
    if report.branch_id is not None:
        branch_line = (
            '<p class="context">Branch <a id="branch-link" '
            f'href="{_esc(links.branch(report.branch_id, day))}">'
            f"{_esc(report.branch_id)}</a></p>"
        )
    heading = (
        f'<p class="eyebrow">Member of staff</p><h1 id="page-title">{_esc(report.staff_id)}</h1>'
        f'<p class="day" id="day" data-value="{day.isoformat()}">{_esc(fmt_day(day))}</p>'
        f"{branch_line}"
    )
    nav = _day_nav(lambda d: links.staff(report.staff_id, d), day, today)
    parts = [f'<div class="title-row"><div>{heading}</div>{nav}</div>']
    if _is_empty(report.staff):
        parts.append(
            f'<p class="notice" id="no-data">No decisions were recorded for '
            f"{_esc(report.staff_id)} on {_esc(fmt_day(day))}.</p>"
        )
    parts.append(
        _tiles(
            "staff",
            report.staff,
            [("branch", "Branch", report.branch), ("bank", "Bank", report.bank)],
        )
    )
    if not _is_empty(report.staff) or report.staff.nps_responses:
        who = [
            (report.staff_id, report.staff, "staff"),
            ("Branch", report.branch, "branch"),
            ("Bank", report.bank, "bank"),
        ]
        conversion = [(name, f.conversion, kind, None) for name, f, kind in who]
        nps = [(name, f.nps, kind, None) for name, f, kind in who]
        subject = f"{report.staff_id}, their branch and the bank"
        parts.append(
            '<div class="grid-2">'
            + _section(
                "Conversion",
                _conversion_chart(conversion, label=f"Conversion of {subject}"),
                ident="conversion",
            )
            + _section("NPS", _nps_chart(nps, label=f"NPS of {subject}"), ident="nps")
            + "</div>"
        )
    if report.by_product:
        parts.append(
            _section(
                "Products offered",
                _product_table(report.by_product, names or {}),
                ident="products",
            )
        )
    return _shell(links, "".join(parts), title=f"Staff {report.staff_id} · {day.isoformat()}")


def _is_empty(figures: DayFigures) -> bool:
    return figures.offers == 0 and figures.presented == 0


def _day_nav(href: Callable[[dt.date], str], day: dt.date, today: dt.date) -> str:
    previous = day - dt.timedelta(days=1)
    following = day + dt.timedelta(days=1)
    prev_link = (
        f'<a id="prev-day" class="button" rel="prev" href="{_esc(href(previous))}">'
        f"← {_esc(f'{previous:%a} {previous.day} {previous:%b}')}</a>"
    )
    if following <= today:
        next_link = (
            f'<a id="next-day" class="button" rel="next" href="{_esc(href(following))}">'
            f"{_esc(f'{following:%a} {following.day} {following:%b}')} →</a>"
        )
    else:
        next_link = '<span class="button disabled" aria-disabled="true">Next →</span>'
    return f'<nav class="day-nav" aria-label="Other days">{prev_link}{next_link}</nav>'


def _tiles(subject: str, figures: DayFigures, others: Sequence[tuple[str, str, DayFigures]]) -> str:
    """The headline tiles: ``subject``'s figure large, each of ``others`` beside it."""

    def tile(
        metric: str,
        title: str,
        value: float | int | None,
        shown: str,
        other_values: Iterable[tuple[str, str, float | int | None, str]],
        extra: str = "",
    ) -> str:
        comparisons = "".join(
            f'<span class="vs">{_esc(label)} '
            + _number("b", f"{who}-{metric}", raw, text)
            + "</span>"
            for who, label, raw, text in other_values
        )
        return (
            f'<div class="tile" id="tile-{metric}"><h2>{_esc(title)}</h2>'
            + _number("p", f"{subject}-{metric}", value, shown, "big")
            + f'<p class="compare">{comparisons}</p>{extra}</div>'
        )

    bank = others[-1][2]

    def each(pick: str) -> list[tuple[str, str, float | int | None, str]]:
        out: list[tuple[str, str, float | int | None, str]] = []
        for who, label, other in others:
            raw: float | int | None = getattr(other, pick)
            out.append((who, label, raw, _FORMATS[pick](raw)))
        return out

    responses = (
        f'<p class="note" id="{subject}-nps-responses" data-value="{figures.nps_responses}">'
        f"{fmt_count(figures.nps_responses)} "
        f"{'response' if figures.nps_responses == 1 else 'responses'}</p>"
    )
    csat_responses = (
        f'<p class="note" id="{subject}-csat-responses" data-value="{figures.csat_responses}">'
        f"out of 5 · {fmt_count(figures.csat_responses)} "
        f"{'response' if figures.csat_responses == 1 else 'responses'}</p>"
    )
    return (
        '<section class="tiles" aria-label="Headline figures">'
        + tile("offers", "Offers made", figures.offers, fmt_count(figures.offers), each("offers"))
        + tile(
            "accepted",
            "Accepted",
            figures.accepted,
            fmt_count(figures.accepted),
            each("accepted"),
            f'<p class="note">of {fmt_count(figures.presented)} with an outcome</p>',
        )
        + tile(
            "conversion",
            "Conversion",
            figures.conversion,
            fmt_percent(figures.conversion),
            each("conversion"),
            _delta(figures.conversion, bank.conversion, scale=100, digits=1),
        )
        + tile(
            "nps",
            "NPS",
            figures.nps,
            fmt_nps(figures.nps),
            each("nps"),
            responses + _delta(figures.nps, bank.nps, scale=1, digits=0),
        )
        + tile(
            "csat",
            "CSAT",
            figures.csat_mean,
            fmt_csat(figures.csat_mean),
            each("csat_mean"),
            csat_responses,
        )
        + "</section>"
    )


def _fmt_count_or_none(value: float | int | None) -> str:
    return _NONE if value is None else fmt_count(int(value))


_FORMATS = {
    "offers": _fmt_count_or_none,
    "accepted": _fmt_count_or_none,
    "conversion": fmt_percent,
    "nps": fmt_nps,
    "csat_mean": fmt_csat,
}


def _section(title: str, content: str, *, ident: str) -> str:
    return (
        f'<section class="card" id="section-{ident}" aria-labelledby="h-{ident}">'
        f'<h2 id="h-{ident}">{_esc(title)}</h2>{content}</section>'
    )


def _staff_table(report: BranchDaily, links: _Links) -> str:
    rows = []
    for staff_id, figures in report.staff:
        rows.append(
            f'<tr data-staff="{_esc(staff_id)}">'
            f'<th scope="row"><a href="{_esc(links.staff(staff_id, report.day))}">'
            f"{_esc(staff_id)}</a></th>" + _figure_cells(figures) + "</tr>"
        )
    total = (
        '<tr class="total">'
        '<th scope="row">Branch</th>' + _figure_cells(report.branch) + "</tr>"
        '<tr class="total bank"><th scope="row">Bank</th>' + _figure_cells(report.bank) + "</tr>"
    )
    return (
        '<table id="staff-table"><thead><tr><th scope="col">Staff</th>'
        '<th scope="col" class="num">Offers</th><th scope="col" class="num">Accepted</th>'
        '<th scope="col" class="num">Conversion</th><th scope="col" class="num">NPS</th>'
        '<th scope="col" class="num">NPS answers</th>'
        '<th scope="col" class="num">CSAT</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody><tfoot>{total}</tfoot></table>"
    )


def _figure_cells(figures: DayFigures) -> str:
    return (
        _cell("offers", figures.offers, fmt_count(figures.offers))
        + _cell("accepted", figures.accepted, fmt_count(figures.accepted))
        + _cell("conversion", figures.conversion, fmt_percent(figures.conversion))
        + _cell("nps", figures.nps, fmt_nps(figures.nps))
        + _cell("nps_responses", figures.nps_responses, fmt_count(figures.nps_responses))
        + _cell("csat", figures.csat_mean, fmt_csat(figures.csat_mean))
    )


def _cell(metric: str, value: float | int | None, shown: str) -> str:
    return f'<td class="num" data-metric="{metric}" data-value="{_raw(value)}">{_esc(shown)}</td>'


def _product_names(engine: Engine) -> dict[str, str]:
    """Each product's name by its code, for the product tables."""
    with read_only(engine).connect() as conn:
        return {
            str(code): str(name) for code, name in conn.execute(select(Product.code, Product.name))
        }


def _product_table(rows: Sequence[ConversionRow], names: Mapping[str, str]) -> str:
    """The offers of a day by product: the product's name (its code beneath, and as the
    tooltip), then the figures. It fits its card: headers wrap between words, a long
    name or code anywhere; on a screen too narrow for it the card scrolls sideways, not
    the page."""
    body = []
    for row in rows:
        median = (
            _NONE if row.median_days_to_adoption is None else f"{row.median_days_to_adoption:g}"
        )
        name = names.get(row.key)
        label = (
            f'<span class="product-name">{_esc(name)}</span>'
            f'<small class="product-code">{_esc(row.key)}</small>'
            if name and name != row.key
            else f'<span class="product-name">{_esc(row.key)}</span>'
        )
        body.append(
            f'<tr data-product="{_esc(row.key)}">'
            f'<th scope="row" title="{_esc(row.key)}">{label}</th>'
            + _cell("offers", row.offers, fmt_count(row.offers))
            + _cell("presented", row.presented, fmt_count(row.presented))
            + _cell("accepted", row.accepted, fmt_count(row.accepted))
            + _cell("declined", row.declined, fmt_count(row.declined))
            + _cell("not_now", row.not_now, fmt_count(row.not_now))
            + _cell("conversion", row.conversion, fmt_percent(row.conversion))
            + _cell("adopted", row.adopted, fmt_count(row.adopted))
            + _cell("median_days_to_adoption", row.median_days_to_adoption, median)
            + "</tr>"
        )
    headers = "".join(
        f'<th scope="col" class="num">{name}</th>'
        for name in (
            "Offers",
            "With outcome",
            "Accepted",
            "Declined",
            "Not now",
            "Conversion",
            "Adopted",
            "Median days to adopt",
        )
    )
    return (
        '<div class="scroll"><table id="product-table" class="fit"><thead><tr>'
        f'<th scope="col" class="product">Product</th>{headers}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


# ---------------------------------------------------------------------- charts

_COLOURS = {"staff": "#2f9e8f", "branch": "#2b6cb0", "bank": "#8a9bb0"}
_FONT = 'font-family="inherit"'


def _nice_ceiling(value: float, steps: Sequence[float] = (1, 2, 4, 10)) -> float:
    """The smallest of ``steps`` times a power of ten that is at least ``value``.

    The default steps split into quarters that read well: 0, 5, 10, 15, 20.
    """
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in steps:
        if step * power >= value - 1e-12:
            return step * power
    return 10 * power


def _share_scale(shares: Sequence[float]) -> float:
    """The top of a conversion axis: a round share just above the largest, at most 100%."""
    return min(1.0, _nice_ceiling(max(shares, default=0.0) or 0.1))


def _tick_percent(share: float) -> str:
    return f"{round(share * 100, 1):g}%"


def _short(label: str, limit: int = 16) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


_BarRow = tuple[str, float | None, str, str | None]
"""A bar: its label, value (None: nothing to draw), kind (staff, branch, bank), link."""


def _conversion_chart(rows: Sequence[_BarRow], *, label: str) -> str:
    """Conversion as horizontal bars from 0 to a round share above the largest."""
    scale = _share_scale([value for _, value, _, _ in rows if value is not None])
    ticks = [(scale * i / 4, _tick_percent(scale * i / 4)) for i in range(5)]
    return _bar_chart(
        rows,
        ident="chart-conversion",
        label=label,
        low=0.0,
        high=scale,
        ticks=ticks,
        shown=fmt_percent,
        missing="no outcomes",
    )


def _nps_chart(rows: Sequence[_BarRow], *, label: str) -> str:
    """NPS as bars either side of zero, on its whole range of -100 to +100."""
    ticks = [(float(v), fmt_nps(v)) for v in (-100, -50, 0, 50, 100)]
    return _bar_chart(
        rows,
        ident="chart-nps",
        label=label,
        low=-100.0,
        high=100.0,
        ticks=ticks,
        shown=fmt_nps,
        missing="no answers",
    )


def _bar_chart(
    rows: Sequence[_BarRow],
    *,
    ident: str,
    label: str,
    low: float,
    high: float,
    ticks: Sequence[tuple[float, str]],
    shown: Callable[[float], str],
    missing: str,
) -> str:
    """Horizontal bars from zero, one row each, on the axis ``low`` to ``high``."""
    width, left, right, top, axis = 480, 112, 58, 6, 22
    # Few rows get taller ones, so the chart keeps about the height of the trend beside it.
    row_height = min(40.0, max(28.0, 168 / max(len(rows), 1)))
    bar_height = min(row_height - 12, 22)
    plot = width - left - right
    height = round(top + row_height * len(rows) + axis)

    def x_of(value: float) -> float:
        return left + plot * (min(max(value, low), high) - low) / (high - low)

    zero = x_of(0.0)
    parts = [
        f'<svg id="{ident}" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-labelledby="{ident}-title" '
        f'{_FONT} font-size="12">'
        f'<title id="{ident}-title">{_esc(label)}</title>'
    ]
    for tick, text in ticks:
        x = x_of(tick)
        line_class = "grid zero" if tick == 0 and low < 0 else "grid"
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - axis}" '
            f'class="{line_class}"/>'
            f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle" class="axis">'
            f"{_esc(text)}</text>"
        )
    for i, (name, value, kind, href) in enumerate(rows):
        middle = top + (i + 0.5) * row_height
        name_text = (
            f'<text x="{left - 10}" y="{middle:.1f}" text-anchor="end" '
            f'dominant-baseline="central" class="label {kind}">'
            f"<title>{_esc(name)}</title>{_esc(_short(name))}</text>"
        )
        if href is not None:
            name_text = f'<a href="{_esc(href)}">{name_text}</a>'
        parts.append(name_text)
        if value is None:
            parts.append(
                f'<text x="{zero + 6:.1f}" y="{middle:.1f}" dominant-baseline="central" '
                f'class="axis">{_esc(missing)}</text>'
            )
            continue
        end = x_of(value)
        # A hairline for a value of exactly zero, so the row does not look empty.
        start, stop = min(zero, end), max(max(zero, end), min(zero, end) + 2)
        # A negative bar's label goes right of zero, where it cannot run into the names.
        label_x = stop + 6
        parts.append(
            f'<rect x="{start:.1f}" y="{middle - bar_height / 2:.1f}" '
            f'width="{stop - start:.1f}" height="{bar_height:.1f}" rx="3" '
            f'fill="{_COLOURS[kind]}" data-kind="{kind}" data-value="{_raw(value)}"/>'
            f'<text x="{label_x:.1f}" y="{middle:.1f}" '
            f'dominant-baseline="central" class="value">{_esc(shown(value))}</text>'
        )
    parts.append("</svg>")
    legend = (
        '<p class="legend">'
        f'<span class="swatch" style="background:{_COLOURS["staff"]}"></span>Staff '
        f'<span class="swatch" style="background:{_COLOURS["branch"]}"></span>Branch '
        f'<span class="swatch" style="background:{_COLOURS["bank"]}"></span>Bank</p>'
    )
    return "".join(parts) + legend


def _trend_chart(trend: Sequence[tuple[dt.date, DayFigures]]) -> str:
    """Offers a day as bars (left scale) and conversion as a line (right scale)."""
    width, height = 480, 220
    left, right, top, bottom = 34, 42, 14, 38
    plot_w, plot_h = width - left - right, height - top - bottom
    slots = max(len(trend), 1)
    slot = plot_w / slots
    offers_max = max(4.0, _nice_ceiling(max((f.offers for _, f in trend), default=0)))
    share_max = _share_scale([f.conversion for _, f in trend if f.conversion is not None])
    baseline = top + plot_h
    description = "; ".join(
        f"{day:%a} {day.day} {day:%b}: {fmt_count(f.offers)} offers, "
        f"conversion {fmt_percent(f.conversion)}"
        for day, f in trend
    )
    parts = [
        f'<svg id="chart-trend" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" '
        'aria-labelledby="chart-trend-title chart-trend-desc" '
        f'{_FONT} font-size="12">'
        '<title id="chart-trend-title">Offers made and conversion over the last 7 days</title>'
        f'<desc id="chart-trend-desc">{_esc(description)}</desc>'
    ]
    for i in range(5):
        y = baseline - plot_h * i / 4
        offers_tick = offers_max * i / 4
        # Offers are whole: a gridline between two whole numbers goes unlabelled.
        offers_label = f"{offers_tick:,.0f}" if offers_tick == int(offers_tick) else ""
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y:.1f}" text-anchor="end" dominant-baseline="central" '
            f'class="axis">{offers_label}</text>'
            f'<text x="{width - right + 6}" y="{y:.1f}" dominant-baseline="central" '
            f'class="axis conv">{_tick_percent(share_max * i / 4)}</text>'
        )
    points: list[tuple[float, float, float] | None] = []
    for i, (day, figures) in enumerate(trend):
        centre = left + slot * (i + 0.5)
        bar_h = plot_h * figures.offers / offers_max
        bar_w = min(slot * 0.6, 40)
        axis_class = "axis current" if i == len(trend) - 1 else "axis"
        parts.append(
            f'<rect x="{centre - bar_w / 2:.1f}" y="{baseline - bar_h:.1f}" '
            f'width="{bar_w:.1f}" height="{bar_h:.1f}" rx="2" class="offers-bar" '
            f'data-day="{day.isoformat()}" data-value="{figures.offers}"/>'
            f'<text x="{centre:.1f}" y="{height - bottom + 16}" text-anchor="middle" '
            f'class="{axis_class}">{_esc(f"{day:%a}")}</text>'
            f'<text x="{centre:.1f}" y="{height - bottom + 31}" text-anchor="middle" '
            f'class="{axis_class}">{day.day} {_esc(f"{day:%b}")}</text>'
        )
        if figures.offers:
            # Inside the top of the bar when it is tall enough, where the line rarely runs.
            inside = bar_h >= 20
            label_y = baseline - bar_h + (13 if inside else -5)
            parts.append(
                f'<text x="{centre:.1f}" y="{label_y:.1f}" text-anchor="middle" '
                f'class="value small">{fmt_count(figures.offers)}</text>'
            )
        if figures.conversion is None:
            points.append(None)
        else:
            y = baseline - plot_h * min(figures.conversion / share_max, 1.0)
            points.append((centre, y, figures.conversion))
    segment: list[str] = []
    lines: list[str] = []
    for point in [*points, None]:
        if point is None:
            if len(segment) > 1:
                lines.append(" ".join(segment))
            segment = []
        else:
            segment.append(f"{point[0]:.1f},{point[1]:.1f}")
    parts.extend(f'<polyline points="{line}" class="conv-line"/>' for line in lines)
    parts.extend(
        f'<circle cx="{p[0]:.1f}" cy="{p[1]:.1f}" r="4" class="conv-dot" '
        f'data-value="{_raw(p[2])}"><title>{_esc(fmt_percent(p[2]))}</title></circle>'
        for p in points
        if p is not None
    )
    parts.append("</svg>")
    legend = (
        '<p class="legend"><span class="swatch offers"></span>Offers made (left scale) '
        '<span class="swatch line"></span>Conversion (right scale)</p>'
    )
    return "".join(parts) + legend


# ---------------------------------------------------------------------- layout


def _shell(links: _Links, body: str, *, title: str = "", signed_in: bool = True) -> str:
    """The whole document around ``body``."""
    sign_out = (
        f'<form method="post" action="{_esc(links.home)}logout" class="signout">'
        '<button type="submit" class="link">Sign out</button></form>'
        if signed_in
        else ""
    )
    page_title = f"{title} · nbo" if title else "nbo"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(page_title)}</title>"
        '<link rel="icon" href="data:,">'
        f"<style>{_CSS}</style></head><body>"
        '<header class="bar"><div class="inner">'
        f'<a class="brand" href="{_esc(links.home)}">nbo <span>Daily results</span></a>'
        f"{sign_out}</div></header>"
        f'<main class="inner">{body}</main>{_FOOTER if signed_in else ""}</body></html>'
    )


_FOOTER = (
    '<footer class="inner"><p>Days are UTC. Conversion is accepted offers over offers with an '
    "outcome. NPS is the share of promoters (9–10) minus the share of detractors (0–6); CSAT "
    "is the mean answer from 1 to 5.</p></footer>"
)


_CSS = """
:root{--ink:#1c2733;--muted:#5f6f81;--line:#e3e8ef;--bg:#f4f6f9;--card:#fff;
--accent:#2b6cb0;--staff:#2f9e8f;--bank:#8a9bb0;--up:#1f7a4d;--down:#b42318}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans","DejaVu Sans",sans-serif}
.inner{max-width:1120px;margin:0 auto;padding:0 24px}
.bar{background:#14263b;color:#fff}
.bar .inner{display:flex;align-items:center;justify-content:space-between;height:52px}
.brand{color:#fff;text-decoration:none;font-weight:700;letter-spacing:.02em}
.brand span{font-weight:400;color:#b9c7d8;margin-left:6px}
.signout{margin:0}
button.link{background:none;border:0;color:#d6e0ec;font:inherit;cursor:pointer;padding:4px 0}
button.link:hover{color:#fff;text-decoration:underline}
main.inner{padding-top:28px;padding-bottom:8px}
h1{font-size:26px;margin:0 0 2px;line-height:1.2}
h2{font-size:15px;margin:0 0 12px;color:var(--ink)}
a{color:var(--accent)}
code{background:#eef2f7;padding:1px 5px;border-radius:4px}
.eyebrow{margin:0;text-transform:uppercase;font-size:12px;letter-spacing:.08em;color:var(--muted)}
.day{margin:0;color:var(--muted);font-size:16px}
.context{margin:4px 0 0;color:var(--muted)}
.lede{color:var(--muted);margin:4px 0 20px;max-width:60ch}
.title-row{display:flex;justify-content:space-between;align-items:flex-end;gap:16px;
flex-wrap:wrap;margin-bottom:20px}
.day-nav{display:flex;gap:8px}
.button{display:inline-block;padding:7px 12px;border:1px solid var(--line);border-radius:6px;
background:var(--card);text-decoration:none;color:var(--ink);font-size:14px}
.button:hover{border-color:var(--accent)}
.button.disabled{color:#a9b4c2}
.notice{background:#fff8e6;border:1px solid #f3dca2;border-radius:8px;padding:12px 16px;margin:0 0 20px}
.notice.error{background:#fdecea;border-color:#f5b7b1}
.tiles{display:grid;grid-template-columns:repeat(5,minmax(0,1fr));gap:14px;margin-bottom:20px}
.tile,.card{background:var(--card);border:1px solid var(--line);border-radius:10px;
box-shadow:0 1px 2px rgba(20,38,59,.04)}
.tile{padding:14px 16px}
.tile h2{font-size:13px;font-weight:600;color:var(--muted);margin:0 0 4px;
text-transform:uppercase;letter-spacing:.05em}
.big{font-size:32px;font-weight:700;margin:0;line-height:1.15;font-variant-numeric:tabular-nums}
.compare{margin:6px 0 0;color:var(--muted);font-size:13px;display:flex;flex-direction:column}
.compare b{color:var(--ink);font-weight:600;font-variant-numeric:tabular-nums}
.note{margin:2px 0 0;color:var(--muted);font-size:12px}
.delta{margin:6px 0 0;font-size:12px;font-weight:600}
.delta.up{color:var(--up)}.delta.down{color:var(--down)}.delta.same{color:var(--muted)}
.card{padding:16px 18px;margin-bottom:20px}
.grid-2{display:grid;grid-template-columns:1fr 1fr;gap:20px}
.grid-2 .card{margin-bottom:20px}
.chart{display:block;width:100%;max-width:640px;height:auto}
.chart .grid{stroke:#edf1f5;stroke-width:1}
.chart .grid.zero{stroke:#aab6c4}
.chart .axis{fill:var(--muted);font-size:11px}
.chart .axis.conv{fill:#c05621}
.chart .axis.current{fill:var(--ink);font-weight:700}
.chart .label{fill:var(--ink)}
.chart .label.branch,.chart .label.bank{font-weight:700}
.chart .value{fill:var(--ink);font-weight:600}
.chart .small{font-size:11px}
.chart .offers-bar{fill:#b3cfee}
.chart .conv-line{fill:none;stroke:#c05621;stroke-width:2.5}
.chart .conv-dot{fill:#fff;stroke:#c05621;stroke-width:2.5}
.legend{margin:8px 0 0;color:var(--muted);font-size:12px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 5px 0 10px;
vertical-align:-1px}
.swatch:first-child{margin-left:0}
.swatch.offers{background:#b3cfee}
.swatch.line{background:#c05621;height:3px;vertical-align:3px}
.scroll{overflow-x:auto}
table.fit{min-width:640px}
table.fit thead th{white-space:normal;vertical-align:bottom;letter-spacing:.02em}
table.fit tbody th{white-space:normal;overflow-wrap:anywhere;min-width:9em}
.product-name{display:block;font-weight:600}
.product-code{display:block;color:var(--muted);font-size:12px;font-weight:400}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:8px 10px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
thead th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);
font-weight:600;border-bottom:2px solid var(--line)}
.num{text-align:right}
tbody tr:hover{background:#f8fafc}
tfoot th,tfoot td{font-weight:600;background:#f8fafc}
tfoot tr.bank th,tfoot tr.bank td{color:var(--muted);font-weight:500}
td small{color:var(--muted)}
.pickers{display:grid;grid-template-columns:repeat(2,minmax(0,360px));gap:20px}
form.card{display:flex;flex-direction:column;gap:6px}
form.login{max-width:420px;margin:32px auto;padding:24px}
label{font-size:13px;font-weight:600;margin-top:6px}
input{font:inherit;padding:8px 10px;border:1px solid #c9d3df;border-radius:6px}
input:focus,button:focus-visible,a:focus-visible{outline:3px solid #9cc0e6;outline-offset:1px}
form.card button{margin-top:12px;font:inherit;font-weight:600;padding:9px 14px;border:0;
border-radius:6px;background:var(--accent);color:#fff;cursor:pointer}
footer{color:var(--muted);font-size:12px;padding-bottom:32px}
@media (max-width:900px){.tiles{grid-template-columns:repeat(2,minmax(0,1fr))}
.grid-2,.pickers{grid-template-columns:1fr}}
"""
