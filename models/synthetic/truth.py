"""The monthly hazard model a synthetic bank is drawn from, and how it is stored.

:class:`TruthModel` describes the bank: its products (:class:`ProductSpec`), the hidden
personas and their base hazards (:class:`Persona`), attribute effects
(:class:`AttributeEffect`), planted paths (:class:`PathRule`) and how customers answer
offers (:class:`OfferResponse`). It is plain data that round-trips through JSON
(``truth/model.json``); :mod:`models.synthetic.hazard` turns it into arrays to evaluate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from models.synthetic.dates import DAYS_PER_MONTH, FloatArray

TRUTH_FORMAT = "nbo-synthetic-truth"
TRUTH_VERSION = 1


@dataclass(frozen=True)
class ProductSpec:
    """A product of the catalogue with its eligibility and closing behaviour.

    Attributes
    ----------
    code, name, category : str
        Identity as written to ``products.csv``.
    value : float
        Business value of one adoption.
    min_age, max_age : int or None
        Inclusive age limits at adoption time.
    segments : tuple of str
        Segments allowed to adopt; empty means all.
    requires : tuple of str
        Products that must all be held when adopting this one.
    excludes : tuple of str
        Products that must not be held when adopting this one (one-sided:
        list both directions for mutually exclusive products).
    close_hazard : float
        Monthly probability that a held adoption closes.
    close_hazard_over_max_age : float or None
        Monthly closing probability once the holder is older than
        ``max_age`` (an account outgrown); ``None`` means ``close_hazard``.
    withdrawn : date or None
        Last day the product was sold; ``active`` is false when it is on or
        before the end of the bank's history.
    business_weight : float
        Written as is to ``products.csv``.
    """

    code: str
    name: str
    category: str
    value: float
    min_age: int | None
    max_age: int | None
    segments: tuple[str, ...]
    requires: tuple[str, ...]
    excludes: tuple[str, ...]
    close_hazard: float
    close_hazard_over_max_age: float | None = None
    withdrawn: date | None = None
    business_weight: float = 1.0


@dataclass(frozen=True)
class Persona:
    """A hidden customer type: its share of customers and base monthly hazards.

    Attributes
    ----------
    name : str
        Persona name, as in ``truth/personas.csv``.
    share : float
        Probability that a new customer has this persona.
    base_hazard : dict of str to float
        Monthly probability of adopting each product (every catalogue code)
        before attribute effects, paths and the onboarding boost.
    """

    name: str
    share: float
    base_hazard: dict[str, float]


@dataclass(frozen=True)
class AttributeEffect:
    """Multiply one product's hazard for customers whose attribute matches.

    ``attribute`` is a ``customers`` column or ``"age"`` (age in whole years
    at the start of the exposure, re-evaluated every month). The customer
    matches when ``attribute <op> value`` holds (``op`` one of ``eq``, ``ne``,
    ``ge``, ``lt``) and, if ``personas`` is not empty, their persona is listed.
    """

    product: str
    attribute: str
    op: Literal["eq", "ne", "ge", "lt"]
    value: float | str
    multiplier: float
    personas: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathRule:
    """A planted path: holding ``antecedents`` multiplies ``target``'s hazard.

    While every antecedent is held, the target's hazard is multiplied by
    ``1 + (peak - 1) * w(m)``, where ``m`` is the number of months since the
    last antecedent was adopted and ``w`` interpolates linearly between
    ``(profile_months, profile_weights)`` (flat beyond the last point).
    ``peak`` is ``multiplier`` when the antecedents were adopted in the
    listed order (same day counts as in order), ``unordered_multiplier``
    otherwise. ``persona`` names who the path was planted for; the rule
    applies to every customer.
    """

    name: str
    antecedents: tuple[str, ...]
    target: str
    multiplier: float
    unordered_multiplier: float
    profile_months: tuple[float, ...]
    profile_weights: tuple[float, ...]
    persona: str = ""


@dataclass(frozen=True)
class OfferResponse:
    """How the bank's customers respond to an offer of a product.

    A customer offered product ``p`` on day ``d`` accepts with their true propensity
    for it::

        min(1, acceptance_multiplier * (1 - (1 - h) ** (acceptance_horizon_days / 30.4375)))

    where ``h`` is their monthly adoption hazard of ``p`` on ``d`` (the
    :class:`TruthModel` formula, 0 when not eligible): the chance they would adopt
    ``p`` within the horizon if that hazard held. Otherwise they say ``not_now``
    (share ``not_now_share``) or decline. An accepted offer is an adoption that
    day. A decline multiplies the hazard of ``p`` by ``decline_multiplier`` in every
    month that starts less than ``decline_months`` months after it (this also
    lowers the chance of accepting ``p`` again); ``not_now`` changes nothing.

    Attributes
    ----------
    acceptance_horizon_days : float
        Horizon of the propensity a customer accepts with.
    acceptance_multiplier : float
        Scales the acceptance probability (0: nobody ever accepts).
    not_now_share : float
        Share of the offers not accepted that are answered ``not_now``.
    decline_multiplier : float
        Hazard multiplier of a recently declined product (1: a decline has no effect).
    decline_months : float
        How long a decline damps the product's hazard.
    """

    acceptance_horizon_days: float = 90.0
    acceptance_multiplier: float = 1.0
    not_now_share: float = 0.3
    decline_multiplier: float = 0.25
    decline_months: float = 6.0

    def __post_init__(self) -> None:
        if self.acceptance_horizon_days <= 0 or self.acceptance_multiplier < 0:
            raise ValueError("the acceptance horizon must be positive, the multiplier >= 0")
        if not 0.0 <= self.not_now_share <= 1.0:
            raise ValueError("not_now_share must be in [0, 1]")
        if self.decline_multiplier < 0 or self.decline_months < 0:
            raise ValueError("decline_multiplier and decline_months must be >= 0")

    @property
    def inert(self) -> bool:
        """Offers change nothing: nobody accepts and a decline has no effect."""
        return self.acceptance_multiplier == 0.0 and (
            self.decline_multiplier == 1.0 or self.decline_months == 0.0
        )

    def acceptance(self, hazard: ArrayLike) -> FloatArray:
        """Acceptance probability of offers whose monthly hazards are ``hazard``."""
        h = np.clip(np.asarray(hazard, dtype=np.float64), 0.0, 1.0)
        months = self.acceptance_horizon_days / DAYS_PER_MONTH
        p = self.acceptance_multiplier * -np.expm1(months * np.log1p(-np.minimum(h, 1 - 1e-12)))
        return np.asarray(np.minimum(p, 1.0), dtype=np.float64)

    def to_dict(self) -> dict[str, float]:
        return {
            "acceptance_horizon_days": self.acceptance_horizon_days,
            "acceptance_multiplier": self.acceptance_multiplier,
            "not_now_share": self.not_now_share,
            "decline_multiplier": self.decline_multiplier,
            "decline_months": self.decline_months,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OfferResponse:
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class TruthModel:
    """The monthly hazard model a synthetic bank is drawn from.

    The probability that customer ``c`` adopts product ``p`` during a
    calendar month, evaluated on the holdings at the month's start, is::

        min(max_hazard,
            base_hazard[persona(c)][p]
            * prod(matching attribute effects)
            * (1 + (onboarding_multiplier - 1) * w_onboarding(months since joining))
            * prod(path multipliers))

    when ``c`` is eligible for ``p`` (age over the exposure, segment,
    required products held, excluded products not held, not held, not
    withdrawn), and 0 otherwise. A customer exposed for only part of the
    month (the joining month) gets the hazard times the exposed fraction of
    the month's days, on a day drawn uniformly from the exposed days.

    Attributes
    ----------
    products : tuple of ProductSpec
        The catalogue, in column order of every product matrix.
    personas : tuple of Persona
        Hidden customer types.
    attribute_effects : tuple of AttributeEffect
        Hazard multipliers from customer attributes.
    paths : tuple of PathRule
        Planted ordered paths.
    onboarding_multiplier : float
        Peak boost of every hazard in the first months after joining.
    onboarding_months, onboarding_weights : tuple of float
        Time profile of the boost, in months since joining.
    max_hazard : float
        Cap on a monthly hazard.
    """

    products: tuple[ProductSpec, ...]
    personas: tuple[Persona, ...]
    attribute_effects: tuple[AttributeEffect, ...]
    paths: tuple[PathRule, ...]
    onboarding_multiplier: float = 2.5
    onboarding_months: tuple[float, ...] = (0.0, 3.0, 9.0)
    onboarding_weights: tuple[float, ...] = (1.0, 1.0, 0.0)
    max_hazard: float = 0.95
    offer_response: OfferResponse = field(default_factory=OfferResponse)

    @property
    def product_codes(self) -> tuple[str, ...]:
        """Product codes in catalogue order."""
        return tuple(p.code for p in self.products)

    @property
    def persona_names(self) -> tuple[str, ...]:
        """Persona names in model order."""
        return tuple(p.name for p in self.personas)

    def to_json(self) -> str:
        """Serialise to JSON text (stable key order; floats round-trip exactly)."""
        payload: dict[str, Any] = {
            "format": TRUTH_FORMAT,
            "version": TRUTH_VERSION,
            "products": [
                {
                    "code": p.code,
                    "name": p.name,
                    "category": p.category,
                    "value": p.value,
                    "business_weight": p.business_weight,
                    "min_age": p.min_age,
                    "max_age": p.max_age,
                    "segments": list(p.segments),
                    "requires": list(p.requires),
                    "excludes": list(p.excludes),
                    "close_hazard": p.close_hazard,
                    "close_hazard_over_max_age": p.close_hazard_over_max_age,
                    "withdrawn": p.withdrawn.isoformat() if p.withdrawn else None,
                }
                for p in self.products
            ],
            "personas": [
                {"name": q.name, "share": q.share, "base_hazard": dict(q.base_hazard)}
                for q in self.personas
            ],
            "attribute_effects": [
                {
                    "product": e.product,
                    "attribute": e.attribute,
                    "op": e.op,
                    "value": e.value,
                    "multiplier": e.multiplier,
                    "personas": list(e.personas),
                }
                for e in self.attribute_effects
            ],
            "paths": [
                {
                    "name": r.name,
                    "antecedents": list(r.antecedents),
                    "target": r.target,
                    "multiplier": r.multiplier,
                    "unordered_multiplier": r.unordered_multiplier,
                    "profile_months": list(r.profile_months),
                    "profile_weights": list(r.profile_weights),
                    "persona": r.persona,
                }
                for r in self.paths
            ],
            "onboarding": {
                "multiplier": self.onboarding_multiplier,
                "months": list(self.onboarding_months),
                "weights": list(self.onboarding_weights),
            },
            "max_hazard": self.max_hazard,
            "offer_response": self.offer_response.to_dict(),
            "days_per_month": DAYS_PER_MONTH,
        }
        return json.dumps(payload, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TruthModel:
        """Parse what :meth:`to_json` wrote.

        Raises
        ------
        ValueError
            If the text is not a truth model of a known version.
        """
        data = json.loads(text)
        if data.get("format") != TRUTH_FORMAT or data.get("version") != TRUTH_VERSION:
            raise ValueError(
                f"not a {TRUTH_FORMAT} version {TRUTH_VERSION} document: "
                f"format={data.get('format')!r} version={data.get('version')!r}"
            )
        products = tuple(
            ProductSpec(
                code=p["code"],
                name=p["name"],
                category=p["category"],
                value=float(p["value"]),
                business_weight=float(p["business_weight"]),
                min_age=p["min_age"],
                max_age=p["max_age"],
                segments=tuple(p["segments"]),
                requires=tuple(p["requires"]),
                excludes=tuple(p["excludes"]),
                close_hazard=float(p["close_hazard"]),
                close_hazard_over_max_age=p["close_hazard_over_max_age"],
                withdrawn=date.fromisoformat(p["withdrawn"]) if p["withdrawn"] else None,
            )
            for p in data["products"]
        )
        personas = tuple(
            Persona(
                q["name"], float(q["share"]), {k: float(v) for k, v in q["base_hazard"].items()}
            )
            for q in data["personas"]
        )
        effects = tuple(
            AttributeEffect(
                product=e["product"],
                attribute=e["attribute"],
                op=e["op"],
                value=e["value"],
                multiplier=float(e["multiplier"]),
                personas=tuple(e["personas"]),
            )
            for e in data["attribute_effects"]
        )
        paths = tuple(
            PathRule(
                name=r["name"],
                antecedents=tuple(r["antecedents"]),
                target=r["target"],
                multiplier=float(r["multiplier"]),
                unordered_multiplier=float(r["unordered_multiplier"]),
                profile_months=tuple(float(x) for x in r["profile_months"]),
                profile_weights=tuple(float(x) for x in r["profile_weights"]),
                persona=r["persona"],
            )
            for r in data["paths"]
        )
        onboarding = data["onboarding"]
        return cls(
            products=products,
            personas=personas,
            attribute_effects=effects,
            paths=paths,
            onboarding_multiplier=float(onboarding["multiplier"]),
            onboarding_months=tuple(float(x) for x in onboarding["months"]),
            onboarding_weights=tuple(float(x) for x in onboarding["weights"]),
            max_hazard=float(data["max_hazard"]),
            # Written since offers were simulated; older documents get the default.
            offer_response=OfferResponse.from_dict(data.get("offer_response", {})),
        )
