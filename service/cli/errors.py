"""How ``nbo`` ends when something goes wrong: one or two lines on stderr saying what is
wrong and what to do, and a non-zero exit status; never a traceback, unless asked for
with ``nbo --debug`` (or ``NBO_DEBUG=1``).

Exit status: 2 when the command was called wrongly (Click's usage errors: a bad option
or date, a missing file, an unknown product, version or key, an output that cannot be
written), 1 when it was called rightly but could not finish (too little data, a
rejected import, a changed model bundle, the database unreachable, a bug).

Commands raise :class:`~service.cli.context.UserError` where they know better words
than the exception's; everything else is explained here, once, by type.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from service.cli.context import UserError, err_console

DEBUG_HINT = "run again with --debug (or NBO_DEBUG=1) to see where it came from"


def _path(exc: OSError) -> str:
    return str(exc.filename) if exc.filename is not None else "(no path)"


def _loaded_class(module: str, name: str) -> type[BaseException] | None:
    """``module.name`` if that module is already imported: an exception of a class
    whose module was never imported cannot have been raised, so none is imported here."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def explain(exc: Exception) -> tuple[int, list[str]]:
    """The exit status and the lines that say what went wrong and what to do."""
    if isinstance(exc, UserError):
        return exc.code, [exc.message, *([exc.hint] if exc.hint else [])]
    if isinstance(exc, FileNotFoundError):
        return 2, [f"{_path(exc)}: no such file or folder", "check the path"]
    if isinstance(exc, IsADirectoryError):
        return 2, [f"{_path(exc)}: is a folder, where a file was expected", "give a file path"]
    if isinstance(exc, NotADirectoryError):
        return 2, [f"{_path(exc)}: part of this path is a file, not a folder", "check the path"]
    if isinstance(exc, PermissionError):
        return 2, [f"{_path(exc)}: permission denied", "give a path you can read or write"]
    if isinstance(exc, OSError):
        return 1, [f"{_path(exc)}: {exc.strerror or exc}", DEBUG_HINT]
    if isinstance(exc, ImportError):
        return 1, [
            f"a library nbo needs cannot be loaded: {exc}",
            "reinstall nbo with its dependencies (pip install -e .)",
        ]
    if isinstance(exc, MemoryError):
        return 1, ["out of memory", "free memory, or work on a smaller bank"]
    command_error = _loaded_class("alembic.util.exc", "CommandError")
    if command_error is not None and isinstance(exc, command_error):
        return 2, [
            f"migrations: {exc}",
            "`nbo db current` shows the database's revision; they are in migrations/versions",
        ]
    bundle_error = _loaded_class("models.artifacts", "BundleError")
    if bundle_error is not None and isinstance(exc, bundle_error):
        return 1, [
            f"model bundle: {exc}",
            "train a new version (nbo train) or promote another one (nbo models promote V)",
        ]
    database_error = _loaded_class("sqlalchemy.exc", "SQLAlchemyError")
    if database_error is not None and isinstance(exc, database_error):
        cause = getattr(exc, "orig", None) or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        behind = "no such table" in first or "does not exist" in first
        return 1, [
            f"database error: {first}",
            "the schema may be behind the code: nbo db upgrade"
            if behind
            else "check NBO_DATABASE_URL and that the database is up (nbo db current)",
        ]
    if isinstance(exc, ValueError):
        return 1, [str(exc), DEBUG_HINT]
    return 1, [
        f"unexpected error: {type(exc).__name__}: {exc}",
        "this is a bug in nbo: run again with --debug (or NBO_DEBUG=1) and report the traceback",
    ]


class NboGroup(TyperGroup):
    """The root ``nbo`` group: every command runs inside its :meth:`invoke`, so an
    error anywhere is explained by :func:`explain` instead of a traceback."""

    # ``ctx`` is Typer's vendored Click context, which Typer does not export by name.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort, BrokenPipeError):
            # Typer's own (usage errors: status 2; typer.Exit; Ctrl-C), and a closed pipe
            # (`nbo ... | head`), which Typer ends quietly.
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            code, lines = explain(exc)
            for line in lines:
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None
