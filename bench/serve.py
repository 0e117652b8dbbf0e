"""Decision throughput: the real service against a bare FastAPI POST, on the same machine.

Usage::

    .venv/bin/python bench/serve.py [--customers 100000] [--database {postgresql,sqlite,both}]
        [--connections 32] [--duration 20] [--warmup 5] [--runs 2] [--workers 1[,2...]]
        [--threads 1] [--keep DIR] [--json FILE] [--pg-database NAME]
        [--activation [--activations 1] [--activation-interval 2]]
        [--soak SECONDS [--sample-every 10]] [--compare-customers N]
    .venv/bin/python bench/serve.py --only-bare            # the anchor alone (no database)
    .venv/bin/python bench/serve.py --target-url URL       # decisions from a server you started
    .venv/bin/python bench/serve.py --prepare-only ...     # prepare a bank and stop

At 1M customers (issue 17): prepare once, then serve with 1 and 2 workers::

    .venv/bin/python bench/serve.py --customers 1000000 --database postgresql \
        --keep /work/bench1m --pg-database nbo_bench_1m --activation --prepare-only
    .venv/bin/python bench/serve.py --customers 1000000 --database postgresql \
        --keep /work/bench1m --pg-database nbo_bench_1m --workers 1,2 --activation \
        --soak 600 --start-timeout 900 --json bench1m.json

What it measures: requests/s and latency (p50, p90, p99) of
``POST /v1/customers/{id}/decisions`` under wrk at ``--connections`` connections
(closed loop, loopback), for two servers run side by side with the same
``--workers``:

- bare: ``bench/bare.py``, FastAPI + uvicorn (uvloop, httptools), a pydantic body
  and a small orjson answer, nothing else. The anchor: what HTTP alone costs here.
- decision: ``nbo serve`` on a prepared bank, with an API key
  (``Authorization: Bearer <key>``).

The runs begin once the decision server has computed its first business figures
(10 s after its start; at a million customers tens of seconds of a child's and
PostgreSQL's CPU, then every five minutes, which ``--soak`` holds as they come): begun
at once, that first round fell in whichever of the first runs it met, bare's or the
decision's. Bare and decision runs alternate (``--runs`` pairs, after a warm-up of
each that is not reported) so both see the same machine noise; the report gives medians, the
ratio decision / bare (median of the pairs; issue 17's target is >= 0.75 with one
worker, with p99 <= 10 ms at 32 connections on PostgreSQL), non-2xx answers and socket
errors, the servers' RSS, and a durability check: the rows added to ``decisions``
during the run must be at least the 2xx answers wrk counted (every acknowledged
decision recorded, the activation and soak loads included). The rows are counted
right after the last decision run while the service is still up; with ``--sigkill``
the service is killed with SIGKILL first. Each decision run's line also gives the major
page faults its workers took and the CPU a request cost the workers and this machine's
PostgreSQL (its server processes, ended backends included): on two cores every
microsecond of the database's is taken from the worker and wrk. Bare runs give their
worker's CPU too, and both the share of the run a worker spent runnable but waiting
for a CPU (``/proc/PID/task/TID/schedstat``) and how busy the machine's cores were:
at 32 connections in a closed loop the p99 follows the throughput (Little's law: 32
requests in flight at 8,000/s is 4 ms on average), and a worker that waits for a CPU
held by wrk or PostgreSQL is latency no code of the service's can remove. The report
gives the medians, and the ratio of the worker's CPU per request, bare over decision:
what the throughput ratio would be if the worker's CPU alone set both. Each decision run
also gives the service's own latency, read from its ``/metrics`` (an admin key is made
for it): the share of the decisions it answered within 10 ms and the histogram bucket
that holds its p99, measured from the moment the decision lane takes a request until
the answer is on the socket. What wrk sees beyond that is the request waiting in the
socket and for the event loop, the kernel and wrk itself: in round 17, runs where wrk's
p99 was 88.7 ms had the service's own within 10 ms, and bare FastAPI's p999 was
74-78 ms in the same minutes (part of that was wrk itself: see ``bench/wrk/decision.lua``).

``--compare-customers N`` (e.g. 100000 beside ``--customers 1000000``): issue 17 asks
for decision speed at 1M customers "as at 100k". A second bank of N customers is
prepared like the first (under ``DIR/compare-N/``, PostgreSQL database
``<--pg-database>_N``), its decision server started after the main one is ready, and
each round runs bare, decision, then decision at N; the report gives the decisions/s at
``--customers`` over those at N (median of the rounds' ratios, read as "as at N" from
0.9: runs of one server differ by about that much here) and both p99s. Only the main
server is activated and soaked.

``--think-ms 5,10,20,40``: at 32 connections back to back, the latency is set by the
worker's throughput (the mean is 32 / requests a second, and an event loop answering in
bursts puts the p99 near twice that: see ``bench/wire.py``). A teller system does not
send that way: each connection waits while a teller serves a customer. After the
measured rounds, one bare and one decision run per think time, each connection pausing
a random time of that mean (exponential) before each request; the report gives the rate
and latency of each, and the highest decision rate whose p99 is within the target, as a
share of the back-to-back rate: what one worker can carry within it, for sizing.

With ``--workers 1,2`` every database gets one section per worker count, both servers
restarted with that many workers. The decision server starts alone (the bare one after
it is ready), and the section reports:

- ready: seconds from the start of ``nbo serve`` until ``/health/ready`` answers 200
  and, with several workers, until each has logged uvicorn's "Application startup
  complete" (a worker accepts connections only once ready); "cold" when
  ``NBO_DATA_DIR/serving/`` (what the service keeps on disk) was absent, else "warm".
  ``bench/startup.py`` measures repeated starts.
- memory after the measured runs: RSS, PSS (``/proc/PID/smaps_rollup``, shared pages
  split between the processes that map them, so the workers' PSS add up to what they
  hold together) and peak RSS of every process of the server, the workers' sums, and
  bytes a customer (the workers' PSS over the customers).
- ``--activation``: wrk in consecutive ``--activation-interval`` runs (wrk gives one
  latency distribution a run); after six normal intervals, ``POST
  /v1/models/{version}/activate`` with an admin key switches to the other registered
  version, and decisions are probed until every worker answers with it. The p99 of
  the worst interval overlapping that window is compared with the median p99 of the
  intervals before it (target <= 2 x). Intervals are short (2 s) because a pause of
  the 32 in-flight requests is under 1% of a longer interval's requests and would not
  move its p99; wrk restarts between intervals (tens of ms; reading the ids file, more
  at 1M customers), so the load has short gaps. One interval's p99 is noisy (on a
  shared machine a normal interval's p99 ranged from 7 to 34 ms in one run):
  ``--activations N`` activates N times, back and forth, each against the intervals
  right before it, and the target is judged on the median of the N ratios.
- ``--soak SECONDS``: a load of that length, as consecutive wrk runs of
  ``--sample-every`` seconds with every process's RSS and PSS read after each (under
  load), reported per worker and for the workers together: start, end, max, and the
  least-squares slope in MiB a minute, with the growth per 1,000 decisions.

Each section ends with the issue 17 targets beside today's figures (quoted from the
issue: about 1.0 GB per 100k customers per worker; ready in 35-48 s at 100k; about
1.0 x bare; a full gc of about 1 s at 100k on activation; 2.5 GB after 178k
decisions at 100k).

Preparation, per database (cached under ``--keep DIR``, else in a temporary folder
removed at the end): ``nbo generate --customers N --seed 1`` (the generator's fixed
product catalogue: nothing to set), a fresh PostgreSQL database ``nbo_bench_serve``
(``--pg-database``; dropped first if it exists; admin URL from
``NBO_BENCH_POSTGRES_URL``, default the local server) or a SQLite file, then ``nbo db
upgrade``, ``nbo import bank``, ``nbo train`` and ``nbo keys create --name bench
--role teller --quiet``, with ``NBO_DATABASE_URL`` and ``NBO_DATA_DIR`` set for the
child. With ``--activation``, once per database: a second ``nbo train --horizon-days
60`` (another model, so that activating it is a real switch) and an admin key
(``--name bench-admin --role admin``). If the key command fails the runs go on
without a key (and the decision answers will likely be 401s). ``--prepare-only``
stops there (a large bank can be prepared ahead, e.g. under ``nice``).
Before the servers start, each database is settled (PostgreSQL: ``VACUUM ANALYZE``
and ``CHECKPOINT``; SQLite: ``ANALYZE`` and a WAL checkpoint), so the runs do not pay
for writing back what the import or earlier runs left dirty.
Other ``NBO_*`` variables in the environment reach the service unchanged. The
frequency cap is lifted (``NBO_FREQUENCY_CAP=1000000`` unless set): customers are drawn
at random and asked many times a run, and capped customers would get fewer offers, so
later runs would do less work; the report gives the offers recorded per decision.

Customer ids are drawn at random per request from the generated customers file
(``bench/wrk/decision.lua``). To serve another tree's code (e.g. the last commit, to
print "today" beside a change), put it first on the path: ``git archive HEAD | tar -x
-C /tmp/head`` and ``PYTHONPATH=/tmp/head``; the report names the code it served. wrk is installed with apt-get when missing and the
script runs as root; otherwise install it yourself (``apt-get install wrk``).
Progress goes to stderr, the report to stdout; server logs stay in the work folder
(``--keep``) for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LUA_SCRIPT = REPO / "bench" / "wrk" / "decision.lua"
BARE_APP = REPO / "bench" / "bare.py"
ADMIN_URL = os.environ.get(
    "NBO_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PG_DATABASE = "nbo_bench_serve"
HOST = "127.0.0.1"
SEED = 1
DECISION_BODY = {"channel": "branch", "staff_id": "S1", "branch_id": "B1", "max_offers": 3}
TARGET_RATIO = 0.75  # issue 17: with one worker
TARGET_READY_S = 20.0
TARGET_TWO_WORKERS_MB = 2048.0
TARGET_ACTIVATION_RATIO = 2.0
# Today's figures (issue 17, before the columnar serving state), printed beside ours.
TODAY_MB_PER_100K_PER_WORKER = 1024.0
TODAY_READY = "35-48 s at 100k customers (6-8 min at 1M)"
TODAY_RATIO = "about 1.0 x bare at 100k on PostgreSQL, p99 under 10 ms"
TODAY_SOAK = "1.0 -> 2.5 GB a worker after 178k decisions at 100k (about 8.6 KB a decision)"
TODAY_ACTIVATION = "a full gc of about 1 s at 100k holds the GIL while requests wait"
FREQUENCY_CAP = 1_000_000
ACTIVATION_BEFORE = 6  # normal intervals before the activation
ACTIVATION_AFTER = 3  # intervals after every worker serves the new version
FOLLOW_STREAK = 5  # decisions in a row naming the new version, per worker
SECOND_HORIZON_DAYS = 60
PG_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
TARGET_P99_MS = 10.0
TARGET_SCALED = 0.9
"""Decisions/s at --customers over those at --compare-customers in the same rounds, read
as "as at 100k": within the 10% that runs of one server differ by here."""


def say(message: str) -> None:
    """Progress, on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    # Which code `nbo serve` runs (PYTHONPATH can point it at another tree, e.g. a
    # `git archive` of the commit to compare with).
    code = subprocess.run(
        [sys.executable, "-c", "import service; print(service.__file__)"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0].split(" Copyright")[0].strip(),
        "load_average": load_average(),
        "service_code": str(Path(code.stdout.strip()).parent.parent) if code.stdout else "?",
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("wrk is missing: install it (sudo apt-get install -y wrk) and run again")
    say("wrk is missing: apt-get install -y wrk")
    # apt's chatter goes to stderr with the progress: stdout is the report.
    subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=sys.stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def nbo_command() -> str:
    beside = Path(sys.executable).with_name("nbo")
    found = str(beside) if beside.exists() else shutil.which("nbo")
    if not found:
        sys.exit("the nbo command is missing: run this with .venv/bin/python (make install)")
    return found


# ----------------------------------------------------------------------- preparation


@dataclass
class Database:
    """A prepared database: where it lives and the environment nbo needs for it."""

    kind: str
    folder: Path
    url: str
    env: dict[str, str]
    api_key: str | None = None
    admin_key: str | None = None


def run_logged(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
    """Run ``argv``, appending its output to ``log``; on failure show the tail and stop."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        rc = subprocess.run(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"`{' '.join(argv[1:])}` failed (exit {rc}); {log}:\n{tail}")
    say(f"  {' '.join(argv[1:])}: {time.perf_counter() - started:.1f} s")


def prepare_bank(root: Path, customers: int) -> tuple[Path, Path]:
    """Generate the bank once per customer count; write the customer ids wrk draws from."""
    bank = root / "bank"
    marker = bank / ".bench-customers"
    ids = root / "customer_ids.txt"
    if marker.exists() and marker.read_text().strip() == str(customers) and ids.exists():
        say(f"reusing the bank in {bank}")
        return bank, ids
    shutil.rmtree(bank, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    say(f"generating a bank of {customers:,} customers in {bank}")
    run_logged(
        [nbo_command(), "generate", "--customers", str(customers), "--seed", str(SEED)]
        + ["--out", str(bank)],
        dict(os.environ),
        root,
        root / "generate.log",
    )
    with (bank / "customers.csv").open(newline="") as src, ids.open("w") as out:
        for row in csv.DictReader(src):
            out.write(urllib.parse.quote(row["customer_id"], safe="") + "\n")
    marker.write_text(str(customers))
    return bank, ids


def pg_admin(statement: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def database_url(kind: str, folder: Path, pg_database: str = PG_DATABASE) -> str:
    if kind == "sqlite":
        return f"sqlite:///{(folder / 'nbo.sqlite3').resolve()}"
    from sqlalchemy.engine import make_url

    return make_url(ADMIN_URL).set(database=pg_database).render_as_string(hide_password=False)


def database_identity(kind: str, pg_database: str = PG_DATABASE) -> int | None:
    """The oid of the bench PostgreSQL database (a new one each time it is created)."""
    if kind != "postgresql":
        return None  # the SQLite file lives in the work folder itself
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN_URL)
    try:
        with engine.connect() as conn:
            oid = conn.execute(
                text("SELECT oid FROM pg_database WHERE datname = :name"), {"name": pg_database}
            ).scalar_one_or_none()
            return None if oid is None else int(oid)
    finally:
        engine.dispose()


def count_decisions(url: str) -> int:
    return count_rows(url, "decisions")


def count_rows(url: str, table: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def child_env(folder: Path, url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["NBO_DATABASE_URL"] = url
    env["NBO_DATA_DIR"] = str(folder)
    env.pop("NBO_BENCH_API_KEY", None)
    return env


def prepare_database(
    kind: str, root: Path, bank: Path, customers: int, pg_database: str = PG_DATABASE
) -> Database:
    """Migrate, import and train into a fresh database, unless ``root`` holds a ready one."""
    folder = root / kind
    url = database_url(kind, folder, pg_database)
    env = child_env(folder, url)
    marker = folder / "prepared.json"
    wanted = {"customers": customers, "database_url": url}
    reuse = False
    if marker.exists():
        kept = json.loads(marker.read_text())
        try:
            # The PostgreSQL database is shared by name with any other work folder: its oid
            # tells whether it is still the one prepared here.
            reuse = kept == wanted | {"identity": database_identity(kind, pg_database)}
            count_decisions(url)
        except Exception as exc:  # noqa: BLE001 - any failure: prepare again
            reuse = False
            say(f"{kind}: the kept database is not usable ({type(exc).__name__}); preparing again")
    if reuse:
        say(f"{kind}: reusing the database prepared in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if kind == "postgresql":
            # pg_database is checked by parse_args (PG_NAME): a plain lower-case identifier.
            pg_admin(f"DROP DATABASE IF EXISTS {pg_database} WITH (FORCE)")
            pg_admin(f"CREATE DATABASE {pg_database}")
        say(f"{kind}: preparing {url} (log: {folder / 'prepare.log'})")
        nbo = nbo_command()
        for step in (["db", "upgrade"], ["import", "bank", str(bank)], ["train"]):
            run_logged([nbo, *step], env, folder, folder / "prepare.log")
        marker.write_text(json.dumps(wanted | {"identity": database_identity(kind, pg_database)}))
    database = Database(kind, folder, url, env)
    database.api_key = api_key(database)
    return database


def model_versions(url: str) -> list[tuple[str, str]]:
    """The registered model versions (version, status), oldest first."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT version, status FROM model_versions ORDER BY created_at, id")
            ).all()
            return [(str(r[0]), str(r[1])) for r in rows]
    finally:
        engine.dispose()


# Registers the active version's bundle again under a new version id (through the
# registry, in the service's own code: the child runs with the database's environment).
COPY_VERSION = """
import pathlib, sys, tempfile
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from service.data import registry
engine = create_engine(sys.argv[1])
with Session(engine) as session, session.begin(), tempfile.TemporaryDirectory() as tmp:
    row = registry.active_version(session)
    if row is None:
        sys.exit("no active model version to copy")
    bundle = registry.materialise(session, row, pathlib.Path(tmp) / "from")
    new, _ = registry.register(
        session, bundle=bundle, artifacts_dir=pathlib.Path(tmp) / "to", as_of=row.as_of,
        horizon_days=row.horizon_days, params=dict(row.params or {}),
        metrics={"copied_from": row.version}, gate_metric="map_at_3", tolerance=0.0,
        version=registry.new_version_id(row.checksum) + "-copy",
    )
    print("registered", new.version, new.status)
"""


def ensure_second_version(database: Database, how: str = "train") -> list[tuple[str, str]]:
    """At least two registered model versions, so an activation has one to switch to.

    ``train`` (the default): a real training run with another horizon (``nbo train
    --horizon-days 60``), a different model, so activating it rebuilds what the service
    derives from the model. ``copy``: the active bundle registered again under a new
    version id, in seconds instead of a training run (the service might recognise the
    same bundle and skip work: a lower bound of an activation's cost). Whether the
    promotion gate activates the second version does not matter: the activation under
    load switches to whichever version is not active. Done once; the database keeps it.
    """
    versions = model_versions(database.url)
    if len(versions) < 2:
        say(f"{database.kind}: a second model version for the activation run ({how})")
        if how == "copy":
            script = database.folder / "copy_version.py"
            script.write_text(COPY_VERSION)
            argv = [sys.executable, "-P", str(script), database.url]  # -P: not its folder
        else:
            argv = [nbo_command(), "train", "--horizon-days", str(SECOND_HORIZON_DAYS)]
        run_logged(argv, database.env, database.folder, database.folder / "prepare.log")
        versions = model_versions(database.url)
    if len(versions) < 2:
        raise RuntimeError(f"{database.kind}: still fewer than two model versions: {versions}")
    return versions


PG_SETTINGS = ("shared_buffers", "synchronous_commit", "autovacuum", "max_wal_size")
"""PostgreSQL settings a decision's cost depends on, printed with each section."""


def settle(kind: str, url: str) -> str:
    """Statistics fresh and dirty pages written before any run: a database just imported
    (or grown by earlier runs) otherwise spends the first runs writing the import's
    pages back, and those runs measure that instead of decisions (seen: p99 14 ms in the
    runs after an import, 7 ms in the same runs on the settled database).

    Returns what the runs start from: on PostgreSQL, the rows already in the audit
    tables and :data:`PG_SETTINGS` (a database grown by earlier runs answers slower with
    a small ``shared_buffers``: runs are comparable on equal footing only)."""
    from sqlalchemy import create_engine, text

    started = time.perf_counter()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    state = ""
    try:
        with engine.connect() as conn:
            if kind == "postgresql":
                conn.execute(text("VACUUM ANALYZE"))
                conn.execute(text("CHECKPOINT"))
                rows = dict(
                    conn.execute(
                        text(
                            "SELECT relname, reltuples::bigint FROM pg_class "
                            "WHERE relname IN ('decisions', 'offers') AND relkind = 'r'"
                        )
                    ).all()
                )
                settings = [
                    f"{name} {conn.execute(text(f'SHOW {name}')).scalar()}" for name in PG_SETTINGS
                ]
                state = (
                    f"database: {rows.get('decisions', 0):,} decisions and "
                    f"{rows.get('offers', 0):,} offers before the runs; " + ", ".join(settings)
                )
            else:
                conn.execute(text("ANALYZE"))
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    finally:
        engine.dispose()
    say(f"{kind}: vacuumed, analysed and checkpointed in {time.perf_counter() - started:.1f} s")
    if state:
        say(f"{kind}: {state}")
    return state


def api_key(database: Database, role: str = "teller") -> str | None:
    """The bench key of this database and role: made once with `nbo keys create`, kept in
    a file (``api_key`` for the teller key of the decisions, ``api_key.admin`` for the
    admin key of the activation)."""
    path = database.folder / ("api_key" if role == "teller" else f"api_key.{role}")
    if path.exists():
        return path.read_text().strip() or None
    name = "bench" if role == "teller" else f"bench-{role}"
    argv = [nbo_command(), "keys", "create", "--name", name, "--role", role]
    argv += ["--quiet"]
    done = subprocess.run(
        argv, env=database.env, cwd=database.folder, capture_output=True, text=True
    )
    key = done.stdout.strip()
    if done.returncode != 0 or not key or len(key.split()) != 1:
        # Typer draws errors in a box: keep the words.
        words = [line.strip(" │╭╮╰╯─") for line in (done.stderr + done.stdout).splitlines()]
        detail = next((w for w in reversed(words) if w and w != "Error"), "no output")
        say(
            f"{database.kind}: `nbo keys create` failed (exit {done.returncode}: {detail}); "
            "running WITHOUT an API key"
        )
        return None
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


# --------------------------------------------------------------------------- memory


def group_pids(group: int) -> list[int]:
    """The processes of a process group (a server started in its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat_fields(int(entry.name))[2]) == group:
                found.append(int(entry.name))
    return found


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command's name (the state first);
    OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_memory(pid: int) -> dict[str, float]:
    """RSS and PSS (``/proc/PID/smaps_rollup``) and peak RSS (``VmHWM``) of one process,
    in MiB; empty when the process is gone.

    PSS charges each shared page to the processes mapping it in equal parts, so the PSS
    of the workers add up to what they hold together, where their RSS would count a
    page that every worker maps (a memory-mapped serving store) once per worker.
    """
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                out[f"{name.lower()}_mb"] = int(rest.split()[0]) / 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["hwm_mb"] = int(line.split()[1]) / 1024
    return out


def process_role(pid: int, leader: int, workers: int) -> str:
    """``worker``, ``supervisor`` (uvicorn's parent with --workers > 1) or ``other``."""
    if workers == 1:
        # One worker serves in the process nbo serve started.
        return "worker" if pid == leader else "other"
    if pid == leader:
        return "supervisor"
    with contextlib.suppress(OSError):
        # uvicorn starts its workers with multiprocessing's spawn.
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return "worker"
    return "other"


def memory_snapshot(leader: int, pids: list[int], workers: int) -> dict[str, Any]:
    """Per process memory of a server group, and the sums over its workers and over all."""
    processes = []
    for pid in sorted(pids):
        figures = process_memory(pid)
        if figures:
            processes.append({"pid": pid, "role": process_role(pid, leader, workers)} | figures)
    in_workers = [p for p in processes if p["role"] == "worker"]
    return {
        "processes": processes,
        "workers": len(in_workers),
        "workers_rss_mb": sum(p.get("rss_mb", 0.0) for p in in_workers),
        "workers_pss_mb": sum(p.get("pss_mb", 0.0) for p in in_workers),
        "total_rss_mb": sum(p.get("rss_mb", 0.0) for p in processes),
        "total_pss_mb": sum(p.get("pss_mb", 0.0) for p in processes),
    }


def folder_mb(path: Path) -> float | None:
    """Bytes under ``path`` in MiB, None when it does not exist."""
    if not path.exists():
        return None
    total = 0
    for entry in path.rglob("*"):
        with contextlib.suppress(OSError):
            if entry.is_file():
                total += entry.stat().st_size
    return total / 2**20


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A server process in its own session, so it and its workers stop as a group."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    port: int
    ready_path: str | None = None  # GET this until 200; None: until the port answers
    process: subprocess.Popen[bytes] | None = None
    workers: int = 1
    started: float = 0.0
    ready_seconds: float | None = None  # the first worker answers /health/ready
    all_ready_seconds: float | None = None  # every worker logged its startup complete
    log_offset: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        say(f"starting {self.name}: {' '.join(self.argv[1:])} (log: {self.log})")
        self.started = time.perf_counter()
        self.ready_seconds = self.all_ready_seconds = None
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited (code {self.process.returncode}):\n{self.log_tail()}"
                )
            if self.ready_seconds is None and self._answers():
                self.ready_seconds = time.perf_counter() - self.started
                say(f"{self.name} is ready on {self.url} after {self.ready_seconds:.1f} s")
            if self.ready_seconds is not None:
                if self.workers == 1 or self.ready_path is None:
                    self.all_ready_seconds = self.ready_seconds
                    return
                # Workers share the listening socket and a worker accepts only once its
                # startup is over, so the first 200 says one worker is ready: the others
                # are known ready by uvicorn's line in the log.
                if self.startups_logged() >= self.workers:
                    self.all_ready_seconds = time.perf_counter() - self.started
                    say(
                        f"{self.name}: all {self.workers} workers ready after "
                        f"{self.all_ready_seconds:.1f} s"
                    )
                    return
            time.sleep(0.1)
        if self.ready_seconds is not None:
            say(f"{self.name}: not all workers logged their startup in {timeout:.0f} s")
            return
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def startups_logged(self) -> int:
        """uvicorn's "Application startup complete." lines written since this start."""
        with contextlib.suppress(OSError), self.log.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().count(b"Application startup complete")
        return 0

    def _answers(self) -> bool:
        if self.ready_path is None:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def pids(self) -> list[int]:
        """The server's processes: everything in its process group (uvicorn workers too)."""
        return [] if self.process is None else group_pids(self.process.pid)

    def worker_pids(self) -> list[int]:
        """The processes that answer requests (not the supervisor, not a child that
        computes the business figures or builds a store)."""
        if self.process is None:
            return []
        leader = self.process.pid
        return [p for p in self.pids() if process_role(p, leader, self.workers) == "worker"]

    def memory_mb(self) -> tuple[float, float]:
        """Current RSS and the sum of each process's peak RSS, in MiB, over the group."""
        rss = hwm = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        return rss / 1024, hwm / 1024

    def memory(self) -> dict[str, Any]:
        """RSS and PSS of each process of the group, its role told apart (see
        :func:`memory_snapshot`)."""
        assert self.process is not None
        return memory_snapshot(self.process.pid, self.pids(), self.workers)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL after 20 s; ``kill``: SIGKILL now."""
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None:
            if kill:
                say(f"killing {self.name} (SIGKILL)")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            else:
                say(f"stopping {self.name}")
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop in 20 s: SIGKILL")
        # Whatever is left of the group (workers of a killed supervisor).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.process = None


def bare_server(folder: Path, workers: int, name: str = "bare") -> Server:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    port = free_port()
    argv = [sys.executable, str(BARE_APP), "--host", HOST, "--port", str(port)]
    argv += ["--workers", str(workers)]
    return Server(name, argv, env, folder, folder / f"{name}-server.log", port, workers=workers)


FIGURES_WAIT = 300.0
"""Seconds to wait, at most, for a decision server's first business figures."""
FIGURES_LOCK = "figures.lock"
"""The data folder's business-figures lock (service.app.FIGURES_LOCK; the bench imports
nothing of the service, which may be another checkout's)."""


def await_first_figures(database: Database, started: float, timeout: float) -> float | None:
    """Seconds from ``started`` (a monotonic time) until the decision server's first
    business figures are computed, or None when they were not within ``timeout`` (or
    are off: ``NBO_FIGURES_INTERVAL_SECONDS=0``).

    A worker computes them 10 s after its start, at a million customers for tens of
    seconds of a child's and PostgreSQL's CPU, and then every five minutes. Measured
    runs that began at once would hold that first round in whichever of the first runs
    it fell, bare's or the decision's, and the pairs would compare unlike machines; the
    soak (``--soak``) holds the rounds as they come. Computed means the lock file
    (:data:`FIGURES_LOCK`) has been written (by the worker holding its lock) and
    its lock is free again.
    """
    interval = database.env.get("NBO_FIGURES_INTERVAL_SECONDS")
    if interval is not None and float(interval or 0) <= 0:
        return None
    path = database.folder / FIGURES_LOCK
    deadline = started + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    pass  # a worker is computing them
                else:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    return time.monotonic() - started
        time.sleep(0.2)
    return None


def decision_server(database: Database, workers: int) -> Server:
    port = free_port()
    argv = [nbo_command(), "serve", "--host", HOST, "--port", str(port), "--workers", str(workers)]
    env = dict(database.env)
    # The load draws customers at random, so within a run most are asked several times;
    # with the default cap (3 offers of a product per 30 days) later runs would answer
    # fewer offers, write less and look faster. Lifted, every run does the same work.
    env.setdefault("NBO_FREQUENCY_CAP", str(FREQUENCY_CAP))
    # The business figures are computed 10 s after a start unless a worker of the same
    # data folder did within half their interval (FIGURES_LOCK): servers
    # started a minute or two apart, as in a series alternating two checkouts, would
    # compute them every other start. Forgotten, every start does the same work.
    with contextlib.suppress(FileNotFoundError):
        (database.folder / FIGURES_LOCK).unlink()
    return Server(
        "decision",
        argv,
        env,
        database.folder,
        database.folder / "decision-server.log",
        port,
        ready_path="/health/ready",
        workers=workers,
    )


def probe(url: str, customer_id: str, key: str | None) -> str:
    """One decision by hand, to show what the service answers before the load starts."""
    request = urllib.request.Request(
        f"{url}/v1/customers/{customer_id}/decisions",
        data=json.dumps(DECISION_BODY).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {key}"} if key else {}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        return f"no answer ({exc})"
    text = body.decode(errors="replace").replace("\n", " ")
    return f"{status} {text[:300]}{'...' if len(text) > 300 else ''}"


# ------------------------------------------------------------------------------ load


def usage(pids: list[int], *, children: bool = False) -> tuple[int, int, float]:
    """Minor and major page faults and CPU seconds (user and system) the processes
    ``pids`` took so far, summed; with ``children``, the CPU of their children already
    waited for too (a PostgreSQL server's ended backends; not a worker's, whose
    business-figures child is not a request's work)."""
    minor = major = ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat_fields(pid)
            minor, major = minor + int(fields[7]), major + int(fields[9])
            ticks += sum(int(f) for f in fields[11 : 15 if children else 13])
    return minor, major, ticks / os.sysconf("SC_CLK_TCK")


def cpu_waits(pids: list[int]) -> float:
    """Seconds the threads of the processes ``pids`` have spent runnable but waiting for
    a CPU (``/proc/PID/task/TID/schedstat``, its second field), summed: time a request
    waited that no code of the worker's could have saved. 0 where the kernel keeps no
    such figures."""
    waited = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    waited += int((task / "schedstat").read_text().split()[1])
    return waited / 1e9


def machine_busy() -> tuple[int, int]:
    """This machine's CPU time so far, in ticks of all its cores: (busy, total); busy
    is all but idle and I/O wait (``/proc/stat``; its guest fields are left out, as
    they are counted in user time already)."""
    with contextlib.suppress(OSError, ValueError):
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
        fields = [int(f) for f in line.split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)
    return 0, 0


def database_pids() -> list[int]:
    """This machine's PostgreSQL server processes (empty when it runs elsewhere)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                    found.append(int(entry.name))
    return found


def run_wrk(
    url: str,
    ids: Path,
    key: str | None,
    seconds: int,
    args: argparse.Namespace,
    server: Server | None = None,
    *,
    database: bool = True,
    metrics_key: str | None = None,
    think_ms: float = 0.0,
) -> dict[str, Any]:
    """One wrk run (each connection pausing ``think_ms`` on average before each request,
    if positive: see ``bench/wrk/decision.lua``); the figures from the lua script's
    WRK_RESULT line, and with ``server`` the page faults its workers took meanwhile
    (``major_faults``: a page read from disk while the worker's requests waited), the CPU its workers and (with
    ``database``) this machine's PostgreSQL used per request answered (``worker_us``,
    ``database_us``), the share of the run a worker spent waiting for a CPU while it had
    work (``worker_wait_pct``, averaged over the workers) and how busy the machine's
    cores were (``machine_busy_pct``). With ``metrics_key`` (a key that reads
    ``/metrics``), also the service's own latency of the decisions it answered
    meanwhile (:func:`served_latency`)."""
    served = served_buckets(url, metrics_key) if metrics_key else None
    database_processes = database_pids() if server is not None and database else []
    worker_pids = server.worker_pids() if server is not None else []
    workers = usage(worker_pids) if server is not None else None
    queried = usage(database_processes, children=True)
    waited = cpu_waits(worker_pids)
    busy = machine_busy()
    started = time.monotonic()
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s"]
    argv += ["--timeout", "10s", "-s", str(LUA_SCRIPT), url, "--", str(ids)]
    env = dict(os.environ)
    env["NBO_BENCH_API_KEY"] = key or ""
    env["NBO_BENCH_THINK_MS"] = f"{think_ms:g}" if think_ms > 0 else ""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 120)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_RESULT "))
            result["errors"] = sum(
                result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            )
            result["ok"] = result["requests"] - result["non2xx"]
            if server is not None and workers is not None:
                minor, major, cpu = usage(worker_pids)
                wall = time.monotonic() - started
                busy_after = machine_busy()
                result["minor_faults"], result["major_faults"] = (
                    minor - workers[0],
                    major - workers[1],
                )
                result["worker_wait_pct"] = (
                    100 * (cpu_waits(worker_pids) - waited) / wall / max(len(worker_pids), 1)
                )
                if busy_after[1] > busy[1]:
                    result["machine_busy_pct"] = (
                        100 * (busy_after[0] - busy[0]) / (busy_after[1] - busy[1])
                    )
                if result["requests"]:
                    per = 1e6 / result["requests"]
                    result["worker_us"] = (cpu - workers[2]) * per
                    if database_processes:
                        result["database_us"] = (
                            usage(database_processes, children=True)[2] - queried[2]
                        ) * per
            if served is not None:
                # Read after the CPU figures, so rendering /metrics is not counted in them.
                result.update(served_latency(served, served_buckets(url, metrics_key)))
            return result
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}{done.stderr}")


@dataclass
class Section:
    """The measurements of one database (or of --only-bare / --target-url)."""

    label: str
    bare: list[dict[str, Any]] = field(default_factory=list)
    decision: list[dict[str, Any]] = field(default_factory=list)
    bare_memory: tuple[float, float] = (0.0, 0.0)
    decision_memory: tuple[float, float] | None = None
    probe: str | None = None
    durability: dict[str, Any] | None = None
    load_before: str = ""
    load_after: str = ""
    api_key: bool = False
    workers: int = 1
    customers: int = 0
    ready_seconds: float | None = None
    all_ready_seconds: float | None = None
    figures_seconds: float | None = None  # the first business figures, after the start
    serving_before_mb: float | None = None  # <NBO_DATA_DIR>/serving/ at start; None: absent
    memory: dict[str, Any] | None = None  # decision server, after the measured runs
    activations: list[dict[str, Any]] = field(default_factory=list)
    soak: dict[str, Any] | None = None
    database_state: str = ""  # what settle() found before the runs
    compare: list[dict[str, Any]] = field(default_factory=list)  # --compare-customers runs
    compare_customers: int = 0
    compare_durability: dict[str, Any] | None = None
    think: list[dict[str, Any]] = field(default_factory=list)  # --think-ms runs


@dataclass
class Comparison:
    """The --compare-customers bank's decision server and what its load needs."""

    server: Server
    ids: Path
    database: Database


def describe_run(name: str, result: dict[str, Any]) -> None:
    faults = result.get("major_faults")
    say(
        f"  {name:8s} {result['rps']:9,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
        f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non2xx']:,}  errors {result['errors']:,}"
        + (f"  major faults {faults:,}" if faults is not None else "")
        + (f"  CPU a request: worker {result['worker_us']:.0f} us" if "worker_us" in result else "")
        + (f", PostgreSQL {result['database_us']:.0f} us" if "database_us" in result else "")
        + (
            f"; a worker waited for a CPU {result['worker_wait_pct']:.0f}% of the run, "
            f"the machine {result.get('machine_busy_pct', 0):.0f}% busy"
            if "worker_wait_pct" in result
            else ""
        )
        + (
            f"; the service's own: {result['served_within_pct']:.2f}% within "
            f"{TARGET_P99_MS:.0f} ms, p99 <= {result['served_p99_le_ms']:g} ms"
            if "served_p99_le_ms" in result
            else ""
        )
    )


def post(
    url: str, key: str | None, body: dict[str, Any] | None, timeout: float
) -> tuple[int, bytes]:
    """POST ``body`` as JSON (or nothing); the status and the answer (errors included)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else b"",
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {key}"} if key else {}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError as exc:
        return 0, str(exc).encode()


def served_version(url: str, customer_id: str, key: str | None) -> str | None:
    """The model version one decision names (a new connection, so any worker may answer)."""
    status, body = post(f"{url}/v1/customers/{customer_id}/decisions", key, DECISION_BODY, 10)
    if status != 200:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        version = json.loads(body).get("model_version")
        return str(version) if version is not None else None
    return None


class IntervalLoad:
    """Consecutive short wrk runs in a thread, each result stamped with its start and end
    (seconds since ``origin``): wrk reports one latency distribution per run, so short
    runs give the latency of each interval of a longer load."""

    def __init__(
        self,
        url: str,
        ids: Path,
        key: str | None,
        seconds: int,
        args: argparse.Namespace,
        server: Server | None = None,
    ) -> None:
        self.url, self.ids, self.key, self.seconds, self.args = url, ids, key, seconds, args
        self.server = server
        self.origin = time.monotonic()
        self.intervals: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wrk-intervals", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self.origin

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                start = self.now()
                result = run_wrk(self.url, self.ids, self.key, self.seconds, self.args, self.server)
                self.intervals.append(result | {"start_s": start, "end_s": self.now()})
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def start(self) -> IntervalLoad:
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        """Let the current run finish, then return every interval."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the interval load failed: {self.error}") from self.error
        return self.intervals


def measure_activation(
    decision: Server, ids: Path, key: str | None, database: Database, args: argparse.Namespace
) -> dict[str, Any]:
    """Activate the other model version through the API while wrk runs in short intervals.

    Window: from the POST until every worker answers with the new version (decisions
    probed on new connections until ``FOLLOW_STREAK`` in a row name it; a worker that
    did not answer the POST follows at its next poll). Normal p99: the median p99 of the
    intervals that ended before the POST; activation p99: the worst p99 of the intervals
    that overlap the window.
    """
    versions = model_versions(database.url)
    active = next((v for v, status in versions if status == "active"), None)
    target = next(v for v, _ in reversed(versions) if v != active)
    customer = ids.open().readline().strip()
    interval = args.activation_interval
    say(
        f"activation under load: {ACTIVATION_BEFORE} intervals of {interval} s, then "
        f"POST /v1/models/{target}/activate (active: {active})"
    )
    load = IntervalLoad(decision.url, ids, key, interval, args, decision).start()
    try:
        while len(load.intervals) < ACTIVATION_BEFORE and load.error is None:
            time.sleep(0.1)
        time.sleep(interval / 2)  # into the middle of an interval
        posted = load.now()
        status, body = post(
            f"{decision.url}/v1/models/{target}/activate",
            database.admin_key,
            None,
            timeout=args.start_timeout,
        )
        answered = load.now()
        say(f"  activate: {status} after {answered - posted:.2f} s: {body[:200]!r}")
        followed = None
        streak = 0
        while status == 200 and load.now() - posted < args.start_timeout:
            streak = streak + 1 if served_version(decision.url, customer, key) == target else 0
            if streak >= FOLLOW_STREAK * decision.workers:
                followed = load.now()
                break
            time.sleep(0.05)
        say(
            "  every worker serves it after "
            + (f"{followed - posted:.2f} s" if followed else f"NOT within {args.start_timeout} s")
        )
        end_of_window = followed if followed is not None else load.now()
        while len(load.intervals) < ACTIVATION_AFTER + sum(
            1 for i in load.intervals if i["start_s"] < end_of_window
        ):
            if load.error is not None:
                break
            time.sleep(0.1)
    finally:
        intervals = load.stop()
    for item in intervals:
        item["during"] = item["start_s"] < end_of_window and item["end_s"] > posted
    before = [i for i in intervals if i["end_s"] <= posted]
    during = [i for i in intervals if i["during"]]
    normal = float(statistics.median(i["p99_ms"] for i in before)) if before else None
    worst = max((i["p99_ms"] for i in during), default=None)
    return {
        "from": active,
        "to": target,
        "status": status,
        "answer": body[:300].decode(errors="replace"),
        "post_s": posted,
        "answered_s": answered,
        "followed_s": followed,
        "intervals": intervals,
        "normal_p99_ms": normal,
        "activation_p99_ms": worst,
        "activation_max_ms": max((i["max_ms"] for i in during), default=None),
        "normal_max_ms": float(statistics.median(i["max_ms"] for i in before)) if before else None,
        "ratio": worst / normal if worst is not None and normal else None,
        "answered_2xx": sum(i["ok"] for i in intervals),
        "failed": sum(i["non2xx"] + i["errors"] for i in intervals),
    }


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2 or len({t for t, _ in points}) < 2:
        return None
    return (
        float(statistics.linear_regression([t for t, _ in points], [m for _, m in points])[0]) * 60
    )


def read_metrics(url: str, key: str | None) -> str | None:
    """The server's ``/metrics`` page (it needs a key with the ops scope), or None when
    it cannot be read."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/metrics", headers=headers), timeout=30
        ) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return None


def held_customers(url: str, key: str | None) -> float | None:
    """Customers in the workers' contact histories, summed over the workers (the
    ``nbo_worker_contact_history_customers`` gauge of ``/metrics``); None when it cannot
    be read."""
    body = read_metrics(url, key)
    if body is None:
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("nbo_worker_contact_history_customers")
    ]
    return sum(values) if values else None


SERVED_ROUTE = 'route="/v1/customers/{customer_id}/decisions"'
"""The decision route's label in the service's own request-duration histogram."""


def served_buckets(url: str, key: str | None) -> dict[float, float] | None:
    """The decision route's 200 answers so far by upper bound of the service's own
    latency histogram (``nbo_http_request_duration_seconds``, cumulative, summed over
    the workers), or None when ``/metrics`` cannot be read.

    The service measures a decision from the moment its lane takes the request until
    the answer is handed to the socket: the time before (the request waiting in the
    socket and for the event loop) and after (the kernel, wrk) is what wrk adds."""
    body = read_metrics(url, key)
    if body is None:
        return None
    buckets: dict[float, float] = {}
    for line in body.splitlines():
        if not line.startswith("nbo_http_request_duration_seconds_bucket{"):
            continue
        if SERVED_ROUTE not in line or 'status="200"' not in line:
            continue
        bound = line.split('le="', 1)[1].split('"', 1)[0]
        le = math.inf if bound == "+Inf" else float(bound)
        buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets or None


def served_latency(
    before: dict[float, float] | None, after: dict[float, float] | None
) -> dict[str, float]:
    """Of the decisions answered between two :func:`served_buckets`: the share the
    service answered within the p99 target (``served_within_pct``) and the smallest
    bucket bound that holds 99 % of them (``served_p99_le_ms``, an upper bound of the
    service's own p99); empty when either read failed or nothing was answered."""
    if before is None or after is None:
        return {}
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts.get(math.inf, 0.0)
    if total <= 0:
        return {}
    p99 = next(le for le, n in counts.items() if n >= 0.99 * total)
    within = max((n for le, n in counts.items() if le <= TARGET_P99_MS / 1000), default=0.0)
    return {"served_within_pct": 100 * within / total, "served_p99_le_ms": 1000 * p99}


def measure_soak(
    decision: Server,
    ids: Path,
    key: str | None,
    args: argparse.Namespace,
    metrics_key: str | None = None,
) -> dict[str, Any]:
    """Load for ``--soak`` seconds as consecutive wrk runs of ``--sample-every`` seconds;
    after each, the memory of every process of the decision server (so every sample is
    taken under load: wrk starts again at once). Before and after, the customers the
    workers hold a contact history of (``metrics_key``: a key that may read
    ``/metrics``), to tell memory that follows the policy windows from other growth."""
    say(f"soak: {args.soak} s of load, memory sampled every {args.sample_every} s")
    held_before = held_customers(decision.url, metrics_key)
    origin = time.monotonic()
    samples = [{"t_s": 0.0} | decision.memory()]
    intervals = []
    while (elapsed := time.monotonic() - origin) < args.soak - 0.5:
        seconds = max(1, min(args.sample_every, round(args.soak - elapsed)))
        result = run_wrk(decision.url, ids, key, seconds, args, decision)
        intervals.append(result)
        samples.append({"t_s": time.monotonic() - origin} | decision.memory())
        last = samples[-1]
        say(
            f"  {last['t_s']:6.0f} s  {result['rps']:8,.0f} req/s  p99 {result['p99_ms']:6.2f} ms"
            f"  workers RSS {last['workers_rss_mb']:8,.1f} MiB  PSS {last['workers_pss_mb']:8,.1f}"
        )
    series: dict[str, list[tuple[float, float, float]]] = {}
    for sample in samples:
        for proc in sample["processes"]:
            if proc["role"] == "worker":
                series.setdefault(str(proc["pid"]), []).append(
                    (sample["t_s"], proc.get("rss_mb", 0.0), proc.get("pss_mb", 0.0))
                )
        series.setdefault("workers together", []).append(
            (sample["t_s"], sample["workers_rss_mb"], sample["workers_pss_mb"])
        )

    def trend(points: list[tuple[float, float, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": len(points)}
        for index, name in ((1, "rss"), (2, "pss")):
            values = [p[index] for p in points]
            out[name] = {
                "start_mb": values[0],
                "end_mb": values[-1],
                "max_mb": max(values),
                "slope_mb_per_min": slope_per_minute([(p[0], p[index]) for p in points]),
            }
        return out

    decisions = sum(i["ok"] for i in intervals)
    together = trend(series["workers together"])
    held_after = held_customers(decision.url, metrics_key)
    added = held_after - held_before if held_before is not None and held_after is not None else None
    return {
        "contact_history_customers": [held_before, held_after],
        "pss_bytes_per_customer_added": (
            (together["pss"]["end_mb"] - together["pss"]["start_mb"]) * 2**20 / added
            if added
            else None
        ),
        "seconds": samples[-1]["t_s"],
        "samples": samples,
        "intervals": intervals,
        "trends": {name: trend(points) for name, points in series.items()},
        "answered_2xx": decisions,
        "failed": sum(i["non2xx"] + i["errors"] for i in intervals),
        "growth_kb_per_1k_decisions": (
            (together["pss"]["end_mb"] - together["pss"]["start_mb"]) * 1024 / (decisions / 1000)
            if decisions
            else None
        ),
        "rps_first": intervals[0]["rps"] if intervals else None,
        "rps_last": intervals[-1]["rps"] if intervals else None,
        "p99_median_ms": (
            float(statistics.median(i["p99_ms"] for i in intervals)) if intervals else None
        ),
        "p99_max_ms": max((i["p99_ms"] for i in intervals), default=None),
    }


@dataclass
class Load:
    """One server under wrk in a section: its runs, each described as it ends, and with
    ``recorded_in`` (the database its decisions are recorded in) the 2xx answers counted
    against the decisions rows added since it was made, for the durability check."""

    label: str
    url: str
    ids: Path
    key: str | None
    server: Server | None
    database: bool = True  # count this machine's PostgreSQL CPU a request (run_wrk)
    metrics_key: str | None = None
    recorded_in: str | None = None
    answered: int = 0  # 2xx answers, warm-up included: all of them must be recorded
    rows_before: int = 0
    offers_before: int = 0

    def __post_init__(self) -> None:
        if self.recorded_in is not None:
            self.rows_before = count_decisions(self.recorded_in)
            self.offers_before = count_rows(self.recorded_in, "offers")

    def run(self, seconds: int, args: argparse.Namespace, think_ms: float = 0.0) -> dict[str, Any]:
        result = run_wrk(
            self.url,
            self.ids,
            self.key,
            seconds,
            args,
            self.server,
            database=self.database,
            metrics_key=self.metrics_key,
            think_ms=think_ms,
        )
        self.answered += result["ok"]
        describe_run(self.label, result)
        return result

    def durability(self, after_sigkill: bool) -> dict[str, Any]:
        assert self.recorded_in is not None
        return durability(
            self.recorded_in, self.rows_before, self.offers_before, self.answered, after_sigkill
        )


def measure(
    label: str,
    bare: Server,
    ids: Path,
    args: argparse.Namespace,
    decision: Server | None = None,
    decision_url: str | None = None,
    key: str | None = None,
    database: Database | None = None,
    compare: Comparison | None = None,
) -> Section:
    """Warm up, then alternate bare and decision runs (and the --compare-customers
    decision runs after each decision run); count decisions for durability."""
    section = Section(
        label,
        load_before=load_average(),
        api_key=bool(key),
        workers=bare.workers,
        customers=args.customers,
        compare_customers=args.compare_customers if compare else 0,
    )
    if decision is not None:
        section.ready_seconds = decision.ready_seconds
        section.all_ready_seconds = decision.all_ready_seconds
    url = decision.url if decision else decision_url
    first_id = ids.open().readline().strip()
    if url:
        section.probe = probe(url, first_id, key)
        say(f"probe: POST /v1/customers/{first_id}/decisions -> {section.probe}")
    admin = database.admin_key if database is not None else None  # reads /metrics
    # PostgreSQL's CPU a decision is counted on PostgreSQL only (SQLite runs in the worker).
    postgres = database is None or database.kind == "postgresql"
    bare_load = Load("bare", bare.url, ids, key, bare, database=False)
    # The decisions rows are counted now, before the warm-up: all its answers must be kept.
    main = (
        Load(
            "decision",
            url,
            ids,
            key,
            decision,
            database=postgres,
            metrics_key=admin,
            recorded_in=database.url if database else None,
        )
        if url
        else None
    )
    other = (
        Load(
            f"at {count_label(args.compare_customers)}",
            compare.server.url,
            compare.ids,
            compare.database.api_key,
            compare.server,
            database=compare.database.kind == "postgresql",
            metrics_key=compare.database.admin_key,
            recorded_in=compare.database.url,
        )
        if compare is not None
        else None
    )
    if args.warmup > 0:
        say(f"warm-up, {args.warmup} s each (not reported)")
        for load in (bare_load, main, other):
            if load is not None:
                load.run(args.warmup, args)
    for run in range(1, args.runs + 1):
        say(f"run {run}/{args.runs}, {args.duration} s each")
        section.bare.append(bare_load.run(args.duration, args))
        section.bare_memory = max(section.bare_memory, bare.memory_mb())
        if main is not None:
            section.decision.append(main.run(args.duration, args))
            if decision:
                section.decision_memory = max(
                    section.decision_memory or (0.0, 0.0), decision.memory_mb()
                )
        if other is not None:
            section.compare.append(other.run(args.duration, args))
    section.think = [{"think_ms": t, "bare": [], "decision": []} for t in args.think_ms]
    for run in range(1, args.runs + 1 if args.think_ms else 1):
        for lighter in section.think:
            think = lighter["think_ms"]
            say(f"think time {think:g} ms (mean), run {run}/{args.runs}, {args.duration} s each")
            lighter["bare"].append(bare_load.run(args.duration, args, think))
            if main is not None:
                lighter["decision"].append(main.run(args.duration, args, think))
    if decision is not None:
        section.memory = decision.memory()
    if decision is not None and database is not None and args.activation and not args.stub_decision:
        if database.admin_key is None:
            say("activation skipped: no admin key (nbo keys create --role admin failed)")
        else:
            for _ in range(args.activations):  # each switches to the other version
                section.activations.append(measure_activation(decision, ids, key, database, args))
                if main is not None:
                    main.answered += section.activations[-1]["answered_2xx"]
    if decision is not None and args.soak:
        section.soak = measure_soak(
            decision, ids, key, args, None if database is None else database.admin_key
        )
        if main is not None:
            main.answered += section.soak["answered_2xx"]
    if main is not None and main.recorded_in is not None:
        if args.sigkill and decision:
            decision.stop(kill=True)
        section.durability = main.durability(bool(args.sigkill and decision))
    if compare is not None and other is not None:
        if args.sigkill:
            compare.server.stop(kill=True)
        section.compare_durability = other.durability(args.sigkill)
    section.load_after = load_average()
    return section


def durability(
    url: str, rows_before: int, offers_before: int, answered: int, after_sigkill: bool
) -> dict[str, Any]:
    """The decisions rows added since ``rows_before`` against the 2xx answers given."""
    rows = count_decisions(url) - rows_before
    offers = count_rows(url, "offers") - offers_before
    return {
        "rows_added": rows,
        "offers_per_decision": offers / rows if rows else 0.0,
        "answered_2xx": answered,
        "ok": rows >= answered,
        "after_sigkill": after_sigkill,
    }


# ---------------------------------------------------------------------------- report


def median(results: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def row(name: str, results: list[dict[str, Any]], memory: tuple[float, float] | None) -> str:
    runs = " / ".join(f"{r['rps']:,.0f}" for r in results)
    rss = f"{memory[0]:,.0f} ({memory[1]:,.0f})" if memory else "-"
    return (
        f"{name:9s} {median(results, 'rps'):>9,.0f}  {runs:<22s}"
        f"{median(results, 'p50_ms'):>8.2f}{median(results, 'p90_ms'):>8.2f}"
        f"{median(results, 'p99_ms'):>8.2f}"
        f"{sum(r['non2xx'] for r in results):>9,}{sum(r['errors'] for r in results):>8,}"
        f"  {rss}"
    )


def summarize(section: Section) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": section.label,
        "bare": section.bare,
        "decision": section.decision,
        "bare_rss_mb": section.bare_memory,
        "decision_rss_mb": section.decision_memory,
        "durability": section.durability,
        "probe": section.probe,
        "api_key": section.api_key,
        "load_average": [section.load_before, section.load_after],
        "workers": section.workers,
        "customers": section.customers,
        "ready_s": section.ready_seconds,
        "all_ready_s": section.all_ready_seconds,
        "serving_before_mb": section.serving_before_mb,
        "memory": section.memory,
        "activations": section.activations,
        "activation_ratio": activation_ratio(section),
        "soak": section.soak,
        "database": section.database_state,
        "compare_customers": section.compare_customers,
        "compare": section.compare,
        "compare_durability": section.compare_durability,
        "think": section.think,
    }
    if section.decision:
        ratios = [d["rps"] / b["rps"] for b, d in zip(section.bare, section.decision, strict=True)]
        out["ratios"] = ratios
        out["ratio"] = statistics.median(ratios)
        out["valid"] = not any(r["non2xx"] + r["errors"] for r in section.decision)
    if section.decision and section.compare:
        # Each run's decisions/s over the --compare-customers bank's in the same round.
        scaled = [
            d["rps"] / c["rps"] for d, c in zip(section.decision, section.compare, strict=True)
        ]
        out["compare_ratios"] = scaled
        out["compare_ratio"] = statistics.median(scaled)
        out["compare_valid"] = not any(r["non2xx"] + r["errors"] for r in section.compare)
    return out


def report_durability(d: dict[str, Any], where: str) -> None:
    verdict = "OK" if d["ok"] else "FAILED: acknowledged decisions are missing"
    extra = d["rows_added"] - d["answered_2xx"]
    when = "after SIGKILL" if d["after_sigkill"] else "right after the last run"
    print(
        f"durability{where} ({when}): decisions rows added {d['rows_added']:,} vs 2xx answers "
        f"{d['answered_2xx']:,} (warm-up included): {verdict}"
        + (f" ({extra:,} more rows: requests in flight when wrk stopped)" if extra > 0 else "")
        + (f" ({-extra:,} missing)" if extra < 0 else "")
    )
    print(
        f"work per decision{where}: {d['offers_per_decision']:.2f} offers recorded on average "
        f"(NBO_FREQUENCY_CAP={os.environ.get('NBO_FREQUENCY_CAP', FREQUENCY_CAP)})"
    )


def report_compare(section: Section, summary: dict[str, Any]) -> None:
    """Decisions at --customers beside the --compare-customers bank, run for run."""
    here, there = count_label(section.customers), count_label(section.compare_customers)
    ratios = ", ".join(f"{r:.3f}" for r in summary["compare_ratios"])
    failed = sum(r["non2xx"] + r["errors"] for r in section.compare)
    print(
        f"decisions/s at {here} / at {there}: {summary['compare_ratio']:.3f} (runs: {ratios}); "
        f"p99 {median(section.decision, 'p99_ms'):.2f} ms at {here}, "
        f"{median(section.compare, 'p99_ms'):.2f} ms at {there}"
        + (f" -- NOT VALID: {failed:,} requests at {there} failed" if failed else "")
    )


def report_think(section: Section) -> None:
    """Latency under lighter loads (--think-ms): the same connections, each pausing a
    random think time before each request (medians over the runs, and each run's decision
    p99), and the highest decision rate whose median p99 is within the target: how far
    one worker can be loaded and still answer within it."""
    if not section.think:
        return
    print(
        "lighter loads (the same connections, each pausing a random think time before each "
        "request, exponential of this mean; wrk times a request from its write; medians):"
    )
    print(
        f"{'think ms':>9s}  {'bare req/s':>10s} {'p50':>6s} {'p99':>6s}  "
        f"{'decision req/s':>14s} {'p50':>6s} {'p99':>6s}  decision p99 of each run"
    )
    within: list[tuple[float, float]] = []
    for lighter in section.think:
        bare, decision = lighter["bare"], lighter["decision"]
        line = (
            f"{lighter['think_ms']:>9g}  {median(bare, 'rps'):>10,.0f} "
            f"{median(bare, 'p50_ms'):>6.2f} {median(bare, 'p99_ms'):>6.2f}"
        )
        if decision:
            failed = sum(r["non2xx"] + r["errors"] for r in decision)
            p99 = median(decision, "p99_ms")
            each = " / ".join(f"{r['p99_ms']:.2f}" for r in decision)
            line += (
                f"  {median(decision, 'rps'):>14,.0f} {median(decision, 'p50_ms'):>6.2f} "
                f"{p99:>6.2f}  {each}" + (f"  NOT VALID: {failed:,} failed" if failed else "")
            )
            if not failed and p99 <= TARGET_P99_MS:
                within.append((median(decision, "rps"), lighter["think_ms"]))
        print(line)
    if section.decision and any(t["decision"] for t in section.think):
        full = median(section.decision, "rps")
        if within:
            rate, think = max(within)
            print(
                f"highest decision rate with p99 <= {TARGET_P99_MS:.0f} ms: {rate:,.0f} a second "
                f"(think {think:g} ms), {rate / full:.0%} of the back-to-back rate ({full:,.0f})"
            )
        else:
            print(f"no think time gave a decision p99 <= {TARGET_P99_MS:.0f} ms")


def report_cpu(section: Section) -> None:
    """Where a request's time went, as medians over the runs: the CPU the worker spent
    per request, bare and decision (their ratio is what the throughput ratio would be
    if the worker alone set it), PostgreSQL's per decision, and the machine: how much
    of each run a worker waited for a CPU it could not get (wrk, PostgreSQL and the
    worker share the cores), and how busy the cores were."""
    needed = ("worker_us", "worker_wait_pct", "machine_busy_pct")
    if not all(k in r for r in section.bare + section.decision for k in needed):
        return
    bare, decision = median(section.bare, "worker_us"), median(section.decision, "worker_us")
    database = (
        f" + PostgreSQL {median(section.decision, 'database_us'):.0f} us"
        if all("database_us" in r for r in section.decision)
        else ""
    )
    print(
        f"CPU a request (median): worker {bare:.0f} us bare, {decision:.0f} us decision"
        f"{database} (worker bare / decision: {bare / decision:.3f})"
    )
    print(
        "waiting for a CPU (median share of a run, a worker): "
        f"{median(section.bare, 'worker_wait_pct'):.0f}% bare, "
        f"{median(section.decision, 'worker_wait_pct'):.0f}% decision; machine busy "
        f"{median(section.bare, 'machine_busy_pct'):.0f}% / "
        f"{median(section.decision, 'machine_busy_pct'):.0f}%"
    )


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def report_memory(section: Section) -> None:
    if section.ready_seconds is not None:
        state = (
            "cold: no serving/ in NBO_DATA_DIR before the start"
            if section.serving_before_mb is None
            else f"warm: serving/ held {section.serving_before_mb:,.0f} MiB before the start"
        )
        print(
            f"ready (GET /health/ready answers 200) after {section.ready_seconds:.1f} s"
            + (
                ""
                if section.workers == 1
                else f", all {section.workers} workers after {section.all_ready_seconds:.1f} s"
                if section.all_ready_seconds is not None
                else f", all {section.workers} workers: unknown (no startup lines in the log)"
            )
            + f" ({state})"
        )
        if section.figures_seconds is not None:
            print(
                f"first business figures computed {section.figures_seconds:.1f} s after the "
                "start; the runs began after them"
            )
    if section.memory is None:
        return
    memory = section.memory
    print("decision server memory after the measured runs (MiB):")
    for proc in memory["processes"]:
        print(
            f"  {proc['role']:10s} pid {proc['pid']:>7}  RSS {mib(proc.get('rss_mb')):>7}  "
            f"PSS {mib(proc.get('pss_mb')):>7}  peak RSS {mib(proc.get('hwm_mb')):>7}"
        )
    per_customer = memory["workers_pss_mb"] * 2**20 / max(section.customers, 1)
    print(
        f"  {memory['workers']} worker(s) together: RSS {mib(memory['workers_rss_mb'])}, "
        f"PSS {mib(memory['workers_pss_mb'])} ({per_customer:,.0f} bytes a customer); "
        f"whole server PSS {mib(memory['total_pss_mb'])}"
    )


def activation_ratio(section: Section) -> float | None:
    """The median over the activations of their p99 around the activation against the
    normal p99 before it (one activation's ratio is one interval's p99: noisy)."""
    ratios = [a["ratio"] for a in section.activations if a["ratio"] is not None]
    return float(statistics.median(ratios)) if ratios else None


def report_activation(section: Section) -> None:
    for act in section.activations:
        report_one_activation(act)
    ratio = activation_ratio(section)
    if len(section.activations) > 1 and ratio is not None:
        each = ", ".join(
            "-" if a["ratio"] is None else f"{a['ratio']:.2f}" for a in section.activations
        )
        met = "met" if ratio <= TARGET_ACTIVATION_RATIO else "NOT met"
        print(
            f"activations: p99 around each against the normal p99 before it: median "
            f"{ratio:.2f} x (each: {each}); target <= {TARGET_ACTIVATION_RATIO:.0f} x {met}"
        )


def report_one_activation(act: dict[str, Any]) -> None:
    print(
        f"activation under load: {act['from']} -> {act['to']}: HTTP {act['status']} after "
        f"{act['answered_s'] - act['post_s']:.2f} s; every worker serving it after "
        + (
            f"{act['followed_s'] - act['post_s']:.2f} s"
            if act["followed_s"] is not None
            else "NEVER (timed out)"
        )
    )
    print(
        f"  {'interval s':>13s}{'req/s':>9s}{'p50 ms':>9s}{'p99 ms':>9s}{'max ms':>9s}{'failed':>8s}"
        f"{'majflt':>8s}"
    )
    for item in act["intervals"]:
        mark = "  <- activation" if item["during"] else ""
        print(
            f"  {item['start_s'] - act['post_s']:6.1f}..{item['end_s'] - act['post_s']:5.1f}"
            f"{item['rps']:9,.0f}{item['p50_ms']:9.2f}{item['p99_ms']:9.2f}{item['max_ms']:9.1f}"
            f"{item['non2xx'] + item['errors']:8,}{item.get('major_faults', '-'):>8}{mark}"
        )
    if act["ratio"] is not None:
        met = "met" if act["ratio"] <= TARGET_ACTIVATION_RATIO else "NOT met"
        print(
            f"  p99 around the activation {act['activation_p99_ms']:.2f} ms vs normal "
            f"{act['normal_p99_ms']:.2f} ms: {act['ratio']:.2f} x; target <= "
            f"{TARGET_ACTIVATION_RATIO:.0f} x {met}; max {act['activation_max_ms']:.1f} ms vs "
            f"{act['normal_max_ms']:.1f} ms"
            + (f" -- {act['failed']:,} requests failed" if act["failed"] else "")
        )


def report_soak(section: Section) -> None:
    soak = section.soak
    if soak is None:
        return
    print(
        f"soak: {soak['seconds']:.0f} s under load, {soak['answered_2xx']:,} decisions, "
        f"req/s {soak['rps_first']:,.0f} first -> {soak['rps_last']:,.0f} last interval, "
        f"p99 median {soak['p99_median_ms']:.2f} ms, worst {soak['p99_max_ms']:.2f} ms"
        + (f" -- {soak['failed']:,} requests failed" if soak["failed"] else "")
    )
    print(f"  {'process':18s}{'MiB':>5s}{'start':>9s}{'end':>9s}{'max':>9s}{'MiB/min':>9s}")
    for name, trend in soak["trends"].items():
        label = name if name == "workers together" else f"worker {name}"
        for kind in ("rss", "pss"):
            t = trend[kind]
            slope = t["slope_mb_per_min"]
            print(
                f"  {label:18s}{kind.upper():>5s}{t['start_mb']:9,.1f}{t['end_mb']:9,.1f}"
                f"{t['max_mb']:9,.1f}{'-' if slope is None else f'{slope:+.2f}':>9s}"
            )
    if soak["growth_kb_per_1k_decisions"] is not None:
        print(
            f"  workers' PSS growth: {soak['growth_kb_per_1k_decisions']:,.1f} KiB per 1,000 "
            "decisions (target: flat, no growth beyond the policy windows)"
        )
    before, after = soak.get("contact_history_customers") or (None, None)
    if before is not None and after is not None:
        per = soak["pss_bytes_per_customer_added"]
        print(
            f"  contact histories held (summed over workers): {before:,.0f} -> {after:,.0f} "
            "customers"
            + ("" if per is None else f", {per:,.0f} B of PSS growth per customer added")
            + " (what the policy windows keep: every customer offered something in them)"
        )


def report_targets(section: Section, summary: dict[str, Any]) -> None:
    """The issue 17 targets beside today's figures, for what this section measured
    (``summary``: its :func:`summarize`)."""
    lines: list[tuple[str, str, str, str]] = []
    scale = section.customers / 100_000
    ready = section.all_ready_seconds or section.ready_seconds
    if ready is not None:
        met = "met" if ready <= TARGET_READY_S else "NOT met"
        which = "" if section.workers == 1 else f" (all {section.workers} workers)"
        lines.append(
            ("ready", f"{ready:.1f} s{which}", f"<= {TARGET_READY_S:.0f} s {met}", TODAY_READY)
        )
    if section.memory is not None:
        pss = section.memory["workers_pss_mb"]
        workers = section.memory["workers"]
        target = "-"
        if workers == 2:
            met = "met" if pss <= TARGET_TWO_WORKERS_MB else "NOT met"
            target = f"2 workers <= 2 GB {met}"
        lines.append(
            (
                f"memory, {workers} worker(s)",
                f"PSS {pss:,.0f} MiB (RSS {section.memory['workers_rss_mb']:,.0f})",
                target,
                f"about {TODAY_MB_PER_100K_PER_WORKER * scale * max(workers, 1):,.0f} MiB "
                f"(1.0 GB per 100k customers per worker)",
            )
        )
        lines.append(
            (
                "bytes a customer",
                f"{pss * 2**20 / max(section.customers, 1):,.0f}",
                "well under 1 KB (goal)",
                f"about {TODAY_MB_PER_100K_PER_WORKER * 2**20 / 100_000:,.0f} a worker",
            )
        )
    if section.decision and section.bare:
        ratio = summary["ratio"]
        p99 = median(section.decision, "p99_ms")
        ratio_target = f">= {TARGET_RATIO} (1 worker)"
        if section.workers == 1:
            ratio_target += " met" if ratio >= TARGET_RATIO else " NOT met"
        lines.append(("decision / bare", f"{ratio:.3f}", ratio_target, TODAY_RATIO))
        met = "met" if p99 <= TARGET_P99_MS else "NOT met"
        # Bare's own p99 in the same runs: what this machine allows any endpoint under
        # the same load (a slower or busier machine misses 10 ms with bare alone).
        lines.append(
            (
                "decision p99",
                f"{p99:.2f} ms (bare {median(section.bare, 'p99_ms'):.2f} ms)",
                f"<= {TARGET_P99_MS:.0f} ms {met}",
                "under 10 ms at 100k, 32 connections, PostgreSQL",
            )
        )
    if section.decision and section.compare:
        scaled = summary["compare_ratio"]
        there = count_label(section.compare_customers)
        met = "met" if scaled >= TARGET_SCALED else "NOT met"
        lines.append(
            (
                f"decisions/s vs {there}",
                f"{scaled:.3f} x (p99 {median(section.decision, 'p99_ms'):.2f} vs "
                f"{median(section.compare, 'p99_ms'):.2f} ms)",
                f"as at {there} (>= {TARGET_SCALED}) {met}",
                "-",
            )
        )
    ratio = activation_ratio(section)
    if ratio is not None:
        met = "met" if ratio <= TARGET_ACTIVATION_RATIO else "NOT met"
        many = len(section.activations)
        lines.append(
            (
                "activation p99",
                f"{ratio:.2f} x normal" + (f" (median of {many})" if many > 1 else ""),
                f"<= {TARGET_ACTIVATION_RATIO:.0f} x {met}",
                TODAY_ACTIVATION,
            )
        )
    if section.soak is not None:
        trend = section.soak["trends"]["workers together"]["pss"]
        slope = trend["slope_mb_per_min"]
        lines.append(
            (
                "memory under load",
                f"{trend['start_mb']:,.0f} -> {trend['end_mb']:,.0f} MiB PSS"
                + ("" if slope is None else f", {slope:+.1f} MiB/min"),
                "flat",
                TODAY_SOAK,
            )
        )
    if not lines:
        return
    print(f"issue 17 targets, {section.customers:,} customers: measured | target | today")
    for name, measured, target, today in lines:
        print(f"  {name:22s} {measured:36s} | {target:26s} | {today}")


def report(sections: list[Section], info: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"machine: {info['cores']} cores, {info['cpu']}, {info['memory_gb']} GB; "
        f"python {info['python']}; {info['wrk']}; service code in {info['service_code']}"
    )
    print(
        f"load: wrk {args.threads} thread(s), {args.connections} connections, "
        f"{args.duration} s x {args.runs} run(s) after a {args.warmup} s warm-up; "
        f"{', '.join(map(str, args.workers))} uvicorn worker(s) per server; "
        f"{args.customers:,} customers"
    )
    for section in sections:
        summary = summarize(section)
        print()
        print(f"== {section.label} ==")
        if section.database_state:
            print(section.database_state)
        if section.probe is not None:
            print(f"probe: {section.probe}")
        if section.decision and not section.api_key:
            print("api key: none (nbo keys create failed or none given)")
        print(
            f"{'server':9s} {'req/s':>9s}  {'runs req/s':<22s}{'p50 ms':>8s}{'p90 ms':>8s}"
            f"{'p99 ms':>8s}{'non-2xx':>9s}{'errors':>8s}  RSS MB (peak)"
        )
        print(row("bare", section.bare, section.bare_memory))
        if section.decision:
            print(row("decision", section.decision, section.decision_memory))
        if section.compare:
            print(row(f"at {count_label(section.compare_customers)}", section.compare, None))
        if section.decision:
            ratios = ", ".join(f"{r:.3f}" for r in summary["ratios"])
            p99 = median(section.decision, "p99_ms")
            failed = sum(r["non2xx"] + r["errors"] for r in section.decision)
            # Throughput of failures (401s, 500s, resets) says nothing about decisions.
            invalid = f" -- NOT VALID: {failed:,} decision requests failed" if failed else ""
            print(
                f"decision / bare: {summary['ratio']:.3f} (runs: {ratios}); target >= "
                f"{TARGET_RATIO} {'met' if summary['ratio'] >= TARGET_RATIO else 'NOT met'}"
                f"{invalid}"
            )
            print(
                f"decision p99: {p99:.2f} ms; target <= {TARGET_P99_MS:.0f} ms "
                f"{'met' if p99 <= TARGET_P99_MS else 'NOT met'}{invalid}"
            )
            served = [r for r in section.decision if "served_p99_le_ms" in r]
            if served:
                print(
                    f"the service's own latency (its histogram, from the lane taking a "
                    f"decision to the answer on the socket): p99 <= "
                    f"{max(r['served_p99_le_ms'] for r in served):g} ms in every run, "
                    f"{min(r['served_within_pct'] for r in served):.2f}% or more within "
                    f"{TARGET_P99_MS:.0f} ms (wrk adds the wait in the socket and for the "
                    f"event loop, the kernel, wrk)"
                )
            report_cpu(section)
        if "compare_ratio" in summary:
            report_compare(section, summary)
        if section.durability:
            report_durability(section.durability, "")
        elif section.decision:
            print("durability: not checked (no database known for this target)")
        if section.compare_durability:
            report_durability(
                section.compare_durability, f" at {count_label(section.compare_customers)}"
            )
        report_think(section)
        report_memory(section)
        report_activation(section)
        report_soak(section)
        report_targets(section, summary)
        print(f"load average: {section.load_before} before, {section.load_after} after")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "args": vars(args), "sections": [summarize(s) for s in sections]},
                indent=2,
                default=str,
            )
        )
        print(f"\nwrote {args.json}")


# ------------------------------------------------------------------------------ main


def worker_counts(text: str) -> list[int]:
    """``1`` or ``1,2``: worker counts, each >= 1."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': give worker counts like 1 or 1,2") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': worker counts must be >= 1")
    return counts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Products: the generator's fixed catalogue; there is nothing to set.",
    )
    parser.add_argument("--customers", type=int, default=100_000, help="Customers generated.")
    parser.add_argument(
        "--database", choices=("postgresql", "sqlite", "both"), default="both", help="Backend(s)."
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections.")
    parser.add_argument("--duration", type=int, default=20, help="Seconds per measured run.")
    parser.add_argument("--warmup", type=int, default=5, help="Seconds of warm-up per server.")
    parser.add_argument("--runs", type=int, default=2, help="Measured runs of each server.")
    parser.add_argument(
        "--workers",
        type=worker_counts,
        default=[1],
        metavar="N[,N...]",
        help="uvicorn workers per server; several (e.g. 1,2): one section each, the servers "
        "restarted with that many workers.",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads.")
    parser.add_argument("--keep", metavar="DIR", help="Work folder kept and reused across runs.")
    parser.add_argument("--json", metavar="FILE", help="Also write every figure as JSON.")
    parser.add_argument(
        "--only-bare", action="store_true", help="Measure the bare anchor alone (no database)."
    )
    parser.add_argument(
        "--target-url",
        metavar="URL",
        help="Send the decision load to this running server instead of starting `nbo serve` "
        "(no database preparation, no durability check; key from --api-key).",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("NBO_BENCH_API_KEY"),
        help="Key for --target-url (default: $NBO_BENCH_API_KEY).",
    )
    parser.add_argument(
        "--stub-decision",
        action="store_true",
        help="Harness self-test: prepare the databases but serve bench/bare.py in place of "
        "`nbo serve` (the durability check then fails by design: the stub records nothing).",
    )
    parser.add_argument(
        "--sigkill",
        action="store_true",
        help="SIGKILL the service after the last run, before counting the decisions rows.",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=180.0, help="Seconds to wait for a server."
    )
    parser.add_argument(
        "--pg-database",
        default=PG_DATABASE,
        metavar="NAME",
        help=f"PostgreSQL database of the bench (dropped and re-created when prepared; "
        f"default {PG_DATABASE}): give large banks their own name so that smaller runs do "
        "not drop them.",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="Prepare the bank and the database(s) (with the second model version when "
        "--activation is given), then stop without serving.",
    )
    parser.add_argument(
        "--activation",
        action="store_true",
        help="Also activate another model version through the API under load and compare "
        "the p99 around it with the normal p99 (needs two versions: a second `nbo train` "
        "is made once at preparation).",
    )
    parser.add_argument(
        "--second-version",
        choices=("train", "copy"),
        default="train",
        help="How --activation gets its second model version when the database has one: "
        "train (a second `nbo train --horizon-days 60`, a different model) or copy (the "
        "active bundle registered again under a new id: seconds, not a training run).",
    )
    parser.add_argument(
        "--activations",
        type=int,
        default=1,
        metavar="N",
        help="With --activation: activate this many times, back and forth between the two "
        "versions, each measured on its own; the target is judged on the median ratio.",
    )
    parser.add_argument(
        "--activation-interval",
        type=int,
        default=2,
        metavar="SECONDS",
        help="Length of each wrk run of the activation measurement: short, so that a pause "
        "of the 32 in-flight requests weighs on the p99 of its interval.",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="SECONDS",
        help="After the runs, load the decision server this long (e.g. 600) and sample its "
        "workers' RSS and PSS every --sample-every seconds: start, end, max, slope.",
    )
    parser.add_argument(
        "--sample-every", type=int, default=10, metavar="SECONDS", help="Soak sampling period."
    )
    parser.add_argument(
        "--compare-customers",
        type=int,
        default=0,
        metavar="N",
        help="Also serve a bank of N customers (e.g. 100000; its own bank, folder and "
        "database, prepared once like the main one) and take its decision runs in turn with "
        "the others: decision speed at --customers beside N, in the same runs.",
    )
    parser.add_argument(
        "--think-ms",
        type=think_times,
        default=[],
        metavar="MS[,MS...]",
        help="After the runs, one bare and one decision run per think time (e.g. 5,10,20,40): "
        "each connection pauses a random time of that mean before each request, as tellers "
        "between customers. Reports latency at lighter loads and the highest decision rate "
        "with p99 within the target.",
    )
    args = parser.parse_args()
    if min(args.activation_interval, args.sample_every, args.activations) < 1 or args.soak < 0:
        parser.error(
            "--activations, --activation-interval and --sample-every must be >= 1, --soak >= 0"
        )
    if not PG_NAME.fullmatch(args.pg_database):
        parser.error("--pg-database must be a lower-case identifier (a-z, 0-9, _; <= 63)")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    if min(args.customers, args.duration, args.runs, args.threads) < 1:
        parser.error("--customers, --duration, --runs, --workers and --threads must be >= 1")
    if args.only_bare and args.target_url:
        parser.error("--only-bare and --target-url exclude each other")
    if args.compare_customers:
        if args.compare_customers < 1 or args.compare_customers == args.customers:
            parser.error("--compare-customers must be >= 1 and differ from --customers")
        if args.only_bare or args.target_url or args.stub_decision:
            parser.error("--compare-customers needs decision servers of its own")
        if not PG_NAME.fullmatch(compare_pg_database(args)):
            parser.error("--pg-database is too long for --compare-customers' database name")
    return args


def think_times(text: str) -> list[float]:
    """``5,10,20``: mean think times in ms, each > 0 and at most a minute."""
    try:
        times = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': give think times like 5,10,20") from None
    if not times or not all(0 < t <= 60_000 for t in times):
        raise argparse.ArgumentTypeError(f"'{text}': think times must be > 0 and <= 60000 ms")
    return times


def compare_pg_database(args: argparse.Namespace) -> str:
    """The PostgreSQL database of the --compare-customers bank."""
    return f"{args.pg_database}_{args.compare_customers}"


def count_label(customers: int) -> str:
    """100000 -> '100k', 1000000 -> '1M', 2500 -> '2.5k'."""
    for size, unit in ((1_000_000, "M"), (1_000, "k")):
        if customers >= size:
            return f"{customers / size:g}{unit}"
    return str(customers)


def interrupt(signum: int, frame: object) -> None:
    """A plain `kill` of the harness unwinds like Ctrl-C, so the servers are stopped."""
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    ensure_wrk()
    signal.signal(signal.SIGTERM, interrupt)
    info = machine_info()
    say(f"machine: {info['cores']} cores, {info['cpu']}, load average {info['load_average']}")

    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(args.keep).resolve()
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="nbo-bench-serve-"))
            stack.callback(shutil.rmtree, root, True)
        say(f"work folder: {root}")
        bank, ids = prepare_bank(root, args.customers)
        compare_root = root / f"compare-{args.compare_customers}"
        if args.compare_customers:
            compare_bank, compare_ids = prepare_bank(compare_root, args.compare_customers)

        sections: list[Section] = []
        if args.only_bare or args.target_url:
            for workers in args.workers:
                bare = bare_server(root, workers)
                stack.callback(bare.stop)
                bare.start()
                bare.wait_ready(args.start_timeout)
                label = "bare only" if args.only_bare else f"target {args.target_url}"
                label += f", {workers} worker(s)"
                sections.append(
                    measure(label, bare, ids, args, decision_url=args.target_url, key=args.api_key)
                )
                bare.stop()
        else:
            kinds = ["postgresql", "sqlite"] if args.database == "both" else [args.database]
            if "postgresql" in kinds and not args.keep:
                for name in [args.pg_database] + (
                    [compare_pg_database(args)] if args.compare_customers else []
                ):
                    stack.callback(pg_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            databases = [
                prepare_database(k, root, bank, args.customers, args.pg_database) for k in kinds
            ]
            compares: list[Database | None] = [None] * len(kinds)
            if args.compare_customers:
                compares = [
                    prepare_database(
                        k,
                        compare_root,
                        compare_bank,
                        args.compare_customers,
                        compare_pg_database(args),
                    )
                    for k in kinds
                ]
            for database in databases:
                if args.activation:
                    versions = ensure_second_version(database, args.second_version)
                    say(f"{database.kind}: model versions {versions}")
            if args.prepare_only:
                for database in databases + [c for c in compares if c is not None]:
                    say(f"{database.kind}: prepared in {database.folder} ({database.url})")
                return
            for database, compared in zip(databases, compares, strict=True):
                # Activates a version; reads /metrics (the soak's contact histories,
                # the service's own latency of the decisions). Made only for runs.
                database.admin_key = api_key(database, role="admin")
                state = settle(database.kind, database.url)
                if compared is not None:
                    compared.admin_key = api_key(compared, role="admin")
                    settle(compared.kind, compared.url)
                for workers in args.workers:
                    bare = bare_server(database.folder, workers)
                    if args.stub_decision:
                        decision = bare_server(database.folder, workers, name="stub-decision")
                    else:
                        decision = decision_server(database, workers)
                    stack.callback(bare.stop)
                    stack.callback(decision.stop)
                    # The decision server starts alone, so its time to ready is its own.
                    serving_before = folder_mb(database.folder / "serving")
                    started = time.monotonic()
                    decision.start()
                    decision.wait_ready(args.start_timeout)
                    say("waiting for the decision server's first business figures")
                    figures = await_first_figures(database, started, FIGURES_WAIT)
                    say(
                        "first business figures computed "
                        + (
                            f"{figures:.1f} s after the start"
                            if figures is not None
                            else "not seen (off, or not within the wait): runs start now"
                        )
                    )
                    comparison = None
                    if compared is not None:
                        # Started after the main one is ready, so that ready time is its own.
                        other = decision_server(compared, workers)
                        other.name = f"decision at {count_label(args.compare_customers)}"
                        stack.callback(other.stop)
                        other_started = time.monotonic()
                        other.start()
                        other.wait_ready(args.start_timeout)
                        await_first_figures(compared, other_started, FIGURES_WAIT)
                        comparison = Comparison(other, compare_ids, compared)
                    bare.start()
                    bare.wait_ready(args.start_timeout)
                    section = measure(
                        f"{database.kind}, {workers} worker(s)",
                        bare,
                        ids,
                        args,
                        decision=decision,
                        key=database.api_key,
                        database=database,
                        compare=comparison,
                    )
                    section.serving_before_mb = serving_before
                    section.figures_seconds = figures
                    section.database_state = state
                    sections.append(section)
                    bare.stop()
                    decision.stop()
                    if comparison is not None:
                        comparison.server.stop()
        report(sections, info, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: servers stopped")
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
