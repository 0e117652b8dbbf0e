"""Calibration and blend: how a booster's raw score becomes the served propensity.

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

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Blend",
    "Calibrator",
    "fit_blend",
    "fit_calibrator",
    "log_loss",
    "logit",
    "sigmoid",
]

_EPS: Final[float] = 1e-6


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
            return sigmoid(self.params[0] * raw + self.params[1])
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
        return sigmoid(
            self.intercept
            + self.coef_lgbm * logit(lgbm)
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


def fit_calibrator(
    method: str,
    raw: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
) -> Calibrator:
    """Fit a calibrator of raw scores to weighted labels.

    Parameters
    ----------
    method : {"identity", "platt", "isotonic"}
        ``identity`` keeps the booster's own probability (Platt with ``a=1, b=0``).
    raw : numpy.ndarray
        The booster's raw scores (log-odds).
    labels : numpy.ndarray
        bool outcomes.
    weights : numpy.ndarray
        Row weights.

    Returns
    -------
    Calibrator
    """
    if method == "identity":
        return Calibrator("platt", params=(1.0, 0.0))
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression  # fitting only: see _logistic

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(raw, labels.astype(np.float64), sample_weight=weights)
        return Calibrator(
            "isotonic",
            x=tuple(float(v) for v in iso.X_thresholds_),
            y=tuple(float(v) for v in iso.y_thresholds_),
        )
    platt = _logistic(C=1e4, max_iter=1000)
    platt.fit(raw[:, None], labels, sample_weight=weights)
    return Calibrator("platt", params=(float(platt.coef_[0, 0]), float(platt.intercept_[0])))


def fit_blend(
    lgbm: npt.NDArray[np.float64],
    rules: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    weights: npt.NDArray[np.float64],
) -> Blend | None:
    """Fit the logistic stack of calibrated LightGBM and rules to weighted labels.

    Parameters
    ----------
    lgbm : numpy.ndarray
        Calibrated LightGBM probabilities.
    rules : numpy.ndarray
        Best applicable rule's confidence, 0 where none applies.
    labels : numpy.ndarray
        bool outcomes.
    weights : numpy.ndarray
        Row weights.

    Returns
    -------
    Blend or None
        None when the labels are all one class (nothing to fit).
    """
    if not labels.any() or labels.all():
        return None
    design = np.column_stack([logit(lgbm), rules, (rules > 0).astype(np.float64)])
    stack = _logistic(C=10.0, max_iter=1000)
    stack.fit(design, labels, sample_weight=weights)
    c = stack.coef_[0]
    return Blend(float(stack.intercept_[0]), float(c[0]), float(c[1]), float(c[2]))


def _logistic(**params: Any) -> Any:
    """scikit-learn's logistic regression, imported when a calibrator or blend is fitted:
    applying them needs NumPy alone, and a serving worker that imported scikit-learn (and
    SciPy with it) spent about a second and tens of MiB of its memory on them."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**params)


def log_loss(
    labels: npt.NDArray[np.bool_], weights: npt.NDArray[np.float64], p: npt.NDArray[np.float64]
) -> float:
    """Weighted mean log loss of probabilities ``p`` (clipped away from 0 and 1); NaN
    without rows. Calibrators and the blend are chosen by it."""
    q = np.clip(p, _EPS, 1 - _EPS)
    losses = -np.where(labels, np.log(q), np.log(1 - q))
    return float(np.sum(weights * losses) / np.sum(weights)) if weights.size else math.nan


def sigmoid(z: npt.NDArray[np.float64] | float) -> npt.NDArray[np.float64]:
    """Probabilities of log-odds."""
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64))), dtype=np.float64)


def logit(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Log-odds of probabilities, clipped away from 0 and 1 so they stay finite."""
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)
