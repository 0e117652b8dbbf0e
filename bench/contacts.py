"""Contact history in a worker: memory and policy cost, ContactBook against ContactHistory.

Usage::

    .venv/bin/python bench/contacts.py [--customers 100000] [--offers 3] [--rounds 7]

No database: it builds, in a child process per variant, the contact history a worker
holds after ``--customers`` customers were each offered ``--offers`` products (one
decision each, ids as the server makes them), and prints the resident memory it
added and the bytes per customer; for the book also what a full sweep costs. Then,
in this process, over a sample of 20,000 such customers (a tenth with a decline),
it times per decision what serving does with the history: the policy check
(``Arbiter.rank`` over 20 products with the history looked up as the engine does) and
recording the decision's offers, as the median microseconds of ``--rounds`` rounds.
"Old" is ``defaultdict(ContactHistory)`` and, when the checkout has git, the policy
code of ``HEAD`` (else today's ``rank`` over a ContactHistory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.decision import policy  # noqa: E402
from service.decision.audit import derived_id, new_id  # noqa: E402
from service.decision.contacts import ContactBook  # noqa: E402

NOW = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
PRODUCTS = [f"product-{k:02d}" for k in range(20)]
WEIGHTS = [1.0 / (k + 1) for k in range(20)]  # a few products are offered most
SAMPLE = 20_000


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _offers(n: int, k: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """Per customer, one decision's ``k`` offers of distinct products in the last 30 days."""
    rng = random.Random(seed)
    start = (NOW - dt.timedelta(days=30)).timestamp()
    out = []
    for c in range(n):
        decision = new_id()
        codes: set[str] = set()
        while len(codes) < k:
            codes.add(rng.choices(PRODUCTS, WEIGHTS)[0])
        stamp = start + rng.random() * 30 * 86400
        out.append(
            (
                f"C{c:08d}",
                [
                    (derived_id(decision, j + 1), code, stamp)
                    for j, code in enumerate(sorted(codes))
                ],
            )
        )
    return out


def _fill(kind: str, data: list[tuple[str, list[tuple[str, str, float]]]]) -> Any:
    if kind == "old":
        old: defaultdict[str, policy.ContactHistory] = defaultdict(policy.ContactHistory)
        for customer, offers in data:
            history = old[customer]
            for offer_id, code, stamp in offers:
                history.add_offer_at(offer_id, code, stamp)
        return old
    book = ContactBook()
    for customer, offers in data:
        book[customer].add_offers_at(offers)
    return book


def child(kind: str, customers: int, offers: int) -> None:
    """Build one variant and print its figures as JSON (run in a fresh process)."""
    # Customer ids exist in a worker anyway (the snapshot): make them, and the offer
    # ids (made per request and freed unless kept), before the first reading.
    data = _offers(customers, offers)
    gc.collect()
    gc.disable()  # as a worker reads its history at start-up
    before = _rss()
    started = time.process_time()
    held = _fill(kind, data)
    built = time.process_time() - started
    del data  # the offer ids the history did not keep are freed now
    gc.collect()
    added = _rss() - before
    figures: dict[str, Any] = {"rss_added": added, "build_seconds": built, "held": len(held)}
    if kind == "new":
        figures["record_bytes"] = held.nbytes()
        started = time.process_time()
        figures["swept_none"] = held.sweep(NOW, 30 * 86400.0)
        figures["sweep_seconds"] = time.process_time() - started
        started = time.process_time()
        held.sweep(NOW, 30 * 86400.0, budget=10_000)
        figures["sweep_10k_seconds"] = time.process_time() - started
        started = time.process_time()
        figures["swept_half"] = held.sweep(NOW + dt.timedelta(days=15), 30 * 86400.0)
        figures["sweep_half_seconds"] = time.process_time() - started
    print(json.dumps(figures))


def _old_policy() -> ModuleType | None:
    """``service/decision/policy.py`` as committed at ``HEAD`` (None without git)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", "HEAD:service/decision/policy.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "old_policy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_policy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_policy"] = module
    spec.loader.exec_module(module)
    return module


def _median_us(run: Callable[[int], None], calls: int, rounds: int) -> tuple[float, float]:
    """Median and spread of CPU microseconds per call of ``rounds`` rounds (CPU time:
    on a shared machine, time spent waiting for a core is not the code's)."""
    times = []
    for r in range(rounds):
        started = time.process_time()
        run(r)
        times.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(times), max(times) - min(times)


def _arbiter(module: Any) -> Any:
    n = len(PRODUCTS)
    return module.Arbiter.for_catalogue(
        product_codes=PRODUCTS,
        values=np.linspace(1.0, 3.0, n),
        weights=np.ones(n),
        active=np.ones(n, dtype=bool),
        policy=module.Policy(),
    )


def policy_costs(offers: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Microseconds per decision: the policy check and recording the offers."""
    rng = np.random.default_rng(0)
    data = _offers(SAMPLE, offers, seed=1)
    old_module = _old_policy()
    old_kind = "HEAD" if old_module is not None else "today's rank"
    old_module = old_module or policy
    old: defaultdict[str, Any] = defaultdict(old_module.ContactHistory)
    book = ContactBook()
    for customer, chosen in data:
        history = old[customer]
        for offer_id, code, stamp in chosen:
            history.add_offer_at(offer_id, code, stamp)
        book[customer].add_offers_at(chosen)
    for customer, chosen in data[::10]:  # a tenth declined one of their offers lately
        at = NOW - dt.timedelta(days=3)
        old[customer].add_decline(chosen[0][1], at)
        book[customer].add_decline(chosen[0][1], at)
    customers = [customer for customer, _ in data]
    customers += [f"N{k}" for k in range(SAMPLE // 2)]  # a third never offered anything
    random.Random(2).shuffle(customers)
    propensity = rng.random((len(customers), len(PRODUCTS)))
    propensity[rng.random(propensity.shape) < 0.3] = np.nan  # held or ineligible
    rows = list(propensity)
    old_arbiter, new_arbiter = _arbiter(old_module), _arbiter(policy)
    calls = len(customers)

    def old_rank(_: int) -> None:
        get = old.get
        for customer, p in zip(customers, rows, strict=True):
            old_arbiter.rank(p, history=get(customer), now=NOW, limit=3, explain=False)

    def new_rank(_: int) -> None:
        get = book.get
        for customer, p in zip(customers, rows, strict=True):
            new_arbiter.rank(p, history=get(customer), now=NOW, limit=3, explain=False)

    # Check that both decide alike on every customer of the sample.
    for customer, p in zip(customers, rows, strict=True):
        a = old_arbiter.rank(p, history=old.get(customer), now=NOW, limit=3)
        b = new_arbiter.rank(p, history=book.get(customer), now=NOW, limit=3)
        assert tuple(a.offers) == tuple(b.offers) and a.suppressed == b.suppressed, customer

    # Each round records a new decision for every customer of the sample (new ids).
    fresh = [_offers(SAMPLE, offers, seed=3 + r) for r in range(rounds)]
    recorded_old: defaultdict[str, Any] = defaultdict(old_module.ContactHistory)
    recorded_new = ContactBook()
    recorded_each = ContactBook()

    def old_record(r: int) -> None:  # as ServingState.remember_offers does today
        for customer, chosen in fresh[r]:
            history = recorded_old[customer]
            for offer_id, code, stamp in chosen:
                history.add_offer_at(offer_id, code, stamp)
            if len(history.offers) > history.trim_at:
                history.forget_before(NOW - dt.timedelta(days=30))

    def new_record(r: int) -> None:  # one new record per decision
        for customer, chosen in fresh[r]:
            history = recorded_new[customer]
            history.add_offers_at(chosen)
            if len(history.offers) > history.trim_at:
                history.forget_before(NOW - dt.timedelta(days=30))

    def new_record_each(r: int) -> None:  # today's remember_offers over the book
        for customer, chosen in fresh[r]:
            history = recorded_each[customer]
            for offer_id, code, stamp in chosen:
                history.add_offer_at(offer_id, code, stamp)
            if len(history.offers) > history.trim_at:
                history.forget_before(NOW - dt.timedelta(days=30))

    # Start-up reads the history grouped by customer and product: one add_offers a group.
    groups = [
        [(customer, code, [(stamp, offer_id) for offer_id, c, stamp in chosen if c == code])]
        for customer, chosen in fresh[0]
        for code in sorted({c for _, c, _ in chosen})
    ]

    def load(make: Callable[[], Any]) -> Callable[[int], None]:
        def run(_: int) -> None:
            history = make()
            for group in groups:
                for customer, code, pairs in group:
                    history[customer].add_offers(code, pairs)

        return run

    read = [
        (customer, code, offer_id, stamp)
        for group in groups
        for customer, code, pairs in group
        for stamp, offer_id in pairs
    ]

    def load_all(_: int) -> None:
        ContactBook().load_offers(read)

    gc.freeze()  # as a worker freezes its snapshot: time the work, not the collector
    return {
        f"policy check, old ({old_kind})": _median_us(old_rank, calls, rounds),
        "policy check, new (ContactBook)": _median_us(new_rank, calls, rounds),
        f"record {offers} offers, old": _median_us(old_record, SAMPLE, rounds),
        f"record {offers} offers, new (add_offers_at)": _median_us(new_record, SAMPLE, rounds),
        f"record {offers} offers, new (add_offer_at each)": _median_us(
            new_record_each, SAMPLE, rounds
        ),
        "start-up read (add_offers a product), old": _median_us(
            load(lambda: defaultdict(old_module.ContactHistory)), SAMPLE, rounds
        ),
        "start-up read (add_offers a product), new": _median_us(load(ContactBook), SAMPLE, rounds),
        "start-up read (load_offers), new": _median_us(load_all, SAMPLE, rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--offers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.customers, args.offers)
        return
    n, k = args.customers, args.offers
    print(f"contact history of {n:,} customers x {k} offers")
    figures = {}
    for kind in ("old", "new"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--customers", str(n), "--offers", str(k)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        figures[kind] = json.loads(out)
    old, new = figures["old"], figures["new"]
    print(f"{'':32}{'old':>14}{'new':>14}")
    print(f"{'RSS added (MB)':32}{old['rss_added'] / 1e6:14.1f}{new['rss_added'] / 1e6:14.1f}")
    print(
        f"{'bytes per customer (RSS)':32}{old['rss_added'] / n:14.0f}{new['rss_added'] / n:14.0f}"
    )
    print(f"{'build (CPU s)':32}{old['build_seconds']:14.2f}{new['build_seconds']:14.2f}")
    print(
        f"book: records {new['record_bytes'] / n:.0f} B a customer; full sweep "
        f"{new['sweep_seconds']:.3f} s (dropped {new['swept_none']}), 10k-customer step "
        f"{new['sweep_10k_seconds'] * 1e3:.1f} ms, 15 days on {new['sweep_half_seconds']:.3f} s "
        f"(dropped {new['swept_half']:,})"
    )
    print(f"per decision, median of {args.rounds} rounds over {SAMPLE:,}+ customers (us):")
    for name, (median, spread) in policy_costs(k, args.rounds).items():
        print(f"  {name:48}{median:8.2f}  (spread {spread:.2f})")


if __name__ == "__main__":
    main()
