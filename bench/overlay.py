"""What a changed customer costs a worker once its snapshot's overlay is full.

Usage::

    .venv/bin/python bench/overlay.py [--limit 50000] [--changes 200000] [--rounds 3]

A worker re-reads a customer after each change (an adoption, an outcome, an attribute)
into the overlay of its snapshot (:class:`service.decision.state.Customers`), which
keeps the newest :data:`~service.decision.state.OVERLAY_LIMIT` and drops the oldest
beyond it: a busy bank fills it and then drops one customer per change, in a thread that
holds the interpreter while requests wait. This fills an overlay without a store to
``--limit`` and times ``--changes`` more customers added one by one (each drops the
oldest), printing the median microseconds a change over ``--rounds`` rounds and the
slowest single change. No database is needed. Run it on two checkouts
(``PYTHONPATH=OTHER_CHECKOUT``) to compare them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.decision.state import Customers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=50_000)
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if min(args.limit, args.changes, args.rounds) < 1:
        parser.error("--limit, --changes and --rounds must be >= 1")
    import service

    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}; service code in "
        f"{Path(service.__file__).resolve().parents[1]}; overlay of {args.limit:,}, "
        f"{args.changes:,} changes a round"
    )
    entry: Any = object()  # the overlay only holds what it is given
    per_change = []
    for round_ in range(1, args.rounds + 1):
        customers = Customers(None, limit=args.limit)
        for n in range(args.limit):
            customers[f"F{n:09d}"] = entry
        slowest = 0.0
        started = time.perf_counter()
        for n in range(args.changes):
            one = time.perf_counter()
            customers[f"C{n:09d}"] = entry
            slowest = max(slowest, time.perf_counter() - one)
        took = (time.perf_counter() - started) / args.changes
        per_change.append(took)
        print(
            f"round {round_}: {took * 1e6:6.2f} us a change (timer included), slowest "
            f"{slowest * 1e6:,.0f} us; overlay {len(customers.overlay):,}"
        )
    print(f"median: {statistics.median(per_change) * 1e6:.2f} us a change")


if __name__ == "__main__":
    main()
