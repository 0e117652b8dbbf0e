"""The trained propensity model, and how it scores: in batch and one customer at a time.

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

All boosters are merged into one model for the one-customer path (see
:mod:`models.propensity.predictor`); batch scoring uses each product's own booster.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.data import AdoptionIndex, BankData, CustomerState, DateInput, instant
from models.eligibility import Catalogue, combine, rule_failures, state_arrays
from models.features import FeatureBuilder, FeatureFrame, FeatureSpec, joined_before
from models.propensity.calibration import Blend, Calibrator, logit, sigmoid
from models.propensity.config import TrainConfig
from models.propensity.native import NativeBooster
from models.propensity.predictor import FastPredictor
from models.reasons import MAX_COLUMNS as MAX_PROFILE_COLUMNS
from models.reasons import profile_columns
from models.rules import Rule, RuleSet, rule_sentence

__all__ = [
    "Contribution",
    "Explanation",
    "ProductModel",
    "ProductScore",
    "PropensityModel",
]

_PREDICT_CHUNK: Final[int] = 200_000
_SCORE_CUSTOMERS: Final[int] = 200_000
"""Customers :meth:`PropensityModel.score` builds features for at once."""


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


@dataclass(frozen=True, eq=False)
class PropensityModel:
    """A trained propensity model: immutable, safe to share between threads.

    Build it with :func:`models.propensity.training.train` or
    :func:`models.artifacts.load_bundle`.

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
        Validation metrics per product (see :func:`models.propensity.training.train`).
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
        catalogue = catalogue if catalogue is not None else Catalogue.from_data(data)
        as_of_ns = instant(as_of)
        prepared = runtime.builder.prepare(data)
        population = joined_before(prepared, as_of_ns)
        held = None
        if catalogue.product_codes != self.spec.product_codes:
            held = AdoptionIndex.from_frame(
                data.adoptions,
                customer_ids=prepared.customer_ids,
                product_codes=catalogue.product_codes,
            ).held(as_of_ns)[population]
        # A chunk of customers at a time: the features of a whole bank (a row of every
        # column per customer) would be held at once for nothing, since each chunk's
        # pairs come out in customer order, as the whole bank's would.
        parts = []
        for start in range(0, population.size, _SCORE_CUSTOMERS):
            rows = population[start : start + _SCORE_CUSTOMERS]
            frame = runtime.builder.build(prepared, as_of=as_of_ns, rows=rows)
            part = self._score_rows(
                frame,
                catalogue,
                None if held is None else held[start : start + rows.size],
                uncalibrated=uncalibrated,
            )
            if part is not None:
                parts.append(part)
        if not parts:
            empty = _score_frame(
                np.array([], dtype=object),
                np.array([], dtype=np.intp),
                self.product_codes,
                *(np.array([]),) * 3,
            )
            if uncalibrated:
                empty["lgbm_uncalibrated"] = np.array([])
            return empty
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def _score_rows(
        self,
        frame: FeatureFrame,
        catalogue: Catalogue,
        held: npt.NDArray[np.bool_] | None,
        *,
        uncalibrated: bool,
    ) -> pd.DataFrame | None:
        """:meth:`score` of the customers of ``frame`` (``held``: their holdings in
        ``catalogue``'s columns, when it is not the spec's); None if none is eligible."""
        runtime = self._runtime
        eligible = _eligible_for(self, catalogue, frame, held)
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
            own = lgbm if runtime.boosters[k] is None else sigmoid(raw)
            pieces.append((propensity, lgbm, rules, own))
        if not pieces:
            return None
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
        as_of_ns = instant(as_of)
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
        as_of_ns = instant(as_of)
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

    def spoken_name(self, product_code: str) -> str:
        """The product's catalogue name as it reads inside a sentence ("home insurance");
        the code itself for a product the catalogue does not name."""
        return self._runtime.spoken_names.get(product_code, product_code)

    def profile_columns(self, limit: int = MAX_PROFILE_COLUMNS) -> dict[str, tuple[str, ...]]:
        """Per product with a booster, the columns a customer can be described by aloud
        (age, time with the bank, segment, attributes that may be argued from) that
        its booster gains most from, strongest first: what a profile reason may name
        (:func:`models.reasons.profile_columns` over :meth:`feature_importance`)."""
        attributes = [name for name, _ in self.spec.attributes]
        return profile_columns(self.feature_importance(), attributes, limit=limit)

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


class _Runtime:
    """The scoring machinery of a model, built once when the model is made."""

    def __init__(self, model: PropensityModel) -> None:
        spec = model.spec
        self.builder = FeatureBuilder(spec, model.rules if spec.rule_features else None)
        codes = tuple(p.product_code for p in model.products)
        self.product_index = {code: k for k, code in enumerate(codes)}
        self.spec_columns = np.asarray([spec.product_codes.index(c) for c in codes], dtype=np.intp)
        self.boosters: list[NativeBooster | None] = [
            None if p.model_text is None else NativeBooster(p.model_text) for p in model.products
        ]
        self.fast = FastPredictor([p.model_text for p in model.products], len(spec.columns))
        self._explainers: dict[int, FastPredictor | None] = {}
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

    def explainer(self, k: int) -> FastPredictor | None:
        """Product ``k``'s booster alone, for single-row TreeSHAP; None without a booster."""
        # Made once under the lock and never removed, so a hit needs no lock.
        if k in self._explainers:
            return self._explainers[k]
        with self._explainers_lock:
            if k not in self._explainers:
                text = self.products[k].model_text
                n_features = self.fast.n_features
                self._explainers[k] = None if text is None else FastPredictor([text], n_features)
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
            out[start : start + chunk.size] = booster.predict(values[chunk])
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
    out = sigmoid(a * raw + b)
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
    blended = sigmoid(coefs[0] + coefs[1] * logit(lgbm) + coefs[2] * rules + coefs[3] * (rules > 0))
    return np.where(has_blend, blended, lgbm)


def _spoken(name: str) -> str:
    """ "Home insurance" -> "home insurance"; acronyms ("ISA") stay."""
    if len(name) > 1 and name[0].isupper() and name[1].islower():
        return name[0].lower() + name[1:]
    return name


def _eligible_for(
    model: PropensityModel,
    catalogue: Catalogue,
    frame: FeatureFrame,
    held: npt.NDArray[np.bool_] | None,
) -> npt.NDArray[np.bool_]:
    """Rows of ``frame`` x the model's products: eligible under ``catalogue``
    (``held``: the rows' holdings in the catalogue's columns; None when they are the
    spec's, as ``frame.held``)."""
    eligible = combine(
        rule_failures(
            catalogue,
            held=frame.held if held is None else held,
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
