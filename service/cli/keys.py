"""``nbo keys``: create, list and revoke API keys.

A key is printed once, when it is created; the database keeps only its hash.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from service import auth
from service.cli.context import UserError, console, err_console, open_session

keys_app = typer.Typer(
    help="API keys: create (shown once), list, revoke. Only a hash of each key is stored.",
    no_args_is_help=True,
)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for, e.g. 'branch-app'.")],
    scopes: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated scopes: {', '.join(auth.SCOPES)}."),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(help=f"A preset of scopes instead: {', '.join(auth.ROLES)}."),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Print only the key.")] = False,
) -> None:
    """Create a key and print it on its own line; it cannot be shown again."""
    if (scopes is None) == (role is None):
        raise UserError(
            "give either --scopes or --role (not both)",
            hint=f"roles: {', '.join(auth.ROLES)}; scopes: {', '.join(auth.SCOPES)}",
        )
    try:
        granted = auth.resolve_scopes(scopes=(scopes or "").split(","), role=role)
    except ValueError as exc:
        raise UserError(
            str(exc), hint=f"roles: {', '.join(auth.ROLES)}; scopes: {', '.join(auth.SCOPES)}"
        ) from exc
    with open_session() as session:
        key = auth.create_key(session, name=name, scopes=granted)
    # Plain echo, not rich: the key must come out exactly, unwrapped and unstyled.
    typer.echo(key)
    if not quiet:
        err_console.print(
            f"key for '{name}' with scopes {', '.join(granted)}: "
            "store it now, it is shown only once.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@keys_app.command("list")
def keys_list() -> None:
    """List keys (prefix, name, scopes, dates); never their secrets."""
    with open_session() as session:
        keys = auth.list_keys(session)
    if not keys:
        console.print("no API keys yet")
        return
    table = Table()
    for column in ("prefix", "name", "scopes", "created", "revoked"):
        table.add_column(column)
    for key in keys:
        table.add_row(
            key.prefix,
            escape(key.name),
            ", ".join(key.scopes),
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `nbo keys list` shows.")],
) -> None:
    """Revoke a key; running services stop accepting it within their key cache TTL, and
    the dashboard sessions opened with it end at once."""
    try:
        with open_session() as session:
            info = auth.revoke_key(session, prefix=prefix)
    except auth.KeyNotFound as exc:
        raise UserError(exc.detail, hint="`nbo keys list` shows the keys' prefixes") from exc
    console.print(f"revoked {info.prefix} ({info.name})", markup=False, highlight=False)
