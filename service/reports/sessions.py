"""Dashboard sessions: what a signed-in browser's cookie stands for.

Signing in to the dashboard with an API key opens a session: a random id
(:data:`TOKEN_BYTES` bytes) goes to the browser in a cookie, and the database
keeps only its SHA-256 (``dashboard_sessions``), the key it was opened with and
when it expires. The cookie never holds the key, so a stolen cookie is worth
one dashboard session, not a key for the API, and a copy of the table opens
nothing.

Each dashboard request looks its session up (one primary-key read joined to
its key, no cache): a session is refused once it has expired, once its key is
revoked, or once it is closed by signing out, at once and on every worker.
Expired sessions are deleted whenever someone signs in.

Data access only: functions are keyword-only and never commit; the caller
frames the unit of work.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.auth import hash_key
from service.data.tables import ApiKey, DashboardSession, utcnow

TOKEN_BYTES = 32
"""Random bytes in a session id: 256 bits, as in an API key's secret."""

MAX_SESSIONS_PER_KEY = 20
"""Open sessions one key may hold; signing in again closes the oldest beyond this, so
signing in over and over cannot grow the table without bound."""

# token_urlsafe(32) is 43 characters; anything else is not one of ours and costs no query.
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True)
class SignedIn:
    """An open session: the key it was opened with, and when it ends."""

    key_prefix: str
    key_name: str
    scopes: frozenset[str]
    expires_at: dt.datetime


def hash_token(token: str) -> str:
    """The stored form of a session id: its SHA-256, hex.

    A fast hash is enough: the id is 256 random bits, beyond any guessing, and
    the hash only keeps a copy of the table from being used as cookies.
    """
    return hash_key(token)


def open_session(
    session: Session,
    *,
    key_prefix: str,
    lifetime: dt.timedelta,
    now: dt.datetime | None = None,
) -> str | None:
    """Open a session for the key with ``key_prefix``; its id, or None if the key is
    unknown or revoked.

    The key is read again here, whatever a cache said a moment ago, so a key
    revoked just before cannot open a session. Deletes every expired session
    on the way, and this key's oldest open sessions beyond
    :data:`MAX_SESSIONS_PER_KEY`.
    """
    now = now or utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    key_id = session.scalar(
        select(ApiKey.id).where(ApiKey.prefix == key_prefix, ApiKey.revoked_at.is_(None))
    )
    if key_id is None:
        return None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    session.add(
        DashboardSession(
            id_hash=hash_token(token), api_key_id=key_id, created_at=now, expires_at=now + lifetime
        )
    )
    session.flush()
    surplus = session.scalars(
        select(DashboardSession.id_hash)
        .where(DashboardSession.api_key_id == key_id)
        .order_by(DashboardSession.created_at.desc(), DashboardSession.id_hash)
        .offset(MAX_SESSIONS_PER_KEY)
    ).all()
    if surplus:
        session.execute(delete(DashboardSession).where(DashboardSession.id_hash.in_(surplus)))
    return token


def find_session(
    session: Session, *, token: str, now: dt.datetime | None = None
) -> SignedIn | None:
    """The open session whose id is ``token``; None when there is none, it has expired,
    or its key has been revoked."""
    if not _TOKEN_PATTERN.fullmatch(token):
        return None
    row = session.execute(
        select(
            DashboardSession.expires_at,
            ApiKey.prefix,
            ApiKey.name,
            ApiKey.scopes,
            ApiKey.revoked_at,
        )
        .join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
        .where(DashboardSession.id_hash == hash_token(token))
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    expires_at = _aware(row.expires_at)
    if expires_at <= (now or utcnow()):
        return None
    return SignedIn(
        key_prefix=row.prefix,
        key_name=row.name,
        scopes=frozenset(row.scopes),
        expires_at=expires_at,
    )


def close_session(session: Session, *, token: str) -> bool:
    """Delete the session whose id is ``token``; whether there was one."""
    if not _TOKEN_PATTERN.fullmatch(token):
        return False
    result = session.execute(
        delete(DashboardSession).where(DashboardSession.id_hash == hash_token(token))
    )
    return bool(getattr(result, "rowcount", 0))


def _aware(moment: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; nbo stores every time in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
