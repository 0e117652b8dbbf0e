"""Propensity models: P(customer adopts a product within a horizon | features now).

One LightGBM booster per product, trained on monthly cutoffs, calibrated and blended
with the sequence rules, and scored either in batch or one customer at a time.

- :mod:`~models.propensity.config`: :class:`TrainConfig`, the training settings.
- :mod:`~models.propensity.calibration`: calibrators and the rules blend, fitted and applied.
- :mod:`~models.propensity.model`: :class:`PropensityModel` and its scoring and explanations.
- :mod:`~models.propensity.predictor`: the one-call predictor over every product's
  booster, on LightGBM's single-row C API.
- :mod:`~models.propensity.training`: :func:`train` and its cutoffs.

The package exports what scoring needs. Training is the offline part and is imported
from :mod:`models.propensity.training` itself, so a serving worker never loads it.
"""

from models.propensity.calibration import Blend, Calibrator
from models.propensity.config import TrainConfig
from models.propensity.model import ProductModel, ProductScore, PropensityModel

__all__ = [
    "Blend",
    "Calibrator",
    "ProductModel",
    "ProductScore",
    "PropensityModel",
    "TrainConfig",
]
