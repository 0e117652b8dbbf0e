"""Migrations: an empty database upgrades to the table definitions exactly and downgrades to nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.data import db
from service.data.tables import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    url: str = request.getfixturevalue("empty_postgres_url")
    return url


def _made_on(dialect: str) -> Any:
    """Alembic's ``include_object`` leaving out what the tables make only on another
    database (``Index(...).ddl_if(dialect=...)``), as ``create_all`` does."""

    def include(item: Any, name: Any, kind: str, reflected: bool, compare_to: Any) -> bool:
        condition = getattr(item, "_ddl_if", None)
        return condition is None or condition.dialect in (None, dialect)

    return include


def test_upgrade_matches_tables_then_downgrades_to_base(empty_url: str) -> None:
    db.upgrade(empty_url)
    engine = db.make_engine(empty_url)
    try:
        assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": _made_on(engine.dialect.name),
                },
            )
            drift = compare_metadata(context, Base.metadata)
        assert drift == [], f"migrations and service/data/tables.py disagree: {drift}"
        db.downgrade(empty_url, "base")
        leftover = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert leftover == set()
        # And back up again: downgrades leave a database that can be migrated anew.
        db.upgrade(empty_url)
        assert db.current_revision(engine) is not None
    finally:
        engine.dispose()


def test_current_revision_reads_what_alembic_reads(empty_url: str) -> None:
    """The revision readiness reports, read without Alembic: None on an empty database,
    Alembic's own answer at every step up and after a downgrade to base."""
    engine = db.make_engine(empty_url)

    def alembics() -> str | None:
        with engine.connect() as conn:
            found: str | None = MigrationContext.configure(conn).get_current_revision()
            return found

    try:
        assert db.current_revision(engine) is None
        db.upgrade(empty_url, "0001")
        assert db.current_revision(engine) == alembics() is not None
        db.upgrade(empty_url)
        assert db.current_revision(engine) == alembics() == db.head_revision()
        db.downgrade(empty_url, "base")
        assert db.current_revision(engine) == alembics() is None
    finally:
        engine.dispose()
