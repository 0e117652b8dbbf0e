"""Training and scoring a propensity model on a Dask cluster.

The driver knows nothing of HTTP or databases: it takes a :class:`distributed.Client`
and the bank as partitions (:class:`models.data.BankData`, each a share of the
customers with all of their adoptions, outcomes and attribute history), either loaded
on the workers by picklable callables (:func:`load_partitions`) or split from one bank
(:func:`split_bank`).

How training is split
---------------------
- Small aggregates are computed per partition and summed on the client: the categorical
  levels of the feature spec (value counts), the adoption counts by product and instant
  (for the cutoff plan, the same rule as :func:`models.propensity.training.training_plan`),
  the earliest adoption.
- Rules are mined on the client, exactly: the miner reads only the first-adoption
  matrix of the customers with an adoption before the cutoff (customers x products,
  int32), which is the concatenation of the partitions' matrices; mining is
  order-free, so the rules are the single-machine rules. The client holds one such
  matrix at a time (4 bytes x products per customer with an adoption).
- Each partition builds its feature rows at every cutoff with the single-machine
  :class:`models.features.FeatureBuilder` (one code path for features), on the worker
  that holds it; the rows stay there.
- Sampling of negatives uses the shares the single-machine sampler would choose from
  the cutoff's global counts (all positives kept, negatives at a global share,
  reweighted by its inverse); the draws are seeded per partition, so they are not the
  single-machine draws. A bank that fits the caps (every row kept) samples nothing.
- Each product's booster trains with LightGBM's data-parallel learner, one machine per
  worker, on the workers' rows with the single-machine booster parameters (the
  network set up here rather than by :mod:`lightgbm.dask`, so the machines' ranks, and
  with them the model, are the same from run to run: :func:`_dask_fit`). Distributed
  LightGBM has no early stopping, so the early stopping of
  :func:`models.propensity.training.train` is replayed on the client: the booster is
  trained for a growing number of rounds (200, 400, ... up to ``max_rounds``) until the
  weighted validation log loss has not improved for the patience, and the best round is
  kept, as :func:`lightgbm.early_stopping` keeps it. The served booster is then
  refitted for that many rounds on training and (sampled) validation rows together, as
  single-machine does.
- The validation rows (at most ``max_validation_rows`` per product) come to the
  client, where the booster is calibrated and blended with the single-machine code.

What differs from single-machine: LightGBM's data-parallel training bins features
from each worker's rows and sums histograms across workers, so the trees are close to,
not identical with, single-machine trees; sampled negatives are other draws. A run
is repeatable: the same partitions on the same number of workers give the same trees.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd

from models.data import NS_PER_DAY, AdoptionIndex, BankData, DateInput, instant
from models.eligibility import Catalogue, combine, rule_failures
from models.errors import TooLittleData
from models.evaluation import HoldoutResult, holdout_comparison
from models.features import FeatureBuilder, FeatureSpec
from models.propensity.calibration import (
    Calibrator,
)
from models.propensity.config import TrainConfig
from models.propensity.model import ProductModel, PropensityModel
from models.propensity.training import (
    BURST_RATIO,
    CutoffPlan,
    ProgressFn,
    calibrate_product,
    lightgbm_metrics,
    plan_cutoffs,
)
from models.propensity.training import (
    _AcceptedOffers as AcceptedOffers,
)
from models.propensity.training import (
    _booster_params as booster_params,
)
from models.propensity.training import (
    _dataset_params as dataset_params,
)
from models.propensity.training import (
    _metrics as validation_metrics,
)
from models.propensity.training import (
    _summary as summary_of,
)
from models.propensity.training import (
    _targets as targets_of,
)
from models.rules import RuleSet, mine_sequence_rules_from_matrix
from models.sequences import NEVER, AdoptionMatrix

__all__ = [
    "DaskError",
    "holdout_dask",
    "PartitionSource",
    "check_workers",
    "dask_plan",
    "load_partitions",
    "scatter_partitions",
    "score_partitions",
    "split_bank",
    "train_dask",
    "workers_in_order",
]

PartitionSource = Callable[[], BankData]
"""Loads one partition on a worker; must pickle (a module-level function, or a
:func:`functools.partial` of one)."""

FIRST_ROUNDS = 200
"""Rounds of the first distributed fit; doubled until early stopping is decided."""


class DaskError(RuntimeError):
    """The cluster cannot run the job: unreachable, no workers, workers without nbo or
    with another version, a bank the driver does not train (one-cutoff plans)."""


# --------------------------------------------------------------------------- partitions


def partition_of(customer_ids: npt.ArrayLike, n_partitions: int) -> npt.NDArray[np.int64]:
    """The partition of each customer id: a stable hash of the id modulo the count."""
    ids = np.asarray(customer_ids, dtype=object).astype(str).astype(object)
    hashed = np.asarray(pd.util.hash_array(ids, categorize=False), dtype=np.uint64)
    return np.asarray(hashed % np.uint64(n_partitions), dtype=np.int64)


def split_bank(data: BankData, n_partitions: int) -> list[BankData]:
    """``data`` as ``n_partitions`` banks of customers hashed by id, each with its
    customers' adoptions, outcomes and attribute history (the products and attribute
    kinds in every one)."""
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be at least 1, not {n_partitions}")
    part = partition_of(data.customers["customer_id"].to_numpy(dtype=object), n_partitions)
    of = pd.Series(part, index=pd.Index(data.customers["customer_id"].astype(str)))

    def rows(frame: pd.DataFrame | None) -> npt.NDArray[np.int64] | None:
        if frame is None:
            return None
        return np.asarray(
            frame["customer_id"].astype(str).map(of).to_numpy(dtype=np.float64), dtype=np.int64
        )

    adoption_part, outcome_part, history_part = (
        rows(data.adoptions),
        rows(data.outcomes),
        rows(data.attribute_history),
    )
    out = []
    for k in range(n_partitions):
        outcomes = data.outcomes
        history = data.attribute_history
        out.append(
            BankData(
                products=data.products,
                customers=data.customers.loc[part == k].reset_index(drop=True),
                attribute_kinds=dict(data.attribute_kinds),
                adoptions=data.adoptions.loc[adoption_part == k].reset_index(drop=True),
                outcomes=None
                if outcomes is None
                else outcomes.loc[outcome_part == k].reset_index(drop=True),
                attribute_history=None
                if history is None
                else history.loc[history_part == k].reset_index(drop=True),
            )
        )
    return out


def _nbo_version() -> str:
    try:
        return metadata.version("nbo")
    except metadata.PackageNotFoundError:
        return "not installed"


def check_workers(client: Any) -> int:
    """The number of workers, after checking that each runs this nbo version.

    Raises
    ------
    DaskError
        No workers, or a worker without nbo (or with another version).
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        raise DaskError("the Dask cluster has no workers")
    here = _nbo_version()
    try:
        versions = client.run(_nbo_version)
    except (ImportError, ModuleNotFoundError) as exc:
        raise DaskError(
            f"Dask workers cannot import nbo ({exc}); install nbo {here} on them"
        ) from None
    except Exception as exc:  # a worker that cannot unpickle the function lacks nbo
        if "No module named" in str(exc):
            raise DaskError(
                f"Dask workers cannot import nbo ({exc}); install nbo {here} on them"
            ) from None
        raise
    wrong = {address: v for address, v in versions.items() if v != here}
    if wrong:
        listed = ", ".join(f"{a} has {v}" for a, v in sorted(wrong.items()))
        raise DaskError(f"Dask workers must run nbo {here}: {listed}")
    return len(workers)


def load_partitions(client: Any, sources: Sequence[PartitionSource]) -> list[Any]:
    """Futures of the partitions, each loaded by its source on the worker it belongs to
    (:func:`workers_in_order`; another if that one is gone)."""
    workers = workers_in_order(client)
    return [
        client.submit(
            source, pure=False, workers=[workers[k % len(workers)]], allow_other_workers=True
        )
        for k, source in enumerate(sources)
    ]


def scatter_partitions(client: Any, parts: Sequence[BankData]) -> list[Any]:
    """Futures of partitions split here (:func:`split_bank`), each sent to the worker
    it belongs to (:func:`workers_in_order`)."""
    workers = workers_in_order(client)
    return [
        client.scatter(part, workers=[workers[k % len(workers)]], hash=False)
        for k, part in enumerate(parts)
    ]


# --------------------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class _Summary:
    customers: int
    levels: dict[str, pd.Series]
    adopted: pd.Series
    """Adoption counts by (product code, adopted_at), every adoption."""
    has_outcomes: bool
    products: pd.DataFrame
    attribute_kinds: dict[str, Any]


def _summarise(data: BankData) -> _Summary:
    customers = data.customers
    columns = ["segment", "branch_id"] + [
        name for name, kind in data.attribute_kinds.items() if kind == "categorical"
    ]
    earlier: dict[str, pd.Series] = {}
    history = data.attribute_history
    if history is not None and not history.empty:
        for name, group in history.groupby("attribute", sort=False, observed=True):
            earlier[str(name)] = group["previous"]
    levels = {}
    for column in columns:
        values = customers[column].astype(object)
        if column in earlier:
            values = pd.concat([values, earlier[column].astype(object)], ignore_index=True)
        levels[column] = values.dropna().astype("str").value_counts()
    adopted = data.adoptions.groupby(
        [data.adoptions["product_code"].astype(str), "adopted_at"], sort=False
    ).size()
    return _Summary(
        customers=len(customers),
        levels=levels,
        adopted=adopted,
        has_outcomes=data.outcomes is not None,
        products=data.products,
        attribute_kinds=dict(data.attribute_kinds),
    )


def _merge(summaries: Sequence[_Summary]) -> _Summary:
    first = summaries[0]
    levels = {
        column: pd.concat([s.levels[column] for s in summaries]).groupby(level=0).sum()
        for column in first.levels
    }
    adopted = pd.concat([s.adopted for s in summaries]).groupby(level=[0, 1]).sum()
    return _Summary(
        customers=sum(s.customers for s in summaries),
        levels=levels,
        adopted=adopted,
        has_outcomes=any(s.has_outcomes for s in summaries),
        products=first.products,
        attribute_kinds=first.attribute_kinds,
    )


def _top_levels(counts: pd.Series, max_levels: int = 200) -> tuple[str, ...]:
    """As :meth:`models.features.FeatureSpec.fit` chooses levels, from summed counts."""
    top = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    return tuple(sorted(str(v) for v in top.index[:max_levels]))


def _spec(summary: _Summary, config: TrainConfig) -> FeatureSpec:
    levels = {
        ("segment" if c == "segment" else "branch_id" if c == "branch_id" else f"attr_{c}"): (
            _top_levels(counts)
        )
        for c, counts in summary.levels.items()
    }
    outcome_kinds: tuple[str, ...] = ()
    if config.outcome_features and summary.has_outcomes:
        outcome_kinds = ("declined",)
    return FeatureSpec(
        product_codes=tuple(str(c) for c in summary.products["product_code"]),
        attributes=tuple(summary.attribute_kinds.items()),
        levels=levels,
        rule_features=config.rules,
        outcome_kinds=outcome_kinds,
    )


def _catalogue(summary: _Summary) -> Catalogue:
    return Catalogue.from_products(summary.products)


def dask_plan(
    adopted: pd.Series,
    catalogue: Catalogue,
    *,
    as_of: DateInput,
    horizon_days: int,
    config: TrainConfig,
) -> CutoffPlan:
    """:func:`models.propensity.training.training_plan` from adoption counts.

    Parameters
    ----------
    adopted : pandas.Series
        Adoption counts indexed by (product code, adopted_at).
    catalogue : Catalogue
        The products.
    as_of : date-like
        End of history (exclusive).
    horizon_days : int
        Label window length.
    config : TrainConfig
        Settings.

    Returns
    -------
    CutoffPlan
        The plan ``training_plan`` chooses for the same adoptions.
    """
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    end = pd.Timestamp(instant(as_of), unit="ns")
    targets = set(targets_of(catalogue, config))
    codes = adopted.index.get_level_values(0).astype(str).to_numpy(dtype=object)
    at = pd.DatetimeIndex(adopted.index.get_level_values(1)).to_numpy(dtype="datetime64[ns]")
    n = adopted.to_numpy(dtype=np.int64)
    before = at < end.to_datetime64()
    first = pd.Timestamp(at[before].min()) if before.any() else None
    plan = plan_cutoffs(
        end,
        horizon_days=horizon_days,
        first_adoption=first,
        n_cutoffs=config.n_cutoffs,
        step_months=config.cutoff_step_months,
    )
    horizon = np.timedelta64(horizon_days, "D")
    c = (end - pd.Timedelta(days=horizon_days)).to_datetime64()
    window = (at >= c) & before & np.isin(codes, list(targets))
    if not plan.split_customers:
        taken_codes = set(codes[window])
        taken = np.isin(codes, list(taken_codes))
        per_window = [
            int(n[taken & (at >= t.to_datetime64()) & (at < t.to_datetime64() + horizon)].sum())
            for t in plan.train
        ]
        if sum(per_window) >= config.min_positives and int(n[window].sum()) <= BURST_RATIO * sum(
            per_window
        ) / len(per_window):
            return plan
        plan = plan_cutoffs(end, horizon_days=horizon_days, first_adoption=None)
    if not window.any():
        raise TooLittleData(
            f"nothing to learn: no modelled product was adopted between {pd.Timestamp(c).date()} "
            f"and {(end - pd.Timedelta(days=1)).date()} (the {horizon_days} days before as_of "
            f"{end.date()})"
        )
    return plan


# --------------------------------------------------------------------------- rules


def _first_days(
    data: BankData, product_codes: tuple[str, ...], instants: Sequence[int]
) -> list[npt.NDArray[np.int32]]:
    """Per instant, the first-adoption days of the partition's customers with an
    adoption before it (the rows :func:`models.features.mine_rules` mines)."""
    ids = data.customers["customer_id"].to_numpy(dtype=object)
    index = AdoptionIndex.from_frame(data.adoptions, customer_ids=ids, product_codes=product_codes)
    out = []
    for t in instants:
        first = index.first_days(t)
        seen = (first != NEVER).any(axis=1)
        out.append(np.ascontiguousarray(first[seen]))
    return out


def _mine(
    matrices: Iterable[npt.NDArray[np.int32]],
    product_codes: tuple[str, ...],
    as_of_ns: int,
    config: TrainConfig,
    horizon_days: int,
) -> RuleSet:
    """:func:`models.features.mine_rules` over the concatenated partitions' matrices."""
    first = np.concatenate(list(matrices))
    matrix = AdoptionMatrix(
        customer_ids=np.arange(first.shape[0]),
        product_codes=product_codes,
        first_days=np.ascontiguousarray(first, dtype=np.int32),
        as_of=pd.Timestamp(as_of_ns, unit="ns"),
        horizon_day=int(as_of_ns // NS_PER_DAY),
    )
    return mine_sequence_rules_from_matrix(
        matrix,
        min_support=config.rule_min_support,
        min_confidence=config.rule_min_confidence,
        min_customers=config.rule_min_customers,
        max_antecedent=config.rule_max_antecedent,
        ordered=config.rule_ordered,
        within_days=horizon_days,
    )


def _rules_at(
    client: Any,
    partitions: Sequence[Any],
    spec: FeatureSpec,
    instants: Sequence[int],
    config: TrainConfig,
    horizon_days: int,
) -> list[RuleSet]:
    futures = client.map(
        _first_days,
        partitions,
        product_codes=spec.product_codes,
        instants=list(instants),
        pure=False,
    )
    per_partition = client.gather(futures)
    rules = []
    for i, t in enumerate(instants):
        rules.append(
            _mine((p[i] for p in per_partition), spec.product_codes, t, config, horizon_days)
        )
    return rules


# --------------------------------------------------------------------------- feature rows


@dataclass(frozen=True, eq=False)
class _Built:
    """A partition's feature rows at every cutoff (kept on its worker)."""

    values: list[npt.NDArray[np.float32]]
    labels: list[npt.NDArray[np.bool_]]
    eligible: list[npt.NDArray[np.bool_]]
    folds: list[npt.NDArray[np.int8]]
    rule_confidence: list[npt.NDArray[np.float64] | None]


def _build(
    data: BankData,
    *,
    spec: FeatureSpec,
    rules: Sequence[RuleSet | None],
    cutoffs: Sequence[int],
    config: TrainConfig,
    horizon_days: int,
) -> _Built:
    catalogue = Catalogue.from_data(data)
    prepared = FeatureBuilder(spec, RuleSet([], "sequence", {}) if config.rules else None).prepare(
        data
    )
    hashes = (pd.util.hash_array(prepared.customer_ids) % np.uint64(10_000)).astype(np.int64)
    forced = (
        AcceptedOffers.of(data, prepared.customer_ids, catalogue)
        if config.forced_sales == "drop"
        else None
    )
    built = _Built([], [], [], [], [])
    for t_ns, cutoff_rules in zip(cutoffs, rules, strict=True):
        frame = FeatureBuilder(spec, cutoff_rules).build(prepared, as_of=t_ns)
        labels = prepared.index.adopted_between(t_ns, t_ns + horizon_days * NS_PER_DAY)[frame.rows]
        eligible = combine(
            rule_failures(
                catalogue,
                held=frame.held,
                ages=frame.ages,
                segment_codes=catalogue.segment_codes(frame.segments),
            )
        )
        if forced is not None:
            eligible &= ~forced.within(frame.rows, t_ns, horizon_days * NS_PER_DAY)
        built.values.append(frame.values)
        built.labels.append(labels)
        built.eligible.append(eligible)
        built.folds.append((hashes[frame.rows] % 2).astype(np.int8))
        built.rule_confidence.append(frame.rule_confidence)
    return built


def _counts(built: _Built) -> npt.NDArray[np.int64]:
    """cutoffs x catalogue x (candidates, positives)."""
    out = np.zeros((len(built.values), built.eligible[0].shape[1] if built.eligible else 0, 2))
    for k, (labels, eligible) in enumerate(zip(built.labels, built.eligible, strict=True)):
        out[k, :, 0] = eligible.sum(axis=0)
        out[k, :, 1] = (eligible & labels).sum(axis=0)
    return out.astype(np.int64)


def _shares(
    counts: npt.NDArray[np.int64], validation: Sequence[bool], config: TrainConfig, cap: int
) -> npt.NDArray[np.float64]:
    """The negatives' share per cutoff and product, as the single-machine sampler
    (:func:`models.propensity.training.train`) chooses it from the cutoff's counts."""
    shares = np.ones(counts.shape[:2])
    for k, is_validation in enumerate(validation):
        limit = config.max_validation_rows if is_validation else cap
        for j in range(counts.shape[1]):
            candidates, positives = int(counts[k, j, 0]), int(counts[k, j, 1])
            negatives = candidates - positives
            if negatives == 0:
                continue
            wanted = float(max(limit - positives, 1))
            if not is_validation and candidates > limit:
                wanted = min(
                    wanted, max(config.negatives_per_positive * positives, config.min_negatives)
                )
            shares[k, j] = min(1.0, wanted / negatives)
    return shares


@dataclass(frozen=True, eq=False)
class _Rows:
    values: npt.NDArray[np.float32]
    labels: npt.NDArray[np.bool_]
    weights: npt.NDArray[np.float64]
    folds: npt.NDArray[np.int8]
    rules: npt.NDArray[np.float64]

    @property
    def stats(self) -> tuple[int, int, float, float, float]:
        """Rows, positives, weighted rows, weighted positives, weighted negatives."""
        w = self.weights
        return (
            int(self.labels.size),
            int(self.labels.sum()),
            float(w.sum()),
            float(w[self.labels].sum()),
            float(w[~self.labels].sum()),
        )


def _sample(
    built: _Built,
    *,
    columns: Sequence[int],
    spec_columns: Sequence[int],
    validation: Sequence[bool],
    shares: npt.NDArray[np.float64],
    seed: int,
    partition: int,
) -> dict[tuple[int, bool], _Rows]:
    """Per (catalogue column, validation): the partition's sampled rows."""
    rng = np.random.default_rng([seed, partition])
    parts: dict[tuple[int, bool], list[_Rows]] = {}
    for k, is_validation in enumerate(validation):
        for j, s in zip(columns, spec_columns, strict=True):
            candidates = np.flatnonzero(built.eligible[k][:, j])
            labels = built.labels[k][candidates, j]
            positives, negatives = candidates[labels], candidates[~labels]
            share = float(shares[k, j])
            kept = negatives[rng.random(negatives.size) < share] if share < 1 else negatives
            rows = np.concatenate([positives, kept])
            confidence = built.rule_confidence[k]
            parts.setdefault((j, is_validation), []).append(
                _Rows(
                    values=built.values[k][rows],
                    labels=built.labels[k][rows, j],
                    weights=np.concatenate(
                        [np.ones(positives.size), np.full(kept.size, 1.0 / share)]
                    ),
                    folds=built.folds[k][rows],
                    rules=np.zeros(rows.size) if confidence is None else confidence[rows, s],
                )
            )
    return {
        key: _Rows(
            values=np.concatenate([r.values for r in rows]),
            labels=np.concatenate([r.labels for r in rows]),
            weights=np.concatenate([r.weights for r in rows]),
            folds=np.concatenate([r.folds for r in rows]),
            rules=np.concatenate([r.rules for r in rows]),
        )
        for key, rows in parts.items()
    }


def _stats(sampled: dict[tuple[int, bool], _Rows]) -> dict[tuple[int, bool], tuple[Any, ...]]:
    return {key: rows.stats for key, rows in sampled.items()}


def _pick(sampled: dict[tuple[int, bool], _Rows], key: tuple[int, bool]) -> _Rows:
    return sampled[key]


# --------------------------------------------------------------------------- boosters


def _concat(*parts: _Rows) -> _Rows:
    return _Rows(
        values=np.concatenate([r.values for r in parts]),
        labels=np.concatenate([r.labels for r in parts]),
        weights=np.concatenate([r.weights for r in parts]),
        folds=np.concatenate([r.folds for r in parts]),
        rules=np.concatenate([r.rules for r in parts]),
    )


def workers_in_order(client: Any) -> list[str]:
    """The cluster's workers by address: partition ``k`` belongs to the ``k mod n``-th."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        raise DaskError("the Dask cluster has no workers")
    return workers


def _per_worker(client: Any, parts: Sequence[tuple[Any, int, int]]) -> list[tuple[Any, int, str]]:
    """The rows ``(future, rows, partition)`` as one block per worker: partition ``k``'s
    rows on the ``k mod n``-th worker (:func:`workers_in_order`), each block's partitions
    in partition order, the blocks in worker order (LightGBM ranks its machines so).

    A data-parallel LightGBM model depends on which rows each machine holds (each bins
    its share of the features from its own rows) and on their order (bagging draws by
    position). Where Dask ran a partition's tasks depends on timing and work stealing,
    so the blocks follow the partition numbers instead: a run on the same number of
    workers is repeatable.
    """
    workers = workers_in_order(client)
    groups: dict[int, list[tuple[Any, int]]] = {}
    for future, n, k in sorted(parts, key=lambda part: part[2]):
        if n:
            groups.setdefault(k % len(workers), []).append((future, n))
    out = []
    for g in sorted(groups):
        worker, group = workers[g], groups[g]
        place = {"workers": [worker], "allow_other_workers": False}
        block = client.submit(_concat, *[f for f, _ in group], pure=False, **place)
        out.append((block, sum(n for _, n in group), worker))
    return out


class _Port:
    """A port bound on a worker and held until its LightGBM starts listening there, so
    nothing else takes it in between (as :mod:`lightgbm.dask` does). It never leaves
    the worker (a socket does not pickle)."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("", 0))
        self.number = int(self.socket.getsockname()[1])


def _port_number(port: _Port) -> int:
    return port.number


def _fit_rank(
    rows: _Rows,
    port: _Port,
    *,
    params: Mapping[str, Any],
    dataset_params: Mapping[str, Any],
    feature_name: list[str],
    categorical: list[str],
    rounds: int,
    keep: bool,
) -> str | None:
    """One machine of a data-parallel LightGBM training, on a worker's block."""
    port.socket.close()
    train_set = lgb.Dataset(
        rows.values,
        label=rows.labels.astype(np.float32),
        weight=rows.weights,
        feature_name=feature_name,
        categorical_feature=categorical,
        params=dict(dataset_params),
    )
    booster = lgb.train({**params, "local_listen_port": port.number}, train_set, rounds)
    return str(booster.model_to_string()) if keep else None


def _dask_fit(
    client: Any,
    parts: Sequence[tuple[Any, int, str]],
    spec: FeatureSpec,
    params: Mapping[str, Any],
    config: TrainConfig,
    rounds: int,
) -> lgb.Booster:
    """A booster trained for exactly ``rounds`` rounds by LightGBM's data-parallel
    learner, one machine per block of rows (:func:`_per_worker`), ranked in block order.

    :mod:`lightgbm.dask` ranks its machines in the order of a set of Dask keys, which
    changes from one client process to the next; as each machine bins its share of the
    features from its own rows, that made two runs on the same data differ (MAP@3 by
    up to 1.2% on the test bank). Here the machines and their ranks follow the blocks,
    so a run on the same number of workers is repeatable.
    """
    ports = [
        client.submit(_Port, pure=False, workers=[worker], allow_other_workers=False)
        for _, _, worker in parts
    ]
    numbers = client.gather([client.submit(_port_number, p, pure=False) for p in ports])
    machines = ",".join(
        f"{urlsplit(worker).hostname}:{number}"
        for (_, _, worker), number in zip(parts, numbers, strict=True)
    )
    threads = client.ncores()
    fits = [
        client.submit(
            _fit_rank,
            block,
            port,
            params={
                **params,
                "tree_learner": "data",
                "num_machines": len(parts),
                "machines": machines,
                "num_threads": threads[worker],
            },
            dataset_params={
                **dataset_params(params, config),
                "num_threads": threads[worker],
            },
            feature_name=list(spec.columns),
            categorical=list(spec.categorical),
            rounds=rounds,
            keep=rank == 0,
            pure=False,
            workers=[worker],
            allow_other_workers=False,
        )
        for rank, ((block, _, worker), port) in enumerate(zip(parts, ports, strict=True))
    ]
    text = client.gather(fits)[0]
    # The ports of this run's network are no part of the model.
    kept = [line for line in text.splitlines(keepends=True) if not line.startswith(_NETWORK)]
    return lgb.Booster(model_str="".join(kept))


_NETWORK = ("[machines: ", "[local_listen_port: ")


def _best_round(
    booster: lgb.Booster,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.bool_],
    w: npt.NDArray[np.float64],
    patience: int,
) -> tuple[int, bool]:
    """The round :func:`lightgbm.early_stopping` keeps on the validation rows (weighted
    binary log loss, strict improvements), and whether stopping was decided within the
    booster's rounds."""
    total = booster.current_iteration()
    raw = np.zeros(y.size)
    best, best_loss = 0, math.inf
    label = y.astype(np.float64)
    weight_sum = float(w.sum())
    for i in range(total):
        raw += np.asarray(
            booster.predict(x, raw_score=True, start_iteration=i, num_iteration=1),
            dtype=np.float64,
        )
        p = np.clip(1.0 / (1.0 + np.exp(-raw)), 1e-15, 1 - 1e-15)
        loss = float(-np.sum(w * (label * np.log(p) + (1 - label) * np.log(1 - p))) / weight_sum)
        if loss < best_loss:
            best, best_loss = i, loss
        elif i - best >= patience:
            return best + 1, True
    return best + 1, False


def _fit_product(
    client: Any,
    code: str,
    spec: FeatureSpec,
    train_parts: Sequence[tuple[Any, tuple[Any, ...], int]],
    valid: _Rows,
    params: Mapping[str, Any],
    config: TrainConfig,
) -> tuple[ProductModel, dict[str, Any]]:
    """One product's booster, calibration and metrics, as
    :func:`models.propensity.training.train` fits them, with the booster on Dask."""
    stats = [s for _, s, _ in train_parts]
    n_train = sum(int(s[0]) for s in stats)
    p_train = sum(int(s[1]) for s in stats)
    w_rows = sum(float(s[2]) for s in stats)
    w_positives = sum(float(s[3]) for s in stats)
    w_negatives = sum(float(s[4]) for s in stats)
    x_valid, y_valid, w_valid, folds, rules_valid = (
        valid.values,
        valid.labels,
        valid.weights,
        valid.folds,
        valid.rules,
    )
    weighted_rows = w_rows + float(w_valid.sum())
    base_rate = (
        (w_positives + float(w_valid[y_valid].sum())) / weighted_rows if weighted_rows else 0.0
    )
    metrics: dict[str, Any] = {
        "train_rows": n_train,
        "train_positives": p_train,
        "validation_rows": int(y_valid.size),
        "validation_positives": int(y_valid.sum()),
        "base_rate": base_rate,
    }
    rule_column = spec.columns.index(f"rule_conf_{code}") if spec.rule_features else -1
    enough = (
        p_train >= config.min_positives
        and y_valid.sum() >= max(2, config.min_positives // 4)
        and (~y_valid).any()
    )
    if not enough:
        calibrator = Calibrator("constant", params=(base_rate,))
        product = ProductModel(code, None, calibrator, None, base_rate)
        metrics.update(kind="base_rate", n_trees=0, calibration="constant", blend=False)
        lgbm = np.full(y_valid.size, base_rate)
        metrics.update(validation_metrics(y_valid, w_valid, lgbm, lgbm, rules_valid, lgbm))
        return product, metrics

    sized, patience = booster_params(params, config, rows=n_train, positives=p_train)
    parts = _per_worker(client, [(f, int(s[0]), k) for f, s, k in train_parts])
    rounds = min(FIRST_ROUNDS, config.max_rounds)
    while True:
        booster = _dask_fit(client, parts, spec, sized, config, rounds)
        best, decided = _best_round(booster, x_valid, y_valid, w_valid, patience)
        if decided or rounds >= config.max_rounds:
            break
        rounds = min(2 * rounds, config.max_rounds)
    text = booster.model_to_string(num_iteration=best)
    model = lgb.Booster(model_str=text)
    raw = np.asarray(model.predict(x_valid, raw_score=True), dtype=np.float64)
    if config.refit:
        # As single-machine: validation negatives join at the training negatives' share.
        share = min(1.0, (n_train - p_train) / w_negatives) if w_negatives > 0 else 1.0
        keep = y_valid | (np.random.default_rng(config.seed).random(y_valid.size) < share)
        extra = _Rows(
            values=x_valid[keep],
            labels=y_valid[keep],
            weights=np.where(y_valid, w_valid, w_valid / share)[keep],
            folds=folds[keep],
            rules=rules_valid[keep],
        )
        # The validation rows join the first worker's block, after its training rows.
        block, n, worker = parts[0]
        place = {"workers": [worker]}
        [sent] = client.scatter([extra], hash=False, **place)
        joined = client.submit(_concat, block, sent, pure=False, **place)
        refit_parts = [(joined, n + int(keep.sum()), worker), *parts[1:]]
        text = str(_dask_fit(client, refit_parts, spec, sized, config, best).model_to_string())
    product, fitted = calibrate_product(
        code, text, raw, y_valid, w_valid, folds, rules_valid, rule_column, config, base_rate
    )
    metrics.update(
        lightgbm_metrics(
            fitted,
            n_trees=int(best),
            refit=config.refit,
            sized=sized,
            early_stopping_rounds=patience,
            early_stopping="replayed on the client over distributed LightGBM rounds",
        )
    )
    return product, metrics


# --------------------------------------------------------------------------- training


def train_dask(
    client: Any,
    partitions: Sequence[Any],
    *,
    as_of: DateInput,
    horizon_days: int = 90,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> PropensityModel:
    """Train a propensity model on a Dask cluster (module docstring).

    Parameters
    ----------
    client : distributed.Client
        The cluster.
    partitions : sequence of distributed.Future
        The bank's partitions (:class:`models.data.BankData`), held by the workers
        (:func:`load_partitions`, or :func:`scatter_partitions` of :func:`split_bank`).
    as_of : date-like
        Training instant.
    horizon_days : int
        Propensity horizon.
    config : TrainConfig, optional
        Settings (default ``TrainConfig()``).
    progress : callable, optional
        ``progress(stage, fraction)``.

    Returns
    -------
    PropensityModel
        As :func:`models.propensity.training.train` returns it; ``report["dask"]``
        records the workers and partitions.

    Raises
    ------
    DaskError
        If the plan has one cutoff (a campaign snapshot): its random split of customers
        is trained on one machine.
    TooLittleData
        If there is nothing to learn.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    report_progress = progress or (lambda stage, fraction: None)
    as_of_ns = instant(as_of)
    as_of_ts = pd.Timestamp(as_of_ns, unit="ns")
    report_progress("summaries", 0.0)
    summary = _merge(client.gather(client.map(_summarise, partitions, pure=False)))
    catalogue = _catalogue(summary)
    targets = targets_of(catalogue, config)
    plan = dask_plan(
        summary.adopted, catalogue, as_of=as_of_ts, horizon_days=horizon_days, config=config
    )
    if plan.split_customers:
        raise DaskError(
            "this bank trains on one cutoff (a campaign snapshot: a random split of its "
            "customers), which the Dask driver does not do; train it on one machine "
            "(without --dask)"
        )
    spec = _spec(summary, config)
    cutoffs = [*plan.train, plan.validation]
    validation = [t == plan.validation for t in cutoffs]
    cutoff_ns = [int(t.value) for t in cutoffs]
    report_progress("rules", 0.05)
    if config.rules:
        mined = _rules_at(client, partitions, spec, [*cutoff_ns, as_of_ns], config, horizon_days)
        cutoff_rules: list[RuleSet | None] = list(mined[:-1])
        final_rules: RuleSet | None = mined[-1]
    else:
        cutoff_rules, final_rules = [None] * len(cutoffs), None
    report_progress("features", 0.15)
    built = client.map(
        _build,
        partitions,
        spec=spec,
        rules=cutoff_rules,
        cutoffs=cutoff_ns,
        config=config,
        horizon_days=horizon_days,
        pure=False,
    )
    counts = np.sum(client.gather(client.map(_counts, built, pure=False)), axis=0)
    per_cutoff_cap = max(1, config.max_rows_per_product // len(plan.train))
    shares = _shares(counts, validation, config, per_cutoff_cap)
    columns = [catalogue.index[code] for code in targets]
    spec_index = {code: j for j, code in enumerate(spec.product_codes)}
    sampled = [
        client.submit(
            _sample,
            b,
            columns=columns,
            spec_columns=[spec_index[code] for code in targets],
            validation=validation,
            shares=shares,
            seed=config.seed,
            partition=i,
            pure=False,
        )
        for i, b in enumerate(built)
    ]
    stats = client.gather(client.map(_stats, sampled, pure=False))
    del built
    products: list[ProductModel] = []
    report: dict[str, Any] = {"products": {}}
    params = config.lightgbm_params()
    n_features = len(spec.columns)
    for n, code in enumerate(targets):
        report_progress(f"training {code}", 0.3 + 0.7 * n / max(len(targets), 1))
        j = catalogue.index[code]
        train_parts = [
            (client.submit(_pick, s, (j, False), pure=False), st[(j, False)], k)
            for k, (s, st) in enumerate(zip(sampled, stats, strict=True))
            if (j, False) in st
        ]
        valid_parts = [
            client.submit(_pick, s, (j, True), pure=False)
            for s, st in zip(sampled, stats, strict=True)
            if (j, True) in st
        ]
        gathered: list[_Rows] = client.gather(valid_parts)
        valid = _Rows(
            values=np.concatenate(
                [r.values for r in gathered] or [np.empty((0, n_features), np.float32)]
            ),
            labels=np.concatenate([r.labels for r in gathered] or [np.empty(0, bool)]),
            weights=np.concatenate([r.weights for r in gathered] or [np.empty(0)]),
            folds=np.concatenate([r.folds for r in gathered] or [np.empty(0, np.int8)]),
            rules=np.concatenate([r.rules for r in gathered] or [np.empty(0)]),
        )
        product, metrics = _fit_product(client, code, spec, train_parts, valid, params, config)
        products.append(product)
        report["products"][code] = metrics
    n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["summary"] = _summary_with_dask(report["products"])
    report["dask"] = {"workers": n_workers, "partitions": len(partitions)}
    first_adoption = pd.Timestamp(
        pd.DatetimeIndex(summary.adopted.index.get_level_values(1))
        .to_numpy(dtype="datetime64[ns]")[
            pd.DatetimeIndex(summary.adopted.index.get_level_values(1)) < as_of_ts
        ]
        .min()
    )
    window = {
        "first_adoption": first_adoption.isoformat(),
        "train_cutoffs": [t.isoformat() for t in plan.train],
        "validation_cutoff": plan.validation.isoformat(),
        "split_customers": False,
        "plan": plan.kind,
        "validation": {"kind": "cutoff"},
        "customers": summary.customers,
        "dask": {"workers": n_workers, "partitions": len(partitions)},
    }
    report_progress("done", 1.0)
    return PropensityModel(
        spec=spec,
        catalogue=catalogue,
        rules=final_rules,
        products=tuple(products),
        as_of=as_of_ts,
        horizon_days=horizon_days,
        config=config,
        window=window,
        report=report,
    )


def _summary_with_dask(products: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = summary_of(products)
    return out


# --------------------------------------------------------------------------- scoring


_MODELS: dict[str, PropensityModel] = {}
"""Models loaded on this worker, by their bundle's digest (each loads once)."""


def model_files(model: PropensityModel) -> dict[str, bytes]:
    """The model as its bundle's files (:func:`models.artifacts.save_bundle`): how it
    travels to workers (a model holds boosters and locks, which do not pickle)."""
    from models.artifacts import save_bundle

    with tempfile.TemporaryDirectory(prefix="nbo-dask-") as tmp:
        folder = Path(tmp) / "bundle"
        save_bundle(model, folder)
        return {
            str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }


def _model(files: Mapping[str, bytes]) -> PropensityModel:
    from models.artifacts import load_bundle

    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(files[name])
    key = digest.hexdigest()
    if key not in _MODELS:
        with tempfile.TemporaryDirectory(prefix="nbo-dask-") as tmp:
            folder = Path(tmp)
            for name, content in files.items():
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            _MODELS.clear()
            _MODELS[key] = load_bundle(folder)
    return _MODELS[key]


def _score(
    data: BankData, files: Mapping[str, bytes], as_of_ns: int, catalogue: Catalogue | None
) -> pd.DataFrame:
    return _model(files).score(data, as_of=as_of_ns, catalogue=catalogue)


def score_partitions(
    client: Any,
    partitions: Sequence[Any],
    model: PropensityModel,
    *,
    as_of: DateInput,
    catalogue: Catalogue | None = None,
    apply: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> list[Any]:
    """Futures of each partition's scores (:meth:`PropensityModel.score`), with
    ``apply`` (a picklable function of the scores) run on the worker. The model goes
    to the workers as its bundle (verified when each worker loads it)."""
    shared = client.scatter(model_files(model), broadcast=True, hash=False)
    futures = client.map(
        _score,
        partitions,
        files=shared,
        as_of_ns=instant(as_of),
        catalogue=catalogue,
        pure=False,
    )
    if apply is not None:
        futures = client.map(apply, futures, pure=False)
    return list(futures)


# --------------------------------------------------------------------------- holdout


def _window_adoptions(data: BankData, start_ns: int, end_ns: int) -> pd.DataFrame:
    adopted = data.adoptions["adopted_at"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    inside = (adopted >= start_ns) & (adopted < end_ns)
    return data.adoptions.loc[inside, ["customer_id", "product_code"]].drop_duplicates()


def _popularity_counts(
    data: BankData, cutoff_ns: int, window_days: int
) -> tuple[int, pd.Series, pd.Series]:
    """The sums behind :func:`models.metrics.popularity_scores` for one partition:
    customers with an adoption before the cutoff, and per product the customers whose
    first adoption is in the window and before it (a customer is in one partition)."""
    adoptions = data.adoptions
    adopted = adoptions["adopted_at"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    seen = adopted < cutoff_ns
    history = pd.DataFrame(
        {
            "customer_id": adoptions["customer_id"].to_numpy(dtype=object)[seen],
            "product_code": adoptions["product_code"].astype(str).to_numpy(dtype=object)[seen],
            "adopted_at": adopted[seen],
        }
    )
    first = history.groupby(["customer_id", "product_code"], sort=False)["adopted_at"].min()
    first = first.reset_index()
    in_window = first["adopted_at"] >= cutoff_ns - window_days * NS_PER_DAY
    return (
        int(history["customer_id"].nunique()),
        first.loc[in_window].groupby("product_code").size(),
        first.loc[~in_window].groupby("product_code").size(),
    )


def holdout_dask(
    client: Any,
    partitions: Sequence[Any],
    *,
    as_of: dt.date,
    horizon_days: int = 90,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> HoldoutResult:
    """The temporal holdout of :func:`models.evaluation.holdout_evaluation`, trained
    with :func:`train_dask` and scored on the workers; the scores of the measured
    customers come to the client for the comparison table.

    Raises
    ------
    DaskError
        If the bank needs a random holdout of customers (a campaign snapshot).
    """
    config = config or TrainConfig()
    cutoff = as_of - dt.timedelta(days=horizon_days)
    # As models.evaluation chooses the kind: a random holdout when the final model
    # trains on one cutoff, or a model trained before the window has nothing to learn.
    summary = _merge(client.gather(client.map(_summarise, partitions, pure=False)))
    catalogue = _catalogue(summary)
    try:
        final = dask_plan(
            summary.adopted, catalogue, as_of=as_of, horizon_days=horizon_days, config=config
        )
        dask_plan(
            summary.adopted, catalogue, as_of=cutoff, horizon_days=horizon_days, config=config
        )
    except TooLittleData:
        final = None
    if final is None or final.split_customers:
        raise DaskError(
            "this bank is measured on a random holdout of customers (a campaign snapshot, "
            "or nothing to learn before the holdout window), which the Dask driver does "
            "not do; train it on one machine (without --dask)"
        )
    model = train_dask(
        client,
        partitions,
        as_of=cutoff,
        horizon_days=horizon_days,
        config=config,
        progress=progress,
    )
    start_ns = instant(cutoff)
    scores = pd.concat(
        client.gather(score_partitions(client, partitions, model, as_of=cutoff)),
        ignore_index=True,
    )
    actual = pd.concat(
        client.gather(
            client.map(
                _window_adoptions,
                partitions,
                start_ns=start_ns,
                end_ns=start_ns + horizon_days * NS_PER_DAY,
                pure=False,
            )
        ),
        ignore_index=True,
    ).drop_duplicates()
    counts = client.gather(
        client.map(_popularity_counts, partitions, cutoff_ns=start_ns, window_days=365, pure=False)
    )
    population = sum(c[0] for c in counts)
    adopters = pd.concat([c[1] for c in counts]).groupby(level=0).sum()
    before = pd.concat([c[2] for c in counts]).groupby(level=0).sum()
    at_risk = (population - before.reindex(adopters.index, fill_value=0)).astype(np.float64)
    rate = (adopters / at_risk).astype(np.float64)
    pairs = scores[["customer_id", "product_code"]]
    models = {
        "popularity": pairs.assign(
            score=pairs["product_code"].astype(str).map(rate).fillna(0.0).to_numpy(np.float64)
        ),
        "rules": pairs.assign(score=scores["rules"].fillna(0.0)),
        "lightgbm": pairs.assign(score=scores["lgbm"]),
        "blend": pairs.assign(score=scores["propensity"]),
    }
    comparison, by_product = holdout_comparison(models, actual)
    return HoldoutResult(
        cutoff,
        horizon_days,
        model,
        scores,
        actual,
        comparison,
        models,
        holdout_kind="temporal",
        holdout_size=int(scores["customer_id"].nunique()),
        by_product=by_product,
    )
