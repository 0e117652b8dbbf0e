"""Engines, sessions and migrations.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


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
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base`` for an empty schema)."""
    command.downgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None when unmigrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def has_schema(engine: Engine) -> bool:
    """Whether the nbo tables exist (the database has been upgraded)."""
    return inspect(engine).has_table("products")
