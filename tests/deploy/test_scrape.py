"""A real Prometheus scraping a real two-worker ``nbo serve``, with nbo's rules loaded.

The service serves a small trained model on SQLite; decisions are sent over fresh
connections so both workers answer some. Prometheus (Debian's ``prometheus``
package, started from deploy/prometheus/prometheus.yml with the target and
intervals swapped for the test's) scrapes every second. The test checks that
the decisions counted by Prometheus converge to the number sent, that each
worker reports its model version and its memory, that every alerting rule
evaluates without error on real series, and that every query of the Grafana
dashboard runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from models.artifacts import save_bundle
from models.data import BankData
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from tests.bank import AS_OF, load_trained_bank

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "nbo.json"
# The nbo command installed beside the Python running the tests.
NBO = Path(sys.executable).parent / "nbo"
ON_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

WORKERS = 2
DECISIONS = 200
CUSTOMERS = 300
CONVERGENCE_TIMEOUT = 30.0
# Generous: on a loaded machine two workers take 20 s to migrate, load and score.
STARTUP_TIMEOUT = 60.0

# Panels that must show data once decisions were made (the others read figures a
# quiet test service never produces: outcomes, NPS, conversion, dead letters).
PANELS_WITH_DATA = {
    "Build",
    "Instances up",
    "Workers per model version",
    "Model age",
    "Decision rate",
    "Decision latency",
    "Decisions by result",
    "Degraded share",
    "Decision stages, p99",
    "Offers by product",
    "Audit spool and dead letters",
    "Memory per worker",
    "Open files and database connections per worker",
}


def prometheus_or_skip() -> str:
    """The prometheus executable; a skip without it, a failure under CI."""
    executable = shutil.which("prometheus")
    if executable is None:
        message = (
            "prometheus is not installed (scripts/test-services installs it: "
            "apt-get install prometheus)"
        )
        if ON_CI:
            pytest.fail(f"{message}; it is required on CI")
        pytest.skip(message)
    return executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run ``args`` in its own process group, output to ``log``; on exit SIGTERM, then
    SIGKILL to the whole group (uvicorn's workers too) if it has not stopped in 10 s."""
    with log.open("wb") as out:
        started = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield
    finally:
        started.terminate()
        try:
            started.wait(timeout=10)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait(timeout=10)
        # Whatever the group left behind (a worker that outlived its parent).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGKILL)


def wait_for(what: str, check: Callable[[], bool], timeout: float, logs: list[Path]) -> float:
    """Poll ``check`` every 50 ms until true; the seconds it took. Fails with the logs."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return time.monotonic() - started
        time.sleep(0.05)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
    pytest.fail(f"{what}: not within {timeout} s\n{tails}")


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 300-customer synthetic bank and a model bundle trained on it (about 2 s)."""
    prometheus_or_skip()  # before training for nothing
    root = tmp_path_factory.mktemp("scrape-bank")
    write_bank(generate_bank(CUSTOMERS, seed=5), root / "bank")
    data = BankData.from_folder(root / "bank")
    bundle = train(data, as_of=AS_OF, config=TrainConfig(max_rounds=10))
    save_bundle(bundle, root / "bundle", metrics={"map@3": 0.3})
    return root / "bank", root / "bundle"


class Prometheus:
    """The HTTP API of the test's Prometheus."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr``; fails the test on a query error."""
        answer = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def decide(port: int, key: str, customer: int) -> int:
    """POST one decision over a new connection (the kernel hands it to either worker)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            f"/v1/customers/C{customer:07d}/decisions",
            body=json.dumps({"channel": "branch", "staff_id": "S1", "branch_id": "B1"}),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.slow
def test_prometheus_scrapes_two_workers_and_runs_the_rules_and_dashboard(
    small_bank: tuple[Path, Path],
    sqlite_template: Path,
    tmp_path: Path,
) -> None:
    prometheus = prometheus_or_skip()
    bank, bundle = small_bank
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = data_dir / "nbo.sqlite3"
    shutil.copy(sqlite_template, database)
    keys = load_trained_bank(
        f"sqlite:///{database}", bank, bundle, data_dir, keys={"teller": ["decisions"]}
    )

    nbo_port, prometheus_port = free_port(), free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NBO_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        NBO_DATA_DIR=str(data_dir),
        NBO_DATABASE_URL=f"sqlite:///{database}",
        NBO_OPS_ENDPOINTS="open",
        NBO_CONTROL_SHARE="0.1",
    )

    # The shipped config, pointed at this service and scraping every second.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / rules) for rules in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{nbo_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    nbo_log, prometheus_log = tmp_path / "nbo.log", tmp_path / "prometheus.log"
    logs = [nbo_log, prometheus_log]
    serve = [str(NBO), "serve", "--workers", str(WORKERS), "--port", str(nbo_port)]
    scrape = [
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]
    nbo_url = f"http://127.0.0.1:{nbo_port}"
    with process(serve, nbo_log, env), process(scrape, prometheus_log):
        api = Prometheus(f"http://127.0.0.1:{prometheus_port}")
        nbo = httpx.Client(base_url=nbo_url, timeout=2)
        ready = wait_for(
            "nbo serve ready",
            lambda: nbo.get("/health/ready").status_code == 200,
            STARTUP_TIMEOUT,
            logs,
        )
        wait_for(
            "prometheus ready",
            lambda: api.client.get("/-/ready").status_code == 200,
            STARTUP_TIMEOUT,
            logs,
        )
        # Both workers loaded the model and reported it (each writes its state file
        # once started, the scraped one reads them all).
        wait_for(
            "two workers serving v1",
            lambda: api.value('count(nbo_model_active_info{version="v1"} == 1)') == WORKERS,
            STARTUP_TIMEOUT,
            logs,
        )

        sent = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(
                pool.map(
                    lambda i: decide(nbo_port, keys["teller"], 1 + i % CUSTOMERS),
                    range(DECISIONS),
                )
            )
        answered = time.monotonic()
        assert statuses == [200] * DECISIONS

        converged = wait_for(
            f"sum(nbo_decisions_total) == {DECISIONS}",
            lambda: api.value("sum(nbo_decisions_total)") == DECISIONS,
            CONVERGENCE_TIMEOUT,
            logs,
        )
        print(
            f"\nnbo ready in {ready:.1f} s; {DECISIONS} decisions in {answered - sent:.2f} s; "
            f"Prometheus saw all of them {converged:.2f} s after the last answer"
        )

        # One series per worker for the per-worker gauges, a pid label apart.
        for gauge in ("nbo_worker_resident_memory_bytes", "nbo_worker_open_fds"):
            series = api.query(gauge)
            assert len({s["metric"]["pid"] for s in series}) == WORKERS, (gauge, series)
        memory = api.value("min(nbo_worker_resident_memory_bytes)")
        assert memory is not None and memory > 10_000_000
        age = api.value("max(nbo_model_age_seconds)")
        expected_age = time.time() - dt.datetime.combine(AS_OF, dt.time(), dt.UTC).timestamp()
        assert age is not None and abs(age - expected_age) < 120

        # Every rule evaluated against these real series, without error.
        def rules() -> dict[str, dict[str, Any]]:
            groups = api.client.get("/api/v1/rules").json()["data"]["groups"]
            return {rule["name"]: rule for group in groups for rule in group["rules"]}

        def evaluated() -> bool:
            loaded = rules().values()
            return bool(loaded) and all(not r["lastEvaluation"].startswith("0001") for r in loaded)

        wait_for("every rule evaluated", evaluated, 10, logs)
        shipped = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        assert set(rules()) == {rule["alert"] for group in shipped for rule in group["rules"]}
        for name, rule in rules().items():
            assert rule["health"] == "ok", (name, rule.get("lastError"))
        # The test bundle's as-of day is long past: NboModelStale is pending on real series.
        # A healthy service with a model raises none of the service alerts.
        alerts = {
            (alert["metric"]["alertname"], alert["metric"].get("reason"))
            for alert in api.query("ALERTS")
        }
        assert ("NboModelStale", "model older than 45 days") in alerts, alerts
        for healthy in ("NboDown", "NboHigh5xxRate", "NboDegradedDecisions", "NboSpoolGrowing"):
            assert healthy not in {name for name, _ in alerts}, alerts

        # Every query of the dashboard runs; the panels a live service feeds show data.
        board = json.loads(DASHBOARD.read_text())

        def panels_without_data() -> set[str]:
            empty = set()
            for panel in board["panels"]:
                exprs = [t["expr"].replace("$__rate_interval", "1m") for t in panel["targets"]]
                if not any([api.query(expr) for expr in exprs]):
                    empty.add(panel["title"])
            return empty

        wait_for(
            "dashboard panels showing data",
            lambda: not PANELS_WITH_DATA & panels_without_data(),
            10,
            logs,
        )
        print(f"dashboard panels without data: {sorted(panels_without_data())}")
