"""nbo's Prometheus metrics: every metric object, the HTTP middleware and ``/metrics``.

All metrics live here, named ``nbo_<subsystem>_<name>_<unit>`` and labelled by
route template, product, channel, outcome and the like; never by customer or
offer id, nor by a raw URL path, so the number of series stays bounded.

Multiprocess mode
-----------------
With several uvicorn workers each process counts on its own, and a scrape
reaches only one of them. prometheus_client then keeps every value in
memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` and the scraped worker
sums them all. The variable must be set before prometheus_client is imported
in a worker, so ``nbo serve`` calls :func:`prepare_multiprocess` in the parent
before uvicorn spawns the workers (which inherit the environment).
:func:`render_metrics` reads those files whenever this process writes to them.

Counters and histograms of dead workers stay in the sum (a counter must not go
down). Per-worker state (the model version served and its as-of day, memory, open
files, database connections) cannot live in those files: prometheus_client can
neither drop a series from them nor tell a stopped worker's last value from a live
one's. Each worker instead keeps a small JSON file ``worker-<pid>.json`` in the same
folder (rewritten atomically when its model or pool changes, checked at every change
poll), and the scraped worker reads the files of the workers still alive, with each
one's memory and open files from ``/proc/<pid>`` (Linux; elsewhere only its own open
files are known), into gauges labelled ``pid``. A worker that stops calls
:func:`mark_worker_dead` on its way out (from the app lifespan's exit), which
deletes its file; the file of a worker that crashed is ignored (and deleted) once its
process is gone. In a single process the same gauges describe that process and have
no ``pid`` label.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import fastapi.routing
from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from service.settings import Settings

log = logging.getLogger("nbo.metrics")

# FastAPI >= 0.165 keeps an included router as one route; the routes inside it
# hold their path without the include prefix, and its RouteContexts the full
# one. Older FastAPI copies included routes, full path and all, into app.routes.
_ITER_ROUTE_CONTEXTS: Final[Callable[[Any], Iterable[Any]] | None] = getattr(
    fastapi.routing, "iter_route_contexts", None
)

MULTIPROC_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

UNMATCHED_ROUTE: Final = "unmatched"
"""The ``route`` label of a request no route matched (an unknown path)."""

DecisionResult = Literal["normal", "control", "degraded", "empty", "cold_start"]
"""Values of the ``result`` label of :data:`DECISIONS`."""

DecisionStage = Literal["lookup", "scoring", "policy", "record"]
"""Values of the ``stage`` label of :data:`DECISION_STAGE_SECONDS`."""

ModelLoadResult = Literal["success", "failure"]
"""Values of the ``result`` label of :data:`MODEL_LOADS`."""

"""Values of the ``kind`` label of :data:`FEEDBACK`."""

# --- HTTP --------------------------------------------------------------------

HTTP_REQUEST_SECONDS = Histogram(
    "nbo_http_request_duration_seconds",
    "Time from receiving an HTTP request to sending the end of its response, for every "
    "response (errors and 5xx included; an unhandled exception counts as status 500). "
    'route is the route template, or "unmatched" when no route matched the path.',
    ["method", "route", "status"],
    # A decision takes a few milliseconds; the upper buckets catch stalls.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

AUTH_STALE_KEYS = Counter(
    "nbo_auth_stale_keys_total",
    "Times an API key was vouched for by its last good entry in memory because the "
    "database could not be read to re-check it (an outage).",
)

# --- Decisions ---------------------------------------------------------------

DECISIONS = Counter(
    "nbo_decisions_total",
    "Decisions served, by channel and result (normal, control, degraded, empty, cold_start; "
    "failed: neither recorded nor answered).",
    ["channel", "result"],
)
OFFERS = Counter(
    "nbo_offers_total",
    "Offers made in decisions, by product.",
    ["product"],
)
OUTCOMES = Counter(
    "nbo_offer_outcomes_total",
    "Outcomes reported for offers, by product and outcome.",
    ["product", "outcome"],
)
DECISION_STAGE_SECONDS = Histogram(
    "nbo_decision_stage_seconds",
    "Time spent in each stage of a decision (lookup, scoring, policy, record).",
    ["stage"],
    # Scoring one customer takes tens of microseconds: start the buckets at 10 µs.
    buckets=(
        0.00001,
        0.000025,
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
    ),
)

# --- Models ------------------------------------------------------------------

MODEL_LOADS = Counter(
    "nbo_model_loads_total",
    "Attempts to load a model version, by result (success, failure).",
    ["result"],
)
ROWS_SKIPPED = Counter(
    "nbo_rows_skipped_total",
    "Stored rows (or fields of a row) a reader could not use and skipped or read as "
    "unknown, by reader (snapshot, training, scoring, customer, report) and reason "
    "(see service.data.rows.SkipReason).",
    ["reader", "reason"],
)
SNAPSHOT_RELOAD_FAILURES = Counter(
    "nbo_snapshot_reload_failures_total",
    "Failed attempts to build the serving snapshot or re-read customers; the previous "
    "snapshot (or customer entry) keeps serving and the work is retried. By what "
    "(snapshot, customers).",
    ["what"],
)
SNAPSHOT_LOAD_SECONDS = Histogram(
    "nbo_snapshot_load_duration_seconds",
    "Time to build the serving snapshot (the active model, the bank, every customer "
    "scored) and swap it in, for each load that succeeded: at start-up and whenever a "
    "model version is activated or the catalogue changes.",
    # A small bank loads in a second, a large one in minutes.
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)

# --- Audit -------------------------------------------------------------------

AUDIT_BATCH_ROWS = Histogram(
    "nbo_audit_commit_rows",
    "Audit rows written per group commit.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
AUDIT_COMMIT_SECONDS = Histogram(
    "nbo_audit_commit_duration_seconds",
    "Time to write and commit one group of audit rows.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
AUDIT_DEAD_LETTERS = Counter(
    "nbo_audit_dead_letters_total",
    "Spooled audit records moved to the dead-letter file, by reason (torn_tail, bad_frame, "
    "bad_checksum, bad_json, bad_record, rejected).",
    ["reason"],
)

# --- Feedback and business ---------------------------------------------------

FEEDBACK = Counter(
    "nbo_feedback_total",
    "Customer feedback received, by kind (nps, csat).",
    ["kind"],
)
# Set by a reporting job. "mostrecent": one value, whichever process wrote it
# last, kept after that process exits (it is a report, not process state).
CONVERSION = Gauge(
    "nbo_conversion_ratio",
    "Share of offers that converted, by product and channel, over the reporting window.",
    ["product", "channel"],
    multiprocess_mode="mostrecent",
)
NPS = Gauge(
    "nbo_nps_score",
    "Net promoter score (-100 to 100), by branch, over the reporting window. Branches "
    "are the configured known_branches (else those with most customers); every other "
    'branch is pooled under "other", so callers cannot grow the series.',
    ["branch"],
    multiprocess_mode="mostrecent",
)
UPLIFT_CONVERSION = Gauge(
    "nbo_uplift_conversion_ratio",
    "Share of the customers first contacted in the last 7 days (cold starts excluded) "
    "who adopted a product they did not hold, from that contact up to now, by arm: "
    "treated (model offers) or control (the control group).",
    ["arm"],
    multiprocess_mode="mostrecent",
)
_nps_branches: set[str] = set()
_uplift_arms: set[str] = set()


def set_business_figures(conversion: dict[tuple[str, str], float], nps: dict[str, float]) -> None:
    """Publish the rolling conversion (by product and channel) and NPS (by branch)."""
    for (product, channel), rate in conversion.items():
        CONVERSION.labels(product, channel).set(rate)
    for branch, score in nps.items():
        NPS.labels(branch).set(score)
    # A branch without answers in the window any more drops out; multiprocess files
    # cannot drop a series, and there the last value stays (the labels stay bounded).
    if not is_multiprocess():
        for gone in _nps_branches - nps.keys():
            NPS.remove(gone)
    _nps_branches.clear()
    _nps_branches.update(nps)


def set_uplift_figures(rates: Mapping[str, float]) -> None:
    """Publish the rolling adoption rate of each arm (``treated``, ``control``).

    An arm without contacted customers in the window drops out (in multiprocess mode
    its last value stays, as for NPS).
    """
    for arm, rate in rates.items():
        UPLIFT_CONVERSION.labels(arm).set(rate)
    if not is_multiprocess():
        for gone in _uplift_arms - rates.keys():
            UPLIFT_CONVERSION.remove(gone)
    _uplift_arms.clear()
    _uplift_arms.update(rates)


# --- Per-worker state --------------------------------------------------------

WORKER_FILE_GLOB: Final = "worker-*.json"
"""The per-worker state files in the multiprocess folder (see the module docstring)."""

UNKNOWN: Final = "unknown"
"""A label of ``nbo_build_info`` that is not known (no build commit configured, nbo
not installed as a package)."""


@dataclass
class _Worker:
    """What this process reports about itself (guarded by :data:`_worker_lock`)."""

    version: str | None = None
    as_of: float | None = None
    """POSIX time of the served model's as-of day (midnight UTC)."""
    folder: Path | None = None
    """The multiprocess folder its state file goes to (multiprocess mode only)."""
    engine: weakref.ref[Engine] | None = None
    spool: Callable[[], tuple[int, int]] | None = None
    held: Callable[[], tuple[int, int]] | None = None
    """(customers in the contact history, customers in the snapshot's overlay)."""
    build_commit: str | None = None
    stopped: bool = False
    """Marked dead: its state file is not written again."""
    written: bytes | None = None
    """The state file's content as last written, so an unchanged state is not rewritten."""


_worker = _Worker()
_worker_lock = threading.Lock()


def set_active_model(version: str | None, as_of: dt.date | None = None) -> None:
    """Report ``version`` as the model version this process serves, trained up to ``as_of``.

    ``nbo_model_active_info{version}`` is then 1 for ``version`` only, and the
    model's as-of and age gauges follow ``as_of``; ``None`` reports no model (the
    three disappear). Without ``as_of`` (a caller that knows only the version) the
    as-of reported before for the same version is kept, and for another version none
    is reported. Safe from any thread.
    """
    with _worker_lock:
        if as_of is not None:
            _worker.as_of = _posix_day(as_of)
        elif version is None or version != _worker.version:
            _worker.as_of = None
        _worker.version = version
        _publish_worker()


def watch_worker(
    settings: Settings,
    engine: Engine | None = None,
    *,
    spool: Callable[[], tuple[int, int]] | None = None,
    held: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Tell the metrics which serving worker this process is.

    ``engine``'s pool is counted by ``nbo_worker_db_connections`` (held weakly);
    ``spool`` gives ``(records waiting, dead letters)`` of the audit spool at each
    scrape (see :func:`service.decision.spool.record_counts`); ``held`` gives the
    customers the worker holds in memory beside its mapped serving store (its contact
    history, its snapshot's overlay); ``settings`` give the
    build commit for ``nbo_build_info`` and, in multiprocess mode, the folder this
    worker's state file goes to (written at once). Idempotent: the app calls it at
    each start-up load.
    """
    with _worker_lock:
        _worker.spool = spool
        _worker.held = held
        _worker.engine = None if engine is None else weakref.ref(engine)
        _worker.build_commit = settings.build_commit
        _worker.folder = settings.prometheus_multiproc_dir
        _worker.stopped = False
        _publish_worker()


def refresh_worker() -> None:
    """Rewrite this worker's state file if its database pool changed (multiprocess mode;
    the app calls it at every change poll, so another worker's scrape lags by at most
    one poll interval)."""
    with _worker_lock:
        _publish_worker()


def _publish_worker() -> None:
    """Write this worker's state file when it changed (caller holds the lock).

    Never raises: the model swap that calls it must not fail for its metrics.
    """
    folder = _worker.folder
    if folder is None or _worker.stopped or not is_multiprocess():
        return
    pid = os.getpid()
    state = {
        "pid": pid,
        "started": _start_ticks(pid),
        "version": _worker.version,
        "as_of": _worker.as_of,
        "db_connections": _db_connections(),
        "held": _held(),
    }
    content = json.dumps(state, sort_keys=True).encode()
    if content == _worker.written:
        return
    temporary = folder / f".worker-{pid}.json.tmp"
    try:
        temporary.write_bytes(content)
        os.replace(temporary, folder / f"worker-{pid}.json")  # readers see it whole
    except OSError:
        log.warning("worker metrics state could not be written", exc_info=True)
        return
    _worker.written = content


def _db_connections() -> int | None:
    """Connections this worker's pool holds open, idle or lent out (None: not a
    counting pool, or no engine watched)."""
    engine = None if _worker.engine is None else _worker.engine()
    if engine is None:
        return None
    pool: Any = engine.pool
    try:
        return int(pool.checkedin()) + int(pool.checkedout())
    except AttributeError:  # NullPool, StaticPool: nothing to count
        return None


def _held() -> tuple[int, int] | None:
    """What the watched worker holds in memory (None: nothing watched, or unreadable)."""
    held = _worker.held
    if held is None:
        return None
    try:
        contacts, overlay = held()
    except Exception:  # noqa: BLE001 - a gauge must never fail the poll or the scrape
        log.warning("held customers could not be counted", exc_info=True)
        return None
    return int(contacts), int(overlay)


def _posix_day(day: dt.date) -> float:
    """POSIX seconds of midnight UTC starting ``day`` (a datetime: its day)."""
    if isinstance(day, dt.datetime):
        day = day.date()
    return dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC).timestamp()


# --- Process facts from /proc (Linux) -----------------------------------------


def _proc_status(pid: int) -> dict[str, str] | None:
    """``/proc/<pid>/status`` as a dict, None when unreadable (gone, not Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = (line.partition(":") for line in text.splitlines())
    return {key: value.strip() for key, _, value in fields}


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), to tell it from a later
    process given the same pid; None where ``/proc`` is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields after its ")".
    try:
        return int(stat.rpartition(")")[2].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is the live (not zombie) process that wrote a state file."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, under another user
    status = _proc_status(pid)
    if status is not None and status.get("State", "").startswith("Z"):
        return False
    return started is None or _start_ticks(pid) in (started, None)


def _resident_bytes(pid: int) -> float | None:
    """Resident memory of ``pid`` (``VmRSS``), None where it cannot be read."""
    status = _proc_status(pid)
    rss = None if status is None else status.get("VmRSS")
    if not rss:
        return None
    amount, _, unit = rss.partition(" ")
    return float(amount) * (1024 if unit.lower() == "kb" else 1)


def _open_fds(pid: int) -> float | None:
    """File descriptors ``pid`` holds open, None where they cannot be listed."""
    folders = [Path(f"/proc/{pid}/fd")]
    if pid == os.getpid():
        folders.append(Path("/dev/fd"))  # macOS and the BSDs: this process only
    for folder in folders:
        try:
            return float(len(os.listdir(folder)))
        except OSError:
            continue
    return None


# --- Scrape-time collector ----------------------------------------------------


@dataclass(frozen=True)
class _WorkerFacts:
    pid: str | None
    """The ``pid`` label (multiprocess mode), None in a single process."""
    version: str | None
    as_of: float | None
    db_connections: float | None
    resident_bytes: float | None
    open_fds: float | None
    held: tuple[int, int] | None = None


def _build_version() -> str:
    try:
        return importlib.metadata.version("nbo")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


class _StateCollector(Collector):
    """The gauges computed when scraped: build, per-worker state, audit spool.

    Registered in the default registry for a single process, and added to the
    multiprocess registry by :func:`render_metrics`.
    """

    def __init__(self) -> None:
        self._version = _build_version()

    def describe(self) -> Iterable[Metric]:
        # Names only (no state read): lets the registry check for clashes.
        return list(self._families(pid_label=False))

    def collect(self) -> Iterable[Metric]:
        multiproc = is_multiprocess()
        workers: list[_WorkerFacts] = []
        with _worker_lock:
            folder = _worker.folder
            commit = _worker.build_commit or UNKNOWN
            spool = _worker.spool
            if multiproc:
                _publish_worker()  # this worker's own file, fresh
            else:
                pid = os.getpid()
                held = _db_connections()
                workers.append(
                    _WorkerFacts(
                        None,
                        _worker.version,
                        _worker.as_of,
                        None if held is None else float(held),
                        _resident_bytes(pid),
                        _open_fds(pid),
                        _held(),
                    )
                )
        if multiproc and folder is not None:
            workers = _read_workers(folder)
        families = self._families(pid_label=multiproc)
        build, info, as_of, age, rss, fds, connections, contacts, overlay, backlog, dead = families
        build.add_metric([self._version, commit, platform.python_version()], 1.0)
        now = time.time()
        for worker in workers:
            labels = [] if worker.pid is None else [worker.pid]
            if worker.version is not None:
                info.add_metric([worker.version, *labels], 1.0)
                if worker.as_of is not None:
                    as_of.add_metric(labels, worker.as_of)
                    age.add_metric(labels, now - worker.as_of)
            for family, value in (
                (rss, worker.resident_bytes),
                (fds, worker.open_fds),
                (connections, worker.db_connections),
            ):
                if value is not None:
                    family.add_metric(labels, value)
            if worker.held is not None:
                contacts.add_metric(labels, float(worker.held[0]))
                overlay.add_metric(labels, float(worker.held[1]))
        if spool is not None:
            try:
                waiting, dead_letters = spool()
            except OSError:
                log.warning("audit spool could not be counted", exc_info=True)
            else:
                backlog.add_metric([], float(waiting))
                dead.add_metric([], float(dead_letters))
        return families

    @staticmethod
    def _families(*, pid_label: bool) -> list[GaugeMetricFamily]:
        pid = ["pid"] if pid_label else []
        return [
            GaugeMetricFamily(
                "nbo_build_info",
                "1, labelled with the installed nbo version, the source commit it was built "
                'from ("unknown" when not configured) and the Python version.',
                labels=["version", "commit", "python"],
            ),
            GaugeMetricFamily(
                "nbo_model_active_info",
                "1 for the model version each worker serves (pid label with several "
                "workers); absent while a worker serves no model.",
                labels=["version", *pid],
            ),
            GaugeMetricFamily(
                "nbo_model_as_of_timestamp_seconds",
                "The served model's as-of day (its training cutoff: it saw only data "
                "before it), as Unix time of midnight UTC.",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_model_age_seconds",
                "Seconds from the served model's as-of day (midnight UTC) to the scrape.",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_worker_resident_memory_bytes",
                "Resident memory of each worker process (Linux only: absent elsewhere).",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_worker_open_fds",
                "File descriptors each worker process holds open (sockets included).",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_worker_db_connections",
                "Database connections each worker's connection pool holds open, idle or "
                "in use (the PostgreSQL audit writer's own commit connections, at most "
                "audit_commit_lanes, are not counted).",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_worker_contact_history_customers",
                "Customers each worker holds a contact history of (offers, declines and "
                "detractor answers inside the longest contact-policy window): what its "
                "memory grows with under load, a few hundred bytes a customer.",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_worker_overlay_customers",
                "Customers each worker has re-read since its serving store was built "
                "(changed since, or new), held as objects over the mapped store; at most "
                "50,000.",
                labels=pid,
            ),
            GaugeMetricFamily(
                "nbo_audit_spool_backlog_records",
                "Acknowledged decisions waiting in the local audit spool (of every worker) "
                "for the database; 0 when the database keeps up.",
            ),
            GaugeMetricFamily(
                "nbo_audit_dead_letter_records",
                "Records in the audit spool's dead-letter file: unreadable or refused by "
                "the database, kept for a person to look at.",
            ),
        ]


def _read_workers(folder: Path) -> list[_WorkerFacts]:
    """The state of every live worker, from the state files in ``folder``; the files of
    workers that are gone are deleted."""
    found = []
    for path in sorted(folder.glob(WORKER_FILE_GLOB)):
        try:
            state = json.loads(path.read_bytes())
            pid = int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # deleted meanwhile, or not ours
        if not _alive(pid, state.get("started")):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        connections = state.get("db_connections")
        held = state.get("held")
        found.append(
            _WorkerFacts(
                str(pid),
                state.get("version"),
                state.get("as_of"),
                None if connections is None else float(connections),
                _resident_bytes(pid),
                _open_fds(pid),
                _pair(held),
            )
        )
    return found


def _pair(value: Any) -> tuple[int, int] | None:
    """Two counts as a state file stores them, None when it holds anything else."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return value[0], value[1]
    return None


_STATE_COLLECTOR: Final = _StateCollector()
REGISTRY.register(_STATE_COLLECTOR)


# --- Multiprocess ------------------------------------------------------------


def is_multiprocess() -> bool:
    """Whether this process keeps its metric values in multiprocess files.

    prometheus_client decides once, when first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``. Asking it rather than the environment gives
    the truth even when the variable was set after the import (in a process
    that called :func:`prepare_multiprocess` and then served in-process).
    """
    return values.ValueClass is not values.MutexValue


def prepare_multiprocess(directory: Path) -> None:
    """Make ``directory`` the multiprocess metrics directory of the workers to come.

    Creates ``directory``, deletes the ``*.db`` and worker state files an earlier run
    left in it (stale counters would otherwise be added to the new ones) and sets
    ``PROMETHEUS_MULTIPROC_DIR``. Call it in the parent process before uvicorn
    starts more than one worker; the workers inherit the variable and import
    prometheus_client after it is set. It does not switch the calling process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.db", WORKER_FILE_GLOB):
        for stale in directory.glob(pattern):
            stale.unlink()
    # The one sanctioned write to os.environ besides settings.py: prometheus_client
    # reads only this variable, in each worker at import time. The workers' Settings
    # read it back (prometheus_multiproc_dir).
    os.environ[MULTIPROC_DIR_ENV] = str(directory.resolve())


def mark_worker_dead(pid: int | None = None) -> None:
    """Stop reporting the per-worker gauges of worker ``pid`` (default: this process).

    Deletes its state file (so its model version, memory and so on are no longer
    reported; this process's own file is not written again until
    :func:`watch_worker`); its counters and histograms stay in the sums. Call it from
    a worker shutting down (the app lifespan's exit) or from a supervisor that saw
    ``pid`` exit. A no-op outside multiprocess mode.
    """
    if not is_multiprocess():
        return
    pid = os.getpid() if pid is None else pid
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    with _worker_lock:
        if pid == os.getpid():
            _worker.stopped = True
            _worker.written = None
        folder = _worker.folder
    if folder is not None:
        with contextlib.suppress(FileNotFoundError):
            (folder / f"worker-{pid}.json").unlink()


def render_metrics() -> tuple[bytes, str]:
    """The metrics in the Prometheus text format: ``(body, content type)``.

    In multiprocess mode the values of every worker, read from the multiprocess
    directory and merged, with the per-worker gauges of each live worker; otherwise
    this process's default registry.
    """
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(_STATE_COLLECTOR)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# --- HTTP middleware ---------------------------------------------------------

_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class _RouteTemplates:
    """Finds the full route template of a request after routing.

    Starlette leaves the matched route object in ``scope["route"]``. Its own
    path lacks the prefixes of the routers that include it (FastAPI >= 0.165
    no longer copies included routes), so the full templates come from
    FastAPI's route contexts, indexed by the route object they wrap. The index
    is built once per router and rebuilt when the router's routes change; it is
    keyed by route, never by path, so it stays as small as the route table.
    """

    def __init__(self) -> None:
        self._router: Any = None
        self._route_count = -1
        # id(route) -> (route, its full templates, each with the object that matches
        # it). The route is kept so that its id cannot pass to another object.
        self._index: dict[int, tuple[BaseRoute, list[tuple[str, Any]]]] = {}

    def template(self, scope: Scope, path: str, root_path: str) -> str:
        """The route template of the routed request ``scope``, or ``"unmatched"``.

        ``path`` and ``root_path`` are the request's, taken before routing
        (a mount rewrites ``root_path`` in ``scope``).
        """
        route = scope.get("route")
        if route is None:
            return UNMATCHED_ROUTE
        router = scope.get("router")
        routes = getattr(router, "routes", ())
        if router is not self._router or len(routes) != self._route_count:
            self._rebuild(router, routes)
        entry = self._index.get(id(route))
        if entry is not None and len(entry[1]) == 1:
            return entry[1][0][0]
        request = {"type": "http", "method": scope["method"], "path": path, "root_path": root_path}
        if entry is not None:
            candidates = entry[1]
            # One router included twice: tell the inclusions apart by the path.
            found = _first_match(request, candidates)
            return candidates[0][0] if found is None else found[0]
        # Not indexed: the route of a mounted app, or the included router
        # Starlette leaves after a partial match (405). Match every route once.
        own = str(getattr(route, "path_format", UNMATCHED_ROUTE))
        found = _first_match(request, list(_contexts(routes)))
        if found is None:
            return own
        template, matcher = found
        if isinstance(getattr(matcher, "original_route", matcher), Mount):
            # "/prefix/{path}" of the mount, then the mounted app's own template.
            return template.removesuffix("/{path}") + own
        return template

    def _rebuild(self, router: Any, routes: Any) -> None:
        index: dict[int, tuple[BaseRoute, list[tuple[str, Any]]]] = {}
        for template, matcher in _contexts(routes):
            original = getattr(matcher, "original_route", matcher)
            index.setdefault(id(original), (original, []))[1].append((template, matcher))
        self._index = index
        self._router = router
        self._route_count = len(routes)


def _contexts(routes: Any) -> Iterator[tuple[str, Any]]:
    """``(full template, matcher)`` for each route reachable from ``routes``."""
    contexts = routes if _ITER_ROUTE_CONTEXTS is None else _ITER_ROUTE_CONTEXTS(routes)
    for context in contexts:
        template = getattr(context, "path_format", None)
        if template:
            yield template, context


def _first_match(request: Scope, candidates: list[tuple[str, Any]]) -> tuple[str, Any] | None:
    """The first candidate matching ``request`` fully, else the first partially."""
    partial: tuple[str, Any] | None = None
    for candidate in candidates:
        match, _ = candidate[1].matches(request)
        if match is Match.FULL:
            return candidate
        if match is Match.PARTIAL and partial is None:
            partial = candidate
    return partial


def observe_request(method: str, route: str, status: int, started: float) -> None:
    """Count one request answered outside the middleware (the decision fast lane)."""
    tally(HTTP_REQUEST_SECONDS, method, route, str(status)).observe(time.perf_counter() - started)


class Tally:
    """A labelled counter or histogram child whose updates are summed in plain Python
    and handed to prometheus_client by :func:`flush_tallies`.

    prometheus_client takes a lock and walks the buckets in Python on every
    ``observe`` (microseconds each); a decision makes about eight updates, a few
    percent of its time. A tally adds to a list instead (bucket found by bisection,
    in C) and the sums reach the real metric, bucket by bucket, when flushed: before
    every ``/metrics`` answer and at every change poll (about once a second), so a
    scrape of another worker lags by at most that.

    Only for code on the event loop thread: the flush runs there too, so no update
    is lost between reading and resetting a sum.
    """

    __slots__ = ("child", "bounds", "counts", "total", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        bounds = getattr(child, "_upper_bounds", None)
        self.bounds: list[float] | None = None if bounds is None else list(bounds)
        self.counts = [0] * len(bounds or ())
        self.total = 0.0
        self.pending = False

    def observe(self, value: float) -> None:
        # prometheus_client counts a value in the first bucket whose bound is >= it.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # type: ignore[arg-type]
        self.total += value
        self.pending = True

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount
        self.pending = True

    def flush(self) -> None:
        if not self.pending:
            return
        total, self.total, self.pending = self.total, 0.0, False
        if self.bounds is None:
            self.child.inc(total)
            return
        counts, self.counts = self.counts, [0] * len(self.counts)
        # The child's own per-bucket values (not cumulative) and sum, as observe() does.
        for bucket, count in zip(self.child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self.child._sum.inc(total)


_tallies: dict[tuple[Any, ...], Tally] = {}


def tally(metric: Any, *labels: str) -> Tally:
    """The :class:`Tally` of ``metric.labels(*labels)``, made once per process:
    ``labels()`` takes a lock and builds a key on every call."""
    key = (metric, *labels)
    found = _tallies.get(key)
    if found is None:
        found = _tallies[key] = Tally(metric.labels(*labels))
    return found


def flush_tallies() -> None:
    """Hand every :class:`Tally`'s sums to prometheus_client (event loop thread only)."""
    for pending in list(_tallies.values()):
        pending.flush()


class MetricsMiddleware:
    """Pure ASGI middleware observing :data:`HTTP_REQUEST_SECONDS` for each HTTP request.

    Install it with ``app.add_middleware(MetricsMiddleware)``. The duration runs
    from the request's arrival to the last chunk of its response being handed
    to the server (background tasks excluded). ``status`` is the status sent;
    an exception raised before any response counts as 500 and is re-raised for
    the error handlers. ``route`` is the matched route template (``unmatched``
    when none matched); ``method`` is the HTTP method, or ``other`` for
    non-standard ones, so clients cannot grow the label set.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._templates = _RouteTemplates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        status = 500
        observed = False

        def observe() -> None:
            nonlocal observed
            observed = True
            method = scope["method"]
            HTTP_REQUEST_SECONDS.labels(
                method if method in _KNOWN_METHODS else "other",
                self._templates.template(scope, path, root_path),
                str(status),
            ).observe(time.perf_counter() - start)

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and not observed
            ):
                observe()

        try:
            await self.app(scope, receive, send_observed)
        finally:
            # An exception before the response ended, or a response left
            # unfinished (client gone): count it all the same.
            if not observed:
                observe()


# --- /metrics ----------------------------------------------------------------

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    operation_id="getMetrics",
    summary="Prometheus metrics",
    description=(
        "The service's metrics in the Prometheus text exposition format: HTTP latency by "
        "route template, decisions, offers, outcomes, model loads, audit commits, the spool, "
        "the served model's version and age, each worker's memory, files and database "
        "connections, build info. With several workers, counters and histograms are summed "
        "over all of them and per-worker gauges carry a pid label."
    ),
    response_class=Response,
    responses={
        200: {
            "description": "Metrics in the Prometheus text format.",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        }
    },
)
async def get_metrics() -> Response:
    """Render the metrics: tallies flushed here on the event loop, then collected (blocking
    work, in a thread)."""
    flush_tallies()
    body, content_type = await run_in_threadpool(render_metrics)
    return Response(content=body, media_type=content_type)
