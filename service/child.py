"""Long background work of a serving worker, run in a child interpreter at low priority.

A worker that serves a large bank now and then has seconds to minutes of Python work
to do besides answering decisions: building a serving store, computing the business
figures. Done on one of its threads, that work takes turns with the requests for the
interpreter, and at a million customers it halved the decisions a worker answered for
as long as it ran (the figures: 18 s every five minutes). Run by :func:`run`, it takes
only the CPU the machine's workers leave (:data:`NICENESS`), and the memory of its
frames goes back to the system when it ends.

A fresh interpreter, not multiprocessing: "spawn" runs the parent's ``__main__`` again
in the child (a script without a main guard would wait on a lock for ever), and "fork"
copies a threaded worker's held locks. The settings travel on stdin, secrets included,
never on the command line; the result comes back as JSON in a file.

A child never outlives its worker's will to stop: :func:`stop_all` (called when the
worker is told to stop, see :mod:`service.app`) ends every child running and refuses new
ones, so SIGTERM during a start-up's store build stops the worker in a second rather than
after the build's minutes; and a child whose worker died (SIGKILL, a crash) sees itself
orphaned within :data:`ORPHAN_CHECK_SECONDS` and exits, rather than building for an hour
for nobody.
"""

from __future__ import annotations

import importlib
import logging
import logging.config
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from service.logs import log_config
from service.settings import Settings

CHILD_CUSTOMERS = 50_000
"""From this many customers a worker's long background work (a store build, the
business figures) runs in a child: below it, starting a child costs more than the work."""
NICENESS = 10
"""How much lower the child's CPU priority is than the worker's: it gets what the
workers answering decisions leave."""
TIMEOUT_SECONDS = 3600.0
ORPHAN_CHECK_SECONDS = 1.0
"""How often a child checks that the worker that started it is still its parent."""
STOP_GRACE_SECONDS = 2.0
"""After SIGTERM, how long :func:`stop_all` gives a child before SIGKILL."""
_CHILD = (
    f"import os, sys, json; os.nice({NICENESS}); payload = sys.stdin.buffer.read(); "
    "sys.path[:0] = json.loads(payload)['path']; "
    "from service.child import main; main(payload)"
)


class ChildFailed(RuntimeError):
    """The child process ended without a result (its error is on its standard error)."""


class ChildStopped(ChildFailed):
    """The worker is stopping (:func:`stop_all`): the child was ended, or not started."""


_running: set[subprocess.Popen[bytes]] = set()
_lock = threading.RLock()  # re-entrant: stop_all runs in a signal handler
_stopping = False


def stop_all() -> None:
    """End every child running (SIGTERM, SIGKILL after :data:`STOP_GRACE_SECONDS`) and
    refuse new ones: the worker is stopping. Their :func:`run` raises
    :class:`ChildStopped`. Returns at once (safe in a signal handler): the waiting is
    done by a thread."""
    global _stopping
    with _lock:
        _stopping = True
        children = list(_running)
    for process in children:
        if process.poll() is None:
            process.terminate()
    if children:
        threading.Thread(target=_kill_after_grace, args=(children,), daemon=True).start()


def _kill_after_grace(children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in children:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def stopping() -> bool:
    """Whether :func:`stop_all` was called: the worker is stopping."""
    return _stopping


def run(settings: Settings, target: str, **arguments: Any) -> Any:
    """``target(settings, **arguments)`` (``target`` named ``"module:function"``) called
    in a child interpreter at low priority; what it returned, through JSON.

    Raises
    ------
    ChildFailed
        When the child exits with an error or returns nothing.
    ChildStopped
        When :func:`stop_all` ended it, or was called before it started.
    subprocess.TimeoutExpired
        After :data:`TIMEOUT_SECONDS`.
    """
    values = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            values[name] = value.get_secret_value()
    with tempfile.TemporaryDirectory(prefix="nbo-child-") as scratch:
        result = Path(scratch) / "result.json"
        payload = orjson.dumps(
            {
                "path": [p for p in sys.path if p],
                "settings": values,
                "target": target,
                "arguments": arguments,
                "result": str(result),
                "parent": os.getpid(),
            }
        )
        process = _start()
        try:
            process.communicate(payload, timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            with _lock:
                _running.discard(process)
        if process.returncode != 0 or not result.exists():
            if _stopping:
                raise ChildStopped(f"{target} stopped in a child: the worker is stopping")
            raise ChildFailed(
                f"{target} failed in a child process (exit code {process.returncode})"
            )
        return orjson.loads(result.read_bytes())


def _start() -> subprocess.Popen[bytes]:
    """The child started and registered, unless the worker is stopping (under the lock,
    so that :func:`stop_all` either sees it or prevents it)."""
    with _lock:
        if _stopping:
            raise ChildStopped("no child process started: the worker is stopping")
        process = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE)
        _running.add(process)
        return process


def _exit_when_orphaned(parent: int) -> None:
    """The child's watch: once its worker is gone (the child was re-parented), exit."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_SECONDS)
    os._exit(1)


def main(payload: bytes) -> None:
    """The child's side of :func:`run`. Its log lines go to the standard error it shares
    with the worker, in the worker's format (JSON or text, as ``log_format`` decides):
    unconfigured, a warning came out as a bare traceback among the JSON lines."""
    order = orjson.loads(payload)
    threading.Thread(target=_exit_when_orphaned, args=(order["parent"],), daemon=True).start()
    settings = Settings(**order["settings"])
    logging.config.dictConfig(log_config(settings.log_format, settings.log_level))
    module, name = order["target"].split(":")
    function = getattr(importlib.import_module(module), name)
    returned = function(settings, **order["arguments"])
    Path(order["result"]).write_bytes(orjson.dumps(returned))
