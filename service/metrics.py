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
down). ``nbo_model_active_info`` is per-process state; a worker that stops
should call :func:`mark_worker_dead` on its way out (from the app lifespan's
exit) so its last model version stops being reported. uvicorn has no hook for a
worker that crashes; its files go when ``nbo serve`` restarts and
:func:`prepare_multiprocess` empties the directory.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

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
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

MODEL_INFO = Gauge(
    "nbo_model_active_info",
    "1 for the model version this process serves (0 for versions it served before, "
    "in multiprocess mode). Set it with set_active_model().",
    ["version"],
    # Each worker swaps models on its own, so during a rollout workers differ.
    # "liveall" keeps one sample per live worker (a pid label is added): it shows
    # which worker serves which version, and mark_worker_dead() drops a stopped
    # worker's samples. "max" would merge workers but also keep a dead worker's
    # 1 forever, reporting a version nobody serves; "livemax" would hide which
    # worker lags. Aggregate in PromQL instead: max by (version) (...).
    multiprocess_mode="liveall",
)
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
_nps_branches: set[str] = set()

_model_lock = threading.Lock()
_served_versions: set[str] = set()


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


def set_active_model(version: str | None) -> None:
    """Report ``version`` as the model version this process serves.

    ``nbo_model_active_info{version=...}`` becomes 1 for ``version`` and stops
    being 1 for every version set before; ``None`` reports none (no model
    loaded). In a single process the older series are removed. In multiprocess
    mode prometheus_client cannot remove a series, so they are set to 0.
    """
    with _model_lock:
        if is_multiprocess():
            for old in _served_versions - {version}:
                MODEL_INFO.labels(old).set(0)
        else:
            MODEL_INFO.clear()
            _served_versions.clear()
        if version is not None:
            MODEL_INFO.labels(version).set(1)
            _served_versions.add(version)


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

    Creates ``directory``, deletes the ``*.db`` files an earlier run left in it
    (stale counters would otherwise be added to the new ones) and sets
    ``PROMETHEUS_MULTIPROC_DIR``. Call it in the parent process before uvicorn
    starts more than one worker; the workers inherit the variable and import
    prometheus_client after it is set. It does not switch the calling process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    # The one sanctioned write to os.environ besides settings.py: prometheus_client
    # reads only this variable, in each worker at import time, so no Settings
    # field could reach it. It is written, never read back.
    os.environ[MULTIPROC_DIR_ENV] = str(directory.resolve())


def mark_worker_dead(pid: int | None = None) -> None:
    """Stop reporting the per-process gauges of worker ``pid`` (default: this process).

    Drops its ``nbo_model_active_info`` samples; its counters and histograms
    stay in the sums. Call it from a worker shutting down (the app lifespan's
    exit) or from a supervisor that saw ``pid`` exit. A no-op outside
    multiprocess mode.
    """
    if is_multiprocess():
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)  # type: ignore[no-untyped-call]


def render_metrics() -> tuple[bytes, str]:
    """The metrics in the Prometheus text format: ``(body, content type)``.

    In multiprocess mode the values of every worker, read from the multiprocess
    directory and merged; otherwise this process's default registry.
    """
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
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
        "route template, decisions, offers, outcomes, model loads, audit commits. With "
        "several workers, the sum over all of them."
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
