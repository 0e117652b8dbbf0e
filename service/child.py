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
"""

from __future__ import annotations

import importlib
import logging
import logging.config
import subprocess
import sys
import tempfile
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
_CHILD = (
    f"import os, sys, json; os.nice({NICENESS}); payload = sys.stdin.buffer.read(); "
    "sys.path[:0] = json.loads(payload)['path']; "
    "from service.child import main; main(payload)"
)


class ChildFailed(RuntimeError):
    """The child process ended without a result (its error is on its standard error)."""


def run(settings: Settings, target: str, **arguments: Any) -> Any:
    """``target(settings, **arguments)`` (``target`` named ``"module:function"``) called
    in a child interpreter at low priority; what it returned, through JSON.

    Raises
    ------
    ChildFailed
        When the child exits with an error or returns nothing.
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
            }
        )
        done = subprocess.run(
            [sys.executable, "-c", _CHILD], input=payload, check=False, timeout=TIMEOUT_SECONDS
        )
        if done.returncode != 0 or not result.exists():
            raise ChildFailed(f"{target} failed in a child process (exit code {done.returncode})")
        return orjson.loads(result.read_bytes())


def main(payload: bytes) -> None:
    """The child's side of :func:`run`. Its log lines go to the standard error it shares
    with the worker, in the worker's format (JSON or text, as ``log_format`` decides):
    unconfigured, a warning came out as a bare traceback among the JSON lines."""
    order = orjson.loads(payload)
    settings = Settings(**order["settings"])
    logging.config.dictConfig(log_config(settings.log_format, settings.log_level))
    module, name = order["target"].split(":")
    function = getattr(importlib.import_module(module), name)
    returned = function(settings, **order["arguments"])
    Path(order["result"]).write_bytes(orjson.dumps(returned))
