"""One feature builder for training and scoring, for a whole bank or one customer.

:class:`FeatureSpec` fixes the columns at training time (products, attributes, the
levels of every categorical column) and is saved with the model;
:class:`FeatureBuilder` computes them from a :class:`models.data.BankData` (every
customer at once, vectorised) or from one :class:`models.data.CustomerState`. Both
paths first reduce their input to the same per-customer arrays (holdings, first
adoption days, last adoption, dates, encoded attributes) and then run the same code,
:func:`_assemble`, so a customer's row is identical either way.

Only information strictly before ``as_of`` is used: adoptions and closures are read
through :class:`models.data.AdoptionIndex` at ``as_of``, rules come from rules mined
before ``as_of`` (the caller's responsibility; :func:`mine_rules` does it), and offer
outcomes count only inside the window before ``as_of``. Customer attributes, segment and
branch are read as they were at ``as_of`` when the bank keeps their history
(:attr:`models.data.BankData.attribute_history`: the value before a customer's first
change counts as valid from the start), else as imported. One customer's row
(:meth:`FeatureBuilder.for_customer`) reads the :class:`models.data.CustomerState` as
given: serving passes the values in force now.

Columns, for products ``p`` in spec order:

==============================  ======================================================
``held_<p>``                    1 if held at ``as_of``, else 0
``ever_<p>``                    1 if adopted before ``as_of`` (held or closed)
``days_since_first_<p>``        days since the first adoption, NaN if never
``n_held``, ``n_ever``          products held / ever adopted
``last_product``                categorical: product of the latest adoption
``days_since_last_adoption``    days since the latest adoption, NaN if none
``tenure_days``                 days since joining, NaN if unknown
``age``                         whole years on the date of ``as_of``, NaN if unknown
``segment``, ``branch_id``      categorical
``attr_<name>``                 each bank attribute: numeric as is, categorical coded
``rule_conf_<p>``               best applicable rule's confidence (with rules)
``<kind>_recently_<p>``         offer outcomes of that kind in the window (with
                                outcomes, e.g. ``declined_recently_<p>``)
==============================  ======================================================

Categorical columns hold the position of the value among the spec's levels (LightGBM
native categorical); a value unseen at training time, or missing, is NaN.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.data import (
    NAT_NS,
    NS_PER_DAY,
    AdoptionIndex,
    AttributeKind,
    BankData,
    CustomerState,
    DateInput,
    instant,
    snapshot_of_state,
    to_ns,
)
from models.eligibility import ages_at
from models.rules import Rule, RuleSet, mine_sequence_rules_from_matrix
from models.sequences import NEVER, AdoptionMatrix

__all__ = [
    "FeatureBuilder",
    "FeatureFrame",
    "FeatureSpec",
    "PreparedBank",
    "RuleTable",
    "build_features",
    "features_for_customer",
    "joined_before",
    "mine_rules",
    "static_at",
]

SPEC_FORMAT: Final[str] = "nbo.features"
SPEC_VERSION: Final[int] = 1
_CHUNK_CELLS: Final[int] = 4_000_000


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class FeatureSpec:
    """The feature columns, fixed at training time.

    Attributes
    ----------
    product_codes : tuple of str
        Products with holding features, in column order (the training catalogue).
    attributes : tuple of (str, {"numeric", "categorical"})
        Bank attributes, in column order.
    levels : dict of str to tuple of str
        Levels of each categorical column except ``last_product`` (whose levels are
        ``product_codes``): ``segment``, ``branch_id`` and ``attr_<name>`` of the
        categorical attributes. A level's code is its position.
    rule_features : bool
        Whether the ``rule_conf_<p>`` columns are present.
    outcome_kinds : tuple of str
        Offer outcome values counted per product (``<kind>_recently_<p>``).
    outcome_window_days : int
        Window of the outcome counts, in days before ``as_of``.
    """

    product_codes: tuple[str, ...]
    attributes: tuple[tuple[str, AttributeKind], ...]
    levels: dict[str, tuple[str, ...]]
    rule_features: bool = True
    outcome_kinds: tuple[str, ...] = ()
    outcome_window_days: int = 90
    columns: tuple[str, ...] = field(init=False, repr=False, compare=False)
    categorical: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        codes = self.product_codes
        attributes = [f"attr_{name}" for name, _ in self.attributes]
        columns = [
            *(f"held_{p}" for p in codes),
            *(f"ever_{p}" for p in codes),
            *(f"days_since_first_{p}" for p in codes),
            "n_held",
            "n_ever",
            "last_product",
            "days_since_last_adoption",
            "tenure_days",
            "age",
            "segment",
            "branch_id",
            *attributes,
        ]
        if self.rule_features:
            columns += [f"rule_conf_{p}" for p in codes]
        for kind in self.outcome_kinds:
            columns += [f"{kind}_recently_{p}" for p in codes]
        if len(set(columns)) != len(columns):
            raise ValueError("feature column names collide; rename a product or attribute")
        categorical = ["last_product", "segment", "branch_id"] + [
            f"attr_{name}" for name, kind in self.attributes if kind == "categorical"
        ]
        missing = [c for c in categorical if c != "last_product" and c not in self.levels]
        if missing:
            raise ValueError(f"no levels for categorical column(s) {missing}")
        object.__setattr__(self, "columns", tuple(columns))
        object.__setattr__(self, "categorical", tuple(categorical))

    @classmethod
    def fit(
        cls,
        data: BankData,
        *,
        product_codes: Sequence[str] | None = None,
        rule_features: bool = True,
        outcome_kinds: Sequence[str] | None = None,
        outcome_window_days: int = 90,
        max_levels: int = 200,
    ) -> FeatureSpec:
        """Fix the columns and categorical levels from a bank.

        Parameters
        ----------
        data : BankData
            The bank; levels come from its customers table and the earlier values in
            its attribute history (the set of levels tells nothing of when a value
            was held, so this leaks nothing across a cutoff).
        product_codes : sequence of str, optional
            Products (default: the catalogue, in order).
        rule_features : bool
            Include ``rule_conf_<p>``.
        outcome_kinds : sequence of str, optional
            Outcome values to count per product; default ``("declined",)`` when
            ``data.outcomes`` is present, else none.
        outcome_window_days : int
            Outcome window in days.
        max_levels : int
            Most frequent levels kept per categorical column; rarer ones read as missing.

        Returns
        -------
        FeatureSpec
        """
        codes = tuple(product_codes) if product_codes is not None else data.product_codes
        if outcome_kinds is None:
            outcome_kinds = ("declined",) if data.outcomes is not None else ()
        earlier = _earlier_values(data.attribute_history)
        levels = {
            "segment": _levels(data.customers["segment"], max_levels, earlier.get("segment")),
            "branch_id": _levels(data.customers["branch_id"], max_levels, earlier.get("branch_id")),
        }
        for name, kind in data.attribute_kinds.items():
            if kind == "categorical":
                levels[f"attr_{name}"] = _levels(
                    data.customers[name], max_levels, earlier.get(name)
                )
        return cls(
            product_codes=codes,
            attributes=tuple(data.attribute_kinds.items()),
            levels=levels,
            rule_features=rule_features,
            outcome_kinds=tuple(outcome_kinds),
            outcome_window_days=outcome_window_days,
        )

    def to_json(self) -> str:
        """Plain JSON (inverse: :meth:`from_json`); lists the columns for checking."""
        return json.dumps(
            {
                "format": SPEC_FORMAT,
                "version": SPEC_VERSION,
                "product_codes": list(self.product_codes),
                "attributes": [[name, kind] for name, kind in self.attributes],
                "levels": {name: list(values) for name, values in self.levels.items()},
                "rule_features": self.rule_features,
                "outcome_kinds": list(self.outcome_kinds),
                "outcome_window_days": self.outcome_window_days,
                "columns": list(self.columns),
                "categorical": list(self.categorical),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        """Load a spec written by :meth:`to_json`.

        Raises
        ------
        ValueError
            If the document is not a feature spec of a known version, or its listed
            columns differ from those its settings produce.
        """
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("format") != SPEC_FORMAT:
            raise ValueError(f"not an {SPEC_FORMAT} document")
        if document.get("version") != SPEC_VERSION:
            raise ValueError(f"unsupported {SPEC_FORMAT} version {document.get('version')!r}")
        spec = cls(
            product_codes=tuple(document["product_codes"]),
            attributes=tuple((str(n), _kind(k)) for n, k in document["attributes"]),
            levels={str(k): tuple(str(v) for v in vs) for k, vs in document["levels"].items()},
            rule_features=bool(document["rule_features"]),
            outcome_kinds=tuple(document["outcome_kinds"]),
            outcome_window_days=int(document["outcome_window_days"]),
        )
        if list(spec.columns) != list(document["columns"]):
            raise ValueError("the spec's listed columns differ from the columns it defines")
        return spec

    def label(self, column: str, names: Mapping[str, str] | None = None) -> str:
        """A human-readable name for a column ("holds Mortgage", "age").

        Parameters
        ----------
        column : str
            A column of this spec.
        names : mapping of str to str, optional
            Display name per product code (default: the code).
        """
        names = names or {}
        fixed = {
            "n_held": "number of products held",
            "n_ever": "number of products ever held",
            "last_product": "last product adopted",
            "days_since_last_adoption": "days since last adoption",
            "tenure_days": "days as a customer",
            "age": "age",
            "segment": "segment",
            "branch_id": "branch",
        }
        if column in fixed:
            return fixed[column]
        if column.startswith("attr_"):
            return column[5:].replace("_", " ")
        patterns = [
            ("held_", "holds {}"),
            ("ever_", "has ever held {}"),
            ("days_since_first_", "days since first {}"),
            ("rule_conf_", "best rule confidence for {}"),
        ] + [(f"{kind}_recently_", f"{kind} {{}} offers recently") for kind in self.outcome_kinds]
        for prefix, template in patterns:
            if column.startswith(prefix) and column[len(prefix) :] in self.product_codes:
                code = column[len(prefix) :]
                return template.format(names.get(code, code))
        return column

    def display_value(self, column: str, value: float) -> str | float | None:
        """A column's value as a person reads it: a level for categoricals, None for NaN."""
        if np.isnan(value):
            return None
        if column == "last_product":
            return self.product_codes[int(value)]
        if column in self.levels:
            return self.levels[column][int(value)]
        return float(value)


def _kind(value: object) -> AttributeKind:
    if value == "numeric":
        return "numeric"
    if value == "categorical":
        return "categorical"
    raise ValueError(f"unknown attribute kind {value!r}")


def _earlier_values(history: pd.DataFrame | None) -> dict[str, pd.Series]:
    """The earlier values in an attribute history, by attribute."""
    if history is None or history.empty:
        return {}
    return {
        str(name): group["previous"]
        for name, group in history.groupby("attribute", sort=False, observed=True)
    }


def _levels(
    values: pd.Series, max_levels: int, earlier: pd.Series | None = None
) -> tuple[str, ...]:
    if earlier is not None:
        values = pd.concat([values.astype(object), earlier.astype(object)], ignore_index=True)
    counts = values.dropna().astype("str").value_counts()
    top = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    return tuple(sorted(str(v) for v in top.index[:max_levels]))


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, eq=False)
class RuleTable:
    """Rules compiled for fast "best applicable confidence" lookups.

    Row by row, :meth:`confidence` equals :func:`models.rules.best_rule_confidence`
    given ever-adopted products and first-adoption days: the highest confidence among
    rules predicting a product whose antecedent the customer has adopted (in strictly
    increasing first-adoption order for ordered rules); 0 where none applies or the
    customer has adopted the product.

    Attributes
    ----------
    product_codes : tuple of str
        Columns.
    antecedents : numpy.ndarray
        intp, groups x longest antecedent: product columns, padded with
        ``len(product_codes)`` (a column every customer "has").
    ordered : numpy.ndarray
        bool per group: the antecedent counts only in its order.
    confidence_matrix : numpy.ndarray
        float64, groups x products: best confidence per (antecedent, consequent).
    best : tuple of dict of int to Rule
        Per group, the best rule for each consequent column.
    """

    product_codes: tuple[str, ...]
    antecedents: npt.NDArray[np.intp]
    ordered: npt.NDArray[np.bool_]
    confidence_matrix: npt.NDArray[np.float64]
    best: tuple[dict[int, Rule], ...]
    by_product: tuple[tuple[int, npt.NDArray[np.intp]], ...] = field(init=False, repr=False)
    _columns: tuple[npt.NDArray[np.intp], ...] = field(init=False, repr=False)
    _padding: tuple[npt.NDArray[np.bool_], ...] = field(init=False, repr=False)
    _order_checks: tuple[tuple[int, npt.NDArray[np.bool_]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        matrix = self.confidence_matrix
        real = self.antecedents < len(self.product_codes)
        # Padded positions read column 0 and are then ignored through the masks.
        columns = np.where(real, self.antecedents, 0)
        object.__setattr__(self, "_columns", tuple(columns[:, i] for i in range(columns.shape[1])))
        object.__setattr__(self, "_padding", tuple(~real[:, i] for i in range(real.shape[1])))
        object.__setattr__(
            self,
            "_order_checks",
            tuple(
                (i, ~(self.ordered & real[:, i + 1]))
                for i in range(real.shape[1] - 1)
                if (self.ordered & real[:, i + 1]).any()
            ),
        )
        object.__setattr__(
            self,
            "by_product",
            tuple(
                (j, np.flatnonzero(matrix[:, j] > 0))
                for j in range(matrix.shape[1])
                if (matrix[:, j] > 0).any()
            ),
        )

    @classmethod
    def compile(
        cls, rules: RuleSet | Iterable[Rule] | None, product_codes: Sequence[str]
    ) -> RuleTable:
        """Group rules by antecedent; rules naming other products are dropped."""
        codes = tuple(product_codes)
        column = {code: j for j, code in enumerate(codes)}
        rule_list = (
            [] if rules is None else rules.rules if isinstance(rules, RuleSet) else list(rules)
        )
        groups: dict[tuple[tuple[int, ...], bool], dict[int, Rule]] = {}
        for rule in rule_list:
            if rule.consequent not in column or any(a not in column for a in rule.antecedent):
                continue
            cols = tuple(column[a] for a in rule.antecedent)
            if not cols:
                continue
            ordered = rule.ordered and len(cols) > 1
            key = (cols if ordered else tuple(sorted(cols)), ordered)
            j = column[rule.consequent]
            current = groups.setdefault(key, {}).get(j)
            if current is None or _better(rule, current):
                groups[key][j] = rule
        keys = sorted(groups)
        width = max((len(cols) for cols, _ in keys), default=1)
        antecedents = np.full((len(keys), width), len(codes), dtype=np.intp)
        matrix = np.zeros((len(keys), len(codes)), dtype=np.float64)
        for g, (cols, _) in enumerate(keys):
            antecedents[g, : len(cols)] = cols
            for j, rule in groups[keys[g]].items():
                matrix[g, j] = rule.confidence
        return cls(
            product_codes=codes,
            antecedents=antecedents,
            ordered=np.asarray([ordered for _, ordered in keys], dtype=bool),
            confidence_matrix=matrix,
            best=tuple(groups[key] for key in keys),
        )

    @property
    def n_groups(self) -> int:
        """Number of distinct antecedents."""
        return int(self.antecedents.shape[0])

    def applies(
        self, ever: npt.NDArray[np.bool_], first_days: npt.NDArray[np.int32]
    ) -> npt.NDArray[np.bool_]:
        """Customers x groups: the customer has adopted the antecedent (in order)."""
        columns = self._columns
        out = ever[:, columns[0]]
        for i in range(1, len(columns)):
            out &= ever[:, columns[i]] | self._padding[i]
        for i, unchecked in self._order_checks:
            out &= (first_days[:, columns[i]] < first_days[:, columns[i + 1]]) | unchecked
        return out

    def confidence(
        self, ever: npt.NDArray[np.bool_], first_days: npt.NDArray[np.int32]
    ) -> npt.NDArray[np.float64]:
        """Customers x products: best applicable rule confidence (see the class)."""
        n, p = ever.shape
        out = np.zeros((n, p), dtype=np.float64)
        g = self.n_groups
        if g == 0 or n == 0:
            return out
        step = max(1, _CHUNK_CELLS // max(g, 1))
        matrix = self.confidence_matrix
        for start in range(0, n, step):
            stop = min(n, start + step)
            applies = self.applies(ever[start:stop], first_days[start:stop])
            if stop - start == 1:
                if applies[0].any():
                    out[start] = matrix[applies[0]].max(axis=0)
            else:
                for j, groups in self.by_product:
                    out[start:stop, j] = (applies[:, groups] * matrix[groups, j]).max(axis=1)
        out[ever] = 0.0
        return out

    def best_rule(
        self, ever: npt.NDArray[np.bool_], first_days: npt.NDArray[np.int32], product: int
    ) -> Rule | None:
        """The best applicable rule predicting a product for one customer (row 0).

        Highest confidence, then lift, then customers; None if none applies or the
        customer has adopted the product.
        """
        if self.n_groups == 0 or ever[0, product]:
            return None
        applies = self.applies(ever[:1], first_days[:1])[0]
        candidates = [
            self.best[g][product]
            for g in np.flatnonzero(applies & (self.confidence_matrix[:, product] > 0))
        ]
        if not candidates:
            return None
        best = candidates[0]
        for rule in candidates[1:]:
            if _better(rule, best):
                best = rule
        return best


def _better(rule: Rule, other: Rule) -> bool:
    return (rule.confidence, rule.lift, rule.n_customers) > (
        other.confidence,
        other.lift,
        other.n_customers,
    )


def mine_rules(
    index: AdoptionIndex,
    product_codes: Sequence[str],
    *,
    as_of: DateInput,
    min_support: float,
    min_confidence: float,
    min_customers: int = 10,
    max_antecedent: int = 2,
    ordered: bool = True,
    within_days: int | None = None,
) -> RuleSet:
    """Mine sequence rules from adoptions strictly before ``as_of``.

    The customers are those with an adoption before ``as_of`` (as in
    :func:`models.rules.mine_sequence_rules`); see
    :func:`models.rules.mine_sequence_rules_from_matrix` for the settings.

    Parameters
    ----------
    index : AdoptionIndex
        The bank's adoptions, columns ``product_codes``.
    product_codes : sequence of str
        The index's columns.
    as_of : date-like
        Cutoff.
    min_support, min_confidence, min_customers, max_antecedent, ordered, within_days
        Mining settings.

    Returns
    -------
    RuleSet
    """
    as_of_ns = to_ns(as_of)
    # Not kept as the index's latest snapshot: training mines on a thread of its own,
    # while the features of the cutoff before read theirs.
    first = index.first_days(as_of_ns, keep=False)
    seen = (first != NEVER).any(axis=1)
    matrix = AdoptionMatrix(
        customer_ids=np.flatnonzero(seen),
        product_codes=tuple(product_codes),
        first_days=np.ascontiguousarray(first[seen]),
        as_of=pd.Timestamp(as_of_ns, unit="ns"),
        horizon_day=int(as_of_ns // NS_PER_DAY),
    )
    return mine_sequence_rules_from_matrix(
        matrix,
        min_support=min_support,
        min_confidence=min_confidence,
        min_customers=min_customers,
        max_antecedent=max_antecedent,
        ordered=ordered,
        within_days=within_days,
    )


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, eq=False)
class PreparedBank:
    """A bank reduced once to the arrays every cutoff reads (for repeated builds).

    Attributes
    ----------
    customer_ids : numpy.ndarray
        object, in ``data.customers`` order.
    index : AdoptionIndex
        Adoptions over the spec's products.
    joined_ns, birth_ns : numpy.ndarray
        int64 nanoseconds, :data:`models.data.NAT_NS` if unknown.
    static : numpy.ndarray
        float64, customers x (2 + attributes): segment and branch codes, then each
        attribute (numeric value or categorical code).
    segments : numpy.ndarray
        object: raw segment values (for eligibility).
    outcomes : tuple or None
        Outcome rows as arrays (rows, cols, kind, occurred ns) when the spec counts
        outcomes.
    history : _HistoryRows or None
        The attribute history over the static columns, when the bank keeps one;
        ``static`` and ``segments`` hold the values in force now.
    """

    customer_ids: npt.NDArray[np.object_]
    index: AdoptionIndex
    joined_ns: npt.NDArray[np.int64]
    birth_ns: npt.NDArray[np.int64]
    static: npt.NDArray[np.float64]
    segments: npt.NDArray[np.object_]
    outcomes: _OutcomeRows | None
    history: _HistoryRows | None = None


@dataclass(frozen=True, eq=False)
class _OutcomeRows:
    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    kinds: npt.NDArray[np.intp]
    occurred: npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class _HistoryRows:
    """Changes of static columns, sorted by customer row, column, then instant: the
    column ``cols`` of customer ``rows`` held ``previous`` (encoded as in ``static``;
    ``raw`` as stored) until ``changed`` (int64 ns)."""

    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    changed: npt.NDArray[np.int64]
    previous: npt.NDArray[np.float64]
    raw: npt.NDArray[np.object_]


@dataclass(frozen=True, eq=False)
class _Inputs:
    """Per-customer arrays at one instant: what both paths reduce their input to."""

    held: npt.NDArray[np.bool_]
    first_days: npt.NDArray[np.int32]
    last_col: npt.NDArray[np.intp]
    last_day: npt.NDArray[np.int64]
    joined_ns: npt.NDArray[np.int64]
    birth_ns: npt.NDArray[np.int64]
    static: npt.NDArray[np.float64]
    outcome_counts: npt.NDArray[np.float64] | None


@dataclass(frozen=True, eq=False)
class FeatureFrame:
    """Features of many customers at one instant.

    Attributes
    ----------
    spec : FeatureSpec
        The columns.
    as_of : pandas.Timestamp
        The instant.
    customer_ids : numpy.ndarray
        object, one per row.
    rows : numpy.ndarray
        intp: each row's position in ``data.customers``.
    values : numpy.ndarray
        float32, rows x ``spec.columns``.
    held, ever : numpy.ndarray
        bool, rows x ``spec.product_codes``: held at ``as_of`` / adopted before it.
    first_days : numpy.ndarray
        int32 first-adoption days (:data:`models.sequences.NEVER` if none).
    ages : numpy.ndarray
        float64 ages (NaN if unknown).
    segments : numpy.ndarray
        object: raw segment values.
    rule_confidence : numpy.ndarray or None
        float64, rows x products: the ``rule_conf_<p>`` columns before their rounding
        to float32; None without rule features.
    """

    spec: FeatureSpec
    as_of: pd.Timestamp
    customer_ids: npt.NDArray[np.object_]
    rows: npt.NDArray[np.intp]
    values: npt.NDArray[np.float32]
    held: npt.NDArray[np.bool_]
    ever: npt.NDArray[np.bool_]
    first_days: npt.NDArray[np.int32]
    ages: npt.NDArray[np.float64]
    segments: npt.NDArray[np.object_]
    rule_confidence: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def column(self, name: str) -> npt.NDArray[np.float32]:
        """One column's values."""
        return np.asarray(self.values[:, self.spec.columns.index(name)])

    def to_frame(self) -> pd.DataFrame:
        """A DataFrame indexed by customer id; categorical columns as pandas Categorical."""
        frame = pd.DataFrame(
            self.values,
            columns=list(self.spec.columns),
            index=pd.Index(self.customer_ids, name="customer_id"),
        )
        for name in self.spec.categorical:
            levels = self.spec.product_codes if name == "last_product" else self.spec.levels[name]
            codes = np.nan_to_num(frame[name].to_numpy(), nan=-1).astype(np.int64)
            frame[name] = pd.Categorical.from_codes(codes, categories=list(levels))
        return frame


# --------------------------------------------------------------------------- the builder


class FeatureBuilder:
    """Computes the columns of a :class:`FeatureSpec`, batch or one customer.

    Parameters
    ----------
    spec : FeatureSpec
        The columns.
    rules : RuleSet, optional
        Rules mined strictly before the instants the builder is used at; required
        when ``spec.rule_features``.
    """

    def __init__(self, spec: FeatureSpec, rules: RuleSet | None = None) -> None:
        if spec.rule_features and rules is None:
            raise ValueError("this spec has rule features: pass the rules")
        self.spec = spec
        self.rules = rules
        self.rule_table = RuleTable.compile(
            rules if spec.rule_features else None, spec.product_codes
        )
        self.product_index = {code: j for j, code in enumerate(spec.product_codes)}
        self._maps = {
            name: {level: float(i) for i, level in enumerate(levels)}
            for name, levels in spec.levels.items()
        }
        self._static_columns: list[tuple[str, str | None]] = [
            ("segment", "segment"),
            ("branch_id", "branch_id"),
        ] + [
            (name, f"attr_{name}" if kind == "categorical" else None)
            for name, kind in spec.attributes
        ]
        self._kinds = {kind: k for k, kind in enumerate(spec.outcome_kinds)}

    # ----------------------------------------------------------------- batch

    def prepare(self, data: BankData) -> PreparedBank:
        """Reduce a bank to the arrays :meth:`build` reads at any instant."""
        customers = data.customers
        ids = customers["customer_id"].to_numpy(dtype=object)
        missing = [name for name, _ in self.spec.attributes if name not in customers.columns]
        if missing:
            raise ValueError(f"customers lack attribute column(s) {missing} of the feature spec")
        static = np.empty((len(customers), len(self._static_columns)), dtype=np.float64)
        for k, (column, categorical) in enumerate(self._static_columns):
            values = customers[column].to_numpy(dtype=object)
            if categorical is None:
                static[:, k] = customers[column].to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                static[:, k] = _encode(self._maps[categorical], values)
        outcomes = None
        if self.spec.outcome_kinds:
            frame = data.outcomes if data.outcomes is not None else _empty_outcomes()
            kinds = frame["outcome"].map(self._kinds).to_numpy(dtype=np.float64, na_value=np.nan)
            rows = pd.Index(ids).get_indexer(frame["customer_id"].to_numpy(dtype=object))
            cols = pd.Index(list(self.spec.product_codes), dtype=object).get_indexer(
                frame["product_code"].to_numpy(dtype=object)
            )
            keep = (rows >= 0) & (cols >= 0) & ~np.isnan(kinds)
            outcomes = _OutcomeRows(
                rows=rows[keep].astype(np.intp),
                cols=cols[keep].astype(np.intp),
                kinds=kinds[keep].astype(np.intp),
                occurred=frame["occurred_at"]
                .to_numpy(dtype="datetime64[ns]")
                .astype(np.int64)[keep],
            )
        return PreparedBank(
            customer_ids=ids,
            index=AdoptionIndex.from_frame(
                data.adoptions, customer_ids=ids, product_codes=self.spec.product_codes
            ),
            joined_ns=_ns(customers["joined_at"]),
            birth_ns=_ns(customers["birth_date"]),
            static=static,
            segments=customers["segment"].to_numpy(dtype=object),
            outcomes=outcomes,
            history=self._history(data.attribute_history, ids),
        )

    def _history(
        self, history: pd.DataFrame | None, ids: npt.NDArray[np.object_]
    ) -> _HistoryRows | None:
        """The attribute history as arrays over the static columns (None when empty)."""
        if history is None or history.empty:
            return None
        column = {name: k for k, (name, _) in enumerate(self._static_columns)}
        rows = pd.Index(ids).get_indexer(history["customer_id"].to_numpy(dtype=object))
        cols = history["attribute"].map(column).to_numpy(dtype=np.float64, na_value=np.nan)
        keep = (rows >= 0) & ~np.isnan(cols)
        if not keep.any():
            return None
        frame = history.loc[keep]
        rows, cols = rows[keep].astype(np.intp), cols[keep].astype(np.intp)
        raw = frame["previous"].to_numpy(dtype=object)
        previous = np.empty(len(frame), dtype=np.float64)
        for k in np.unique(cols).tolist():
            at = cols == k
            categorical = self._static_columns[k][1]
            if categorical is None:
                previous[at] = pd.to_numeric(pd.Series(raw[at]), errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan
                )
            else:
                previous[at] = _encode(self._maps[categorical], raw[at])
        changed = _ns(frame["changed_at"])
        # By cell, then instant: the first change at or after an instant is the first of
        # its cell in that order.
        order = np.lexsort((changed, cols, rows))
        return _HistoryRows(
            rows=rows[order],
            cols=cols[order],
            changed=changed[order],
            previous=previous[order],
            raw=raw[order],
        )

    def build(
        self,
        data: BankData | PreparedBank,
        *,
        as_of: DateInput,
        rows: npt.ArrayLike | None = None,
    ) -> FeatureFrame:
        """Features of every customer who joined before ``as_of`` (or whose joining
        date is unknown), in ``data.customers`` order.

        Parameters
        ----------
        data : BankData or PreparedBank
            The bank (prepare it once with :meth:`prepare` to build at many instants).
        as_of : date-like
            The instant: only what happened strictly before it is read.
        rows : array-like of int, optional
            Only these customers (positions in ``data.customers``, in this order), for
            example a training sample: each row equals its row in the full build.
            Default: every customer who joined before ``as_of``
            (:func:`joined_before`).

        Returns
        -------
        FeatureFrame
        """
        prepared = data if isinstance(data, PreparedBank) else self.prepare(data)
        as_of_ns = instant(as_of)
        if rows is None:
            rows = joined_before(prepared, as_of_ns)
        else:
            rows = np.asarray(rows, dtype=np.intp)
            n = len(prepared.customer_ids)
            if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= n)):
                raise ValueError(f"rows must be positions of the bank's {n} customers")
        index = prepared.index
        snapshot = index.snapshot(as_of_ns)
        counts = None
        if prepared.outcomes is not None:
            o = prepared.outcomes
            counts = _outcome_counts(
                o.rows, o.cols, o.kinds, o.occurred, index.n_customers, self.spec, as_of_ns
            )[rows]
        static, segments = _static_at(prepared, as_of_ns)
        inputs = _Inputs(
            held=snapshot.held[rows],
            first_days=snapshot.first_days[rows],
            last_col=snapshot.last_col[rows],
            last_day=snapshot.last_day[rows],
            joined_ns=prepared.joined_ns[rows],
            birth_ns=prepared.birth_ns[rows],
            static=static[rows],
            outcome_counts=counts,
        )
        values, ages, rule_confidence = _assemble(self, inputs, as_of_ns)
        return FeatureFrame(
            spec=self.spec,
            as_of=pd.Timestamp(as_of_ns, unit="ns"),
            customer_ids=prepared.customer_ids[rows],
            rows=rows,
            values=values,
            held=inputs.held,
            ever=inputs.first_days != NEVER,
            first_days=inputs.first_days,
            ages=ages,
            segments=segments[rows],
            rule_confidence=rule_confidence,
        )

    # ----------------------------------------------------------------- one customer

    def customer_inputs(self, state: CustomerState, as_of_ns: int) -> _Inputs:
        """Reduce one customer to the arrays :func:`_assemble` reads."""
        snapshot = snapshot_of_state(
            state,
            product_index=self.product_index,
            n_products=len(self.spec.product_codes),
            at_ns=as_of_ns,
        )
        static = np.empty((1, len(self._static_columns)), dtype=np.float64)
        for k, (column, categorical) in enumerate(self._static_columns):
            if k < 2:
                value: Any = state.segment if k == 0 else state.branch_id
            else:
                value = state.attributes.get(column)
            if categorical is None:
                static[0, k] = _number(value)
            else:
                static[0, k] = _encode_one(self._maps[categorical], value)
        counts = None
        if self.spec.outcome_kinds:
            cols, kinds, occurred = [], [], []
            for outcome in state.outcomes:
                col = self.product_index.get(str(outcome.product_code))
                kind = self._kinds.get(str(outcome.outcome))
                if col is not None and kind is not None:
                    cols.append(col)
                    kinds.append(kind)
                    occurred.append(to_ns(outcome.occurred_at))
            counts = _outcome_counts(
                np.zeros(len(cols), dtype=np.intp),
                np.asarray(cols, dtype=np.intp),
                np.asarray(kinds, dtype=np.intp),
                np.asarray(occurred, dtype=np.int64),
                1,
                self.spec,
                as_of_ns,
            )
        return _Inputs(
            held=snapshot.held,
            first_days=snapshot.first_days,
            last_col=snapshot.last_col,
            last_day=snapshot.last_day,
            joined_ns=np.asarray([to_ns(state.joined_at)], dtype=np.int64),
            birth_ns=np.asarray([to_ns(state.birth_date)], dtype=np.int64),
            static=static,
            outcome_counts=counts,
        )

    def customer_features(
        self, state: CustomerState, as_of_ns: int
    ) -> tuple[
        npt.NDArray[np.float32],
        _Inputs,
        npt.NDArray[np.float64],
        npt.NDArray[np.float64] | None,
    ]:
        """One customer's feature matrix (1 x columns), the inputs it came from, their
        age and their exact rule confidences (1 x products, None without rules): what
        scoring needs besides the row."""
        inputs = self.customer_inputs(state, as_of_ns)
        values, ages, rule_confidence = _assemble(self, inputs, as_of_ns)
        return values, inputs, ages, rule_confidence

    def for_customer(self, state: CustomerState, *, as_of: DateInput) -> npt.NDArray[np.float32]:
        """One customer's feature row, identical to their row from :meth:`build`.

        Parameters
        ----------
        state : CustomerState
            The customer.
        as_of : date-like
            The instant.

        Returns
        -------
        numpy.ndarray
            float32, ``spec.columns``.
        """
        as_of_ns = instant(as_of)
        values, _, _ = _assemble(self, self.customer_inputs(state, as_of_ns), as_of_ns)
        return np.asarray(values[0], dtype=np.float32)


def joined_before(prepared: PreparedBank, as_of_ns: int) -> npt.NDArray[np.intp]:
    """Positions of the customers :meth:`FeatureBuilder.build` builds by default: those
    who joined before ``as_of`` or whose joining date is unknown."""
    return np.flatnonzero((prepared.joined_ns == NAT_NS) | (prepared.joined_ns < as_of_ns)).astype(
        np.intp
    )


def static_at(
    prepared: PreparedBank, as_of_ns: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.object_]]:
    """Every customer's static columns and raw segment as they were at an instant (the
    values :meth:`FeatureBuilder.build` reads)."""
    return _static_at(prepared, as_of_ns)


def _assemble(
    builder: FeatureBuilder, inputs: _Inputs, as_of_ns: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
    """The feature matrix from per-customer arrays, the ages it used and the rule
    confidences in float64 (the matrix holds them as float32)."""
    spec = builder.spec
    n, p = inputs.held.shape
    as_of_day = as_of_ns // NS_PER_DAY
    out = np.empty((n, len(spec.columns)), dtype=np.float32)
    ever = inputs.first_days != NEVER
    out[:, 0:p] = inputs.held
    out[:, p : 2 * p] = ever
    out[:, 2 * p : 3 * p] = np.where(ever, as_of_day - inputs.first_days.astype(np.int64), np.nan)
    k = 3 * p
    out[:, k] = inputs.held.sum(axis=1)
    out[:, k + 1] = ever.sum(axis=1)
    has_last = inputs.last_col >= 0
    out[:, k + 2] = np.where(has_last, inputs.last_col, np.nan)
    out[:, k + 3] = np.where(has_last, as_of_day - inputs.last_day, np.nan)
    joined = inputs.joined_ns != NAT_NS
    out[:, k + 4] = np.where(joined, as_of_day - inputs.joined_ns // NS_PER_DAY, np.nan)
    ages = ages_at(inputs.birth_ns, as_of_ns)
    out[:, k + 5] = ages
    k += 6
    width = inputs.static.shape[1]
    out[:, k : k + width] = inputs.static
    k += width
    rule_confidence = None
    if spec.rule_features:
        rule_confidence = builder.rule_table.confidence(ever, inputs.first_days)
        out[:, k : k + p] = rule_confidence
        k += p
    if spec.outcome_kinds:
        assert inputs.outcome_counts is not None
        out[:, k:] = inputs.outcome_counts
    return out, ages, rule_confidence


def _static_at(
    prepared: PreparedBank, as_of_ns: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.object_]]:
    """The static columns and raw segments as they were at an instant.

    A value changed at or after ``as_of`` reads as the ``previous`` of its first such
    change (a change at ``as_of`` has not happened at ``as_of``, as an adoption); the
    others are the values in force now. Vectorised: one pass over the changes.
    """
    history = prepared.history
    if history is None:
        return prepared.static, prepared.segments
    later = np.flatnonzero(history.changed >= as_of_ns)
    if later.size == 0:
        return prepared.static, prepared.segments
    rows, cols = history.rows[later], history.cols[later]
    # Sorted by cell then instant: a cell's first later change opens its run.
    first = np.ones(later.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    chosen = later[first]
    static = prepared.static.copy()
    static[history.rows[chosen], history.cols[chosen]] = history.previous[chosen]
    segments = prepared.segments
    of_segment = chosen[history.cols[chosen] == 0]
    if of_segment.size:
        segments = segments.copy()
        segments[history.rows[of_segment]] = [
            value if isinstance(value, str) else None for value in history.raw[of_segment]
        ]
    return static, segments


def _outcome_counts(
    rows: npt.NDArray[np.intp],
    cols: npt.NDArray[np.intp],
    kinds: npt.NDArray[np.intp],
    occurred: npt.NDArray[np.int64],
    n: int,
    spec: FeatureSpec,
    as_of_ns: int,
) -> npt.NDArray[np.float64]:
    """Customers x (kinds x products): outcomes in ``[as_of - window, as_of)``."""
    p = len(spec.product_codes)
    counts = np.zeros((n, len(spec.outcome_kinds) * p), dtype=np.float64)
    start = as_of_ns - spec.outcome_window_days * NS_PER_DAY
    mask = (occurred >= start) & (occurred < as_of_ns)
    np.add.at(counts, (rows[mask], kinds[mask] * p + cols[mask]), 1.0)
    return counts


# --------------------------------------------------------------------------- helpers


def _encode(
    mapping: Mapping[str, float], values: npt.NDArray[np.object_]
) -> npt.NDArray[np.float64]:
    """:func:`_encode_one` of every value, looked up once per distinct value."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    lookup = np.fromiter(
        (_encode_one(mapping, v) for v in uniques), dtype=np.float64, count=len(uniques)
    )
    return np.asarray(np.append(lookup, np.nan)[codes], dtype=np.float64)


def _encode_one(mapping: Mapping[str, float], value: object) -> float:
    if isinstance(value, str):
        return mapping.get(value, np.nan)
    if value is None or value is pd.NA:
        return np.nan
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return np.nan
        if float(value).is_integer():
            return mapping.get(str(int(value)), np.nan)
    return mapping.get(str(value), np.nan)


def _number(value: object) -> float:
    if value is None or value is pd.NA:
        return np.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return np.nan


def _ns(values: pd.Series) -> npt.NDArray[np.int64]:
    return np.asarray(values.to_numpy(dtype="datetime64[ns]").astype(np.int64))


def _empty_outcomes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": pd.Series([], dtype="str"),
            "product_code": pd.Series([], dtype="str"),
            "outcome": pd.Series([], dtype="str"),
            "occurred_at": pd.Series([], dtype="datetime64[ns]"),
        }
    )


def build_features(
    data: BankData,
    *,
    as_of: DateInput,
    rules: RuleSet | None,
    spec: FeatureSpec | None = None,
) -> FeatureFrame:
    """Features of every customer at ``as_of`` (see the module for the columns).

    Parameters
    ----------
    data : BankData
        The bank.
    as_of : date-like
        Only information strictly before this instant is used.
    rules : RuleSet or None
        Rules mined strictly before ``as_of`` (see :func:`mine_rules`); None leaves the
        rule columns out (unless ``spec`` has them, then they are required).
    spec : FeatureSpec, optional
        The columns (default: :meth:`FeatureSpec.fit` on ``data``).

    Returns
    -------
    FeatureFrame
    """
    spec = spec or FeatureSpec.fit(data, rule_features=rules is not None)
    return FeatureBuilder(spec, rules).build(data, as_of=as_of)


def features_for_customer(
    state: CustomerState,
    *,
    as_of: DateInput,
    spec: FeatureSpec,
    rules: RuleSet | None,
) -> npt.NDArray[np.float32]:
    """One customer's feature row, identical to their :func:`build_features` row.

    For repeated calls build a :class:`FeatureBuilder` once and call
    :meth:`FeatureBuilder.for_customer`.
    """
    return FeatureBuilder(spec, rules).for_customer(state, as_of=as_of)
