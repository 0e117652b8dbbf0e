"""CPU per decision inside the worker: the decision lane without HTTP or the commit.

Usage::

    NBO_DATABASE_URL=... NBO_DATA_DIR=... .venv/bin/python bench/decide.py
        [--decisions 20000] [--rounds 7] [--profile FILE]

Run it against a prepared bank, e.g. the one ``bench/serve.py --keep DIR`` leaves
(``NBO_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/nbo_bench_serve``,
``NBO_DATA_DIR=DIR/postgresql``, and ``NBO_FREQUENCY_CAP=1000000`` as that benchmark
sets it). It loads the serving state as a worker does (printing the time and its
memory), then drives
:func:`service.decision.lane.serve_decision` (key check, body validation, policy,
offers, the audit rows, the JSON answer) for random customers on one event loop, with
the audit write answered at once instead of committed. What is left out is what the
bare FastAPI endpoint of ``bench/serve.py`` pays too (uvicorn, sockets) and the
database's own work; what it measures is what the decision adds to a worker's CPU,
which at 32 connections in a closed loop sets its throughput and so its latency.

Prints the median microseconds per decision over ``--rounds`` rounds, with the
spread, and with ``--profile`` writes a cProfile of one more round.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.auth import KeyStore  # noqa: E402
from service.data import db  # noqa: E402
from service.decision.audit import AuditRecord, audit_writer  # noqa: E402
from service.decision.lane import serve_decision  # noqa: E402
from service.decision.state import ServingState  # noqa: E402
from service.settings import Settings  # noqa: E402

BODY = orjson.dumps({"channel": "branch", "staff_id": "S1", "branch_id": "B1", "max_offers": 3})


class InstantAudit:
    """The real writer's stamp, and a write that is durable at once (nothing stored)."""

    def __init__(self, real: Any) -> None:
        self.stamp = real.stamp
        self.records = 0
        self.offers = 0

    async def write(self, record: AuditRecord) -> bool:
        self.records += 1
        self.offers += len(record.offers)
        return True


class App:
    """What :func:`serve_decision` reads of the application: ``app.state.*``."""

    class state:  # noqa: N801 - mirrors Starlette's app.state
        pass


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def drive(app: Any, customers: list[str], key: str) -> float:
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    scopes = [
        {"type": "http", "headers": headers, "path": f"/v1/customers/{c}/decisions"}
        for c in customers
    ]
    started = time.perf_counter()
    for scope, customer in zip(scopes, customers, strict=True):
        await serve_decision(app, scope, receive, customer)
    return time.perf_counter() - started


def memory() -> str:
    """The process's resident memory: all of it, its private part, and its proportional
    share (PSS: pages mapped by several workers, the serving store's, counted once
    between them)."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as status:  # Linux only, as the benchmarks are
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) // 1024
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                fields["Pss"] = int(line.split()[1]) // 1024
    return (
        f"RSS {fields.get('VmRSS', 0):,} MiB ({fields.get('RssAnon', 0):,} private, "
        f"{fields.get('RssFile', 0):,} file-backed), PSS {fields.get('Pss', 0):,} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", type=Path, help="write a cProfile of one more round here")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    key = os.environ.get("NBO_BENCH_API_KEY")
    settings = Settings()
    if key is None:
        key_file = settings.data_dir / "api_key"
        if not key_file.exists():
            sys.exit(f"no API key: set NBO_BENCH_API_KEY or write one to {key_file}")
        key = key_file.read_text().strip()
    engine = db.engine_from_settings(settings)
    state = ServingState(engine, settings)
    loaded = time.perf_counter()
    snapshot = state.load()
    print(
        f"loaded {len(snapshot.customers):,} customers in {time.perf_counter() - loaded:.1f} s "
        f"(model {snapshot.version}); {memory()}",
        file=sys.stderr,
    )
    App.state.serving = state
    App.state.settings = settings
    App.state.keys = KeyStore(engine, ttl_seconds=settings.api_key_ttl_seconds)
    audit = InstantAudit(audit_writer(engine, settings.data_dir / "spool"))
    App.state.audit = audit

    ids = list(snapshot.customers)
    rng = random.Random(args.seed)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(drive(App, rng.choices(ids, k=2_000), key))  # warm caches
    per_decision = []
    for _ in range(args.rounds):
        customers = rng.choices(ids, k=args.decisions)
        gc.collect()
        seconds = loop.run_until_complete(drive(App, customers, key))
        per_decision.append(seconds / args.decisions * 1e6)
    if args.profile:
        profiler = cProfile.Profile()
        customers = rng.choices(ids, k=args.decisions)
        profiler.enable()
        loop.run_until_complete(drive(App, customers, key))
        profiler.disable()
        profiler.dump_stats(args.profile)
    median = statistics.median(per_decision)
    print(
        f"decision lane without HTTP or commit: {median:.1f} us a decision (median of "
        f"{args.rounds} rounds of {args.decisions:,}; min {min(per_decision):.1f}, max "
        f"{max(per_decision):.1f}); {audit.offers / max(audit.records, 1):.2f} offers a decision"
    )


if __name__ == "__main__":
    main()
