"""Decision throughput: the real service against a bare FastAPI POST, on the same machine.

Usage::

    .venv/bin/python bench/serve.py [--customers 100000] [--database {postgresql,sqlite,both}]
        [--connections 32] [--duration 20] [--warmup 5] [--runs 2] [--workers 1]
        [--threads 1] [--keep DIR] [--json FILE]
    .venv/bin/python bench/serve.py --only-bare            # the anchor alone (no database)
    .venv/bin/python bench/serve.py --target-url URL       # decisions from a server you started

What it measures: requests/s and latency (p50, p90, p99) of
``POST /v1/customers/{id}/decisions`` under wrk at ``--connections`` connections
(closed loop, loopback), for two servers run side by side with the same
``--workers``:

- bare: ``bench/bare.py``, FastAPI + uvicorn (uvloop, httptools), a pydantic body
  and a small orjson answer, nothing else. The anchor: what HTTP alone costs here.
- decision: ``nbo serve`` on a prepared bank, with an API key
  (``Authorization: Bearer <key>``).

Bare and decision runs alternate (``--runs`` pairs, after a warm-up of each that is
not reported) so both see the same machine noise; the report gives medians, the
ratio decision / bare (median of the pairs; nbo's target is >= 0.5 with p99 <= 10
ms at 32 connections), non-2xx answers and socket errors, the servers' RSS, and a
durability check: the rows added to ``decisions`` during the run must be at least
the 2xx answers wrk counted (every acknowledged decision recorded). The rows are
counted right after the last decision run while the service is still up; with
``--sigkill`` the service is killed with SIGKILL first.

Preparation, per database (cached under ``--keep DIR``, else in a temporary folder
removed at the end): ``nbo generate --customers N --seed 1`` (the generator's fixed
product catalogue: nothing to set), a fresh PostgreSQL database ``nbo_bench_serve``
(dropped first if it exists; admin URL from ``NBO_BENCH_POSTGRES_URL``, default the
local server) or a SQLite file, then ``nbo db upgrade``, ``nbo import bank``,
``nbo train`` and ``nbo keys create --name bench --role teller --quiet``, with
``NBO_DATABASE_URL`` and ``NBO_DATA_DIR`` set for the child. If the key command
fails the runs go on without a key (and the decision answers will likely be 401s).
Before the servers start, each database is settled (PostgreSQL: ``VACUUM ANALYZE``
and ``CHECKPOINT``; SQLite: ``ANALYZE`` and a WAL checkpoint), so the runs do not pay
for writing back what the import or earlier runs left dirty.
Other ``NBO_*`` variables in the environment reach the service unchanged. The
frequency cap is lifted (``NBO_FREQUENCY_CAP=1000000`` unless set): customers are drawn
at random and asked many times a run, and capped customers would get fewer offers, so
later runs would do less work; the report gives the offers recorded per decision.

Customer ids are drawn at random per request from the generated customers file
(``bench/wrk/decision.lua``). wrk is installed with apt-get when missing and the
script runs as root; otherwise install it yourself (``apt-get install wrk``).
Progress goes to stderr, the report to stdout; server logs stay in the work folder
(``--keep``) for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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
TARGET_RATIO = 0.5
FREQUENCY_CAP = 1_000_000
TARGET_P99_MS = 10.0


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
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0].split(" Copyright")[0].strip(),
        "load_average": load_average(),
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


def database_url(kind: str, folder: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{(folder / 'nbo.sqlite3').resolve()}"
    from sqlalchemy.engine import make_url

    return make_url(ADMIN_URL).set(database=PG_DATABASE).render_as_string(hide_password=False)


def database_identity(kind: str) -> int | None:
    """The oid of the bench PostgreSQL database (a new one each time it is created)."""
    if kind != "postgresql":
        return None  # the SQLite file lives in the work folder itself
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN_URL)
    try:
        with engine.connect() as conn:
            oid = conn.execute(
                text("SELECT oid FROM pg_database WHERE datname = :name"), {"name": PG_DATABASE}
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


def prepare_database(kind: str, root: Path, bank: Path, customers: int) -> Database:
    """Migrate, import and train into a fresh database, unless ``root`` holds a ready one."""
    folder = root / kind
    url = database_url(kind, folder)
    env = child_env(folder, url)
    marker = folder / "prepared.json"
    wanted = {"customers": customers, "database_url": url}
    reuse = False
    if marker.exists():
        kept = json.loads(marker.read_text())
        try:
            # The PostgreSQL database is shared by name with any other work folder: its oid
            # tells whether it is still the one prepared here.
            reuse = kept == wanted | {"identity": database_identity(kind)}
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
            pg_admin(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
            pg_admin(f"CREATE DATABASE {PG_DATABASE}")
        say(f"{kind}: preparing {url} (log: {folder / 'prepare.log'})")
        nbo = nbo_command()
        for step in (["db", "upgrade"], ["import", "bank", str(bank)], ["train"]):
            run_logged([nbo, *step], env, folder, folder / "prepare.log")
        marker.write_text(json.dumps(wanted | {"identity": database_identity(kind)}))
    settle(kind, url)
    database = Database(kind, folder, url, env)
    database.api_key = api_key(database)
    return database


def settle(kind: str, url: str) -> None:
    """Statistics fresh and dirty pages written before any run: a database just imported
    (or grown by earlier runs) otherwise spends the first runs writing the import's
    pages back, and those runs measure that instead of decisions (seen: p99 14 ms in the
    runs after an import, 7 ms in the same runs on the settled database)."""
    from sqlalchemy import create_engine, text

    started = time.perf_counter()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if kind == "postgresql":
                conn.execute(text("VACUUM ANALYZE"))
                conn.execute(text("CHECKPOINT"))
            else:
                conn.execute(text("ANALYZE"))
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    finally:
        engine.dispose()
    say(f"{kind}: vacuumed, analysed and checkpointed in {time.perf_counter() - started:.1f} s")


def api_key(database: Database) -> str | None:
    """The bench key of this database: made once with `nbo keys create`, kept in a file."""
    path = database.folder / "api_key"
    if path.exists():
        return path.read_text().strip() or None
    argv = [nbo_command(), "keys", "create", "--name", "bench", "--role", "teller", "--quiet"]
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

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        say(f"starting {self.name}: {' '.join(self.argv[1:])} (log: {self.log})")
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
            if self._answers():
                say(f"{self.name} is ready on {self.url}")
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

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
        if self.process is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[2]) == self.process.pid:
                    found.append(int(entry.name))
        return found

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
    return Server(name, argv, env, folder, folder / f"{name}-server.log", port)


def decision_server(database: Database, workers: int) -> Server:
    port = free_port()
    argv = [nbo_command(), "serve", "--host", HOST, "--port", str(port), "--workers", str(workers)]
    env = dict(database.env)
    # The load draws customers at random, so within a run most are asked several times;
    # with the default cap (3 offers of a product per 30 days) later runs would answer
    # fewer offers, write less and look faster. Lifted, every run does the same work.
    env.setdefault("NBO_FREQUENCY_CAP", str(FREQUENCY_CAP))
    return Server(
        "decision",
        argv,
        env,
        database.folder,
        database.folder / "decision-server.log",
        port,
        ready_path="/health/ready",
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


def run_wrk(url: str, ids: Path, key: str | None, seconds: int, args: argparse.Namespace) -> dict:
    """One wrk run; the figures from the lua script's WRK_RESULT line."""
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s"]
    argv += ["--timeout", "10s", "-s", str(LUA_SCRIPT), url, "--", str(ids)]
    env = dict(os.environ)
    env["NBO_BENCH_API_KEY"] = key or ""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 120)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            result = json.loads(line.removeprefix("WRK_RESULT "))
            result["errors"] = sum(
                result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            )
            result["ok"] = result["requests"] - result["non2xx"]
            return result
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}{done.stderr}")


@dataclass
class Section:
    """The measurements of one database (or of --only-bare / --target-url)."""

    label: str
    bare: list[dict] = field(default_factory=list)
    decision: list[dict] = field(default_factory=list)
    bare_memory: tuple[float, float] = (0.0, 0.0)
    decision_memory: tuple[float, float] | None = None
    probe: str | None = None
    durability: dict[str, Any] | None = None
    load_before: str = ""
    load_after: str = ""
    api_key: bool = False


def describe_run(name: str, result: dict) -> None:
    say(
        f"  {name:8s} {result['rps']:9,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
        f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non2xx']:,}  errors {result['errors']:,}"
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
) -> Section:
    """Warm up, then alternate bare and decision runs; count decisions for durability."""
    section = Section(label, load_before=load_average(), api_key=bool(key))
    url = decision.url if decision else decision_url
    first_id = ids.open().readline().strip()
    if url:
        section.probe = probe(url, first_id, key)
        say(f"probe: POST /v1/customers/{first_id}/decisions -> {section.probe}")
    rows_before = count_decisions(database.url) if database else None
    offers_before = count_rows(database.url, "offers") if database else None
    answered = 0  # 2xx decision answers, warm-up included: all of them must be recorded

    if args.warmup > 0:
        say(f"warm-up, {args.warmup} s each (not reported)")
        describe_run("bare", run_wrk(bare.url, ids, key, args.warmup, args))
        if url:
            warm = run_wrk(url, ids, key, args.warmup, args)
            answered += warm["ok"]
            describe_run("decision", warm)
    for run in range(1, args.runs + 1):
        say(f"run {run}/{args.runs}, {args.duration} s each")
        section.bare.append(run_wrk(bare.url, ids, key, args.duration, args))
        describe_run("bare", section.bare[-1])
        section.bare_memory = max(section.bare_memory, bare.memory_mb())
        if url:
            section.decision.append(run_wrk(url, ids, key, args.duration, args))
            answered += section.decision[-1]["ok"]
            describe_run("decision", section.decision[-1])
            if decision:
                section.decision_memory = max(
                    section.decision_memory or (0.0, 0.0), decision.memory_mb()
                )
    if database and rows_before is not None:
        if args.sigkill and decision:
            decision.stop(kill=True)
        rows = count_decisions(database.url) - rows_before
        offers = count_rows(database.url, "offers") - (offers_before or 0)
        section.durability = {
            "rows_added": rows,
            "offers_per_decision": offers / rows if rows else 0.0,
            "answered_2xx": answered,
            "ok": rows >= answered,
            "after_sigkill": bool(args.sigkill and decision),
        }
    section.load_after = load_average()
    return section


# ---------------------------------------------------------------------------- report


def median(results: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def row(name: str, results: list[dict], memory: tuple[float, float] | None) -> str:
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
    }
    if section.decision:
        ratios = [d["rps"] / b["rps"] for b, d in zip(section.bare, section.decision, strict=True)]
        out["ratios"] = ratios
        out["ratio"] = statistics.median(ratios)
        out["valid"] = not any(r["non2xx"] + r["errors"] for r in section.decision)
    return out


def report(sections: list[Section], info: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"machine: {info['cores']} cores, {info['cpu']}, {info['memory_gb']} GB; "
        f"python {info['python']}; {info['wrk']}"
    )
    print(
        f"load: wrk {args.threads} thread(s), {args.connections} connections, "
        f"{args.duration} s x {args.runs} run(s) after a {args.warmup} s warm-up; "
        f"{args.workers} uvicorn worker(s) per server; {args.customers:,} customers"
    )
    for section in sections:
        summary = summarize(section)
        print()
        print(f"== {section.label} ==")
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
        if section.durability:
            d = section.durability
            verdict = "OK" if d["ok"] else "FAILED: acknowledged decisions are missing"
            extra = d["rows_added"] - d["answered_2xx"]
            when = "after SIGKILL" if d["after_sigkill"] else "right after the last run"
            print(
                f"durability ({when}): decisions rows added {d['rows_added']:,} vs 2xx answers "
                f"{d['answered_2xx']:,} (warm-up included): {verdict}"
                + (
                    f" ({extra:,} more rows: requests in flight when wrk stopped)"
                    if extra > 0
                    else ""
                )
                + (f" ({-extra:,} missing)" if extra < 0 else "")
            )
            print(
                f"work per decision: {d['offers_per_decision']:.2f} offers recorded on average "
                f"(NBO_FREQUENCY_CAP={os.environ.get('NBO_FREQUENCY_CAP', FREQUENCY_CAP)})"
            )
        elif section.decision:
            print("durability: not checked (no database known for this target)")
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
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server.")
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
    args = parser.parse_args()
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    if min(args.customers, args.duration, args.runs, args.workers, args.threads) < 1:
        parser.error("--customers, --duration, --runs, --workers and --threads must be >= 1")
    if args.only_bare and args.target_url:
        parser.error("--only-bare and --target-url exclude each other")
    return args


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

        sections: list[Section] = []
        if args.only_bare or args.target_url:
            bare = bare_server(root, args.workers)
            stack.callback(bare.stop)
            bare.start()
            bare.wait_ready(args.start_timeout)
            label = "bare only" if args.only_bare else f"target {args.target_url}"
            sections.append(
                measure(label, bare, ids, args, decision_url=args.target_url, key=args.api_key)
            )
            bare.stop()
        else:
            kinds = ["postgresql", "sqlite"] if args.database == "both" else [args.database]
            if "postgresql" in kinds and not args.keep:
                stack.callback(
                    lambda: pg_admin(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
                )
            databases = [prepare_database(k, root, bank, args.customers) for k in kinds]
            for database in databases:
                bare = bare_server(database.folder, args.workers)
                if args.stub_decision:
                    decision = bare_server(database.folder, args.workers, name="stub-decision")
                else:
                    decision = decision_server(database, args.workers)
                stack.callback(bare.stop)
                stack.callback(decision.stop)
                bare.start()
                decision.start()
                bare.wait_ready(args.start_timeout)
                decision.wait_ready(args.start_timeout)
                sections.append(
                    measure(
                        database.kind,
                        bare,
                        ids,
                        args,
                        decision=decision,
                        key=database.api_key,
                        database=database,
                    )
                )
                bare.stop()
                decision.stop()
        report(sections, info, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: servers stopped")
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
