"""Training settings of a propensity model, saved with it and read back from its bundle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`models.propensity.training.train`.

    Attributes
    ----------
    n_cutoffs : int
        Most training cutoffs (monthly, most recent first).
    cutoff_step_months : int
        Months between training cutoffs.
    products : tuple of str or None
        Products to model (default: every active product).
    negatives_per_positive : float
        Negatives kept per positive at each cutoff (reweighted), when a cutoff's rows do
        not fit the cutoff's share of ``max_rows_per_product``; when they fit, every row
        is kept (sampling only buys speed, and small data need every negative).
    min_negatives : int
        Negatives kept at least, per product and cutoff, when there are that many.
    max_rows_per_product : int
        Training rows per product over all cutoffs, at most.
    max_validation_rows : int
        Validation rows per product, at most.
    min_positives : int
        Training positives a product needs for a booster; below it the product is
        scored with its base rate.
    learning_rate, max_learning_rate : float
        Boosting rate of a product with up to 20,000 training rows, and the most it
        grows to with more rows (with their square root: 3x at 180,000). Small data get
        a small rate: they are early-stopped, many small steps find the stopping round
        more precisely, and their rounds cost little. A round's time grows with the
        rows and its noise shrinks, so large data take larger steps.
    max_rounds, early_stopping_rounds : int
        Most boosting rounds, and rounds without a better validation log loss before
        stopping, at ``learning_rate`` (scaled down as the rate grows: 50 rounds at
        0.05 is 2.5 in rate units, as 20 at 0.15 was).
    num_leaves : int
        Most leaves per tree; each product gets one leaf per ``positives_per_leaf``
        training positives, from 2 (stumps: an additive model for tiny data) up to this.
    positives_per_leaf : int
        Training positives per leaf of a product's trees.
    min_data_in_leaf : int
        Fewest rows in a leaf, whatever the data (LightGBM's own default).
    leaf_positives : float
        Positives a leaf must expect at the product's training rate: a leaf holds at
        least ``leaf_positives / rate`` rows (and at most half its share of the rows);
        a category group of a native categorical split needs as many. Rare products get
        large leaves, so no leaf's rate rests on one or two responders.
    feature_fraction, bagging_fraction, lambda_l2, max_bin
        LightGBM settings.
    num_threads : int
        Threads training may use (0: every core the process may use). Products are
        boosted in parallel, one thread each while there are products enough: a
        booster of a few hundred thousand rows gains little from more threads, which
        wait on each other (and, on a busy machine, spin) at every histogram.
    refit : bool
        After early stopping, train the served booster again for the same rounds on the
        training and validation rows together: a third more customers in the
        single-cutoff plan, the most recent cutoff in the monthly one. Calibrator and
        blend stay those fitted out of sample on the early-stopped booster's validation
        scores, as do the reported validation metrics.
    seed : int
        Seeds sampling and LightGBM; the same data and seed give the same model.
    calibration : {"auto", "identity", "platt", "isotonic"}
        Calibrator. ``auto`` picks, per product, among none (``identity``), Platt and
        (with enough positives) isotonic by cross-fitted validation log loss: a more
        flexible one only when it wins by more than two standard errors of the paired
        difference. A calibrator that would reorder the booster's ranking (a falling
        Platt curve, a flat isotonic fit) is never used.
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
    learning_rate: float = 0.05
    max_learning_rate: float = 0.15
    num_leaves: int = 15
    positives_per_leaf: int = 20
    min_data_in_leaf: int = 20
    leaf_positives: float = 3.0
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 10.0
    max_bin: int = 63
    max_rounds: int = 1_000
    early_stopping_rounds: int = 50
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
    refit: bool = True

    def __post_init__(self) -> None:
        if self.forced_sales not in ("keep", "drop"):
            raise ValueError(f"forced_sales must be 'keep' or 'drop', not {self.forced_sales!r}")
        if not 0 < self.learning_rate <= self.max_learning_rate:
            raise ValueError(
                f"learning_rate must be above 0 and at most max_learning_rate "
                f"({self.max_learning_rate}), not {self.learning_rate}"
            )
        for name, least in (
            ("num_leaves", 2),
            ("positives_per_leaf", 1),
            ("min_data_in_leaf", 1),
            ("max_rounds", 1),
            ("early_stopping_rounds", 1),
        ):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, not {getattr(self, name)}")
        if self.leaf_positives < 0:
            raise ValueError(f"leaf_positives must be at least 0, not {self.leaf_positives}")

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
        """The LightGBM parameters every product's booster starts from; leaves and leaf
        sizes are then sized to the product's data (``num_leaves`` is the most), and a
        model's report records each product's."""
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
