"""The contact history's sweep beside a serving event loop: how late a 1 ms sleeper wakes.

Usage::

    python bench/sweep.py [--customers 1000000] [--seconds 60] [--rounds 1]

A serving worker forgets, at each change poll (twice a second), a little of its
contact history: enough customers examined for a pass in ten minutes
(``service.decision.state.sweep_budget``; before, ``HISTORY_SWEEP_BUDGET`` a poll). This
builds a ``ContactBook`` of ``--customers`` customers (1-3 offers each, all inside the
windows, so nothing is dropped and every poll does its whole budget), then for ``--seconds``
runs an event loop on which a coroutine sleeps 1 ms at a time and records how late it
wakes, while the polls sweep:

- ``loop``: as a worker does now, on the event loop a slice at a time
  (``service.app._sweep_history``; with ``PYTHONPATH`` pointing at a checkout from
  before the paced sweep, ``HISTORY_SWEEP_BUDGET`` a poll);
- ``thread``: as a worker did before, the whole budget on a thread
  (``asyncio.to_thread(book.sweep, ..., budget=HISTORY_SWEEP_BUDGET)``); with
  ``PYTHONPATH`` pointing at a checkout of the code before, this is that code's sweep;
- ``none``: no sweep (the machine's own noise).

The modes alternate ``--rounds`` times. Each line gives the wake-up gaps' median, p99,
p99.9 and maximum, and how many exceeded 3 ms: a request in flight waits as long.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import platform
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

if not os.environ.get("PYTHONPATH"):  # else the code it names (another checkout)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import app  # noqa: E402
from service.decision import state as state_module  # noqa: E402
from service.decision.contacts import ContactBook  # noqa: E402
from service.decision.state import HISTORY_SWEEP_BUDGET  # noqa: E402

PACED = hasattr(state_module, "sweep_budget")
"""Whether the sweep on the loop is paced to a pass every ten minutes (this checkout's)
or sweeps ``HISTORY_SWEEP_BUDGET`` a poll (one from before)."""

NOW = dt.datetime.now(dt.UTC)
KEEP_SECONDS = 90 * 86400.0
POLL_SECONDS = 0.5


def book_of(customers: int) -> ContactBook:
    book = ContactBook()
    rng = random.Random(1)
    now = NOW.timestamp()
    for i in range(customers):
        book[f"C{i:07d}"].add_offers_at(
            [
                (str(uuid.uuid4()), f"p{rng.randint(0, 19)}", now - rng.random() * 20 * 86400)
                for _ in range(rng.randint(1, 3))
            ]
        )
    return book


class _State:
    """What ``service.app._sweep_history`` needs of a serving state."""

    def __init__(self, book: ContactBook) -> None:
        self.history = book

    def sweep_history(self, budget: int) -> bool:
        self.history.sweep(NOW, KEEP_SECONDS, budget=budget)
        return bool(getattr(self.history, "sweeping", False))


async def measure(book: ContactBook, mode: str, seconds: float) -> list[float]:
    stop = False

    async def polls() -> None:
        while not stop:
            await asyncio.sleep(POLL_SECONDS)
            if mode == "loop":
                if PACED:
                    await app._sweep_history(_State(book), POLL_SECONDS)  # type: ignore[arg-type,call-arg]
                else:  # a checkout from before the paced sweep
                    await app._sweep_history(_State(book))  # type: ignore[arg-type,call-arg]
            elif mode == "thread":
                await asyncio.to_thread(book.sweep, NOW, KEEP_SECONDS, budget=HISTORY_SWEEP_BUDGET)

    poller = asyncio.create_task(polls())
    gaps: list[float] = []
    end = time.perf_counter() + seconds
    last = time.perf_counter()
    while time.perf_counter() < end:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    stop = True
    await poller
    return sorted(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default="loop,thread,none")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"loop", "thread", "none"}
    if unknown or args.customers < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("modes are loop, thread and none; sizes must be positive")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.2f}; contact book from {sys.modules[ContactBook.__module__].__file__}"
    )
    started = time.perf_counter()
    book = book_of(args.customers)
    gc.collect()
    gc.freeze()  # as a serving worker does once loaded (service.decision.state)
    print(f"{len(book):,} customers held (built in {time.perf_counter() - started:.0f} s)")
    if PACED:
        budget = state_module.sweep_budget(len(book), POLL_SECONDS)
        print(
            f"every {POLL_SECONDS} s sweeping {budget:,} customers on the loop (a pass in "
            f"{state_module.HISTORY_PASS_SECONDS:.0f} s), {HISTORY_SWEEP_BUDGET:,} on the thread"
        )
    else:
        print(f"sweeping up to {HISTORY_SWEEP_BUDGET:,} customers every {POLL_SECONDS} s")
    for round_ in range(args.rounds):
        for mode in modes:
            gaps = asyncio.run(measure(book, mode, args.seconds))
            late = sum(gap > 0.003 for gap in gaps)
            print(
                f"round {round_ + 1} {mode:<6}  wake-up gaps (ms): median "
                f"{statistics.median(gaps) * 1e3:.2f}  p99 {gaps[int(len(gaps) * 0.99)] * 1e3:.2f}"
                f"  p99.9 {gaps[int(len(gaps) * 0.999)] * 1e3:.2f}  max {gaps[-1] * 1e3:.2f};"
                f"  over 3 ms: {late} in {args.seconds:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
