"""Laying a model card out: sections of formatted text, and rich renderables for a terminal.

:func:`card_sections` is the one layout; :func:`render_text` (the command line) and
:func:`models.evaluation_report.write_report` (HTML) both draw it, so they show the
same card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from models.model_card.build import CARD_FORMAT, CARD_VERSION

__all__ = ["CardSection", "CardTable", "card_sections", "render_text"]

_FIRST_COLUMN: Final[int] = 30
"""Widest first column of a terminal table; longer values wrap."""


@dataclass(frozen=True)
class CardTable:
    """One table of a card section, every cell already text.

    Attributes
    ----------
    columns : tuple of str
        Headers.
    rows : tuple of tuple of str
        Cells, one tuple per row.
    numeric : tuple of bool
        Per column: right-aligned numbers.
    title : str
        Caption ("" for none).
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    title: str = ""


@dataclass(frozen=True)
class CardSection:
    """One headed section of a card: facts, tables, then notes.

    Attributes
    ----------
    anchor : str
        Short id (HTML anchor).
    heading : str
    facts : tuple of (str, str)
        Label and value pairs.
    tables : tuple of CardTable
    notes : tuple of str
        Sentences to show under the tables.
    """

    anchor: str
    heading: str
    facts: tuple[tuple[str, str], ...] = ()
    tables: tuple[CardTable, ...] = ()
    notes: tuple[str, ...] = ()


def card_sections(card: Mapping[str, Any]) -> list[CardSection]:
    """Lay a card out as sections of formatted facts, tables and notes.

    Parameters
    ----------
    card : mapping
        As :func:`build_card` returns (or read back from JSON).

    Returns
    -------
    list of CardSection
        Overview, data window, holdout, products, feature columns, holdout metrics,
        calibration, by segment, by age band, training, in that order.

    Raises
    ------
    ValueError
        If ``card`` is not a model card of a known format version.
    """
    if card.get("format") != CARD_FORMAT or card.get("format_version") != CARD_VERSION:
        raise ValueError(
            f"not an {CARD_FORMAT} version {CARD_VERSION} card "
            f"(format {card.get('format')!r}, version {card.get('format_version')!r})"
        )
    groups = card["groups"]
    return [
        _overview_section(card),
        _data_section(card),
        _holdout_section(card),
        _products_section(card),
        _features_section(card),
        _metrics_section(card),
        _calibration_section(card),
        _group_section(groups, "segment", "By segment", groups["k"]),
        _group_section(groups, "age_band", "By age band", groups["k"]),
        _training_section(card),
    ]


def _overview_section(card: Mapping[str, Any]) -> CardSection:
    model, holdout = card["model"], card["holdout"]
    facts = [
        ("trained on data before", _text(model["as_of"])),
        ("propensity", f"adoption within {model['horizon_days']} days"),
        ("served score", str(model["served"])),
        ("products", f"{model['products']} ({model['lightgbm_products']} with LightGBM)"),
        ("feature columns", _int(model["feature_columns"])),
        ("trees per customer", _int(model["trees"])),
    ]
    if holdout is not None:
        kind = str(holdout["kind"]).replace("_", " ")
        facts.append(("holdout", f"{kind}, from {holdout['cutoff']}"))
        served = _row(card, holdout["served"]) or {}
        base = _row(card, holdout["baseline"]) or {}
        for metric in ("MAP@3", "AUC"):
            if served.get(metric) is not None:
                text = f"{_decimal(served[metric])} ({holdout['served']})"
                if base.get(metric) is not None:
                    text += f" vs {_decimal(base[metric])} ({holdout['baseline']})"
                facts.append((f"holdout {metric}", text))
    return CardSection("card-overview", "Overview", facts=tuple(facts), notes=tuple(card["notes"]))


def _row(card: Mapping[str, Any], model: str | None) -> Mapping[str, Any] | None:
    """The comparison row of ``model``, if there is one."""
    for row in card["metrics"]["models"]:
        if row["model"] == model:
            return dict(row)
    return None


def _data_section(card: Mapping[str, Any]) -> CardSection:
    data = card["data"]
    cutoffs = data["training_cutoffs"]
    facts = (
        ("adoptions", f"{_text(data['first_adoption'])} to {_text(data['last_adoption'])}"),
        ("cutoffs", str(data["plan"]).replace("_", " ")),
        ("training cutoffs", f"{len(cutoffs)}: " + ", ".join(cutoffs) if cutoffs else "none"),
        ("validation", _validation_text(data)),
        ("labels", f"adoptions within {data['horizon_days']} days after a cutoff"),
        ("customers", _int(data["customers"])),
        (f"adoptions before {_text(data['as_of'])}", _int(data["adoptions"])),
    )
    return CardSection("card-data", "Data window", facts=facts)


def _validation_text(data: Mapping[str, Any]) -> str:
    cutoff = _text(data["validation_cutoff"])
    if data["validation"] == "random customers":
        share = data["validation_fraction"]
        held = "random customers" if share is None else f"random {_percent(share)} of customers"
        return f"{held} at {cutoff}"
    return f"later cutoff {cutoff}"


def _holdout_section(card: Mapping[str, Any]) -> CardSection:
    holdout = card["holdout"]
    if holdout is None:
        return CardSection("card-holdout", "Holdout", notes=("No holdout was measured.",))
    facts = [
        ("kind", str(holdout["kind"]).replace("_", " ")),
        ("window", f"{holdout['cutoff']} to {holdout['end']} (exclusive)"),
        ("holdout model trained before", _text(holdout["model_as_of"])),
    ]
    if holdout["fraction"] is not None:
        seed = "" if holdout["seed"] is None else f" (seed {holdout['seed']})"
        facts.append(("held out", f"{_percent(holdout['fraction'])} of customers{seed}"))
    facts += [
        ("customers scored", _int(holdout["customers_scored"])),
        ("customers who adopted", _int(holdout["customers_evaluated"])),
        ("adoptions in the window", _int(holdout["adoptions"])),
        ("candidate pairs", _int(holdout["candidate_pairs"])),
    ]
    return CardSection("card-holdout", "Holdout", facts=tuple(facts))


def _products_section(card: Mapping[str, Any]) -> CardSection:
    rows = []
    for p in card["products"]:
        rows.append(
            (
                p["code"],
                p["name"],
                "LightGBM" if p["kind"] == "lightgbm" else "base rate",
                _int(p["trees"]),
                p["calibration"] + (" + blend" if p["blend"] else ""),
                _int(p["validation_positives"]),
                _decimal(p["validation_auc"]),
            )
        )
    table = CardTable(
        ("Product", "Name", "Model", "Trees", "Calibration", "Val. pos.", "Val. AUC"),
        tuple(rows),
        (False, False, False, True, False, True, True),
    )
    note = (
        "Val. pos. and Val. AUC: adopters in the validation split of training, and the "
        "served score's AUC there."
    )
    return CardSection("card-products", "Products", tables=(table,), notes=(note,))


def _features_section(card: Mapping[str, Any]) -> CardSection:
    features = card["features"]
    families: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for column in features["columns"]:
        families.setdefault(column["family"], []).append(column["name"])
        kinds[column["family"]] = column["kind"]
    rows = tuple((family, kinds[family], _int(len(names))) for family, names in families.items())
    attributes = ", ".join(f"{a['name']} ({a['kind']})" for a in features["attributes"])
    facts = (
        (
            "columns",
            f"{features['count']} ({features['numeric']} numeric, "
            f"{features['categorical']} categorical)",
        ),
        ("bank attributes", attributes or "none"),
    )
    table = CardTable(("Column", "Kind", "Columns"), rows, (False, False, True))
    return CardSection("card-features", "Feature columns", facts=facts, tables=(table,))


def _metrics_section(card: Mapping[str, Any]) -> CardSection:
    metrics = card["metrics"]
    if not metrics["models"]:
        return CardSection("card-metrics", "Holdout metrics", notes=("No holdout was measured.",))
    columns = _shown_columns(metrics["columns"])
    rows = tuple(
        (m["model"] + (" (reference)" if m["reference"] else ""),)
        + tuple(_metric_text(c, m.get(c)) for c in columns)
        for m in metrics["models"]
    )
    table = CardTable(("Model", *columns), rows, (False, *(True for _ in columns)))
    holdout = card["holdout"]
    notes = [
        f"Ranking metrics over the {_int(holdout['customers_evaluated'])} customers who "
        f"adopted a candidate product in the holdout window; {holdout['served']} is "
        "served" + (f", {holdout['baseline']} is the baseline." if holdout["baseline"] else ".")
    ]
    order = {p["code"]: i for i, p in enumerate(card["products"])}
    products = sorted(metrics["products"], key=lambda p: order.get(p["code"], len(order)))
    tops = list(dict.fromkeys(top for p in products for top in p["top_hits"]))
    by_product = CardTable(
        ("Product", "Adopters", "AUC", "PR-AUC", "Brier", *(f"Top {t}" for t in tops)),
        tuple(
            (
                p["code"],
                _int(p["adopters"]),
                _decimal(p["auc"]),
                _decimal(p["pr_auc"]),
                _decimal(p["brier"]),
                *(_hits(p["top_hits"].get(t), p["top_share"].get(t)) for t in tops),
            )
            for p in products
        ),
        (False, True, True, True, True, *(True for _ in tops)),
        title=f"The served score ({holdout['served']}) per product",
    )
    if tops:
        notes.append(
            "Top p: adopters found among the best-scored p of the product's candidates "
            "(their share of all its adopters)."
        )
    return CardSection(
        "card-metrics", "Holdout metrics", tables=(table, by_product), notes=tuple(notes)
    )


def _hits(hits: Any, share: Any) -> str:
    if hits is None:
        return "—"
    found = f"{float(hits):,.0f}"
    return found if share is None else f"{found} ({float(share):.0%})"


def _shown_columns(columns: Sequence[str]) -> list[str]:
    """The comparison columns a card shows (the card's JSON keeps them all): MAP@k,
    NDCG and hit rate at k = 3 (or the middle k), the ratio to the baseline, and any
    column of another kind but counts (``n_customers``, ``... hits``) and coverage."""
    ks = sorted({int(c.split("@")[1]) for c in columns if c.startswith("MAP@") and "/" not in c})
    middle = str(3 if 3 in ks else (ks[len(ks) // 2] if ks else ""))
    kept = {("NDCG", middle), ("hit", middle)}
    shown = []
    for column in columns:
        name, _, rest = column.partition("@")
        if column in ("n_customers", "coverage") or column.endswith("hits"):
            continue
        if rest and "/" not in rest and name != "MAP" and (name, rest) not in kept:
            continue
        shown.append(column)
    return shown


def _calibration_section(card: Mapping[str, Any]) -> CardSection:
    calibration = card["calibration"]
    rows = []
    for p in calibration["products"]:
        valid, seen = p["validation"], p["holdout"] or {}
        rows.append(
            (
                p["code"],
                _percent(valid["mean_predicted"]),
                _percent(valid["observed"]),
                _decimal(valid["ece"]),
                _percent(seen.get("mean_predicted")),
                _percent(seen.get("observed")),
            )
        )
    per_product = CardTable(
        ("Product", "Val. pred.", "Val. obs.", "Val. ECE", "Pred.", "Observed"),
        tuple(rows),
        (False, True, True, True, True, True),
        title="Mean predicted and observed adoption rate per product",
    )
    tables = [per_product]
    if calibration["holdout_bins"]:
        tables.append(
            CardTable(
                ("Bin", "Pairs", "Mean predicted", "Observed"),
                tuple(
                    (
                        str(b["bin"]),
                        _int(b["count"]),
                        _percent(b["mean_predicted"]),
                        _percent(b["observed"]),
                    )
                    for b in calibration["holdout_bins"]
                ),
                (True, True, True, True),
                title=f"Holdout reliability (ECE {_decimal(calibration['holdout_ece'])})",
            )
        )
    note = (
        "Val.: cross-fitted on the validation split of training (ECE over its reliability "
        "bins, which the card's JSON holds per product); Pred. and Observed: the holdout."
    )
    return CardSection("card-calibration", "Calibration", tables=tuple(tables), notes=(note,))


def _group_section(groups: Mapping[str, Any], dimension: str, heading: str, k: int) -> CardSection:
    anchor = f"card-{dimension.replace('_', '-')}"
    part = groups[dimension]
    if not part["available"]:
        return CardSection(anchor, heading, notes=(f"Not measured: {part['reason']}.",))
    rows = [part["overall"], *part["groups"]]
    summary = CardTable(
        ("Group", "Customers", "Adopters", "Adoptions", f"hit@{k}", f"MAP@{k}", f"Base MAP@{k}"),
        tuple(
            (
                r["group"],
                _int(r["customers"]),
                _int(r["adopters"]),
                _int(r["adoptions"]),
                _decimal(r[f"hit@{k}"]),
                _decimal(r[f"map@{k}"]),
                _decimal(r[f"baseline_map@{k}"]),
            )
            for r in rows
        ),
        (False, True, True, True, True, True, True),
    )
    measured = [r for r in rows if not r["skipped"]]
    codes = [
        code for code in part["overall"]["auc"] if any(r["auc"][code] is not None for r in measured)
    ]
    tables = [summary]
    if codes and len(measured) > 1:
        tables.append(
            CardTable(
                ("Product", *(r["group"] for r in measured)),
                tuple((code, *(_decimal(r["auc"][code]) for r in measured)) for code in codes),
                (False, *(True for _ in measured)),
                title="AUC of the served score per product and group",
            )
        )
    notes = [
        f"Served score on the holdout; Base: the baseline's MAP@{k}. Groups with fewer "
        f"than {groups['min_adopters']} adopters are not measured; an AUC needs "
        f"{groups['min_auc_cases']} adopters and non-adopters of the product."
    ]
    notes += [f"{r['group']}: {r['skipped']}." for r in part["groups"] if r["skipped"]]
    return CardSection(anchor, heading, tables=tuple(tables), notes=tuple(notes))


def _training_section(card: Mapping[str, Any]) -> CardSection:
    training = card["training"]
    facts = (
        ("settings", _assignments(training["config"])),
        ("LightGBM", _assignments(training["lightgbm"])),
        ("training time", "—" if training["seconds"] is None else f"{training['seconds']:.1f} s"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in card["libraries"].items())),
    )
    return CardSection("card-training", "Training parameters and libraries", facts=facts)


def _assignments(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_value_text(value)}" for key, value in values.items())


def _value_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return str(value)


def _metric_text(column: str, value: Any) -> str:
    if value is None:
        return "—"
    if column == "coverage" or "share" in column:
        return _percent(value)
    if column.endswith("hits"):
        return f"{float(value):,.1f}"
    if "/" in column:
        return f"{float(value):.2f}×"
    if isinstance(value, int):
        return _int(value)
    return _decimal(value)


def _text(value: Any) -> str:
    return "—" if value is None else str(value)


def _int(value: Any) -> str:
    return "—" if value is None else f"{int(value):,}"


def _decimal(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.3f}"


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    number = float(value)
    return f"{number:.2%}" if abs(number) < 0.01 else f"{number:.1%}"


# --------------------------------------------------------------------------- text


def render_text(card: Mapping[str, Any], *, width: int = 80) -> list[RenderableType]:
    """The card as rich renderables for a terminal, each section under a heading.

    Tables wider than ``width`` are split by columns (the first column repeated), so
    nothing is cut or squeezed into broken numbers; long values wrap.

    Parameters
    ----------
    card : mapping
        As :func:`build_card` returns.
    width : int, default 80
        The narrowest terminal to fit.

    Returns
    -------
    list of rich renderables
        Print each with ``console.print``.
    """
    out: list[RenderableType] = [Text("Model card", style="bold underline")]
    for section in card_sections(card):
        out.append(Text(""))
        out.append(Text(section.heading, style="bold"))
        if section.facts:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="dim", no_wrap=True)
            grid.add_column(overflow="fold")
            for label, value in section.facts:
                grid.add_row(label, value)
            out.append(grid)
        for table in section.tables:
            out.extend(_rich_tables(table, width))
        for note in section.notes:
            out.append(Text(note, style="dim"))
    return out


def _rich_tables(table: CardTable, width: int) -> list[RenderableType]:
    """``table`` as one rich table per slice of columns that fits ``width``."""
    widths = [
        max([len(header), *(len(row[i]) for row in table.rows)])
        for i, header in enumerate(table.columns)
    ]
    # A table is as wide as its columns' text plus 3 per column, less 1; the first
    # column, repeated in every slice, is capped so the others always have room.
    first = min(widths[0], _FIRST_COLUMN)
    slices: list[list[int]] = []
    used = first + 2
    for i in range(1, len(widths)):
        cost = widths[i] + 3
        if not slices or used + cost > width:
            slices.append([])
            used = first + 2
        slices[-1].append(i)
        used += cost
    if not slices:
        slices = [[]]
    out: list[RenderableType] = []
    for part in slices:
        columns = [0, *part]
        rich = Table(
            box=box.SIMPLE_HEAD,
            title=table.title or None,
            title_justify="left",
            title_style="italic",
            pad_edge=False,
        )
        for i in columns:
            rich.add_column(
                table.columns[i],
                justify="right" if table.numeric[i] else "left",
                overflow="fold",
                max_width=_FIRST_COLUMN if i == 0 else None,
            )
        for row in table.rows:
            rich.add_row(*(row[i] for i in columns))
        out.append(rich)
    return out
