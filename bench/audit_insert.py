"""PostgreSQL's own cost of recording decisions: the audit writer's one statement per
group commit, timed directly (no HTTP, no event loop).

Usage::

    .venv/bin/python bench/audit_insert.py postgresql://postgres@127.0.0.1:5432/nbo_bench_serve
        [--batches 400] [--per-commit 10]

Each batch is the statement :class:`service.decision.audit.LoopAuditWriter` sends for one group
commit (``--per-commit`` decisions with 2-3 offers each, real customer and product ids
of the database), in autocommit as the writer runs it. Reported: wall time per batch
and the server backend's CPU per decision (read from ``/proc``, so run it on the
database's machine). The rows are marked (staff ``bench-audit``) and deleted at the end.
Compare schemas by running it against databases that differ only in what you test
(``CREATE DATABASE b TEMPLATE a``, then alter ``b``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.decision.audit import _pg_insert_all, new_id  # noqa: E402

STAFF = "bench-audit"
REASONS = json.dumps(
    {
        "rule": "customers who hold a current account and a credit card often take travel "
        "insurance next",
        "rule_confidence": 0.41,
        "rule_lift": 2.3,
        "factors": [],
    }
)


def batch(customers: list[int], products: list[int], per_commit: int) -> tuple[str, str, str]:
    decisions, offers = [], []
    now = dt.datetime.now(dt.UTC).isoformat(sep=" ")
    for _ in range(per_commit):
        decision = new_id()
        customer = random.choice(customers)
        decisions.append(
            [decision, customer, f"C{customer}", "branch", STAFF, "B1", None, "bench", False]
            + [False, False, now]
        )
        for rank in range(random.choice((2, 3, 3))):
            offers.append(
                [new_id(), decision, customer, random.choice(products), rank + 1, 0.1, 12.0]
                + [1.2, REASONS, now]
            )
    return orjson.dumps(decisions).decode(), orjson.dumps(offers).decode(), "[]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="PostgreSQL URL (libpq form) of a migrated nbo database")
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--per-commit", type=int, default=10)
    args = parser.parse_args()
    with psycopg.connect(args.url, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        customers = [r[0] for r in conn.execute("SELECT id FROM customers LIMIT 100000")]
        products = [r[0] for r in conn.execute("SELECT id FROM products")]
        if not customers or not products:
            sys.exit("the database holds no customers or products: import a bank first")
        sql = _pg_insert_all(ignore_duplicates=False)

        def backend_cpu() -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().split()
            return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

        try:
            for _ in range(30):  # warm-up: the statement gets prepared
                conn.execute(sql, batch(customers, products, args.per_commit))
            cpu, wall = backend_cpu(), time.perf_counter()
            for _ in range(args.batches):
                conn.execute(sql, batch(customers, products, args.per_commit))
            wall, cpu = time.perf_counter() - wall, backend_cpu() - cpu
        finally:
            conn.execute(
                "DELETE FROM offers WHERE decision_id IN "
                "(SELECT id FROM decisions WHERE staff_id = %s)",
                (STAFF,),
            )
            conn.execute("DELETE FROM decisions WHERE staff_id = %s", (STAFF,))
    decisions = args.batches * args.per_commit
    print(
        f"{args.batches} commits of {args.per_commit} decisions: "
        f"{wall / args.batches * 1e3:.2f} ms a commit, "
        f"backend CPU {cpu / decisions * 1e6:.0f} us a decision"
    )


if __name__ == "__main__":
    main()
