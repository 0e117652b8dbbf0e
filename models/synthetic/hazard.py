"""The one adoption hazard that the simulation, the oracle and the live bank share.

A :class:`~models.synthetic.truth.TruthModel` is compiled to index arrays
(:func:`_compile`), customers to per-customer arrays (:func:`_population`), and
:func:`_adoption_hazard` gives every (product, customer) its monthly hazard from the
holdings at the start of a month. :func:`models.synthetic.generate_bank` draws from it and
:func:`models.synthetic.true_propensities` reads it back, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from models.synthetic.dates import (
    _NEVER,
    DAYS_PER_MONTH,
    BoolArray,
    Float32Array,
    FloatArray,
    Int32Array,
    IntArray,
    _date,
    _day,
    _days,
    _ymd,
)
from models.synthetic.truth import TruthModel

_NO_MAX_AGE = 10_000


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
        return self.window(0, n)

    def window(self, start: int, stop: int) -> _Population:
        """The customers at positions ``start`` to ``stop`` (exclusive), as views."""
        return _Population(
            self.persona[start:stop],
            self.joined[start:stop],
            self.birth_year[start:stop],
            self.birth_md[start:stop],
            self.segment_ok[:, start:stop],
            self.rate[:, start:stop],
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


# --------------------------------------------------------------------------- state from tables


def _holdings(
    comp: _Compiled, customer_ids: pd.Series, adoptions: pd.DataFrame, as_of_day: int
) -> Int32Array:
    """Adoption day of every product open on ``as_of_day``; -1 where not held."""
    since = np.full((len(comp.codes), len(customer_ids)), -1, dtype=np.int32)
    if adoptions.empty:
        return since
    rows = _positions(adoptions["customer_id"], customer_ids)
    cols = _positions(adoptions["product_code"], pd.Series(comp.codes, dtype=object))
    adopted = _days(adoptions["adopted_at"])
    closed = (
        _days(adoptions["closed_at"]) if "closed_at" in adoptions else np.full_like(adopted, _NEVER)
    )
    open_ = (rows >= 0) & (cols >= 0) & (adopted <= as_of_day) & (closed > as_of_day)
    since[cols[open_], rows[open_]] = adopted[open_]
    return since


def _positions(values: pd.Series, ids: pd.Series) -> IntArray:
    """Position of each value (as text) among the unique ``ids``, -1 if absent, through
    Arrow's hash lookup: pandas' first turned the millions of ids (and product codes) of
    a large bank's adoptions into Python strings (a few hundred MB for a moment)."""
    value_set = pa.array(ids.astype(str), pa.large_string())
    if len(pc.unique(value_set)) != len(value_set):
        # pandas refused to look up among repeated ids; Arrow would take the first.
        text = ids.astype(str)
        raise ValueError(f"id {text[text.duplicated()].iloc[0]!r} appears more than once")
    found = pc.index_in(pa.array(values.astype(str), pa.large_string()), value_set=value_set)
    return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _declines(
    comp: _Compiled, customer_ids: pd.Series, outcomes: pd.DataFrame, as_of_day: int
) -> Int32Array:
    """Day of the latest decline of each product on or before ``as_of_day``; -1 if none."""
    declined = np.full((len(comp.codes), len(customer_ids)), -1, dtype=np.int32)
    if outcomes.empty:
        return declined
    rows = _positions(outcomes["customer_id"], customer_ids)
    cols = _positions(outcomes["product_code"], pd.Series(comp.codes, dtype=object))
    day = _days(outcomes["occurred_at"])
    keep = (
        (rows >= 0)
        & (cols >= 0)
        & (day <= as_of_day)
        & (outcomes["outcome"].astype(str).to_numpy() == "declined")
    )
    np.maximum.at(declined, (cols[keep], rows[keep]), day[keep].astype(np.int32))
    return declined
