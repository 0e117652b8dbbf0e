"""The ``nbo`` command line: the app that mounts every command, and the commands that run
the service (``serve``, ``openapi``, and ``demo``, which goes from nothing to serving).

The other commands live by concern (``data``: schema, import, synthetic bank; ``models``:
train, evaluate, score, rules, registry) with the sub-apps ``keys``, ``report`` and
``simulate``; what they share is in ``context``. No command module imports this one.
How a command ends when something goes wrong is :mod:`service.cli.errors`.
"""

from __future__ import annotations

import inspect
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from service.cli.context import check_output, console, load_settings, open_session
from service.cli.data import db_app, db_upgrade, export, generate, import_app, import_bank_cmd
from service.cli.errors import NboGroup
from service.cli.keys import keys_app
from service.cli.models import evaluate, models_app, rules_app, score, train
from service.data import db
from service.reports.cli import report_app
from service.settings import Settings, export_workers
from service.simulation.cli import simulate_app

app = typer.Typer(
    name="nbo",
    cls=NboGroup,
    help="""nbo: next-best-offer recommendations for banks.

    A mistake is said in one or two lines on stderr, with a non-zero exit status: 2
    when the command was called wrongly (an option, a date, a missing file, an unknown
    product, version or key, an output that cannot be written), 1 when it could not
    finish (too little data, a rejected import, a changed model bundle, the database
    down). --debug (or NBO_DEBUG=1) adds the Python traceback.
    """,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_app, name="db")
app.add_typer(rules_app, name="rules")
app.add_typer(models_app, name="models")
app.add_typer(import_app, name="import")
app.add_typer(keys_app, name="keys")
app.add_typer(report_app, name="report")
app.add_typer(simulate_app, name="simulate")


@app.callback()
def options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="NBO_DEBUG",
            help="Show the Python traceback when a command fails.",
        ),
    ] = False,
) -> None:
    # Read by service.cli.errors.NboGroup from the context's parameters.
    del debug


def demo(
    customers: Annotated[int, typer.Option(min=100, help="Customers in the demo bank.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of the service started at the end.")
    ] = 8000,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the service at the end.")
    ] = True,
) -> None:
    """The main job: generate a bank, import it, train a model, and serve next best offers."""
    settings = load_settings()
    out = settings.data_dir / "demo-bank"
    console.rule("1. generate a synthetic bank")
    generate(
        customers=customers, seed=seed, out=out, fmt="csv", start="2019-01-01", end="2025-12-31"
    )
    console.rule(f"2. migrate the database ({settings.resolved_database_url})")
    db_upgrade("head")
    console.rule("3. import the bank")
    import_bank_cmd(out)
    console.rule("4. evaluate on a holdout, train, register the model version")
    train(as_of=None, horizon_days=90, truth=out, report=settings.data_dir / "evaluation.html")
    console.rule("5. an API key for a teller system, and the service")
    from service.auth import ROLES, create_key

    with open_session() as session:
        key = create_key(session, name="demo teller", scopes=list(ROLES["admin"]))
    curl = (
        f"curl -s -X POST http://127.0.0.1:{port}/v1/customers/C0000042/decisions "
        f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        '-d \'{"channel": "branch", "max_offers": 3, "explain": true}\''
    )
    console.print("[green]demo ready.[/green] Ask for the next best offers of customer C0000042:")
    print(curl, flush=True)
    console.print(
        f"(an admin key for the demo; report: {settings.data_dir / 'evaluation.html'}; "
        "Ctrl-C stops the service)"
    )
    if serve_after:
        serve(host="127.0.0.1", port=port, workers=1)


def uvicorn_options(settings: Settings, *, host: str, port: int, workers: int) -> dict[str, Any]:
    """The options ``nbo serve`` gives uvicorn (besides the app factory).

    Proxy headers (X-Forwarded-Proto, X-Forwarded-For) are trusted only from the
    addresses in ``settings.forwarded_allow_ips``, and not at all when it is empty:
    otherwise any client could claim to have come over HTTPS. Behind a TLS proxy
    they are what tells nbo the request was https (the dashboard's cookie is then
    ``Secure`` and its Origin check expects ``https://``).

    Logging is :func:`service.logs.log_config` (JSON lines, or text on a terminal, as
    ``settings.log_format`` says), applied by uvicorn in every worker; its own access
    log is off (nbo writes access lines by route template). On SIGTERM uvicorn waits
    ``settings.shutdown_timeout_seconds`` less a second for requests in flight.
    """
    from service.logs import log_config

    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "workers": workers,
        "log_config": log_config(settings.log_format, settings.log_level),
        "log_level": settings.log_level,
        "access_log": False,
        # A second of the deadline is kept for the lifespan's shutdown (the audit flush).
        "timeout_graceful_shutdown": max(1.0, settings.shutdown_timeout_seconds - 1.0),
        # A spawned worker imports the app before answering the supervisor's health
        # check; on a busy machine that took over uvicorn's default 5 s, and the worker
        # was killed and respawned in a loop.
        "timeout_worker_healthcheck": 60,
        # uvicorn trusts 127.0.0.1 by default: off unless configured.
        "proxy_headers": False,
    }
    if settings.forwarded_allow_ips:
        options["proxy_headers"] = True
        options["forwarded_allow_ips"] = list(settings.forwarded_allow_ips)
    return options


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate/--no-migrate",
            help=(
                "Migrate the database before serving (the default; replicas starting "
                "together take turns under a lock, and one migrates). --no-migrate when a "
                "separate step migrates (a Kubernetes Job or init container running "
                "`nbo db upgrade`): a schema behind this version is then logged as a "
                "warning, and the service starts anyway, not ready while there is no schema."
            ),
        ),
    ] = True,
) -> None:
    """Run the HTTP service (uvicorn) on the configured database, after migrating it.

    SIGTERM (or Ctrl-C) stops it gracefully: it stops accepting connections, answers the
    requests in flight, then stops the audit writer (every decision answered is in the
    database, or in the local spool if the database is down) and exits with status 0,
    within NBO_SHUTDOWN_TIMEOUT_SECONDS: a request still running then is cut off, and
    the audit writer gets a last second to spool what the database has not taken.
    With --workers N, SIGTERM to the parent stops every worker so.
    """
    import uvicorn

    settings = load_settings()
    if migrate:
        db.upgrade(settings.resolved_database_url)
    else:
        db.warn_unless_at_head(settings.resolved_database_url)
    export_workers(workers)
    metrics_dir: Path | None = None
    if workers > 1:  # one worker serves in-process and needs no shared metric files
        from service import metrics

        metrics_dir = Path(tempfile.mkdtemp(prefix="nbo-metrics-"))
        metrics.prepare_multiprocess(metrics_dir)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again with the handler it
    # found: exit normally (status 0) rather than be killed by the signal, which would
    # tell an orchestrator or a supervisor that the service failed.
    previous = signal.signal(signal.SIGTERM, _exit_normally)
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            **uvicorn_options(settings, host=host, port=port, workers=workers),
        )
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown (see :func:`serve`)."""


def _exit_normally(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def openapi(
    out: Annotated[Path, typer.Option(help="Where to write the spec.")] = Path("openapi.yaml"),
) -> None:
    """Write the OpenAPI spec the service serves (kept in the repository as openapi.yaml)."""
    from service.app import create_app
    from service.openapi import render_openapi

    check_output(out, "--out")
    out.write_text(render_openapi(create_app(Settings())))
    console.print(f"wrote {out}")


# Registered in this order, which is the order `nbo --help` lists them in.
for command in (generate, export, demo, train, evaluate, score, serve, openapi):
    app.command()(command)


def reflowed(text: str) -> str:
    """``text`` with each paragraph on one line, for the help screen to wrap at the
    terminal's width: Typer keeps a docstring's own line breaks after its first
    paragraph, which broke sentences in mid-line. A paragraph starting with ``\\b``
    (Click's mark for preformatted text) is kept as written."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Reflow the help of every command and group of ``typer_app``, where it was given
    (a docstring, or ``help=``); help left to Typer's defaults stays a default, so that
    which text Typer picks for a group does not change."""
    for command in typer_app.registered_commands:
        text = command.help if command.help is not None else inspect.getdoc(command.callback)
        if text:
            command.help = reflowed(text)
    if isinstance(typer_app.info.help, str):
        typer_app.info.help = reflowed(typer_app.info.help)
    callback = typer_app.registered_callback
    if callback is not None and isinstance(callback.help, str):
        callback.help = reflowed(callback.help)
    for group in typer_app.registered_groups:
        if isinstance(group.help, str):
            group.help = reflowed(group.help)
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def main() -> None:
    """Entry point of the ``nbo`` console script."""
    app()


if __name__ == "__main__":
    main()
