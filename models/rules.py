"""Association rules: plain basket rules and order-aware product-adoption rules.

Three miners share one rule vocabulary:

- :func:`mine_basket_rules` mines market baskets (one row per item in a transaction)
  with arules semantics and returns a DataFrame; it reproduces the published results on
  the Groceries data exactly.
- :func:`mine_sequence_rules` mines "customers who adopted {A, B} go on to adopt C"
  from dated adoptions, counting only what happened after the antecedent was complete.
- :func:`mine_coholding_rules` treats each customer's adopted products as one basket.

Sequence and co-holding miners return a :class:`RuleSet` (saved as plain JSON), which
answers "which rule applies best to this customer" one customer at a time
(:meth:`RuleSet.best_rules`) or for many at once (:func:`best_rule_confidence`): the
model's features, by confidence. Which rule is worth saying to the customer is another
question (:meth:`RuleSet.reasons_for`): only rules with a lift above 1 and enough
customers behind them, the highest lift first; :func:`rules_for_display` orders rules
for people the same way, and :func:`select_rules` filters rules as an analyst asks
for them and ranks them in that order too.

Thresholds are exact: a threshold is read as the decimal it is written as (0.8 is 4/5)
and compared with integer counts, so a rule exactly at a threshold is always kept,
whatever the floating-point rounding of the ratio.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from fractions import Fraction
from functools import cached_property
from os import PathLike
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.sequences import NEVER, AdoptionMatrix, DateLike, first_adoption_matrix

__all__ = [
    "BASKET_COLUMNS",
    "REASON_MIN_CUSTOMERS",
    "REASON_MIN_LIFT",
    "Rule",
    "RuleSet",
    "best_rule_confidence",
    "frequent_itemsets",
    "mine_basket_rules",
    "mine_coholding_rules",
    "mine_coholding_rules_from_matrix",
    "mine_sequence_rules",
    "mine_sequence_rules_from_matrix",
    "read_baskets",
    "rule_sentence",
    "rules_for_display",
]

BASKET_COLUMNS: Final[tuple[str, ...]] = (
    "antecedent",
    "consequent",
    "support",
    "confidence",
    "lift",
    "conviction",
    "count",
)
"""Columns of :func:`mine_basket_rules`'s result, in order."""

REASON_MIN_LIFT: Final[float] = 1.0
"""A rule is said as a reason (or shown first) only with a lift above this: at or below
1 the customers it describes take the product no more often than anyone, so saying it
argues against the offer."""
REASON_MIN_CUSTOMERS: Final[int] = 30
"""Fewest customers a rule said as a reason must have held for (``n_customers``): a
share such as "9 in 10" resting on fewer is too likely a fluke of a handful (at 30 its
relative standard error is under a fifth). Mining keeps rules from 10 customers
(:class:`models.propensity.TrainConfig`), which is enough for a model feature."""

_FORMAT: Final[str] = "nbo.rules"
_FORMAT_VERSION: Final[int] = 1


# --------------------------------------------------------------------------- rule types


@dataclass(frozen=True)
class Rule:
    """One association rule ``antecedent => consequent``.

    Attributes
    ----------
    antecedent : tuple of str
        The products (items) the rule starts from: sorted for unordered rules, in
        adoption order for ordered rules. Empty only for basket rules ``{} => c``.
    consequent : str
        The product the rule predicts; never in the antecedent.
    support : float
        ``n_customers`` / all customers (or transactions).
    confidence : float
        ``n_customers / n_at_risk``.
    lift : float
        ``confidence`` / share of all customers who have the consequent.
    conviction : float
        ``(1 - base) / (1 - confidence)`` with ``base`` that share; ``inf`` when
        ``confidence == 1``.
    n_customers : int
        Customers the rule held for (sequence rules: adopted the consequent after the
        antecedent; co-holding rules: hold antecedent and consequent).
    n_at_risk : int
        Customers the rule could have held for (sequence rules: completed the
        antecedent without the consequent; co-holding rules: hold the antecedent).
    median_days : float or None
        Median days from completing the antecedent to adopting the consequent among
        ``n_customers``; None for rules without timing.
    ordered : bool
        Whether the antecedent only counts when adopted in the order given.
    """

    antecedent: tuple[str, ...]
    consequent: str
    support: float
    confidence: float
    lift: float
    conviction: float
    n_customers: int
    n_at_risk: int
    median_days: float | None
    ordered: bool

    def __post_init__(self) -> None:
        if not isinstance(self.antecedent, tuple):
            raise TypeError("Rule.antecedent must be a tuple")
        if len(set(self.antecedent)) != len(self.antecedent):
            raise ValueError(f"Rule.antecedent has repeated products: {self.antecedent}")
        if self.consequent in self.antecedent:
            raise ValueError(f"consequent {self.consequent!r} is in the antecedent")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; an infinite conviction becomes None."""
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        data["antecedent"] = list(self.antecedent)
        if math.isinf(self.conviction):
            data["conviction"] = None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Inverse of :meth:`to_dict`."""
        conviction = data["conviction"]
        median = data["median_days"]
        return cls(
            antecedent=tuple(str(item) for item in data["antecedent"]),
            consequent=str(data["consequent"]),
            support=float(data["support"]),
            confidence=float(data["confidence"]),
            lift=float(data["lift"]),
            conviction=math.inf if conviction is None else float(conviction),
            n_customers=int(data["n_customers"]),
            n_at_risk=int(data["n_at_risk"]),
            median_days=None if median is None else float(median),
            ordered=bool(data["ordered"]),
        )


def _rank_key(rule: Rule) -> tuple[float, float, int]:
    """Sort key putting the best rule first: confidence, then lift, then customers."""
    return (-rule.confidence, -rule.lift, -rule.n_customers)


def _reason_key(rule: Rule) -> tuple[float, float, float, int]:
    """Sort key putting the most persuasive rule first: lift, then conviction, then
    confidence, then customers."""
    return (-rule.lift, -rule.conviction, -rule.confidence, -rule.n_customers)


_Entry = tuple[int, str, Rule]
"""(rank, consequent, rule): rank 0 is the best rule of the set."""


@dataclass(frozen=True)
class _Lookup:
    """Rules by antecedent length, then antecedent key; best rule per consequent."""

    by_size: dict[int, dict[tuple[str, ...], tuple[_Entry, ...]]]
    ordered: bool


@dataclass(frozen=True)
class RuleSet:
    """Rules mined together, with the settings that produced them.

    Treat a RuleSet as immutable: its lookup index is built on first use.

    Attributes
    ----------
    rules : list of Rule
        Best first (confidence, then lift, then customers) as mined.
    mode : str
        ``"sequence"`` or ``"coholding"`` for mined sets.
    params : dict
        The mining settings and data facts (cutoff, customer count, product codes);
        JSON values only.
    """

    rules: list[Rule]
    mode: str
    params: dict[str, Any]

    def __len__(self) -> int:
        return len(self.rules)

    def to_json(self) -> str:
        """Serialise to plain JSON (no pickle); :meth:`from_json` restores it exactly.

        Returns
        -------
        str
            A JSON document; infinite convictions are written as ``null``.
        """
        document = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "mode": self.mode,
            "params": self.params,
            "rules": [rule.to_dict() for rule in self.rules],
        }
        return json.dumps(document, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> RuleSet:
        """Load a RuleSet written by :meth:`to_json`.

        Parameters
        ----------
        text : str
            The JSON document.

        Returns
        -------
        RuleSet
            Equal to the RuleSet that was saved.

        Raises
        ------
        ValueError
            If the document is not a rule set of a known format version.
        """
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise ValueError(f"not an {_FORMAT} document")
        if document.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported {_FORMAT} version {document.get('version')!r}")
        try:
            rules = [Rule.from_dict(item) for item in document["rules"]]
            return cls(rules=rules, mode=str(document["mode"]), params=dict(document["params"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed {_FORMAT} document: {error!r}") from error

    def to_frame(self) -> pd.DataFrame:
        """One row per rule, columns named as the :class:`Rule` fields, in set order."""
        columns = [field.name for field in fields(Rule)]
        return pd.DataFrame(
            [[getattr(rule, name) for name in columns] for rule in self.rules],
            columns=columns,
        )

    def for_consequent(self, code: str) -> list[Rule]:
        """Rules predicting ``code``, in set order."""
        return [rule for rule in self.rules if rule.consequent == code]

    def best_rules(self, held: Sequence[str]) -> dict[str, Rule]:
        """The best applicable rule for every product the customer does not hold.

        Parameters
        ----------
        held : sequence of str
            The customer's adopted products in adoption order (first adoption counts;
            later repeats are ignored). Each position is strictly after the previous
            one: callers with same-day adoptions decide their order.

        Returns
        -------
        dict of str to Rule
            For each consequent not in ``held`` that some rule applies to, the best
            such rule (highest confidence, then lift, then ``n_customers``, then set
            order), best first. A rule applies if its antecedent is a subset of
            ``held`` and, for ordered rules, appears in ``held`` in that order.
        """
        return _applicable(self._lookups, held)

    def reasons_for(
        self,
        held: Sequence[str],
        *,
        min_lift: float = REASON_MIN_LIFT,
        min_customers: int = REASON_MIN_CUSTOMERS,
    ) -> dict[str, Rule]:
        """The most persuasive applicable rule worth saying for every product the
        customer does not hold: the reason to give, never one that argues against.

        Unlike :meth:`best_rules` (the model's feature, by confidence), only rules with
        ``lift > min_lift`` and ``n_customers >= min_customers`` count, ranked by lift,
        then conviction, then confidence, then ``n_customers``, then set order.

        Parameters
        ----------
        held : sequence of str
            As in :meth:`best_rules`.
        min_lift : float
            Keep rules whose lift is strictly above this (default
            :data:`REASON_MIN_LIFT`).
        min_customers : int
            Keep rules that held for at least this many customers (default
            :data:`REASON_MIN_CUSTOMERS`).

        Returns
        -------
        dict of str to Rule
            For each consequent not in ``held`` that a kept rule applies to (as in
            :meth:`best_rules`), its best kept rule, best first.
        """
        key = (float(min_lift), int(min_customers))
        lookups = self._reason_lookups.get(key)
        if lookups is None:
            keep = [
                rule.lift > min_lift and rule.n_customers >= min_customers for rule in self.rules
            ]
            lookups = self._reason_lookups[key] = _build_lookups(self.rules, _reason_key, keep)
        return _applicable(lookups, held)

    @cached_property
    def _lookups(self) -> tuple[_Lookup, ...]:
        return _build_lookups(self.rules, _rank_key, [True] * len(self.rules))

    @cached_property
    def _reason_lookups(self) -> dict[tuple[float, int], tuple[_Lookup, ...]]:
        return {}


def _applicable(lookups: tuple[_Lookup, ...], held: Sequence[str]) -> dict[str, Rule]:
    """The best rule of ``lookups`` per consequent applicable to ``held``, best first."""
    sequence = list(dict.fromkeys(held))
    held_set = set(sequence)
    best: dict[str, tuple[int, Rule]] = {}
    for lookup in lookups:
        items = sequence if lookup.ordered else sorted(held_set)
        _collect(lookup, items, held_set, best)
    ranked = sorted(best.items(), key=lambda item: item[1][0])
    return {consequent: rule for consequent, (_, rule) in ranked}


def _build_lookups(
    rules: Sequence[Rule], rank_key: Callable[[Rule], Any], keep: Sequence[bool]
) -> tuple[_Lookup, ...]:
    """Lookup tables over the kept ``rules``, ranked by ``rank_key`` then set order."""
    kept = [i for i in range(len(rules)) if keep[i]]
    order = sorted(kept, key=lambda i: (rank_key(rules[i]), i))
    rank = {index: position for position, index in enumerate(order)}
    lookups = []
    for ordered in (False, True):
        grouped: dict[tuple[str, ...], dict[str, _Entry]] = defaultdict(dict)
        for index in kept:
            rule = rules[index]
            if rule.ordered != ordered:
                continue
            key = rule.antecedent if ordered else tuple(sorted(rule.antecedent))
            entry = (rank[index], rule.consequent, rule)
            current = grouped[key].get(rule.consequent)
            if current is None or entry[0] < current[0]:
                grouped[key][rule.consequent] = entry
        if not grouped:
            continue
        by_size: dict[int, dict[tuple[str, ...], tuple[_Entry, ...]]] = defaultdict(dict)
        for key, entries in grouped.items():
            by_size[len(key)][key] = tuple(sorted(entries.values(), key=lambda e: e[0]))
        lookups.append(_Lookup(by_size=dict(sorted(by_size.items())), ordered=ordered))
    return tuple(lookups)


def _collect(
    lookup: _Lookup,
    items: Sequence[str],
    held_set: set[str],
    best: dict[str, tuple[int, Rule]],
) -> None:
    """Merge into ``best`` every rule of ``lookup`` that applies to ``items``."""
    positions = {item: i for i, item in enumerate(items)} if lookup.ordered else {}
    for size, table in lookup.by_size.items():
        if size > len(items):
            break
        if math.comb(len(items), size) <= len(table):
            # combinations() keeps the order of ``items``: sorted for unordered keys,
            # adoption order (so exactly the ordered sub-sequences) for ordered keys.
            found = [table[key] for key in itertools.combinations(items, size) if key in table]
        elif lookup.ordered:
            found = [
                entries
                for key, entries in table.items()
                if all(item in positions for item in key)
                and all(positions[a] < positions[b] for a, b in itertools.pairwise(key))
            ]
        else:
            found = [entries for key, entries in table.items() if held_set.issuperset(key)]
        for entries in found:
            for rank, consequent, rule in entries:
                if consequent in held_set:
                    continue
                current = best.get(consequent)
                if current is None or rank < current[0]:
                    best[consequent] = (rank, rule)


def best_rule_confidence(
    held: npt.NDArray[np.bool_],
    first_days: npt.NDArray[np.integer[Any]] | npt.NDArray[np.floating[Any]],
    product_codes: Sequence[str],
    rules: RuleSet | Iterable[Rule],
) -> npt.NDArray[np.float64]:
    """Each customer's best applicable rule confidence per product, vectorised.

    Row by row this equals ``max(rule.confidence for rule in
    rule_set.best_rules(sequence).values() if rule.consequent == code)`` where
    ``sequence`` lists the held products in order of ``first_days`` (no ties).

    Parameters
    ----------
    held : numpy.ndarray
        Bool, customers x products: the products each customer holds.
    first_days : numpy.ndarray
        Customers x products, any numbers that order the held products: first-adoption
        days (:attr:`models.sequences.AdoptionMatrix.first_days`) or positions. Ordered
        rules need strictly increasing values, so products adopted the same day do not
        satisfy an ordered antecedent. Ignored where ``held`` is False.
    product_codes : sequence of str
        The product of each column.
    rules : RuleSet or iterable of Rule
        Rules mentioning products outside ``product_codes`` never apply.

    Returns
    -------
    numpy.ndarray
        float64, customers x products: the highest confidence among rules predicting
        the column's product whose antecedent the customer holds (in order, for ordered
        rules); 0 where none applies and where the customer holds the product.
    """
    held = np.asarray(held, dtype=bool)
    order = np.asarray(first_days)
    if held.ndim != 2 or held.shape != order.shape or held.shape[1] != len(product_codes):
        raise ValueError(
            f"held {held.shape} and first_days {order.shape} must both be customers x "
            f"{len(product_codes)} products"
        )
    column = {str(code): j for j, code in enumerate(product_codes)}
    # Only the best confidence per (antecedent, order flag, consequent) can matter.
    best: dict[tuple[tuple[int, ...], bool], dict[int, float]] = defaultdict(dict)
    rule_list = rules.rules if isinstance(rules, RuleSet) else list(rules)
    for rule in rule_list:
        if rule.consequent not in column or any(a not in column for a in rule.antecedent):
            continue
        cols = tuple(column[a] for a in rule.antecedent)
        key = (cols if rule.ordered else tuple(sorted(cols)), rule.ordered and len(cols) > 1)
        j = column[rule.consequent]
        best[key][j] = max(best[key].get(j, 0.0), rule.confidence)

    held_t = np.ascontiguousarray(held.T)
    order_t = np.ascontiguousarray(order.T)
    out_t = np.zeros(held_t.shape, dtype=np.float64)
    for (cols, ordered), confidences in best.items():
        applies = np.ones(held.shape[0], dtype=bool)
        for j in cols:
            applies &= held_t[j]
        if ordered:
            for a, b in itertools.pairwise(cols):
                applies &= order_t[a] < order_t[b]
        for j, confidence in confidences.items():
            np.maximum(out_t[j], np.where(applies, confidence, 0.0), out=out_t[j])
    out_t[held_t] = 0.0
    return np.ascontiguousarray(out_t.T)


# --------------------------------------------------------------------------- selecting


def select_rules(
    rules: Iterable[Rule],
    *,
    consequent: str | None = None,
    min_confidence: float = 0.0,
    min_lift: float = 0.0,
    ordered: bool | None = None,
    limit: int | None = None,
) -> list[Rule]:
    """The rules an analyst asked for, best first.

    Parameters
    ----------
    rules : iterable of Rule
        The rules to choose from.
    consequent : str, optional
        Keep only rules predicting this product; None keeps every consequent.
    min_confidence, min_lift : float
        Keep only rules at least this confident and with at least this lift, compared
        with the rule's stored ratios as floats (the rules are already mined; the exact
        thresholds above are the miners').
    ordered : bool, optional
        Keep only ordered (True) or only unordered (False) rules; None keeps both.
    limit : int, optional
        Return at most this many rules; None returns all that are kept.

    Returns
    -------
    list of Rule
        The kept rules in the order reasons are chosen (:func:`rules_for_display`):
        by lift, then conviction, then confidence, then customers, all descending;
        rules equal on all four keep their order in ``rules``.
    """
    chosen = [
        rule
        for rule in rules
        if rule.confidence >= min_confidence
        and rule.lift >= min_lift
        and (consequent is None or rule.consequent == consequent)
        and (ordered is None or rule.ordered == ordered)
    ]
    chosen.sort(key=_reason_key)
    return chosen if limit is None else chosen[:limit]


def rules_for_display(
    rules: RuleSet | Iterable[Rule],
    *,
    limit: int | None = None,
    min_lift: float = REASON_MIN_LIFT,
    min_customers: int = REASON_MIN_CUSTOMERS,
) -> tuple[list[Rule], int]:
    """The rules to show a person, in the order decisions choose their reasons.

    The same choice as :meth:`RuleSet.reasons_for`: only rules with ``lift > min_lift``
    and ``n_customers >= min_customers``, by lift, then conviction, then confidence,
    then customers (all descending), then their order in ``rules``.

    Parameters
    ----------
    rules : RuleSet or iterable of Rule
        The rules (filter them first, e.g. by consequent, to show fewer).
    limit : int, optional
        Show at most this many; None shows every kept rule.
    min_lift : float
        Keep rules whose lift is strictly above this.
    min_customers : int
        Keep rules that held for at least this many customers.

    Returns
    -------
    shown : list of Rule
        The rules to show, best first.
    left_out : int
        How many of ``rules`` are not shown (lift too low, too few customers, or past
        ``limit``), to say so next to them.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    pool = rules.rules if isinstance(rules, RuleSet) else list(rules)
    kept = [rule for rule in pool if rule.lift > min_lift and rule.n_customers >= min_customers]
    kept.sort(key=_reason_key)
    shown = kept if limit is None else kept[:limit]
    return shown, len(pool) - len(shown)


# --------------------------------------------------------------------------- wording


def rule_sentence(rule: Rule, product_names: Mapping[str, str]) -> str:
    """A sentence a bank teller can say out loud about a rule.

    For example "8 in 10 customers with an everyday account and a credit card take home
    insurance, usually within 4 months".

    Parameters
    ----------
    rule : Rule
        The rule.
    product_names : mapping of str to str
        Spoken name of every product in the rule, as it reads after "with" and "take":
        "an everyday account", "a credit card", "home insurance".

    Returns
    -------
    str
        The sentence, without a final full stop. The share is the confidence: "N in 10"
        (rounded) from 15% to 95%, otherwise a percentage ("97% of customers", "Fewer
        than 1% of customers"), and "All customers" at 100%. Ordered rules say "who took
        A and then B ... go on to take C". The timing is the median time, rounded up,
        in days up to 13 days, weeks up to 8 weeks, months up to 18 months, else years;
        it is left out when ``median_days`` is None.

    Raises
    ------
    KeyError
        If a product of the rule has no name.
    """
    missing = [c for c in (*rule.antecedent, rule.consequent) if c not in product_names]
    if missing:
        raise KeyError(f"no spoken name for product(s) {missing}")
    names = [product_names[code] for code in rule.antecedent]
    share = _share_phrase(rule.confidence)
    consequent = product_names[rule.consequent]
    if not names:
        sentence = f"{share} take {consequent}"
    elif rule.ordered and len(names) > 1:
        sentence = f"{share} who took {' and then '.join(names)} go on to take {consequent}"
    else:
        sentence = f"{share} with {_join_and(names)} take {consequent}"
    if rule.median_days is not None:
        sentence += f", usually within {_duration_phrase(rule.median_days)}"
    return sentence


def _share_phrase(confidence: float) -> str:
    if confidence >= 1.0:
        return "All customers"
    tenths = math.floor(confidence * 10 + 0.5)
    if 2 <= tenths <= 9:
        return f"{tenths} in 10 customers"
    percent = math.floor(confidence * 100 + 0.5)
    if percent < 1:
        return "Fewer than 1% of customers"
    # Below 100% a rule is not universal, so never round up to "100%".
    return f"{min(percent, 99)}% of customers"


def _join_and(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def _duration_phrase(days: float) -> str:
    # Rounded up, so "within" stays true of the median.
    if days <= 13:
        count, unit = max(1, math.ceil(days)), "day"
    elif days <= 56:
        count, unit = math.ceil(days / 7), "week"
    elif days <= 548:
        count, unit = math.ceil(days / 30.4375), "month"
    else:
        count, unit = math.ceil(days / 365.25), "year"
    return f"a {unit}" if count == 1 else f"{count} {unit}s"


# --------------------------------------------------------------------------- baskets


def read_baskets(
    path: str | PathLike[str],
    *,
    transaction_col: str = "transaction_id",
    item_col: str = "item",
) -> pd.DataFrame:
    """Read a tidy basket CSV: one row per item in a transaction.

    Parameters
    ----------
    path : str or path-like
        CSV with a header naming at least ``transaction_col`` and ``item_col``
        (``transaction_id,item`` like ``groceries_tidy.csv``).
    transaction_col, item_col : str
        Column names.

    Returns
    -------
    pandas.DataFrame
        The two columns, read as text exactly as written (an item called "NA" stays
        "NA"; leading zeros in ids stay).

    Raises
    ------
    ValueError
        If a column is missing or a row has an empty transaction id or item.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    missing = [c for c in (transaction_col, item_col) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; the header has {list(frame.columns)}"
        )
    frame = frame[[transaction_col, item_col]]
    empty = (frame == "").any(axis=1)
    if empty.any():
        first = int(np.flatnonzero(empty.to_numpy())[0]) + 2  # 1-based, after the header
        raise ValueError(
            f"{path}: {int(empty.sum())} row(s) with an empty value, first on line {first}"
        )
    return frame.reset_index(drop=True)


def mine_basket_rules(
    transactions: pd.DataFrame,
    *,
    min_support: float,
    min_confidence: float,
    min_len: int = 1,
    max_len: int | None = None,
    transaction_col: str = "transaction_id",
    item_col: str = "item",
) -> pd.DataFrame:
    """Mine single-consequent association rules from baskets, with arules semantics.

    An itemset is frequent when at least ``ceil(min_support * n_transactions)``
    transactions contain it; every frequent itemset ``S`` with
    ``min_len <= |S| <= max_len`` gives the rules ``S - {c} => c`` for each ``c`` in
    ``S`` whose confidence ``count(S) / count(S - {c})`` is at least ``min_confidence``.
    With ``min_len=1`` that includes ``{} => c`` (confidence = support of ``c``), as
    arules does. Thresholds are compared exactly on counts.

    Parameters
    ----------
    transactions : pandas.DataFrame
        One row per item in a transaction; repeated items count once.
    min_support : float
        In [0, 1]; an itemset must also occur in at least one transaction.
    min_confidence : float
        In [0, 1].
    min_len, max_len : int
        Bounds on antecedent + consequent items (arules' ``minlen``/``maxlen``;
        ``max_len=None`` is unbounded, arules' default is 10).
    transaction_col, item_col : str
        Column names.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`BASKET_COLUMNS`: ``antecedent`` (sorted tuple of items),
        ``consequent`` (str), ``support`` (of antecedent and consequent together),
        ``confidence``, ``lift``, ``conviction`` (``inf`` at confidence 1), ``count``
        (transactions containing antecedent and consequent). Sorted by lift, then
        confidence, then count (all descending), then antecedent and consequent.
    """
    missing = [c for c in (transaction_col, item_col) if c not in transactions.columns]
    if missing:
        raise ValueError(
            f"transactions is missing column(s) {missing}; it has {list(transactions.columns)}"
        )
    if transactions[[transaction_col, item_col]].isna().any().any():
        raise ValueError("transactions must not have missing ids or items")
    rows, _ = pd.factorize(transactions[transaction_col])
    cols, items = pd.factorize(transactions[item_col].astype(str), sort=True)
    onehot = np.zeros((int(rows.max()) + 1 if rows.size else 0, len(items)), dtype=bool)
    onehot[rows, cols] = True
    found = _onehot_rules(
        onehot,
        [str(item) for item in items],
        min_support=min_support,
        min_confidence=min_confidence,
        min_len=min_len,
        max_len=max_len,
        min_count=1,
    )
    return found[list(BASKET_COLUMNS)]


def _onehot_rules(
    onehot: npt.NDArray[np.bool_],
    items: Sequence[str],
    *,
    min_support: float,
    min_confidence: float,
    min_len: int,
    max_len: int | None,
    min_count: int,
) -> pd.DataFrame:
    """Basket rules from a transactions x items bool matrix (see mine_basket_rules).

    The result also has ``antecedent_count`` and ``consequent_count``.
    """
    support = _threshold(min_support, "min_support", low=0.0, high=1.0)
    confidence = _threshold(min_confidence, "min_confidence", low=0.0, high=1.0)
    if min_len < 1 or (max_len is not None and max_len < max(min_len, 1)):
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len} and {max_len}")
    from mlxtend.frequent_patterns import association_rules  # mining only: see _fpgrowth

    n = onehot.shape[0]
    records: list[dict[str, Any]] = []
    needed = max(_ceil(support * n), min_count, 1)
    if n and needed <= n:
        frequent = _fpgrowth(onehot, needed, max_len)
        counts = dict(zip(frequent["itemsets"], frequent["count"], strict=True))
        item_count = {next(iter(s)): c for s, c in counts.items() if len(s) == 1}

        def add(antecedent: frozenset[int], consequent: int) -> None:
            both = counts[antecedent | {consequent}]
            before = counts[antecedent] if antecedent else n
            if not _at_least(both, before, confidence):
                return
            base = item_count[consequent]
            records.append(
                {
                    "antecedent": tuple(sorted(items[i] for i in antecedent)),
                    "consequent": items[consequent],
                    "support": both / n,
                    "confidence": both / before,
                    "lift": (both * n) / (before * base),
                    "conviction": (
                        math.inf
                        if both == before
                        else ((n - base) * before) / (n * (before - both))
                    ),
                    "count": both,
                    "antecedent_count": before,
                    "consequent_count": base,
                }
            )

        if min_len <= 1:
            for item in item_count:
                add(frozenset(), item)
        if any(len(s) >= max(min_len, 2) for s in counts):
            # mlxtend's float confidence may fall a hair under the threshold for a rule
            # exactly at it; ask for slightly less and decide exactly in add().
            relaxed = float(confidence) * (1.0 - 1e-9)
            with np.errstate(divide="ignore", invalid="ignore"):
                candidates = association_rules(
                    frequent[["support", "itemsets"]],
                    num_itemsets=n,
                    metric="confidence",
                    min_threshold=relaxed,
                    return_metrics=["confidence"],
                )
            for antecedent, consequent in zip(
                candidates["antecedents"], candidates["consequents"], strict=True
            ):
                if len(consequent) == 1 and len(antecedent) + 1 >= min_len:
                    add(frozenset(antecedent), next(iter(consequent)))

    records.sort(
        key=lambda r: (-r["lift"], -r["confidence"], -r["count"], r["antecedent"], r["consequent"])
    )
    columns = [*BASKET_COLUMNS, "antecedent_count", "consequent_count"]
    return pd.DataFrame.from_records(records, columns=columns)


def _fpgrowth(onehot: npt.NDArray[np.bool_], min_count: int, max_len: int | None) -> pd.DataFrame:
    """Itemsets (frozensets of column positions) in at least ``min_count`` rows.

    Returns mlxtend's frame (``support``, ``itemsets``) plus the exact ``count``.
    """
    # Imported here: mlxtend (with joblib and psutil) is for mining, and a serving
    # worker that imports this module for its rules would carry it for nothing.
    from mlxtend.frequent_patterns import fpgrowth

    n = onehot.shape[0]
    frame = pd.DataFrame(onehot, columns=range(onehot.shape[1]))
    # mlxtend keeps itemsets with count / n >= min_support; halfway between two counts
    # is safe from rounding and admits exactly the counts >= min_count.
    frequent = fpgrowth(frame, min_support=(min_count - 0.5) / n, max_len=max_len)
    frequent["itemsets"] = [frozenset(int(i) for i in s) for s in frequent["itemsets"]]
    frequent["count"] = np.rint(frequent["support"].to_numpy() * n).astype(np.int64)
    return frequent


def frequent_itemsets(
    onehot: npt.NDArray[np.bool_], min_count: int, max_len: int | None
) -> dict[frozenset[int], int]:
    """Itemsets (frozensets of column positions) in at least ``min_count`` rows, with
    their exact counts; the same itemsets as :func:`_fpgrowth`.

    Counted level by level (apriori) over the distinct rows, each weighted by how often
    it occurs: a bank of a million customers over twenty products has a few thousand
    distinct sets of adopted products, so this is fast where an FP-tree built row by row
    in Python is not.
    """
    n, m = onehot.shape
    if n == 0 or m == 0 or min_count > n:
        return {}
    onehot = np.asarray(onehot, dtype=bool)
    if m <= 62:
        keys = onehot.astype(np.int64) @ (np.int64(1) << np.arange(m, dtype=np.int64))
        unique, counts = np.unique(keys, return_counts=True)
        rows = ((unique[:, None] >> np.arange(m, dtype=np.int64)) & 1).astype(bool)
    else:
        packed, counts = np.unique(np.packbits(onehot, axis=1), axis=0, return_counts=True)
        rows = np.unpackbits(packed, axis=1, count=m).astype(bool)
    weights = counts.astype(np.float64)
    columns = rows.astype(np.float64)
    # Exact: counts are integers far below 2**53.
    item_counts = np.rint(weights @ columns).astype(np.int64)
    found: dict[frozenset[int], int] = {
        frozenset([i]): int(item_counts[i]) for i in range(m) if item_counts[i] >= min_count
    }
    level: list[tuple[int, ...]] = [(i,) for i in range(m) if item_counts[i] >= min_count]
    size = 1
    while level and (max_len is None or size < max_len):
        frequent_now = set(level)
        # Extend each frequent itemset by a later item; every subset must be frequent.
        candidates: list[tuple[int, ...]] = []
        for itemset in level:
            for j in range(itemset[-1] + 1, m):
                if item_counts[j] < min_count:
                    continue
                candidate = (*itemset, j)
                if all(candidate[:k] + candidate[k + 1 :] in frequent_now for k in range(size)):
                    candidates.append(candidate)
        if not candidates:
            break
        # Rows holding each prefix, times the row weights, against every item at once.
        prefixes = sorted({c[:-1] for c in candidates})
        prefix_at = {prefix: k for k, prefix in enumerate(prefixes)}
        holding = np.ones((len(prefixes), rows.shape[0]), dtype=np.float64)
        for k, prefix in enumerate(prefixes):
            holding[k] = weights * rows[:, list(prefix)].all(axis=1)
        together = np.rint(holding @ columns).astype(np.int64)
        level = []
        for candidate in candidates:
            count = int(together[prefix_at[candidate[:-1]], candidate[-1]])
            if count >= min_count:
                found[frozenset(candidate)] = count
                level.append(candidate)
        size += 1
    return found


# --------------------------------------------------------------------------- adoptions


def mine_sequence_rules(
    adoptions: pd.DataFrame,
    *,
    min_support: float,
    min_confidence: float,
    min_lift: float | None = None,
    min_customers: int = 1,
    max_antecedent: int = 2,
    ordered: bool = False,
    within_days: int | None = None,
    as_of: DateLike | None = None,
    product_codes: Sequence[str] | None = None,
) -> RuleSet:
    """Mine "customers who adopted X go on to adopt c" rules from dated adoptions.

    Builds :func:`models.sequences.first_adoption_matrix` (only adoptions before
    ``as_of``) and calls :func:`mine_sequence_rules_from_matrix`; see there for the
    exact definitions.

    Parameters
    ----------
    adoptions : pandas.DataFrame
        ``customer_id, product_code, adopted_at`` (and ``closed_at``, unused here).
    min_support, min_confidence, min_lift, min_customers, max_antecedent, ordered, \
within_days
        See :func:`mine_sequence_rules_from_matrix`.
    as_of : date-like, optional
        Use only adoptions strictly before this instant. The customers are those with
        at least one such adoption.
    product_codes : sequence of str, optional
        Products to mine over (default: all adopted before ``as_of``).

    Returns
    -------
    RuleSet
        Mode ``"sequence"``.
    """
    matrix = first_adoption_matrix(adoptions, as_of=as_of, product_codes=product_codes)
    return mine_sequence_rules_from_matrix(
        matrix,
        min_support=min_support,
        min_confidence=min_confidence,
        min_lift=min_lift,
        min_customers=min_customers,
        max_antecedent=max_antecedent,
        ordered=ordered,
        within_days=within_days,
    )


def mine_sequence_rules_from_matrix(
    matrix: AdoptionMatrix,
    *,
    min_support: float,
    min_confidence: float,
    min_lift: float | None = None,
    min_customers: int = 1,
    max_antecedent: int = 2,
    ordered: bool = False,
    within_days: int | None = None,
) -> RuleSet:
    """Mine order-aware adoption rules from a first-adoption matrix.

    Definitions, for antecedent X (1 to ``max_antecedent`` products) and consequent
    c not in X, over the N customers (rows) of ``matrix``, with days as in
    :mod:`models.sequences`:

    - ``t_X``, the day the customer completed X: the latest first-adoption day over X.
      With ``ordered=True`` X is a sequence ``(x1, ..., xk)`` and a customer completes
      it only if ``first(x1) < first(x2) < ... < first(xk)`` (strictly, so same-day
      adoptions are in no order); then ``t_X = first(xk)``.
    - at risk: completed X and did not adopt c on or before ``t_X``
      (``first(c) > t_X``). With ``within_days = W`` also ``t_X + W`` before
      ``matrix.horizon_day``, so the whole window ``(t_X, t_X + W]`` was observed and
      late completers do not bias confidence downwards.
    - hit: at risk and adopted c after ``t_X`` (``0 < first(c) - t_X``, and
      ``<= W`` when ``within_days`` is set).
    - ``n_customers`` = hits, ``n_at_risk`` = at risk, ``support`` = hits / N,
      ``confidence`` = hits / at risk, ``base`` = share of the N customers who adopted
      c, ``lift`` = confidence / base, ``conviction`` = (1 - base) / (1 - confidence)
      (``inf`` at confidence 1), ``median_days`` = median of ``first(c) - t_X`` over
      hits.

    A rule is kept when ``hits >= max(ceil(min_support * N), min_customers, 1)``,
    ``confidence >= min_confidence`` and, if given, ``lift >= min_lift``, all compared
    exactly. Since every hit holds X and c, only X and c with X + {c} frequent among
    ever-adopted products are candidates: :func:`frequent_itemsets` finds those, and the
    order-aware counts are vectorised over customers.

    Parameters
    ----------
    matrix : AdoptionMatrix
        First-adoption days of the customers to learn from.
    min_support : float
        In [0, 1].
    min_confidence : float
        In [0, 1].
    min_lift : float, optional
        Non-negative.
    min_customers : int
        Minimum hits.
    max_antecedent : int
        Longest antecedent, at least 1.
    ordered : bool
        Antecedents are sequences (see above); every rule gets ``ordered=True``.
    within_days : int, optional
        Count a consequent only if adopted within this many days of ``t_X`` (positive),
        and only customers observed for the whole window as at risk.

    Returns
    -------
    RuleSet
        Mode ``"sequence"``, rules best first (confidence, lift, customers, then
        antecedent and consequent); ``params`` records the settings, ``as_of``,
        ``horizon_day``, ``n_customers`` and ``product_codes``.
    """
    support = _threshold(min_support, "min_support", low=0.0, high=1.0)
    confidence = _threshold(min_confidence, "min_confidence", low=0.0, high=1.0)
    lift = None if min_lift is None else _threshold(min_lift, "min_lift", low=0.0, high=None)
    if max_antecedent < 1:
        raise ValueError(f"max_antecedent must be at least 1, got {max_antecedent}")
    if within_days is not None and within_days < 1:
        raise ValueError(f"within_days must be positive, got {within_days}")
    if min_customers < 0:
        raise ValueError(f"min_customers must be non-negative, got {min_customers}")

    codes = matrix.product_codes
    n = matrix.n_customers
    params = _params(
        matrix,
        min_support=min_support,
        min_confidence=min_confidence,
        min_lift=min_lift,
        min_customers=min_customers,
        max_antecedent=max_antecedent,
        ordered=ordered,
        within_days=within_days,
    )
    needed = max(_ceil(support * n), min_customers, 1)
    if n == 0 or needed > n or len(codes) < 2:
        return RuleSet(rules=[], mode="sequence", params=params)

    adopted = matrix.adopted
    base_counts = adopted.sum(axis=0)
    last_start = None if within_days is None else matrix.horizon_day - within_days - 1
    if max_antecedent <= 2 and (ordered or max_antecedent == 1):
        fast = _mine_by_completion(
            matrix,
            needed=needed,
            confidence=confidence,
            lift=lift,
            base_counts=base_counts,
            max_antecedent=max_antecedent,
            ordered=ordered,
            within_days=within_days,
            last_start=last_start,
        )
        fast.sort(key=lambda r: (_rank_key(r), len(r.antecedent), r.antecedent, r.consequent))
        return RuleSet(rules=fast, mode="sequence", params=params)
    consequents: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for itemset in frequent_itemsets(adopted, needed, max_antecedent + 1):
        if len(itemset) >= 2:
            for c in itemset:
                consequents[tuple(sorted(itemset - {c}))].append(c)

    # Products as rows: each product's days are contiguous, so per-product reads are fast.
    days_t = np.ascontiguousarray(matrix.first_days.T)
    rules: list[Rule] = []
    for antecedent_set in sorted(consequents):
        targets = np.array(sorted(consequents[antecedent_set]), dtype=np.intp)
        sequences = itertools.permutations(antecedent_set) if ordered else [antecedent_set]
        for antecedent in sequences:
            if ordered and len(antecedent) > 1:
                completed_at = days_t[antecedent[-1]]
                done = completed_at != NEVER
                for a, b in itertools.pairwise(antecedent):
                    done &= days_t[a] < days_t[b]
            else:
                completed_at = np.maximum.reduce([days_t[i] for i in antecedent])
                done = completed_at != NEVER
            if last_start is not None:
                done &= completed_at <= last_start
            customers = np.flatnonzero(done)
            if customers.size < needed:
                continue
            # int32 throughout (no upcast of the targets x completers block): a
            # completer's day is below NEVER, and with a window at most last_start, so
            # start + within_days cannot overflow.
            start = completed_at[customers]
            later = days_t[np.ix_(targets, customers)]  # targets x completers
            hit = later > start
            n_at_risk = customers.size - np.count_nonzero(~hit, axis=1)
            if within_days is not None:
                hit &= later <= start + np.int32(within_days)
            else:
                hit &= later != NEVER
            n_hits = np.count_nonzero(hit, axis=1)
            for k in np.flatnonzero(n_hits >= needed):
                hits, risk, c = int(n_hits[k]), int(n_at_risk[k]), int(targets[k])
                base = int(base_counts[c])
                if not _at_least(hits, risk, confidence):
                    continue
                if lift is not None and not _at_least(hits * n, risk * base, lift):
                    continue
                waits = later[k][hit[k]].astype(np.int64) - start[hit[k]]
                rules.append(
                    Rule(
                        antecedent=tuple(codes[i] for i in antecedent),
                        consequent=codes[c],
                        support=hits / n,
                        confidence=hits / risk,
                        lift=(hits * n) / (risk * base),
                        conviction=(
                            math.inf if hits == risk else ((n - base) * risk) / (n * (risk - hits))
                        ),
                        n_customers=hits,
                        n_at_risk=risk,
                        median_days=float(np.median(waits)),
                        ordered=ordered,
                    )
                )
    rules.sort(key=lambda r: (_rank_key(r), len(r.antecedent), r.antecedent, r.consequent))
    return RuleSet(rules=rules, mode="sequence", params=params)


def _mine_by_completion(
    matrix: AdoptionMatrix,
    *,
    needed: int,
    confidence: Fraction,
    lift: Fraction | None,
    base_counts: npt.NDArray[np.int64],
    max_antecedent: int,
    ordered: bool,
    within_days: int | None,
    last_start: int | None,
) -> list[Rule]:
    """The rules of :func:`mine_sequence_rules_from_matrix` for antecedents of one
    product, or ordered pairs, counted for all antecedents and consequents at once.

    Every such antecedent is completed on the first day of its last product ``b``. Over
    the customers who adopted ``b`` (by ``last_start``), with ``start = first(b)``:
    ``R[i, c]`` (at risk for ``c``: ``first(c) > start``), ``H[i, c]`` (a hit) and
    ``A[i, a]`` (``first(a) < start``: completed ``(a, b)``) are bool matrices, and the
    counts of every pair ``(a, b) -> c`` are the matrix products ``A.T @ R`` and
    ``A.T @ H``; the single ``b -> c`` sums ``R`` and ``H``. A rule with enough hits has
    a frequent itemset ``X + {c}`` (every hit holds it), so no itemset mining is needed.
    The counts are the same as the loop's; so are the rules.
    """
    codes = matrix.product_codes
    n = matrix.n_customers
    p = len(codes)
    # Products as rows: each product's days, and each consequent's hits, contiguous.
    days_t = np.ascontiguousarray(matrix.first_days.T)
    rules: list[Rule] = []
    for b in range(p):
        done = days_t[b] != NEVER
        if last_start is not None:
            done &= days_t[b] <= last_start
        customers = np.flatnonzero(done)
        if customers.size < needed:
            continue
        days = days_t[:, customers]  # products x completers
        start = days[b]
        at_risk = days > start
        hit = at_risk.copy()
        if within_days is not None:
            hit &= days <= start + np.int32(within_days)
        else:
            hit &= days != NEVER
        candidates: list[tuple[tuple[int, ...], npt.NDArray[np.bool_] | None, int, int, int]] = []
        singles_hits = np.count_nonzero(hit, axis=1)
        singles_risk = np.count_nonzero(at_risk, axis=1)
        for c in np.flatnonzero(singles_hits >= needed).tolist():
            candidates.append(((b,), None, c, int(singles_hits[c]), int(singles_risk[c])))
        if max_antecedent >= 2:
            before = days < start  # completed (a, b): first(a) < first(b)
            completers = np.count_nonzero(before, axis=1)
            if (completers >= needed).any():
                # Counts are exact in floating point below the mantissa's integers.
                kind = np.float32 if customers.size < 2**24 else np.float64
                before_f = before.astype(kind)
                pair_hits = np.rint(before_f @ hit.T.astype(kind)).astype(np.int64)
                pair_risk = np.rint(before_f @ at_risk.T.astype(kind)).astype(np.int64)
                del before_f
                for a, c in zip(*np.nonzero(pair_hits >= needed), strict=True):
                    a, c = int(a), int(c)
                    if completers[a] < needed or a == b or c in (a, b):
                        continue
                    candidates.append(
                        ((a, b), before[a], c, int(pair_hits[a, c]), int(pair_risk[a, c]))
                    )
        for antecedent, rows, c, hits, risk in candidates:
            base = int(base_counts[c])
            if not _at_least(hits, risk, confidence):
                continue
            if lift is not None and not _at_least(hits * n, risk * base, lift):
                continue
            chosen = hit[c] if rows is None else hit[c] & rows
            waits = days[c][chosen].astype(np.int64) - start[chosen]
            rules.append(
                Rule(
                    antecedent=tuple(codes[i] for i in antecedent),
                    consequent=codes[c],
                    support=hits / n,
                    confidence=hits / risk,
                    lift=(hits * n) / (risk * base),
                    conviction=(
                        math.inf if hits == risk else ((n - base) * risk) / (n * (risk - hits))
                    ),
                    n_customers=hits,
                    n_at_risk=risk,
                    median_days=float(np.median(waits)),
                    ordered=ordered,
                )
            )
    return rules


def mine_coholding_rules(
    adoptions: pd.DataFrame,
    *,
    min_support: float,
    min_confidence: float,
    min_lift: float | None = None,
    min_customers: int = 1,
    max_antecedent: int = 2,
    as_of: DateLike | None = None,
    product_codes: Sequence[str] | None = None,
) -> RuleSet:
    """Plain co-holding rules: each customer's ever-adopted products as one basket.

    Order and timing are ignored. Products adopted before ``as_of`` count, closed or
    not; for current holdings pass ``models.sequences.held_matrix`` to
    :func:`mine_coholding_rules_from_matrix`.

    Parameters
    ----------
    adoptions : pandas.DataFrame
        Adoptions frame.
    min_support, min_confidence, min_lift, min_customers, max_antecedent
        See :func:`mine_coholding_rules_from_matrix`.
    as_of : date-like, optional
        Use only adoptions strictly before this instant.
    product_codes : sequence of str, optional
        Products to mine over.

    Returns
    -------
    RuleSet
        Mode ``"coholding"``.
    """
    matrix = first_adoption_matrix(adoptions, as_of=as_of, product_codes=product_codes)
    found = mine_coholding_rules_from_matrix(
        matrix.adopted,
        matrix.product_codes,
        min_support=min_support,
        min_confidence=min_confidence,
        min_lift=min_lift,
        min_customers=min_customers,
        max_antecedent=max_antecedent,
    )
    facts = {"as_of": _iso(matrix.as_of), "horizon_day": matrix.horizon_day}
    return RuleSet(rules=found.rules, mode=found.mode, params={**found.params, **facts})


def mine_coholding_rules_from_matrix(
    held: npt.NDArray[np.bool_],
    product_codes: Sequence[str],
    *,
    min_support: float,
    min_confidence: float,
    min_lift: float | None = None,
    min_customers: int = 1,
    max_antecedent: int = 2,
) -> RuleSet:
    """Co-holding rules from a customers x products bool matrix, as baskets.

    The same rules as :func:`mine_basket_rules` with ``min_len=2`` and
    ``max_len=max_antecedent + 1``, further requiring ``count >= min_customers`` and
    ``lift >= min_lift``. ``n_customers`` is the count holding antecedent and
    consequent, ``n_at_risk`` those holding the antecedent; no timing, not ordered.

    Parameters
    ----------
    held : numpy.ndarray
        Bool, customers x products.
    product_codes : sequence of str
        The product of each column.
    min_support, min_confidence : float
        As in :func:`mine_basket_rules`.
    min_lift : float, optional
        Minimum lift.
    min_customers : int
        Minimum customers holding antecedent and consequent.
    max_antecedent : int
        Longest antecedent, at least 1.

    Returns
    -------
    RuleSet
        Mode ``"coholding"``, rules best first.
    """
    held = np.asarray(held, dtype=bool)
    if held.ndim != 2 or held.shape[1] != len(product_codes):
        raise ValueError(f"held {held.shape} must be customers x {len(product_codes)} products")
    if max_antecedent < 1:
        raise ValueError(f"max_antecedent must be at least 1, got {max_antecedent}")
    lift = None if min_lift is None else _threshold(min_lift, "min_lift", low=0.0, high=None)
    codes = [str(code) for code in product_codes]
    found = _onehot_rules(
        held,
        codes,
        min_support=min_support,
        min_confidence=min_confidence,
        min_len=2,
        max_len=max_antecedent + 1,
        min_count=max(min_customers, 1),
    )
    n = held.shape[0]
    rules = [
        Rule(
            antecedent=row.antecedent,
            consequent=row.consequent,
            support=float(row.support),
            confidence=float(row.confidence),
            lift=float(row.lift),
            conviction=float(row.conviction),
            n_customers=int(row.count),
            n_at_risk=int(row.antecedent_count),
            median_days=None,
            ordered=False,
        )
        for row in found.itertuples(index=False)
        if lift is None
        or _at_least(
            int(row.count) * n, int(row.antecedent_count) * int(row.consequent_count), lift
        )
    ]
    rules.sort(key=lambda r: (_rank_key(r), len(r.antecedent), r.antecedent, r.consequent))
    params = {
        "min_support": float(min_support),
        "min_confidence": float(min_confidence),
        "min_lift": None if min_lift is None else float(min_lift),
        "min_customers": int(min_customers),
        "max_antecedent": int(max_antecedent),
        "n_customers": int(n),
        "product_codes": codes,
    }
    return RuleSet(rules=rules, mode="coholding", params=params)


# --------------------------------------------------------------------------- helpers


def _threshold(value: float, name: str, *, low: float, high: float | None) -> Fraction:
    """The threshold as the exact decimal it is written as (0.8 -> 4/5)."""
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return Fraction(repr(float(value)))


def _ceil(value: Fraction) -> int:
    return math.ceil(value)


def _at_least(numerator: int, denominator: int, threshold: Fraction) -> bool:
    """``numerator / denominator >= threshold``, exactly (denominator > 0)."""
    return numerator * threshold.denominator >= threshold.numerator * denominator


def _iso(stamp: pd.Timestamp | None) -> str | None:
    return None if stamp is None else stamp.isoformat()


def _params(matrix: AdoptionMatrix, **settings: Any) -> dict[str, Any]:
    return {
        **settings,
        "min_support": float(settings["min_support"]),
        "min_confidence": float(settings["min_confidence"]),
        "as_of": _iso(matrix.as_of),
        "horizon_day": int(matrix.horizon_day),
        "n_customers": matrix.n_customers,
        "product_codes": list(matrix.product_codes),
    }
