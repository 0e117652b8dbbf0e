"""Holdout evaluation: train without the measured data, measure on adoptions after a cutoff.

Two kinds of holdout (:data:`HoldoutKind`):

``temporal``
    Train with the data before ``cutoff = as_of - horizon`` and measure on every
    customer's adoptions in ``[cutoff, as_of)``: the model is judged on a future it
    never saw.
``random_customers``
    When the data supports only one training cutoff (a campaign snapshot and its
    responders, see :func:`models.propensity.training.training_plan`), there is no
    earlier period to train on. A seeded random share of the customers, stratified by
    whether they adopted a modelled product in the window, is held out; the model is
    trained on the others (exactly as the final model is, with their own validation
    split) and measured on the held-out customers' adoptions in ``[cutoff, as_of)``.

The served blend is compared side by side with its parts (LightGBM alone, the
best rule's confidence alone) and with the popularity baseline, on the same
candidates (eligible, not held at the cutoff) and the same customers, by ranking
metrics (MAP@k...) and, per product, by AUC and by the responders found in the top
10% and 20% of each product's ranking (what a campaign list is judged by; MAP@k says
little when there is one product).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.data import BankData
from models.errors import TooLittleData
from models.metrics import (
    CandidatePairs,
    calibration_table,
    compare,
    gains_table,
    label_pairs,
    popularity_scores,
    product_metrics,
    roc_auc,
)
from models.propensity import PropensityModel, TrainConfig
from models.propensity.training import (
    ProgressFn,
    stratified_split,
    train,
    training_plan,
    window_responders,
)
from models.rules import RuleSet, rules_for_display
from models.synthetic import read_truth, true_propensities

HoldoutKind: TypeAlias = Literal["temporal", "random_customers"]
"""How the holdout keeps the measured data from training (module docstring)."""

HOLDOUT_FRACTION: Final[float] = 0.25
"""Share of customers a ``random_customers`` holdout holds out."""

TOP_SHARES: Final[tuple[float, ...]] = (0.1, 0.2)
"""The tops of each product's ranking whose responders are counted (10% and 20%)."""

CAMPAIGN_COLUMNS: Final[tuple[str, ...]] = (
    "AUC",
    "top10% hits",
    "top10% share",
    "top20% hits",
    "top20% share",
)
"""Columns :func:`holdout_evaluation` adds to the comparison table (see
:func:`campaign_metrics`)."""

ReferenceScorer = Callable[[dt.date, int, pd.DataFrame], pd.DataFrame]
"""``(cutoff, horizon_days, candidates) -> scores``: a reference ranking (e.g. the oracle)."""


@dataclass(frozen=True)
class HoldoutResult:
    """What a holdout measured.

    Attributes
    ----------
    cutoff : datetime.date
        Start of the measured window; features read only data before it.
    horizon_days : int
        Length of the measured window ``[cutoff, cutoff + horizon_days)``.
    model : PropensityModel
        The model trained for the holdout (not the final one).
    scores : pandas.DataFrame
        Its scores of the measured customers at ``cutoff``.
    actual : pandas.DataFrame
        The measured customers' adoptions in the window (``customer_id, product_code``).
    comparison : pandas.DataFrame
        One row per compared model: ranking metrics (:func:`models.metrics.compare`)
        then :data:`CAMPAIGN_COLUMNS`.
    ranked : mapping of str to pandas.DataFrame
        Each compared model's scores (``customer_id, product_code, score``).
    holdout_kind : {"temporal", "random_customers"}
        See the module docstring.
    holdout_fraction, holdout_seed : float, int or None
        The held-out share of customers and the seed, for ``random_customers``.
    holdout_size : int
        Customers measured (those scored at the cutoff).
    by_product : pandas.DataFrame or None
        Long table of :func:`campaign_metrics` for every compared model (column
        ``model`` first).
    """

    cutoff: dt.date
    horizon_days: int
    model: PropensityModel
    scores: pd.DataFrame
    actual: pd.DataFrame
    comparison: pd.DataFrame
    ranked: Mapping[str, pd.DataFrame]
    holdout_kind: HoldoutKind = "temporal"
    holdout_fraction: float | None = None
    holdout_seed: int | None = None
    holdout_size: int = 0
    by_product: pd.DataFrame | None = None

    def describe_holdout(self) -> str:
        """One line for reports: which customers and which window were measured."""
        window = f"adoptions from {self.cutoff} for {self.horizon_days} days"
        if self.holdout_kind == "random_customers":
            return (
                f"random customers: {self.holdout_fraction:.0%} of customers "
                f"({self.holdout_size:,}) held out at random (seed {self.holdout_seed}, "
                f"stratified by adoption in the window), trained on the others; {window}"
            )
        return f"temporal: trained on data before {self.cutoff}; {window}"

    def summary_metrics(self, served: str = "blend") -> dict[str, Any]:
        """Flat, JSON-ready headline metrics.

        ``holdout_kind`` (with ``holdout_fraction`` and ``holdout_seed`` for a random
        holdout), then per model ``<model>.map@k`` and ``<model>.auc`` (mean over
        products with responders), ``<model>.top10_hits``, ``<model>.top10_share``,
        ``<model>.top20_hits``, ``<model>.top20_share`` (summed over products, share of
        all responders); ``map@3`` and ``auc`` of the served model; and ``by_product``:
        ``{product: {"<model>.auc": ..., ...}}``.
        """
        table = self.comparison
        out: dict[str, Any] = {
            "holdout_kind": self.holdout_kind,
            "holdout_cutoff": self.cutoff.isoformat(),
            "holdout_customers": int(table["n_customers"].iloc[0]),
            "holdout_size": self.holdout_size,
        }
        if self.holdout_kind == "random_customers":
            out["holdout_fraction"] = self.holdout_fraction
            out["holdout_seed"] = self.holdout_seed
        keys = {
            "AUC": "auc",
            "top10% hits": "top10_hits",
            "top10% share": "top10_share",
            "top20% hits": "top20_hits",
            "top20% share": "top20_share",
        }
        for model in table.index:
            for k in (1, 3, 5):
                column = f"MAP@{k}"
                if column in table:
                    out[f"{model}.map@{k}"] = float(table.loc[model, column])
            for column, key in keys.items():
                if column in table:
                    out[f"{model}.{key}"] = _json_float(table.loc[model, column])
        out["map@3"] = out.get(f"{served}.map@3")
        out["auc"] = out.get(f"{served}.auc")
        if self.by_product is not None:
            products: dict[str, dict[str, Any]] = {}
            for row in self.by_product.itertuples(index=False):
                entry = products.setdefault(str(row.product_code), {})
                entry["candidates"] = int(row.n_candidates)
                entry["responders"] = int(row.n_positive)
                for key in ("auc", "top10_hits", "top10_share", "top20_hits", "top20_share"):
                    entry[f"{row.model}.{key}"] = _json_float(getattr(row, key))
            out["by_product"] = products
        return out


def _json_float(value: Any) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def campaign_metrics(
    scores: pd.DataFrame, actual: pd.DataFrame, *, shares: Sequence[float] = TOP_SHARES
) -> pd.DataFrame:
    """Per product: AUC, and responders found in the top of the product's ranking.

    Parameters
    ----------
    scores : pandas.DataFrame
        Scores frame (``customer_id, product_code, score``), the candidate pairs.
    actual : pandas.DataFrame
        Adopted pairs (``customer_id, product_code``); others are negatives. With a
        ``label`` column (0/1), only its rows labelled 1 are adopted.
    shares : sequence of float
        Tops of the ranking, as shares of the product's candidates (rounded to the
        nearest candidate, at least one).

    Returns
    -------
    pandas.DataFrame
        One row per product (sorted by code): ``product_code``, ``n_candidates``,
        ``n_positive``, ``auc`` (NaN without responders or non-responders), and per
        share ``s`` (as a percentage ``p``) ``top<p>_hits``, the responders among the
        ``round(s * n)`` best-scored candidates, and ``top<p>_share``, their share of
        all responders (NaN without responders). Scores tied at the edge of the top
        count by expectation under random tie-breaking (a constant score finds ``s``
        of the responders), so hits may be fractional.
    """
    if "label" in actual.columns:
        actual = actual.loc[actual["label"].astype(float).to_numpy() == 1.0]
    pairs = CandidatePairs.of([scores], actual, names=["scores"])
    score, scored = pairs.scores(scores, "scores")
    return _campaign_table(pairs, score, scored, shares)


def _campaign_table(
    pairs: CandidatePairs,
    score: npt.NDArray[np.float64],
    scored: npt.NDArray[np.bool_],
    shares: Sequence[float],
) -> pd.DataFrame:
    """:func:`campaign_metrics` of one model's scores on ``pairs.universe`` (only the
    pairs it ``scored``)."""
    records = []
    everything = bool(scored.all())
    for code, rows in pairs.products():
        if not everything:
            rows = rows[scored[rows]]
            if rows.size == 0:
                continue
        s = score[rows]
        y = pairs.relevant[rows]
        record: dict[str, Any] = {
            "product_code": code,
            "n_candidates": int(s.size),
            "n_positive": int(y.sum()),
            "auc": roc_auc(s, y),
        }
        ordered = np.sort(s)[::-1]
        for share in shares:
            name = f"top{round(share * 100)}"
            k = max(1, int(round(share * s.size)))
            edge = ordered[k - 1]
            above = s > edge
            tied = s == edge
            hits = float(y[above].sum()) + (k - int(above.sum())) * float(y[tied].sum()) / int(
                tied.sum()
            )
            record[f"{name}_hits"] = hits
            record[f"{name}_share"] = hits / y.sum() if y.any() else math.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def holdout_comparison(
    models: Mapping[str, pd.DataFrame], actual: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The comparison table of a holdout and its long per-product table.

    Parameters
    ----------
    models : mapping of str to pandas.DataFrame
        Each compared model's scores frame, on the same candidates.
    actual : pandas.DataFrame
        Adoptions in the measured window.

    Returns
    -------
    tuple of pandas.DataFrame
        :func:`models.metrics.compare` (MAP, precision, recall, NDCG, hit at 1, 3, 5)
        with :data:`CAMPAIGN_COLUMNS` added: ``AUC`` the mean of the products' AUCs
        (products with responders and non-responders), ``top<p>% hits`` the responders
        found in the top ``p``% of each product's ranking, summed over products, and
        ``top<p>% share`` their share of all responders; then every model's
        :func:`campaign_metrics` with a ``model`` column first.

    Notes
    -----
    The frames' pairs are read once (:class:`models.metrics.CandidatePairs`) and each
    model's scores are held as one array while its ranking (per customer, a chunk of
    customers at a time) and per-product metrics are measured: the memory is that of a
    few arrays over the pairs, not of a frame of labelled pairs per model.
    """
    pairs = CandidatePairs.of(list(models.values()), actual, names=list(models))
    campaigns: dict[str, pd.DataFrame] = {}

    def per_product(
        name: str, score: npt.NDArray[np.float64], scored: npt.NDArray[np.bool_]
    ) -> None:
        campaigns[name] = _campaign_table(pairs, score, scored, TOP_SHARES)

    table = compare(models, actual, ks=(1, 3, 5), pairs=pairs, visit=per_product)
    tables = []
    for name in models:
        metrics = campaigns[name]
        tables.append(metrics.assign(model=name))
        responders = float(metrics["n_positive"].sum())
        aucs = metrics["auc"].dropna()
        table.loc[name, "AUC"] = float(aucs.mean()) if len(aucs) else math.nan
        for p in (10, 20):
            hits = float(metrics[f"top{p}_hits"].sum())
            table.loc[name, f"top{p}% hits"] = hits
            table.loc[name, f"top{p}% share"] = hits / responders if responders else math.nan
    long = pd.concat(tables, ignore_index=True)
    return table, long[["model", *[c for c in long.columns if c != "model"]]]


def holdout_evaluation(
    data: BankData,
    *,
    as_of: dt.date,
    horizon_days: int = 90,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    references: Mapping[str, ReferenceScorer] | None = None,
    kind: HoldoutKind | Literal["auto"] = "auto",
    holdout_fraction: float = HOLDOUT_FRACTION,
) -> HoldoutResult:
    """Measure how well a model trained without the last ``horizon_days`` ranks them.

    Parameters
    ----------
    data : BankData
        The whole bank.
    as_of : datetime.date
        End of the observed history (exclusive); the measured window is
        ``[as_of - horizon_days, as_of)``.
    horizon_days : int
        Length of the evaluation window (the propensity horizon).
    config : TrainConfig, optional
        Training settings; ``config.seed`` also seeds a random holdout.
    references : mapping of str to ReferenceScorer, optional
        Extra rows for the comparison, such as the oracle of a synthetic bank
        (:func:`truth_reference`). Each is called with the cutoff, the horizon and the
        candidate pairs and scores only those pairs.
    kind : {"auto", "temporal", "random_customers"}
        ``auto``: ``random_customers`` when the final model would train on one cutoff
        (:func:`models.propensity.training.training_plan` at ``as_of``) or a model
        trained before the window would have nothing to learn; else ``temporal``.
    holdout_fraction : float
        Share of customers held out by a random holdout.

    Returns
    -------
    HoldoutResult

    Raises
    ------
    TooLittleData
        If there is nothing to learn or to measure (no adoption in the window), or too
        few adoptions to hold customers out and still train.
    """
    config = config or TrainConfig()
    cutoff = as_of - dt.timedelta(days=horizon_days)
    if kind == "auto":
        kind = _holdout_kind(
            data, as_of=as_of, cutoff=cutoff, horizon_days=horizon_days, config=config
        )
    if kind == "random_customers":
        return _random_holdout(
            data,
            as_of=as_of,
            horizon_days=horizon_days,
            config=config,
            progress=progress,
            references=references,
            fraction=holdout_fraction,
        )
    model = train(data, as_of=cutoff, horizon_days=horizon_days, config=config, progress=progress)
    scores = model.score(data, as_of=cutoff)
    actual = _window(data, cutoff, horizon_days)
    candidates = scores[["customer_id", "product_code"]]
    history = data.adoptions.loc[data.adoptions["adopted_at"] < pd.Timestamp(cutoff)]
    models = {
        "popularity": popularity_scores(history, candidates, as_of=cutoff, window_days=365),
        **_model_rows(scores),
    }
    models.update(_references(references, cutoff, horizon_days, candidates))
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


def _holdout_kind(
    data: BankData, *, as_of: dt.date, cutoff: dt.date, horizon_days: int, config: TrainConfig
) -> HoldoutKind:
    if training_plan(data, as_of=as_of, horizon_days=horizon_days, config=config).split_customers:
        return "random_customers"
    try:
        training_plan(data, as_of=cutoff, horizon_days=horizon_days, config=config)
    except TooLittleData:
        return "random_customers"
    return "temporal"


def _random_holdout(
    data: BankData,
    *,
    as_of: dt.date,
    horizon_days: int,
    config: TrainConfig,
    progress: ProgressFn | None,
    references: Mapping[str, ReferenceScorer] | None,
    fraction: float,
) -> HoldoutResult:
    """The ``random_customers`` holdout (module docstring)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be between 0 and 1, not {fraction}")
    cutoff = as_of - dt.timedelta(days=horizon_days)
    products = (
        list(config.products)
        if config.products is not None
        else [
            str(c)
            for c, a in zip(data.products["product_code"], data.products["active"], strict=True)
            if a
        ]
    )
    ids = data.customers["customer_id"].astype(str).to_numpy(dtype=object)
    responded = window_responders(data, start=cutoff, end=as_of, products=products)
    held = stratified_split(ids, responded, fraction=fraction, seed=config.seed, stream="holdout")
    if not responded[held].any() or not responded[~held].any():
        raise TooLittleData(
            f"too few adoptions between {cutoff} and {as_of - dt.timedelta(days=1)} to hold "
            f"{fraction:.0%} of the customers out and still train: import more responses"
        )
    # The holdout model never sees the held-out customers: not their attributes (feature
    # levels), histories (rules) nor, above all, their adoptions in the window.
    model = train(
        _only_customers(data, ids[~held]),
        as_of=as_of,
        horizon_days=horizon_days,
        config=config,
        progress=progress,
    )
    measured = _only_customers(data, ids[held])
    scores = model.score(measured, as_of=cutoff)
    actual = _window(measured, cutoff, horizon_days)
    candidates = scores[["customer_id", "product_code"]]
    # Each product's base rate among the training customers' eligible candidates in the
    # window (learnt by the holdout model): the popularity of a bank without history.
    rates = {product.product_code: product.base_rate for product in model.products}
    popularity = candidates.assign(
        score=candidates["product_code"].astype(str).map(rates).astype(float).fillna(0.0)
    )
    models = {"popularity": popularity, **_model_rows(scores)}
    models.update(_references(references, cutoff, horizon_days, candidates))
    comparison, by_product = holdout_comparison(models, actual)
    return HoldoutResult(
        cutoff,
        horizon_days,
        model,
        scores,
        actual,
        comparison,
        models,
        holdout_kind="random_customers",
        holdout_fraction=fraction,
        holdout_seed=config.seed,
        holdout_size=int(held.sum()),
        by_product=by_product,
    )


def _only_customers(data: BankData, customer_ids: Any) -> BankData:
    """``data`` restricted to some customers: every table with a ``customer_id``."""
    keep = pd.Index(np.asarray(customer_ids, dtype=object).astype(str))
    changes: dict[str, Any] = {}
    for item in dataclasses.fields(data):
        value = getattr(data, item.name)
        if isinstance(value, pd.DataFrame) and "customer_id" in value.columns:
            inside = value["customer_id"].astype(str).isin(keep).to_numpy()
            changes[item.name] = value.loc[inside].reset_index(drop=True)
    return dataclasses.replace(data, **changes)


def _window(data: BankData, cutoff: dt.date, horizon_days: int) -> pd.DataFrame:
    start = pd.Timestamp(cutoff)
    end = start + pd.Timedelta(days=horizon_days)
    adopted = data.adoptions["adopted_at"]
    actual = data.adoptions.loc[
        (adopted >= start) & (adopted < end), ["customer_id", "product_code"]
    ]
    return actual.drop_duplicates()


def _model_rows(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    pairs = scores[["customer_id", "product_code"]]
    return {
        "rules": pairs.assign(score=scores["rules"].fillna(0.0)),
        "lightgbm": pairs.assign(score=scores["lgbm"]),
        "blend": pairs.assign(score=scores["propensity"]),
    }


def _references(
    references: Mapping[str, ReferenceScorer] | None,
    cutoff: dt.date,
    horizon_days: int,
    candidates: pd.DataFrame,
) -> dict[str, pd.DataFrame]:
    out = {}
    for name, scorer in (references or {}).items():
        reference = scorer(cutoff, horizon_days, candidates)
        out[name] = candidates.assign(score=_aligned_scores(candidates, reference, name))
    return out


def _aligned_scores(
    candidates: pd.DataFrame, reference: pd.DataFrame, name: str
) -> npt.NDArray[np.float64]:
    """The reference's score of each candidate pair, in the candidates' row order, 0
    where it scored none (or NaN): the left join and fill it replaces, done on integer
    codes so that the candidates' columns are shared rather than copied (their text ids
    are most of a frame of millions of pairs) and the comparison reads them once for
    every model."""
    rows, customers = pd.factorize(candidates["customer_id"])
    if (rows < 0).any():
        raise ValueError("candidates have missing customer ids")
    products = pd.Index(sorted({str(code) for code in pd.unique(candidates["product_code"])}))
    n_products = len(products)
    # Cell (customer, product) of every reference row, -1 for pairs of no candidate.
    theirs = _positions_in(reference["customer_id"], customers)
    column = _product_columns(reference["product_code"], products)
    known = (theirs >= 0) & (column >= 0)
    theirs *= n_products
    theirs += column
    del column
    theirs = theirs[known]
    values = reference["score"].to_numpy(dtype=np.float64)[known]
    del known
    cells = len(customers) * n_products
    if cells > 4 * (len(candidates) + len(theirs)):
        # Sparse pairs: look the cells up in the sorted reference instead of a table.
        order = np.argsort(theirs, kind="stable")
        theirs, values = theirs[order], values[order]
        if theirs.size > 1 and (theirs[1:] == theirs[:-1]).any():
            raise ValueError(f"reference {name!r} scores a pair more than once")
        ours = rows.astype(np.int64) * n_products + _product_columns(
            candidates["product_code"], products
        )
        score = np.zeros(ours.size, dtype=np.float64)
        if theirs.size:
            at = np.minimum(np.searchsorted(theirs, ours), theirs.size - 1)
            matched = theirs[at] == ours
            score[matched] = values[at[matched]]
        return np.where(np.isnan(score), 0.0, score)
    # A table of every (customer, product) cell: no sorting, a few bytes a cell.
    seen = np.zeros(cells, dtype=bool)
    seen[theirs] = True
    if int(np.count_nonzero(seen)) != theirs.size:
        raise ValueError(f"reference {name!r} scores a pair more than once")
    del seen
    table = np.zeros(cells, dtype=np.float64)
    table[theirs] = np.where(np.isnan(values), 0.0, values)
    del theirs, values
    ours = rows.astype(np.int64)
    del rows
    ours *= n_products
    ours += _product_columns(candidates["product_code"], products)
    return np.asarray(table[ours], dtype=np.float64)


def _product_columns(codes: pd.Series, products: pd.Index) -> npt.NDArray[np.int64]:
    """Position of each code (as text) among ``products``, -1 if absent; each distinct
    code is looked up once."""
    found, uniques = pd.factorize(codes)
    column = products.get_indexer([str(code) for code in uniques]).astype(np.int64)
    return np.asarray(np.append(column, -1)[found], dtype=np.int64)


def _positions_in(values: pd.Series, uniques: pd.Index) -> npt.NDArray[np.int64]:
    """Position of each value among ``uniques`` (-1 if absent), through Arrow's hash
    lookup: pandas' would first turn millions of text ids into Python strings. Values
    that are categorical are looked up once per category."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        found = np.append(_positions_in(pd.Series(values.cat.categories), uniques), -1)
        return np.asarray(found[codes], dtype=np.int64)  # code -1 (missing): -1
    value_set = pa.array(uniques)
    found = pc.index_in(pa.array(values).cast(value_set.type), value_set=value_set)
    return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def truth_reference(bank_dir: str | Path) -> ReferenceScorer:
    """The oracle of a synthetic bank: each pair scored by its true propensity.

    Parameters
    ----------
    bank_dir : str or pathlib.Path
        A folder written by :func:`models.synthetic.write_bank` (its ``truth/`` is
        read here, its ``customers`` and ``adoptions`` files at each score).

    Returns
    -------
    ReferenceScorer
        Scores candidates by the probability, under the generator's own hazard model, of
        adopting within the horizon from the state the day before the cutoff (features
        see only what happened strictly before the cutoff, the same information),
        declined offers included when the bank has an offer history.

    Raises
    ------
    FileNotFoundError
        If the folder holds no ground truth, customers or adoptions.
    """
    folder = Path(bank_dir)
    truth, personas = read_truth(folder)
    for name in ("customers", "adoptions"):
        _table_path(folder, name)  # missing files are an error now, not after training

    def score(cutoff: dt.date, horizon_days: int, candidates: pd.DataFrame) -> pd.DataFrame:
        # The bank's tables are read at each score, not here and not kept: a holdout
        # trains its model before it scores, and a large bank's copy held meanwhile
        # (or afterwards, with the holdout's frames) would add to the peak memory.
        customers, adoptions = _read_table(folder, "customers"), _read_table(folder, "adoptions")
        try:
            outcomes: pd.DataFrame | None = _read_table(folder, "outcomes")
        except FileNotFoundError:
            outcomes = None
        try:
            probabilities = true_propensities(
                truth,
                customers,
                adoptions,
                personas,
                as_of=cutoff - dt.timedelta(days=1),
                horizon_days=horizon_days,
                outcomes=outcomes,
                customer_ids="categorical",
            )
        except ValueError as exc:
            raise ValueError(f"the synthetic bank in {folder}: {exc}") from exc
        # Customer ids and product codes stay categorical: the reference is joined on
        # its pairs' codes, and ids as text would be millions of strings for a moment.
        return probabilities.rename(columns={"probability": "score"})

    return score


def _read_table(folder: Path, name: str) -> pd.DataFrame:
    path = _table_path(folder, name)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _table_path(folder: Path, name: str) -> Path:
    for suffix in (".parquet", ".csv", ".csv.gz"):
        path = folder / f"{name}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"{folder}: no {name}.parquet, {name}.csv or {name}.csv.gz")


@dataclass(frozen=True)
class ReportInputs:
    """The frames :func:`models.evaluation_report.write_report` draws, for one holdout."""

    products: pd.DataFrame
    calibration: dict[str, pd.DataFrame]
    gains: dict[str, pd.DataFrame]
    rules: pd.DataFrame | None
    """The rules worth saying (:func:`models.rules.rules_for_display`), best first."""
    importance: pd.DataFrame
    rules_left_out: int = 0
    """Mined rules not in ``rules``: lift 1 or below, or too few customers."""


def report_inputs(result: HoldoutResult) -> ReportInputs:
    """Per-product metrics of the served blend, calibration and gains per model, rules
    and feature importance of the holdout model."""
    blend = result.ranked["blend"]
    products = product_metrics(blend, result.actual)
    calibration: dict[str, pd.DataFrame] = {}
    gains: dict[str, pd.DataFrame] = {}
    for name, scores in result.ranked.items():
        labelled = label_pairs(scores, result.actual)
        gains[name] = gains_table(labelled["score"], labelled["label"])
        if name in ("blend", "lightgbm", "oracle"):
            calibration[name] = calibration_table(labelled["score"], labelled["label"])
    rules, left_out = None, 0
    if result.model.rules is not None:
        said, left_out = rules_for_display(result.model.rules)
        rules = RuleSet(said, result.model.rules.mode, result.model.rules.params).to_frame()
    per_product = result.model.feature_importance()
    total = per_product.groupby("label", sort=False)["gain"].sum()
    importance = (
        (total / max(float(total.sum()), 1e-12))
        .rename("importance")
        .rename_axis("feature")
        .reset_index()
        .sort_values("importance", ascending=False, kind="stable")
        .reset_index(drop=True)
    )
    return ReportInputs(products, calibration, gains, rules, importance, left_out)
