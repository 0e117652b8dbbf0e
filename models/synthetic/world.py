"""The default bank's world: its catalogue, personas, attribute effects and planted paths.

:func:`default_truth` builds the truth model from these numbers and
:func:`models.synthetic.generate_bank` always draws from it, so changing one changes
every generated bank, seed for seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from models.synthetic.truth import AttributeEffect, PathRule, Persona, ProductSpec, TruthModel


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
