"""Decisions through a database outage: nothing acknowledged is lost, nothing is a 500.

Usage::

    .venv/bin/python bench/outage.py [--customers 5000] [--outage 45] [--before 10]
        [--after 20] [--rate 40] [--keep DIR] [--nbo COMMAND]

What it does, on PostgreSQL (the one database a bank runs apart from nbo):

1. prepares a bank as ``bench/serve.py`` does (generate, migrate, import, train, keys)
   in its own database ``nbo_bench_outage``, and starts ``nbo serve``;
2. sends decisions at ``--rate`` per second for ``--before`` seconds, then takes the
   database away for ``--outage`` seconds (``ALTER DATABASE ... ALLOW_CONNECTIONS
   false`` and every backend terminated: to nbo it is a server that refuses
   connections), then gives it back and goes on for ``--after`` seconds. Every second
   it also asks a route that needs the database (``GET /v1/models``) and the readiness
   probe;
3. waits for the spool to drain and checks that every decision answered 200 is in the
   ``decisions`` table.

It prints, per phase: decisions sent, answered 200 (of which degraded), 5xx by status,
other statuses, and the other routes' statuses (503 with ``Retry-After`` expected during
the outage, never 500); then the durability check. Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve  # noqa: E402 - bench/serve.py: preparation and server handling

serve.PG_DATABASE = "nbo_bench_outage"


def call(
    method: str, url: str, key: str | None, body: Any = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except OSError as exc:
        return 0, {}, str(exc).encode()


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decisions: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.others: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.answered: list[str] = []  # decision ids answered 200

    def decision(self, phase: str, status: int, body: bytes) -> None:
        with self.lock:
            self.decisions[phase]["sent"] += 1
            if status == 200:
                answer = json.loads(body)
                self.answered.append(answer["decision_id"])
                self.decisions[phase]["200"] += 1
                if answer.get("degraded"):
                    self.decisions[phase]["200 degraded"] += 1
            else:
                self.decisions[phase][str(status)] += 1

    def other(self, phase: str, what: str) -> None:
        with self.lock:
            self.others[phase][what] += 1


def outage(start: bool) -> None:
    name = serve.PG_DATABASE
    if start:
        serve.pg_admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
        serve.pg_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
    else:
        serve.pg_admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--outage", type=float, default=45.0)
    parser.add_argument("--before", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=40.0, help="decisions per second")
    parser.add_argument("--keep", type=Path, help="work folder kept between runs")
    parser.add_argument(
        "--nbo", help="the nbo command to serve with (default: the one beside this Python)"
    )
    args = parser.parse_args()
    if args.nbo:
        serve.nbo_command = lambda: args.nbo

    root = args.keep or Path(tempfile.mkdtemp(prefix="nbo-outage-"))
    bank, ids_file = serve.prepare_bank(root, args.customers)
    database = serve.prepare_database("postgresql", root, bank, args.customers)
    admin_file = database.folder / "admin_key"
    if not admin_file.exists():
        made = serve.subprocess.run(
            [serve.nbo_command(), "keys", "create", "--name", "ops", "--role", "admin", "--quiet"],
            env=database.env,
            cwd=database.folder,
            capture_output=True,
            text=True,
            check=True,
        )
        admin_file.write_text(made.stdout.strip())
    admin = admin_file.read_text().strip()
    ids = ids_file.read_text().split()
    server = serve.decision_server(database, workers=1)
    before_rows = serve.count_decisions(database.url)
    server.start()
    tally = Tally()
    try:
        server.wait_ready(180)
        phases = [("before", args.before), ("outage", args.outage), ("after", args.after)]
        for phase, seconds in phases:
            if phase == "outage":
                serve.say(f"database away for {seconds:.0f} s")
                outage(True)
            elif phase == "after":
                serve.say("database back")
                outage(False)
            run_phase(phase, seconds, server.url, database.api_key, admin, ids, args.rate, tally)
        serve.say("waiting for the spool to drain")
        recorded = wait_recorded(database.url, tally.answered, deadline=time.monotonic() + 120)
    finally:
        outage(False)
        server.stop()
    report(tally, recorded, serve.count_decisions(database.url) - before_rows, args)


def run_phase(
    phase: str,
    seconds: float,
    url: str,
    key: str | None,
    admin: str,
    ids: list[str],
    rate: float,
    tally: Tally,
) -> None:
    rng = random.Random(7)
    body = dict(serve.DECISION_BODY)
    end = time.monotonic() + seconds
    next_other = time.monotonic()
    while time.monotonic() < end:
        started = time.monotonic()
        status, _, answer = call(
            "POST", f"{url}/v1/customers/{rng.choice(ids)}/decisions", key, body
        )
        tally.decision(phase, status, answer)
        if started >= next_other:
            next_other = started + 1.0
            for route, path in (("models", "/v1/models"), ("ready", "/health/ready")):
                status, headers, _ = call("GET", url + path, admin)
                retry = (
                    " Retry-After"
                    if status == 503 and "retry-after" in {h.lower() for h in headers}
                    else ""
                )
                tally.other(phase, f"{route} {status}{retry}")
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))


def wait_recorded(url: str, answered: list[str], deadline: float) -> int:
    from sqlalchemy import bindparam, create_engine, text

    engine = create_engine(url)
    wanted = set(answered)
    found = 0
    try:
        while True:
            found = 0
            with engine.connect() as conn:
                ids = list(wanted)
                for i in range(0, len(ids), 5_000):
                    found += int(
                        conn.execute(
                            text("SELECT count(*) FROM decisions WHERE id IN :ids").bindparams(
                                bindparam("ids", expanding=True)
                            ),
                            {"ids": ids[i : i + 5_000]},
                        ).scalar_one()
                    )
            if found >= len(wanted) or time.monotonic() > deadline:
                return found
            time.sleep(1.0)
    finally:
        engine.dispose()


def report(tally: Tally, recorded: int, rows_added: int, args: argparse.Namespace) -> None:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(f"# Decisions through a {args.outage:.0f} s database outage (PostgreSQL)")
    print(f"machine: {cpu}, {os.cpu_count()} cores; load average {serve.load_average()}")
    print(f"rate {args.rate:.0f} decisions/s; {args.customers:,} customers\n")
    print("| phase | sent | 200 | of which degraded | 5xx | other |")
    print("|---|---|---|---|---|---|")
    for phase in ("before", "outage", "after"):
        c = tally.decisions[phase]
        server_errors = sum(n for s, n in c.items() if s[:1] == "5")
        other = {s: n for s, n in c.items() if s not in {"sent", "200", "200 degraded"}}
        other = {s: n for s, n in other.items() if s[:1] != "5"}
        print(
            f"| {phase} | {c['sent']} | {c['200']} | {c['200 degraded']} | {server_errors} "
            f"| {other or ''} |"
        )
    print("\nother routes, once a second (status counts):")
    for phase in ("before", "outage", "after"):
        print(f"- {phase}: {dict(sorted(tally.others[phase].items()))}")
    answered = len(tally.answered)
    lost = answered - recorded
    print(
        f"\ndurability: {answered} decisions answered 200, {recorded} of them in the "
        f"decisions table ({rows_added} rows added); lost: {lost}"
    )
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
