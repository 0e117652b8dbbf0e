"""Request and response bodies of the HTTP API (pydantic; validation errors name the field)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from service import validation as v

Channel = Literal["branch", "contact_centre", "digital", "chatbot"]
OutcomeKind = Literal["presented", "accepted", "declined", "not_now"]
FeedbackKind = Literal["nps", "csat"]
FeedbackCategory = Literal[
    "promoter", "passive", "detractor", "satisfied", "neutral", "dissatisfied"
]


def _storable(value: str) -> str:
    problem = v.text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


Text = Annotated[str, AfterValidator(_storable)]
"""A string the database can store: PostgreSQL text holds no NUL character, and a lone
surrogate cannot be encoded at all; one such string would fail the whole statement (or
group commit) it was written in."""


def _attribute_name(name: str) -> str:
    problem = v.attribute_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def _dated(*, future: bool) -> AfterValidator:
    def check(value: dt.date) -> dt.date:
        problem = v.date_problem(value, future=future)
        if problem is not None:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


AttributeName = Annotated[str, AfterValidator(_attribute_name)]
"""One rule for the API and the importer: the name becomes a column of the loaded bank."""

Date = Annotated[dt.date, _dated(future=True)]
"""A date from 1900-01-01 to a year past today (see service.validation)."""

PastDate = Annotated[dt.date, _dated(future=False)]
"""A date from 1900-01-01 to today (a date of birth)."""

Number = Annotated[float, Field(allow_inf_nan=False, ge=-v.MAX_MAGNITUDE, le=v.MAX_MAGNITUDE)]
"""A finite number within +-1e15, so later arithmetic on it stays finite."""

WholeNumber = Annotated[int, Field(ge=-v.MAX_MAGNITUDE, le=v.MAX_MAGNITUDE)]


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


Instant = Annotated[dt.datetime, AfterValidator(_utc)]
"""A moment in an answer, always with its zone: the database keeps UTC, and SQLite hands
it back without a zone, which is not the RFC 3339 ``date-time`` the spec declares."""


def _identifier(value: str) -> str:
    problem = v.identifier_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


Identifier = Annotated[Text, AfterValidator(_identifier)]
"""A key of the bank (customer id, product code): text that no reader takes for missing."""

ProductCode = Annotated[
    Identifier,
    Field(min_length=1, max_length=v.MAX_PRODUCT_CODE, pattern=v.PRODUCT_CODE_PATTERN),
]
CustomerId = Annotated[Identifier, Field(min_length=1, max_length=v.MAX_CUSTOMER_ID)]


def _attribute_value(value: object) -> object:
    # One clear message per bad value, before the union below would list a failure for
    # each of its members.
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        problem = v.number_problem(value)
    elif isinstance(value, str):
        problem = v.text_problem(value)
        if problem is None and len(value) > v.MAX_ATTRIBUTE_TEXT:
            problem = f"a text attribute has at most {v.MAX_ATTRIBUTE_TEXT} characters"
    else:
        problem = "must be a number, a text or null"
    if problem is not None:
        raise ValueError(problem)
    return value


AttributeValue = Annotated[
    WholeNumber | Number | Annotated[Text, Field(max_length=v.MAX_ATTRIBUTE_TEXT)] | None,
    BeforeValidator(_attribute_value),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecisionRequest(_Strict):
    channel: Channel = Field(description="Where the contact happens.")
    staff_id: Text | None = Field(default=None, max_length=v.MAX_LABEL, description="Who asks.")
    branch_id: Text | None = Field(default=None, max_length=v.MAX_LABEL, description="Where.")
    max_offers: int = Field(default=3, ge=1, le=10, description="How many offers at most.")
    context: (
        dict[
            Annotated[Text, Field(max_length=v.MAX_CONTEXT_KEY)],
            Annotated[Text, Field(max_length=v.MAX_CONTEXT_TEXT)],
        ]
        | None
    ) = Field(
        default=None,
        max_length=v.MAX_CONTEXT_ITEMS,
        description="Free context, e.g. {'reason': 'address change'}.",
    )
    explain: bool = Field(
        default=False,
        description=(
            "Add each offer's top model factors (TreeSHAP contributions; up to about 1 ms more "
            "per decision). The rule sentence and talking point are always given."
        ),
    )


class Factor(BaseModel):
    feature: str
    label: str
    value: str | float | None
    contribution: float


class Reasons(BaseModel):
    rule: str | None = Field(
        description=(
            "The most persuasive adoption rule that applies to the customer, as a sentence: "
            "only rules with a lift above 1 and at least 30 customers behind them, the "
            "highest lift first. Null when none is worth saying."
        )
    )
    rule_confidence: float | None = None
    rule_lift: float | None = None
    profile: str | None = Field(
        default=None,
        description=(
            "Without a rule: how much more often customers with a similar profile (the "
            "model's strongest profile columns) took the product over the past year than "
            "customers overall, as a sentence; the multiplier is profile_lift rounded "
            "down. Null when no group of at least 30 adopters took it 1.5 times as often, "
            "or the customer's propensity is below the product's base rate; then the "
            "talking point makes no claim."
        ),
    )
    profile_lift: float | None = Field(
        default=None,
        description="The group's take-up rate over the past year ÷ that of all customers.",
    )
    factors: list[Factor] = Field(
        default_factory=list,
        description="Top model factors (SHAP), with explain=true; they do not change what is said.",
    )


class OfferOut(BaseModel):
    offer_id: str
    product_code: str
    product_name: str
    rank: int
    propensity: float
    expected_value: float
    score: float
    reasons: Reasons
    talking_point: str


class DecisionResponse(BaseModel):
    decision_id: str
    customer_id: str
    model_version: str | None
    control: bool = Field(description="In the control group: no model offers by design.")
    degraded: bool = Field(description="Answered from a fallback (no model, or audit spooled).")
    cold_start: bool = Field(description="Unknown customer answered from segment popularity.")
    offers: list[OfferOut]
    suppressed: dict[str, str] | None = Field(
        default=None,
        description="Why each other product was not offered (only for keys with scope 'models').",
    )
    note: str | None = Field(default=None, description="Why the answer is empty, when it is.")
    created_at: Instant


class OutcomeRequest(_Strict):
    outcome: OutcomeKind
    reason: Text | None = Field(default=None, max_length=500)
    staff_id: Text | None = Field(default=None, max_length=v.MAX_LABEL)


class OutcomeResponse(BaseModel):
    offer_id: str
    outcome: OutcomeKind
    product_code: str
    customer_id: str
    duplicate: bool = Field(description="True when this outcome was already recorded.")
    recorded_at: Instant


class AdoptionIn(_Strict):
    customer_id: CustomerId
    product_code: ProductCode
    adopted_at: Date | None = Field(default=None, description="Default: today.")
    closed_at: Date | None = None


class AdoptionsRequest(_Strict):
    adoptions: list[AdoptionIn] = Field(min_length=1, max_length=1000)


class AdoptionsResponse(BaseModel):
    received: int
    added: int
    updated: int


class CustomerRequest(_Strict):
    segment: Text | None = Field(default=None, max_length=v.MAX_LABEL)
    branch_id: Text | None = Field(default=None, max_length=v.MAX_LABEL)
    joined_at: Date | None = None
    birth_date: PastDate | None = None
    attributes: dict[AttributeName, AttributeValue] = Field(
        default_factory=dict,
        max_length=v.MAX_ATTRIBUTES_PER_REQUEST,
        description=(
            "Attribute name (letters, digits, _; not a fixed column) to a number, a text of "
            "up to 256 characters, or null to remove it."
        ),
    )


class CustomerResponse(BaseModel):
    customer_id: str
    created: bool
    segment: str | None
    branch_id: str | None
    joined_at: dt.date | None
    birth_date: dt.date | None
    attributes: dict[str, float | int | str | None]
    holdings: list[str]


class ProductBody(BaseModel):
    name: Text = Field(min_length=1, max_length=v.MAX_PRODUCT_NAME)
    category: Text = Field(default="other", max_length=v.MAX_LABEL)
    value: float = Field(default=1.0, ge=0, le=v.MAX_MAGNITUDE, allow_inf_nan=False)
    business_weight: float = Field(default=1.0, ge=0, le=v.MAX_MAGNITUDE, allow_inf_nan=False)
    active: bool = True
    min_age: int | None = Field(default=None, ge=0, le=130)
    max_age: int | None = Field(default=None, ge=0, le=130)
    segments: list[Annotated[Text, Field(max_length=v.MAX_LABEL)]] | None = Field(
        default=None, max_length=v.MAX_LIST_ITEMS
    )
    requires: list[ProductCode] = Field(default_factory=list, max_length=v.MAX_LIST_ITEMS)
    excludes: list[ProductCode] = Field(default_factory=list, max_length=v.MAX_LIST_ITEMS)


class ProductRequest(ProductBody):
    model_config = ConfigDict(extra="forbid")


class ProductResponse(ProductBody):
    product_code: str


class ModelVersionOut(BaseModel):
    version: str
    status: str
    as_of: dt.date
    horizon_days: int
    created_at: Instant | None
    activated_at: Instant | None
    metrics: dict[str, object]


class ActivationResponse(BaseModel):
    version: str
    previous: str | None
    serving: str | None = Field(description="The version this worker now serves.")


class RuleOut(BaseModel):
    antecedent: list[str]
    ordered: bool
    consequent: str
    support: float
    confidence: float
    lift: float
    conviction: float
    n_customers: int
    median_days: float | None
    sentence: str


class RulesResponse(BaseModel):
    model_version: str
    rules: list[RuleOut]


class FeedbackRequest(_Strict):
    kind: FeedbackKind = Field(
        description="nps: 'How likely are you to recommend us?' 0-10; csat: satisfaction 1-5."
    )
    score: int = Field(ge=0, le=10, description="0-10 for nps, 1-5 for csat.")
    decision_id: Text | None = Field(
        default=None,
        max_length=36,
        description="The contact the answer is about; customer, staff and branch default from it.",
    )
    customer_id: Identifier | None = Field(
        default=None, min_length=1, max_length=128, description="The bank's customer id."
    )
    staff_id: Text | None = Field(default=None, max_length=v.MAX_LABEL)
    branch_id: Text | None = Field(default=None, max_length=v.MAX_LABEL)
    comment: Text | None = Field(default=None, max_length=2000)


class FeedbackResponse(BaseModel):
    feedback_id: int
    kind: FeedbackKind
    score: int
    category: FeedbackCategory
    decision_id: str | None
    customer_id: str | None
    staff_id: str | None
    branch_id: str | None
    duplicate: bool = Field(description="True when this answer was already recorded.")
    offers_suppressed_until: Instant | None = Field(
        description=(
            "A detractor answer after an offer: no offers to this customer until then "
            "(only shown to keys with scope 'reports' or 'models')."
        )
    )
    recorded_at: Instant
