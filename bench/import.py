"""Import speed against raw COPY: products, customers and adoptions into SQLite and PostgreSQL.

Usage::

    python bench/import.py [--rows 1000000] [--customers 250000] [--backends postgresql,sqlite]

Writes a products, customers and adoptions file into a temporary folder, then, for
each backend, imports them into a new database, each import in a fresh process (so
its peak RSS is its own), re-imports the adoptions (nothing may be added), then
imports the same adoptions with every open one closed (``closings``: an update of
about 70 % of the rows, which the triggers of migration 0013 count once).

On PostgreSQL the same run first COPYs each CSV file as it is into a bare table
(typed columns, no keys or constraints: what ``psql \\copy`` does), so nbo's rows/s
is printed next to the raw COPY rate of the same file on the same server at the
same moment. Targets (issue 17): nbo >= 0.2 x raw COPY for customers and adoptions,
peak RSS <= 1 GB whatever the file size. PostgreSQL comes from
NBO_BENCH_POSTGRES_URL (default: the local server); a database is created for the
run and dropped after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POSTGRES_URL = os.environ.get(
    "NBO_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TARGET_RATIO = 0.2
TARGET_RSS_MB = 1024
# Figures before this work (issue 17, bench at 888k adoptions on this machine).
BEFORE = {
    "customers": "20-28k rows/s",
    "adoptions": "106k rows/s = 0.05 x raw COPY (2.2M rows/s)",
}
BARE_COLUMNS = {
    "customers": "customer_id TEXT, segment TEXT, branch_id TEXT, joined_at DATE, "
    "income DOUBLE PRECISION, region TEXT",
    "adoptions": "customer_id TEXT, product_code TEXT, adopted_at DATE, closed_at DATE",
}


def write_files(folder: Path, rows: int, customers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    codes = [f"product_{i:02d}" for i in range(20)]
    pd.DataFrame(
        {
            "product_code": codes,
            "name": [c.replace("_", " ").title() for c in codes],
            "category": "bench",
            "value": rng.integers(10, 2000, len(codes)),
        }
    ).to_csv(folder / "products.csv", index=False)
    ids = np.array([f"C{i:07d}" for i in range(customers)])
    pd.DataFrame(
        {
            "customer_id": ids,
            "segment": rng.choice(["mass", "affluent", "youth"], customers),
            "branch_id": rng.choice([f"B{i:02d}" for i in range(50)], customers),
            "joined_at": pd.Timestamp("2015-01-01")
            + pd.to_timedelta(rng.integers(0, 1500, customers), unit="D"),
            "income": rng.gamma(2.0, 1500.0, customers).round(0),
            "region": rng.choice(["north", "south", "east", "west"], customers),
        }
    ).to_csv(folder / "customers.csv", index=False, date_format="%Y-%m-%d")
    # Unique (customer, product, date) triples: each customer gets distinct product slots.
    # Written in pieces so that a file of many millions of rows needs little memory.
    per = rows // customers + 1
    piece = 1_000_000
    with (folder / "adoptions.csv").open("w") as out, (folder / "closings.csv").open("w") as ends:
        for start in range(0, rows, piece):
            n = min(piece, rows - start)
            index = np.arange(start, start + n)
            customer_idx = index // per
            product_idx = (index % per + customer_idx) % len(codes)
            adopted = pd.Timestamp("2019-01-01") + pd.to_timedelta(
                rng.integers(0, 2000, n), unit="D"
            )
            closed = adopted + pd.to_timedelta(rng.integers(30, 900, n), unit="D")
            closed = closed.where((rng.random(n) < 0.3) & (closed <= pd.Timestamp("2025-12-31")))
            pd.DataFrame(
                {
                    "customer_id": ids[customer_idx],
                    "product_code": np.array(codes)[product_idx],
                    "adopted_at": adopted.strftime("%Y-%m-%d"),
                    "closed_at": closed.strftime("%Y-%m-%d"),
                }
            ).to_csv(out, index=False, header=start == 0)
            # The same adoptions, every open one closed: its import updates ~70 % of the
            # rows (the bank_changes trigger of migration 0013 sees one statement).
            late = adopted + pd.to_timedelta(1000, unit="D")
            last = late.where(late <= pd.Timestamp("2025-12-31"), pd.Timestamp("2025-12-31"))
            pd.DataFrame(
                {
                    "customer_id": ids[customer_idx],
                    "product_code": np.array(codes)[product_idx],
                    "adopted_at": adopted.strftime("%Y-%m-%d"),
                    "closed_at": closed.where(closed.notna(), last).strftime("%Y-%m-%d"),
                }
            ).to_csv(ends, index=False, header=start == 0)


def run_worker(url: str, folder: Path, kind: str) -> dict[str, float]:
    """Import one file into ``url`` in this process; return its figures and peak RSS."""
    from service.data import db
    from service.data.importing import import_adoptions, import_customers, import_products

    engine = db.make_engine(url)
    run = {
        "products": import_products,
        "customers": import_customers,
        "adoptions": import_adoptions,
        "reimport": import_adoptions,
        "closings": import_adoptions,
    }[kind]
    file = folder / f"{'adoptions' if kind == 'reimport' else kind}.csv"
    summary = run(engine, file)
    engine.dispose()
    return {
        "rows": summary.rows_read,
        "seconds": summary.seconds,
        "added": summary.added,
        "updated": summary.updated,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not carried
    over from the parent across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_copy(url: str, file: Path, kind: str) -> tuple[int, float]:
    """COPY ``file`` as it is into a new bare table (what ``psql \\copy`` does); return
    (rows, seconds)."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database,
    ) as conn:
        table = f"bare_{kind}"
        conn.execute(f"CREATE TABLE {table} ({BARE_COLUMNS[kind]})")
        conn.commit()
        started = time.perf_counter()
        with (
            conn.cursor() as cursor,
            cursor.copy(f"COPY {table} FROM STDIN WITH (FORMAT csv, HEADER true)") as copy,
            file.open("rb") as handle,
        ):
            while block := handle.read(1 << 20):
                copy.write(block)
        conn.commit()
        seconds = time.perf_counter() - started
        rows = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        conn.execute(f"DROP TABLE {table}")
        conn.commit()
    return int(rows[0] if rows else 0), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=250_000)
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument(
        "--worker", nargs=3, metavar=("URL", "FOLDER", "KIND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker[0], Path(args.worker[1]), args.worker[2])))
        return

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="nbo-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        write_files(folder, args.rows, args.customers)
        print(
            f"wrote {args.rows:,} adoptions for {args.customers:,} customers "
            f"in {time.perf_counter() - started:.1f} s"
        )
        print(
            f"{'backend':<11} {'table':<10} {'rows':>10} {'seconds':>8} {'rows/s':>10} "
            f"{'raw COPY/s':>11} {'ratio':>6} {'peak RSS':>9}  target / before"
        )
        for backend in args.backends.split(","):
            admin = None
            if backend == "sqlite":
                url = f"sqlite:///{folder / 'bench.sqlite3'}"
            else:
                admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
                name = f"nbo_bench_{uuid.uuid4().hex[:8]}"
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                url = make_url(POSTGRES_URL).set(database=name).render_as_string(False)
            try:
                from service.data import db

                db.upgrade(url)
                for kind in ("products", "customers", "adoptions", "reimport", "closings"):
                    raw: tuple[int, float] | None = None
                    if backend == "postgresql" and kind in BARE_COLUMNS:
                        raw = raw_copy(url, folder / f"{kind}.csv", kind)
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", url, str(folder), kind],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    fig = json.loads(out.strip().splitlines()[-1])
                    rate = fig["rows"] / fig["seconds"]
                    raw_text, ratio_text, target = "", "", ""
                    if raw is not None:
                        raw_rate = raw[0] / raw[1]
                        ratio = rate / raw_rate
                        raw_text, ratio_text = f"{raw_rate:,.0f}", f"{ratio:.2f}"
                        ok = ratio >= TARGET_RATIO and fig["peak_rss_mb"] <= TARGET_RSS_MB
                        target = (
                            f"{'ok' if ok else 'MISSED'} (>= {TARGET_RATIO} x, <= 1 GB) / "
                            f"{BEFORE[kind]}"
                        )
                    if kind in ("reimport", "closings"):
                        target = f"added {fig['added']:.0f}, updated {fig['updated']:.0f}"
                    print(
                        f"{backend:<11} {kind:<10} {fig['rows']:>10,.0f} {fig['seconds']:>8.1f} "
                        f"{rate:>10,.0f} {raw_text:>11} {ratio_text:>6} "
                        f"{fig['peak_rss_mb']:>6,.0f} MB  {target}",
                        flush=True,
                    )
            finally:
                if admin is not None:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    admin.dispose()


if __name__ == "__main__":
    main()
