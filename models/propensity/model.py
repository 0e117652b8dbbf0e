"""Propensity models: P(customer adopts a product within a horizon | features now).

Layout: one LightGBM booster per product
-----------------------------------------
For every active product ``p``, a binary booster learns P(adopt ``p`` within
``horizon_days`` after a cutoff | features at the cutoff) over the customers eligible
for ``p`` at the cutoff (who therefore do not hold it). Per-product boosters were
chosen over one stacked customer x product model (the product as a categorical
feature, plus the target product's own ``ever``, ``days_since_first`` and
``rule_conf`` columns), measured on the synthetic bank (50,000 customers, 19 products
with enough adoptions, the same sampled rows and LightGBM settings, two cores):

==========================  ===========  ============  ==================  ===========
layout                      training s   trees         trees walked per    mean valid.
                                                       customer            AUC
==========================  ===========  ============  ==================  ===========
per-product (7 leaves)      12.1         372 in all    372                 0.711
stacked, 7 leaves           50.2         386           7,334 (19 x 386)    0.708
stacked, 31 leaves          15.5         55            1,045 (19 x 55)     0.705
==========================  ===========  ============  ==================  ===========

The per-product models are as good or better (lower Brier on 11 and 13 of the 19
products against the two stacked variants), train faster, and walk several times fewer
trees per decision: a stacked model scores every product with all of its trees, while
early stopping gives each product only the trees it needs. Each product is also
calibrated, early-stopped and explained on its own, and a product with too few
adoptions falls back to its base rate without affecting the others.

At decision time all boosters are merged into one LightGBM model in the multiclass
layout (tree ``i * K + k`` belongs to product ``k``), so one call of LightGBM's
single-row fast path scores every product; its raw scores are bit-identical to the
per-product boosters' (the same trees summed in the same order).

Training data: monthly cutoffs
------------------------------
The latest month start ``v`` with ``v + horizon <= as_of`` is the validation cutoff;
up to ``n_cutoffs`` earlier month starts whose whole label window ends by ``v`` are the
training cutoffs, so no adoption is a label in both. At each cutoff features are built
from data strictly before it (rules mined strictly before it too) and the label is an
adoption in ``[cutoff, cutoff + horizon)``. When history is too short for both, one
cutoff is used and its customers are split (by a hash of the id) into training and
validation. Negatives are subsampled per product and cutoff (all positives kept) and
reweighted by the inverse sampling rate, so the weighted data keep the true base rate.

Calibration and blend
---------------------
On the validation cutoff each product gets a calibrator of the booster's raw score,
chosen by cross-fitted log loss among none (the weighted training data keep the base
rate, so the booster is often calibrated already), Platt scaling and, with at least
``isotonic_min_positives`` positives, isotonic regression; all are stored as plain
JSON numbers. The served propensity blends the calibrated LightGBM probability
``lgbm`` with the best applicable rule's confidence ``rules`` through a small logistic
stack per product (``logit(lgbm)``, ``rules``, ``rules > 0``) fitted on validation; the
stack is kept only where it improves the cross-fitted log loss, otherwise
``propensity == lgbm`` (the rule confidence is also a LightGBM feature, so the stack
rarely adds much). The reported metrics (AUC, Brier, log loss, reliability) are
cross-fitted: each half of the validation customers is scored by calibrators fitted on
the other half.
"""

from __future__ import annotations

import ctypes
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from models.data import NAT_NS, NS_PER_DAY, BankData, CustomerState, DateInput, to_ns
from models.eligibility import Catalogue, combine, rule_failures, state_arrays
from models.features import (
    FeatureBuilder,
    FeatureFrame,
    FeatureSpec,
    PreparedBank,
    mine_rules,
)
from models.rules import Rule, RuleSet, rule_sentence

__all__ = [
    "Blend",
    "Calibrator",
    "Contribution",
    "CutoffPlan",
    "Explanation",
    "ProductModel",
    "ProductScore",
    "PropensityModel",
    "TrainConfig",
    "plan_cutoffs",
    "reliability",
    "train",
]

ProgressFn = Callable[[str, float], None]
"""Called as ``progress(stage, fraction_done)`` while training."""

_EPS: Final[float] = 1e-6
_PREDICT_CHUNK: Final[int] = 200_000
_C_API_PREDICT_RAW_SCORE: Final[int] = 1
_C_API_PREDICT_CONTRIB: Final[int] = 3
_C_API_DTYPE_FLOAT32: Final[int] = 0


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`.

    Attributes
    ----------
    n_cutoffs : int
        Most training cutoffs (monthly, most recent first).
    cutoff_step_months : int
        Months between training cutoffs.
    products : tuple of str or None
        Products to model (default: every active product).
    negatives_per_positive : float
        Negatives kept per positive at each cutoff (reweighted).
    min_negatives : int
        Negatives kept at least, per product and cutoff, when there are that many.
    max_rows_per_product : int
        Training rows per product over all cutoffs, at most.
    max_validation_rows : int
        Validation rows per product, at most.
    min_positives : int
        Training positives a product needs for a booster; below it the product is
        scored with its base rate.
    learning_rate, num_leaves, min_data_in_leaf, feature_fraction, bagging_fraction, \
lambda_l2, max_bin, max_rounds, early_stopping_rounds, num_threads
        LightGBM settings (``num_threads=0``: LightGBM's default, all cores).
    seed : int
        Seeds sampling and LightGBM; the same data and seed give the same model.
    calibration : {"auto", "identity", "platt", "isotonic"}
        Calibrator. ``auto`` picks, per product, the one with the lowest cross-fitted
        validation log loss among none (``identity``), Platt and (with enough
        positives) isotonic.
    isotonic_min_positives : int
        Validation positives ``auto`` needs to consider isotonic.
    blend : bool
        Fit the logistic stack of LightGBM and rules (kept only where it helps).
    rules : bool
        Mine rules and use them as features and in the blend.
    rule_min_support, rule_min_confidence, rule_min_customers, rule_max_antecedent, \
rule_ordered
        Rule mining settings (:func:`models.rules.mine_sequence_rules`); rules count a
        consequent only within the horizon (``within_days=horizon_days``).
    validation_fraction : float
        Share of customers held out when only one cutoff fits.
    outcome_features : bool
        Count offer outcomes as features (``declined_recently_<p>``) when the data
        has outcomes; False leaves them out.
    forced_sales : {"keep", "drop"}
        What an accepted offer is as a label. An offer the customer accepted is an
        adoption like any other, so by default (``keep``) it is a positive: it is
        exactly the event the model is served to predict, a customer taking the
        product when offered it, and dropping it would remove positives where the
        model is used most. ``drop`` leaves out of training and validation every
        (customer, product, cutoff) whose label window holds an accepted offer of the
        product (the row is neither positive nor negative): for banks whose sales
        push products, where an accepted offer reflects the push (and the earlier
        model that chose the offer) more than the customer's own propensity.
    """

    n_cutoffs: int = 12
    cutoff_step_months: int = 1
    products: tuple[str, ...] | None = None
    negatives_per_positive: float = 15.0
    min_negatives: int = 2_000
    max_rows_per_product: int = 200_000
    max_validation_rows: int = 100_000
    min_positives: int = 20
    learning_rate: float = 0.15
    num_leaves: int = 7
    min_data_in_leaf: int = 200
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 10.0
    max_bin: int = 63
    max_rounds: int = 300
    early_stopping_rounds: int = 20
    num_threads: int = 0
    seed: int = 0
    calibration: Literal["auto", "identity", "platt", "isotonic"] = "auto"
    isotonic_min_positives: int = 1_000
    blend: bool = True
    rules: bool = True
    rule_min_support: float = 0.0005
    rule_min_confidence: float = 0.02
    rule_min_customers: int = 10
    rule_max_antecedent: int = 2
    rule_ordered: bool = True
    validation_fraction: float = 0.25
    outcome_features: bool = True
    forced_sales: Literal["keep", "drop"] = "keep"

    def __post_init__(self) -> None:
        if self.forced_sales not in ("keep", "drop"):
            raise ValueError(f"forced_sales must be 'keep' or 'drop', not {self.forced_sales!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (inverse: :meth:`from_dict`)."""
        data = asdict(self)
        data["products"] = None if self.products is None else list(self.products)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Settings from :meth:`to_dict`; unknown keys are an error."""
        values = dict(data)
        if values.get("products") is not None:
            values["products"] = tuple(values["products"])
        return cls(**values)

    def lightgbm_params(self) -> dict[str, Any]:
        """The LightGBM parameters every product's booster is trained with."""
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1 else 0,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "max_cat_to_onehot": 8,
            "cat_smooth": 10.0,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }


# --------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Calibrator:
    """Maps a booster's raw score (log-odds) to a calibrated probability.

    Attributes
    ----------
    method : {"platt", "isotonic", "constant"}
        ``platt``: ``sigmoid(a * raw + b)`` with ``params = (a, b)``; ``isotonic``:
        piecewise-linear through ``(x, y)``, flat beyond the ends; ``constant``:
        ``params[0]`` for everyone (a product without a booster).
    params : tuple of float
    x, y : tuple of float
    """

    method: Literal["platt", "isotonic", "constant"]
    params: tuple[float, ...] = ()
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def apply(self, raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Calibrated probabilities of raw scores."""
        if self.method == "platt":
            return _sigmoid(self.params[0] * raw + self.params[1])
        if self.method == "isotonic":
            return np.asarray(np.interp(raw, self.x, self.y), dtype=np.float64)
        return np.full(raw.shape, self.params[0], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "method": self.method,
            "params": list(self.params),
            "x": list(self.x),
            "y": list(self.y),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibrator:
        """Inverse of :meth:`to_dict`."""
        method = data["method"]
        if method not in ("platt", "isotonic", "constant"):
            raise ValueError(f"unknown calibration method {method!r}")
        return cls(
            method=method,
            params=tuple(float(v) for v in data["params"]),
            x=tuple(float(v) for v in data["x"]),
            y=tuple(float(v) for v in data["y"]),
        )


@dataclass(frozen=True)
class Blend:
    """The logistic stack ``sigmoid(c0 + c1 * logit(lgbm) + c2 * rules + c3 * [rules > 0])``."""

    intercept: float
    coef_lgbm: float
    coef_rule: float
    coef_has_rule: float

    def apply(
        self, lgbm: npt.NDArray[np.float64], rules: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Blended propensities."""
        return _sigmoid(
            self.intercept
            + self.coef_lgbm * _logit(lgbm)
            + self.coef_rule * rules
            + self.coef_has_rule * (rules > 0)
        )

    def to_dict(self) -> dict[str, float]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Blend:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class ProductModel:
    """Everything that scores one product.

    Attributes
    ----------
    product_code : str
    model_text : str or None
        The LightGBM booster in its native text format; None for a base-rate product.
    calibrator : Calibrator
    blend : Blend or None
        None: ``propensity == lgbm``.
    base_rate : float
        Weighted adoption rate of eligible customers over the training cutoffs.
    """

    product_code: str
    model_text: str | None
    calibrator: Calibrator
    blend: Blend | None
    base_rate: float

    def parameters(self) -> dict[str, Any]:
        """Calibration and blend as JSON (the booster is saved apart)."""
        return {
            "product_code": self.product_code,
            "has_model": self.model_text is not None,
            "calibrator": self.calibrator.to_dict(),
            "blend": None if self.blend is None else self.blend.to_dict(),
            "base_rate": self.base_rate,
        }


@dataclass(frozen=True, slots=True)
class ProductScore:
    """One product's scores for one customer.

    Attributes
    ----------
    product_code : str
    propensity : float
        The served probability of adoption within the horizon (the blend).
    lgbm : float
        Calibrated LightGBM probability.
    rules : float
        Best applicable rule's confidence, 0 if none applies.
    """

    product_code: str
    propensity: float
    lgbm: float
    rules: float


@dataclass(frozen=True)
class Contribution:
    """One feature's contribution to a product's LightGBM score (log-odds).

    Attributes
    ----------
    feature : str
        Column name.
    label : str
        Human-readable name ("holds Mortgage").
    value : str, float or None
        The customer's value (a level for categorical columns; None if missing).
    contribution : float
        SHAP contribution to the raw score (positive raises the propensity).
    """

    feature: str
    label: str
    value: str | float | None
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """Why a product scored as it did for a customer.

    Attributes
    ----------
    product_code : str
    score : ProductScore
    rule : Rule or None
        The best applicable rule (the one behind ``score.rules``).
    rule_sentence : str or None
        That rule in words.
    contributions : tuple of Contribution
        The largest contributions by absolute value, largest first.
    baseline : float
        The booster's expected raw score (contributions add to the raw score from it).
    """

    product_code: str
    score: ProductScore
    rule: Rule | None
    rule_sentence: str | None
    contributions: tuple[Contribution, ...]
    baseline: float


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, eq=False)
class PropensityModel:
    """A trained propensity model: immutable, safe to share between threads.

    Build it with :func:`train` or :func:`models.artifacts.load_bundle`.

    Attributes
    ----------
    spec : FeatureSpec
        Feature columns.
    catalogue : Catalogue
        The training catalogue (product names, default eligibility rules).
    rules : RuleSet or None
        Rules mined strictly before ``as_of``, used for features and the blend.
    products : tuple of ProductModel
        Scored products, in catalogue order.
    as_of : pandas.Timestamp
        Training cutoff: the model saw only data strictly before it.
    horizon_days : int
        The propensity is of adoption within this many days.
    config : TrainConfig
        Training settings.
    window : dict
        Data window: training and validation cutoffs, first adoption seen.
    report : dict
        Validation metrics per product (see :func:`train`).
    """

    spec: FeatureSpec
    catalogue: Catalogue
    rules: RuleSet | None
    products: tuple[ProductModel, ...]
    as_of: pd.Timestamp
    horizon_days: int
    config: TrainConfig
    window: dict[str, Any]
    report: dict[str, Any]
    _runtime: _Runtime = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Everything needed to score is built here, once: a loaded model is complete
        # before anyone can use it.
        object.__setattr__(self, "_runtime", _Runtime(self))

    @classmethod
    def train(
        cls,
        data: BankData,
        *,
        as_of: DateInput,
        horizon_days: int = 90,
        config: TrainConfig | None = None,
        progress: ProgressFn | None = None,
    ) -> PropensityModel:
        """Train a model; the same as the module-level :func:`train`."""
        return train(data, as_of=as_of, horizon_days=horizon_days, config=config, progress=progress)

    @property
    def product_codes(self) -> tuple[str, ...]:
        """Scored products, in order."""
        return tuple(p.product_code for p in self.products)

    @property
    def builder(self) -> FeatureBuilder:
        """The feature builder (spec and rules) the model scores with."""
        return self._runtime.builder

    # ----------------------------------------------------------------- batch

    def score(
        self,
        data: BankData,
        *,
        as_of: DateInput,
        catalogue: Catalogue | None = None,
        uncalibrated: bool = False,
    ) -> pd.DataFrame:
        """Score every eligible (customer, product) pair.

        Parameters
        ----------
        data : BankData
            The bank; customers who joined on or after ``as_of`` are left out.
        as_of : date-like
            The instant: features read only what happened strictly before it.
        catalogue : Catalogue, optional
            Eligibility rules (default: ``data.products``). Products the model does not
            have are not scored.
        uncalibrated : bool
            Add ``lgbm_uncalibrated``, the booster's own probability (for evaluation).

        Returns
        -------
        pandas.DataFrame
            ``customer_id, product_code, propensity, lgbm, rules``, one row per
            eligible pair (never a held product), ordered by customer (as in
            ``data.customers``) then product (as in :attr:`products`).
        """
        runtime = self._runtime
        frame = runtime.builder.build(data, as_of=as_of)
        catalogue = catalogue if catalogue is not None else Catalogue.from_data(data)
        eligible = _eligible_for(self, catalogue, frame, data, to_ns(as_of))
        pieces_rows: list[npt.NDArray[np.intp]] = []
        pieces_product: list[npt.NDArray[np.intp]] = []
        pieces: list[tuple[npt.NDArray[np.float64], ...]] = []
        for k in range(len(self.products)):
            rows = np.flatnonzero(eligible[:, k])
            if rows.size == 0:
                continue
            raw = runtime.raw_batch(k, frame.values, rows)
            rules = (
                frame.rule_confidence[rows, runtime.spec_columns[k]]
                if frame.rule_confidence is not None
                else np.zeros(rows.size)
            )
            lgbm, propensity = runtime.finish_product(k, raw, rules)
            pieces_rows.append(rows)
            pieces_product.append(np.full(rows.size, k, dtype=np.intp))
            own = lgbm if runtime.boosters[k] is None else _sigmoid(raw)
            pieces.append((propensity, lgbm, rules, own))
        if not pieces:
            empty = _score_frame(
                np.array([], dtype=object),
                np.array([], dtype=np.intp),
                self.product_codes,
                *(np.array([]),) * 3,
            )
            if uncalibrated:
                empty["lgbm_uncalibrated"] = np.array([])
            return empty
        rows = np.concatenate(pieces_rows)
        products = np.concatenate(pieces_product)
        order = np.lexsort((products, rows))
        columns = [np.concatenate([piece[i] for piece in pieces])[order] for i in range(4)]
        scores = _score_frame(
            frame.customer_ids[rows[order]], products[order], self.product_codes, *columns[:3]
        )
        if uncalibrated:
            scores["lgbm_uncalibrated"] = columns[3]
        return scores

    # ----------------------------------------------------------------- one customer

    def score_customer(
        self,
        state: CustomerState,
        *,
        as_of: DateInput,
        catalogue: Catalogue | None = None,
    ) -> list[ProductScore]:
        """Score one customer's eligible products (the decision-time fast path).

        Equals the customer's rows of :meth:`score`.

        Parameters
        ----------
        state : CustomerState
            The customer.
        as_of : date-like
            The instant.
        catalogue : Catalogue, optional
            Eligibility rules (default: the training catalogue).

        Returns
        -------
        list of ProductScore
            Eligible products only, highest propensity first.
        """
        runtime = self._runtime
        as_of_ns = _instant(as_of)
        values, eligible, rule_confidence = runtime.customer_row(state, as_of_ns, catalogue)
        if not eligible.any():
            return []
        raw = runtime.fast.predict(values[0])
        rules = runtime.rules_of(rule_confidence)
        lgbm, propensity = runtime.finish_all(raw, rules)
        scores = [
            ProductScore(code, p, q, r)
            for code, p, q, r, ok in zip(
                self.product_codes,
                propensity.tolist(),
                lgbm.tolist(),
                rules.tolist(),
                eligible.tolist(),
                strict=True,
            )
            if ok
        ]
        scores.sort(key=_by_propensity)
        return scores

    def explain(
        self,
        state: CustomerState,
        product_code: str,
        *,
        as_of: DateInput,
        top_n: int = 3,
        catalogue: Catalogue | None = None,
    ) -> Explanation:
        """Explain one product's score for one customer.

        Parameters
        ----------
        state : CustomerState
            The customer.
        product_code : str
            A scored product.
        as_of : date-like
            The instant.
        top_n : int
            Contributions to return.
        catalogue : Catalogue, optional
            Eligibility rules (default: the training catalogue).

        Returns
        -------
        Explanation

        Raises
        ------
        KeyError
            If the model does not score ``product_code``.
        ValueError
            If the product is not eligible for the customer.
        """
        return self.explain_many(
            state, [product_code], as_of=as_of, top_n=top_n, catalogue=catalogue
        )[0]

    def explain_many(
        self,
        state: CustomerState,
        product_codes: Sequence[str],
        *,
        as_of: DateInput,
        top_n: int = 3,
        catalogue: Catalogue | None = None,
    ) -> list[Explanation]:
        """:meth:`explain` for several products, building the customer's features once.

        The contributions come from LightGBM's single-row TreeSHAP on each product's own
        booster (a fast handle made on first use), so explaining a few offers costs tens
        of microseconds each, not a full batch predict.

        Raises
        ------
        KeyError
            If the model does not score one of ``product_codes``.
        ValueError
            If one of the products is not eligible for the customer.
        """
        runtime = self._runtime
        for code in product_codes:
            if code not in runtime.product_index:
                raise KeyError(code)
        as_of_ns = _instant(as_of)
        values, inputs, ages, rule_confidence = runtime.builder.customer_features(state, as_of_ns)
        eligible = runtime.eligible_row(state, inputs.held, ages, as_of_ns, catalogue)
        raw = runtime.fast.predict(values[0])
        rules = runtime.rules_of(rule_confidence)
        lgbm, propensity = runtime.finish_all(raw, rules)
        ever = inputs.first_days != np.iinfo(np.int32).max
        explanations = []
        for product_code in product_codes:
            k = runtime.product_index[product_code]
            if not eligible[k]:
                raise ValueError(f"{product_code} is not eligible for customer {state.customer_id}")
            score = ProductScore(
                product_code, float(propensity[k]), float(lgbm[k]), float(rules[k])
            )
            rule = None
            if self.spec.rule_features:
                j = self.spec.product_codes.index(product_code)
                rule = runtime.builder.rule_table.best_rule(ever, inputs.first_days, j)
            sentence = None if rule is None else rule_sentence(rule, runtime.spoken_names)
            contributions: tuple[Contribution, ...] = ()
            baseline = math.nan
            explainer = runtime.explainer(k)
            if explainer is not None:
                contrib = explainer.contributions(values[0])[0]
                baseline = float(contrib[-1])
                order = np.argsort(-np.abs(contrib[:-1]), kind="stable")[:top_n]
                contributions = tuple(
                    Contribution(
                        feature=self.spec.columns[c],
                        label=self.spec.label(self.spec.columns[c], runtime.names),
                        value=self.spec.display_value(self.spec.columns[c], float(values[0, c])),
                        contribution=float(contrib[c]),
                    )
                    for c in order
                    if contrib[c] != 0
                )
            explanations.append(
                Explanation(
                    product_code=product_code,
                    score=score,
                    rule=rule,
                    rule_sentence=sentence,
                    contributions=contributions,
                    baseline=baseline,
                )
            )
        return explanations

    def rule_sentence(self, rule: Rule) -> str:
        """``rule`` as a sentence a teller can say, with the catalogue's spoken names."""
        return rule_sentence(rule, self._runtime.spoken_names)

    def feature_importance(self) -> pd.DataFrame:
        """Gain and split importance of every feature in every product's booster.

        Returns
        -------
        pandas.DataFrame
            ``product_code, feature, label, gain, splits``, by product then gain
            (largest first); products without a booster are absent.
        """
        rows = []
        for k, product in enumerate(self.products):
            booster = self._runtime.boosters[k]
            if booster is None:
                continue
            gain = booster.feature_importance(importance_type="gain")
            splits = booster.feature_importance(importance_type="split")
            for c, column in enumerate(self.spec.columns):
                rows.append(
                    (
                        product.product_code,
                        column,
                        self.spec.label(column, self._runtime.names),
                        float(gain[c]),
                        int(splits[c]),
                    )
                )
        frame = pd.DataFrame(rows, columns=["product_code", "feature", "label", "gain", "splits"])
        order = {code: k for k, code in enumerate(self.product_codes)}
        frame["_order"] = frame["product_code"].map(order)
        frame = frame.sort_values(["_order", "gain"], ascending=[True, False], kind="stable")
        return frame.drop(columns="_order").reset_index(drop=True)

    @property
    def n_trees(self) -> int:
        """Trees walked to score one customer on every product."""
        return self._runtime.fast.n_trees


# --------------------------------------------------------------------------- runtime


class _Runtime:
    """The scoring machinery of a model, built once when the model is made."""

    def __init__(self, model: PropensityModel) -> None:
        spec = model.spec
        self.builder = FeatureBuilder(spec, model.rules if spec.rule_features else None)
        codes = tuple(p.product_code for p in model.products)
        self.product_index = {code: k for k, code in enumerate(codes)}
        self.spec_columns = np.asarray([spec.product_codes.index(c) for c in codes], dtype=np.intp)
        self.boosters: list[lgb.Booster | None] = [
            None if p.model_text is None else lgb.Booster(model_str=p.model_text)
            for p in model.products
        ]
        self.fast = _FastPredictor([p.model_text for p in model.products], len(spec.columns))
        self._explainers: dict[int, _FastPredictor | None] = {}
        self._explainers_lock = threading.Lock()
        self.catalogue = model.catalogue
        catalogue_columns = [model.catalogue.index.get(c, -1) for c in codes]
        if min(catalogue_columns, default=0) < 0:
            raise ValueError("every scored product must be in the model's catalogue")
        self.catalogue_columns = np.asarray(catalogue_columns, dtype=np.intp)
        self.same_space = model.catalogue.product_codes == spec.product_codes
        self.names = dict(zip(model.catalogue.product_codes, model.catalogue.names, strict=True))
        self.spoken_names = {code: _spoken(name) for code, name in self.names.items()}
        self.products = model.products
        # Vectorised calibration and blend over all products for the one-customer path.
        k = len(model.products)
        self.platt_a = np.zeros(k)
        self.platt_b = np.zeros(k)
        self.constant = np.full(k, np.nan)
        self.isotonic: list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
        self.blend = np.zeros((4, k))
        self.has_blend = np.zeros(k, dtype=bool)
        for i, product in enumerate(model.products):
            calibrator = product.calibrator
            if calibrator.method == "platt":
                self.platt_a[i], self.platt_b[i] = calibrator.params
            elif calibrator.method == "isotonic":
                self.isotonic.append((i, np.asarray(calibrator.x), np.asarray(calibrator.y)))
            else:
                self.constant[i] = calibrator.params[0]
            if product.blend is not None:
                b = product.blend
                self.blend[:, i] = (b.intercept, b.coef_lgbm, b.coef_rule, b.coef_has_rule)
                self.has_blend[i] = True
        self.all_models = all(p.model_text is not None for p in model.products)
        self.model_positions = np.asarray(
            [i for i, p in enumerate(model.products) if p.model_text is not None], dtype=np.intp
        )

    def explainer(self, k: int) -> _FastPredictor | None:
        """Product ``k``'s booster alone, for single-row TreeSHAP; None without a booster."""
        explainer = self._explainers.get(k, False)
        if explainer is not False:
            return explainer  # type: ignore[return-value]
        with self._explainers_lock:
            if k not in self._explainers:
                text = self.products[k].model_text
                n_features = self.fast.n_features
                self._explainers[k] = None if text is None else _FastPredictor([text], n_features)
            return self._explainers[k]

    def raw_batch(
        self, k: int, values: npt.NDArray[np.float32], rows: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.float64]:
        booster = self.boosters[k]
        if booster is None:
            return np.zeros(rows.size)
        out = np.empty(rows.size, dtype=np.float64)
        for start in range(0, rows.size, _PREDICT_CHUNK):
            chunk = rows[start : start + _PREDICT_CHUNK]
            out[start : start + chunk.size] = booster.predict(values[chunk], raw_score=True)
        return out

    def finish_product(
        self, k: int, raw: npt.NDArray[np.float64], rules: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Calibrated LightGBM and blended propensity of one product, many customers."""
        lgbm = _calibrate(
            raw,
            np.full(raw.size, self.platt_a[k]),
            np.full(raw.size, self.platt_b[k]),
            np.full(raw.size, self.constant[k]),
            [(slice(None), x, y) for i, x, y in self.isotonic if i == k],
        )
        blend = np.broadcast_to(self.blend[:, k : k + 1], (4, raw.size))
        return lgbm, _blend(lgbm, rules, blend, np.full(raw.size, self.has_blend[k]))

    def finish_all(
        self, raw_models: npt.NDArray[np.float64], rules: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Calibrated LightGBM and blended propensity of every product, one customer."""
        if self.all_models:
            raw = raw_models
        else:
            raw = np.zeros(len(self.products))
            raw[self.model_positions] = raw_models
        lgbm = _calibrate(raw, self.platt_a, self.platt_b, self.constant, self.isotonic)
        return lgbm, _blend(lgbm, rules, self.blend, self.has_blend)

    def rules_of(self, confidence: npt.NDArray[np.float64] | None) -> npt.NDArray[np.float64]:
        """The rules component of every scored product, one customer."""
        if confidence is None:
            return np.zeros(len(self.products))
        return np.asarray(confidence[0, self.spec_columns], dtype=np.float64)

    def customer_row(
        self, state: CustomerState, as_of_ns: int, catalogue: Catalogue | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.float64] | None]:
        values, inputs, ages, rule_confidence = self.builder.customer_features(state, as_of_ns)
        eligible = self.eligible_row(state, inputs.held, ages, as_of_ns, catalogue)
        return values, eligible, rule_confidence

    def eligible_row(
        self,
        state: CustomerState,
        held: npt.NDArray[np.bool_],
        ages: npt.NDArray[np.float64],
        as_of_ns: int,
        catalogue: Catalogue | None,
    ) -> npt.NDArray[np.bool_]:
        """Eligibility of each scored product for one customer."""
        if catalogue is None or (catalogue is self.catalogue and self.same_space):
            segments = self.catalogue.segment_codes([state.segment])
            failures = rule_failures(self.catalogue, held=held, ages=ages, segment_codes=segments)
            return np.asarray(combine(failures)[0][self.catalogue_columns], dtype=bool)
        held_row, _, _ = state_arrays(state, catalogue, as_of_ns)
        columns = np.asarray(
            [catalogue.index.get(p.product_code, -1) for p in self.products], dtype=np.intp
        )
        segments = catalogue.segment_codes([state.segment])
        eligible = combine(
            rule_failures(catalogue, held=held_row, ages=ages, segment_codes=segments)
        )[0]
        return np.where(columns >= 0, eligible[np.maximum(columns, 0)], False)


def _by_propensity(score: ProductScore) -> float:
    return -score.propensity


def _calibrate(
    raw: npt.NDArray[np.float64],
    a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    constant: npt.NDArray[np.float64],
    isotonic: Sequence[tuple[Any, npt.NDArray[np.float64], npt.NDArray[np.float64]]],
) -> npt.NDArray[np.float64]:
    """Elementwise calibration: Platt by default, constants where set, isotonic overrides."""
    out = _sigmoid(a * raw + b)
    constants = ~np.isnan(constant)
    if constants.any():
        out[constants] = constant[constants]
    for where, x, y in isotonic:
        out[where] = np.interp(raw[where], x, y)
    return out


def _blend(
    lgbm: npt.NDArray[np.float64],
    rules: npt.NDArray[np.float64],
    coefs: npt.NDArray[np.float64],
    has_blend: npt.NDArray[np.bool_],
) -> npt.NDArray[np.float64]:
    if not has_blend.any():
        return lgbm
    blended = _sigmoid(
        coefs[0] + coefs[1] * _logit(lgbm) + coefs[2] * rules + coefs[3] * (rules > 0)
    )
    return np.where(has_blend, blended, lgbm)


def _sigmoid(z: npt.NDArray[np.float64] | float) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64))), dtype=np.float64)


def _logit(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


def _spoken(name: str) -> str:
    """ "Home insurance" -> "home insurance"; acronyms ("ISA") stay."""
    if len(name) > 1 and name[0].isupper() and name[1].islower():
        return name[0].lower() + name[1:]
    return name


def _eligible_for(
    model: PropensityModel,
    catalogue: Catalogue,
    frame: FeatureFrame,
    data: BankData,
    as_of_ns: int,
) -> npt.NDArray[np.bool_]:
    """Rows of ``frame`` x the model's products: eligible under ``catalogue``."""
    if catalogue.product_codes == model.spec.product_codes:
        held = frame.held
    else:
        from models.data import AdoptionIndex

        index = AdoptionIndex.from_frame(
            data.adoptions,
            customer_ids=frame.customer_ids,
            product_codes=catalogue.product_codes,
        )
        held = index.held(as_of_ns)
    eligible = combine(
        rule_failures(
            catalogue,
            held=held,
            ages=frame.ages,
            segment_codes=catalogue.segment_codes(frame.segments),
        )
    )
    columns = np.asarray(
        [catalogue.index.get(code, -1) for code in model.product_codes], dtype=np.intp
    )
    out = eligible[:, np.maximum(columns, 0)]
    out[:, columns < 0] = False
    return out


def _score_frame(
    customer_ids: npt.NDArray[np.object_],
    products: npt.NDArray[np.intp],
    codes: Sequence[str],
    propensity: npt.NDArray[np.float64],
    lgbm: npt.NDArray[np.float64],
    rules: npt.NDArray[np.float64],
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": pd.Series(customer_ids, dtype="str"),
            "product_code": pd.Categorical.from_codes(products, categories=list(codes)),
            "propensity": propensity,
            "lgbm": lgbm,
            "rules": rules,
        }
    )


def _instant(as_of: DateInput) -> int:
    as_of_ns = to_ns(as_of)
    if as_of_ns == NAT_NS:
        raise ValueError("as_of is required, got a missing value")
    return as_of_ns


class _FastPredictor:
    """All boosters merged into one multiclass-layout model, scored one row per call.

    LightGBM's single-row fast C API (``LGBM_BoosterPredictForMatSingleRowFast``) on the
    merged model returns every product's raw score in one call; products with fewer
    trees are padded with one-leaf trees of value 0, which leaves the sums unchanged.
    """

    def __init__(self, model_texts: Sequence[str | None], n_features: int) -> None:
        texts = [t for t in model_texts if t is not None]
        self.n_models = len(texts)
        self.n_features = n_features
        self.n_trees = 0
        self._lock = threading.Lock()
        self.booster: lgb.Booster | None = None
        if not texts:
            return
        merged, self.n_trees = _merge_models(texts)
        self.booster = lgb.Booster(model_str=merged)
        self._predict: Any = None
        try:
            self._init_fast_path(n_features)
        except (ImportError, AttributeError, OSError, lgb.basic.LightGBMError):
            # The fast path uses LightGBM internals; if they change, Booster.predict on
            # the same merged model gives the same scores, only slower.
            self._predict = None

    def _init_fast_path(self, n_features: int) -> None:
        self._handle, self._predict = self._fast_handle(_C_API_PREDICT_RAW_SCORE, n_features)
        self._contrib_handle, self._contrib = self._fast_handle(_C_API_PREDICT_CONTRIB, n_features)

    def _fast_handle(self, predict_type: int, n_features: int) -> tuple[ctypes.c_void_p, Any]:
        assert self.booster is not None
        from lightgbm.basic import _LIB, _c_str, _safe_call  # type: ignore[attr-defined]

        handle = ctypes.c_void_p()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                self.booster._handle,
                ctypes.c_int(predict_type),
                ctypes.c_int(0),
                ctypes.c_int(-1),
                ctypes.c_int(_C_API_DTYPE_FLOAT32),
                ctypes.c_int32(n_features),
                _c_str("num_threads=1"),
                ctypes.byref(handle),
            )
        )
        # Free the fast config before the booster it points to goes.
        weakref.finalize(self, _free_fast_config, _LIB.LGBM_FastConfigFree, handle, self.booster)
        prototype = ctypes.CFUNCTYPE(
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_void_p,
        )
        return handle, prototype(("LGBM_BoosterPredictForMatSingleRowFast", _LIB))

    def predict(self, row: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Raw scores (log-odds) of every model for one float32 feature row."""
        out = np.empty(self.n_models, dtype=np.float64)
        if self.booster is None:
            return out
        row = np.ascontiguousarray(row, dtype=np.float32)
        if self._predict is None:
            return np.asarray(
                self.booster.predict(row[None, :], raw_score=True)[0], dtype=np.float64
            )
        self._call(self._predict, self._handle, row, out)
        return out

    def contributions(self, row: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """SHAP values of every model for one row: ``(n_models, n_features + 1)``, the
        last column the model's expected raw score (TreeSHAP, as ``pred_contrib``)."""
        width = self.n_features + 1
        out = np.zeros(self.n_models * width, dtype=np.float64)
        if self.booster is None:
            return out.reshape(self.n_models, width)
        row = np.ascontiguousarray(row, dtype=np.float32)
        if self._predict is None:
            values = self.booster.predict(row[None, :], pred_contrib=True, num_threads=1)
            return np.asarray(values, dtype=np.float64).reshape(self.n_models, width)
        self._call(self._contrib, self._contrib_handle, row, out)
        return out.reshape(self.n_models, width)

    def _call(
        self,
        function: Any,
        handle: ctypes.c_void_p,
        row: npt.NDArray[np.float32],
        out: npt.NDArray[np.float64],
    ) -> None:
        length = ctypes.c_int64()
        with self._lock:
            code = function(handle, row.ctypes.data, ctypes.byref(length), out.ctypes.data)
        if code != 0:
            from lightgbm.basic import _LIB  # type: ignore[attr-defined]

            raise lgb.basic.LightGBMError(_LIB.LGBM_GetLastError().decode("utf-8"))


def _free_fast_config(free: Any, handle: ctypes.c_void_p, booster: lgb.Booster) -> None:
    free(handle)


_EMPTY_TREE: Final[str] = (
    "num_leaves=1\nnum_cat=0\nsplit_feature=\nsplit_gain=\nthreshold=\ndecision_type=\n"
    "left_child=\nright_child=\nleaf_value=0\nleaf_weight=\nleaf_count=\ninternal_value=\n"
    "internal_weight=\ninternal_count=\nis_linear=0\nshrinkage=1"
)


def _merge_models(texts: Sequence[str]) -> tuple[str, int]:
    """One LightGBM text model with ``num_tree_per_iteration = len(texts)``."""
    trees = [_trees_of(text) for text in texts]
    k = len(texts)
    iterations = max(len(t) for t in trees)
    header = texts[0][: texts[0].index("tree_sizes=")]
    lines = []
    for line in header.splitlines():
        if line.startswith("num_class="):
            line = f"num_class={k}"
        elif line.startswith("num_tree_per_iteration="):
            line = f"num_tree_per_iteration={k}"
        elif line.startswith("objective="):
            line = f"objective=multiclass num_class:{k}"
        lines.append(line)
    parts = ["\n".join(lines), "\n\n"]
    n = 0
    real = 0
    for i in range(iterations):
        for j in range(k):
            tree = trees[j][i] if i < len(trees[j]) else _EMPTY_TREE
            real += i < len(trees[j])
            parts.append(f"Tree={n}\n{tree}\n\n\n")
            n += 1
    parts.append("end of trees\n\nparameters:\nend of parameters\n\npandas_categorical:null\n")
    return "".join(parts), real


def _trees_of(text: str) -> list[str]:
    """The tree blocks of a LightGBM text model, without their ``Tree=i`` lines."""
    body = text[text.index("Tree=0\n") : text.index("end of trees")]
    return [tree.strip("\n") for tree in re.split(r"(?m)^Tree=\d+\n", body)[1:]]


# --------------------------------------------------------------------------- training


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
        One cutoff only: its customers are split into training and validation.
    """

    train: tuple[pd.Timestamp, ...]
    validation: pd.Timestamp
    split_customers: bool


def plan_cutoffs(
    as_of: DateInput,
    *,
    horizon_days: int,
    first_adoption: DateInput,
    n_cutoffs: int = 6,
    step_months: int = 1,
) -> CutoffPlan:
    """Choose the training and validation cutoffs (see the module docstring).

    Parameters
    ----------
    as_of : date-like
        Training instant: every label window must end by it.
    horizon_days : int
        Label window length.
    first_adoption : date-like
        The earliest adoption in the data; a cutoff needs ``horizon_days`` of history
        after it.
    n_cutoffs, step_months : int
        Most training cutoffs, and months between them.

    Returns
    -------
    CutoffPlan

    Raises
    ------
    ValueError
        If not even one cutoff fits.
    """
    end = pd.Timestamp(_instant(as_of), unit="ns")
    horizon = pd.Timedelta(days=horizon_days)
    earliest = pd.Timestamp(_instant(first_adoption), unit="ns") + horizon
    validation = _month_floor(end - horizon)
    if validation <= earliest:
        raise ValueError(
            f"not enough history: the first adoption is {first_adoption}, so no cutoff "
            f"with {horizon_days} days of history before it and a {horizon_days}-day "
            f"label window ending by {end.date()} fits"
        )
    cutoffs: list[pd.Timestamp] = []
    t = _month_floor(validation - horizon)
    while len(cutoffs) < n_cutoffs and t > earliest:
        cutoffs.append(t)
        t = t - pd.DateOffset(months=step_months)
    if not cutoffs:
        return CutoffPlan(train=(validation,), validation=validation, split_customers=True)
    return CutoffPlan(train=tuple(cutoffs), validation=validation, split_customers=False)


def _month_floor(stamp: pd.Timestamp) -> pd.Timestamp:
    return pd.Timestamp(year=stamp.year, month=stamp.month, day=1)


@dataclass
class _Rows:
    """Sampled rows of one product, accumulated over cutoffs."""

    values: list[npt.NDArray[np.float32]] = field(default_factory=list)
    labels: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    weights: list[npt.NDArray[np.float64]] = field(default_factory=list)
    folds: list[npt.NDArray[np.int8]] = field(default_factory=list)
    rules: list[npt.NDArray[np.float64]] = field(default_factory=list)
    positives: int = 0
    weighted_rows: float = 0.0
    weighted_positives: float = 0.0

    def add(
        self,
        values: npt.NDArray[np.float32],
        labels: npt.NDArray[np.bool_],
        weights: npt.NDArray[np.float64],
        folds: npt.NDArray[np.int8],
        rules: npt.NDArray[np.float64],
    ) -> None:
        self.values.append(values)
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
        """Values, labels, weights, folds and exact rule confidences (the values are
        released: call once)."""
        if not self.values:
            return (
                np.empty((0, n_features), dtype=np.float32),
                np.empty(0, dtype=bool),
                np.empty(0),
                np.empty(0, dtype=np.int8),
                np.empty(0),
            )
        out = (
            np.concatenate(self.values),
            np.concatenate(self.labels),
            np.concatenate(self.weights),
            np.concatenate(self.folds),
            np.concatenate(self.rules),
        )
        self.values.clear()
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
    ValueError
        If the history is too short for one cutoff.
    """
    config = config or TrainConfig()
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    started = time.perf_counter()
    report_progress = progress or (lambda stage, fraction: None)
    as_of_ns = _instant(as_of)
    as_of_ts = pd.Timestamp(as_of_ns, unit="ns")
    catalogue = Catalogue.from_data(data)
    targets = _targets(catalogue, config)
    spec = FeatureSpec.fit(
        data, rule_features=config.rules, outcome_kinds=None if config.outcome_features else ()
    )
    report_progress("prepare", 0.0)
    prepared = FeatureBuilder(spec, RuleSet([], "sequence", {}) if config.rules else None).prepare(
        data
    )
    before = prepared.index.adopted < as_of_ns
    if not before.any():
        raise ValueError("no adoptions before as_of: nothing to learn from")
    first_adoption = pd.Timestamp(int(prepared.index.adopted[before].min()), unit="ns")
    plan = plan_cutoffs(
        as_of_ts,
        horizon_days=horizon_days,
        first_adoption=first_adoption,
        n_cutoffs=config.n_cutoffs,
        step_months=config.cutoff_step_months,
    )
    rng = np.random.default_rng(config.seed)
    hashes = (pd.util.hash_array(prepared.customer_ids) % np.uint64(10_000)).astype(np.int64)
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
    for i, cutoff in enumerate(cutoffs):
        report_progress(f"features at {cutoff.date()}", 0.05 + 0.4 * i / len(cutoffs))
        is_validation = plan.split_customers or cutoff == plan.validation
        frame, labels, eligible = _cutoff(prepared, spec, catalogue, config, cutoff, horizon_days)
        if forced is not None:
            sold = forced.within(frame.rows, int(cutoff.value), horizon_days * NS_PER_DAY)
            dropped_forced += int((sold & eligible).sum())
            eligible &= ~sold
        customer_hash = hashes[frame.rows]
        if plan.split_customers:
            held_out = customer_hash < int(config.validation_fraction * 10_000)
            splits = [
                (~held_out, train_rows, per_cutoff_cap, False),
                (held_out, valid_rows, config.max_validation_rows, True),
            ]
        else:
            everyone = np.ones(len(frame), dtype=bool)
            splits = [
                (everyone, valid_rows, config.max_validation_rows, True)
                if is_validation
                else (everyone, train_rows, per_cutoff_cap, False)
            ]
        for mask, sink, cap, validation in splits:
            for code in targets:
                j = catalogue.index[code]
                candidates = np.flatnonzero(eligible[:, j] & mask)
                rows, weights = _sample(
                    candidates, labels[candidates, j], config, cap, rng, validation=validation
                )
                sink[code].add(
                    frame.values[rows],
                    labels[rows, j],
                    weights,
                    (customer_hash[rows] % 2).astype(np.int8),
                    np.zeros(rows.size)
                    if frame.rule_confidence is None
                    else frame.rule_confidence[rows, spec_index[code]],
                )
        del frame, labels, eligible

    report_progress("final rules", 0.45)
    rules = None
    if config.rules:
        rules = mine_rules(
            prepared.index,
            spec.product_codes,
            as_of=as_of_ts,
            **_rule_settings(config, horizon_days),
        )
    products: list[ProductModel] = []
    report: dict[str, Any] = {"products": {}}
    params = config.lightgbm_params()
    for n, code in enumerate(targets):
        report_progress(f"training {code}", 0.5 + 0.5 * n / max(len(targets), 1))
        product, metrics = _fit_product(
            code, spec, train_rows.pop(code), valid_rows.pop(code), params, config
        )
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


def _cutoff(
    prepared: PreparedBank,
    spec: FeatureSpec,
    catalogue: Catalogue,
    config: TrainConfig,
    cutoff: pd.Timestamp,
    horizon_days: int,
) -> tuple[FeatureFrame, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Features, labels and eligibility (catalogue columns) at one cutoff."""
    t_ns = int(cutoff.value)
    rules = None
    if config.rules:
        rules = mine_rules(
            prepared.index, spec.product_codes, as_of=cutoff, **_rule_settings(config, horizon_days)
        )
    frame = FeatureBuilder(spec, rules).build(prepared, as_of=cutoff)
    labels = prepared.index.adopted_between(t_ns, t_ns + horizon_days * NS_PER_DAY)[frame.rows]
    failures = rule_failures(
        catalogue,
        held=frame.held,
        ages=frame.ages,
        segment_codes=catalogue.segment_codes(frame.segments),
    )
    return frame, labels, combine(failures)


def _sample(
    candidates: npt.NDArray[np.intp],
    labels: npt.NDArray[np.bool_],
    config: TrainConfig,
    cap: int,
    rng: np.random.Generator,
    *,
    validation: bool,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """All positives and a uniform share of negatives, weighted by 1 / share.

    Training keeps about ``negatives_per_positive`` negatives per positive (at least
    ``min_negatives``); validation keeps as many as the cap allows, since calibration
    and early stopping need the negatives' score distribution more than speed.
    """
    positives = candidates[labels]
    negatives = candidates[~labels]
    if negatives.size == 0:
        return positives, np.ones(positives.size)
    wanted = float(max(cap - positives.size, 1))
    if not validation:
        wanted = min(
            wanted, max(config.negatives_per_positive * positives.size, config.min_negatives)
        )
    share = min(1.0, wanted / negatives.size)
    kept = negatives[rng.random(negatives.size) < share] if share < 1 else negatives
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

    categorical = [c for c in spec.categorical]
    train_set = lgb.Dataset(
        x_train,
        label=y_train.astype(np.float32),
        weight=w_train,
        feature_name=list(spec.columns),
        categorical_feature=categorical,
        params={"max_bin": config.max_bin, "verbosity": -1},
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
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    text = booster.model_to_string(num_iteration=best)
    del booster, train_set, valid_set, x_train
    model = lgb.Booster(model_str=text)
    raw = np.asarray(model.predict(x_valid, raw_score=True), dtype=np.float64)

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
    best_loss = math.inf
    method = methods[0]
    lgbm_oof = np.empty(y_valid.size)
    for candidate in methods:
        oof = np.empty(y_valid.size)
        for fit, apply in fits:
            oof[apply] = _fit_calibrator(candidate, raw[fit], y_valid[fit], w_valid[fit]).apply(
                raw[apply]
            )
        loss = _log_loss(y_valid, w_valid, oof)
        # A more flexible calibrator must win by a margin, not by noise.
        if loss < best_loss * (1 - 1e-4):
            best_loss, method, lgbm_oof = loss, candidate, oof
    blend_oof = lgbm_oof.copy()
    if config.blend and rule_column >= 0:
        for fit, apply in fits:
            calibrated = _fit_calibrator(method, raw[fit], y_valid[fit], w_valid[fit]).apply(
                raw[fit]
            )
            blend = _fit_blend(calibrated, rules_valid[fit], y_valid[fit], w_valid[fit])
            if blend is not None:
                blend_oof[apply] = blend.apply(lgbm_oof[apply], rules_valid[apply])
    use_blend = (
        config.blend
        and rule_column >= 0
        and _log_loss(y_valid, w_valid, blend_oof)
        < _log_loss(y_valid, w_valid, lgbm_oof) * (1 - 1e-3)
    )
    calibrator = _fit_calibrator(method, raw, y_valid, w_valid)
    blend = _fit_blend(calibrator.apply(raw), rules_valid, y_valid, w_valid) if use_blend else None
    propensity_oof = blend_oof if use_blend else lgbm_oof
    metrics.update(
        kind="lightgbm",
        n_trees=int(best),
        calibration=method,
        blend=bool(use_blend),
    )
    metrics.update(_metrics(y_valid, w_valid, _sigmoid(raw), lgbm_oof, rules_valid, propensity_oof))
    return ProductModel(code, text, calibrator, blend, base_rate), metrics


def _fit_calibrator(
    method: str,
    raw: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
) -> Calibrator:
    if method == "identity":
        return Calibrator("platt", params=(1.0, 0.0))
    if method == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(raw, labels.astype(np.float64), sample_weight=weights)
        return Calibrator(
            "isotonic",
            x=tuple(float(v) for v in iso.X_thresholds_),
            y=tuple(float(v) for v in iso.y_thresholds_),
        )
    platt = LogisticRegression(C=1e4, max_iter=1000)
    platt.fit(raw[:, None], labels, sample_weight=weights)
    return Calibrator("platt", params=(float(platt.coef_[0, 0]), float(platt.intercept_[0])))


def _fit_blend(
    lgbm: npt.NDArray[np.float64],
    rules: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
) -> Blend | None:
    if not labels.any() or labels.all():
        return None
    design = np.column_stack([_logit(lgbm), rules, (rules > 0).astype(np.float64)])
    stack = LogisticRegression(C=10.0, max_iter=1000)
    stack.fit(design, labels, sample_weight=weights)
    c = stack.coef_[0]
    return Blend(float(stack.intercept_[0]), float(c[0]), float(c[1]), float(c[2]))


def _log_loss(
    labels: npt.NDArray[np.bool_], weights: npt.NDArray[np.float64], p: npt.NDArray[np.float64]
) -> float:
    q = np.clip(p, _EPS, 1 - _EPS)
    losses = -np.where(labels, np.log(q), np.log(1 - q))
    return float(np.sum(weights * losses) / np.sum(weights)) if weights.size else math.nan


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
        "log_loss_propensity": _log_loss(labels, weights, propensity),
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
