"""Engines, sessions and migrations.

Migrations run under a lock (:func:`migration_lock`: an advisory lock on PostgreSQL, a
file lock on SQLite), so replicas that start together apply them once.

SQLite (the zero-setup default) is opened in WAL mode with foreign keys on and
``synchronous=FULL``, so a committed write survives a crash as it does on
PostgreSQL.

Every engine hides SQL parameters from its log lines and exceptions
(``hide_parameters``): a failing statement would otherwise write customer
attributes and key hashes into the log. PostgreSQL engines give up connecting
after ``db_connect_timeout_seconds``; the serving app's engine also bounds each
statement, each lock wait and each wait for a pooled connection, so an outage or
a stuck lock becomes a quick 503 rather than a hung request. Imports and
training (the CLI) run long statements on purpose and get no statement timeout.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.settings import Settings

if TYPE_CHECKING:
    # Alembic (with Mako and Pygments) is for migrating: 26 MiB and 0.5 s of every
    # serving worker's start-up when imported here, so each function imports it.
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
VERSION_TABLE = "alembic_version"
"""Where Alembic keeps the schema's revision (its default, which nbo keeps)."""

log = logging.getLogger("nbo.db")


DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0


class _NoResultRows(logging.Filter):
    """Drops SQLAlchemy's debug lines of result rows (``sqlalchemy.engine`` at DEBUG):
    they would carry customer attributes and key hashes, which ``hide_parameters``
    does not cover (it hides statement parameters only). Statements still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Row %r"


def _hide_result_rows() -> None:
    engine_log = logging.getLogger("sqlalchemy.engine.Engine")
    if not any(isinstance(f, _NoResultRows) for f in engine_log.filters):
        engine_log.addFilter(_NoResultRows())


def make_engine(
    url: str,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    statement_timeout: float | None = None,
    lock_timeout: float | None = None,
    **kwargs: Any,
) -> Engine:
    """Create an engine for ``url`` with nbo's connection settings applied.

    Parameters
    ----------
    url
        SQLAlchemy database URL.
    connect_timeout
        PostgreSQL: seconds to wait for a connection to open (libpq counts whole
        seconds, at least 2). SQLite opens files and waits on locks instead
        (``busy_timeout``, 30 s).
    statement_timeout, lock_timeout
        PostgreSQL: seconds any one statement may run, or wait for a lock, before
        the server cancels it; None for no limit (bulk imports, training).
    **kwargs
        Passed to :func:`sqlalchemy.create_engine` (e.g. ``pool_timeout``).
    """
    parsed = make_url(url)
    kwargs.setdefault("hide_parameters", True)
    _hide_result_rows()
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": max(2, math.ceil(connect_timeout))}
    options = [
        f"-c {name}={math.ceil(seconds * 1000)}"
        for name, seconds in (
            ("statement_timeout", statement_timeout),
            ("lock_timeout", lock_timeout),
        )
        if seconds
    ]
    if options:
        connect_args["options"] = " ".join(options)
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy frame transactions (pysqlite's own BEGIN handling is off),
    # so BEGIN IMMEDIATE below takes the write lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    # Writers take the write lock up front (BEGIN IMMEDIATE), waiting busy_timeout for it:
    # a deferred transaction that reads and then writes fails at once with "database is
    # locked" if another writer committed in between. Readers (read_only) stay deferred
    # so that they never block a writer in WAL mode.
    mode = connection.get_execution_options().get("nbo_begin", "IMMEDIATE")
    connection.exec_driver_sql(f"BEGIN {mode}")


def read_only(engine: Engine) -> Engine:
    """The same engine for reads: on SQLite its transactions do not take the write lock."""
    return engine.execution_options(nbo_begin="DEFERRED")


def one_core(conn: Connection) -> None:
    """Keep the rest of ``conn``'s transaction on one core (PostgreSQL; nothing on SQLite).

    For background reads in a worker that serves (a store's fingerprint, the business
    figures): PostgreSQL ran a count of a large table on three processes (two parallel
    workers beside the backend, at full priority), so at a million customers such a read
    took both cores of a machine serving at full load for a moment, and requests queued
    behind it (the p99 around an activation, ``bench/serve.py --activation``).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


def engine_from_settings(settings: Settings, *, serving: bool = False) -> Engine:
    """The engine for the configured database.

    ``serving``: the request-serving app's engine, whose statements, lock waits and
    waits for a pooled connection are bounded by the settings; otherwise (CLI imports,
    training, migrations) only connecting is.
    """
    if not serving:
        return make_engine(
            settings.resolved_database_url, connect_timeout=settings.db_connect_timeout_seconds
        )
    return make_engine(
        settings.resolved_database_url,
        connect_timeout=settings.db_connect_timeout_seconds,
        statement_timeout=settings.db_statement_timeout_seconds or None,
        lock_timeout=settings.db_lock_timeout_seconds or None,
        pool_timeout=settings.db_pool_timeout_seconds,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that do not expire objects on commit (they are read after)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """A session inside one transaction: committed on success, rolled back on error."""
    with session_factory(engine)() as session, session.begin():
        yield session


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at nbo's migrations and ``url``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    return config


MIGRATION_LOCK_KEY = 0x6E626F5F6D696772
"""Key of the PostgreSQL advisory lock migrations run under (``nbo_migr`` in ASCII)."""


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Hold nbo's migration lock for the database at ``url`` while inside.

    Replicas that start together each migrate before serving: the lock makes them take
    turns, so one applies the revisions and the others, once it lets go, find the
    schema at head and have nothing to do. The wait has no limit, as a migration may
    take long; it is logged. A process that dies holding the lock frees it.

    PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) on a connection of
    its own. SQLite: an exclusive ``flock`` on ``<database file>.migration-lock``;
    SQLite's own write lock is not enough, as Alembic reads the schema's revision and
    applies each migration in separate transactions there (without it, two processes
    upgrading one file both applied a revision, and one failed).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        with _advisory_lock(url):
            yield
    elif parsed.database and parsed.database != ":memory:":
        with _file_lock(Path(f"{parsed.database}.migration-lock")):
            yield
    else:
        yield


@contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    engine = make_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    key = {"key": MIGRATION_LOCK_KEY}
    try:
        with engine.connect() as connection:
            if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar():
                log.info("waiting for another process's migration to finish")
                connection.execute(text("SELECT pg_advisory_lock(:key)"), key)
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        engine.dispose()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl  # POSIX; the service runs on Linux

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's migration to finish")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield  # closing the descriptor releases the lock
    finally:
        os.close(descriptor)


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``, under :func:`migration_lock`: processes
    upgrading one database at once apply each revision once."""
    from alembic import command

    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` for an empty schema), under
    :func:`migration_lock`."""
    from alembic import command

    with migration_lock(url):
        command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    """The revision the code's migrations lead to (the schema this version expects)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:  # pragma: no cover - the repository ships its migrations
        raise RuntimeError("no migrations found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None when unmigrated.

    Read from Alembic's version table directly, as Alembic reads it: readiness asks
    this of every worker every few seconds, and a worker would otherwise import Alembic
    for it (26 MiB)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        found = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    if len(found) > 1:
        raise RuntimeError(f"the database is at {len(found)} schema revisions; expected one")
    return str(found[0][0]) if found else None


def warn_unless_at_head(url: str) -> None:
    """Log a warning when the database at ``url`` is not at :func:`head_revision` (or
    cannot be read): for a service started without migrating, which then serves
    anyway (not ready while the schema is missing) rather than refuse to start."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        current = current_revision(engine)
    except Exception as exc:  # noqa: BLE001 - only a warning: the service starts regardless
        log.warning(
            "database schema revision could not be read; serving without migrating",
            extra={"error": type(exc).__name__},
        )
        return
    finally:
        engine.dispose()
    head = head_revision()
    if current != head:
        log.warning(
            "database schema is not at this version's revision; serving without migrating "
            "(run `nbo db upgrade`)",
            extra={"revision": current, "expected": head},
        )


def has_schema(engine: Engine) -> bool:
    """Whether the nbo tables exist (the database has been upgraded)."""
    return inspect(engine).has_table("products")
