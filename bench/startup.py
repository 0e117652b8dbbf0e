"""Time to ready: how long ``nbo serve`` takes to answer ``/health/ready``, and its memory then.

Usage::

    NBO_DATABASE_URL=... NBO_DATA_DIR=... .venv/bin/python bench/startup.py [--runs 3]
        [--workers 1] [--cold] [--timeout 600]

Run it against a prepared bank, e.g. the one ``bench/serve.py --keep DIR`` leaves
(``NBO_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/nbo_bench_serve``,
``NBO_DATA_DIR=DIR/postgresql``). A worker reads the bank and the contact history of the
policy windows before it is ready (today it also scores every customer), so the figures
grow with customers and with recent offers; the report says how many offers the window
held.

Each run starts ``nbo serve --workers N`` in its own session, waits until
``/health/ready`` answers 200 and, with several workers, until every worker has logged
uvicorn's "Application startup complete" (a worker accepts connections only once it is
ready, so the first 200 says only that one is), then measures the RSS and PSS
(``/proc/PID/smaps_rollup``: shared pages split between the processes mapping them) of
every process, and stops the server. ``--cold`` removes ``NBO_DATA_DIR/serving/`` (what
the service keeps on disk between starts) before the first run, so the first run is cold
and the others warm; without it every run finds whatever an earlier start left. The
page cache is not dropped: a cold run still reads a warm page cache.

A run that built a serving store (none there, or none of this database's: a store's key
holds the database's URL, so the first start on a ``--busy-offers`` copy builds one) is
reported as cold. The report prints each run and the median of the warm runs beside the
targets of issue 17 (ready in <= 20 s; 2 workers <= 2 GB together) and today's figures.
Server logs go to ``NBO_DATA_DIR/startup-server.log``.

``--busy-offers N`` measures a start with busy policy windows without touching the
prepared bank: it copies the PostgreSQL database (``CREATE DATABASE <name>_busy
TEMPLATE <name>``) and ``NBO_DATA_DIR`` (hard links, as ``<dir>-busy``), adds decisions
holding N offers spread over the last 25 days to the copy (1-3 offers a decision, random
customers and products, a tenth of them declined), vacuums and analyses those tables (as
autovacuum would), and starts the server on the copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as bench  # noqa: E402 - bench/serve.py: the server harness and memory readers

BUSY_DAYS = 25
"""``--busy-offers`` spreads its offers over this many days (inside the policy windows)."""

FILL = (
    # One row per decision: a random customer (drawn per row, then joined), an instant
    # in the window, 1-3 offers.
    """CREATE TABLE bench_fill AS
    SELECT f.did, c.id AS cid, c.external_id AS xid, f.at, f.k FROM (
        SELECT gen_random_uuid()::text AS did,
               b.low + floor(random() * b.n)::bigint AS cid,
               now() - random() * make_interval(days => :days) AS at,
               1 + floor(random() * 3)::int AS k
        FROM generate_series(1, :decisions) g
        CROSS JOIN (SELECT min(id) AS low, count(*) AS n FROM customers) b
    ) f JOIN customers c ON c.id = f.cid""",
    """INSERT INTO decisions (id, customer_id, customer_external_id, channel, control,
        degraded, cold_start, created_at)
    SELECT did, cid, xid, 'branch', false, false, false, at FROM bench_fill""",
    """INSERT INTO offers (id, decision_id, customer_id, product_id, rank, propensity,
        expected_value, score, created_at)
    SELECT gen_random_uuid()::text, f.did, f.cid, p.ids[1 + floor(random() * p.n)::int],
        r, 0.1, 1.0, 0.1, f.at
    FROM bench_fill f CROSS JOIN generate_series(1, 3) r
    CROSS JOIN (SELECT array_agg(id) AS ids, count(*) AS n FROM products) p
    WHERE r <= f.k""",
    """INSERT INTO offer_outcomes (offer_id, outcome, created_at)
    SELECT id, 'declined', created_at + interval '1 minute' FROM offers
    WHERE created_at >= now() - make_interval(days => :days) AND random() < 0.1""",
    "DROP TABLE bench_fill",
)
SETTLE = (
    # The tables as autovacuum keeps them for a bank whose windows filled over weeks:
    # vacuumed (the first reads of fresh rows wrote every page again, for their hint
    # bits, and the start-ups measured the disk) and analysed. Without statistics
    # PostgreSQL took the 135 declines it expected for 650k and planned the declines'
    # row reader (the few of offers without a customer) by looking up the offer of every
    # decline of the windows: 5.2 s of each worker's start-up, for no rows, instead of
    # 6 ms through the unnamed offers' partial index.
    "VACUUM (ANALYZE) decisions, offers, offer_outcomes",
    "CHECKPOINT",
)


def busy_copy(url: str, folder: Path, offers: int) -> tuple[str, Path]:
    """A copy of the bank (database and data folder) with ``offers`` more offers in the
    policy windows; returns its database URL and data folder."""
    from sqlalchemy.engine import make_url

    source = make_url(url)
    if source.get_backend_name() != "postgresql" or not source.database:
        sys.exit("--busy-offers needs NBO_DATABASE_URL on PostgreSQL")
    name = f"{source.database}_busy"
    admin = create_engine(source.set(database="postgres"), isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    try:
        with admin.connect() as conn:
            # Names from the operator's own URL, quoted as identifiers.
            quote = admin.dialect.identifier_preparer.quote
            conn.execute(text(f"DROP DATABASE IF EXISTS {quote(name)} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {quote(name)} TEMPLATE {quote(source.database)}"))
    finally:
        admin.dispose()
    busy_url = source.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(busy_url)
    try:
        with engine.begin() as conn:
            for statement in FILL:
                conn.execute(text(statement), {"days": BUSY_DAYS, "decisions": max(1, offers // 2)})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for statement in SETTLE:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    copy = folder.with_name(folder.name + "-busy")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy, copy_function=os.link)
    print(f"busy copy {name} ready in {time.perf_counter() - started:.0f} s", flush=True)
    return busy_url, copy


def built_stores(state: Path) -> set[tuple[str, int]]:
    """The serving stores in the folder ``state`` (a folder each), with when each was
    made: a store built again under the same name differs too."""
    try:
        return {(e.name, e.stat().st_mtime_ns) for e in state.iterdir() if e.is_dir()}
    except OSError:
        return set()


def one_start(nbo: str, folder: Path, workers: int, timeout: float) -> dict[str, Any]:
    """Start, wait for every worker, read memory, stop; the figures of this start."""
    port = bench.free_port()
    argv = [nbo, "serve", "--host", bench.HOST, "--port", str(port), "--workers", str(workers)]
    server = bench.Server(
        "nbo serve",
        argv,
        dict(os.environ),
        folder,
        folder / "startup-server.log",
        port,
        ready_path="/health/ready",
        workers=workers,
    )
    try:
        server.start()
        server.wait_ready(timeout)
        memory = server.memory()
    finally:
        server.stop()
    return {
        "ready_s": server.ready_seconds,
        "all_ready_s": server.all_ready_seconds,
        "memory": memory,
    }


def describe(run: str, result: dict[str, Any], customers: int, workers: int) -> str:
    memory = result["memory"]
    every = result["all_ready_s"]
    ready = f"ready after {result['ready_s']:.1f} s"
    if workers > 1:
        ready += f", all {workers} workers after " + ("?" if every is None else f"{every:.1f} s")
    per_worker = ", ".join(
        f"{p.get('rss_mb', 0):,.0f}/{p.get('pss_mb', 0):,.0f}"
        for p in memory["processes"]
        if p["role"] == "worker"
    )
    bytes_each = memory["workers_pss_mb"] * 2**20 / max(customers, 1)
    return (
        f"{run}: {ready}; workers RSS {memory['workers_rss_mb']:,.0f} MiB, "
        f"PSS {memory['workers_pss_mb']:,.0f} MiB (each RSS/PSS: {per_worker}; "
        f"{bytes_each:,.0f} bytes a customer); whole server PSS {memory['total_pss_mb']:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="Starts measured.")
    parser.add_argument("--workers", type=int, default=1, help="Workers of `nbo serve`.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds to wait a start.")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="Remove NBO_DATA_DIR/serving/ before the first run (cold start; later runs warm).",
    )
    parser.add_argument(
        "--busy-offers",
        type=int,
        default=0,
        metavar="N",
        help="Start on a copy of the bank with about N more offers in the policy windows.",
    )
    args = parser.parse_args()
    if min(args.runs, args.workers) < 1 or args.timeout <= 0:
        parser.error("--runs and --workers must be >= 1, --timeout > 0")
    url = os.environ.get("NBO_DATABASE_URL")
    data_dir = os.environ.get("NBO_DATA_DIR")
    if not url or not data_dir:
        sys.exit("set NBO_DATABASE_URL and NBO_DATA_DIR to a prepared bank")
    folder = Path(data_dir).resolve()
    if not folder.is_dir():
        sys.exit(f"NBO_DATA_DIR {folder}: not a folder")
    nbo = bench.nbo_command()
    if args.busy_offers > 0:
        url, folder = busy_copy(url, folder, args.busy_offers)
        os.environ["NBO_DATABASE_URL"], os.environ["NBO_DATA_DIR"] = url, str(folder)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            customers = int(conn.execute(text("SELECT count(*) FROM customers")).scalar_one())
            offers = conn.execute(
                text("SELECT count(*) FROM offers WHERE created_at >= :since"),
                {"since": time.strftime("%Y-%m-%d", time.gmtime(time.time() - 30 * 86400))},
            ).scalar_one()
    finally:
        engine.dispose()
    print(
        f"{customers:,} customers, {offers:,} offers in the last 30 days; "
        f"{args.workers} worker(s); load average {bench.load_average()}",
        flush=True,
    )
    results = []
    for run in range(1, args.runs + 1):
        state = folder / "serving"
        if run == 1 and args.cold and state.exists():
            shutil.rmtree(state)
        kept = bench.folder_mb(state)
        stores = built_stores(state)
        result = one_start(nbo, folder, args.workers, args.timeout)
        # Cold: no store to map, or none of this database's (a store's key holds the
        # database's URL, so the first start on a --busy-offers copy builds one).
        built = built_stores(state) - stores
        result["cold"] = kept is None or bool(built)
        kind = (
            "cold"
            if kept is None
            else f"serving/ {kept:,.0f} MiB, cold: built its store"
            if built
            else f"warm, serving/ {kept:,.0f} MiB"
        )
        results.append(result)
        print(describe(f"run {run} ({kind})", result, customers, args.workers), flush=True)

    def ready(result: dict[str, Any]) -> float:
        return float(result["all_ready_s"] or result["ready_s"])

    warm = [r for r in results if not r["cold"]]
    cold = [r for r in results if r["cold"]]
    chosen = warm or results
    pss = statistics.median(r["memory"]["workers_pss_mb"] for r in chosen)
    rss = statistics.median(r["memory"]["workers_rss_mb"] for r in chosen)
    print(
        f"median of {len(chosen)} {'warm ' if warm and cold else ''}run(s): "
        f"ready after {statistics.median(ready(r) for r in chosen):.1f} s, "
        f"workers RSS {rss:,.0f} MiB, PSS {pss:,.0f} MiB "
        f"({pss * 2**20 / max(customers, 1):,.0f} bytes a customer)"
    )
    scale = customers / 100_000
    print(f"issue 17 targets, {customers:,} customers, {args.workers} worker(s):")
    for name, runs in (("cold (first start)", cold[:1]), ("warm (median)", warm)):
        if runs:
            seconds = statistics.median(ready(r) for r in runs)
            print(
                f"  ready, {name}: {seconds:.1f} s; target <= {bench.TARGET_READY_S:.0f} s "
                f"{'met' if seconds <= bench.TARGET_READY_S else 'NOT met'}; "
                f"today {bench.TODAY_READY}"
            )
    target = ""
    if args.workers == 2:
        target = f"; target 2 workers <= 2 GB {'met' if pss <= bench.TARGET_TWO_WORKERS_MB else 'NOT met'}"
    print(
        f"  memory at ready: PSS {pss:,.0f} MiB for {args.workers} worker(s){target}; today "
        f"about {bench.TODAY_MB_PER_100K_PER_WORKER * scale * args.workers:,.0f} MiB "
        "(1.0 GB per 100k customers per worker)"
    )


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
