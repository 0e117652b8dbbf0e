"""How long a reload holds up the other threads of a serving worker.

Usage::

    NBO_DATABASE_URL=... NBO_DATA_DIR=... .venv/bin/python bench/reload.py [--reloads 2]
        [--activate] [--stacks MS] [--pacing] [--figures]

Loads the active version as a worker does (its serving store must be built: `nbo
models prepare`; the contact history is skipped), then reloads it while a thread that
stands for the requests wakes every millisecond. A request waits at least as long as
the gaps between that thread's wake-ups: the longest ones are printed with what the
reload was doing then (build, rule warm-up, swap, freeing the old snapshot).

``--activate`` switches between the two newest model versions instead, as
``POST /v1/models/{version}/activate`` does (the version's store prepared, the
activation recorded, the reload): both versions' stores must be built (``nbo models
prepare --version V``). It changes the active version of the database.

With ``--activate``, activations alternate between the way they are made now (the
store checked against the counters of ``bank_changes``, migration 0013) and with the
whole-table counts the check made before (customers and adoptions counted, on one
core). The ``updated_at`` reads use their new index in both, so the old way's cost is
understated by its two scans of the customers table.

``--stacks MS`` also names what held the interpreter: whenever the waking thread is
more than MS ms late, :func:`faulthandler.dump_traceback_later` (a C thread that needs
no interpreter) takes the loading thread's stack in the middle of the stall, and the
innermost frames of each stall are printed after the reload's line.

``--pacing`` alternates reloads paced (:func:`service.decision.sharing.pace`, as a
serving worker's are) and not paced, with a thread standing for an event loop that
always has a request to serve (back-to-back units of :data:`REQUEST_US` of Python): it
prints how many such requests ran, and how long they took, in the second before the
reload and during it.

``--figures`` measures the business figures instead (the rolling conversion and the
uplift gauge, as one worker of each machine computes them every
``NBO_FIGURES_INTERVAL_SECONDS``), on a thread of this process (as a worker did before,
and still does for a bank under 50,000 customers) and in a child process at low
priority (as a worker does now), and first the gaps of the same thread with nothing
else to do: the machine's own noise.

Every line gives the CPU the work took from the whole machine (``/proc/stat``, so run
it on an otherwise quiet machine) beside this process's own: the difference is mostly
PostgreSQL's.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as bench  # noqa: E402 - bench/serve.py: /proc readers
from sqlalchemy import text  # noqa: E402

from service import child  # noqa: E402
from service.data import registry  # noqa: E402
from service.data.db import engine_from_settings, unit_of_work  # noqa: E402
from service.decision import sharing  # noqa: E402
from service.decision import state as serving  # noqa: E402
from service.decision import store as columns  # noqa: E402
from service.settings import Settings  # noqa: E402

OLD_COUNTS = (
    "SELECT count(*), coalesce(max(id), 0), max(updated_at) FROM customers",
    "SELECT count(*), coalesce(max(id), 0), count(closed_at) FROM adoptions",
)
"""The counts a store's check made before the counters of migration 0013."""
REQUEST_US = 250.0
"""With ``--pacing``: the Python work of one stand-in request (about a decision's)."""
GAP_MS = 20.0
"""Wake-up gaps longer than this are listed."""


def machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    return bench.machine_busy()[0] / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=2, help="Reloads measured.")
    parser.add_argument(
        "--activate", action="store_true", help="Activate the other of the two newest versions."
    )
    parser.add_argument(
        "--figures", action="store_true", help="Measure the business figures, not a reload."
    )
    parser.add_argument(
        "--stacks",
        type=float,
        metavar="MS",
        help="Take the loading thread's stack whenever the waking thread is MS ms late.",
    )
    parser.add_argument(
        "--pacing",
        action="store_true",
        help="Alternate reloads paced (as a serving worker's are) and not paced, with a "
        "thread standing for a busy event loop: requests of REQUEST_US of Python each.",
    )
    args = parser.parse_args()
    if args.figures:
        figures()
        return
    if args.reloads < 1:
        parser.error("--reloads must be at least 1")
    settings = Settings()
    engine = engine_from_settings(settings)
    state = serving.ServingState(engine, settings)
    state.last_event = 1  # no contact history: only the snapshot is measured
    started = time.perf_counter()
    state.load()
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"first load {time.perf_counter() - started:.1f} s, {len(state.snapshot.customers):,} customers"
    )  # type: ignore[union-attr]
    marks: list[tuple[float, str]] = []

    def marked(owner: Any, name: str) -> None:
        real: Callable[..., Any] = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            marks.append((time.perf_counter(), f"{name} starts"))
            try:
                return real(*a, **k)
            finally:
                marks.append((time.perf_counter(), f"{name} ends"))

        setattr(owner, name, wrapper)

    for name in ("build_snapshot", "_retire", "prepare_store"):
        marked(serving, name)
    marked(registry, "activate_version")
    with unit_of_work(engine) as session:
        versions = [row.version for row in registry.list_versions(session)][:2]
    marked(serving.Snapshot, "warm_rules")
    fingerprint = columns.fingerprint

    def counting(conn: Any) -> columns.Fingerprint:
        """The fingerprint with the whole-table counts the check made before 0013."""
        for query in OLD_COUNTS:
            conn.execute(text(query)).all()
        return fingerprint(conn)

    loops = calibrate(REQUEST_US)
    # Written by faulthandler's own thread, from the file's descriptor.
    dumps = tempfile.TemporaryFile("w+") if args.stacks else None  # noqa: SIM115 - closed at exit
    paced_work = sharing.PACE_WORK_SECONDS
    for reload in range(1, args.reloads + 1):
        marks.clear()
        gaps: list[tuple[float, float]] = []
        requests: list[tuple[float, float]] = []
        stop = threading.Event()
        unpaced = args.pacing and reload % 2 == 0
        sharing.PACE_WORK_SECONDS = float("inf") if unpaced else paced_work

        if dumps is not None:
            dumps.seek(0)
            dumps.truncate()

        def ping(stop: threading.Event = stop, gaps: list[tuple[float, float]] = gaps) -> None:
            last = time.perf_counter()
            while not stop.is_set():
                if dumps is not None:
                    faulthandler.dump_traceback_later(args.stacks / 1000, file=dumps)
                time.sleep(0.001)
                if dumps is not None:
                    faulthandler.cancel_dump_traceback_later()
                now = time.perf_counter()
                gaps.append((last, now))
                last = now

        thread = threading.Thread(target=ping)
        thread.start()
        busy = threading.Thread(target=serve_requests, args=(stop, loops, requests))
        if args.pacing:
            busy.start()
        time.sleep(0.3 if not args.pacing else 1.0)
        before = reload % 2 == 0 and args.activate and not args.pacing
        if before:  # as activations were made before: the bank's tables counted
            columns.fingerprint = counting  # type: ignore[assignment]
        cpu, mine = machine_cpu(), own_cpu()
        origin = time.perf_counter()
        if args.activate:
            serving_now = state.snapshot.version  # type: ignore[union-attr]
            other = next(v for v in versions if v != serving_now)
            serving.prepare_store(engine, settings, other)
            with unit_of_work(engine) as session:
                registry.activate_version(
                    session, version=other, origin=state.origin, cache_dir=settings.artifacts_dir
                )
        state.load()
        took = time.perf_counter() - origin
        cpu, mine = machine_cpu() - cpu, own_cpu() - mine
        if before:
            columns.fingerprint = fingerprint  # type: ignore[assignment]
        time.sleep(0.3)
        stop.set()
        thread.join()
        if args.pacing:
            busy.join()
        lengths = sorted((b - a) * 1000 for a, b in gaps)
        how = " (as before)" if before else " (now)" if args.activate else ""
        if args.pacing:
            how += " not paced" if unpaced else " paced"
        print(
            f"{'activation' if args.activate else 'reload'} {reload}{how}: {took:.2f} s; "
            f"CPU: machine {cpu:.2f} s, this process {mine:.2f} s; "
            f"wake-up gaps: median {lengths[len(lengths) // 2]:.2f} ms, "
            f"p99.9 {lengths[int(len(lengths) * 0.999)]:.1f} ms, max {lengths[-1]:.0f} ms"
        )
        if args.pacing:
            print("  " + request_line(requests, origin, origin + took))
        if dumps is not None:
            dumps.seek(0)
            for stall, count in stalls(dumps.read(), threading.main_thread().ident).most_common(12):
                print(f"  {count:4d} x {stall}")
        for a, b in gaps:
            if (b - a) * 1000 > GAP_MS:
                doing = [n for t, n in marks if t <= a]
                print(
                    f"  {1000 * (b - a):6.0f} ms at {a - origin:6.3f} s "
                    f"(after: {doing[-1] if doing else 'before the reload'})"
                )
    engine.dispose()


def stalls(dumped: str, thread: int | None) -> Counter[str]:
    """How often each innermost place of ``thread`` (its two last frames) was seen in
    :mod:`faulthandler`'s dumps."""
    seen: Counter[str] = Counter()
    for block in dumped.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines or thread is None or not lines[0].startswith(f"Thread 0x{thread:016x}"):
            continue
        frames = [
            re.sub(r'File ".*?([^/]+/[^/]+)", line (\d+) in (\S+)', r"\3 (\1:\2)", line.strip())
            for line in lines[1:3]
        ]
        seen[" < ".join(frames)] += 1
    return seen


def calibrate(micros: float) -> int:
    """Loop turns of :func:`work_for` taking ``micros`` microseconds on this machine."""
    turns = 1000
    while True:
        started = time.perf_counter()
        work_for(turns)
        took = time.perf_counter() - started
        if took > 0.05:
            return max(1, int(turns * micros / 1e6 / took))
        turns *= 2


def work_for(turns: int) -> int:
    total = 0
    for i in range(turns):
        total += i
    return total


def serve_requests(stop: threading.Event, turns: int, done: list[tuple[float, float]]) -> None:
    """Stand for an event loop that always has a request to serve: back to back, units
    of pure Python work (see :data:`REQUEST_US`), each one's start and end recorded."""
    while not stop.is_set():
        started = time.perf_counter()
        work_for(turns)
        done.append((started, time.perf_counter()))


def request_line(done: list[tuple[float, float]], start: float, end: float) -> str:
    """How the stand-in requests fared during [start, end] against the second before."""

    def stats(chosen: list[tuple[float, float]], seconds: float) -> str:
        if not chosen:
            return "none"
        took = sorted((b - a) * 1000 for a, b in chosen)
        return (
            f"{len(chosen) / seconds:,.0f}/s, p50 {took[len(took) // 2]:.2f} ms, "
            f"p99 {took[int(len(took) * 0.99)]:.2f} ms, max {took[-1]:.1f} ms"
        )

    before = [(a, b) for a, b in done if start - 1.0 <= a and b <= start]
    during = [(a, b) for a, b in done if a < end and b > start]
    return (
        f"requests ({REQUEST_US:.0f} us of Python each) before: {stats(before, 1.0)}; "
        f"during: {stats(during, max(end - start, 1e-9))}"
    )


def gaps_during(work: Callable[[], Any]) -> tuple[float, list[float], float, float]:
    """Seconds ``work`` took, the wake-up gaps (ms) of a thread waking every ms, and the
    CPU seconds of the machine and of this process meanwhile (the thread's included)."""
    gaps: list[float] = []
    stop = threading.Event()

    def ping() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append((now - last) * 1000)
            last = now

    thread = threading.Thread(target=ping)
    thread.start()
    started, cpu, mine = time.perf_counter(), machine_cpu(), own_cpu()
    try:
        work()
    finally:
        took = time.perf_counter() - started
        cpu, mine = machine_cpu() - cpu, own_cpu() - mine
        stop.set()
        thread.join()
    return took, sorted(gaps), cpu, mine


def figures() -> None:
    import datetime as dt

    from service.reports import measures as reports

    settings = Settings()
    engine = engine_from_settings(settings)
    today = dt.date.today()
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    def idle() -> None:
        time.sleep(10)

    def here() -> None:
        with sharing.sharing_the_interpreter():  # as service/app.py computes them
            reports.rolling_gauges(engine, today)

    def in_child() -> None:
        child.run(
            settings, "service.reports.measures:rolling_gauges_in_child", today=today.isoformat()
        )

    for label, work in (
        ("nothing (10 s)", idle),
        ("business figures on a thread (before)", here),
        ("business figures in a child (now)", in_child),
    ):
        took, gaps, cpu, mine = gaps_during(work)
        over = sum(g > GAP_MS for g in gaps)
        print(
            f"{label}: {took:.1f} s; CPU: machine {cpu:.1f} s, this process {mine:.1f} s; "
            f"wake-up gaps: median {gaps[len(gaps) // 2]:.2f} ms, "
            f"p99.9 {gaps[int(len(gaps) * 0.999)]:.1f} ms, max {gaps[-1]:.0f} ms, "
            f"{over} over {GAP_MS:.0f} ms"
        )
    engine.dispose()


if __name__ == "__main__":
    main()
