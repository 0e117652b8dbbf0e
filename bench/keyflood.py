"""What a made-up API key costs a worker once its key cache is full.

Usage::

    .venv/bin/python bench/keyflood.py [--entries 10000] [--keys 40000] [--rounds 3]

A request with an unknown key prefix is read from the database (in a thread) and the
answer "no such prefix" is remembered for a few seconds
(:class:`service.auth.KeyStore`), so a client hammering with made-up keys costs one
query per prefix. Once the cache holds ``--entries`` prefixes, each new one makes room
under the store's lock, holding the interpreter while requests wait. This fills a
store without a database (its read is replaced by an answer "unknown") and times
``--keys`` more made-up prefixes, 10,000 a second on the store's clock, all still
fresh; it prints the median microseconds a key over ``--rounds`` rounds and the
slowest single key. Run it on two checkouts (``PYTHONPATH=OTHER_CHECKOUT``) to
compare them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.auth import KeyStore, _Entry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000, help="The cache's bound.")
    parser.add_argument("--keys", type=int, default=40_000, help="Made-up keys a round.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if min(args.entries, args.keys, args.rounds) < 1:
        parser.error("--entries, --keys and --rounds must be >= 1")
    import service

    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}; service code in "
        f"{Path(service.__file__).resolve().parents[1]}; cache of {args.entries:,}, "
        f"{args.keys:,} made-up keys a round"
    )
    per_key = []
    now = [0.0]
    for round_ in range(1, args.rounds + 1):
        store = KeyStore(
            None,  # type: ignore[arg-type]  # never read: _load is replaced
            max_entries=args.entries,
            negative_ttl_seconds=5.0,
            clock=lambda: now[0],
        )
        store._load = lambda prefix, at: _Entry(expires_at=at + 5.0, principal=None)  # type: ignore[method-assign]
        for n in range(args.entries):
            store._refresh(f"f{n:07d}")
        slowest = 0.0
        started = time.perf_counter()
        for n in range(args.keys):
            one = time.perf_counter()
            store._refresh(f"k{n:07d}")
            slowest = max(slowest, time.perf_counter() - one)
            now[0] += 1e-4
        took = (time.perf_counter() - started) / args.keys
        per_key.append(took)
        print(f"round {round_}: {took * 1e6:7.2f} us a key, slowest {slowest * 1e6:,.0f} us")
    print(f"median: {statistics.median(per_key) * 1e6:.2f} us a made-up key")


if __name__ == "__main__":
    main()
