"""Offline evaluation of next-best-offer rankings and propensity scores.

Every function takes plain frames or arrays and returns a DataFrame, so results drop
straight into a report (:mod:`models.evaluation_report`) or a notebook.

Contracts
---------
Scores frame
    Columns ``customer_id``, ``product_code``, ``score``: a model's score for each
    candidate pair, one row per pair. Candidates are the products a customer did not
    hold at the cutoff and was eligible for. Scores must not be missing (NaN); ``-inf``
    is allowed and ranks last. Product codes are compared as strings.
Actual frame
    Columns ``customer_id``, ``product_code``: the products each customer adopted in the
    evaluation window after the cutoff. Repeated rows count once. The functions here
    restrict it to the candidate pairs themselves, so callers may pass every adoption in
    the window: an adoption that is not a candidate (a product already held, or one the
    customer was not eligible for) could never have been recommended, so it counts
    neither for nor against any model.
Ranking
    Within a customer, candidates are ranked by score, highest first; equal scores are
    ranked by product code (ascending string order). The same input therefore always
    gives the same ranking, whatever the row order.
Evaluated customers
    Ranking metrics are averaged over the customers who adopted at least one of their
    candidate products in the window. Customers who adopted nothing have no right
    answer and are left out (they would score 0 under every model and only dilute the
    comparison); their number is not part of the average, but the number of customers
    evaluated is reported with every result.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.errors import TooLittleData
from models.sequences import DateLike, to_timestamp

__all__ = [
    "CandidatePairs",
    "GAINS_COLUMNS",
    "PRODUCT_COLUMNS",
    "RANKING_COLUMNS",
    "calibration_table",
    "compare",
    "expected_calibration_error",
    "gains_table",
    "label_pairs",
    "oracle_scores",
    "popularity_scores",
    "product_codes",
    "product_metrics",
    "ranking_metrics",
    "roc_auc",
]

RANKING_COLUMNS: Final[tuple[str, ...]] = (
    "k",
    "map",
    "precision",
    "recall",
    "ndcg",
    "hit_rate",
    "n_customers",
)
"""Columns of :func:`ranking_metrics`'s result, in order."""

PRODUCT_COLUMNS: Final[tuple[str, ...]] = (
    "product_code",
    "n_candidates",
    "n_positive",
    "base_rate",
    "auc",
    "pr_auc",
    "brier",
    "mean_predicted",
)
"""Columns of :func:`product_metrics`'s result, in order."""

CALIBRATION_COLUMNS: Final[tuple[str, ...]] = (
    "bin",
    "lower",
    "upper",
    "count",
    "mean_predicted",
    "observed_rate",
)
"""Columns of :func:`calibration_table`'s result, in order."""

GAINS_COLUMNS: Final[tuple[str, ...]] = (
    "group",
    "n",
    "min_score",
    "max_score",
    "positives",
    "rate",
    "lift",
    "cum_n",
    "cum_share",
    "cum_positives",
    "cum_gain",
    "cum_lift",
)
"""Columns of :func:`gains_table`'s result, in order."""

_PAIR: Final[tuple[str, str]] = ("customer_id", "product_code")
_SCORED: Final[tuple[str, str, str]] = ("customer_id", "product_code", "score")
_COMPARE_METRICS: Final[tuple[tuple[str, str], ...]] = (
    ("map", "MAP"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("ndcg", "NDCG"),
    ("hit_rate", "hit"),
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------- ranking


def ranking_metrics(
    scores: pd.DataFrame,
    actual: pd.DataFrame,
    *,
    ks: Sequence[int] = (1, 3, 5),
    candidates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Top-k ranking quality of one model's scores against the adoptions that followed.

    For a customer with relevant set ``R`` (adopted candidates, ``|R| >= 1``), ranked
    list ``r_1, r_2, ...`` (see the module contract) and ``rel(i) = 1`` if ``r_i`` is in
    ``R``, else 0; ``hits@k = sum_{i<=k} rel(i)`` and ``P(i) = hits@i / i``:

    - ``precision@k = hits@k / k`` (divided by ``k`` even when the customer has fewer
      than ``k`` candidates);
    - ``recall@k = hits@k / |R|``;
    - ``AP@k = sum_{i<=k} P(i) * rel(i) / min(k, |R|)`` (MAP@k is its mean, as in the
      Kaggle Santander product recommendation competition);
    - ``NDCG@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{i<=k} rel(i) / log2(i + 1)`` and
      ``IDCG@k`` the DCG of ``min(k, |R|)`` relevant items ranked first;
    - ``hit@k = 1`` if ``hits@k >= 1``, else 0.

    Each is averaged over the evaluated customers (module contract).

    Parameters
    ----------
    scores : pandas.DataFrame
        Scores frame (module contract).
    actual : pandas.DataFrame
        Actual frame: adoptions in the evaluation window. Pairs that are not candidates
        are ignored.
    ks : sequence of int, default (1, 3, 5)
        Cut-offs, each a positive integer; one result row per cut-off, in this order.
    candidates : pandas.DataFrame, optional
        The candidate pairs (``customer_id``, ``product_code``). Default: the pairs in
        ``scores``. Candidates the model did not score rank after every scored one (as
        if scored ``-inf``), so models that score different subsets are still judged on
        the same customers and the same relevant products.

    Returns
    -------
    pandas.DataFrame
        One row per ``k``, columns :data:`RANKING_COLUMNS`; ``n_customers`` is the
        number of evaluated customers (the same on every row).

    Raises
    ------
    ValueError
        On missing columns, empty ``scores``, missing scores, repeated pairs in
        ``scores``, scored pairs outside ``candidates``, invalid ``ks``, or when no
        customer adopted a candidate product (the metrics are then undefined).
    """
    cutoffs = _validated_ks(ks)
    frames = [scores] if candidates is None else [candidates, scores]
    space = _PairSpace.of(frames)
    universe = space.unique_keys(candidates if candidates is not None else scores, "candidates")
    score = _scores_on(universe, space, scores, "scores")
    relevant = _relevant_on(universe, space, actual)
    return _ranking(universe, space.n_products, score, relevant, cutoffs)


def compare(
    models: Mapping[str, pd.DataFrame],
    actual: pd.DataFrame,
    *,
    ks: Sequence[int] = (1, 3, 5),
    baseline: str = "popularity",
    pairs: CandidatePairs | None = None,
    visit: Callable[[str, FloatArray, BoolArray], None] | None = None,
) -> pd.DataFrame:
    """Compare several models' rankings on the same customers, one row per model.

    The candidates are the union of the pairs any model scored; each model's unscored
    candidates rank last for that model (see :func:`ranking_metrics`), so every row
    averages over exactly the same customers and relevant products.

    Parameters
    ----------
    models : mapping of str to pandas.DataFrame
        Model name to its scores frame, e.g. ``popularity``, ``rules``, ``lightgbm``,
        ``blend``, ``oracle``; rows keep this order.
    actual : pandas.DataFrame
        Actual frame: adoptions in the evaluation window.
    ks : sequence of int, default (1, 3, 5)
        Cut-offs.
    baseline : str, default "popularity"
        The model the ratio column compares against.
    pairs : CandidatePairs, optional
        ``CandidatePairs.of(list(models.values()), actual)``, when the caller has it
        already (default: built here).
    visit : callable, optional
        ``visit(name, score, scored)``, called for each model in turn with its scores
        on ``pairs.universe`` (``-inf`` where unscored) and which of them it scored:
        for other metrics of the same arrays (per product, say) while they are at
        hand, so no frame is read twice.

    Returns
    -------
    pandas.DataFrame
        Indexed by model name (index name ``model``). Columns ``MAP@k`` for every ``k``,
        then ``precision@k``, ``recall@k``, ``NDCG@k`` and ``hit@k`` likewise; then
        ``n_customers`` (evaluated customers, equal for all rows), ``coverage`` (share
        of candidate pairs the model scored) and, when ``baseline`` is among the models,
        ``MAP@k/<baseline>``: the model's MAP@k over the baseline's, for ``k = 3`` if
        3 is among ``ks``, else the largest ``k`` (NaN when the baseline's MAP is 0).

    Raises
    ------
    ValueError
        If ``models`` is empty, or as :func:`ranking_metrics`.
    """
    if not models:
        raise ValueError("models is empty: nothing to compare")
    cutoffs = _validated_ks(ks)
    if pairs is None:
        pairs = CandidatePairs.of(list(models.values()), actual, names=list(models))

    rows: dict[str, dict[str, float]] = {}
    for name, frame in models.items():
        score, scored = pairs.scores(frame, f"models[{name!r}]")
        table = pairs.ranking(score, cutoffs)
        if visit is not None:
            visit(name, score, scored)
        del score, scored
        row: dict[str, float] = {}
        for column, label in _COMPARE_METRICS:
            for k, value in zip(table["k"], table[column], strict=True):
                row[f"{label}@{k}"] = float(value)
        row["n_customers"] = int(table["n_customers"].iloc[0])
        row["coverage"] = len(frame) / len(pairs.universe)
        rows[name] = row
    result = pd.DataFrame.from_dict(rows, orient="index")
    result.index.name = "model"
    result["n_customers"] = result["n_customers"].astype("int64")

    if baseline in rows:
        k = 3 if 3 in cutoffs else max(cutoffs)
        reference = rows[baseline][f"MAP@{k}"]
        ratio = result[f"MAP@{k}"] / reference if reference > 0 else np.nan
        result[f"MAP@{k}/{baseline}"] = ratio
    return result


_CHUNK_PAIRS: Final[int] = 1_000_000
"""Pairs the ranking metrics work on at once: a chunk of whole customers (the metrics
are per customer, then averaged), so their working arrays stay a few tens of MB
whatever the number of candidates."""


def _ranking(
    universe: IntArray,
    n_products: int,
    score: FloatArray,
    relevant: BoolArray,
    ks: tuple[int, ...],
) -> pd.DataFrame:
    """Ranking metrics of pairs ``universe`` (sorted keys) scored ``score``.

    Computed for whole customers at a time (:data:`_CHUNK_PAIRS`): every metric is a
    mean over customers, and the per-customer values are gathered in customer order and
    averaged once, so the result is the same, to the bit, as in one pass.
    """
    parts = [
        _per_customer(universe[a:b], n_products, score[a:b], relevant[a:b], ks)
        for a, b in _customer_chunks(universe, n_products)
    ]
    size = np.concatenate([part[1] for part in parts]) if parts else np.empty(0, np.int64)
    n_evaluated = int(size.size)
    if n_evaluated == 0:
        raise ValueError(
            "no customer adopted any of their candidate products in actual: "
            "ranking metrics are undefined"
        )
    records = []
    for i, k in enumerate(ks):
        hits, average_precision, ndcg = (
            np.concatenate([part[2][i][m] for part in parts]) for m in range(3)
        )
        records.append(
            {
                "k": k,
                "map": float(average_precision.mean()),
                "precision": float((hits / k).mean()),
                "recall": float((hits / size).mean()),
                "ndcg": float(ndcg.mean()),
                "hit_rate": float((hits > 0).mean()),
                "n_customers": n_evaluated,
            }
        )
    return pd.DataFrame.from_records(records, columns=list(RANKING_COLUMNS))


def _customer_chunks(universe: IntArray, n_products: int) -> list[tuple[int, int]]:
    """``[a, b)`` slices of the sorted ``universe``, each whole customers, at most
    :data:`_CHUNK_PAIRS` pairs (a customer has at most ``n_products``)."""
    if universe.size == 0:
        return []
    step = max(1, _CHUNK_PAIRS // max(n_products, 1))
    last = int(universe[-1]) // n_products
    starts = np.arange(0, last + step + 1, step, dtype=np.int64) * n_products
    bounds = np.unique(np.searchsorted(universe, starts))
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds.tolist()) if b > a]


def _per_customer(
    universe: IntArray,
    n_products: int,
    score: FloatArray,
    relevant: BoolArray,
    ks: tuple[int, ...],
) -> tuple[IntArray, IntArray, list[tuple[FloatArray, FloatArray, FloatArray]]]:
    """For the evaluated customers of ``universe`` (whole customers, sorted keys), in
    customer order: their positions, their numbers of relevant pairs, and per ``k`` the
    hits, average precision and NDCG at ``k``."""
    customer = universe // n_products
    # The universe is sorted by customer, then product position (= product code order),
    # and lexsort is stable, so equal scores stay in product code order.
    order = np.lexsort((-score, customer))
    customer = customer[order]
    rel = relevant[order]
    n = len(customer)
    starts = np.flatnonzero(np.r_[True, customer[1:] != customer[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    rank = np.arange(n) - np.repeat(starts, sizes)  # 0-based position in the customer's list

    n_relevant = np.bincount(group, weights=rel, minlength=len(starts))
    evaluated = n_relevant > 0
    cum_relevant = np.cumsum(rel)
    hits_so_far: IntArray = cum_relevant - np.repeat(cum_relevant[starts] - rel[starts], sizes)
    precision_at_i = hits_so_far / (rank + 1)
    discount = 1.0 / np.log2(rank + 2.0)
    ideal = np.cumsum(1.0 / np.log2(np.arange(max(ks)) + 2.0))
    size = n_relevant[evaluated].astype(np.int64)

    def per_customer(values: FloatArray, mask: BoolArray) -> FloatArray:
        """Sum of ``values`` over the masked positions of each evaluated customer."""
        summed = np.bincount(group, weights=np.where(mask, values, 0.0), minlength=len(starts))
        return np.asarray(summed[evaluated], dtype=np.float64)

    out = []
    for k in ks:
        top = rel & (rank < k)
        hits = per_customer(np.ones(n), top)
        average_precision = per_customer(precision_at_i, top) / np.minimum(k, size)
        ndcg = per_customer(discount, top) / ideal[np.minimum(k, size) - 1]
        out.append((hits, average_precision, ndcg))
    return customer[starts][evaluated], size, out


# --------------------------------------------------------------------------- per product


def product_metrics(scores: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Per-product discrimination and calibration of scores against adoptions.

    Parameters
    ----------
    scores : pandas.DataFrame
        Scores frame (module contract).
    labels : pandas.DataFrame
        The positive pairs (``customer_id``, ``product_code``): the adoptions in the
        window, like ``actual`` in :func:`ranking_metrics`. Every scored pair not listed
        is a negative; listed pairs that were not scored are ignored. If ``labels`` has
        a ``label`` column (0/1), only its rows with label 1 are positives.

    Returns
    -------
    pandas.DataFrame
        One row per product, sorted by product code, columns :data:`PRODUCT_COLUMNS`:
        ``n_candidates`` scored pairs, ``n_positive`` of them adopted, ``base_rate``
        their ratio; ``auc`` the ROC AUC (probability that a random adopter outscores a
        random non-adopter, ties counting one half; NaN if the product has no adopter
        or no non-adopter); ``pr_auc`` the average precision
        ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (scikit-learn's
        definition; NaN without adopters); ``brier`` the mean of
        ``(score - label) ** 2`` (NaN if a score of the product lies outside [0, 1],
        since the scores are then not probabilities); ``mean_predicted`` the mean score.

    Raises
    ------
    ValueError
        On missing columns, empty or missing scores, repeated pairs, or labels other
        than 0/1.
    """
    frame = _scores_frame(scores, "scores")
    label = _labels_for(frame, labels)
    score = frame["score"].to_numpy(dtype=np.float64)
    codes, products = product_codes(frame["product_code"])
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(products) + 1))
    records = []
    for j, product in enumerate(products):
        rows = order[bounds[j] : bounds[j + 1]]
        s, y = score[rows], label[rows]
        positives = int(y.sum())
        probabilities = bool(np.all((s >= 0.0) & (s <= 1.0)))
        records.append(
            {
                "product_code": str(product),
                "n_candidates": len(rows),
                "n_positive": positives,
                "base_rate": positives / len(rows),
                "auc": roc_auc(s, y),
                "pr_auc": _average_precision(s, y),
                "brier": float(np.mean((s - y) ** 2)) if probabilities else np.nan,
                "mean_predicted": float(s.mean()),
            }
        )
    return pd.DataFrame.from_records(records, columns=list(PRODUCT_COLUMNS))


def label_pairs(scores: pd.DataFrame, actual: pd.DataFrame) -> pd.DataFrame:
    """Scores with a 0/1 ``label`` column: 1 if the pair was adopted in the window.

    Parameters
    ----------
    scores : pandas.DataFrame
        Scores frame (module contract).
    actual : pandas.DataFrame
        Positive pairs, as ``labels`` in :func:`product_metrics`.

    Returns
    -------
    pandas.DataFrame
        ``customer_id``, ``product_code``, ``score``, ``label`` (int8), in the row order
        of ``scores``; feed ``score`` and ``label`` to :func:`calibration_table` or
        :func:`gains_table`.
    """
    frame = _scores_frame(scores, "scores")
    result = frame.loc[:, list(_SCORED)].copy()
    result["label"] = _labels_for(frame, actual).astype(np.int8)
    return result


def oracle_scores(candidates: pd.DataFrame, actual: pd.DataFrame) -> pd.DataFrame:
    """Scores that know the future: 1 for adopted candidates, 0 for the others.

    The oracle is the ceiling of any ranking: it has MAP@k, NDCG@k and hit@k of 1 on
    every evaluated customer.

    Parameters
    ----------
    candidates : pandas.DataFrame
        Candidate pairs (``customer_id``, ``product_code``).
    actual : pandas.DataFrame
        Adoptions in the evaluation window.

    Returns
    -------
    pandas.DataFrame
        Scores frame over ``candidates``, in their row order.
    """
    frame = _required(candidates, _PAIR, "candidates").loc[:, list(_PAIR)].copy()
    frame["score"] = _labels_for(frame, actual).astype(np.float64)
    return frame


def roc_auc(score: FloatArray, label: BoolArray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, average ranks for ties.

    Parameters
    ----------
    score : numpy.ndarray
        float64 scores.
    label : numpy.ndarray
        bool outcomes, aligned with ``score``.

    Returns
    -------
    float
        The probability that a random positive outscores a random negative (ties count
        one half); NaN without positives or without negatives. The row order does not
        matter: ranks are half-integers and their sum is exact.
    """
    positives = int(label.sum())
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(score).rank(method="average").to_numpy()
    rank_sum = float(ranks[label].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _average_precision(score: FloatArray, label: BoolArray) -> float:
    """Average precision, one step per distinct score (as scikit-learn computes it)."""
    positives = int(label.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-score, kind="stable")
    ordered = score[order]
    last_of_threshold = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    true_positives = np.cumsum(label[order])[last_of_threshold]
    precision = true_positives / (last_of_threshold + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# --------------------------------------------------------------------------- calibration


def calibration_table(
    probabilities: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    bins: int = 10,
    strategy: Literal["quantile", "uniform"] = "quantile",
) -> pd.DataFrame:
    """Reliability table: predicted probability against observed rate, per bin.

    Parameters
    ----------
    probabilities : array-like of float
        Predicted probabilities, each in [0, 1].
    labels : array-like of {0, 1} or bool
        Outcomes, aligned with ``probabilities``.
    bins : int, default 10
        Number of bins asked for.
    strategy : {"quantile", "uniform"}, default "quantile"
        ``quantile``: edges at the quantiles of ``probabilities`` (equal counts; edges
        that coincide because of ties are merged, so fewer bins may come back).
        ``uniform``: ``bins`` equal-width bins over [0, 1]; empty bins are left out.
        Bins are ``[lower, upper)``, the last one closed.

    Returns
    -------
    pandas.DataFrame
        One row per non-empty bin, columns ``bin`` (1-based), ``lower``, ``upper``,
        ``count``, ``mean_predicted``, ``observed_rate``. ``attrs["ece"]`` holds the
        expected calibration error (see :func:`expected_calibration_error`).

    Raises
    ------
    ValueError
        On empty or misaligned inputs, missing values, probabilities outside [0, 1],
        labels other than 0/1, ``bins < 1`` or an unknown strategy.
    """
    p = _float_array(probabilities, "probabilities")
    y = _binary_array(labels, "labels", len(p))
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probabilities must lie in [0, 1]")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, bins + 1)))
        if len(edges) == 1:
            edges = np.repeat(edges, 2)
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, bins + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    n_bins = len(edges) - 1
    index = np.searchsorted(edges[1:-1], p, side="right")
    count = np.bincount(index, minlength=n_bins)
    predicted = np.bincount(index, weights=p, minlength=n_bins)
    observed = np.bincount(index, weights=y, minlength=n_bins)
    used = count > 0
    table = pd.DataFrame(
        {
            "bin": np.arange(1, n_bins + 1)[used],
            "lower": edges[:-1][used],
            "upper": edges[1:][used],
            "count": count[used].astype(np.int64),
            "mean_predicted": predicted[used] / count[used],
            "observed_rate": observed[used] / count[used],
        },
        columns=list(CALIBRATION_COLUMNS),
    )
    table.attrs["ece"] = expected_calibration_error(table)
    return table


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Expected calibration error of a :func:`calibration_table`.

    ``ECE = sum_b (count_b / N) * |observed_rate_b - mean_predicted_b|``: the mean gap,
    in probability points, between what was predicted and what happened.

    Parameters
    ----------
    table : pandas.DataFrame
        With columns ``count``, ``mean_predicted`` and ``observed_rate``.

    Returns
    -------
    float
        The error, in [0, 1].
    """
    count = table["count"].to_numpy(dtype=np.float64)
    if count.sum() <= 0:
        raise ValueError("calibration table is empty")
    gap = np.abs(table["observed_rate"].to_numpy(float) - table["mean_predicted"].to_numpy(float))
    return float(np.sum(count * gap) / count.sum())


# --------------------------------------------------------------------------- gains


def gains_table(scores: npt.ArrayLike, labels: npt.ArrayLike, *, groups: int = 10) -> pd.DataFrame:
    """Cumulative gains and lift by score group (deciles by default).

    Pairs are sorted by score, highest first, and cut into ``groups`` groups of equal
    size (sizes differ by at most one: group ``g`` holds positions
    ``[floor((g - 1) n / groups), floor(g n / groups))``). Pairs with equal scores have
    no order between them, so each counts as the mean label of its tie block: the table
    is the expected one under a random order of ties, never one that flatters or
    penalises a model for how ties happened to be broken.

    Parameters
    ----------
    scores : array-like of float
        Scores; any scale, only their order matters.
    labels : array-like of {0, 1} or bool
        Outcomes, aligned with ``scores``.
    groups : int, default 10
        Number of groups.

    Returns
    -------
    pandas.DataFrame
        One row per group, best scores first, columns :data:`GAINS_COLUMNS`:
        ``positives`` (expected, so possibly fractional) and ``rate`` in the group;
        ``lift = rate / overall rate``; ``cum_share`` the share of all pairs in groups
        up to this one, ``cum_gain`` the share of all positives they hold, and
        ``cum_lift = cum_gain / cum_share``. A random ranking has ``cum_gain`` equal to
        ``cum_share`` and every lift 1.

    Raises
    ------
    ValueError
        On empty or misaligned inputs, missing scores, labels other than 0/1, fewer
        pairs than groups, or no positive label (gains are then undefined).
    """
    s = _float_array(scores, "scores")
    y = _binary_array(labels, "labels", len(s)).astype(np.float64)
    n = len(s)
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    if n < groups:
        raise ValueError(f"need at least {groups} scores for {groups} groups, got {n}")
    total = float(y.sum())
    if total == 0:
        raise ValueError("labels has no positive: gains and lift are undefined")

    order = np.argsort(-s, kind="stable")
    ordered = s[order]
    block = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    expected = (np.bincount(block, weights=y[order]) / np.bincount(block))[block]

    bounds = (np.arange(groups + 1) * n) // groups
    group = np.repeat(np.arange(groups), np.diff(bounds))
    size = np.diff(bounds).astype(np.int64)
    positives = np.bincount(group, weights=expected, minlength=groups)
    overall = total / n
    cum_n = np.cumsum(size)
    cum_positives = np.cumsum(positives)
    cum_share = cum_n / n
    cum_gain = cum_positives / total
    rate = positives / size
    return pd.DataFrame(
        {
            "group": np.arange(1, groups + 1),
            "n": size,
            "min_score": ordered[bounds[1:] - 1],
            "max_score": ordered[bounds[:-1]],
            "positives": positives,
            "rate": rate,
            "lift": rate / overall,
            "cum_n": cum_n,
            "cum_share": cum_share,
            "cum_positives": cum_positives,
            "cum_gain": cum_gain,
            "cum_lift": cum_gain / cum_share,
        },
        columns=list(GAINS_COLUMNS),
    )


# --------------------------------------------------------------------------- baselines


def popularity_scores(
    train_adoptions: pd.DataFrame,
    candidates: pd.DataFrame,
    *,
    as_of: DateLike,
    window_days: int,
) -> pd.DataFrame:
    """The popularity baseline: each product's recent adoption rate, for every candidate.

    With ``start = as_of - window_days`` days, a product's rate is

    ``customers whose first adoption of it is in [start, as_of)``
    ``/ customers who had not adopted it before start``,

    counting the customers with at least one adoption before ``as_of``. Only adoptions
    strictly before ``as_of`` are read (the cutoff rule of :mod:`models.sequences`), so
    the baseline never sees the evaluation window. Every candidate pair of a product
    gets the product's rate; products without adoptions in the window get 0 and are
    ranked by product code among themselves.

    Parameters
    ----------
    train_adoptions : pandas.DataFrame
        Adoptions frame (``customer_id``, ``product_code``, ``adopted_at``), as in
        :mod:`models.sequences`.
    candidates : pandas.DataFrame
        Candidate pairs (``customer_id``, ``product_code``).
    as_of : date-like
        The cutoff.
    window_days : int
        Length of the window before the cutoff, in days.

    Returns
    -------
    pandas.DataFrame
        Scores frame over ``candidates``, in their row order.

    Raises
    ------
    ValueError
        On missing columns or dates, or ``window_days < 1``; :class:`TooLittleData` (a
        ``ValueError``) when no adoption comes before ``as_of``.
    """
    if window_days < 1:
        raise ValueError(f"window_days must be at least 1, got {window_days}")
    frame = _required(candidates, _PAIR, "candidates").loc[:, list(_PAIR)].copy()
    adoptions = _required(train_adoptions, (*_PAIR, "adopted_at"), "train_adoptions")
    cutoff = to_timestamp(as_of)
    start = cutoff - pd.Timedelta(days=window_days)
    adopted_at = _naive_datetimes(adoptions["adopted_at"], "train_adoptions.adopted_at")
    seen = (adopted_at < cutoff).to_numpy()
    if not seen.any():
        raise TooLittleData(f"train_adoptions has no adoption before {cutoff}")
    history = pd.DataFrame(
        {
            "customer_id": adoptions["customer_id"].to_numpy()[seen],
            "product_code": adoptions["product_code"].astype(str).to_numpy()[seen],
            "adopted_at": adopted_at.to_numpy()[seen],
        }
    )
    first = history.groupby(list(_PAIR), sort=False)["adopted_at"].min().reset_index()
    population = history["customer_id"].nunique()
    in_window = first["adopted_at"] >= start
    adopters = first.loc[in_window].groupby("product_code").size()
    before = first.loc[~in_window].groupby("product_code").size()
    at_risk = (population - before.reindex(adopters.index, fill_value=0)).astype(np.float64)
    rate = (adopters / at_risk).astype(np.float64)
    frame["score"] = _by_product(frame["product_code"], rate)
    return frame


def product_codes(values: pd.Series) -> tuple[IntArray, list[str]]:
    """Each row's product as a position among the distinct codes (as text, sorted), and
    those codes: what ``pd.factorize(values.astype(str), sort=True)`` gives, without
    turning a column of millions of pairs into as many strings first (at a million
    customers that copy, a few hundred MB for a moment, was the peak of ``nbo train``).

    A missing code (scores and labels are validated before, so none should come) is the
    text ``"nan"``.
    """
    found, uniques = pd.factorize(values, use_na_sentinel=False)
    text = [str(code) for code in uniques]
    position, products = pd.factorize(pd.Index(text, dtype=object), sort=True)
    return np.asarray(position, dtype=np.int64)[found], [str(p) for p in products]


def _by_product(codes: pd.Series, values: pd.Series) -> FloatArray:
    """``values[str(code)]`` for each code (0 where absent), looked up once per distinct
    code: a column of millions of candidate pairs names a few dozen products."""
    found, uniques = pd.factorize(codes)
    lookup = (
        pd.Series([str(code) for code in uniques], dtype=object)
        .map(values)
        .fillna(0.0)
        .to_numpy(np.float64)
    )
    return np.asarray(np.append(lookup, 0.0)[found], dtype=np.float64)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _PairSpace:
    """Integer keys for (customer, product) pairs: ``customer * n_products + product``.

    Product positions follow sorted product codes, so ordering keys by product
    position orders them by product code.
    """

    customers: pd.Index
    products: pd.Index

    @classmethod
    def of(cls, frames: Sequence[pd.DataFrame]) -> _PairSpace:
        """The space spanned by the customers and products of ``frames``."""
        for frame in frames:
            _required(frame, _PAIR, "frame")
        distinct = [frames[i] for i in _distinct_pairs(frames)]
        customers = [pd.unique(f["customer_id"]) for f in distinct]
        products = {str(code) for f in distinct for code in pd.unique(f["product_code"])}
        return cls(
            customers=pd.Index(pd.unique(np.concatenate([np.asarray(c) for c in customers]))),
            products=pd.Index(sorted(products), dtype=object),
        )

    @property
    def n_products(self) -> int:
        return len(self.products)

    def keys(self, frame: pd.DataFrame, name: str) -> IntArray:
        """Key of each row of ``frame`` (-1 if its customer or product is unknown).

        Each column is factorised first, so only its distinct values are looked up.
        """
        pairs = _required(frame, _PAIR, name)
        codes, uniques = pd.factorize(pairs["customer_id"])
        product_codes, product_uniques = pd.factorize(pairs["product_code"])
        if (codes < 0).any() or (product_codes < 0).any():
            raise ValueError(f"{name} has missing customer_id or product_code values")
        customer = self.customers.get_indexer(uniques).astype(np.int64)[codes]
        product = self.products.get_indexer([str(code) for code in product_uniques])
        product = product.astype(np.int64)[product_codes]
        known = (customer >= 0) & (product >= 0)
        return np.where(known, customer * self.n_products + product, -1)

    def unique_keys(self, frame: pd.DataFrame, name: str) -> IntArray:
        """Sorted keys of ``frame``'s pairs; error on an empty frame."""
        if len(frame) == 0:
            raise ValueError(f"{name} is empty")
        return _sorted_unique(self.keys(frame, name))


def _sorted_unique(keys: IntArray) -> IntArray:
    """Sorted distinct keys (a plain sort beats numpy.unique's hashing on int64 keys)."""
    ordered = np.sort(keys)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]]


def _scores_on(
    universe: IntArray, space: _PairSpace, scores: pd.DataFrame, name: str
) -> FloatArray:
    """Scores placed on the sorted ``universe`` keys; unscored pairs get ``-inf``."""
    frame = _scores_frame(scores, name)
    keys = space.keys(frame, name)
    position = np.searchsorted(universe, keys)
    inside = (position < len(universe)) & (
        universe[np.minimum(position, len(universe) - 1)] == keys
    )
    if not inside.all():
        raise ValueError(f"{name} scores {int((~inside).sum())} pair(s) that are not candidates")
    _check_once(position, len(universe), name)
    score = np.full(len(universe), -np.inf)
    score[position] = frame["score"].to_numpy(dtype=np.float64)
    return score


def _check_once(position: IntArray, n: int, name: str) -> None:
    """Error if two rows sit on the same pair (positions in a universe of ``n``)."""
    taken = np.zeros(n, dtype=bool)
    taken[position] = True
    if int(np.count_nonzero(taken)) != len(position):
        raise ValueError(f"{name} has repeated (customer_id, product_code) pairs")


def _same_pairs(frame: pd.DataFrame, other: pd.DataFrame) -> bool:
    """Whether two frames hold the same pairs in the same rows (e.g. models scored on
    one candidate frame): a comparison of the columns, far cheaper than reading their
    text ids again, and nearly free when they share their arrays."""
    if frame is other:
        return True
    if len(frame) != len(other):
        return False
    return all(frame[column].array.equals(other[column].array) for column in _PAIR)


def _distinct_pairs(frames: Sequence[pd.DataFrame]) -> list[int]:
    """Positions of the frames whose pairs differ from every earlier frame's."""
    distinct: list[int] = []
    for i, frame in enumerate(frames):
        if not any(_same_pairs(frame, frames[j]) for j in distinct):
            distinct.append(i)
    return distinct


@dataclass(frozen=True, eq=False)
class CandidatePairs:
    """The candidate pairs of several scores frames, as sorted integer keys.

    Built once for a comparison of models: each frame's text ids are read once (frames
    that hold the same pairs, as models scored on one candidate frame do, only once in
    all), and every model's scores, the relevant pairs and the per-product rows are
    arrays over the same sorted pairs.

    Attributes
    ----------
    space : _PairSpace
        Customer and product positions of the pairs.
    universe : numpy.ndarray
        int64 sorted keys ``customer * n_products + product``: the union of the
        frames' pairs.
    relevant : numpy.ndarray
        bool per pair of ``universe``: adopted in the window (in ``actual``).
    """

    space: _PairSpace
    universe: IntArray
    relevant: BoolArray
    _positions: list[tuple[pd.DataFrame, IntArray]] = field(repr=False)

    @classmethod
    def of(
        cls,
        frames: Sequence[pd.DataFrame],
        actual: pd.DataFrame,
        *,
        names: Sequence[str] | None = None,
    ) -> CandidatePairs:
        """The union of the pairs of ``frames`` (each with ``customer_id`` and
        ``product_code``) and which of them ``actual`` holds.

        Parameters
        ----------
        frames : sequence of pandas.DataFrame
            Scores or candidate frames.
        actual : pandas.DataFrame
            Actual frame (module contract).
        names : sequence of str, optional
            The frames' names, for error messages (default ``frames[i]``).
        """
        labels = list(names) if names is not None else [f"frames[{i}]" for i in range(len(frames))]
        space = _PairSpace.of(frames)
        distinct = _distinct_pairs(frames)
        keys = [space.keys(frames[i], labels[i]) for i in distinct]
        universe = _sorted_unique(np.concatenate(keys)) if keys else np.empty(0, np.int64)
        positions = [
            (frames[i], np.searchsorted(universe, k)) for i, k in zip(distinct, keys, strict=True)
        ]
        del keys
        return cls(space, universe, _relevant_on(universe, space, actual), positions)

    def positions(self, frame: pd.DataFrame, name: str) -> IntArray:
        """Position in :attr:`universe` of each row of ``frame``.

        Raises
        ------
        ValueError
            If a row's pair is not in the universe.
        """
        for known, position in self._positions:
            if _same_pairs(frame, known):
                return position
        keys = self.space.keys(frame, name)
        universe = self.universe
        position = np.searchsorted(universe, keys)
        inside = (position < len(universe)) & (
            universe[np.minimum(position, len(universe) - 1)] == keys
        )
        if not inside.all():
            raise ValueError(
                f"{name} scores {int((~inside).sum())} pair(s) that are not candidates"
            )
        return position

    def scores(self, frame: pd.DataFrame, name: str) -> tuple[FloatArray, BoolArray]:
        """A scores frame's scores on :attr:`universe` (``-inf`` where it scored
        nothing) and which pairs it scored.

        Raises
        ------
        ValueError
            As :func:`ranking_metrics`: missing columns or scores, pairs outside the
            universe, repeated pairs.
        """
        frame = _scores_frame(frame, name)
        position = self.positions(frame, name)
        _check_once(position, len(self.universe), name)
        score = np.full(len(self.universe), -np.inf)
        score[position] = frame["score"].to_numpy(dtype=np.float64)
        scored = np.zeros(len(self.universe), dtype=bool)
        scored[position] = True
        return score, scored

    def ranking(self, score: FloatArray, ks: Sequence[int] = (1, 3, 5)) -> pd.DataFrame:
        """:func:`ranking_metrics` of ``score`` (on :attr:`universe`), columns
        :data:`RANKING_COLUMNS`."""
        return _ranking(
            self.universe, self.space.n_products, score, self.relevant, _validated_ks(ks)
        )

    def per_customer(self, score: FloatArray, k: int) -> tuple[IntArray, FloatArray, FloatArray]:
        """The ranking of ``score`` (on :attr:`universe`) customer by customer.

        Returns
        -------
        tuple of numpy.ndarray
            The evaluated customers (positions in ``space.customers``, ascending) and
            each one's hits at ``k`` and average precision at ``k``: the mean of the
            latter over any subset of them, in this order, is the MAP@k
            :func:`ranking_metrics` gives for that subset's pairs, to the bit.
        """
        ks = _validated_ks((k,))
        parts = [
            _per_customer(
                self.universe[a:b], self.space.n_products, score[a:b], self.relevant[a:b], ks
            )
            for a, b in _customer_chunks(self.universe, self.space.n_products)
        ]
        if not parts:
            return np.empty(0, np.int64), np.empty(0), np.empty(0)
        return (
            np.concatenate([part[0] for part in parts]),
            np.concatenate([part[2][0][0] for part in parts]),
            np.concatenate([part[2][0][1] for part in parts]),
        )

    def known_positions(self, frame: pd.DataFrame) -> IntArray | None:
        """:meth:`positions` of a frame holding the same pairs as one of the frames the
        pairs were made of, without reading it; None for another frame."""
        for known, position in self._positions:
            if _same_pairs(frame, known):
                return position
        return None

    def products(self) -> list[tuple[str, IntArray]]:
        """Each product present (in product code order) with its pairs' positions in
        :attr:`universe`, in universe order."""
        product = self.universe % max(self.space.n_products, 1)
        order = np.argsort(product, kind="stable")
        bounds = np.searchsorted(product[order], np.arange(self.space.n_products + 1))
        return [
            (str(code), order[bounds[j] : bounds[j + 1]])
            for j, code in enumerate(self.space.products)
            if bounds[j + 1] > bounds[j]
        ]


def _relevant_on(universe: IntArray, space: _PairSpace, actual: pd.DataFrame) -> BoolArray:
    """Which ``universe`` pairs appear in ``actual``."""
    keys = space.keys(actual, "actual")
    return np.isin(universe, keys[keys >= 0])


def _labels_for(pairs: pd.DataFrame, labels: pd.DataFrame) -> BoolArray:
    """Per row of ``pairs`` (unique pairs): is the pair among the positive labels."""
    positives = _required(labels, _PAIR, "labels")
    if "label" in labels.columns:
        flag = _binary_array(labels["label"].to_numpy(), "labels.label", len(labels))
        positives = positives.loc[flag]
    space = _PairSpace.of([pairs])
    keys = space.keys(pairs, "pairs")
    # Keys index a table of every customer x product: membership without sorting.
    n_keys = len(space.customers) * space.n_products
    taken = np.zeros(n_keys, dtype=bool)
    taken[keys] = True
    if int(np.count_nonzero(taken)) != len(keys):
        raise ValueError("repeated (customer_id, product_code) pairs")
    wanted = space.keys(positives, "labels")
    table = np.zeros(n_keys, dtype=bool)
    table[wanted[wanted >= 0]] = True
    return table[keys]


def _scores_frame(scores: pd.DataFrame, name: str) -> pd.DataFrame:
    frame = _required(scores, _SCORED, name)
    if len(frame) == 0:
        raise ValueError(f"{name} is empty")
    if not pd.api.types.is_numeric_dtype(frame["score"]) or pd.api.types.is_bool_dtype(
        frame["score"]
    ):
        raise TypeError(f"{name}.score must be numeric, got dtype {frame['score'].dtype}")
    if frame["score"].isna().any():
        raise ValueError(f"{name}.score has missing values")
    return frame


def _required(frame: pd.DataFrame, columns: Sequence[str], name: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {list(frame.columns)}")
    return frame


def _validated_ks(ks: Sequence[int]) -> tuple[int, ...]:
    cutoffs = tuple(ks)
    if not cutoffs:
        raise ValueError("ks is empty")
    for k in cutoffs:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
    if len(set(cutoffs)) != len(cutoffs):
        raise ValueError(f"ks has repeated values: {cutoffs}")
    return tuple(int(k) for k in cutoffs)


def _float_array(values: npt.ArrayLike, name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{name} has missing values")
    return array


def _binary_array(values: npt.ArrayLike, name: str, length: int) -> BoolArray:
    array = np.asarray(values).reshape(-1)
    if len(array) != length:
        raise ValueError(f"{name} has {len(array)} values, expected {length}")
    if array.dtype == np.bool_:
        return array
    numeric = pd.to_numeric(pd.Series(array), errors="coerce").to_numpy(dtype=np.float64)
    if not np.isin(numeric, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be 0/1 (or bool)")
    return np.asarray(numeric == 1.0, dtype=np.bool_)


def _naive_datetimes(values: pd.Series, name: str) -> pd.Series:
    if not pd.api.types.is_datetime64_any_dtype(values):
        raise TypeError(f"{name} must be datetime64, got dtype {values.dtype}")
    if values.isna().any():
        raise ValueError(f"{name} must not be missing")
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_localize(None)
    return values
