"""Import speed: 1M adoption events into SQLite and PostgreSQL.

Usage::

    python bench/import.py [--rows 1000000] [--customers 250000] [--backends sqlite,postgresql]

Writes a products, customers and adoptions file into a temporary folder,
then, for each backend, imports them into a new database in a fresh process
and prints rows/s of each import and the process's peak RSS. The adoptions
import is the one the target speaks of (>= 50,000 rows/s, <= 1 GB peak RSS).
PostgreSQL comes from NBO_BENCH_POSTGRES_URL (default: the local server); a
database is created for the run and dropped after.
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
    per = rows // customers + 1
    customer_idx = np.repeat(np.arange(customers), per)[:rows]
    product_idx = (np.tile(np.arange(per), customers)[:rows] + customer_idx) % len(codes)
    adopted = pd.Timestamp("2019-01-01") + pd.to_timedelta(rng.integers(0, 2000, rows), unit="D")
    closed = adopted + pd.to_timedelta(rng.integers(30, 900, rows), unit="D")
    closed = closed.where((rng.random(rows) < 0.3) & (closed <= pd.Timestamp("2025-12-31")))
    pd.DataFrame(
        {
            "customer_id": ids[customer_idx],
            "product_code": np.array(codes)[product_idx],
            "adopted_at": adopted.strftime("%Y-%m-%d"),
            "closed_at": closed.strftime("%Y-%m-%d"),
        }
    ).to_csv(folder / "adoptions.csv", index=False)


def run_worker(url: str, folder: Path) -> dict[str, float]:
    """Import the three files into ``url`` (in this process); return the figures."""
    from service.data import db
    from service.data.importing import import_adoptions, import_customers, import_products

    db.upgrade(url)
    engine = db.make_engine(url)
    figures: dict[str, float] = {}
    for kind, run in (
        ("products", import_products),
        ("customers", import_customers),
        ("adoptions", import_adoptions),
    ):
        summary = run(engine, folder / f"{kind}.csv")
        figures[f"{kind}_rows"] = summary.rows_read
        figures[f"{kind}_seconds"] = summary.seconds
    started = time.perf_counter()
    again = import_adoptions(engine, folder / "adoptions.csv")
    figures["reimport_seconds"] = time.perf_counter() - started
    figures["reimport_added"] = again.added
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=250_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--worker", nargs=2, metavar=("URL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker[0], Path(args.worker[1]))))
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
        print(f"{'backend':<11} {'table':<10} {'rows':>10} {'seconds':>8} {'rows/s':>9}")
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
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", url, str(folder)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                figures = json.loads(out.strip().splitlines()[-1])
            finally:
                if admin is not None:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    admin.dispose()
            for kind in ("products", "customers", "adoptions"):
                rows, secs = figures[f"{kind}_rows"], figures[f"{kind}_seconds"]
                print(f"{backend:<11} {kind:<10} {rows:>10,.0f} {secs:>8.1f} {rows / secs:>9,.0f}")
            print(
                f"{backend:<11} re-import of adoptions: {figures['reimport_seconds']:.1f} s, "
                f"{figures['reimport_added']:.0f} added; peak RSS {figures['peak_rss_mb']:,.0f} MB"
            )


if __name__ == "__main__":
    main()
