"""Training a propensity model: cutoffs, sampled rows, one booster per product.

Training data: monthly cutoffs
------------------------------
The latest month start ``v`` with ``v + horizon <= as_of`` is the validation cutoff;
up to ``n_cutoffs`` earlier month starts whose whole label window ends by ``v`` are the
training cutoffs, so no adoption is a label in both. At each cutoff features are built
from data strictly before it (rules mined strictly before it too) and the label is an
adoption in ``[cutoff, cutoff + horizon)``. When a cutoff's rows of a product exceed
its share of ``max_rows_per_product``, negatives are subsampled (all positives kept)
and reweighted by the inverse sampling rate, so the weighted data keep the true base
rate; otherwise every row is kept.

Training data: one cutoff (a campaign snapshot)
-----------------------------------------------
When the history is too short for that plan, or its training windows hardly hold the
products taken up in the last window (a campaign: a snapshot of customers on day ``c``,
maybe holdings dated before it, and the responders dated in the days after), the model
learns from exactly one cutoff ``c = as_of - horizon`` to the day (not a month start):
features from data strictly before ``c``, labels the adoptions in ``[c, as_of)``. Its
customers are split at random (seeded by ``TrainConfig.seed``, stratified by whether
the customer adopted any modelled product in the window) into training and validation
(``TrainConfig.validation_fraction``), and the validation customers at random into the
two calibration folds; see :func:`training_plan` and :func:`stratified_split`.

Each product's booster, its leaves and leaf sizes fitted to the product's rows and
positives, is then early-stopped on the validation rows and calibrated there (see
:mod:`models.propensity.calibration`); the served booster is the same number of rounds
trained again on training and validation rows together (``TrainConfig.refit``).
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.metrics import roc_auc_score

from models.data import NS_PER_DAY, BankData, DateInput, instant
from models.eligibility import Catalogue, ages_at, combine, rule_failures
from models.errors import TooLittleData
from models.features import (
    FeatureBuilder,
    FeatureSpec,
    PreparedBank,
    joined_before,
    mine_rules,
    static_at,
)
from models.propensity.calibration import Calibrator, fit_blend, fit_calibrator, log_loss, sigmoid
from models.propensity.config import TrainConfig
from models.propensity.model import ProductModel, PropensityModel
from models.rules import RuleSet

__all__ = [
    "CutoffPlan",
    "ProgressFn",
    "plan_cutoffs",
    "reliability",
    "stratified_split",
    "train",
    "training_plan",
    "window_responders",
]

ProgressFn = Callable[[str, float], None]
"""Called as ``progress(stage, fraction_done)`` while training."""


@dataclass(frozen=True)
class CutoffPlan:
    """Cutoffs of one training run.

    Attributes
    ----------
    train : tuple of pandas.Timestamp
        Training cutoffs, most recent first.
    validation : pandas.Timestamp
        Validation cutoff.
    split_customers : bool
        One cutoff only, ``as_of - horizon`` to the day (``train == (validation,)``):
        its customers are split at random into training and validation.
    """

    train: tuple[pd.Timestamp, ...]
    validation: pd.Timestamp
    split_customers: bool

    @property
    def kind(self) -> str:
        """``"monthly"`` or ``"single_cutoff"``."""
        return "single_cutoff" if self.split_customers else "monthly"


def plan_cutoffs(
    as_of: DateInput,
    *,
    horizon_days: int,
    first_adoption: DateInput,
    n_cutoffs: int = 6,
    step_months: int = 1,
) -> CutoffPlan:
    """Choose the training and validation cutoffs from dates alone (module docstring).

    Parameters
    ----------
    as_of : date-like
        End of history (exclusive): every label window must end by it.
    horizon_days : int
        Label window length.
    first_adoption : date-like or None
        The earliest adoption in the data (None: no adoption at all); a monthly cutoff
        needs ``horizon_days`` of history after it.
    n_cutoffs, step_months : int
        Most training cutoffs, and months between them.

    Returns
    -------
    CutoffPlan
        Monthly when a month-start validation cutoff and at least one training cutoff
        fit after ``first_adoption + horizon``; else the single cutoff
        ``as_of - horizon_days``.
    """
    end = pd.Timestamp(instant(as_of), unit="ns")
    horizon = pd.Timedelta(days=horizon_days)
    single = CutoffPlan(train=(end - horizon,), validation=end - horizon, split_customers=True)
    if first_adoption is None or first_adoption is pd.NaT:
        return single
    earliest = pd.Timestamp(instant(first_adoption, name="first_adoption"), unit="ns") + horizon
    validation = _month_floor(end - horizon)
    if validation <= earliest:
        return single
    cutoffs: list[pd.Timestamp] = []
    t = _month_floor(validation - horizon)
    while len(cutoffs) < n_cutoffs and t > earliest:
        cutoffs.append(t)
        t = t - pd.DateOffset(months=step_months)
    if not cutoffs:
        return single
    return CutoffPlan(train=tuple(cutoffs), validation=validation, split_customers=False)


BURST_RATIO = 4.0
"""A last window holding more than this many times the adoptions (of the products taken
up in it) of the monthly plan's average training window is a burst the history does not
resemble, such as a campaign's responses: the model then learns from that window alone
(one cutoff), rather than from earlier windows of another kind of adoption with a
validation window cut at a month start."""


def training_plan(
    data: BankData,
    *,
    as_of: DateInput,
    horizon_days: int,
    config: TrainConfig | None = None,
) -> CutoffPlan:
    """The plan :func:`train` uses for ``data`` at ``as_of``.

    The dated plan of :func:`plan_cutoffs` is kept when, counting the adoptions of the
    modelled products adopted in the last window ``[as_of - horizon, as_of)``, its
    training label windows hold at least ``config.min_positives`` in all, and the last
    window at most :data:`BURST_RATIO` times their average. Otherwise (a campaign
    snapshot with holdings dated before it, or attributes and responders only) the plan
    is the single cutoff ``as_of - horizon_days``.

    Parameters
    ----------
    data : BankData
        The bank; only adoptions before ``as_of`` are read.
    as_of : date-like
        End of history (exclusive).
    horizon_days : int
        Label window length.
    config : TrainConfig, optional
        Settings (products, cutoffs, ``min_positives``).

    Returns
    -------
    CutoffPlan

    Raises
    ------
    TooLittleData
        If the plan has one cutoff and no modelled product was adopted in its window:
        there is nothing to learn.
    """
    config = config or TrainConfig()
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    end = pd.Timestamp(instant(as_of), unit="ns")
    targets = _targets(Catalogue.from_data(data), config)
    adopted = data.adoptions["adopted_at"].to_numpy(dtype="datetime64[ns]")
    codes = data.adoptions["product_code"].astype(str)
    before = adopted < end.to_datetime64()
    first = pd.Timestamp(adopted[before].min()) if before.any() else None
    plan = plan_cutoffs(
        end,
        horizon_days=horizon_days,
        first_adoption=first,
        n_cutoffs=config.n_cutoffs,
        step_months=config.cutoff_step_months,
    )
    horizon = np.timedelta64(horizon_days, "D")
    c = (end - pd.Timedelta(days=horizon_days)).to_datetime64()
    window = (adopted >= c) & before & codes.isin(targets).to_numpy()
    if not plan.split_customers:
        taken = adopted[codes.isin(set(codes[window])).to_numpy()]
        per_window = [
            int(((taken >= t.to_datetime64()) & (taken < t.to_datetime64() + horizon)).sum())
            for t in plan.train
        ]
        if sum(per_window) >= config.min_positives and int(window.sum()) <= BURST_RATIO * sum(
            per_window
        ) / len(per_window):
            return plan
        plan = plan_cutoffs(end, horizon_days=horizon_days, first_adoption=None)
    if not window.any():
        raise TooLittleData(
            f"nothing to learn: no modelled product was adopted between {pd.Timestamp(c).date()} "
            f"and {(end - pd.Timedelta(days=1)).date()} (the {horizon_days} days before as_of "
            f"{end.date()}); import the responses as adoptions dated in that window, or choose "
            "an as_of and horizon whose window holds adoptions"
        )
    return plan


def stratified_split(
    customer_ids: npt.ArrayLike,
    strata: npt.ArrayLike,
    *,
    fraction: float,
    seed: int,
    stream: str,
) -> npt.NDArray[np.bool_]:
    """A seeded random share of customers, the same share of every stratum.

    Parameters
    ----------
    customer_ids : array-like
        Customer ids (unique). The split depends on the ids, not on their order.
    strata : array-like
        One label per customer (e.g. whether they adopted in the window).
    fraction : float
        Share chosen in each stratum (rounded to the nearest customer), in ``[0, 1]``.
    seed : int
        The seed (``TrainConfig.seed``).
    stream : str
        What the split is for (``"validation"``, ``"folds"``, ``"holdout"``): splits
        for different purposes with the same seed are independent.

    Returns
    -------
    numpy.ndarray
        bool, one per customer: chosen.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], not {fraction}")
    ids = np.asarray(customer_ids, dtype=object).astype(str)
    labels = np.asarray(strata)
    if labels.shape != ids.shape:
        raise ValueError("customer_ids and strata differ in length")
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    order = np.argsort(ids, kind="stable")
    draws = np.empty(ids.size)
    draws[order] = rng.random(ids.size)
    chosen = np.zeros(ids.size, dtype=bool)
    for value in pd.unique(labels[order]):
        members = np.flatnonzero(labels == value)
        k = int(round(fraction * members.size))
        if k:
            chosen[members[np.argsort(draws[members], kind="stable")[:k]]] = True
    return chosen


def window_responders(
    data: BankData, *, start: DateInput, end: DateInput, products: Sequence[str]
) -> npt.NDArray[np.bool_]:
    """Per customer (``data.customers`` order): adopted one of ``products`` in
    ``[start, end)``; the stratum of the random splits."""
    adoptions = data.adoptions
    adopted = adoptions["adopted_at"]
    start_ts = pd.Timestamp(instant(start, name="start"), unit="ns")
    end_ts = pd.Timestamp(instant(end, name="end"), unit="ns")
    inside = (
        (adopted >= start_ts)
        & (adopted < end_ts)
        & adoptions["product_code"].astype(str).isin(list(products))
    )
    ids = set(adoptions.loc[inside, "customer_id"].astype(str))
    return np.asarray(data.customers["customer_id"].astype(str).isin(ids), dtype=bool)


def _month_floor(stamp: pd.Timestamp) -> pd.Timestamp:
    return pd.Timestamp(year=stamp.year, month=stamp.month, day=1)


@dataclass
class _Rows:
    """Sampled rows of one product, accumulated over cutoffs.

    The features are not copied per product: each cutoff's rows are built once, for the
    union of every product's sample (a block shared by the products), and a product
    keeps its rows' positions in the block.
    """

    blocks: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]] = field(default_factory=list)
    labels: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    weights: list[npt.NDArray[np.float64]] = field(default_factory=list)
    folds: list[npt.NDArray[np.int8]] = field(default_factory=list)
    rules: list[npt.NDArray[np.float64]] = field(default_factory=list)
    positives: int = 0
    n_rows: int = 0
    weighted_rows: float = 0.0
    weighted_positives: float = 0.0

    def add(
        self,
        block: npt.NDArray[np.float32],
        positions: npt.NDArray[np.intp],
        labels: npt.NDArray[np.bool_],
        weights: npt.NDArray[np.float64],
        folds: npt.NDArray[np.int8],
        rules: npt.NDArray[np.float64],
    ) -> None:
        self.blocks.append((block, positions))
        self.n_rows += int(positions.size)
        self.labels.append(labels)
        self.weights.append(weights)
        self.folds.append(folds)
        self.rules.append(rules)
        self.positives += int(labels.sum())
        self.weighted_rows += float(weights.sum())
        self.weighted_positives += float(weights[labels].sum())

    def arrays(
        self, n_features: int
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.bool_],
        npt.NDArray[np.float64],
        npt.NDArray[np.int8],
        npt.NDArray[np.float64],
    ]:
        """Values, labels, weights, folds and exact rule confidences (the blocks are
        released: call once)."""
        if not self.blocks:
            return (
                np.empty((0, n_features), dtype=np.float32),
                np.empty(0, dtype=bool),
                np.empty(0),
                np.empty(0, dtype=np.int8),
                np.empty(0),
            )
        # Gathered straight into one array: no per-cutoff copies to concatenate.
        values = np.empty((sum(p.size for _, p in self.blocks), n_features), dtype=np.float32)
        start = 0
        for block, positions in self.blocks:
            np.take(block, positions, axis=0, out=values[start : start + positions.size])
            start += positions.size
        out = (
            values,
            np.concatenate(self.labels),
            np.concatenate(self.weights),
            np.concatenate(self.folds),
            np.concatenate(self.rules),
        )
        self.blocks.clear()
        return out


def train(
    data: BankData,
    *,
    as_of: DateInput,
    horizon_days: int = 90,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> PropensityModel:
    """Train a propensity model on the data strictly before ``as_of``.

    Parameters
    ----------
    data : BankData
        The bank. Adoptions on or after ``as_of`` are never read.
    as_of : date-like
        Training instant.
    horizon_days : int
        Propensity horizon: adoption within this many days.
    config : TrainConfig, optional
        Settings (default ``TrainConfig()``).
    progress : callable, optional
        ``progress(stage, fraction)`` with ``fraction`` from 0 to 1.

    Returns
    -------
    PropensityModel
        Its ``report`` holds, per product: ``kind`` (``lightgbm`` or ``base_rate``),
        ``n_trees``, ``calibration``, ``blend`` (used or not), training and validation
        rows and positives, and cross-fitted validation metrics ``auc``,
        ``brier_uncalibrated``, ``brier_lgbm``, ``brier_rules``, ``brier_propensity``,
        ``log_loss_propensity``, ``mean_predicted``, ``observed_rate`` and
        ``reliability`` (10 bins of predicted vs observed).

    Raises
    ------
    TooLittleData
        If there is nothing to learn: no modelled product adopted in the label window
        of the plan (:func:`training_plan`).
    """
    config = config or TrainConfig()
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    started = time.perf_counter()
    report_progress = progress or (lambda stage, fraction: None)
    as_of_ns = instant(as_of)
    as_of_ts = pd.Timestamp(as_of_ns, unit="ns")
    catalogue = Catalogue.from_data(data)
    targets = _targets(catalogue, config)
    plan = training_plan(data, as_of=as_of_ts, horizon_days=horizon_days, config=config)
    spec = FeatureSpec.fit(
        data, rule_features=config.rules, outcome_kinds=None if config.outcome_features else ()
    )
    report_progress("prepare", 0.0)
    prepared = FeatureBuilder(spec, RuleSet([], "sequence", {}) if config.rules else None).prepare(
        data
    )
    before = prepared.index.adopted < as_of_ns
    first_adoption = pd.Timestamp(int(prepared.index.adopted[before].min()), unit="ns")
    rng = _negatives_stream(config.seed)
    hashes = (pd.util.hash_array(prepared.customer_ids) % np.uint64(10_000)).astype(np.int64)
    if plan.split_customers:
        # Seeded, stratified by response in the window: validation and both calibration
        # folds get their share of the (often few) responders.
        responded = window_responders(data, start=plan.validation, end=as_of_ts, products=targets)
        held_out_customers = stratified_split(
            prepared.customer_ids,
            responded,
            fraction=config.validation_fraction,
            seed=config.seed,
            stream="validation",
        )
        fold_customers = np.zeros(held_out_customers.size, dtype=np.int8)
        fold_customers[held_out_customers] = stratified_split(
            prepared.customer_ids[held_out_customers],
            responded[held_out_customers],
            fraction=0.5,
            seed=config.seed,
            stream="folds",
        )
    spec_index = {code: j for j, code in enumerate(spec.product_codes)}
    train_rows = {code: _Rows() for code in targets}
    valid_rows = {code: _Rows() for code in targets}
    forced = (
        _AcceptedOffers.of(data, prepared.customer_ids, catalogue)
        if config.forced_sales == "drop"
        else None
    )
    dropped_forced = 0
    cutoffs = [*plan.train] if plan.split_customers else [*plan.train, plan.validation]
    per_cutoff_cap = max(1, config.max_rows_per_product // len(plan.train))
    # Rules are mined on a thread of their own, ahead of the cutoff whose features read
    # them: mining is most of a cutoff's work outside LightGBM, and numpy lets the two
    # threads run at once. A cutoff's rules are the same whichever thread mines them.
    miner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbo-rules")
    mined = {
        when: miner.submit(_mined_rules, data, prepared, spec, config, when, horizon_days)
        for when in ([*cutoffs, as_of_ts] if config.rules else [])
    }
    try:
        for i, cutoff in enumerate(cutoffs):
            report_progress(f"features at {cutoff.date()}", 0.05 + 0.4 * i / len(cutoffs))
            is_validation = plan.split_customers or cutoff == plan.validation
            builder, population, labels, eligible = _cutoff(
                prepared,
                spec,
                catalogue,
                cutoff,
                horizon_days,
                mined[cutoff].result() if config.rules else None,
            )
            if forced is not None:
                sold = forced.within(population, int(cutoff.value), horizon_days * NS_PER_DAY)
                dropped_forced += int((sold & eligible).sum())
                eligible &= ~sold
            if plan.split_customers:
                held_out = held_out_customers[population]
                folds = fold_customers[population]
                splits = [
                    (~held_out, train_rows, per_cutoff_cap, False),
                    (held_out, valid_rows, config.max_validation_rows, True),
                ]
            else:
                folds = (hashes[population] % 2).astype(np.int8)
                everyone = np.ones(population.size, dtype=bool)
                splits = [
                    (everyone, valid_rows, config.max_validation_rows, True)
                    if is_validation
                    else (everyone, train_rows, per_cutoff_cap, False)
                ]
            # One uniform draw per customer chooses the negatives of every product (see
            # _sample), so the products' samples overlap and the cutoff's features are
            # built once, for their union only.
            draws = rng.random(population.size)
            samples = []
            for mask, sink, cap, validation in splits:
                for code in targets:
                    j = catalogue.index[code]
                    candidates = np.flatnonzero(eligible[:, j] & mask)
                    rows, weights = _sample(
                        candidates, labels[candidates, j], config, cap, draws, validation=validation
                    )
                    samples.append((sink[code], code, j, rows, weights))
            union = np.unique(
                np.concatenate([np.empty(0, np.intp)] + [rows for *_, rows, _ in samples])
            )
            frame = builder.build(prepared, as_of=cutoff, rows=population[union])
            for rows_of, code, j, rows, weights in samples:
                positions = np.searchsorted(union, rows)
                rows_of.add(
                    frame.values,
                    positions,
                    labels[rows, j],
                    weights,
                    folds[rows],
                    np.zeros(rows.size)
                    if frame.rule_confidence is None
                    else frame.rule_confidence[positions, spec_index[code]],
                )
            del frame, samples, labels, eligible

        report_progress("final rules", 0.45)
        rules = mined[as_of_ts].result() if config.rules else None
    finally:
        miner.shutdown(wait=True, cancel_futures=True)
    products: list[ProductModel] = []
    report: dict[str, Any] = {"products": {}}
    workers, threads = _parallelism(config, len(targets))
    params = {**config.lightgbm_params(), "num_threads": threads}
    # Products are independent: several boosters train at once, each on its own
    # threads (LightGBM releases the GIL), rather than one booster on every core, whose
    # threads wait on each other at every histogram of a few hundred thousand rows.
    # The largest products start first, so that a large one does not start last and
    # train alone while the other threads are idle; the results keep the target order.
    size = {code: train_rows[code].n_rows + valid_rows[code].n_rows for code in targets}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        submitted = {
            code: pool.submit(
                _fit_product, code, spec, train_rows.pop(code), valid_rows.pop(code), params, config
            )
            for code in sorted(targets, key=lambda code: -size[code])
        }
        fits = [submitted.pop(code) for code in targets]
        for n, (code, fit) in enumerate(zip(targets, fits, strict=True)):
            report_progress(f"training {code}", 0.5 + 0.5 * n / max(len(targets), 1))
            product, metrics = fit.result()
            products.append(product)
            report["products"][code] = metrics
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["summary"] = _summary(report["products"])
    if forced is not None:
        report["forced_sales_dropped"] = dropped_forced
    window = {
        "first_adoption": first_adoption.isoformat(),
        "train_cutoffs": [t.isoformat() for t in plan.train],
        "validation_cutoff": plan.validation.isoformat(),
        "split_customers": plan.split_customers,
        "plan": plan.kind,
        "validation": (
            {
                "kind": "random_customers",
                "fraction": config.validation_fraction,
                "seed": config.seed,
                "stratified_by": "adopted any modelled product in the window",
            }
            if plan.split_customers
            else {"kind": "cutoff"}
        ),
        "customers": int(len(data.customers)),
    }
    report_progress("done", 1.0)
    return PropensityModel(
        spec=spec,
        catalogue=catalogue,
        rules=rules,
        products=tuple(products),
        as_of=as_of_ts,
        horizon_days=horizon_days,
        config=config,
        window=window,
        report=report,
    )


@dataclass(frozen=True, eq=False)
class _AcceptedOffers:
    """Accepted offers as (customer position, catalogue column, instant) arrays."""

    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    at_ns: npt.NDArray[np.int64]
    n_products: int

    @classmethod
    def of(
        cls, data: BankData, customer_ids: npt.NDArray[np.object_], catalogue: Catalogue
    ) -> _AcceptedOffers:
        n_products = len(catalogue.product_codes)
        frame = data.outcomes
        if frame is None or frame.empty:
            empty = np.empty(0, dtype=np.intp)
            return cls(empty, empty, np.empty(0, dtype=np.int64), n_products)
        frame = frame[frame["outcome"] == "accepted"]
        rows = pd.Index(customer_ids).get_indexer(frame["customer_id"].to_numpy(dtype=object))
        cols = np.asarray(
            [catalogue.index.get(str(code), -1) for code in frame["product_code"]], dtype=np.intp
        )
        at_ns = frame["occurred_at"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        keep = (rows >= 0) & (cols >= 0)
        return cls(rows[keep].astype(np.intp), cols[keep], at_ns[keep], n_products)

    def within(
        self, frame_rows: npt.NDArray[np.intp], start_ns: int, length_ns: int
    ) -> npt.NDArray[np.bool_]:
        """Rows of a feature frame x catalogue: an offer accepted in ``[start, start +
        length)``; an offer accepted during a day counts from that day's start, as the
        adoption it made is dated that day."""
        out = np.zeros((frame_rows.size, self.n_products), dtype=bool)
        day = self.at_ns - self.at_ns % NS_PER_DAY
        hit = (day >= start_ns) & (day < start_ns + length_ns)
        if not hit.any():
            return out
        position = np.full(int(frame_rows.max(initial=-1)) + 1, -1, dtype=np.intp)
        position[frame_rows] = np.arange(frame_rows.size)
        rows = self.rows[hit]
        inside = rows < position.size
        where = np.where(inside, position[np.minimum(rows, position.size - 1)], -1)
        present = where >= 0
        out[where[present], self.cols[hit][present]] = True
        return out


def _negatives_stream(seed: int) -> np.random.Generator:
    """The random stream that samples negatives: one draw per customer of a cutoff.

    Its own stream of the seed: a bank made by a generator seeded alike (the synthetic
    one, ``default_rng(seed)``) would otherwise meet its own draws again, customer by
    customer, and the negatives kept would be chosen by the customers' attributes.
    """
    return np.random.default_rng([seed, zlib.crc32(b"negatives")])


def _parallelism(config: TrainConfig, products: int) -> tuple[int, int]:
    """Boosters trained at once, and LightGBM threads of each: ``config.num_threads``
    (0: every core this process may use) shared out, one booster per thread while
    there are products enough."""
    threads = config.num_threads if config.num_threads > 0 else _cores()
    workers = max(1, min(threads, products))
    return workers, max(1, threads // workers)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _targets(catalogue: Catalogue, config: TrainConfig) -> list[str]:
    if config.products is None:
        return [c for j, c in enumerate(catalogue.product_codes) if catalogue.active[j]]
    unknown = [c for c in config.products if c not in catalogue.index]
    if unknown:
        raise ValueError(f"TrainConfig.products names unknown product(s) {unknown}")
    return [c for c in catalogue.product_codes if c in set(config.products)]


def _rule_settings(config: TrainConfig, horizon_days: int) -> dict[str, Any]:
    return {
        "min_support": config.rule_min_support,
        "min_confidence": config.rule_min_confidence,
        "min_customers": config.rule_min_customers,
        "max_antecedent": config.rule_max_antecedent,
        "ordered": config.rule_ordered,
        "within_days": horizon_days,
    }


_MINED: weakref.WeakKeyDictionary[BankData, dict[tuple[Any, ...], RuleSet]] = (
    weakref.WeakKeyDictionary()
)
"""Rules mined from a bank, by products, settings and cutoff, for as long as the bank
object lives: the holdout's training and the final one mine at most of the same monthly
cutoffs (the holdout's are the final's shifted by the horizon), and rules mined before
a cutoff read nothing but the bank's adoptions before it, so the same bank, products,
settings and cutoff always give the same rules. Banks are read-only (see
:class:`models.data.BankData`)."""
_MINED_LOCK = threading.Lock()


def _mined_rules(
    data: BankData,
    prepared: PreparedBank,
    spec: FeatureSpec,
    config: TrainConfig,
    cutoff: pd.Timestamp,
    horizon_days: int,
) -> RuleSet:
    """:func:`models.features.mine_rules` of ``prepared`` (prepared from ``data`` for
    ``spec``) at ``cutoff``, mined once per bank object (:data:`_MINED`)."""
    settings = _rule_settings(config, horizon_days)
    key = (spec.product_codes, tuple(sorted(settings.items())), int(cutoff.value))
    with _MINED_LOCK:
        found = _MINED.setdefault(data, {}).get(key)
    if found is None:
        found = mine_rules(prepared.index, spec.product_codes, as_of=cutoff, **settings)
        with _MINED_LOCK:
            _MINED.setdefault(data, {})[key] = found
    return found


def _cutoff(
    prepared: PreparedBank,
    spec: FeatureSpec,
    catalogue: Catalogue,
    cutoff: pd.Timestamp,
    horizon_days: int,
    rules: RuleSet | None,
) -> tuple[FeatureBuilder, npt.NDArray[np.intp], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """The builder of one cutoff (with ``rules``, mined before it), the customers it
    builds (positions in the bank), their labels and eligibility (catalogue columns).

    Labels and eligibility read only holdings, ages and segments, the cheap part of the
    features: the feature rows are built afterwards for the sampled customers alone
    (:meth:`FeatureBuilder.build` with ``rows``, each row as in the full build).
    """
    t_ns = int(cutoff.value)
    builder = FeatureBuilder(spec, rules)
    population = joined_before(prepared, t_ns)
    held = prepared.index.snapshot(t_ns).held[population]
    labels = prepared.index.adopted_between(t_ns, t_ns + horizon_days * NS_PER_DAY)[population]
    _, segments = static_at(prepared, t_ns)
    failures = rule_failures(
        catalogue,
        held=held,
        ages=ages_at(prepared.birth_ns[population], t_ns),
        segment_codes=catalogue.segment_codes(segments[population]),
    )
    return builder, population, labels, combine(failures)


def _sample(
    candidates: npt.NDArray[np.intp],
    labels: npt.NDArray[np.bool_],
    config: TrainConfig,
    cap: int,
    draws: npt.NDArray[np.float64],
    *,
    validation: bool,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """All positives and a uniform share of negatives, weighted by 1 / share.

    Training keeps every row when the candidates fit the cap (sampling only buys speed,
    and small data need every negative), else about ``negatives_per_positive``
    negatives per positive (at least ``min_negatives``); validation keeps as many as the
    cap allows, since calibration and early stopping need the negatives' score
    distribution more than speed.

    A negative is kept when its customer's uniform draw (``draws``, one per customer of
    the cutoff, shared by every product) is below the share: each product's negatives
    are still a uniform sample, and the products' samples nest inside one another.
    """
    positives = candidates[labels]
    negatives = candidates[~labels]
    if negatives.size == 0:
        return positives, np.ones(positives.size)
    wanted = float(max(cap - positives.size, 1))
    if not validation and candidates.size > cap:
        wanted = min(
            wanted, max(config.negatives_per_positive * positives.size, config.min_negatives)
        )
    share = min(1.0, wanted / negatives.size)
    kept = negatives[draws[negatives] < share] if share < 1 else negatives
    rows = np.concatenate([positives, kept])
    weights = np.concatenate([np.ones(positives.size), np.full(kept.size, 1.0 / share)])
    return rows, weights


def _fit_product(
    code: str,
    spec: FeatureSpec,
    train_rows: _Rows,
    valid_rows: _Rows,
    params: Mapping[str, Any],
    config: TrainConfig,
) -> tuple[ProductModel, dict[str, Any]]:
    n_features = len(spec.columns)
    x_train, y_train, w_train, _, _ = train_rows.arrays(n_features)
    x_valid, y_valid, w_valid, folds, rules_valid = valid_rows.arrays(n_features)
    weighted_rows = train_rows.weighted_rows + valid_rows.weighted_rows
    base_rate = (
        (train_rows.weighted_positives + valid_rows.weighted_positives) / weighted_rows
        if weighted_rows
        else 0.0
    )
    metrics: dict[str, Any] = {
        "train_rows": int(y_train.size),
        "train_positives": int(y_train.sum()),
        "validation_rows": int(y_valid.size),
        "validation_positives": int(y_valid.sum()),
        "base_rate": base_rate,
    }
    rule_column = spec.columns.index(f"rule_conf_{code}") if spec.rule_features else -1
    enough = (
        y_train.sum() >= config.min_positives
        and y_valid.sum() >= max(2, config.min_positives // 4)
        and (~y_valid).any()
    )
    if not enough:
        calibrator = Calibrator("constant", params=(base_rate,))
        product = ProductModel(code, None, calibrator, None, base_rate)
        metrics.update(kind="base_rate", n_trees=0, calibration="constant", blend=False)
        lgbm = np.full(y_valid.size, base_rate)
        metrics.update(_metrics(y_valid, w_valid, lgbm, lgbm, rules_valid, lgbm))
        return product, metrics

    params, patience = _booster_params(
        params, config, rows=int(y_train.size), positives=int(y_train.sum())
    )
    categorical = [c for c in spec.categorical]
    train_set = lgb.Dataset(
        x_train,
        label=y_train.astype(np.float32),
        weight=w_train,
        feature_name=list(spec.columns),
        categorical_feature=categorical,
        params=_dataset_params(params, config),
        free_raw_data=True,
    )
    valid_set = lgb.Dataset(
        x_valid, label=y_valid.astype(np.float32), weight=w_valid, reference=train_set
    )
    booster = lgb.train(
        dict(params),
        train_set,
        num_boost_round=config.max_rounds,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(patience, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    text = booster.model_to_string(num_iteration=best)
    del booster, train_set, valid_set
    model = lgb.Booster(model_str=text)
    raw = np.asarray(
        model.predict(x_valid, raw_score=True, num_threads=params["num_threads"]), dtype=np.float64
    )
    if config.refit:
        # Served: the same rounds on training and validation rows together. Calibration
        # and the blend are still fitted on the early-stopped booster's out-of-sample
        # validation scores: the refit sees more rows of the same kind, not another model.
        text = _refit(
            spec, params, config, best, (x_train, x_valid), (y_train, y_valid), (w_train, w_valid)
        )
    del x_train

    product, fitted = calibrate_product(
        code, text, raw, y_valid, w_valid, folds, rules_valid, rule_column, config, base_rate
    )
    metrics.update(
        lightgbm_metrics(
            fitted,
            n_trees=int(best),
            refit=config.refit,
            sized=params,
            early_stopping_rounds=patience,
        )
    )
    return product, metrics


def lightgbm_metrics(
    fitted: dict[str, Any],
    *,
    n_trees: int,
    refit: bool,
    sized: Mapping[str, Any],
    **lightgbm: Any,
) -> dict[str, Any]:
    """A LightGBM product's metrics, in the order the registry keeps them: the booster's
    (trees, the calibration and blend :func:`calibrate_product` chose, refit, the
    settings sized for the product out of ``sized`` and the entries of ``lightgbm``),
    then the rest of ``fitted``. Shared by the single-machine and the Dask training."""
    return {
        "kind": "lightgbm",
        "n_trees": n_trees,
        "calibration": fitted.pop("calibration"),
        "blend": fitted.pop("blend"),
        "refit": refit,
        "lightgbm": {**{k: sized[k] for k in _SIZED}, **lightgbm},
        **fitted,
    }


def calibrate_product(
    code: str,
    text: str,
    raw: npt.NDArray[np.float64],
    y_valid: npt.NDArray[np.bool_],
    w_valid: npt.NDArray[np.float64],
    folds: npt.NDArray[np.int8],
    rules_valid: npt.NDArray[np.float64],
    rule_column: int,
    config: TrainConfig,
    base_rate: float,
) -> tuple[ProductModel, dict[str, Any]]:
    """The product's model from its booster ``text`` and the booster's raw validation
    scores: the calibration and the blend with the rules chosen out of sample, with
    ``calibration``, ``blend`` and the validation metrics they give. Shared by the
    single-machine and the Dask training (:mod:`models.propensity.distributed`)."""
    # Cross-fitted: each half of the validation customers is calibrated (and blended)
    # by a fit on the other half, so choices and metrics are out of sample.
    fits = []
    for fold in (0, 1):
        fit, apply = folds != fold, folds == fold
        if not y_valid[fit].any() or y_valid[fit].all():
            fit = np.ones(y_valid.size, dtype=bool)
        fits.append((fit, apply))
    if config.calibration == "auto":
        # The weighted training data keep the base rate, so the booster is often
        # calibrated already: a calibrator is used only where it wins out of sample.
        methods = ["identity", "platt"]
        if y_valid.sum() >= config.isotonic_min_positives:
            methods.append("isotonic")
    else:
        methods = [config.calibration]
    method, lgbm_oof, chosen = "identity", sigmoid(raw), False
    for candidate in methods:
        oof = np.empty(y_valid.size)
        monotone = True
        for fit, apply in fits:
            fold_calibrator = fit_calibrator(candidate, raw[fit], y_valid[fit], w_valid[fit])
            monotone &= _keeps_order(fold_calibrator)
            oof[apply] = fold_calibrator.apply(raw[apply])
        if not monotone:
            # Calibration must not reorder: a falling Platt slope would turn the ranking
            # upside down, a flat isotonic fit would tie everyone.
            continue
        # A more flexible calibrator must win by more than the noise of the comparison.
        if not chosen or _clearly_better(y_valid, w_valid, oof, lgbm_oof):
            method, lgbm_oof, chosen = candidate, oof, True
    blend_oof = lgbm_oof.copy()
    if config.blend and rule_column >= 0:
        for fit, apply in fits:
            calibrated = fit_calibrator(method, raw[fit], y_valid[fit], w_valid[fit]).apply(
                raw[fit]
            )
            blend = fit_blend(calibrated, rules_valid[fit], y_valid[fit], w_valid[fit])
            if blend is not None and blend.coef_lgbm > 0:
                blend_oof[apply] = blend.apply(lgbm_oof[apply], rules_valid[apply])
    use_blend = (
        config.blend
        and rule_column >= 0
        and log_loss(y_valid, w_valid, blend_oof)
        < log_loss(y_valid, w_valid, lgbm_oof) * (1 - 1e-3)
    )
    calibrator = fit_calibrator(method, raw, y_valid, w_valid)
    if not _keeps_order(calibrator):
        method, calibrator = "identity", fit_calibrator("identity", raw, y_valid, w_valid)
    blend = fit_blend(calibrator.apply(raw), rules_valid, y_valid, w_valid) if use_blend else None
    if blend is not None and blend.coef_lgbm <= 0:
        # The stack may add the rules' view, never reverse the booster's ranking.
        blend, use_blend = None, False
    propensity_oof = blend_oof if use_blend else lgbm_oof
    fitted: dict[str, Any] = {"calibration": method, "blend": bool(use_blend)}
    fitted.update(_metrics(y_valid, w_valid, sigmoid(raw), lgbm_oof, rules_valid, propensity_oof))
    return ProductModel(code, text, calibrator, blend, base_rate), fitted


def _clearly_better(
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
    candidate: npt.NDArray[np.float64],
    incumbent: npt.NDArray[np.float64],
    *,
    z: float = 2.0,
) -> bool:
    """Whether ``candidate`` has a lower weighted log loss than ``incumbent`` by more
    than ``z`` standard errors of the rows' paired differences."""
    gain = _row_log_loss(labels, incumbent) - _row_log_loss(labels, candidate)
    total = float(np.sum(weights))
    if total <= 0:
        return False
    mean = float(np.sum(weights * gain)) / total
    error = math.sqrt(float(np.sum((weights * (gain - mean)) ** 2))) / total
    return mean > z * error


def _row_log_loss(
    labels: npt.NDArray[np.bool_], p: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.asarray(-np.where(labels, np.log(q), np.log(1 - q)), dtype=np.float64)


def _keeps_order(calibrator: Calibrator) -> bool:
    """Whether a calibrator keeps the booster's ranking: a rising Platt curve, or an
    isotonic fit that is not flat (a constant keeps nobody apart)."""
    if calibrator.method == "platt":
        return calibrator.params[0] > 0
    if calibrator.method == "isotonic":
        return len(calibrator.y) > 1 and calibrator.y[-1] > calibrator.y[0]
    return False


_SIZED = ("num_leaves", "min_data_in_leaf", "min_data_per_group", "learning_rate")
"""The LightGBM settings :func:`_booster_params` sizes per product."""

RATE_ROWS = 20_000
"""Training rows up to which a booster learns at ``TrainConfig.learning_rate``."""


def _booster_params(
    params: Mapping[str, Any], config: TrainConfig, *, rows: int, positives: int
) -> tuple[dict[str, Any], int]:
    """LightGBM settings sized to one product's training rows and positives, and the
    early-stopping patience in rounds.

    - Leaves: one per ``positives_per_leaf`` training positives, from 2 up to
      ``num_leaves``: a leaf's rate is only as sure as the positives behind it, so
      small or rare targets get small trees (stumps at the least, an additive model).
    - Rows in a leaf: enough to expect ``leaf_positives`` positives at the training
      rate, at least ``min_data_in_leaf`` and at most a half share of the rows per
      leaf; a category group (native categorical splits) needs as many.
    - Rate: ``learning_rate`` up to :data:`RATE_ROWS` rows, then growing with the
      square root of the rows up to ``max_learning_rate``: a round costs time in
      proportion to the rows, and its step is less noisy the more rows it is fitted
      on, so large data take larger steps. The patience keeps the same length in rate
      units (``early_stopping_rounds`` at ``learning_rate``).
    """
    leaves = int(np.clip(positives // config.positives_per_leaf, 2, config.num_leaves))
    per_leaf = math.ceil(config.leaf_positives * rows / max(positives, 1))
    ceiling = max(config.min_data_in_leaf, rows // (2 * leaves))
    min_leaf = int(np.clip(per_leaf, config.min_data_in_leaf, ceiling))
    rate = float(
        np.clip(
            config.learning_rate * math.sqrt(rows / RATE_ROWS),
            config.learning_rate,
            max(config.learning_rate, config.max_learning_rate),
        )
    )
    patience = max(5, round(config.early_stopping_rounds * config.learning_rate / rate))
    sized = {
        **params,
        "num_leaves": leaves,
        "min_data_in_leaf": min_leaf,
        "min_data_per_group": min_leaf,
        "learning_rate": rate,
    }
    return sized, patience


def _dataset_params(params: Mapping[str, Any], config: TrainConfig) -> dict[str, Any]:
    """Binning settings; LightGBM drops features no leaf of ``min_data_in_leaf`` rows
    can split while binning, so the sized value goes there too. Binning runs on the
    booster's threads: left to OpenMP it would take every core for each of the boosters
    built at once (the bins are the same on any number of threads)."""
    out = {
        "max_bin": config.max_bin,
        "min_data_in_leaf": params["min_data_in_leaf"],
        "verbosity": -1,
    }
    if params.get("num_threads"):
        out["num_threads"] = params["num_threads"]
    return out


def _refit(
    spec: FeatureSpec,
    params: Mapping[str, Any],
    config: TrainConfig,
    rounds: int,
    values: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    labels: tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]],
    weights: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
) -> str:
    """The booster trained again on training and validation rows together, for the
    early-stopped number of rounds; its text.

    Validation negatives join at the share the training negatives were sampled at
    (reweighted), so a large validation cutoff costs no more than its share of rows.
    """
    (x_train, x_valid), (y_train, y_valid), (w_train, w_valid) = values, labels, weights
    negatives = ~y_train
    share = min(1.0, float(negatives.sum() / w_train[negatives].sum())) if negatives.any() else 1.0
    keep = y_valid | (np.random.default_rng(config.seed).random(y_valid.size) < share)
    full = lgb.Dataset(
        np.concatenate([x_train, x_valid[keep]]),
        label=np.concatenate([y_train, y_valid[keep]]).astype(np.float32),
        weight=np.concatenate([w_train, np.where(y_valid, w_valid, w_valid / share)[keep]]),
        feature_name=list(spec.columns),
        categorical_feature=list(spec.categorical),
        params=_dataset_params(params, config),
        free_raw_data=True,
    )
    booster = lgb.train(dict(params), full, num_boost_round=rounds)
    return str(booster.model_to_string())


def _brier(
    labels: npt.NDArray[np.bool_], weights: npt.NDArray[np.float64], p: npt.NDArray[np.float64]
) -> float:
    return (
        float(np.sum(weights * (p - labels) ** 2) / np.sum(weights)) if weights.size else math.nan
    )


def reliability(
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
    predicted: npt.NDArray[np.float64],
    *,
    bins: int = 10,
) -> list[dict[str, float]]:
    """Reliability table: equal-weight bins of the prediction, mean predicted vs observed.

    Parameters
    ----------
    labels : numpy.ndarray
        bool outcomes.
    weights : numpy.ndarray
        Row weights.
    predicted : numpy.ndarray
        Predicted probabilities.
    bins : int
        Number of bins.

    Returns
    -------
    list of dict
        ``mean_predicted``, ``observed``, ``weight`` per non-empty bin, low to high.
    """
    if labels.size == 0:
        return []
    order = np.argsort(predicted, kind="stable")
    cumulative = np.cumsum(weights[order])
    edges = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, bins) / bins)
    table = []
    for part in np.split(order, edges):
        if part.size == 0:
            continue
        w = weights[part]
        table.append(
            {
                "mean_predicted": float(np.sum(w * predicted[part]) / np.sum(w)),
                "observed": float(np.sum(w * labels[part]) / np.sum(w)),
                "weight": float(np.sum(w)),
            }
        )
    return table


def _metrics(
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
    uncalibrated: npt.NDArray[np.float64],
    lgbm: npt.NDArray[np.float64],
    rules: npt.NDArray[np.float64],
    propensity: npt.NDArray[np.float64],
) -> dict[str, Any]:
    if labels.size == 0:
        return {}
    both = labels.any() and not labels.all()
    return {
        "auc": float(roc_auc_score(labels, propensity, sample_weight=weights))
        if both
        else math.nan,
        "auc_rules": float(roc_auc_score(labels, rules, sample_weight=weights))
        if both
        else math.nan,
        "brier_uncalibrated": _brier(labels, weights, uncalibrated),
        "brier_lgbm": _brier(labels, weights, lgbm),
        "brier_rules": _brier(labels, weights, rules),
        "brier_propensity": _brier(labels, weights, propensity),
        "log_loss_propensity": log_loss(labels, weights, propensity),
        "mean_predicted": float(np.sum(weights * propensity) / np.sum(weights)),
        "observed_rate": float(np.sum(weights * labels) / np.sum(weights)),
        "reliability": reliability(labels, weights, propensity),
    }


def _summary(products: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    modelled = [m for m in products.values() if m.get("kind") == "lightgbm"]

    def mean(key: str) -> float:
        values = [float(m[key]) for m in modelled if key in m and not math.isnan(float(m[key]))]
        return float(np.mean(values)) if values else math.nan

    return {
        "products": len(products),
        "lightgbm_products": len(modelled),
        "trees": int(sum(int(m["n_trees"]) for m in modelled)),
        "mean_auc": mean("auc"),
        "mean_brier_propensity": mean("brier_propensity"),
        "mean_brier_uncalibrated": mean("brier_uncalibrated"),
    }
