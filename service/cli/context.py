"""What every ``nbo`` command shares: its settings, a ready database and the consoles.

The ``nbo`` app (``service.cli.main``) mounts the command modules and sub-apps (``keys``,
``report``, ``simulate``); they all take these from here, never from the app that mounts
them, so imports go one way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.data import db
from service.settings import Settings

console = Console()
err_console = Console(stderr=True)


def progress(*, counted: bool = True, remaining: bool = False) -> Progress:
    """A progress bar on stderr (so stdout stays the command's output), gone when done:
    the task's name, a bar, ``done/total`` when ``counted``, the time spent and, with
    ``remaining``, the time left."""
    columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn()]
    if counted:
        columns.append(MofNCompleteColumn())
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=err_console, transient=True)


def load_settings() -> Settings:
    """The settings of this run, read when a command runs (not at import), so the
    ``NBO_*`` environment the caller gives is the one the command works on."""
    return Settings()


def ready_engine(settings: Settings) -> Engine:
    """The engine of the configured database, migrated first if it has no schema yet."""
    engine = db.engine_from_settings(settings)
    if not db.has_schema(engine):
        # Migrations are cheap and idempotent; a fresh SQLite file needs them before anything else.
        db.upgrade(settings.resolved_database_url)
    return engine


@contextmanager
def open_engine() -> Iterator[Engine]:
    """A ready engine for one command, disposed when the command is done with it."""
    engine = ready_engine(load_settings())
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def open_session() -> Iterator[Session]:
    """A session on a ready engine, in one transaction: committed on success, rolled back
    on error."""
    with open_engine() as engine, db.unit_of_work(engine) as session:
        yield session
