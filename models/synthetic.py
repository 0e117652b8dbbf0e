"""A deterministic synthetic retail bank with its ground truth.

The bank is drawn from a monthly hazard model: every customer belongs to a
hidden persona with its own base rate of adopting each product; bank
attributes (income, dependants, digital activity, ...) scale those rates;
planted *paths* multiply the rate of a product C while its antecedents A, B
are held (more when they were adopted in the given order), following a time
profile in months since the last antecedent was adopted. Products close at
per-product monthly rates and may be adopted again later.

:func:`generate_bank` simulates the bank month by month, vectorised over all
customers; :func:`true_propensities` is the oracle: from any date's state it
gives each customer's true probability of adopting each product within a
horizon. Both call the same private hazard function, so they cannot drift.

Typical use::

    bank = generate_bank(50_000, seed=7)
    write_bank(bank, Path("data/bank"))          # import-format files + truth/
    truth, personas = read_truth(Path("data/bank"))
    oracle = true_propensities(truth, bank.customers, bank.adoptions, personas,
                               as_of=date(2025, 6, 30))
"""

from __future__ import annotations

import calendar
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "OUTCOME_VALUES",
    "AttributeEffect",
    "LiveBank",
    "NpsRule",
    "OfferResponse",
    "PathRule",
    "Persona",
    "ProductSpec",
    "SyntheticBank",
    "TruthModel",
    "default_truth",
    "generate_bank",
    "offer_acceptance",
    "read_truth",
    "true_propensities",
    "write_bank",
]

#: Mean length of a month in days; converts day gaps to months in time profiles.
DAYS_PER_MONTH = 30.4375
TRUTH_FORMAT = "nbo-synthetic-truth"
TRUTH_VERSION = 1

CUSTOMER_COLUMNS = (
    "customer_id",
    "segment",
    "branch_id",
    "joined_at",
    "birth_date",
    "gender",
    "region",
    "occupation",
    "marital_status",
    "dependants",
    "income",
    "digital_active",
)
PROPENSITY_COLUMNS = ("customer_id", "product_code", "probability")

_NO_MAX_AGE = 10_000
_NEVER = np.iinfo(np.int32).max
_EPOCH = date(1970, 1, 1)

ProgressFn = Callable[[int, int], None]
IntArray = NDArray[np.int64]
Int32Array = NDArray[np.int32]
BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
Float32Array = NDArray[np.float32]


# --------------------------------------------------------------------------- the truth model


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


def _product(
    code: str,
    name: str,
    category: str,
    value: float,
    close: float,
    *,
    ages: tuple[int | None, int | None] = (18, None),
    segments: Sequence[str] = (),
    requires: Sequence[str] = (),
    excludes: Sequence[str] = (),
    close_over_max_age: float | None = None,
    withdrawn: date | None = None,
) -> ProductSpec:
    return ProductSpec(
        code=code,
        name=name,
        category=category,
        value=value,
        min_age=ages[0],
        max_age=ages[1],
        segments=tuple(segments),
        requires=tuple(requires),
        excludes=tuple(excludes),
        close_hazard=close,
        close_hazard_over_max_age=close_over_max_age,
        withdrawn=withdrawn,
    )


_CATALOGUE = (
    _product("current_account", "Current account", "accounts", 40, 0.002),
    _product(
        "student_account",
        "Student account",
        "accounts",
        15,
        0.003,
        ages=(16, 26),
        segments=("youth",),
        excludes=("current_account", "premium_account"),
        close_over_max_age=0.2,
    ),
    _product(
        "premium_account",
        "Premium account",
        "accounts",
        300,
        0.003,
        ages=(21, None),
        segments=("mass_affluent", "affluent"),
    ),
    _product("business_account", "Business account", "accounts", 350, 0.005),
    _product("mobile_banking", "Mobile banking", "digital", 5, 0.003, ages=(16, None)),
    _product("savings_account", "Savings account", "savings", 60, 0.005, ages=(None, None)),
    _product(
        "bonus_saver",
        "Bonus saver (withdrawn mid-2023)",
        "savings",
        80,
        0.01,
        withdrawn=date(2023, 6, 30),
    ),
    _product("term_deposit", "Term deposit", "savings", 120, 0.035, requires=("savings_account",)),
    _product(
        "credit_card",
        "Credit card",
        "cards",
        150,
        0.006,
        requires=("current_account",),
        excludes=("gold_card",),
    ),
    _product(
        "gold_card",
        "Gold card",
        "cards",
        400,
        0.005,
        ages=(21, None),
        segments=("mass_affluent", "affluent"),
        requires=("premium_account",),
        excludes=("credit_card",),
    ),
    _product("overdraft", "Arranged overdraft", "loans", 90, 0.012, requires=("current_account",)),
    _product("personal_loan", "Personal loan", "loans", 600, 0.025, ages=(18, 75)),
    _product("car_loan", "Car loan", "loans", 900, 0.02, ages=(18, 75)),
    _product(
        "mortgage", "Mortgage", "loans", 2500, 0.004, ages=(21, 65), requires=("current_account",)
    ),
    _product("home_insurance", "Home insurance", "insurance", 180, 0.008),
    _product("life_insurance", "Life insurance", "insurance", 250, 0.004, ages=(18, 70)),
    _product("travel_insurance", "Travel insurance", "insurance", 60, 0.03),
    _product("car_insurance", "Car insurance", "insurance", 200, 0.01),
    _product("investment_fund", "Investment fund", "investments", 700, 0.008),
    _product("brokerage_account", "Brokerage account", "investments", 500, 0.006),
    _product("pension_plan", "Pension plan", "pension", 800, 0.002, ages=(18, 64)),
)

# Monthly adoption hazards in percent; products not listed get _NOISE_PERCENT.
_NOISE_PERCENT = 0.03
_BASE_PERCENT: dict[str, tuple[float, dict[str, float]]] = {
    "student": (
        0.14,
        {
            "current_account": 0.25,
            "mobile_banking": 4.0,
            "savings_account": 0.6,
            "bonus_saver": 0.2,
            "credit_card": 0.2,
            "overdraft": 0.3,
            "personal_loan": 0.1,
            "car_loan": 0.05,
            "travel_insurance": 0.3,
            "home_insurance": 0.05,
            "investment_fund": 0.05,
        },
    ),
    "young_professional": (
        0.24,
        {
            "current_account": 0.2,
            "premium_account": 0.1,
            "mobile_banking": 3.0,
            "savings_account": 0.8,
            "bonus_saver": 0.4,
            "credit_card": 1.4,
            "overdraft": 0.6,
            "personal_loan": 0.5,
            "car_loan": 0.4,
            "car_insurance": 0.4,
            "travel_insurance": 0.35,
            "mortgage": 0.15,
            "home_insurance": 0.1,
            "life_insurance": 0.08,
            "investment_fund": 0.2,
            "brokerage_account": 0.1,
            "pension_plan": 0.3,
        },
    ),
    "family": (
        0.28,
        {
            "mobile_banking": 2.0,
            "savings_account": 0.8,
            "bonus_saver": 0.5,
            "term_deposit": 0.1,
            "credit_card": 0.6,
            "overdraft": 0.5,
            "personal_loan": 0.5,
            "car_loan": 0.5,
            "car_insurance": 0.5,
            "mortgage": 0.9,
            "home_insurance": 0.2,
            "life_insurance": 0.25,
            "travel_insurance": 0.2,
            "investment_fund": 0.15,
            "pension_plan": 0.3,
        },
    ),
    "affluent": (
        0.09,
        {
            "current_account": 0.4,
            "premium_account": 0.3,
            "mobile_banking": 1.5,
            "savings_account": 0.5,
            "bonus_saver": 0.4,
            "term_deposit": 0.4,
            "credit_card": 0.1,
            "gold_card": 1.2,
            "car_loan": 0.1,
            "mortgage": 0.3,
            "home_insurance": 0.15,
            "life_insurance": 0.3,
            "travel_insurance": 0.5,
            "car_insurance": 0.3,
            "investment_fund": 1.0,
            "brokerage_account": 0.15,
            "pension_plan": 0.5,
        },
    ),
    "retiree": (
        0.17,
        {
            "current_account": 0.05,
            "mobile_banking": 0.5,
            "savings_account": 1.2,
            "bonus_saver": 0.6,
            "term_deposit": 0.5,
            "credit_card": 0.2,
            "personal_loan": 0.1,
            "home_insurance": 0.2,
            "life_insurance": 0.05,
            "travel_insurance": 0.3,
            "investment_fund": 0.2,
        },
    ),
    "small_business_owner": (
        0.08,
        {
            "current_account": 0.1,
            "business_account": 2.0,
            "mobile_banking": 2.0,
            "savings_account": 0.5,
            "bonus_saver": 0.3,
            "credit_card": 0.6,
            "overdraft": 0.8,
            "personal_loan": 0.8,
            "car_loan": 0.4,
            "car_insurance": 0.4,
            "mortgage": 0.3,
            "home_insurance": 0.15,
            "life_insurance": 0.2,
            "travel_insurance": 0.3,
            "investment_fund": 0.3,
            "pension_plan": 0.4,
        },
    ),
}

_ATTRIBUTE_EFFECTS = (
    AttributeEffect("current_account", "age", "ge", 22, 10.0, ("student",)),  # graduation
    AttributeEffect("mobile_banking", "digital_active", "eq", 1, 2.5),
    AttributeEffect("mobile_banking", "digital_active", "eq", 0, 0.4),
    AttributeEffect("brokerage_account", "digital_active", "eq", 1, 1.5),
    AttributeEffect("life_insurance", "dependants", "ge", 1, 2.0),
    AttributeEffect("investment_fund", "income", "ge", 6000, 1.8),
    AttributeEffect("travel_insurance", "income", "ge", 4000, 1.5),
    AttributeEffect("overdraft", "income", "lt", 1500, 1.8),
    AttributeEffect("pension_plan", "occupation", "eq", "self_employed", 2.0),
    AttributeEffect("personal_loan", "occupation", "eq", "unemployed", 0.3),
    AttributeEffect("car_loan", "region", "eq", "capital", 0.6),
    AttributeEffect("mortgage", "marital_status", "eq", "married", 1.6),
    AttributeEffect("mortgage", "age", "ge", 50, 0.4),
)

_PATHS = (
    PathRule(
        "mortgage_then_home_insurance",
        ("current_account", "mortgage"),
        "home_insurance",
        60.0,
        15.0,
        (0.0, 1.0, 4.0, 7.0, 12.0, 24.0),
        (0.25, 1.0, 1.0, 0.35, 0.1, 0.03),
        "family",
    ),
    PathRule(
        "home_cover_then_life_insurance",
        ("mortgage", "home_insurance"),
        "life_insurance",
        8.0,
        3.0,
        (0.0, 2.0, 6.0, 12.0, 24.0),
        (0.4, 1.0, 1.0, 0.4, 0.15),
        "family",
    ),
    PathRule(
        "card_then_travel_insurance",
        ("current_account", "credit_card"),
        "travel_insurance",
        10.0,
        3.0,
        (0.0, 1.0, 3.0, 6.0, 12.0),
        (0.5, 1.0, 1.0, 0.4, 0.1),
        "young_professional",
    ),
    PathRule(
        "fund_then_brokerage",
        ("premium_account", "investment_fund"),
        "brokerage_account",
        20.0,
        5.0,
        (0.0, 1.0, 3.0, 9.0, 18.0),
        (0.4, 1.0, 1.0, 0.3, 0.1),
        "affluent",
    ),
    PathRule(
        "graduate_then_credit_card",
        ("student_account", "current_account"),
        "credit_card",
        12.0,
        2.0,
        (0.0, 1.0, 4.0, 8.0, 18.0),
        (0.5, 1.0, 1.0, 0.4, 0.15),
        "student",
    ),
    PathRule(
        "savings_then_term_deposit",
        ("savings_account",),
        "term_deposit",
        5.0,
        5.0,
        (0.0, 1.0, 4.0, 12.0, 24.0),
        (0.6, 1.0, 1.0, 0.3, 0.15),
        "retiree",
    ),
    PathRule(
        "car_loan_then_car_insurance",
        ("car_loan",),
        "car_insurance",
        15.0,
        15.0,
        (0.0, 1.0, 2.0, 4.0, 8.0),
        (1.0, 1.0, 0.6, 0.2, 0.05),
    ),
    PathRule(
        "business_account_then_overdraft",
        ("current_account", "business_account"),
        "overdraft",
        5.0,
        2.0,
        (0.0, 1.0, 3.0, 6.0, 12.0),
        (0.5, 1.0, 1.0, 0.5, 0.2),
        "small_business_owner",
    ),
)


def default_truth() -> TruthModel:
    """The hazard model :func:`generate_bank` draws from.

    Returns
    -------
    TruthModel
        21 products, six personas, attribute effects and eight planted paths.
    """
    codes = [p.code for p in _CATALOGUE]
    personas = tuple(
        Persona(
            name,
            share,
            {code: rates.get(code, _NOISE_PERCENT) / 100.0 for code in codes},
        )
        for name, (share, rates) in _BASE_PERCENT.items()
    )
    return TruthModel(
        products=_CATALOGUE,
        personas=personas,
        attribute_effects=_ATTRIBUTE_EFFECTS,
        paths=_PATHS,
    )


# --------------------------------------------------------------------------- customer profiles

_SEGMENTS = ("youth", "mass", "mass_affluent", "affluent", "senior")
_GENDERS = ("F", "M")
_REGIONS = ("capital", "north", "south", "east", "west")
_BRANCHES_PER_REGION = (14, 9, 9, 9, 9)  # B001-B014 capital, B015-B023 north, ...
_OCCUPATIONS = (
    "student",
    "employee",
    "professional",
    "manager",
    "self_employed",
    "retired",
    "unemployed",
)
_MARITAL = ("single", "married", "divorced", "widowed")


@dataclass(frozen=True)
class _Profile:
    """How a persona's bank attributes are drawn (not part of the hazard model)."""

    age: tuple[float, float]  # uniform age at joining, years
    income: tuple[float, float]  # lognormal monthly income: median, sigma
    occupation: Mapping[str, float]
    marital: Mapping[str, float]
    dependants: float  # Poisson mean, added to min_dependants
    min_dependants: int
    digital: float  # P(digital_active)
    region: Mapping[str, float]
    first_product: str  # opened at joining when eligible, else current_account


def _regions(capital: float) -> dict[str, float]:
    rest = (1.0 - capital) / 4
    return {"capital": capital, "north": rest, "south": rest, "east": rest, "west": rest}


_PROFILES: dict[str, _Profile] = {
    "student": _Profile(
        (16, 25),
        (900, 0.5),
        {"student": 0.85, "employee": 0.12, "unemployed": 0.03},
        {"single": 0.96, "married": 0.04},
        0.02,
        0,
        0.92,
        _regions(0.35),
        "student_account",
    ),
    "young_professional": _Profile(
        (22, 35),
        (3000, 0.4),
        {
            "employee": 0.6,
            "professional": 0.3,
            "manager": 0.05,
            "self_employed": 0.03,
            "unemployed": 0.02,
        },
        {"single": 0.65, "married": 0.3, "divorced": 0.05},
        0.2,
        0,
        0.85,
        _regions(0.4),
        "current_account",
    ),
    "family": _Profile(
        (27, 48),
        (3800, 0.45),
        {
            "employee": 0.62,
            "professional": 0.18,
            "manager": 0.1,
            "self_employed": 0.06,
            "unemployed": 0.04,
        },
        {"single": 0.1, "married": 0.75, "divorced": 0.15},
        0.9,
        1,
        0.65,
        _regions(0.22),
        "current_account",
    ),
    "affluent": _Profile(
        (35, 72),
        (11000, 0.5),
        {"professional": 0.35, "manager": 0.4, "self_employed": 0.15, "retired": 0.1},
        {"single": 0.12, "married": 0.7, "divorced": 0.13, "widowed": 0.05},
        0.8,
        0,
        0.6,
        _regions(0.5),
        "premium_account",
    ),
    "retiree": _Profile(
        (60, 85),
        (2100, 0.45),
        {"retired": 0.92, "employee": 0.05, "self_employed": 0.03},
        {"single": 0.05, "married": 0.55, "divorced": 0.1, "widowed": 0.3},
        0.05,
        0,
        0.25,
        _regions(0.15),
        "current_account",
    ),
    "small_business_owner": _Profile(
        (28, 62),
        (5200, 0.7),
        {"self_employed": 0.85, "manager": 0.1, "employee": 0.05},
        {"single": 0.25, "married": 0.6, "divorced": 0.15},
        1.0,
        0,
        0.7,
        _regions(0.3),
        "current_account",
    ),
}


# --------------------------------------------------------------------------- public results


@dataclass(frozen=True, eq=False)
class SyntheticBank:
    """A generated bank: import-format tables plus the truth they were drawn from.

    Attributes
    ----------
    products : pandas.DataFrame
        Columns :data:`models.data.PRODUCT_COLUMNS`.
    customers : pandas.DataFrame
        Columns :data:`CUSTOMER_COLUMNS`, ordered by ``customer_id`` (which is
        also joining order); dates are ``datetime64``.
    adoptions : pandas.DataFrame
        Columns :data:`models.data.ADOPTION_COLUMNS`, sorted by ``customer_id`` then
        ``adopted_at``; ``closed_at`` is ``NaT`` while the adoption is open.
    personas : pandas.DataFrame
        ``customer_id, persona``: the hidden truth, not a customer column.
    truth : TruthModel
        The hazard model the bank was drawn from.
    start, end : datetime.date
        First and last day of the simulated history.
    outcomes : pandas.DataFrame or None
        With an offer history: :data:`models.data.OUTCOME_COLUMNS`, the offers'
        answers (``accepted``, ``declined``, ``not_now``) by day, sorted by
        ``customer_id`` then ``occurred_at``; accepted offers are also adoptions.
    """

    products: pd.DataFrame
    customers: pd.DataFrame
    adoptions: pd.DataFrame
    personas: pd.DataFrame
    truth: TruthModel
    start: date
    end: date
    outcomes: pd.DataFrame | None = None


# --------------------------------------------------------------------------- compiled model


@dataclass(frozen=True)
class _AgeEffect:
    product: int
    ge: bool
    threshold: int
    multiplier: float
    personas: tuple[int, ...]


@dataclass(frozen=True)
class _Path:
    antecedents: tuple[int, ...]
    target: int
    peak: float
    unordered_peak: float
    months: FloatArray
    weights: FloatArray


@dataclass(frozen=True)
class _Compiled:
    """A truth model turned into index arrays for vectorised evaluation."""

    truth: TruthModel
    codes: tuple[str, ...]
    index: dict[str, int]
    persona_index: dict[str, int]
    base: Float32Array  # (personas, products)
    min_age: IntArray
    max_age: IntArray
    last_day: IntArray  # last day a product is sold (day number)
    requires: tuple[tuple[int, int], ...]
    excludes: tuple[tuple[int, tuple[int, ...]], ...]
    close_rate: Float32Array
    close_over_max_age: tuple[tuple[int, float], ...]
    age_effects: tuple[_AgeEffect, ...]
    paths: tuple[_Path, ...]
    onboarding_months: FloatArray
    onboarding_weights: FloatArray


def _compile(truth: TruthModel) -> _Compiled:
    codes = truth.product_codes
    index = {c: i for i, c in enumerate(codes)}
    persona_index = {name: i for i, name in enumerate(truth.persona_names)}
    if len(index) != len(codes):
        raise ValueError("duplicate product codes in the truth model")

    def idx(code: str, where: str) -> int:
        if code not in index:
            raise ValueError(f"{where} names unknown product '{code}'")
        return index[code]

    base = np.array(
        [[q.base_hazard.get(c, 0.0) for c in codes] for q in truth.personas], dtype=np.float32
    )
    requires = []
    excludes = []
    for i, p in enumerate(truth.products):
        requires += [(i, idx(r, f"{p.code}.requires")) for r in p.requires]
        if p.excludes:
            excludes.append((i, tuple(idx(x, f"{p.code}.excludes") for x in p.excludes)))
    for effect in truth.attribute_effects:
        idx(effect.product, "attribute effect")
        unknown = set(effect.personas) - set(persona_index)
        if unknown:
            raise ValueError(f"attribute effect names unknown personas {sorted(unknown)}")
        if effect.attribute == "age" and effect.op not in ("ge", "lt"):
            raise ValueError("age effects support only the 'ge' and 'lt' operators")
    age_effects = tuple(
        _AgeEffect(
            idx(e.product, "attribute effect"),
            e.op == "ge",
            int(e.value),
            e.multiplier,
            tuple(persona_index[q] for q in e.personas),
        )
        for e in truth.attribute_effects
        if e.attribute == "age"
    )
    paths = tuple(
        _Path(
            tuple(idx(a, r.name) for a in r.antecedents),
            idx(r.target, r.name),
            r.multiplier,
            r.unordered_multiplier,
            np.asarray(r.profile_months, dtype=np.float64),
            np.asarray(r.profile_weights, dtype=np.float64),
        )
        for r in truth.paths
    )
    return _Compiled(
        truth=truth,
        codes=codes,
        index=index,
        persona_index=persona_index,
        base=base,
        min_age=np.array([p.min_age if p.min_age is not None else 0 for p in truth.products]),
        max_age=np.array(
            [p.max_age if p.max_age is not None else _NO_MAX_AGE for p in truth.products]
        ),
        last_day=np.array(
            [_day(p.withdrawn) if p.withdrawn else _NEVER for p in truth.products],
            dtype=np.int64,
        ),
        requires=tuple(requires),
        excludes=tuple(excludes),
        close_rate=np.array([p.close_hazard for p in truth.products], dtype=np.float32),
        close_over_max_age=tuple(
            (i, p.close_hazard_over_max_age)
            for i, p in enumerate(truth.products)
            if p.close_hazard_over_max_age is not None
        ),
        age_effects=age_effects,
        paths=paths,
        onboarding_months=np.asarray(truth.onboarding_months, dtype=np.float64),
        onboarding_weights=np.asarray(truth.onboarding_weights, dtype=np.float64),
    )


@dataclass(frozen=True)
class _Population:
    """Per-customer arrays the hazard needs.

    Matrices are product-major, shape ``(products, customers)``, as are all
    holdings and hazard matrices here: per-product work is then contiguous.
    """

    persona: NDArray[np.int8]
    joined: IntArray  # day numbers
    birth_year: IntArray
    birth_md: IntArray  # month * 100 + day
    segment_ok: BoolArray  # (products, n): the customer's segment allows the product
    rate: Float32Array  # (products, n): base hazard times static attribute effects

    def head(self, n: int) -> _Population:
        """The first ``n`` customers, as views."""
        return _Population(
            self.persona[:n],
            self.joined[:n],
            self.birth_year[:n],
            self.birth_md[:n],
            self.segment_ok[:, :n],
            self.rate[:, :n],
        )

    def take(self, rows: IntArray) -> _Population:
        """The customers at positions ``rows``, as copies."""
        return _Population(
            self.persona[rows],
            self.joined[rows],
            self.birth_year[rows],
            self.birth_md[rows],
            self.segment_ok[:, rows],
            self.rate[:, rows],
        )


def _population(comp: _Compiled, customers: pd.DataFrame, persona: NDArray[np.int8]) -> _Population:
    """Evaluate the static part of the model for ``customers`` (one row each)."""
    n = len(customers)
    joined = _days(customers["joined_at"])
    birth = _days(customers["birth_date"])
    if (joined < 1).any() or (joined == _NEVER).any() or (birth == _NEVER).any():
        # Day numbers >= 1 keep -1 free to mean "not held" in holdings matrices.
        raise ValueError("customers need a birth_date and a joined_at after 1970-01-01")
    birth_year, birth_md = _ymd(birth)
    segment = customers["segment"].astype(str).to_numpy()
    segment_ok = np.ones((len(comp.codes), n), dtype=bool)
    for i, spec in enumerate(comp.truth.products):
        if spec.segments:
            segment_ok[i] = np.isin(segment, spec.segments)
    rate = np.ascontiguousarray(comp.base.T[:, persona])
    for effect in comp.truth.attribute_effects:
        if effect.attribute == "age":
            continue
        if effect.attribute not in customers:
            raise ValueError(f"customers lack attribute '{effect.attribute}' used by the truth")
        hit = _compare(customers[effect.attribute], effect.op, effect.value)
        if effect.personas:
            hit &= np.isin(persona, [comp.persona_index[q] for q in effect.personas])
        rate[comp.index[effect.product]] *= np.where(hit, effect.multiplier, 1.0).astype(np.float32)
    return _Population(persona, joined, birth_year, birth_md, segment_ok, rate)


def _compare(column: pd.Series, op: str, value: float | str) -> BoolArray:
    if op in ("ge", "lt"):
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            out = numbers >= float(value) if op == "ge" else numbers < float(value)
        return np.asarray(out, dtype=bool)
    if isinstance(value, str):
        matches = column.astype(str).to_numpy() == value
    else:
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        matches = numbers == float(value)
    present = column.notna().to_numpy()
    if op == "eq":
        return np.asarray(matches & present, dtype=bool)
    if op == "ne":
        return np.asarray(~matches & present, dtype=bool)
    raise ValueError(f"unknown attribute operator '{op}'")


# --------------------------------------------------------------------------- dates and ages


def _day(d: date) -> int:
    return (d - _EPOCH).days


def _date(day: int) -> date:
    return _EPOCH + timedelta(days=int(day))


def _days(column: pd.Series) -> IntArray:
    """Day numbers of a date column (strings, dates or datetimes); NaT -> _NEVER."""
    values = np.asarray(pd.to_datetime(column, format="ISO8601"), dtype="datetime64[D]")
    out: IntArray = values.astype(np.int64)
    out[np.isnat(values)] = _NEVER
    return out


def _ymd(days: IntArray) -> tuple[IntArray, IntArray]:
    """Calendar year and ``month * 100 + day`` of day numbers."""
    d = days.astype("datetime64[D]")
    months = d.astype("datetime64[M]")
    year = months.astype("datetime64[Y]").astype(np.int64) + 1970
    month = months.astype(np.int64) % 12 + 1
    day_of_month = (d - months).astype(np.int64) + 1
    return year, month * 100 + day_of_month


def _ages(pop: _Population, day: int | IntArray) -> IntArray:
    """Age in whole years of every customer on ``day`` (a scalar or one per customer)."""
    if np.ndim(day) == 0:
        when = _date(int(day))
        return when.year - pop.birth_year - (when.month * 100 + when.day < pop.birth_md)
    days = np.asarray(day, dtype=np.int64)
    first = int(days.min()) if days.size else 0
    age = _ages(pop, first)
    differ = np.flatnonzero(days != first)
    if differ.size:
        year, md = _ymd(days[differ])
        age[differ] = year - pop.birth_year[differ] - (md < pop.birth_md[differ])
    return age


def _months(start: date, end: date) -> Iterator[tuple[int, int]]:
    """``(first_day, last_day)`` day numbers of every calendar month touching [start, end]."""
    year, month = start.year, start.month
    while (year, month) <= (end.year, end.month):
        last = calendar.monthrange(year, month)[1]
        yield _day(date(year, month, 1)), _day(date(year, month, last))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


# --------------------------------------------------------------------------- the shared hazard


def _eligible(
    comp: _Compiled, pop: _Population, held: BoolArray, *, day_from: int | IntArray, day_to: int
) -> BoolArray:
    """Which products each customer may adopt on every day of ``[day_from, day_to]``.

    Age must be within limits at both ends; the segment must be allowed;
    required products held, excluded ones not held, the product itself not
    held and still sold on ``day_to``.
    """
    ok = pop.segment_ok & ~held
    ok &= _ages(pop, day_from) >= comp.min_age[:, None]
    ok &= _ages(pop, day_to) <= comp.max_age[:, None]
    ok[comp.last_day < day_to] = False
    for p, r in comp.requires:
        ok[p] &= held[r]
    for p, excluded in comp.excludes:
        ok[p] &= ~held[list(excluded)].any(axis=0)
    return ok


def _adoption_hazard(
    comp: _Compiled,
    pop: _Population,
    since: Int32Array,
    *,
    month_start: int,
    month_end: int,
    declined: Int32Array | None = None,
) -> Float32Array:
    """Monthly adoption hazard of every (customer, product) from month-start holdings.

    Parameters
    ----------
    comp, pop
        The compiled truth and the customers.
    since : ndarray of int32, shape (products, n)
        Day each held product was adopted, -1 when not held.
    month_start, month_end
        The month's first day and the last day of exposure in it. A customer
        is exposed from ``max(month_start, joined + 1)``; eligibility must
        hold over the whole exposure.
    declined : ndarray of int32, shape (products, n), optional
        Day of the latest decline of an offer of each product before
        ``month_start``, -1 when none (:class:`OfferResponse` damping).

    Returns
    -------
    ndarray of float32, shape (products, n)
        Probability of adopting during a full month; 0 where not eligible.
        This is the one hazard both the simulation and the oracle use.
    """
    held = since >= 0
    exposure_start = np.maximum(pop.joined + 1, month_start)
    hazard = pop.rate * _eligible(comp, pop, held, day_from=exposure_start, day_to=month_end)

    tenure = np.maximum(month_start - pop.joined, 0) / DAYS_PER_MONTH
    boost = 1.0 + (comp.truth.onboarding_multiplier - 1.0) * np.interp(
        tenure, comp.onboarding_months, comp.onboarding_weights
    )
    hazard *= boost.astype(np.float32)

    if comp.age_effects:
        age = _ages(pop, exposure_start)
        for effect in comp.age_effects:
            hit = age >= effect.threshold if effect.ge else age < effect.threshold
            if effect.personas:
                hit &= np.isin(pop.persona, effect.personas)
            hazard[effect.product] *= np.where(hit, effect.multiplier, 1.0).astype(np.float32)

    for path in comp.paths:
        adopted = since[list(path.antecedents)]
        holders = np.flatnonzero((adopted >= 0).all(axis=0))
        if holders.size == 0:
            continue
        adopted = adopted[:, holders]
        months = np.maximum(month_start - adopted.max(axis=0), 0) / DAYS_PER_MONTH
        weight = np.interp(months, path.months, path.weights)
        in_order = (np.diff(adopted, axis=0) >= 0).all(axis=0)
        peak = np.where(in_order, path.peak, path.unordered_peak)
        hazard[path.target, holders] *= (1.0 + (peak - 1.0) * weight).astype(np.float32)

    if declined is not None:
        _damp_declined(comp, hazard, declined, month_start)
    np.minimum(hazard, np.float32(comp.truth.max_hazard), out=hazard)
    return hazard


def _damp_declined(
    comp: _Compiled, hazard: Float32Array, declined: Int32Array, month_start: int
) -> None:
    """Multiply, in place, the hazards of products declined within the damping window."""
    response = comp.truth.offer_response
    if response.decline_multiplier == 1.0 or response.decline_months == 0.0:
        return
    age = month_start - declined.astype(np.int64)
    recent = (declined >= 0) & (age >= 0) & (age < response.decline_months * DAYS_PER_MONTH)
    if recent.any():
        np.multiply(hazard, np.float32(response.decline_multiplier), out=hazard, where=recent)


# --------------------------------------------------------------------------- generation


def generate_bank(
    n_customers: int,
    seed: int = 0,
    *,
    start: date = date(2019, 1, 1),
    end: date = date(2025, 12, 31),
    progress: ProgressFn | None = None,
    offers_per_month: float = 0.0,
    offer_targeting: float = 0.5,
    offer_response: OfferResponse | None = None,
) -> SyntheticBank:
    """Simulate a retail bank's customers adopting products over ``[start, end]``.

    Customers join on days spread over ``[start, end]`` (more early than
    late; ``customer_id`` follows joining order), get a segment from their
    age and income at joining, and open their first account (current,
    student or premium, as their persona prefers and eligibility allows) on
    the joining day. Then, month by month and
    vectorised over all customers, each held product may close and each
    eligible product may be adopted with the probability given by
    :func:`default_truth`'s hazard model (see :class:`TruthModel`).

    Two refinements keep eligibility exact at adoption time: a product whose
    required product closes during the month is not adopted that month, and
    when two products excluding each other are both drawn in one month, the
    later one is dropped.

    With ``offers_per_month`` the bank also has an offer history: each month a
    customer is offered one product they are eligible for with that
    probability (chosen with probability ``offer_targeting`` in proportion to
    their true hazards, else uniformly), on a day of the month, and answers as
    :class:`OfferResponse` says: an acceptance is an adoption that day, a
    decline damps the product's hazard for months. Offers draw from their own
    random stream, so without offers the bank is exactly the one drawn before
    offers existed.

    Parameters
    ----------
    n_customers : int
        Number of customers (at least 1).
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed and arguments
        give the same bank.
    start, end : datetime.date
        First and last day of the history.
    progress : callable, optional
        Called as ``progress(done, total)`` after each simulated month.
    offers_per_month : float
        Chance that a customer is offered a product in a month (0: no offers,
        no ``outcomes``).
    offer_targeting : float
        Share of the offers targeted by the true hazard, in [0, 1].
    offer_response : OfferResponse, optional
        How customers answer offers (default ``OfferResponse()``); part of the
        returned truth.

    Returns
    -------
    SyntheticBank
    """
    if n_customers < 1:
        raise ValueError("n_customers must be at least 1")
    if end <= start:
        raise ValueError("end must be after start")
    if not 0.0 <= offers_per_month <= 1.0 or not 0.0 <= offer_targeting <= 1.0:
        raise ValueError("offers_per_month and offer_targeting must be in [0, 1]")
    truth = default_truth()
    if offer_response is not None:
        truth = replace(truth, offer_response=offer_response)
    comp = _compile(truth)
    rng = np.random.default_rng(seed)
    customers, persona, first_product = _draw_customers(comp, rng, n_customers, start, end)
    pop = _population(comp, customers, persona)
    plan = None
    if offers_per_month > 0:
        plan = _OfferPlan(
            offers_per_month, offer_targeting, np.random.default_rng([seed, _OFFER_STREAM])
        )
    events, log = _simulate(comp, pop, first_product, rng, start, end, progress, plan)
    ids = pa.array(customers["customer_id"].to_numpy(dtype=object), pa.string())
    names = np.asarray(truth.persona_names, dtype=object)
    personas = pd.DataFrame(
        {"customer_id": customers["customer_id"], "persona": pd.Series(names[persona], dtype="str")}
    )
    return SyntheticBank(
        products=_products_frame(truth, end),
        customers=customers,
        adoptions=_adoptions_frame(comp, ids, events),
        personas=personas,
        truth=truth,
        start=start,
        end=end,
        outcomes=None if log is None else _outcomes_frame(comp, ids, log),
    )


_OFFER_STREAM = 0x0FFE  # second seed word of the offers' random stream


def _outcomes_frame(comp: _Compiled, ids: pa.Array, log: _OfferLog) -> pd.DataFrame:
    """The offer history as an import-format outcomes table."""

    def joined(parts: list[Any], dtype: Any) -> NDArray[Any]:
        return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)

    customer = joined(log.customer, np.int64)
    product = joined(log.product, np.int64)
    outcome = joined(log.outcome, np.int64)
    day = joined(log.day, np.int64)
    order = np.lexsort((product, day, customer))
    codes = pa.array(list(comp.codes), pa.string())
    values = pa.array(list(OUTCOME_VALUES), pa.string())
    return pd.DataFrame(
        {
            "customer_id": ids.take(pa.array(customer[order])).to_pandas(),
            "product_code": codes.take(pa.array(product[order])).to_pandas(),
            "outcome": values.take(pa.array(outcome[order])).to_pandas(),
            "occurred_at": day[order].astype("datetime64[D]").astype("datetime64[s]"),
        }
    )


def _choose(rng: np.random.Generator, group: NDArray[np.int8], table: FloatArray) -> IntArray:
    """Draw one category per row with probabilities ``table[group]`` (rows sum to 1)."""
    cumulative = np.cumsum(table, axis=1)
    cumulative[:, -1] = 1.0
    u = rng.random(group.size)
    chosen: IntArray = (u[:, None] >= cumulative[group]).sum(axis=1)
    return chosen


def _draw_customers(
    comp: _Compiled, rng: np.random.Generator, n: int, start: date, end: date
) -> tuple[pd.DataFrame, NDArray[np.int8], IntArray]:
    truth = comp.truth
    names = truth.persona_names
    profiles = [_PROFILES[name] for name in names]
    shares = np.array([q.share for q in truth.personas])
    persona = rng.choice(len(names), size=n, p=shares / shares.sum()).astype(np.int8)

    span = _day(end) - _day(start) + 1
    # Skewed towards the start: the bank has more long-standing than brand-new customers.
    joined = _day(start) + np.sort(np.floor(span * rng.random(n) ** 1.3).astype(np.int64))
    age_lo = np.array([p.age[0] for p in profiles])[persona]
    age_hi = np.array([p.age[1] for p in profiles])[persona]
    birth = joined - np.floor(rng.uniform(age_lo, age_hi) * 365.25).astype(np.int64)
    birth_year, birth_md = _ymd(birth)
    join_year, join_md = _ymd(joined)
    age_at_join = join_year - birth_year - (join_md < birth_md)

    median = np.array([p.income[0] for p in profiles])[persona]
    sigma = np.array([p.income[1] for p in profiles])[persona]
    income = np.round(median * np.exp(sigma * rng.standard_normal(n)), -1).astype(np.int64)
    income = np.maximum(income, 200)

    def table(attr: str, categories: Sequence[str]) -> FloatArray:
        rows = [[float(getattr(p, attr).get(c, 0.0)) for c in categories] for p in profiles]
        out = np.array(rows)
        return np.asarray(out / out.sum(axis=1, keepdims=True), dtype=np.float64)

    gender = (rng.random(n) < 0.49).astype(np.int64)
    region = _choose(rng, persona, table("region", _REGIONS))
    first_branch = np.concatenate([[0], np.cumsum(_BRANCHES_PER_REGION)[:-1]])
    branch = first_branch[region] + np.floor(
        rng.random(n) * np.array(_BRANCHES_PER_REGION)[region]
    ).astype(np.int64)
    occupation = _choose(rng, persona, table("occupation", _OCCUPATIONS))
    marital = _choose(rng, persona, table("marital", _MARITAL))
    dependants = (
        rng.poisson(np.array([p.dependants for p in profiles])[persona])
        + np.array([p.min_dependants for p in profiles])[persona]
    )
    digital = (rng.random(n) < np.array([p.digital for p in profiles])[persona]).astype(np.int64)

    segment = np.select(
        [age_at_join < 25, income >= 9000, income >= 4500, age_at_join >= 65],
        [0, 3, 2, 4],
        default=1,
    )

    width = max(7, len(str(n)))
    ids = np.strings.add("C", np.strings.zfill(np.arange(1, n + 1).astype(str), width))
    branch_ids = np.strings.add("B", np.strings.zfill((branch + 1).astype(str), 3))

    def text(values: Sequence[str], codes: IntArray) -> pd.Series:
        return pd.Series(np.asarray(values, dtype=object)[codes], dtype="str")

    customers = pd.DataFrame(
        {
            "customer_id": pd.Series(ids, dtype="str"),
            "segment": text(_SEGMENTS, segment),
            "branch_id": pd.Series(branch_ids, dtype="str"),
            "joined_at": joined.astype("datetime64[D]").astype("datetime64[s]"),
            "birth_date": birth.astype("datetime64[D]").astype("datetime64[s]"),
            "gender": text(_GENDERS, gender),
            "region": text(_REGIONS, region),
            "occupation": text(_OCCUPATIONS, occupation),
            "marital_status": text(_MARITAL, marital),
            "dependants": dependants.astype(np.int64),
            "income": income,
            "digital_active": digital,
        }
    )

    # The first account at joining: the persona's preference when eligible.
    preferred = np.array([comp.index[p.first_product] for p in profiles])[persona]
    current = comp.index["current_account"]
    first_product = np.full(n, current, dtype=np.int64)
    for p in np.unique(preferred):
        rows = np.flatnonzero(preferred == p)
        spec = truth.products[p]
        ok = age_at_join[rows] >= (spec.min_age or 0)
        if spec.max_age is not None:
            ok &= age_at_join[rows] <= spec.max_age
        if spec.segments:
            ok &= np.isin(np.asarray(_SEGMENTS)[segment[rows]], spec.segments)
        first_product[rows[ok]] = p
    return customers, persona, first_product


@dataclass
class _Events:
    """Adoption and closure events in simulation order."""

    customer: list[Int32Array] = field(default_factory=list)
    product: list[NDArray[np.int8]] = field(default_factory=list)
    day: list[Int32Array] = field(default_factory=list)
    closed_customer: list[Int32Array] = field(default_factory=list)
    closed_product: list[NDArray[np.int8]] = field(default_factory=list)
    closed_day: list[Int32Array] = field(default_factory=list)

    def adopt(self, customer: IntArray, product: IntArray, day: IntArray) -> None:
        self.customer.append(customer.astype(np.int32))
        self.product.append(product.astype(np.int8))
        self.day.append(day.astype(np.int32))

    def close(self, customer: IntArray, product: IntArray, day: IntArray) -> None:
        self.closed_customer.append(customer.astype(np.int32))
        self.closed_product.append(product.astype(np.int8))
        self.closed_day.append(day.astype(np.int32))


@dataclass(frozen=True)
class _OfferPlan:
    """How the generator makes offers to its customers (an offer history)."""

    rate: float  # offers per customer-month
    targeting: float  # share of offers chosen by the true hazard, the rest uniformly
    rng: np.random.Generator


@dataclass
class _OfferLog:
    """Offers made and what the customers said, in simulation order."""

    customer: list[Int32Array] = field(default_factory=list)
    product: list[NDArray[np.int8]] = field(default_factory=list)
    outcome: list[NDArray[np.int8]] = field(default_factory=list)  # index in OUTCOME_VALUES
    day: list[Int32Array] = field(default_factory=list)


OUTCOME_VALUES = ("accepted", "declined", "not_now")
"""The answers a synthetic customer gives to an offer."""


def _simulate(
    comp: _Compiled,
    pop: _Population,
    first_product: IntArray,
    rng: np.random.Generator,
    start: date,
    end: date,
    progress: ProgressFn | None,
    offers: _OfferPlan | None = None,
) -> tuple[_Events, _OfferLog | None]:
    """Run the monthly simulation; customers are sorted by joining day."""
    n_products, n = pop.rate.shape
    since = np.full((n_products, n), -1, dtype=np.int32)
    declined = np.full((n_products, n), -1, dtype=np.int32) if offers is not None else None
    log = _OfferLog() if offers is not None else None
    events = _Events()
    end_day = _day(end)
    months = list(_months(start, end))
    active = 0
    for step, (month_start, month_last) in enumerate(months):
        month_end = min(month_last, end_day)
        days_in_month = month_last - month_start + 1
        joining = int(np.searchsorted(pop.joined, month_end, side="right"))
        if joining > active:
            new = np.arange(active, joining)
            since[first_product[new], new] = pop.joined[new]
            events.adopt(new, first_product[new], pop.joined[new])
            active = joining
        if active:
            month = _simulate_month(
                comp,
                pop.head(active),
                since[:, :active],
                rng,
                events,
                month_start,
                month_end,
                days_in_month,
                declined=None if declined is None else declined[:, :active],
            )
            if offers is not None and log is not None and declined is not None:
                _offer_month(
                    comp,
                    pop.head(active),
                    since[:, :active],
                    declined[:, :active],
                    month,
                    offers,
                    events,
                    log,
                    month_start,
                    month_end,
                    days_in_month,
                )
        if progress:
            progress(step + 1, len(months))
    return events, log


@dataclass(frozen=True, eq=False)
class _Month:
    """What one simulated month drew: its opening hazard (with offers) and its events."""

    hazard: Float32Array | None
    adopt_customer: IntArray
    adopt_product: IntArray
    close_customer: IntArray
    close_product: IntArray


def _offer_month(
    comp: _Compiled,
    pop: _Population,
    state: Int32Array,
    declined: Int32Array,
    month: _Month,
    plan: _OfferPlan,
    events: _Events,
    log: _OfferLog,
    month_start: int,
    month_end: int,
    days_in_month: int,
) -> None:
    """Make the month's offers, draw the answers and apply them to ``state`` in place.

    An offer is made on a day drawn uniformly from the customer's exposed days and
    judged on the month's opening hazard, like the month's organic adoptions. Offers
    that would clash with the month's organic events (the product itself adopted, an
    excluded product adopted, a required product closed) are not made, so eligibility
    holds at every adoption.
    """
    assert month.hazard is not None
    rng = plan.rng
    n_products, n = state.shape
    exposure_start = np.maximum(pop.joined + 1, month_start)
    exposed = np.maximum(month_end - exposure_start + 1, 0)
    chance = plan.rate * exposed / days_in_month
    customer = np.flatnonzero(rng.random(n) < chance)
    hazard = month.hazard[:, customer].astype(np.float64)
    eligible = hazard > 0
    counts = eligible.sum(axis=0)
    has = counts > 0
    customer, hazard, eligible, counts = (
        customer[has],
        hazard[:, has],
        eligible[:, has],
        counts[has],
    )
    if customer.size == 0:
        return
    weights = (1.0 - plan.targeting) * eligible / counts
    weights += plan.targeting * hazard / hazard.sum(axis=0)
    cumulative = np.cumsum(weights, axis=0)
    u = rng.random(customer.size) * cumulative[-1]
    product = np.minimum((u[None, :] >= cumulative).sum(axis=0), n_products - 1)
    product = np.where(eligible[product, np.arange(customer.size)], product, hazard.argmax(axis=0))
    lo = exposure_start[customer]
    day = lo + np.floor(rng.random(customer.size) * (month_end - lo + 1)).astype(np.int64)
    accept = comp.truth.offer_response.acceptance(hazard[product, np.arange(customer.size)])
    draw = rng.random(customer.size)
    not_now = rng.random(customer.size) < comp.truth.offer_response.not_now_share
    outcome = np.where(draw < accept, 0, np.where(not_now, 2, 1)).astype(np.int8)

    clash = _clashes(comp, month, customer, product, n_products)
    keep = ~clash
    customer, product, day, outcome = customer[keep], product[keep], day[keep], outcome[keep]
    taken = outcome == 0
    state[product[taken], customer[taken]] = day[taken]
    events.adopt(customer[taken], product[taken], day[taken])
    said_no = outcome == 1
    declined[product[said_no], customer[said_no]] = day[said_no]
    log.customer.append(customer.astype(np.int32))
    log.product.append(product.astype(np.int8))
    log.outcome.append(outcome)
    log.day.append(day.astype(np.int32))


def _clashes(
    comp: _Compiled, month: _Month, customer: IntArray, product: IntArray, n_products: int
) -> BoolArray:
    """Offers that clash with the month's organic adoptions and closures."""
    adopted = month.adopt_customer.astype(np.int64) * n_products + month.adopt_product
    closed = month.close_customer.astype(np.int64) * n_products + month.close_product
    key = customer.astype(np.int64) * n_products
    clash = np.isin(key + product, adopted)
    partners: dict[int, set[int]] = {}
    for p, excluded in comp.excludes:
        for q in excluded:
            partners.setdefault(p, set()).add(q)
            partners.setdefault(q, set()).add(p)
    for p, qs in partners.items():
        mine = np.flatnonzero(product == p)
        for q in qs:
            clash[mine] |= np.isin(key[mine] + q, adopted)
    for p, r in comp.requires:
        mine = np.flatnonzero(product == p)
        clash[mine] |= np.isin(key[mine] + r, closed)
    return clash


def _simulate_month(
    comp: _Compiled,
    pop: _Population,
    state: Int32Array,
    rng: np.random.Generator,
    events: _Events,
    month_start: int,
    month_end: int,
    days_in_month: int,
    *,
    declined: Int32Array | None = None,
) -> _Month:
    """Draw one month's closures and adoptions and apply them to ``state`` in place.

    One uniform per (product, customer) serves both: it is compared with
    the closing hazard where the product is held since before the month,
    and with the adoption hazard where it is not held. With ``declined``
    (an offer history), the month's opening hazard is returned too.
    """
    held = state >= 0
    closable = held & (state < month_start)
    del held
    draw = rng.random(state.shape, dtype=np.float32)
    window = (month_end - month_start + 1) / days_in_month
    close_threshold = (comp.close_rate * np.float32(window)).astype(np.float32)
    over_age: dict[int, Float32Array] = {}
    if comp.close_over_max_age:
        age = _ages(pop, month_start)
        for p, rate in comp.close_over_max_age:
            row = np.where(age > comp.max_age[p], rate, comp.close_rate[p]) * window
            over_age[p] = row.astype(np.float32)

    hazard = _adoption_hazard(
        comp, pop, state, month_start=month_start, month_end=month_end, declined=declined
    )
    opening = hazard.copy() if declined is not None else None
    # A product whose required product closes this month is not adopted this month.
    for p, r in comp.requires:
        closing = closable[r] & (draw[r] < over_age.get(r, close_threshold[r]))
        hazard[p] *= ~closing
    exposure_start = np.maximum(pop.joined + 1, month_start)
    exposed = np.maximum(month_end - exposure_start + 1, 0)
    partial = np.flatnonzero(exposed != days_in_month)
    if partial.size:
        hazard[:, partial] *= (exposed[partial] / days_in_month).astype(np.float32)
    np.copyto(hazard, close_threshold[:, None], where=closable)
    for p, threshold in over_age.items():
        np.copyto(hazard[p], threshold, where=closable[p])

    product, customer = np.divmod(np.flatnonzero(draw < hazard), state.shape[1])
    del draw, hazard
    closes = closable[product, customer]
    close_p, close_c = product[closes], customer[closes]
    adopt_p, adopt_c = product[~closes], customer[~closes]

    lo = exposure_start[adopt_c]
    adopt_day = lo + np.floor(rng.random(adopt_c.size) * (month_end - lo + 1)).astype(np.int64)
    keep = _resolve_exclusions(comp, adopt_c, adopt_p, adopt_day)
    adopt_c, adopt_p, adopt_day = adopt_c[keep], adopt_p[keep], adopt_day[keep]
    close_day = month_start + np.floor(
        rng.random(close_c.size) * (month_end - month_start + 1)
    ).astype(np.int64)

    state[close_p, close_c] = -1
    state[adopt_p, adopt_c] = adopt_day
    events.close(close_c, close_p, close_day)
    events.adopt(adopt_c, adopt_p, adopt_day)
    return _Month(opening, adopt_c, adopt_p, close_c, close_p)


def _resolve_exclusions(
    comp: _Compiled, customer: IntArray, product: IntArray, day: IntArray
) -> BoolArray:
    """Drop adoptions made while an excluded product adopted earlier that month is held."""
    keep = np.ones(customer.size, dtype=bool)
    for p, excluded in comp.excludes:
        mine = np.flatnonzero(product == p)
        if mine.size == 0:
            continue
        for q in excluded:
            theirs = np.flatnonzero((product == q) & keep)
            _, a, b = np.intersect1d(
                customer[mine], customer[theirs], assume_unique=True, return_indices=True
            )
            keep[mine[a][day[theirs[b]] <= day[mine[a]]]] = False
    return keep


def _adoptions_frame(comp: _Compiled, ids: pa.Array, events: _Events) -> pd.DataFrame:
    """Pair closures with adoptions and build the sorted adoptions table."""
    customer = np.concatenate(events.customer).astype(np.int64)
    product = np.concatenate(events.product).astype(np.int64)
    adopted = np.concatenate(events.day).astype(np.int64)
    closed = np.full(customer.size, _NEVER, dtype=np.int64)
    if events.closed_customer:
        c_customer = np.concatenate(events.closed_customer).astype(np.int64)
        c_product = np.concatenate(events.closed_product).astype(np.int64)
        c_day = np.concatenate(events.closed_day).astype(np.int64)
        # A closure belongs to the latest adoption of that (customer, product) before it.
        stride = np.int64(1 << 20)
        key = (customer * len(comp.codes) + product) * stride + adopted
        order = np.argsort(key, kind="stable")
        ckey = (c_customer * len(comp.codes) + c_product) * stride + c_day
        match = order[np.searchsorted(key[order], ckey, side="left") - 1]
        closed[match] = c_day
    order = np.lexsort((product, adopted, customer))
    codes = pa.array(list(comp.codes), pa.string())
    closed_sorted = closed[order]
    closed_dates = closed_sorted.astype("datetime64[D]").astype("datetime64[s]")
    closed_dates[closed_sorted == _NEVER] = np.datetime64("NaT")
    return pd.DataFrame(
        {
            "customer_id": ids.take(pa.array(customer[order])).to_pandas(),
            "product_code": codes.take(pa.array(product[order])).to_pandas(),
            "adopted_at": adopted[order].astype("datetime64[D]").astype("datetime64[s]"),
            "closed_at": closed_dates,
        }
    )


def _products_frame(truth: TruthModel, end: date) -> pd.DataFrame:
    rows = truth.products
    return pd.DataFrame(
        {
            "product_code": pd.Series([p.code for p in rows], dtype="str"),
            "name": pd.Series([p.name for p in rows], dtype="str"),
            "category": pd.Series([p.category for p in rows], dtype="str"),
            "value": np.array([p.value for p in rows], dtype=np.float64),
            "business_weight": np.array([p.business_weight for p in rows], dtype=np.float64),
            "active": np.array([p.withdrawn is None or p.withdrawn > end for p in rows]),
            "min_age": pd.array([p.min_age for p in rows], dtype="Int64"),
            "max_age": pd.array([p.max_age for p in rows], dtype="Int64"),
            "segments": pd.Series(["|".join(p.segments) for p in rows], dtype="str"),
            "requires": pd.Series(["|".join(p.requires) for p in rows], dtype="str"),
            "excludes": pd.Series(["|".join(p.excludes) for p in rows], dtype="str"),
        }
    )


# --------------------------------------------------------------------------- the oracle


def true_propensities(
    truth: TruthModel,
    customers: pd.DataFrame,
    adoptions: pd.DataFrame,
    personas: pd.DataFrame,
    *,
    as_of: date,
    horizon_days: int = 90,
    outcomes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Each customer's true probability of adopting each product within a horizon.

    The state on ``as_of`` (customers joined by then, adoptions open on that
    day with their adoption dates, ages, personas, attributes) is run
    through the same monthly hazard the simulation drew from, for every
    calendar month overlapping ``(as_of, as_of + horizon_days]``, each month
    weighted by the fraction of its days inside the horizon.

    Approximation: holdings are frozen at ``as_of`` over the horizon; the
    oracle ignores that an adoption or closure inside the horizon changes
    later months' hazards (e.g. a car loan taken in month 1 raising car
    insurance in month 2, or a closed card taken again), so it slightly
    underestimates products that follow others closely. It also uses the
    ``as_of`` holdings for the month containing ``as_of``, where the
    simulation used that month's opening holdings. Ages, months since
    adoption and tenure do advance month by month.

    Parameters
    ----------
    truth : TruthModel
        The bank's hazard model.
    customers, adoptions : pandas.DataFrame
        In the import format, as in memory or as read back from the files
        (dates may be text).
    personas : pandas.DataFrame
        ``customer_id, persona`` for every customer.
    as_of : datetime.date
        The day the state is taken (its end).
    horizon_days : int
        Length of the horizon after ``as_of``.
    outcomes : pandas.DataFrame, optional
        The bank's offer outcomes (:attr:`SyntheticBank.outcomes`): declines on or
        before ``as_of`` damp their products' hazards as in the simulation.

    Returns
    -------
    pandas.DataFrame
        ``customer_id, product_code, probability`` for every product a
        customer joined by ``as_of`` does not hold and is eligible for on
        ``as_of``; ordered by customer as in ``customers``, then catalogue
        order. ``product_code`` is categorical over the catalogue (12 million
        rows for a million customers, so the codes are not repeated as text).
    """
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    comp = _compile(truth)
    as_of_day = _day(as_of)
    joined = _days(customers["joined_at"])
    present = customers.loc[joined <= as_of_day].reset_index(drop=True)
    persona_of = pd.Series(
        personas["persona"].astype(str).to_numpy(), index=personas["customer_id"].astype(str)
    )
    names = persona_of.reindex(present["customer_id"].astype(str).to_numpy())
    if names.isna().any():
        missing = names.index[names.isna()][0]
        raise ValueError(f"no persona for customer '{missing}'")
    unknown = set(names.unique()) - set(comp.persona_index)
    if unknown:
        raise ValueError(f"personas not in the truth model: {sorted(unknown)}")
    persona = names.map(comp.persona_index).to_numpy(dtype=np.int8)
    pop = _population(comp, present, persona)
    since = _holdings(comp, present["customer_id"], adoptions, as_of_day)
    declined = None
    if outcomes is not None:
        declined = _declines(comp, present["customer_id"], outcomes, as_of_day)

    held = since >= 0
    eligible = _eligible(comp, pop, held, day_from=as_of_day, day_to=as_of_day)
    survival = np.ones(since.shape, dtype=np.float64)
    first, last = as_of_day + 1, as_of_day + horizon_days
    for month_start, month_end in _months(_date(first), _date(last)):
        hazard = _adoption_hazard(
            comp, pop, since, month_start=month_start, month_end=month_end, declined=declined
        )
        lo = np.maximum(np.maximum(pop.joined + 1, month_start), first)
        exposed = np.maximum(min(month_end, last) - lo + 1, 0)
        fraction = exposed / (month_end - month_start + 1)
        escape = hazard.astype(np.float64)
        del hazard
        escape *= fraction
        np.subtract(1.0, escape, out=escape)
        survival *= escape
        del escape
    # Customer-major order: transpose, then flat indices of the (customers, products) view.
    rows, cols = np.divmod(np.flatnonzero(eligible.T), eligible.shape[0])
    del eligible
    probability = 1.0 - survival[cols, rows]
    del survival
    ids = pa.array(present["customer_id"].astype(str).to_numpy(dtype=object), pa.string())
    return pd.DataFrame(
        {
            "customer_id": ids.take(pa.array(rows)).to_pandas(),
            "product_code": pd.Categorical.from_codes(
                cols.astype(np.int16), categories=pd.Index(comp.codes, dtype="str")
            ),
            "probability": probability,
        },
        copy=False,
    )


def _holdings(
    comp: _Compiled, customer_ids: pd.Series, adoptions: pd.DataFrame, as_of_day: int
) -> Int32Array:
    """Adoption day of every product open on ``as_of_day``; -1 where not held."""
    since = np.full((len(comp.codes), len(customer_ids)), -1, dtype=np.int32)
    if adoptions.empty:
        return since
    rows = pd.Index(customer_ids.astype(str)).get_indexer(adoptions["customer_id"].astype(str))
    cols = pd.Index(list(comp.codes)).get_indexer(adoptions["product_code"].astype(str))
    adopted = _days(adoptions["adopted_at"])
    closed = (
        _days(adoptions["closed_at"]) if "closed_at" in adoptions else np.full_like(adopted, _NEVER)
    )
    open_ = (rows >= 0) & (cols >= 0) & (adopted <= as_of_day) & (closed > as_of_day)
    since[cols[open_], rows[open_]] = adopted[open_]
    return since


def _declines(
    comp: _Compiled, customer_ids: pd.Series, outcomes: pd.DataFrame, as_of_day: int
) -> Int32Array:
    """Day of the latest decline of each product on or before ``as_of_day``; -1 if none."""
    declined = np.full((len(comp.codes), len(customer_ids)), -1, dtype=np.int32)
    if outcomes.empty:
        return declined
    rows = pd.Index(customer_ids.astype(str)).get_indexer(outcomes["customer_id"].astype(str))
    cols = pd.Index(list(comp.codes)).get_indexer(outcomes["product_code"].astype(str))
    day = _days(outcomes["occurred_at"])
    keep = (
        (rows >= 0)
        & (cols >= 0)
        & (day <= as_of_day)
        & (outcomes["outcome"].astype(str).to_numpy() == "declined")
    )
    np.maximum.at(declined, (cols[keep], rows[keep]), day[keep].astype(np.int32))
    return declined


# --------------------------------------------------------------------------- offers


def offer_acceptance(
    truth: TruthModel,
    customers: pd.DataFrame,
    adoptions: pd.DataFrame,
    personas: pd.DataFrame,
    offers: pd.DataFrame,
    *,
    outcomes: pd.DataFrame | None = None,
) -> FloatArray:
    """The probability that each customer accepts the offer made to them.

    Parameters
    ----------
    truth : TruthModel
        The bank's hazard model; its :attr:`TruthModel.offer_response` says how
        customers answer offers.
    customers, adoptions, personas : pandas.DataFrame
        The bank, as for :func:`true_propensities`.
    offers : pandas.DataFrame
        ``customer_id, product_code, offered_at``: one offer a row.
    outcomes : pandas.DataFrame, optional
        Earlier offer outcomes; declines before an offer's day damp the hazard.

    Returns
    -------
    numpy.ndarray
        float64, one probability per row of ``offers``:
        :meth:`OfferResponse.acceptance` of the customer's monthly hazard of
        the product on the offer's day, from their holdings at the start of
        that day (0 for a product held, not eligible or unknown).

    Notes
    -----
    :func:`generate_bank` judges the offers of its history on the state at the
    start of the offer's month, as it does the month's adoptions; this function
    (and :class:`LiveBank`) on the offer's day.
    """
    comp = _compile(truth)
    out = np.zeros(len(offers), dtype=np.float64)
    if offers.empty:
        return out
    ids = customers["customer_id"].astype(str)
    persona_of = pd.Series(
        personas["persona"].astype(str).to_numpy(), index=personas["customer_id"].astype(str)
    )
    names = persona_of.reindex(ids.to_numpy())
    if names.isna().any():
        raise ValueError(f"no persona for customer '{names.index[names.isna()][0]}'")
    pop = _population(
        comp,
        customers.reset_index(drop=True),
        names.map(comp.persona_index).to_numpy(dtype=np.int8),
    )
    position = pd.Index(ids)
    events = _Timeline.of(comp, position, adoptions, outcomes)
    offered = _days(offers["offered_at"])
    columns = pd.Index(list(comp.codes)).get_indexer(offers["product_code"].astype(str))
    rows = position.get_indexer(offers["customer_id"].astype(str))
    known = (columns >= 0) & (rows >= 0)
    for day in np.unique(offered[known]):
        mine = np.flatnonzero(known & (offered == day))
        who = np.unique(rows[mine])
        # The state at the start of the offer's day: events of the days before.
        since, declined = events.state(who, int(day) - 1)
        hazard = _adoption_hazard(
            comp,
            pop.take(who),
            since,
            month_start=int(day),
            month_end=int(day),
            declined=declined,
        )
        out[mine] = truth.offer_response.acceptance(
            hazard[columns[mine], np.searchsorted(who, rows[mine])]
        )
    return out


@dataclass(frozen=True, eq=False)
class _Timeline:
    """Adoptions and declines as arrays, to read any customers' state on any day."""

    customer: IntArray
    product: IntArray
    adopted: IntArray
    closed: IntArray
    declined_customer: IntArray
    declined_product: IntArray
    declined_day: IntArray
    n_products: int

    @classmethod
    def of(
        cls,
        comp: _Compiled,
        position: pd.Index,
        adoptions: pd.DataFrame,
        outcomes: pd.DataFrame | None,
    ) -> _Timeline:
        codes = pd.Index(list(comp.codes))
        customer = position.get_indexer(adoptions["customer_id"].astype(str))
        product = codes.get_indexer(adoptions["product_code"].astype(str))
        adopted = _days(adoptions["adopted_at"])
        closed = (
            _days(adoptions["closed_at"])
            if "closed_at" in adoptions
            else np.full_like(adopted, _NEVER)
        )
        keep = (customer >= 0) & (product >= 0)
        empty = np.empty(0, dtype=np.int64)
        d_customer, d_product, d_day = empty, empty, empty
        if outcomes is not None and not outcomes.empty:
            d_customer = position.get_indexer(outcomes["customer_id"].astype(str))
            d_product = codes.get_indexer(outcomes["product_code"].astype(str))
            d_day = _days(outcomes["occurred_at"])
            said_no = (
                (outcomes["outcome"].astype(str).to_numpy() == "declined")
                & (d_customer >= 0)
                & (d_product >= 0)
            )
            d_customer, d_product, d_day = d_customer[said_no], d_product[said_no], d_day[said_no]
        return cls(
            customer[keep].astype(np.int64),
            product[keep].astype(np.int64),
            adopted[keep],
            closed[keep],
            d_customer.astype(np.int64),
            d_product.astype(np.int64),
            d_day.astype(np.int64),
            len(comp.codes),
        )

    def state(self, who: IntArray, day: int) -> tuple[Int32Array, Int32Array]:
        """Holdings (adoption day, -1) and latest declines (day, -1) of the customers at
        positions ``who`` (sorted) at the end of ``day``."""
        since = np.full((self.n_products, who.size), -1, dtype=np.int32)
        declined = np.full((self.n_products, who.size), -1, dtype=np.int32)
        open_ = np.isin(self.customer, who) & (self.adopted <= day) & (self.closed > day)
        columns = np.searchsorted(who, self.customer[open_])
        since[self.product[open_], columns] = self.adopted[open_]
        said_no = np.isin(self.declined_customer, who) & (self.declined_day <= day)
        np.maximum.at(
            declined,
            (self.declined_product[said_no], np.searchsorted(who, self.declined_customer[said_no])),
            self.declined_day[said_no].astype(np.int32),
        )
        return since, declined


@dataclass(frozen=True)
class NpsRule:
    """How a customer answers an NPS survey after a contact (0-10).

    Promoters answer 9-10, passives 7-8, detractors 0-6. A customer who accepted
    an offer is a promoter with ``promoter_accepted`` and a detractor with
    ``detractor_accepted``; one offered nothing (or who declined relevant
    offers) with ``promoter`` and ``detractor``. Irrelevant offers make
    detractors: the detractor chance grows by up to ``irrelevant_detractor`` as
    the best acceptance probability of the offers falls from ``relevant`` to 0.
    """

    promoter: float = 0.30
    detractor: float = 0.12
    promoter_accepted: float = 0.55
    detractor_accepted: float = 0.06
    irrelevant_detractor: float = 0.30
    relevant: float = 0.05

    def chances(self, *, offered: bool, accepted: bool, best: float) -> tuple[float, float]:
        """``(P(promoter), P(detractor))`` of one contact."""
        if accepted:
            return self.promoter_accepted, self.detractor_accepted
        if not offered:
            return self.promoter, self.detractor
        shortfall = 1.0 - min(1.0, max(best, 0.0) / self.relevant)
        return self.promoter, self.detractor + self.irrelevant_detractor * shortfall

    def draw(self, rng: np.random.Generator, *, offered: bool, accepted: bool, best: float) -> int:
        """One NPS answer."""
        promoter, detractor = self.chances(offered=offered, accepted=accepted, best=best)
        u = rng.random()
        if u < promoter:
            return int(rng.integers(9, 11))
        if u < promoter + detractor:
            return int(rng.integers(0, 7))
        return int(rng.integers(7, 9))


class LiveBank:
    """A synthetic bank going on day by day after its history, with offers.

    Customers adopt products by the truth's hazard, now drawn daily (the monthly
    hazard ``h`` becomes ``1 - (1 - h) ** (1 / days in the month)`` a day, from the
    holdings at the end of the previous day); offers are answered as
    :class:`OfferResponse` says, on the state at that moment. Products do not
    close and no customer joins while it runs (over weeks both are rare; it keeps
    the bank and a service fed from it trivially in step).

    Every customer has a counterfactual twin: the same customer with the same
    random draws, never offered anything. The twins' adoptions give the true
    effect of the offers (:meth:`adopted_within`), which an experiment with a
    control group should recover.

    Parameters
    ----------
    bank : SyntheticBank
        The history; the live bank starts the day after ``bank.end``.
    seed : int
        Seeds the daily draws and the answers to offers.
    """

    def __init__(self, bank: SyntheticBank, *, seed: int = 0) -> None:
        self.truth = bank.truth
        self._comp = _compile(bank.truth)
        customers = bank.customers.reset_index(drop=True)
        self.customer_ids = customers["customer_id"].astype(str).to_numpy(dtype=object)
        self._position = {cid: i for i, cid in enumerate(self.customer_ids)}
        persona_of = pd.Series(
            bank.personas["persona"].astype(str).to_numpy(),
            index=bank.personas["customer_id"].astype(str),
        )
        names = persona_of.reindex(self.customer_ids)
        if names.isna().any():
            raise ValueError(f"no persona for customer '{names.index[names.isna()][0]}'")
        self._pop = _population(
            self._comp, customers, names.map(self._comp.persona_index).to_numpy(dtype=np.int8)
        )
        self.day = bank.end
        end_day = _day(bank.end)
        self._since = _holdings(self._comp, customers["customer_id"], bank.adoptions, end_day)
        self._twin = self._since.copy()
        outcomes = bank.outcomes if bank.outcomes is not None else pd.DataFrame()
        self._declined = (
            _declines(self._comp, customers["customer_id"], outcomes, end_day)
            if not outcomes.empty
            else np.full_like(self._since, -1)
        )
        self._daily_rng = np.random.default_rng([seed, 0xDA1])
        self._answer_rng = np.random.default_rng([seed, 0xA45])
        self.adoptions: list[tuple[int, int, int, str]] = []
        """``(customer position, product index, day, source)`` since the start;
        source ``organic`` or ``offer``."""
        self.twin_adoptions: list[tuple[int, int, int]] = []

    # ----------------------------------------------------------------- lookups

    @property
    def product_codes(self) -> tuple[str, ...]:
        """Products in truth order."""
        return self._comp.codes

    def position(self, customer_id: str) -> int:
        """A customer's position (KeyError when unknown)."""
        return self._position[customer_id]

    def holds(self, customer_id: str, product_code: str) -> bool:
        """Whether the customer holds the product now."""
        return bool(self._since[self._comp.index[product_code], self._position[customer_id]] >= 0)

    def _today(self) -> int:
        return _day(self.day) + 1

    def _hazard_of(
        self, rows: IntArray, since: Int32Array, declined: Int32Array | None
    ) -> Float32Array:
        today = self._today()
        return _adoption_hazard(
            self._comp,
            self._pop.take(rows),
            since[:, rows],
            month_start=today,
            month_end=today,
            declined=None if declined is None else declined[:, rows],
        )

    # ----------------------------------------------------------------- offers

    def acceptance(self, customer_id: str, product_code: str) -> float:
        """The chance the customer accepts an offer of the product now (today)."""
        k = self._comp.index.get(product_code)
        if k is None:
            return 0.0
        row = np.array([self._position[customer_id]])
        hazard = self._hazard_of(row, self._since, self._declined)
        return float(self.truth.offer_response.acceptance(hazard[k, 0]))

    def answer(self, customer_id: str, product_code: str) -> tuple[str, float]:
        """The customer's answer to an offer made today, applied to the bank.

        Returns
        -------
        (str, float)
            ``accepted`` (the product is held from today), ``declined`` (its hazard is
            damped) or ``not_now``; and the acceptance probability it was drawn with.
        """
        chance = self.acceptance(customer_id, product_code)
        c, k = self._position[customer_id], self._comp.index.get(product_code, -1)
        today = self._today()
        response = self.truth.offer_response
        if k >= 0 and self._answer_rng.random() < chance:
            self._since[k, c] = today
            self.adoptions.append((c, k, today, "offer"))
            return "accepted", chance
        if self._answer_rng.random() < response.not_now_share:
            return "not_now", chance
        if k >= 0:
            self._declined[k, c] = today
        return "declined", chance

    def feedback(self, rule: NpsRule, *, offered: bool, accepted: bool, best: float) -> int:
        """An NPS answer (0-10) after a contact today, drawn by ``rule``."""
        return rule.draw(self._answer_rng, offered=offered, accepted=accepted, best=best)

    # ----------------------------------------------------------------- days

    def end_day(self) -> list[tuple[str, str]]:
        """Draw today's adoptions (after the day's offers), then move to the next day.

        Returns
        -------
        list of (str, str)
            ``(customer_id, product_code)`` of today's organic adoptions.
        """
        today = self._today()
        when = _date(today)
        days_in_month = calendar.monthrange(when.year, when.month)[1]
        rows = np.flatnonzero(self._pop.joined < today)
        draw = self._daily_rng.random((len(self._comp.codes), rows.size), dtype=np.float32)
        found = []
        for since, declined in ((self._since, self._declined), (self._twin, None)):
            hazard = self._hazard_of(rows, since, declined).astype(np.float64)
            daily = -np.expm1(np.log1p(-np.minimum(hazard, 1 - 1e-9)) / days_in_month)
            product, column = np.nonzero(draw < daily)
            customer = rows[column]
            day = np.full(customer.size, today, dtype=np.int64)
            keep = _resolve_exclusions(self._comp, customer, product, day)
            customer, product = customer[keep], product[keep]
            since[product, customer] = today
            found.append((customer, product))
        (customer, product), (twin_customer, twin_product) = found
        self.adoptions += [
            (int(c), int(k), today, "organic") for c, k in zip(customer, product, strict=True)
        ]
        self.twin_adoptions += [
            (int(c), int(k), today) for c, k in zip(twin_customer, twin_product, strict=True)
        ]
        self.day = when
        codes = self._comp.codes
        return [
            (str(self.customer_ids[c]), codes[k]) for c, k in zip(customer, product, strict=True)
        ]

    # ----------------------------------------------------------------- the truth

    def adopted_within(
        self,
        pairs: pd.DataFrame,
        *,
        window_days: int,
        until: date,
        counterfactual: bool = False,
    ) -> BoolArray:
        """Whether each pair's customer adopted its product in a window, live or as twin.

        Parameters
        ----------
        pairs : pandas.DataFrame
            ``customer_id, product_code, start`` (a date).
        window_days : int
            The window is ``[start, start + window_days)``, cut at ``until``.
        until : datetime.date
            Last day counted.
        counterfactual : bool
            Ask about the twins (never offered anything) instead.
        """
        if counterfactual:
            events = [(c, k, d) for c, k, d in self.twin_adoptions]
        else:
            events = [(c, k, d) for c, k, d, _ in self.adoptions]
        if pairs.empty:
            return np.zeros(0, dtype=bool)
        frame = pd.DataFrame(events, columns=["c", "k", "day"])
        c = pairs["customer_id"].astype(str).map(self._position).to_numpy(dtype=np.int64)
        k = pairs["product_code"].astype(str).map(self._comp.index).to_numpy(dtype=np.int64)
        start = _days(pairs["start"])
        last = np.minimum(start + window_days - 1, _day(until))
        query = pd.DataFrame({"row": np.arange(len(pairs)), "c": c, "k": k})
        hits = query.merge(frame, on=["c", "k"])
        inside = (hits["day"].to_numpy() >= start[hits["row"]]) & (
            hits["day"].to_numpy() <= last[hits["row"]]
        )
        out = np.zeros(len(pairs), dtype=bool)
        out[hits["row"].to_numpy()[inside]] = True
        return out


# --------------------------------------------------------------------------- files


def write_bank(
    bank: SyntheticBank, out_dir: Path, *, fmt: Literal["csv", "parquet"] = "csv"
) -> dict[str, Path]:
    """Write the bank in the import format, and its truth under ``truth/``.

    Writes ``products``, ``customers`` and ``adoptions`` (``.csv`` or
    ``.parquet``), ``outcomes`` when the bank has an offer history,
    ``truth/model.json``, ``truth/personas.csv`` and
    ``truth/propensities.parquet`` (the oracle on ``bank.end`` over 90 days).
    CSV dates are ``YYYY-MM-DD``, empty cells are missing values, booleans
    are ``true``/``false``; Parquet dates are ``date32``.

    Parameters
    ----------
    bank : SyntheticBank
    out_dir : pathlib.Path
        Created if missing; existing files of these names are replaced.
    fmt : {"csv", "parquet"}

    Returns
    -------
    dict of str to pathlib.Path
        Keys ``products, customers, adoptions, model, personas, propensities``,
        and ``outcomes`` with an offer history.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', not {fmt!r}")
    out_dir = Path(out_dir)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = [
        ("products", bank.products),
        ("customers", bank.customers),
        ("adoptions", bank.adoptions),
    ]
    if bank.outcomes is not None:
        tables.append(("outcomes", bank.outcomes))
    for name, frame in tables:
        path = out_dir / f"{name}.{fmt}"
        _write_table(_to_arrow(frame), path, fmt)
        written[name] = path
    model_path = truth_dir / "model.json"
    model_path.write_text(bank.truth.to_json())
    written["model"] = model_path
    personas_path = truth_dir / "personas.csv"
    _write_table(_to_arrow(bank.personas), personas_path, "csv")
    written["personas"] = personas_path
    oracle = true_propensities(
        bank.truth,
        bank.customers,
        bank.adoptions,
        bank.personas,
        as_of=bank.end,
        horizon_days=90,
        outcomes=bank.outcomes,
    )
    propensities_path = truth_dir / "propensities.parquet"
    _write_table(_to_arrow(oracle), propensities_path, "parquet")
    written["propensities"] = propensities_path
    return written


def read_truth(out_dir: Path) -> tuple[TruthModel, pd.DataFrame]:
    """Read the truth model and personas that :func:`write_bank` wrote.

    Returns
    -------
    (TruthModel, pandas.DataFrame)
        The model and ``customer_id, persona``.
    """
    truth_dir = Path(out_dir) / "truth"
    model = TruthModel.from_json((truth_dir / "model.json").read_text())
    personas = pd.read_csv(truth_dir / "personas.csv", dtype=str, keep_default_na=False)
    return model, personas


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    for i, column in enumerate(table.schema):
        if pa.types.is_timestamp(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.date32()))
        elif pa.types.is_large_string(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
    return table


def _write_table(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path)
        return
    with path.open("wb") as handle:
        handle.write((",".join(table.column_names) + "\n").encode())
        pa_csv.write_csv(
            table,
            handle,
            write_options=pa_csv.WriteOptions(include_header=False, quoting_style="none"),
        )
