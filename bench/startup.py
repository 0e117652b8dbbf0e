"""Time to ready: how long ``nbo serve`` takes to answer ``/health/ready``, and its RSS then.

Usage::

    NBO_DATABASE_URL=... NBO_DATA_DIR=... .venv/bin/python bench/startup.py [--runs 3]

Run it against a prepared bank, e.g. the one ``bench/serve.py --keep DIR`` leaves
(``NBO_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/nbo_bench_serve``,
``NBO_DATA_DIR=DIR/postgresql``). A worker reads the bank, scores every customer and
reads the contact history of the policy windows before it is ready, so the figures grow
with customers and with recent offers; the report says how many offers the window held.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_start(nbo: str, timeout: float) -> tuple[float, float]:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [nbo, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < timeout:
            if server.poll() is not None:
                sys.exit(f"nbo serve exited with {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1):
                    return time.perf_counter() - started, rss_mb(server.pid)
            except OSError:
                time.sleep(0.1)
        sys.exit(f"not ready after {timeout:.0f} s")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    url = os.environ.get("NBO_DATABASE_URL")
    if not url:
        sys.exit("set NBO_DATABASE_URL (and NBO_DATA_DIR) to a prepared bank")
    nbo = shutil.which("nbo") or str(Path(sys.executable).with_name("nbo"))
    engine = create_engine(url)
    with engine.connect() as conn:
        customers = conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
        offers = conn.execute(
            text("SELECT count(*) FROM offers WHERE created_at >= :since"),
            {"since": time.strftime("%Y-%m-%d", time.gmtime(time.time() - 30 * 86400))},
        ).scalar_one()
    engine.dispose()
    print(f"{customers:,} customers, {offers:,} offers in the last 30 days", flush=True)
    results = []
    for run in range(1, args.runs + 1):
        seconds, rss = one_start(nbo, args.timeout)
        results.append((seconds, rss))
        print(f"run {run}: ready after {seconds:.1f} s, RSS {rss:,.0f} MB", flush=True)
    print(
        f"median: ready after {statistics.median(r[0] for r in results):.1f} s, "
        f"RSS {statistics.median(r[1] for r in results):,.0f} MB"
    )


if __name__ == "__main__":
    main()
