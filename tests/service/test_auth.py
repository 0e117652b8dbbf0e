"""API keys: hashed storage, scopes, the cached key store, the CLI and the HTTP errors."""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select
from typer.testing import CliRunner

from service import auth
from service.auth import Forbidden, KeyStore, Principal, Unauthorized, require
from service.cli.main import app as nbo_app
from service.data.db import unit_of_work
from service.data.tables import ApiKey
from service.errors import PROBLEM_JSON, install_error_handlers

runner = CliRunner()


def new_key(engine: Engine, scopes: list[str], name: str = "branch-app") -> str:
    with unit_of_work(engine) as session:
        return auth.create_key(session, name=name, scopes=scopes)


def as_utc(moment: dt.datetime) -> dt.datetime:
    # SQLite hands back naive UTC; PostgreSQL an aware time in the session's zone.
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def prefix_of(key: str) -> str:
    return key.split("_")[1]


def test_key_authenticates_with_either_header(engine: Engine) -> None:
    key = new_key(engine, ["decisions", "outcomes"])
    assert key.startswith("nbo_") and len(prefix_of(key)) == 8
    store = KeyStore(engine)
    expected = Principal(
        name="branch-app", prefix=prefix_of(key), scopes=frozenset({"decisions", "outcomes"})
    )
    assert store.authenticate(f"Bearer {key}", None, "decisions") == expected
    assert store.authenticate(f"bearer  {key}", None, "outcomes") == expected
    assert store.authenticate(None, key, "outcomes") == expected
    assert store.authenticate(f"Bearer {key}", key, "decisions") == expected


def test_keys_are_unique_and_random(engine: Engine) -> None:
    keys = {new_key(engine, ["rules"]) for _ in range(20)}
    assert len(keys) == 20 and len({prefix_of(k) for k in keys}) == 20


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "detail"),
    [
        (None, None, "missing API key: send Authorization: Bearer <key>"),
        ("Bearer ", None, "malformed Authorization header"),
        ("Basic dXNlcjpwYXNz", None, "malformed Authorization header"),
        ("Bearer not-a-key", None, "malformed API key"),
        (None, "nbo_short_secret", "malformed API key"),
        (None, "", "missing API key"),
    ],
)
def test_missing_or_malformed_key_is_401(
    engine: Engine, authorization: str | None, x_api_key: str | None, detail: str
) -> None:
    with pytest.raises(Unauthorized) as caught:
        KeyStore(engine).authenticate(authorization, x_api_key, "decisions")
    assert caught.value.status == 401
    assert detail in caught.value.detail
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_wrong_secret_and_unknown_prefix_are_401(engine: Engine) -> None:
    key = new_key(engine, ["decisions"])
    store = KeyStore(engine)
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    unknown_prefix = "nbo_zzzzzzzz_" + key.split("_", 2)[2]
    for bad in (wrong_secret, unknown_prefix):
        with pytest.raises(Unauthorized, match="invalid API key"):
            store.authenticate(f"Bearer {bad}", None, "decisions")
    # The genuine key still works after the failures were cached.
    assert store.authenticate(f"Bearer {key}", None, "decisions").prefix == prefix_of(key)


def test_two_different_keys_in_two_headers_are_401(engine: Engine) -> None:
    one, two = new_key(engine, ["decisions"]), new_key(engine, ["decisions"])
    with pytest.raises(Unauthorized, match="different keys"):
        KeyStore(engine).authenticate(f"Bearer {one}", two, "decisions")


def test_missing_scope_is_403_and_admin_passes_every_scope(engine: Engine) -> None:
    teller = new_key(engine, auth.ROLES["teller"])
    admin = new_key(engine, auth.ROLES["admin"], name="ops")
    store = KeyStore(engine)
    with pytest.raises(Forbidden) as caught:
        store.authenticate(f"Bearer {teller}", None, "models")
    assert caught.value.status == 403
    assert caught.value.detail == "this key lacks scope 'models'"
    for scope in auth.SCOPES:
        assert store.authenticate(None, admin, scope).name == "ops"


def count_queries(engine: Engine) -> list[str]:
    """A list that grows by one statement per read of ``api_keys`` that ``engine`` runs."""
    statements: list[str] = []

    def record(*args: object) -> None:
        if "FROM api_keys" in str(args[2]):
            statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", record)
    return statements


def test_verified_requests_do_not_touch_the_database(engine: Engine) -> None:
    key = new_key(engine, ["models"])
    store = KeyStore(engine, ttl_seconds=60)
    queries = count_queries(engine)
    store.authenticate(f"Bearer {key}", None, "models")
    assert len(queries) == 1
    for _ in range(100):
        store.authenticate(f"Bearer {key}", None, "models")
        with pytest.raises(Forbidden):
            store.authenticate(None, key, "admin")
    assert len(queries) == 1


def test_unknown_prefixes_are_cached_briefly(engine: Engine) -> None:
    now = [0.0]
    store = KeyStore(engine, ttl_seconds=30, negative_ttl_seconds=2, clock=lambda: now[0])
    key = "nbo_abcdefgh_" + "x" * 43
    queries = count_queries(engine)
    for _ in range(50):
        with pytest.raises(Unauthorized, match="invalid API key"):
            store.authenticate(None, key, "models")
    assert len(queries) == 1
    now[0] = 2.5
    with pytest.raises(Unauthorized):
        store.authenticate(None, key, "models")
    assert len(queries) == 2


def test_store_is_safe_across_threads(engine: Engine) -> None:
    keys = [new_key(engine, ["decisions"], name=f"app-{i}") for i in range(4)]
    store = KeyStore(engine)

    def check(i: int) -> str:
        return store.authenticate(f"Bearer {keys[i % 4]}", None, "decisions").name

    with ThreadPoolExecutor(max_workers=8) as pool:
        names = list(pool.map(check, range(400)))
    assert names == [f"app-{i % 4}" for i in range(400)]


def test_cache_is_bounded(engine: Engine) -> None:
    keys = [new_key(engine, ["models"], name=f"app-{i}") for i in range(8)]
    store = KeyStore(engine, max_entries=5)
    for i in range(20):
        with pytest.raises(Unauthorized):
            store.authenticate(None, f"nbo_{i:08d}_" + "x" * 43, "models")
    for key in keys:
        store.authenticate(None, key, "models")
    assert len(store._entries) <= 5
    assert len(store._unknown) <= 5


def test_made_up_keys_never_push_out_a_known_key(engine: Engine) -> None:
    # The entry a database outage would serve from stays, however many unknown
    # prefixes arrive after it, all still fresh.
    key = new_key(engine, ["models"])
    store = KeyStore(engine, max_entries=5, ttl_seconds=60, negative_ttl_seconds=60)
    store.authenticate(None, key, "models")
    for i in range(50):
        with pytest.raises(Unauthorized):
            store.authenticate(None, f"nbo_{i:08d}_" + "x" * 43, "models")
    queries = count_queries(engine)
    assert store.authenticate(None, key, "models").scopes == {"models"}
    assert queries == []  # still held: answered from memory


def test_revocation_takes_effect_after_the_ttl(engine: Engine) -> None:
    key = new_key(engine, ["data"])
    store = KeyStore(engine, ttl_seconds=0.2)
    assert store.authenticate(None, key, "data").scopes == {"data"}
    with unit_of_work(engine) as session:
        info = auth.revoke_key(session, prefix=prefix_of(key))
    assert info.revoked
    # Within the TTL the cached entry still answers ...
    store.authenticate(None, key, "data")
    time.sleep(0.25)
    # ... after it, the key is refused.
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(None, key, "data")
    with unit_of_work(engine) as session:
        again = auth.revoke_key(session, prefix=prefix_of(key))
    assert again.revoked_at is not None and info.revoked_at is not None
    assert as_utc(again.revoked_at) == as_utc(info.revoked_at)  # revoking twice keeps the time


def test_invalidate_forgets_at_once(engine: Engine) -> None:
    key = new_key(engine, ["data"])
    store = KeyStore(engine)
    store.authenticate(None, key, "data")
    with unit_of_work(engine) as session:
        auth.revoke_key(session, prefix=prefix_of(key))
    store.invalidate(prefix_of(key))
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(None, key, "data")


def test_revoking_an_unknown_prefix_is_not_found(engine: Engine) -> None:
    with unit_of_work(engine) as session, pytest.raises(auth.KeyNotFound) as caught:
        auth.revoke_key(session, prefix="nosuchky")
    assert caught.value.status == 404


def test_storage_holds_a_hash_and_listings_hold_neither(engine: Engine) -> None:
    key = new_key(engine, ["reports", "rules"])
    secret = key.split("_", 2)[2]
    with unit_of_work(engine) as session:
        row = session.scalars(select(ApiKey)).one()
        assert row.prefix == prefix_of(key)
        assert row.secret_hash != key and secret not in row.secret_hash
        assert row.secret_hash == auth.hash_key(key) and len(row.secret_hash) == 64
        assert row.scopes == ["reports", "rules"]
        listed = auth.list_keys(session)
    assert [(k.prefix, k.name, k.scopes, k.revoked) for k in listed] == [
        (prefix_of(key), "branch-app", ("reports", "rules"), False)
    ]
    text = repr(listed)
    assert secret not in text and row.secret_hash not in text


def test_create_rejects_unknown_scopes_naming_them(engine: Engine) -> None:
    with unit_of_work(engine) as session:
        with pytest.raises(ValueError, match="'modles'"):
            auth.create_key(session, name="typo", scopes=["decisions", "modles"])
        with pytest.raises(ValueError, match="at least one scope"):
            auth.create_key(session, name="nothing", scopes=[])
        assert auth.list_keys(session) == []


def test_roles_and_scopes_are_consistent() -> None:
    assert set(auth.ROLES) == {"teller", "data-scientist", "integration", "admin"}
    for scopes in auth.ROLES.values():
        assert set(scopes) <= set(auth.SCOPES)
    assert auth.resolve_scopes(role="teller", scopes=["reports"]) == [
        "decisions",
        "outcomes",
        "reports",
    ]
    with pytest.raises(ValueError, match="'clerk'"):
        auth.resolve_scopes(role="clerk")
    with pytest.raises(ValueError, match="unknown scope"):
        require("everything")


def test_cli_create_list_revoke(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBO_DATABASE_URL", database_url)
    monkeypatch.setenv("NBO_DATA_DIR", str(tmp_path))

    created = runner.invoke(nbo_app, ["keys", "create", "--name", "branch-app", "--role", "teller"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("nbo_") and "\n" not in key
    assert "shown only once" in created.stderr

    quiet = runner.invoke(
        nbo_app, ["keys", "create", "--name", "etl", "--scopes", "data, reports", "--quiet"]
    )
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout.strip().startswith("nbo_") and quiet.stderr == ""

    for args, message in [
        (["create", "--name", "x"], "either --scopes or --role"),
        (["create", "--name", "x", "--scopes", "a", "--role", "teller"], "either"),
        (["create", "--name", "x", "--scopes", "decisions,modles"], "'modles'"),
        (["create", "--name", "x", "--role", "clerk"], "'clerk'"),
    ]:
        bad = runner.invoke(nbo_app, ["keys", *args])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output

    listed = runner.invoke(nbo_app, ["keys", "list"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert prefix_of(key) in listed.stdout and "branch-app" in listed.stdout
    assert "decisions, outcomes" in listed.stdout and "data, reports" in listed.stdout
    assert key.split("_", 2)[2] not in listed.output

    revoked = runner.invoke(nbo_app, ["keys", "revoke", prefix_of(key)])
    assert revoked.exit_code == 0 and f"revoked {prefix_of(key)}" in revoked.stdout
    missing = runner.invoke(nbo_app, ["keys", "revoke", "nosuchky"])
    assert missing.exit_code == 2 and "nosuchky" in missing.stderr

    from service.data.db import make_engine

    engine = make_engine(database_url)
    try:
        with pytest.raises(Unauthorized, match="revoked"):
            KeyStore(engine).authenticate(f"Bearer {key}", None, "decisions")
    finally:
        engine.dispose()


def test_http_errors_are_problems_with_a_bearer_challenge(engine: Engine) -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.state.keys = KeyStore(engine)

    @app.get("/v1/models")
    def models(principal: Annotated[Principal, Depends(require("models"))]) -> dict[str, str]:
        return {"caller": principal.name}

    scientist = new_key(engine, auth.ROLES["data-scientist"], name="lab")
    teller = new_key(engine, auth.ROLES["teller"])
    with TestClient(app) as client:
        ok = client.get("/v1/models", headers={"Authorization": f"Bearer {scientist}"})
        assert ok.status_code == 200 and ok.json() == {"caller": "lab"}
        assert client.get("/v1/models", headers={"X-API-Key": scientist}).status_code == 200

        missing = client.get("/v1/models")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == PROBLEM_JSON
        assert missing.headers["www-authenticate"].startswith("Bearer")
        body = missing.json()
        assert body["type"].endswith("/unauthorized") and body["status"] == 401
        assert body["detail"].startswith("missing API key: send Authorization: Bearer <key>")

        invalid = client.get("/v1/models", headers={"Authorization": "Bearer nbo_nope"})
        assert invalid.status_code == 401
        assert 'error="invalid_token"' in invalid.headers["www-authenticate"]

        forbidden = client.get("/v1/models", headers={"Authorization": f"Bearer {teller}"})
        assert forbidden.status_code == 403
        assert forbidden.headers["content-type"] == PROBLEM_JSON
        assert forbidden.json()["detail"] == "this key lacks scope 'models'"
        assert forbidden.json()["type"].endswith("/forbidden")

        spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearer"]["description"],
    }
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert spec["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}, {"apiKey": []}]
