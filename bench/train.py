"""End-to-end training benchmark: speed, memory and holdout quality of `nbo train`.

Usage::

    python bench/train.py [--customers 100000] [--seed 0] [--keep DIR] [--berka]
        [--dask WORKERS]

For each bank size asked (``--customers`` may be repeated, e.g. ``--customers 100000
--customers 1000000``), it generates a synthetic bank (Parquet), imports it into a fresh
SQLite database, and runs ``nbo train --truth BANK`` as a child process, timing it and
reading its peak RSS. The holdout comparison recorded with the model version gives the
quality figures: MAP@3 of the served blend against the oracle (the generator's true
propensities) and against popularity.

``--dask WORKERS`` then trains the same imported bank again with ``nbo train --dask`` on a
``distributed.LocalCluster`` of that many worker processes (one thread each) that this
script starts, and prints its time, the client's and the workers' peak RSS, and its
holdout MAP@3 beside the single-machine run's (issue 17: within 1 %). Both trainings use
nbo's defaults (bagging included), so the two differ by what distributing changes and
by where the bagging draws fall; ``tests/service/test_dask.py`` holds the same check
with bagging off. On one machine the cluster's workers share its cores with the client:
the point is quality and that the path works at size, not speed (README, "Training on a
Dask cluster").

``--berka`` also converts the real Czech bank data (``../shared/data/berka``), imports
it and measures temporal holdouts of 90 and 365 days: MAP@3 of the blend against
popularity. (Berka customers adopt a card or a loan rarely: the 90-day window holds
about 170 customers, and with four candidate products every ranking is near the ceiling.)

Targets (issue 17, training on one machine): 1M customers / 20 products <= 300 s with
peak RSS <= 4 GB, against 652 s and 6.3 GiB before it; the same holdout quality as
before, blend >= 0.95 x oracle at 100k. Each size's line prints them side by side with
the measured figures. Earlier targets (issue 3): blend >= 1.3 x popularity at 100k;
Berka blend >= 1.15 x popularity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGET_SECONDS_1M = 300.0
"""Issue 17: ``nbo train`` of 1M customers / 20 products, at most (seconds)."""
TARGET_RSS_BYTES_1M = 4e9
"""Issue 17: its peak RSS, at most (4 GB)."""
BEFORE_1M = (652.0, 6.3)
"""``nbo train`` at 1M before issue 17 on this machine, idle: seconds, peak RSS GiB."""
TARGET_ORACLE_RATIO = 0.95
"""Issue 17: the served blend's holdout MAP@3 at 100k, at least this times the oracle's."""
TARGET_DASK_GAP = 0.01
"""Issue 17: holdout MAP@3 on Dask within this share of the single-machine result."""
NBO = str(Path(sys.executable).with_name("nbo"))


CPU_SECONDS: dict[str, float] = {}
"""CPU seconds (user + system) of the last child run, by subcommand: on a shared machine
wall time grows with the other load, CPU time much less."""


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds, peak RSS (MiB) of the child, and its output.

    The child is waited for with ``os.wait4``, which gives its own resource usage: the
    largest of all children (``RUSAGE_CHILDREN``) would give a later, smaller child the
    peak of an earlier one, and count a Dask cluster's worker processes once reaped.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen([NBO, *args], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if child.returncode != 0:
        sys.exit(f"nbo {' '.join(args)} failed:\n{stdout}\n{stderr}")
    CPU_SECONDS[args[0]] = usage.ru_utime + usage.ru_stime
    return seconds, usage.ru_maxrss / 1024, stdout


def environment(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NBO_DATA_DIR"] = str(folder)
    env["NBO_DATABASE_URL"] = f"sqlite:///{folder / 'nbo.sqlite3'}"
    env["COLUMNS"] = "160"
    return env


def latest_metrics(folder: Path) -> dict[str, float]:
    with sqlite3.connect(folder / "nbo.sqlite3") as conn:
        (text,) = conn.execute(
            "SELECT metrics FROM model_versions ORDER BY id DESC LIMIT 1"
        ).fetchone()
    metrics: dict[str, float] = json.loads(text)
    return metrics


def synthetic(customers: int, seed: int, root: Path) -> dict[str, float]:
    folder = root / f"synthetic-{customers}"
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(folder)
    bank = folder / "bank"
    if not (bank / "adoptions.parquet").exists():
        seconds, _, _ = run(
            [
                "generate",
                "--customers",
                str(customers),
                "--seed",
                str(seed),
                "--out",
                str(bank),
                "--format",
                "parquet",
            ],
            env,
        )
        print(f"  generated {customers:,} customers in {seconds:.0f} s", flush=True)
    database = folder / "nbo.sqlite3"
    for stale in (database, folder / "nbo.sqlite3-wal", folder / "nbo.sqlite3-shm"):
        stale.unlink(missing_ok=True)
    run(["db", "upgrade"], env)
    seconds, _, _ = run(["import", "bank", str(bank)], env)
    print(f"  imported in {seconds:.0f} s", flush=True)
    seconds, rss, _ = run(["train", "--truth", str(bank)], env)
    metrics = latest_metrics(folder)
    return {
        "customers": customers,
        "train_seconds": seconds,
        "train_cpu_seconds": CPU_SECONDS["train"],
        "peak_rss_mib": rss,
        "blend": metrics["blend.map@3"],
        "lightgbm": metrics["lightgbm.map@3"],
        "rules": metrics["rules.map@3"],
        "popularity": metrics["popularity.map@3"],
        "oracle": metrics["oracle.map@3"],
        "blend_auc": metrics.get("blend.auc", float("nan")),
        "oracle_auc": metrics.get("oracle.auc", float("nan")),
    }


def _worker_usage() -> tuple[float, float]:
    """Run on each Dask worker: its peak RSS (MiB) and CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors, which child processes
    inherit) appended to ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with path.open("ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def on_dask(customers: int, root: Path, workers: int) -> dict[str, float]:
    """Train the bank :func:`synthetic` imported again, on a fresh local Dask cluster of
    ``workers`` processes: time, client and worker peaks, and the holdout's MAP@3."""
    from distributed import Client, LocalCluster

    folder = root / f"synthetic-{customers}"
    env = environment(folder)
    with _output_to(folder / "dask-workers.log"):
        # The workers inherit this output: LightGBM's network prints a line each time a
        # machine waits for another, hundreds a training, which would bury the figures.
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        )
    with cluster, Client(cluster) as client:
        seconds, rss, _ = run(["train", "--dask", cluster.scheduler_address], env)
        usage = client.run(_worker_usage)
    metrics = latest_metrics(folder)
    trained_on = metrics.get("trained_on")
    if not isinstance(trained_on, dict) or trained_on.get("engine") != "dask":
        sys.exit(f"the last model version was not trained on Dask: {trained_on!r}")
    return {
        "train_seconds": seconds,
        "client_cpu_seconds": CPU_SECONDS["train"],
        "client_rss_mib": rss,
        "workers_rss_mib": max(peak for peak, _ in usage.values()),
        "workers_cpu_seconds": sum(cpu for _, cpu in usage.values()),
        "blend": metrics["blend.map@3"],
        "lightgbm": metrics["lightgbm.map@3"],
        "partitions": float(trained_on.get("partitions", 0)),
    }


def berka(root: Path, horizons: tuple[int, ...] = (90, 365)) -> dict[int, dict[str, float]]:
    """Temporal holdouts of the Berka bank, one per horizon (MAP@3 per model)."""
    from service.data.bank import load_bank
    from service.data.db import make_engine
    from service.training import evaluate

    folder = root / "berka"
    folder.mkdir(parents=True, exist_ok=True)
    env = environment(folder)
    (folder / "nbo.sqlite3").unlink(missing_ok=True)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "berka" / "convert.py"),
            "--out",
            str(folder / "bank"),
        ],
        check=True,
        capture_output=True,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    run(["db", "upgrade"], env)
    run(["import", "bank", str(folder / "bank")], env)
    engine = make_engine(env["NBO_DATABASE_URL"])
    data = load_bank(engine)
    results = {}
    for horizon in horizons:
        table = evaluate(data, as_of=None, horizon_days=horizon).comparison
        results[horizon] = {
            **{model: float(table.loc[model, "MAP@3"]) for model in table.index},
            "customers": int(table["n_customers"].iloc[0]),
        }
    engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="Keep generated banks here (reused).")
    parser.add_argument("--berka", action="store_true", help="Also the Berka holdout.")
    parser.add_argument(
        "--dask",
        type=int,
        metavar="WORKERS",
        help="Also train each bank on a local Dask cluster of this many worker processes "
        "and compare its holdout MAP@3 with the single-machine run's.",
    )
    args = parser.parse_args()
    if args.dask is not None and not 1 <= args.dask <= 64:
        parser.error("--dask takes a number of worker processes from 1 to 64")
    sizes = args.customers or [100_000]
    root = args.keep or Path(tempfile.mkdtemp(prefix="nbo-bench-train-"))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}; data in {root}"
    )
    for customers in sizes:
        print(f"synthetic bank, {customers:,} customers", flush=True)
        r = synthetic(customers, args.seed, root)
        seconds, gib = r["train_seconds"], r["peak_rss_mib"] / 1024
        print(
            f"  nbo train: {seconds:.0f} s ({seconds / 60:.1f} min; CPU {r['train_cpu_seconds']:.0f} "
            f"s), peak RSS {gib:.2f} GiB ({gib * 2**30 / 1e9:.2f} GB); load "
            f"{os.getloadavg()[0]:.2f} at the end"
        )
        if customers >= 1_000_000:
            scale = customers / 1_000_000
            print(
                f"  issue 17 at {customers:,}: time {seconds:.0f} s (target <= "
                f"{TARGET_SECONDS_1M * scale:.0f} s, before {BEFORE_1M[0] * scale:.0f} s); "
                f"peak RSS {gib * 2**30 / 1e9:.2f} GB (target <= {TARGET_RSS_BYTES_1M / 1e9:.0f} "
                f"GB, before {BEFORE_1M[1]:.1f} GiB = {BEFORE_1M[1] * 2**30 / 1e9:.1f} GB)"
            )
        print(
            f"  holdout MAP@3: blend {r['blend']:.4f}, lightgbm {r['lightgbm']:.4f}, rules "
            f"{r['rules']:.4f}, popularity {r['popularity']:.4f}, oracle {r['oracle']:.4f}"
        )
        print(
            f"  blend / oracle = {r['blend'] / r['oracle']:.3f} (issue 17 target >= "
            f"{TARGET_ORACLE_RATIO} at 100k); blend / popularity = "
            f"{r['blend'] / r['popularity']:.3f} (target >= 1.3)"
        )
        print(
            f"  holdout AUC (mean over products): blend {r['blend_auc']:.4f}, oracle "
            f"{r['oracle_auc']:.4f}"
        )
        if args.dask is not None:
            print(f"  on Dask, a local cluster of {args.dask} worker processes", flush=True)
            d = on_dask(customers, root, args.dask)
            gap = (d["blend"] - r["blend"]) / r["blend"]
            verdict = "met" if abs(gap) <= TARGET_DASK_GAP else "NOT met"
            print(
                f"  nbo train --dask: {d['train_seconds']:.0f} s (one machine "
                f"{r['train_seconds']:.0f} s); CPU client {d['client_cpu_seconds']:.0f} s, "
                f"workers {d['workers_cpu_seconds']:.0f} s; peak RSS client "
                f"{d['client_rss_mib'] / 1024:.2f} GiB, a worker "
                f"{d['workers_rss_mib'] / 1024:.2f} GiB; {d['partitions']:.0f} partitions "
                f"(workers' output in {root / f'synthetic-{customers}' / 'dask-workers.log'})"
            )
            print(
                f"  holdout MAP@3 blend: Dask {d['blend']:.4f}, one machine {r['blend']:.4f} "
                f"({gap:+.2%}; issue 17 target within {TARGET_DASK_GAP:.0%}: {verdict}); "
                f"lightgbm Dask {d['lightgbm']:.4f}, one machine {r['lightgbm']:.4f}"
            )
    if args.berka:
        print("Berka (real Czech bank data), temporal holdouts", flush=True)
        for horizon, b in berka(root).items():
            print(
                f"  {horizon}-day holdout, {b['customers']:,} customers with an adoption: "
                f"MAP@3 blend {b['blend']:.4f}, lightgbm {b['lightgbm']:.4f}, rules "
                f"{b['rules']:.4f}, popularity {b['popularity']:.4f}; blend / popularity = "
                f"{b['blend'] / b['popularity']:.3f} (target >= 1.15)"
            )


if __name__ == "__main__":
    main()
