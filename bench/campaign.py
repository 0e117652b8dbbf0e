"""Campaign benchmark: nbo's default training next to what a data scientist fits in a notebook.

Usage::

    python bench/campaign.py [--data hillstrom|berka ...] [--seeds 5] [--sample N ...]
        [--berka-horizon DAYS ...] [--threads 1]

On the same customers, labels and splits, per product:

- **nbo**: ``models.propensity.training.train`` with the default ``TrainConfig`` (its own
  feature building, validation split, early stopping and calibration), scored with
  ``PropensityModel.score``;
- **lightgbm**: a plain ``lightgbm.LGBMClassifier`` (learning rate 0.05, up to 2,000
  trees, everything else default) early-stopped (100 rounds, log loss) on a validation
  split of the training customers, on the raw attribute table with text columns as
  pandas ``category``;
- **logistic**: scikit-learn's ``LogisticRegression`` on the same table, numbers
  median-imputed and standardised, text one-hot encoded.

Data sets:

- ``hillstrom``: Kevin Hillstrom's e-mail campaign (``examples/hillstrom/convert.py``),
  one snapshot on the campaign day ``S`` and the responses in ``[S, S + 14)``. Each seed
  draws a stratified random 25% of the customers as the test set; nbo trains on the
  rest with ``as_of = S + 14``, ``horizon = 14`` (its single-cutoff path) and the
  baselines early-stop on the validation customers nbo's own split holds out
  (``validation_fraction`` of the training customers, stratified by response and
  seeded). ``--sample N`` first draws N customers at random (repeat it for several
  sizes; 0 is all 64,000).
- ``berka``: the Czech bank (``examples/berka/convert.py``), temporal: the test is the
  adoptions in ``[T, T + H)`` (T = 1998-01-01; H = 90 and 365 days, ``--berka-horizon``)
  of the customers nbo may offer the product at ``T`` (products with fewer than 10
  adoptions in the baselines' training window are left out). nbo trains on everything before ``T`` (its monthly
  cutoffs); the baselines take one snapshot at ``T - H`` (the attributes, age, tenure
  and the products held then), labels in ``[T - H, T)``, early-stopped on a seeded
  stratified 25% of those customers, and score the snapshot at ``T``. The split does
  not move with the seed, the models' seeds do.

Figures per product and model: AUC on the test set and the responders found in the
top 10% and top 20% of the test ranking (ties broken at random, seeded), the median
over the seeds, and nbo's ratio to the LightGBM baseline. Every model runs on
``--threads`` threads (default 1, so that a busy machine times them alike).
It is a benchmark: it exits 0 whoever wins.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.data import BankData  # noqa: E402
from models.propensity import TrainConfig  # noqa: E402
from models.propensity.training import (  # noqa: E402
    stratified_split,
    train,
    window_responders,
)

HILLSTROM = REPO.parent / "shared" / "data" / "hillstrom" / "hillstrom.csv"
BERKA = REPO.parent / "shared" / "data" / "berka"
BERKA_AS_OF = pd.Timestamp("1998-01-01")
BERKA_HORIZONS = (90, 365)
TEST_SHARE = 0.25
MODELS = ("nbo", "lightgbm", "logistic")
MIN_TEST_POSITIVES = 20
"""Fewer test responders than this give an AUC too noisy to compare (its standard error
is 0.05 or more), so no ratio is printed for them."""


def load_converter(name: str) -> ModuleType:
    """The ``examples/<name>/convert.py`` module."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_convert", REPO / "examples" / name / "convert.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- one split


@dataclass
class Split:
    """One train/test split of one data set, ready for the three models.

    Attributes
    ----------
    nbo_train : BankData
        What nbo trains on, with ``train(nbo_train, as_of=as_of, horizon_days=...)``.
    nbo_test : BankData
        What nbo scores, at ``test_as_of``.
    as_of, test_as_of : pandas.Timestamp
    horizon_days : int
    train_table, test_table : pandas.DataFrame
        The baselines' attribute tables, indexed by customer id.
    train_labels : dict of str to pandas.Series
        Per product: the training customers who may take it, True if they did.
    validation : dict of str to numpy.ndarray
        Per product: True for the rows of ``train_labels`` the baselines early-stop on.
    test_labels : dict of str to pandas.Series
        Per product: the test customers, True if they took it. Every model is measured
        on the ones nbo scores (those it may offer the product).
    """

    nbo_train: BankData
    nbo_test: BankData
    as_of: pd.Timestamp
    test_as_of: pd.Timestamp
    horizon_days: int
    train_table: pd.DataFrame
    test_table: pd.DataFrame
    train_labels: dict[str, pd.Series]
    validation: dict[str, npt.NDArray[np.bool_]]
    test_labels: dict[str, pd.Series]


def stratified_share(
    ids: pd.Index, strata: npt.ArrayLike, share: float, seed: int, stream: str
) -> npt.NDArray[np.bool_]:
    """A seeded random ``share`` of the customers, the same in every stratum (nbo's own
    :func:`models.propensity.training.stratified_split`)."""
    return stratified_split(ids.to_numpy(), strata, fraction=share, seed=seed, stream=stream)


def attribute_table(data: BankData, customers: pd.Index) -> pd.DataFrame:
    """The customers' raw attributes: numbers as float, text as pandas category with the
    levels of the whole table (so train and test share codes)."""
    frame = data.customers.set_index("customer_id")
    columns = [c for c in ("segment", "branch_id") if frame[c].notna().any()]
    table = frame[columns + list(data.attribute_kinds)].copy()
    for name in table.columns:
        if name in columns or data.attribute_kinds.get(name) == "categorical":
            table[name] = table[name].astype("category")
    return table.loc[customers]


def hillstrom_splits(seeds: Sequence[int], sample: int) -> Iterator[Split]:
    """Random customer splits of the campaign (see the module docstring)."""
    convert = load_converter("hillstrom")
    frames = convert.convert(HILLSTROM)
    day = pd.Timestamp(convert.DEFAULT_CAMPAIGN_DAY)
    horizon = int(convert.RESPONSE_DAYS)
    as_of = day + pd.Timedelta(days=horizon)
    products, customers, responders = frames["products"], frames["customers"], frames["responders"]
    codes = [str(c) for c in products["product_code"]]
    everyone = BankData.from_frames(products, customers, responders.iloc[:0])
    ids = pd.Index(customers["customer_id"])
    took = {
        code: ids.isin(responders["customer_id"][responders["product_code"] == code])
        for code in codes
    }
    # Stratified by the response pattern (visit, purchase): rare purchases land on both sides.
    pattern = sum(took[code].astype(np.int64) << k for k, code in enumerate(codes))
    for seed in seeds:
        rows = np.arange(len(customers))
        if 0 < sample < rows.size:
            rows = np.sort(np.random.default_rng(seed).choice(rows.size, sample, replace=False))
        test = np.zeros(len(customers), dtype=bool)
        test[rows[stratified_share(ids[rows], pattern[rows], TEST_SHARE, seed, "bench-test")]] = (
            True
        )
        fit = np.zeros(len(customers), dtype=bool)
        fit[rows] = True
        fit &= ~test
        train_ids, test_ids = ids[fit], ids[test]
        nbo_train = BankData.from_frames(
            products, customers[fit], responders[responders["customer_id"].isin(train_ids)]
        )
        validation = nbo_validation(nbo_train, as_of, horizon, seed)
        yield Split(
            nbo_train=nbo_train,
            nbo_test=BankData.from_frames(products, customers[test], responders.iloc[:0]),
            as_of=as_of,
            test_as_of=day,
            horizon_days=horizon,
            train_table=attribute_table(everyone, train_ids),
            test_table=attribute_table(everyone, test_ids),
            train_labels={code: pd.Series(took[code][fit], index=train_ids) for code in codes},
            validation={code: validation for code in codes},
            test_labels={code: pd.Series(took[code][test], index=test_ids) for code in codes},
        )


def nbo_validation(
    data: BankData, as_of: pd.Timestamp, horizon_days: int, seed: int
) -> npt.NDArray[np.bool_]:
    """The customers (``data.customers`` order) nbo's single-cutoff split holds out for
    validation with seed ``seed``: stratified by a response to any product in the window."""
    responded = window_responders(
        data, start=as_of - pd.Timedelta(days=horizon_days), end=as_of, products=data.product_codes
    )
    ids = pd.Index(data.customers["customer_id"])
    share = TrainConfig().validation_fraction
    return stratified_share(ids, responded, share, seed, "validation")


def berka_splits(seeds: Sequence[int], horizon_days: int) -> Iterator[Split]:
    """The temporal split of the Berka bank at 1998-01-01 (see the module docstring)."""
    frames = load_converter("berka").convert(BERKA)
    data = BankData.from_frames(frames["products"], frames["customers"], frames["adoptions"])
    as_of, horizon = BERKA_AS_OF, pd.Timedelta(days=horizon_days)
    start = as_of - horizon
    train_table, train_held = berka_snapshot(data, start)
    test_table, test_held = berka_snapshot(data, as_of)
    adoptions = data.adoptions

    def adopters(code: str, begin: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
        inside = (
            (adoptions["product_code"] == code)
            & (adoptions["adopted_at"] >= begin)
            & (adoptions["adopted_at"] < end)
        )
        return adoptions["customer_id"][inside]

    share = TrainConfig().validation_fraction
    for seed in seeds:
        train_labels, validation, test_labels = {}, {}, {}
        for code in data.product_codes:
            candidates = train_table.index[~train_held[code].to_numpy()]
            labels = pd.Series(candidates.isin(adopters(code, start, as_of)), index=candidates)
            if labels.sum() < 10:
                continue
            train_labels[code] = labels
            validation[code] = stratified_share(
                candidates, labels.to_numpy(), share, seed, "bench-validation"
            )
            scored = test_table.index[~test_held[code].to_numpy()]
            test_labels[code] = pd.Series(
                scored.isin(adopters(code, as_of, as_of + horizon)), index=scored
            )
        yield Split(
            nbo_train=data,
            nbo_test=data,
            as_of=as_of,
            test_as_of=as_of,
            horizon_days=horizon_days,
            train_table=train_table,
            test_table=test_table,
            train_labels=train_labels,
            validation=validation,
            test_labels=test_labels,
        )


def berka_snapshot(data: BankData, at: pd.Timestamp) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """A notebook's snapshot of the bank at ``at``: the customers who joined before it,
    their attributes, age, tenure and a 0/1 column per product held (adopted before
    ``at`` and not closed by then)."""
    customers = data.customers[data.customers["joined_at"] < at]
    ids = pd.Index(customers["customer_id"])
    table = attribute_table(data, ids)
    table["age_years"] = ((at - customers["birth_date"]).dt.days / 365.25).to_numpy()
    table["tenure_days"] = (at - customers["joined_at"]).dt.days.to_numpy()
    adoptions = data.adoptions
    open_at = (adoptions["adopted_at"] < at) & ~(adoptions["closed_at"] <= at)
    held: dict[str, pd.Series] = {}
    for code in data.product_codes:
        holders = set(adoptions["customer_id"][open_at & (adoptions["product_code"] == code)])
        held[code] = pd.Series(ids.isin(list(holders)), index=ids)
        table[f"held_{code}"] = held[code].astype(np.float64).to_numpy()
    return table, held


# --------------------------------------------------------------------------- models


def fit_lightgbm(
    x: pd.DataFrame,
    y: npt.NDArray[np.bool_],
    validation: npt.NDArray[np.bool_],
    seed: int,
    threads: int,
) -> Callable[[pd.DataFrame], npt.NDArray[np.float64]]:
    """The notebook LightGBM: defaults, a lower learning rate, early stopping."""
    model = lgb.LGBMClassifier(
        n_estimators=2000,
        learning_rate=0.05,
        random_state=seed,
        n_jobs=threads or None,
        verbose=-1,
    )
    model.fit(
        x[~validation],
        y[~validation],
        eval_X=(x[validation],),
        eval_y=(y[validation],),
        callbacks=[lgb.early_stopping(100, verbose=False)],
    )
    return lambda frame: np.asarray(model.predict_proba(frame)[:, 1], dtype=np.float64)


def fit_logistic(
    x: pd.DataFrame,
    y: npt.NDArray[np.bool_],
    validation: npt.NDArray[np.bool_],
    seed: int,
    threads: int,
) -> Callable[[pd.DataFrame], npt.NDArray[np.float64]]:
    """Logistic regression on one-hot text and standardised numbers (all training
    customers: it needs no early stopping)."""
    text = [c for c in x.columns if isinstance(x[c].dtype, pd.CategoricalDtype)]
    numbers = [c for c in x.columns if c not in text]
    prepare = ColumnTransformer(
        [
            ("text", OneHotEncoder(handle_unknown="ignore"), text),
            ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
        ]
    )
    as_text = x[text].astype(str)
    model = Pipeline([("prepare", prepare), ("fit", LogisticRegression(max_iter=2000))])
    model.fit(pd.concat([as_text, x[numbers]], axis=1), y)

    def predict(frame: pd.DataFrame) -> npt.NDArray[np.float64]:
        ready = pd.concat([frame[text].astype(str), frame[numbers]], axis=1)
        return np.asarray(model.predict_proba(ready)[:, 1], dtype=np.float64)

    return predict


def ranking_figures(
    labels: npt.NDArray[np.bool_], scores: npt.NDArray[np.float64], seed: int
) -> dict[str, float]:
    """AUC and the responders in the top 10% and 20% (ties broken at random)."""
    shuffle = np.random.default_rng(seed).permutation(labels.size)
    order = shuffle[np.argsort(-scores[shuffle], kind="stable")]
    ranked = labels[order]
    both = labels.any() and not labels.all()
    return {
        "auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "top10": float(ranked[: int(np.ceil(0.1 * labels.size))].sum()),
        "top20": float(ranked[: int(np.ceil(0.2 * labels.size))].sum()),
    }


def nbo_scores(split: Split, config: TrainConfig) -> dict[str, pd.Series]:
    """nbo's test propensities per product, indexed by customer (those it scores)."""
    model = train(
        split.nbo_train, as_of=split.as_of, horizon_days=split.horizon_days, config=config
    )
    scores = model.score(split.nbo_test, as_of=split.test_as_of)
    return {
        str(code): part.set_index("customer_id")["propensity"]
        for code, part in scores.groupby("product_code", observed=True)
    }


def baseline_scores(
    split: Split, test: dict[str, pd.Index], seed: int, threads: int
) -> dict[str, dict[str, npt.NDArray[np.float64]]]:
    """The baselines' test scores per model and product, on the customers ``test`` names."""
    out: dict[str, dict[str, npt.NDArray[np.float64]]] = {"lightgbm": {}, "logistic": {}}
    for code, customers in test.items():
        labels = split.train_labels[code]
        x = split.train_table.loc[labels.index]
        for name, fit in (("lightgbm", fit_lightgbm), ("logistic", fit_logistic)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predict = fit(x, labels.to_numpy(), split.validation[code], seed, threads)
                out[name][code] = predict(split.test_table.loc[customers])
    return out


def run_split(split: Split, config: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Figures of the three models on one split, and their fit seconds."""
    started = time.perf_counter()
    mine = nbo_scores(split, config)
    seconds = {"nbo": time.perf_counter() - started}
    test = {
        code: labels.index.intersection(mine[code].index, sort=False)
        for code, labels in split.test_labels.items()
        if code in split.train_labels and code in mine
    }
    started = time.perf_counter()
    theirs = baseline_scores(split, test, config.seed, config.num_threads)
    seconds["baselines"] = time.perf_counter() - started
    rows = []
    for code, customers in test.items():
        labels = split.test_labels[code].loc[customers].to_numpy()
        scores = {"nbo": mine[code].loc[customers].to_numpy(dtype=np.float64)}
        scores.update({name: theirs[name][code] for name in theirs})
        for name in MODELS:
            rows.append(
                {
                    "seed": config.seed,
                    "product": code,
                    "model": name,
                    "test_rows": labels.size,
                    "test_positives": int(labels.sum()),
                    **ranking_figures(labels, scores[name], config.seed),
                }
            )
    return rows, seconds


# --------------------------------------------------------------------------- report


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}"


def report(title: str, rows: list[dict[str, Any]], seconds: list[dict[str, float]]) -> None:
    table = pd.DataFrame(rows)
    medians = table.groupby(["product", "model"], sort=False)[
        ["test_rows", "test_positives", "auc", "top10", "top20"]
    ].median()
    print(f"\n{title} (medians over {len(seconds)} seeds)")
    print(f"{'product':<16}{'model':<10}{'rows':>8}{'pos':>6}{'AUC':>8}{'top10%':>8}{'top20%':>8}")
    for (product, model), r in medians.iterrows():
        print(
            f"{product:<16}{model:<10}{r['test_rows']:>8.0f}{r['test_positives']:>6.0f}"
            f"{r['auc']:>8.4f}{r['top10']:>8.1f}{r['top20']:>8.1f}"
        )
    for product in medians.index.get_level_values(0).unique():
        mine, theirs = medians.loc[(product, "nbo")], medians.loc[(product, "lightgbm")]
        if mine["test_positives"] < MIN_TEST_POSITIVES:
            print(f"  {product}: {mine['test_positives']:.0f} test responders, too few to compare")
            continue
        wins = table[table["product"] == product].pivot_table(
            index="seed", columns="model", values="auc"
        )
        won = int((wins["nbo"] >= wins["lightgbm"]).sum()) if len(wins) else 0
        print(
            f"  {product}: nbo / lightgbm AUC {mine['auc'] / theirs['auc']:.3f} "
            f"({mine['auc'] - theirs['auc']:+.4f}; nbo at least as good on {won}/{len(wins)} "
            f"seeds), top10% {_ratio(mine['top10'], theirs['top10'])}, "
            f"top20% {_ratio(mine['top20'], theirs['top20'])}"
        )
    spent = pd.DataFrame(seconds).median()
    print(
        f"  fit seconds (median per seed, all products): nbo {spent['nbo']:.1f}, "
        f"lightgbm and logistic {spent['baselines']:.1f}"
    )


def _ratio(mine: float, theirs: float) -> str:
    return f"{mine / theirs:.3f}" if theirs else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", action="append", choices=("hillstrom", "berka"), help="default: both"
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of every model (default 1, so a busy machine times them alike; 0: all)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        action="append",
        help="Hillstrom customers drawn per seed, repeatable; 0 = all (default: 5000 and 0)",
    )
    parser.add_argument(
        "--berka-horizon",
        type=int,
        action="append",
        help="Berka label window in days, repeatable (default: 90 and 365)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (all cores) or more")
    if any(h < 7 for h in args.berka_horizon or []):
        parser.error("--berka-horizon must be at least 7 days")
    if any(n < 0 for n in args.sample or []):
        parser.error("--sample must be 0 (all) or a number of customers")
    datasets = args.data or ["hillstrom", "berka"]
    seeds = list(range(args.seeds))

    def config(seed: int) -> TrainConfig:
        return TrainConfig(seed=seed, num_threads=args.threads)

    print(f"machine: {machine()}; python {platform.python_version()}, lightgbm {lgb.__version__}")
    print(f"started {dt.datetime.now().isoformat(timespec='seconds')}")
    for name in datasets:
        if name == "hillstrom":
            for sample in args.sample or [5000, 0]:
                rows, seconds = [], []
                for seed, split in zip(seeds, hillstrom_splits(seeds, sample), strict=True):
                    figures, spent = run_split(split, config(seed))
                    rows += figures
                    seconds.append(spent)
                size = f"{sample:,} customers" if sample else "all 64,000 customers"
                report(f"Hillstrom, {size}, 25% test", rows, seconds)
        else:
            for horizon in args.berka_horizon or BERKA_HORIZONS:
                rows, seconds = [], []
                for seed, split in zip(seeds, berka_splits(seeds, horizon), strict=True):
                    figures, spent = run_split(split, config(seed))
                    rows += figures
                    seconds.append(spent)
                title = f"Berka, trained before {BERKA_AS_OF.date()}, test {horizon} days after"
                report(title, rows, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
