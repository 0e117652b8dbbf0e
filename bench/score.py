"""Propensity model: training time and scoring latency on a synthetic bank.

Usage::

    python bench/score.py [--customers 100000] [--seed 0] [--as-of 2025-06-01]
                          [--samples 20000] [--bundle DIR]

``--bundle DIR`` loads the model from ``DIR`` when it exists (to time scoring again
without training), else saves the trained model there.

Generates a bank with ``models.synthetic.generate_bank``, trains a propensity model
(``models.propensity.train``, default settings) and prints the seconds and peak RSS of
training, the round trip through a bundle, batch scoring of every customer, and the
latency of the decision-time paths on one customer: ``score_customer`` (median and
p99 over ``--samples`` calls cycling through 1,000 customers), ``explain`` and
``FeatureBuilder.for_customer``. Targets: ``score_customer`` median <= 300 us against
about 20 products, training <= ~2 minutes at 100k customers on two cores.

As a service would, the benchmark freezes the objects made at start-up out of the
garbage collector (``gc.freeze()``) before timing the decision paths.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.artifacts import load_bundle, save_bundle  # noqa: E402
from models.data import BankData, CustomerState  # noqa: E402
from models.propensity.training import train  # noqa: E402
from models.synthetic import generate_bank  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def latencies(
    call: Callable[[CustomerState], object], states: Sequence[CustomerState], n: int
) -> np.ndarray:
    """Microseconds of ``n`` calls cycling through ``states`` (after a warm-up)."""
    for state in states[:200]:
        call(state)
    out = np.empty(n)
    for i in range(n):
        state = states[i % len(states)]
        started = time.perf_counter_ns()
        call(state)
        out[i] = (time.perf_counter_ns() - started) / 1000
    return out


def describe(name: str, micros: np.ndarray) -> None:
    print(
        f"{name:26s} median {np.median(micros):8.1f} us   p99 {np.percentile(micros, 99):8.1f} us"
        f"   mean {micros.mean():8.1f} us   ({micros.size:,} calls)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--as-of", default="2025-06-01")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument(
        "--bundle",
        type=Path,
        help="load the model from this bundle folder if it exists, else save it there",
    )
    args = parser.parse_args()
    as_of = pd.Timestamp(args.as_of)

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{args.customers:,} customers, seed {args.seed}, as of {as_of.date()}"
    )
    started = time.perf_counter()
    bank = generate_bank(args.customers, args.seed)
    data = BankData.from_frames(bank.products, bank.customers, bank.adoptions)
    print(
        f"data:        {time.perf_counter() - started:8.1f} s   {len(data.adoptions):,} adoptions, "
        f"{len(data.products)} products"
    )

    if args.bundle is not None and args.bundle.exists():
        started = time.perf_counter()
        model = load_bundle(args.bundle)
        print(f"bundle:      load {time.perf_counter() - started:6.2f} s   from {args.bundle}")
    else:
        started = time.perf_counter()
        model = train(data, as_of=as_of)
        trained = time.perf_counter() - started
        summary = model.report["summary"]
        print(
            f"train:       {trained:8.1f} s   peak RSS {peak_rss_mb():,.0f} MiB   "
            f"{summary['lightgbm_products']}/{summary['products']} products with a booster, "
            f"{model.n_trees} trees, validation mean AUC {summary['mean_auc']:.3f}"
        )
        with tempfile.TemporaryDirectory() as folder:
            target = args.bundle or Path(folder) / "bundle"
            started = time.perf_counter()
            manifest = save_bundle(model, target)
            saved = time.perf_counter() - started
            started = time.perf_counter()
            model = load_bundle(target)
            print(
                f"bundle:      save {saved:6.2f} s, load {time.perf_counter() - started:6.2f} s"
                f"   model {manifest['model_version']}"
            )

    started = time.perf_counter()
    scores = model.score(data, as_of=as_of)
    print(
        f"score batch: {time.perf_counter() - started:8.1f} s   {len(scores):,} eligible pairs "
        f"for {scores['customer_id'].nunique():,} customers"
    )

    ids = data.customers["customer_id"].to_numpy(dtype=object)
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(ids[data.customers["joined_at"] < as_of], size=1000, replace=False)
    states = [data.customer_state(str(c)) for c in chosen]
    products = [model.score_customer(s, as_of=as_of) for s in states]
    eligible = np.array([len(p) for p in products])
    targets = [(s, p[0].product_code) for s, p in zip(states, products, strict=True) if p]
    builder = model.builder
    del bank, scores
    gc.collect()
    gc.freeze()

    print(
        f"one customer: {model.n_trees} trees in the merged model, "
        f"{eligible.mean():.1f} eligible products on average (of {len(model.products)})"
    )
    describe(
        "score_customer",
        latencies(lambda s: model.score_customer(s, as_of=as_of), states, args.samples),
    )
    describe(
        "features_for_customer",
        latencies(lambda s: builder.for_customer(s, as_of=as_of), states, args.samples),
    )
    by_state = {id(s): code for s, code in targets}
    explained = [s for s, _ in targets]
    describe(
        "explain (top 3)",
        latencies(
            lambda s: model.explain(s, by_state[id(s)], as_of=as_of),
            explained,
            min(args.samples, 3000),
        ),
    )


if __name__ == "__main__":
    main()
