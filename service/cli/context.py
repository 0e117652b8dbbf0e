"""What every ``nbo`` command shares: its settings, a ready database and the consoles.

The ``nbo`` app (``service.cli.main``) mounts the command modules and sub-apps (``keys``,
``report``, ``simulate``); they all take these from here, never from the app that mounts
them, so imports go one way.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


class UserError(Exception):
    """A mistake the user can put right, said in one or two lines and never with a
    traceback (``nbo --debug`` shows it anyway).

    ``code`` is the exit status, by the rule ``nbo --help`` states: 2 when the command
    was called wrongly (an option, a path, a product, version or key that does not
    exist), 1 when it was called rightly but cannot finish (too little data, a
    rejected file, a changed model bundle).
    """

    def __init__(self, message: str, *, hint: str | None = None, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def check_output(path: Path, option: str, *, folder: bool = False) -> Path:
    """``path``, once it is known that a file (or with ``folder``, a folder) can be
    written there: checked before a long job, so that it does not fail at the end.

    Raises
    ------
    UserError
        The path is a folder where a file is asked for (or the reverse), lies under a
        file, or is in a folder this user cannot write in.
    """
    what = "folder" if folder else "file"
    if path.exists():
        if folder != path.is_dir():
            kind = "a folder" if path.is_dir() else "a file"
            raise UserError(f"{option} {path}: is {kind}, not a {what}", hint=f"give a {what} path")
        if not os.access(path, os.W_OK):
            raise UserError(f"{option} {path}: not writable", hint="give a path you can write to")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(
            f"{option} {path}: cannot be created, {parent} is a file", hint=f"give a {what} path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{option} {path}: cannot write in {parent}", hint="give a path you can write to"
        )
    return path


def replacing(path: Path) -> str | None:
    """What writing ``path`` will replace, to say after writing it (a file is never
    replaced silently): ``"replaced the earlier file, written YYYY-MM-DD HH:MM"``, or
    None when there is none."""
    if not path.is_file():
        return None
    written = dt.datetime.fromtimestamp(path.stat().st_mtime)
    return f"replaced the earlier file, written {written:%Y-%m-%d %H:%M}"


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
