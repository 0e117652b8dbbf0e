"""API keys with scopes: created once, stored hashed, checked from an in-memory cache.

A key reads ``nbo_<prefix>_<secret>``. The prefix (8 lowercase letters and
digits) is not secret: it names the key in listings, logs and ``nbo keys
revoke``, and finds its row. The secret is 32 random bytes. The database holds
the prefix and a SHA-256 of the whole key, never the key itself, so the
plaintext is shown once, when the key is created.

A request presents its key as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. :class:`KeyStore` answers from memory: a verified
request costs a dict lookup and one SHA-256, no database round trip. Entries
expire after a TTL, so a revocation takes effect everywhere within it.
Routes declare what they need with ``Depends(require("models"))``.

While the database cannot be reached, a key verified before keeps working
from its last good entry (a revocation read before the outage still holds);
a key never seen, or seen as unknown, gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service import metrics
from service.data.db import read_only, unit_of_work
from service.data.tables import ApiKey, utcnow
from service.errors import NotFound, Problem, Unavailable, is_outage
from service.settings import Settings

log = logging.getLogger("nbo.auth")

SCOPES: dict[str, str] = {
    "decisions": "ask for offers",
    "outcomes": "record outcomes and feedback",
    "data": "push adoptions and customer changes",
    "catalogue": "read and modify products",
    "models": "list and activate model versions",
    "rules": "read rules",
    "reports": "read reports",
    "ops": "read /metrics, the API docs and the readiness figures",
    "admin": "everything (implies every other scope)",
}
"""Every scope a key can hold, with what it allows."""

ADMIN_SCOPE = "admin"

ROLES: dict[str, tuple[str, ...]] = {
    "teller": ("decisions", "outcomes"),
    "data-scientist": ("models", "rules", "catalogue", "reports"),
    "integration": ("data",),
    "admin": ("admin",),
}
"""Presets of scopes for ``nbo keys create --role``."""

KEY_PREFIX = "nbo"
PREFIX_LENGTH = 8
SECRET_BYTES = 32
# Lowercase letters and digits only: a prefix never contains the "_" separator
# and never starts with "-", so `nbo keys revoke <prefix>` cannot read as an option.
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
# token_urlsafe(32) gives 43 characters; the upper bound keeps hashing cheap
# whatever a client sends.
_KEY_PATTERN = re.compile(r"nbo_(?P<prefix>[a-z0-9]{8})_[A-Za-z0-9_-]{43,128}")
_REALM = 'Bearer realm="nbo"'


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's name, prefix and the scopes it holds."""

    name: str
    prefix: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """Whether this principal holds ``scope`` (``admin`` holds them all)."""
        return scope in self.scopes or ADMIN_SCOPE in self.scopes


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as listings show it: everything but the secret and its hash."""

    prefix: str
    name: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the key has been revoked."""
        return self.revoked_at is not None


class Unauthorized(Problem):
    """401: no key, a malformed key, an unknown or wrong key, or a revoked one.

    Carries ``headers`` with the ``WWW-Authenticate: Bearer`` challenge
    (RFC 6750) for the problem handler to send.
    """

    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str, *, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        challenge = _REALM if error is None else f'{_REALM}, error="{error}"'
        self.headers: dict[str, str] = {"WWW-Authenticate": challenge}


class Forbidden(Problem):
    """403: a valid key that lacks the scope the route needs."""

    status, title, slug = 403, "Forbidden", "forbidden"

    def __init__(self, detail: str, *, scope: str) -> None:
        super().__init__(detail, scope=scope)
        self.headers: dict[str, str] = {
            "WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{scope}"'
        }


class KeyNotFound(NotFound):
    """404: no key has this prefix."""


def resolve_scopes(*, scopes: Iterable[str] = (), role: str | None = None) -> list[str]:
    """The sorted, de-duplicated scopes of ``role`` plus ``scopes``.

    Raises
    ------
    ValueError
        Naming an unknown role or scope, or when the result is empty.
    """
    wanted = {s.strip() for s in scopes if s.strip()}
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        wanted.update(ROLES[role])
    unknown = sorted(wanted - SCOPES.keys())
    if unknown:
        raise ValueError(
            f"unknown scope {', '.join(repr(s) for s in unknown)}; scopes: {', '.join(SCOPES)}"
        )
    if not wanted:
        raise ValueError("a key needs at least one scope")
    return sorted(wanted)


def hash_key(key: str) -> str:
    """The stored form of ``key``: SHA-256 hex of the whole key, prefix included.

    A fast hash is enough here, unlike for passwords: the secret is 256 random
    bits, so even billions of guesses a second against a stolen hash get
    nowhere, and a slow KDF (bcrypt, argon2) would only add latency to every
    request. Hashing the prefix with the secret makes each hash unique to its
    row, which is all a salt would add.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(session: Session, *, name: str, scopes: Iterable[str]) -> str:
    """Store a new key and return its plaintext, the only time it exists.

    Only the prefix and :func:`hash_key` of the key are stored. Does not
    commit: the caller frames the unit of work.

    Raises
    ------
    ValueError
        An empty or over-long name, an unknown scope (named), or no scopes.
    """
    name = name.strip()
    if not name or len(name) > 128:
        raise ValueError("a key needs a name of 1 to 128 characters")
    granted = resolve_scopes(scopes=scopes)
    while True:
        prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
        # 36**8 prefixes: a clash is vanishingly rare, but the unique index
        # would turn one into a failed transaction, so look first.
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    session.add(ApiKey(prefix=prefix, secret_hash=hash_key(key), name=name, scopes=granted))
    session.flush()
    log.info("api key created", extra={"prefix": prefix, "key_name": name, "scopes": granted})
    return key


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        prefix=row.prefix,
        name=row.name,
        scopes=tuple(row.scopes),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def list_keys(session: Session) -> list[KeyInfo]:
    """Every key, oldest first, without secrets or hashes."""
    rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
    return [_info(row) for row in rows]


def revoke_key(session: Session, *, prefix: str) -> KeyInfo:
    """Mark the key with ``prefix`` revoked (idempotent: a second call keeps the first time).

    Services stop accepting it when their :class:`KeyStore` entry expires.
    Does not commit.

    Raises
    ------
    KeyNotFound
        No key has this prefix.
    """
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        raise KeyNotFound(f"no API key with prefix {prefix!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        log.info("api key revoked", extra={"prefix": prefix, "key_name": row.name})
    return _info(row)


@dataclass(frozen=True, slots=True)
class _Entry:
    expires_at: float
    principal: Principal | None  # None: no key has this prefix
    secret_hash: str = ""
    revoked: bool = False


STALE_RETRY_SECONDS = 5.0
"""While the database is unreachable, how often a last good entry is re-read (at most)."""


class KeyStore:
    """A thread-safe, in-memory view of the ``api_keys`` table for the request path.

    Parameters
    ----------
    engine
        Where keys are read from on a cache miss.
    ttl_seconds
        How long a key is served from memory; a revocation takes effect within it.
    negative_ttl_seconds
        How long "no such prefix" is remembered (capped at ``ttl_seconds``), so a
        client hammering with made-up keys costs one query per prefix per period,
        while a key created just now is usable soon.
    max_entries
        Bound on cached prefixes, of known keys and of unknown prefixes each; when
        either is full its oldest entry goes. The two are held apart, so made-up keys
        only ever push out other made-up keys, never the entries an outage serves from.
    clock
        Monotonic seconds; replaceable in tests.

    Notes
    -----
    When re-reading an expired key fails because the database is unreachable
    (:func:`service.errors.is_outage`), its last good entry is served instead and
    re-read at most every ``min(ttl_seconds, STALE_RETRY_SECONDS)``; each such
    fallback counts in ``nbo_auth_stale_keys_total`` and the outage is logged once.
    A prefix with no good entry then raises :class:`~service.errors.Unavailable`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        ttl_seconds: float = 30.0,
        negative_ttl_seconds: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._ttl = ttl_seconds
        self._negative_ttl = min(negative_ttl_seconds, ttl_seconds)
        self._stale_retry = min(STALE_RETRY_SECONDS, ttl_seconds)
        self._max_entries = max_entries
        self._clock = clock
        # Known keys and unknown prefixes apart, each oldest first (an entry read again
        # goes to the end). Eviction takes the oldest in O(1): a sweep for expired
        # entries walked the whole cache on every made-up key once it was full (0.3 ms
        # holding the interpreter each, so a flood of 3,000 a second took a worker's core).
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._unknown: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._refreshing: set[str] = set()
        self._outage = False

    def authenticate(
        self, authorization_header: str | None, x_api_key: str | None, scope: str
    ) -> Principal:
        """The principal of the presented key, if it is valid and holds ``scope``.

        Blocking on a cache miss (it reads the database): call it from a thread, or
        use :meth:`authenticate_async` on the event loop.

        Parameters
        ----------
        authorization_header
            The ``Authorization`` header, ``Bearer <key>``, or None.
        x_api_key
            The ``X-API-Key`` header, or None. If both headers are sent they
            must carry the same key.
        scope
            The scope the caller needs.

        Raises
        ------
        Unauthorized
            No key, a malformed one, an unknown prefix, a wrong secret, or a revoked key.
        Forbidden
            The key is valid but lacks ``scope`` (and is not ``admin``).
        Unavailable
            The key is not in memory and the database cannot be reached.
        """
        key, prefix = _parse(authorization_header, x_api_key)
        entry = self._cached(prefix)
        if entry is None:
            entry = self._refresh(prefix)
        return _check(entry, key, prefix, scope)

    async def authenticate_async(
        self, authorization_header: str | None, x_api_key: str | None, scope: str
    ) -> Principal:
        """:meth:`authenticate` for the event loop: a key in memory is checked right
        here (a dict lookup and one SHA-256); a miss reads the database in a thread,
        so a slow or locked database never stalls other requests."""
        key, prefix = _parse(authorization_header, x_api_key)
        entry = self._cached(prefix)
        if entry is None:
            try:
                entry = await asyncio.to_thread(self._refresh, prefix)
            except BaseException:
                # Cancelled before the thread began: no _refresh to let go of the claim
                # _cached made, and the key's last entry would be served for good.
                with self._lock:
                    self._refreshing.discard(prefix)
                raise
        return _check(entry, key, prefix, scope)

    def invalidate(self, prefix: str | None = None) -> None:
        """Forget ``prefix`` (or everything) now, e.g. after revoking a key in this process."""
        with self._lock:
            if prefix is None:
                self._entries.clear()
                self._unknown.clear()
            else:
                self._entries.pop(prefix, None)
                self._unknown.pop(prefix, None)

    def _cached(self, prefix: str) -> _Entry | None:
        """The entry of ``prefix`` if it has not expired, or if it is a known key being
        re-read right now (by one request; the others need not all wait on the database);
        None when the caller must read it.

        The caller told to read an expired known key is its one reader from here on:
        the claim is made under the lock, now, not when its thread begins the read. Made
        there, every request the event loop took up before that thread ran (all 32 in
        flight, at 32 connections) found no reader and started a read of its own, each
        TTL: a burst of database reads on a few threads that those requests waited for.
        """
        with self._lock:
            entry = self._entries.get(prefix) or self._unknown.get(prefix)
            if entry is None:
                return None
            if entry.expires_at > self._clock():
                return entry
            if entry.principal is not None:
                if prefix in self._refreshing:
                    return entry
                self._refreshing.add(prefix)  # this caller reads it (see _refresh)
        return None

    def _refresh(self, prefix: str) -> _Entry:
        """Read ``prefix`` from the database and remember it (blocking); through an
        outage, its last good entry. Lets go of the claim :meth:`_cached` made for it
        (the only claims: an entry without a principal, or none, is never served while
        read)."""
        now = self._clock()
        try:
            # Read outside the lock so one slow query does not stall every other request.
            entry = self._read(prefix, now)
            with self._lock:
                self._entries.pop(prefix, None)
                self._unknown.pop(prefix, None)
                held = self._unknown if entry.principal is None else self._entries
                while len(held) >= self._max_entries:
                    held.popitem(last=False)
                held[prefix] = entry
        finally:
            with self._lock:
                self._refreshing.discard(prefix)
        return entry

    def _read(self, prefix: str, now: float) -> _Entry:
        try:
            entry = self._load(prefix, now)
        except Exception as exc:
            if not is_outage(exc):
                raise
            return self._last_good(prefix, now)
        if self._outage:
            self._outage = False
            log.info("api keys read from the database again")
        return entry

    def _last_good(self, prefix: str, now: float) -> _Entry:
        """The entry of ``prefix`` verified before the database became unreachable,
        served for another retry period; Unavailable when there is none."""
        with self._lock:
            previous = self._entries.get(prefix)
        if previous is None or previous.principal is None:
            # Never verified (or unknown when last read, perhaps created since):
            # nothing to vouch for it, and "invalid" would be a lie.
            raise Unavailable(
                "the API key cannot be checked: the database is unavailable; retry shortly"
            ) from None
        metrics.AUTH_STALE_KEYS.inc()
        if not self._outage:
            self._outage = True
            log.warning("api keys served from memory: database unavailable")
        return dataclasses.replace(previous, expires_at=now + self._stale_retry)

    def _load(self, prefix: str, now: float) -> _Entry:
        with unit_of_work(read_only(self._engine)) as session:
            row = session.execute(
                select(ApiKey.name, ApiKey.scopes, ApiKey.secret_hash, ApiKey.revoked_at).where(
                    ApiKey.prefix == prefix
                )
            ).one_or_none()
        if row is None:
            return _Entry(expires_at=now + self._negative_ttl, principal=None)
        return _Entry(
            expires_at=now + self._ttl,
            principal=Principal(name=row.name, prefix=prefix, scopes=frozenset(row.scopes)),
            secret_hash=row.secret_hash,
            revoked=row.revoked_at is not None,
        )


def _parse(authorization: str | None, x_api_key: str | None) -> tuple[str, str]:
    """The presented key and its prefix; Unauthorized if missing or malformed."""
    key = _presented_key(authorization, x_api_key)
    match = _KEY_PATTERN.fullmatch(key)
    if match is None:
        raise Unauthorized(f"malformed API key: expected {KEY_PREFIX}_<prefix>_<secret>")
    return key, match["prefix"]


def _check(entry: _Entry, key: str, prefix: str, scope: str) -> Principal:
    """The principal ``entry`` vouches for, if ``key`` is its key, unrevoked, with ``scope``."""
    # Hash even for an unknown prefix, so the answer takes the same time either way.
    presented = hash_key(key).encode("ascii")
    if entry.principal is None or not hmac.compare_digest(
        presented, entry.secret_hash.encode("ascii")
    ):
        log.debug("api key rejected", extra={"prefix": prefix, "reason": "invalid"})
        raise Unauthorized("invalid API key")
    if entry.revoked:
        log.warning("api key rejected", extra={"prefix": prefix, "reason": "revoked"})
        raise Unauthorized(f"API key {prefix} has been revoked")
    if not entry.principal.allows(scope):
        raise Forbidden(f"this key lacks scope {scope!r}", scope=scope)
    return entry.principal


def _presented_key(authorization: str | None, x_api_key: str | None) -> str:
    bearer: str | None = None
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        bearer = credentials.strip()
    header_key = x_api_key.strip() if x_api_key is not None else None
    if bearer is not None and header_key and bearer != header_key:
        raise Unauthorized("Authorization and X-API-Key carry different keys; send one")
    key = bearer or header_key
    if not key:
        raise Unauthorized(
            "missing API key: send Authorization: Bearer <key> (or X-API-Key: <key>)",
            error=None,
        )
    return key


# Declared as sub-dependencies so OpenAPI lists both schemes on every protected
# route; the raw headers are read below, because these report a malformed
# header as a missing one.
_bearer_scheme = HTTPBearer(
    scheme_name="bearer",
    description="An nbo API key: `Authorization: Bearer nbo_<prefix>_<secret>`.",
    auto_error=False,
)
_api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    scheme_name="apiKey",
    description="An nbo API key in the X-API-Key header.",
    auto_error=False,
)


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency returning the caller's :class:`Principal` if it holds ``scope``.

    Reads the application's :class:`KeyStore` (``app.state.keys``). Use as
    ``principal: Annotated[Principal, Depends(require("models"))]``.

    Raises
    ------
    ValueError
        At declaration, for an unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")

    # On the event loop, without a thread hop for a key in memory; a cache miss reads
    # the database in a thread (authenticate_async).
    async def dependency(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
        _api_key: Annotated[str | None, Depends(_api_key_scheme)],
    ) -> Principal:
        return await _keys(request).authenticate_async(
            request.headers.get("authorization"), request.headers.get("x-api-key"), scope
        )

    dependency.__name__ = f"require_{scope}"
    return dependency


OPS_SCOPE = "ops"
_require_ops = require(OPS_SCOPE)


async def ops_access(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
    _api_key: Annotated[str | None, Depends(_api_key_scheme)],
) -> Principal | None:
    """A FastAPI dependency guarding the operations endpoints (``/metrics``, the API docs).

    With ``ops_endpoints="open"`` anyone passes (None); with ``"key"`` (the default)
    the caller needs a key holding ``ops`` (or ``admin``), as :func:`require` checks.
    """
    if _settings(request).ops_endpoints == "open":
        return None
    return await _require_ops(request, _bearer, _api_key)


async def sees_ops_figures(request: Request) -> bool:
    """A FastAPI dependency for an open route that adds operations figures for some callers.

    True when ops endpoints are open or the caller sent a key holding ``ops``. No key
    gives False, not an error (probes send none); a key that is invalid or lacks the
    scope raises as :func:`require` does (401, 403), so a misconfigured scraper hears
    about it. Reads the raw headers without the security schemes, so the route stays
    open in the OpenAPI spec.
    """
    if _settings(request).ops_endpoints == "open":
        return True
    authorization = request.headers.get("authorization")
    api_key = request.headers.get("x-api-key")
    if authorization is None and api_key is None:
        return False
    await _keys(request).authenticate_async(authorization, api_key, OPS_SCOPE)
    return True


# service.api.deps has the typed getters for routes, but it imports this module:
# these two read the same app.state attributes without the cycle.
def _keys(request: Request) -> KeyStore:
    return cast(KeyStore, request.app.state.keys)


def _settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)
