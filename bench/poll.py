"""What a change-log poll costs a worker while it looks for gaps.

Usage::

    NBO_DATABASE_URL=postgresql+psycopg://... .venv/bin/python bench/poll.py
        [--gaps 10000] [--polls 10] [--rounds 2]

A worker's poll (:meth:`service.decision.state.ServingState.poll`) reads the change
events after the last one it saw and, for :data:`~service.decision.state.GAP_SECONDS`,
the ids it skipped over (a transaction that commits late). A worker that loaded while
the log was empty and then sees an event far above its last one has
:data:`~service.decision.state.MAX_GAPS` of them. This times that read, read-only, on
the database of ``NBO_DATABASE_URL`` (ids above any in the log, so nothing is found:
the cost is the statement's): the gaps as one bound parameter each (the form SQLite
takes), as one ``bigint[]`` array bound as a Python list (PostgreSQL's before issue 17's
nineteenth round: the driver dumps each element in Python, on the poll's thread) and as
that array's text (PostgreSQL's now, :func:`~service.decision.state._bigint_array`),
alternated ``--rounds`` times, ``--polls`` reads each. Prints the median wall time and
this process's CPU a poll (the worker's share, held from the event loop; PostgreSQL's is
the difference, roughly).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402

from service.decision import state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaps", type=int, default=state.MAX_GAPS)
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if min(args.gaps, args.polls, args.rounds) < 1:
        parser.error("--gaps, --polls and --rounds must be >= 1")
    url = os.environ.get("NBO_DATABASE_URL")
    if not url:
        sys.exit("set NBO_DATABASE_URL to the database to read")
    engine = create_engine(url)
    if engine.dialect.name != "postgresql":
        sys.exit("bench/poll.py compares PostgreSQL's two forms; NBO_DATABASE_URL is not one")
    with engine.connect() as conn:
        top = int(conn.execute(text("SELECT coalesce(max(id), 0) FROM change_events")).scalar())
    last = top + 2 * args.gaps + 1
    gaps = list(range(last - args.gaps, last))
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}; {args.gaps:,} gaps, "
        f"{args.polls} polls a form, {args.rounds} rounds"
    )
    forms = (
        ("one parameter a gap", state._POLL_WITH_GAPS, sorted),
        ("bigint[] as a list", state._POLL_WITH_GAP_ARRAY, sorted),
        ("bigint[] as text", state._POLL_WITH_GAP_ARRAY, state._bigint_array),
    )
    for round_ in range(1, args.rounds + 1):
        for name, query, bound in forms:
            walls, cpus = [], []
            for _ in range(args.polls):
                wall, cpu = time.perf_counter(), time.process_time()
                with engine.connect() as conn:
                    conn.execute(query, {"last": last, "gaps": bound(gaps)}).all()
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            print(
                f"round {round_}, {name:20s}: {statistics.median(walls) * 1000:7.1f} ms a poll, "
                f"{statistics.median(cpus) * 1000:7.1f} ms of this process's CPU"
            )
    engine.dispose()


if __name__ == "__main__":
    main()
