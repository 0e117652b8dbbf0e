"""The bank's customers: their attributes drawn from their hidden persona.

How a persona's attributes are drawn (:data:`_PROFILES`) is not part of the hazard
model: it shapes who the customers are, while :mod:`models.synthetic.truth` says what
they do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from models.synthetic.dates import FloatArray, IntArray, _day, _ymd
from models.synthetic.hazard import _Compiled

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
