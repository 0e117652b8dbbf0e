"""Building a model card: measured once, as JSON-ready data (see :mod:`models.model_card`)."""

from __future__ import annotations

import datetime as dt
import math
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.data import BankData, to_ns
from models.eligibility import ages_at
from models.metrics import (
    CandidatePairs,
    calibration_table,
    expected_calibration_error,
    label_pairs,
    product_codes,
    product_metrics,
    roc_auc,
)

if TYPE_CHECKING:
    from models.evaluation import HoldoutResult
    from models.propensity import PropensityModel

__all__ = ["CARD_FORMAT", "CARD_VERSION", "CardConfig", "build_card"]

CARD_FORMAT: Final[str] = "nbo-model-card"
CARD_VERSION: Final[int] = 1
_LIBRARIES: Final[tuple[str, ...]] = (
    "nbo",
    "lightgbm",
    "numpy",
    "pandas",
    "scikit-learn",
    "mlxtend",
)
_REFERENCES: Final[frozenset[str]] = frozenset({"oracle"})
"""Comparison rows that are references (they know the future), not models."""
_SMALL_HOLDOUT: Final[int] = 100
"""Evaluated customers below which the card warns that the holdout means little."""
_UNKNOWN: Final[str] = "unknown"
_OTHER: Final[str] = "other"


@dataclass(frozen=True)
class CardConfig:
    """How :func:`build_card` measures groups.

    Attributes
    ----------
    k : int
        Cut-off of the group ranking metrics (``hit@k``, ``map@k``).
    min_adopters : int
        Customers of a group who adopted a candidate product in the holdout window, at
        least, for its ranking metrics; a smaller group is listed as skipped.
    min_auc_cases : int
        Adopters and non-adopters of a product within a group, each at least, for the
        group's AUC of that product (else None).
    age_bands : tuple of (str, int, int or None)
        ``(label, youngest, oldest)`` in whole years at the holdout cutoff; None: no
        upper limit. Younger customers than the first band are ``under <youngest>``,
        customers without a birth date ``unknown``.
    max_segments : int
        Segments shown at most: beyond it, the largest ``max_segments - 1`` are shown
        and the others pooled as ``other``.
    served, baseline : str
        Comparison rows of the served score and of the baseline it is set against.
    """

    k: int = 3
    min_adopters: int = 30
    min_auc_cases: int = 5
    max_segments: int = 12
    age_bands: tuple[tuple[str, int, int | None], ...] = (
        ("18-29", 18, 29),
        ("30-44", 30, 44),
        ("45-59", 45, 59),
        ("60+", 60, None),
    )
    served: str = "blend"
    baseline: str = "popularity"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.min_adopters < 1 or self.min_auc_cases < 1 or self.max_segments < 2:
            raise ValueError(
                "min_adopters and min_auc_cases must be at least 1, max_segments at least 2"
            )
        if not self.age_bands:
            raise ValueError("age_bands is empty")
        previous = -1
        for label, youngest, oldest in self.age_bands:
            if youngest <= previous or (oldest is not None and oldest < youngest):
                raise ValueError(f"age band {label!r} overlaps or is out of order")
            previous = youngest if oldest is None else oldest
            if oldest is None and (label, youngest, oldest) != self.age_bands[-1]:
                raise ValueError(f"only the last age band may be open-ended, not {label!r}")


# --------------------------------------------------------------------------- building


def build_card(
    model: PropensityModel,
    holdout: HoldoutResult | None,
    data: BankData,
    *,
    config: CardConfig | None = None,
) -> dict[str, Any]:
    """The model card of ``model``, measured on ``holdout`` (see the module docstring).

    Parameters
    ----------
    model : PropensityModel
        The model the card documents (the served one: products, features, calibration
        and training settings come from it).
    holdout : HoldoutResult or None
        The holdout evaluation of the same training procedure (its model may be trained
        on less history than ``model``); None: the card has no holdout metrics and no
        group metrics, and says so.
    data : BankData
        The bank the holdout was measured on: segments and birth dates of its
        customers, and the adoption counts of the data window.
    config : CardConfig, optional
        How groups are measured (default ``CardConfig()``).

    Returns
    -------
    dict
        JSON-ready (strict JSON: no NaN), with the keys the module docstring lists.

    Raises
    ------
    TypeError
        If ``config`` is not a :class:`CardConfig`.
    ValueError
        If the holdout has no row for the served score.
    """
    if config is None:
        config = CardConfig()
    if not isinstance(config, CardConfig):
        raise TypeError(f"config must be a CardConfig, not {type(config).__name__}")
    if holdout is not None and config.served not in holdout.ranked:
        raise ValueError(
            f"the holdout has no {config.served!r} scores; it has {sorted(holdout.ranked)}"
        )
    notes: list[str] = []
    products = _products(model)
    holdout_part = None if holdout is None else _holdout(holdout, config)
    if holdout_part is None:
        notes.append("No holdout was measured: no holdout, calibration or group metrics.")
    elif holdout_part["customers_evaluated"] < _SMALL_HOLDOUT:
        notes.append(
            f"Only {holdout_part['customers_evaluated']} customers adopted a candidate "
            "product in the holdout window: its metrics mean little."
        )
    labelled = None
    if holdout is not None:
        labelled = label_pairs(holdout.ranked[config.served], holdout.actual)
    groups = _groups(holdout, labelled, data, config, notes)
    card = {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "model": {
            "as_of": _day(model.as_of),
            "horizon_days": int(model.horizon_days),
            "served": config.served,
            "products": len(products),
            "lightgbm_products": sum(p["kind"] == "lightgbm" for p in products),
            "trees": int(model.n_trees),
            "feature_columns": len(model.spec.columns),
        },
        "data": _data_window(model, data),
        "holdout": holdout_part,
        "products": products,
        "features": _features(model),
        "metrics": _metrics(holdout, config),
        "calibration": _calibration(model, labelled),
        "groups": groups,
        "training": {
            "config": model.config.to_dict(),
            "lightgbm": model.config.lightgbm_params(),
            "seconds": model.report.get("seconds"),
        },
        "libraries": _library_versions(),
        "notes": notes,
    }
    cleaned: dict[str, Any] = _json_safe(card)
    return cleaned


def _data_window(model: PropensityModel, data: BankData) -> dict[str, Any]:
    window = dict(model.window)
    adopted = data.adoptions["adopted_at"]
    before = adopted[adopted < model.as_of]
    split = bool(window.get("split_customers", False))
    validation = window.get("validation")
    fraction = validation.get("fraction") if isinstance(validation, Mapping) else None
    if split and fraction is None:
        fraction = model.config.validation_fraction
    return {
        "first_adoption": _day(window.get("first_adoption")),
        "plan": window.get("plan", "single_cutoff" if split else "monthly"),
        "training_cutoffs": [_day(t) for t in window.get("train_cutoffs", [])],
        "validation_cutoff": _day(window.get("validation_cutoff")),
        "validation": "random customers" if split else "later cutoff",
        "validation_fraction": fraction if split else None,
        "as_of": _day(model.as_of),
        "horizon_days": int(model.horizon_days),
        "customers": int(window.get("customers", len(data.customers))),
        "adoptions": int(before.size),
        "last_adoption": _day(before.max()) if before.size else None,
        "window": window,
    }


def _holdout(holdout: HoldoutResult, config: CardConfig) -> dict[str, Any]:
    kind = str(getattr(holdout, "holdout_kind", None) or "temporal")
    comparison = holdout.comparison
    evaluated = int(comparison["n_customers"].iloc[0]) if len(comparison) else 0
    cutoff = pd.Timestamp(holdout.cutoff)
    return {
        "kind": kind,
        "cutoff": _day(cutoff),
        "end": _day(cutoff + pd.Timedelta(days=holdout.horizon_days)),
        "horizon_days": int(holdout.horizon_days),
        "model_as_of": _day(holdout.model.as_of),
        "customers_scored": int(holdout.scores["customer_id"].nunique()),
        "customers_evaluated": evaluated,
        "adoptions": int(len(holdout.actual)),
        "candidate_pairs": int(len(holdout.scores)),
        "fraction": getattr(holdout, "holdout_fraction", None),
        "seed": getattr(holdout, "holdout_seed", None),
        "served": config.served,
        "baseline": config.baseline if config.baseline in holdout.ranked else None,
    }


def _products(model: PropensityModel) -> list[dict[str, Any]]:
    names = dict(zip(model.catalogue.product_codes, model.catalogue.names, strict=True))
    report = model.report.get("products", {})
    out = []
    for product in model.products:
        code = product.product_code
        metrics = report.get(code, {})
        kind = "lightgbm" if product.model_text is not None else "base_rate"
        trees = 0 if product.model_text is None else product.model_text.count("\nTree=")
        out.append(
            {
                "code": code,
                "name": names.get(code, code),
                "kind": kind,
                "trees": trees,
                "calibration": product.calibrator.method,
                "blend": product.blend is not None,
                "base_rate": product.base_rate,
                "train_rows": metrics.get("train_rows"),
                "train_positives": metrics.get("train_positives"),
                "validation_rows": metrics.get("validation_rows"),
                "validation_positives": metrics.get("validation_positives"),
                "validation_auc": metrics.get("auc"),
            }
        )
    return out


def _features(model: PropensityModel) -> dict[str, Any]:
    spec = model.spec
    family: dict[str, str] = {}
    for code in spec.product_codes:
        for prefix in ("held", "ever", "days_since_first", "rule_conf"):
            family[f"{prefix}_{code}"] = f"{prefix}_<product>"
        for kind in spec.outcome_kinds:
            family[f"{kind}_recently_{code}"] = f"{kind}_recently_<product>"
    categorical = set(spec.categorical)
    columns = [
        {
            "name": column,
            "kind": "categorical" if column in categorical else "numeric",
            "family": family.get(column, column),
        }
        for column in spec.columns
    ]
    return {
        "count": len(columns),
        "numeric": sum(c["kind"] == "numeric" for c in columns),
        "categorical": sum(c["kind"] == "categorical" for c in columns),
        "columns": columns,
        "attributes": [{"name": name, "kind": kind} for name, kind in spec.attributes],
    }


def _metrics(holdout: HoldoutResult | None, config: CardConfig) -> dict[str, Any]:
    if holdout is None:
        return {"columns": [], "models": [], "products": []}
    table = holdout.comparison
    if "model" in table.columns:
        table = table.set_index("model")
    columns = [str(c) for c in table.columns]
    models = [
        {"model": str(name), "reference": str(name) in _REFERENCES}
        | {str(c): _scalar(v) for c, v in row.items()}
        for name, row in table.iterrows()
    ]
    per_product = product_metrics(holdout.ranked[config.served], holdout.actual)
    tops = _top_hits(getattr(holdout, "by_product", None), config.served)
    products = [
        {
            "code": str(r["product_code"]),
            "candidates": int(r["n_candidates"]),
            "adopters": int(r["n_positive"]),
            "base_rate": float(r["base_rate"]),
            "auc": float(r["auc"]),
            "pr_auc": float(r["pr_auc"]),
            "brier": float(r["brier"]),
            "mean_predicted": float(r["mean_predicted"]),
            "top_hits": tops.get(str(r["product_code"]), {}).get("hits", {}),
            "top_share": tops.get(str(r["product_code"]), {}).get("share", {}),
        }
        for r in per_product.to_dict("records")
    ]
    return {"columns": columns, "models": models, "products": products}


def _top_hits(by_product: pd.DataFrame | None, served: str) -> dict[str, dict[str, Any]]:
    """Responders in the top of each product's ranking, from the holdout's per-product
    table (``top<p>_hits``, ``top<p>_share`` per model), as ``{code: {"hits": {"10%":
    ...}, "share": {...}}}``; empty when the holdout has no such table."""
    if by_product is None or "model" not in by_product.columns:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for record in by_product.loc[by_product["model"] == served].to_dict("records"):
        entry: dict[str, Any] = {"hits": {}, "share": {}}
        for column, value in record.items():
            match = re.fullmatch(r"top(\d+)_(hits|share)", str(column))
            if match:
                entry[match.group(2)][f"{match.group(1)}%"] = _scalar(value)
        out[str(record["product_code"])] = entry
    return out


def _calibration(model: PropensityModel, labelled: pd.DataFrame | None) -> dict[str, Any]:
    report = model.report.get("products", {})
    on_holdout: dict[str, tuple[float, float]] = {}
    holdout_bins: list[dict[str, Any]] = []
    holdout_ece = None
    if labelled is not None:
        codes, names = product_codes(labelled["product_code"])
        means = labelled[["score", "label"]].groupby(codes).mean()
        on_holdout = {
            names[code]: (float(row["score"]), float(row["label"]))
            for code, row in means.iterrows()
        }
        if len(labelled) >= 10:
            table = calibration_table(labelled["score"], labelled["label"])
            holdout_ece = expected_calibration_error(table)
            holdout_bins = [
                {
                    "bin": int(r["bin"]),
                    "count": int(r["count"]),
                    "mean_predicted": float(r["mean_predicted"]),
                    "observed": float(r["observed_rate"]),
                }
                for r in table.to_dict("records")
            ]
    products = []
    for code in model.product_codes:
        metrics = report.get(code, {})
        bins = _merge_ties(metrics.get("reliability", []))
        weight = sum(b["weight"] for b in bins)
        ece = (
            sum(b["weight"] * abs(b["observed"] - b["mean_predicted"]) for b in bins) / weight
            if weight > 0
            else None
        )
        seen = on_holdout.get(code)
        products.append(
            {
                "code": code,
                "validation": {
                    "mean_predicted": metrics.get("mean_predicted"),
                    "observed": metrics.get("observed_rate"),
                    "ece": ece,
                    "bins": bins,
                },
                "holdout": None
                if seen is None
                else {"mean_predicted": seen[0], "observed": seen[1]},
            }
        )
    return {"products": products, "holdout_bins": holdout_bins, "holdout_ece": holdout_ece}


def _merge_ties(bins: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Reliability bins with equal predictions merged into one.

    The training report cuts the validation rows into equal-weight bins, which splits
    rows of one predicted value (a base-rate product predicts one value for everyone)
    into bins that differ only by chance; read as bins they show gaps that are not
    there and inflate the calibration error.
    """
    merged: list[dict[str, float]] = []
    for b in bins:
        predicted, observed, weight = (
            float(b[k]) for k in ("mean_predicted", "observed", "weight")
        )
        last = merged[-1] if merged else None
        if last is not None and math.isclose(last["mean_predicted"], predicted, rel_tol=1e-9):
            total = last["weight"] + weight
            if total > 0:
                last["observed"] = (last["observed"] * last["weight"] + observed * weight) / total
            last["weight"] = total
            continue
        merged.append({"mean_predicted": predicted, "observed": observed, "weight": weight})
    return merged


# --------------------------------------------------------------------------- groups


def _groups(
    holdout: HoldoutResult | None,
    labelled: pd.DataFrame | None,
    data: BankData,
    config: CardConfig,
    notes: list[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "k": config.k,
        "min_adopters": config.min_adopters,
        "min_auc_cases": config.min_auc_cases,
    }
    if holdout is None or labelled is None:
        for name in ("segment", "age_band"):
            out[name] = {"available": False, "reason": "no holdout", "overall": None, "groups": []}
        return out
    customers = data.customers.set_index("customer_id")
    measured = _Measured.of(labelled, holdout.ranked.get(config.baseline), config.k)
    codes = _product_order(labelled["product_code"])
    everyone = np.ones(measured.n_customers, dtype=bool)
    overall = _group_row("all", everyone, measured, codes, config)
    dimensions = {
        "segment": _segments(customers, config.max_segments),
        "age_band": _age_bands(customers, holdout.cutoff, config),
    }
    for name, labels in dimensions.items():
        if isinstance(labels, str):
            out[name] = {"available": False, "reason": labels, "overall": None, "groups": []}
            continue
        of_customer = (
            labels.reindex(measured.pairs.space.customers).fillna(_UNKNOWN).astype(str).to_numpy()
        )
        rows = [
            _group_row(g, of_customer == g, measured, codes, config)
            # Ordered by their pairs (the groups of the customers of every pair).
            for g in _group_order(of_customer[measured.customer_of_pair], name, config)
        ]
        skipped = [row["group"] for row in rows if row["skipped"]]
        if skipped:
            notes.append(
                f"By {name.replace('_', ' ')}: {', '.join(skipped)} left out, fewer than "
                f"{config.min_adopters} of their customers adopted in the holdout window."
            )
        out[name] = {"available": True, "reason": None, "overall": overall, "groups": rows}
    return out


def _segments(customers: pd.DataFrame, most: int) -> pd.Series | str:
    if "segment" not in customers.columns or customers["segment"].isna().all():
        return "the bank has no segments"
    segments = customers["segment"].astype(object).where(customers["segment"].notna(), _UNKNOWN)
    sizes = segments.value_counts()
    if len(sizes) > most:
        kept = set(sizes.index[: most - 1])
        segments = segments.where(segments.isin(kept), _OTHER)
    return segments


def _age_bands(customers: pd.DataFrame, cutoff: dt.date, config: CardConfig) -> pd.Series | str:
    if "birth_date" not in customers.columns or customers["birth_date"].isna().all():
        return "the bank has no birth dates"
    births = customers["birth_date"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    ages = ages_at(births, to_ns(cutoff))
    labels = np.full(len(ages), _UNKNOWN, dtype=object)
    first = config.age_bands[0][1]
    labels[ages < first] = f"under {first}"
    for label, youngest, oldest in config.age_bands:
        inside = ages >= youngest if oldest is None else (ages >= youngest) & (ages <= oldest)
        labels[inside] = label
    return pd.Series(labels, index=customers.index)


def _product_order(codes: pd.Series) -> list[str]:
    """Products present, in the model's order when the codes are categorical, else sorted."""
    present = {str(code) for code in pd.unique(codes)}
    if isinstance(codes.dtype, pd.CategoricalDtype):
        return [str(c) for c in codes.cat.categories if str(c) in present]
    return sorted(present)


def _group_order(group: np.ndarray[Any, Any], dimension: str, config: CardConfig) -> list[str]:
    present = pd.Series(group).value_counts()
    if dimension == "age_band":
        first = config.age_bands[0][1]
        names = [f"under {first}", *(band[0] for band in config.age_bands), _UNKNOWN]
        return [name for name in names if name in present.index]
    # Segments: largest first, then the pooled rest, unknown last.
    ordered = sorted(
        present.index,
        key=lambda name: (name == _UNKNOWN, name == _OTHER, -present[name], name),
    )
    return [str(name) for name in ordered]


@dataclass(frozen=True, eq=False)
class _Measured:
    """The served scores and the baseline's, measured once for every group: per pair
    (on the sorted pairs of :class:`models.metrics.CandidatePairs`) and per evaluated
    customer, so that a group's figures are the same as measuring its pairs alone
    (:func:`models.metrics.ranking_metrics`, :func:`models.metrics.product_metrics`)
    without reading millions of pairs again for each group."""

    pairs: CandidatePairs
    customer_of_pair: npt.NDArray[np.int64]
    score: npt.NDArray[np.float64]
    adoptions: npt.NDArray[np.int64]
    evaluated: npt.NDArray[np.int64]
    hits: npt.NDArray[np.float64]
    average_precision: npt.NDArray[np.float64]
    baseline_precision: npt.NDArray[np.float64] | None
    products: list[tuple[str, npt.NDArray[np.intp]]]

    @property
    def n_customers(self) -> int:
        return len(self.pairs.space.customers)

    @classmethod
    def of(cls, labelled: pd.DataFrame, baseline: pd.DataFrame | None, k: int) -> _Measured:
        """``labelled``: the served scores with their 0/1 labels
        (:func:`models.metrics.label_pairs`); ``baseline``: another model's scores,
        read on the served pairs only (``-inf`` where it has none)."""
        served = labelled[["customer_id", "product_code", "score"]]
        positives = labelled.loc[labelled["label"].to_numpy() == 1, ["customer_id", "product_code"]]
        pairs = CandidatePairs.of([served], positives, names=["served"])
        score, _ = pairs.scores(served, "served")
        n_products = max(pairs.space.n_products, 1)
        customer_of_pair = pairs.universe // n_products
        adoptions = np.bincount(
            customer_of_pair, weights=pairs.relevant, minlength=len(pairs.space.customers)
        ).astype(np.int64)
        evaluated, hits, average_precision = pairs.per_customer(score, k)
        baseline_precision = None
        if baseline is not None:
            on_served = _on_pairs(pairs, baseline)
            _, _, baseline_precision = pairs.per_customer(on_served, k)
        return cls(
            pairs,
            customer_of_pair,
            score,
            adoptions,
            evaluated,
            hits,
            average_precision,
            baseline_precision,
            pairs.products(),
        )


def _on_pairs(pairs: CandidatePairs, scores: pd.DataFrame) -> npt.NDArray[np.float64]:
    """``scores`` on ``pairs.universe``: its pairs outside are ignored, and pairs it has
    not scored (or scored NaN) get ``-inf``, as a left join of the served pairs with it
    would leave them."""
    universe = pairs.universe
    values = scores["score"].to_numpy(dtype=np.float64)
    at = pairs.known_positions(scores)  # the holdout scores every model on one frame
    if at is None:
        keys = pairs.space.keys(scores, "baseline")
        at = np.minimum(np.searchsorted(universe, keys), max(len(universe) - 1, 0))
        inside = (keys >= 0) & (universe[at] == keys) if len(universe) else keys < -1
        at, values = at[inside], values[inside]
        taken = np.zeros(len(universe), dtype=bool)
        taken[at] = True
        if int(np.count_nonzero(taken)) != len(at):
            raise ValueError("baseline has repeated (customer_id, product_code) pairs")
    out = np.full(len(universe), -np.inf)
    out[at] = np.where(np.isnan(values), -np.inf, values)
    return out


def _group_row(
    name: str,
    members: npt.NDArray[np.bool_],
    measured: _Measured,
    codes: Sequence[str],
    config: CardConfig,
) -> dict[str, Any]:
    """A group's row; ``members``: which customers (``measured.pairs.space``) are in it."""
    k = config.k
    adoptions = measured.adoptions[members]
    adopters = int(np.count_nonzero(adoptions))
    row: dict[str, Any] = {
        "group": name,
        "customers": int(members.sum()),
        "adopters": adopters,
        "adoptions": int(adoptions.sum()),
        f"hit@{k}": None,
        f"map@{k}": None,
        f"baseline_map@{k}": None,
        "auc": {code: None for code in codes},
        "skipped": None,
    }
    if adopters < config.min_adopters:
        row["skipped"] = (
            f"{adopters} customers adopted a candidate product; {config.min_adopters} are needed"
        )
        return row
    chosen = members[measured.evaluated]
    row[f"hit@{k}"] = float((measured.hits[chosen] > 0).mean())
    row[f"map@{k}"] = float(measured.average_precision[chosen].mean())
    if measured.baseline_precision is not None:
        row[f"baseline_map@{k}"] = float(measured.baseline_precision[chosen].mean())
    in_group = members[measured.customer_of_pair]
    for code, rows in measured.products:
        inside = rows[in_group[rows]]
        if inside.size == 0:
            continue
        labels = measured.pairs.relevant[inside]
        positives = int(labels.sum())
        if min(positives, inside.size - positives) >= config.min_auc_cases:
            row["auc"][code] = roc_auc(measured.score[inside], labels)
    return row


# --------------------------------------------------------------------------- helpers


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _day(value: Any) -> str | None:
    """A date-like value as ``YYYY-MM-DD`` (with the time only when it is not midnight)."""
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    if stamp is pd.NaT:
        return None
    text: str = stamp.date().isoformat() if stamp == stamp.normalize() else stamp.isoformat()
    return text


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, tuples as lists, NaN and inf as None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, pd.Timestamp | dt.date):
        return _day(value)
    return value
