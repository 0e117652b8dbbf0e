"""Synthetic bank generation: speed and memory at a million customers.

Usage::

    python bench/generate.py [--customers 1000000] [--seed 0] [--format csv|parquet]

Generates a bank with ``models.synthetic.generate_bank``, writes it with
``write_bank`` (import-format tables plus ``truth/``, including the oracle's
propensities) into a temporary folder, and prints the seconds of each phase,
the rows and bytes written per file, and the process's peak RSS. The target:
a million customers in a few minutes on two cores, within a few GB.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.synthetic import generate_bank, write_bank  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def count_rows(path: Path) -> str:
    if path.suffix == ".parquet":
        return f"{pq.ParquetFile(path).metadata.num_rows:,}"
    if path.suffix != ".csv":
        return "-"
    with path.open("rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return f"{lines - 1:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    args = parser.parse_args()

    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rsimulating month {done}/{total}", end="", file=sys.stderr, flush=True)

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{args.customers:,} customers, seed {args.seed}, {args.format}"
    )
    started = time.perf_counter()
    bank = generate_bank(args.customers, args.seed, progress=progress)
    generated = time.perf_counter()
    if show:
        print(file=sys.stderr)
    print(f"generate_bank: {generated - started:8.1f} s   peak RSS {peak_rss_mb():,.0f} MiB")
    with tempfile.TemporaryDirectory() as folder:
        written = write_bank(bank, Path(folder), fmt=args.format)
        done = time.perf_counter()
        print(f"write_bank:    {done - generated:8.1f} s   peak RSS {peak_rss_mb():,.0f} MiB")
        print(f"total:         {done - started:8.1f} s")
        for name, path in written.items():
            rows = count_rows(path)
            size = path.stat().st_size / 2**20
            print(f"  {name:13s} {rows:>12} rows {size:10.1f} MiB  {path.relative_to(folder)}")
    print(f"peak RSS: {peak_rss_mb():,.0f} MiB")


if __name__ == "__main__":
    main()
