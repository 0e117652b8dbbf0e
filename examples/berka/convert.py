"""Convert the PKDD'99 Czech bank data ("Berka") into nbo's import format.

The customer is the bank **account**: accounts are what adopt cards and loans.
Every account is opened first (``current_account``), then may take a card
(junior, classic or gold; issued to a disposition of the account) and a loan,
on known dates, so each customer has a real, ordered adoption sequence.

Usage::

    python examples/berka/convert.py --out DIR [--src ../shared/data/berka]

writes ``products.csv``, ``customers.csv`` and ``adoptions.csv`` into ``DIR``
and prints a short summary. See ``examples/berka/README.md`` for the mapping.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from models.data import ADOPTION_COLUMNS, PRODUCT_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "berka"

# The columns each source table must have; other columns are ignored.
SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {
    "account": ("account_id", "district_id", "frequency", "date"),
    "card": ("card_id", "disp_id", "type", "issued"),
    "client": ("client_id", "birth_number", "district_id"),
    "disp": ("disp_id", "client_id", "account_id", "type"),
    "district": ("A1", "A2", "A3", "A4", "A10", "A11", "A13"),
    "loan": ("loan_id", "account_id", "date", "amount", "duration", "status"),
    "order": ("order_id", "account_id", "amount"),
}
# Read as text: leading zeros and the "YYMMDD hh:mm:ss" suffix matter.
TEXT_COLUMNS = ("date", "issued", "birth_number", "frequency", "type", "status", "A2", "A3")

CUSTOMER_COLUMNS = (
    "customer_id",
    "segment",
    "branch_id",
    "joined_at",
    "birth_date",
    "gender",
    "district_name",
    "region",
    "avg_salary",
    "urban_ratio",
    "unemployment_96",
    "inhabitants",
    "statement_frequency",
    "n_disponents",
    "n_permanent_orders",
    "permanent_orders_amount",
)

# Values are invented (rough yearly contribution of one adoption, in CZK); the
# weights are neutral. Constraints follow the data: see README.md.
PRODUCTS: tuple[dict[str, object], ...] = (
    {
        "product_code": "current_account",
        "name": "Current account",
        "category": "account",
        "value": 1200.0,
        "business_weight": 1.0,
        "active": True,
        "min_age": None,
        "max_age": None,
        "segments": (),
        "requires": (),
        "excludes": (),
    },
    {
        "product_code": "junior_card",
        "name": "Junior card",
        "category": "card",
        "value": 300.0,
        "business_weight": 1.0,
        "active": True,
        "min_age": 12,
        "max_age": 25,
        "segments": (),
        "requires": ("current_account",),
        "excludes": ("classic_card", "gold_card"),
    },
    {
        "product_code": "classic_card",
        "name": "Classic card",
        "category": "card",
        "value": 1500.0,
        "business_weight": 1.0,
        "active": True,
        "min_age": 18,
        "max_age": None,
        "segments": (),
        "requires": ("current_account",),
        "excludes": ("gold_card",),
    },
    {
        "product_code": "gold_card",
        "name": "Gold card",
        "category": "card",
        "value": 4000.0,
        "business_weight": 1.0,
        "active": True,
        "min_age": 18,
        "max_age": None,
        "segments": (),
        "requires": ("current_account",),
        "excludes": ("classic_card",),
    },
    {
        "product_code": "loan",
        "name": "Loan",
        "category": "lending",
        "value": 9000.0,
        "business_weight": 1.0,
        "active": True,
        "min_age": None,
        "max_age": None,
        "segments": (),
        "requires": ("current_account",),
        "excludes": (),
    },
)
PRODUCT_ORDER = {str(p["product_code"]): i for i, p in enumerate(PRODUCTS)}
CARD_PRODUCTS = {"junior": "junior_card", "classic": "classic_card", "gold": "gold_card"}

STATEMENT_FREQUENCY = {
    "POPLATEK MESICNE": "monthly",
    "POPLATEK TYDNE": "weekly",
    "POPLATEK PO OBRATU": "after_transaction",
}
# Status A and B: the contract is finished (B: not paid back); C and D: running.
FINISHED_LOAN_STATUSES = frozenset({"A", "B"})
SEGMENT_LABELS = ("salary_low", "salary_mid", "salary_high")


def read_table(src: Path, name: str) -> pd.DataFrame:
    """Read one semicolon-separated ``<name>.asc`` table and check its columns.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If a required column is missing.
    """
    path = src / f"{name}.asc"
    if not path.is_file():
        raise FileNotFoundError(f"Berka table {name!r} not found: {path}")
    frame = pd.read_csv(path, sep=";", dtype={c: str for c in TEXT_COLUMNS})
    missing = [c for c in SOURCE_COLUMNS[name] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)}")
    return frame


def read_tables(src: Path) -> dict[str, pd.DataFrame]:
    """Read every table the conversion needs, failing early with a clear message."""
    if not src.is_dir():
        raise FileNotFoundError(f"Berka source folder not found: {src}")
    absent = [n for n in SOURCE_COLUMNS if not (src / f"{n}.asc").is_file()]
    if absent:
        names = ", ".join(f"{n}.asc" for n in absent)
        raise FileNotFoundError(f"Berka table(s) missing from {src}: {names}")
    return {name: read_table(src, name) for name in SOURCE_COLUMNS}


def _date(year: pd.Series, month: pd.Series, day: pd.Series) -> pd.Series:
    return pd.to_datetime(pd.DataFrame({"year": year, "month": month, "day": day}))


def parse_yymmdd(values: pd.Series) -> pd.Series:
    """Parse ``YYMMDD`` (optionally followed by a time) as a 19YY date.

    ``%y`` would put years below 69 in the 2000s, so the century is explicit.
    """
    text = values.str.strip().str[:6]
    valid = text.str.fullmatch(r"\d{6}").fillna(False).astype(bool)
    if not valid.all():
        raise ValueError(f"not YYMMDD dates: {values[~valid].head(3).tolist()}")
    year, month, day = (text.str[i : i + 2].astype(int) for i in (0, 2, 4))
    return _date(1900 + year, month, day)


def parse_birth_number(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Decode ``YYMMDD`` birth numbers, where women's month is stored plus 50.

    Returns
    -------
    birth_date, gender
        Dates (19YY) and ``"F"`` or ``"M"``.
    """
    text = values.str.strip().str.zfill(6)
    month = text.str[2:4].astype(int)
    female = month > 50
    birth_date = _date(
        1900 + text.str[:2].astype(int), month.where(~female, month - 50), text.str[4:].astype(int)
    )
    return birth_date, female.map({True: "F", False: "M"})


def add_months(dates: pd.Series, months: pd.Series) -> pd.Series:
    """``dates`` plus ``months`` calendar months (day clipped to the month's end)."""
    shifted = [d + pd.DateOffset(months=int(m)) for d, m in zip(dates, months, strict=True)]
    return pd.Series(pd.to_datetime(shifted), index=dates.index)


def build_products() -> pd.DataFrame:
    """The catalogue, with list columns as tuples of product codes or segments."""
    frame = pd.DataFrame(list(PRODUCTS), columns=list(PRODUCT_COLUMNS))
    for column in ("min_age", "max_age"):
        frame[column] = frame[column].astype("Int64")
    return frame


def build_customers(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per account: its owner, its branch district and its standing orders."""
    account, disp, client = tables["account"], tables["disp"], tables["client"]
    district, order = tables["district"], tables["order"]

    unknown = set(account["frequency"]) - set(STATEMENT_FREQUENCY)
    if unknown:
        raise ValueError(f"unknown account.frequency value(s): {sorted(unknown)}")

    birth_date, gender = parse_birth_number(client["birth_number"])
    people = pd.DataFrame(
        {"client_id": client["client_id"], "birth_date": birth_date, "gender": gender}
    )
    owners = disp.loc[disp["type"] == "OWNER", ["account_id", "client_id"]].merge(
        people, on="client_id", how="left", validate="1:1"
    )
    if owners["account_id"].duplicated().any():
        raise ValueError("an account has more than one OWNER in disp")

    districts = pd.DataFrame(
        {
            "district_id": district["A1"],
            "district_name": district["A2"],
            "region": district["A3"],
            "avg_salary": pd.to_numeric(district["A11"]),
            "urban_ratio": (pd.to_numeric(district["A10"]) / 100).round(3),
            "unemployment_96": pd.to_numeric(district["A13"]),
            "inhabitants": pd.to_numeric(district["A4"]),
        }
    )
    disponents = disp.loc[disp["type"] == "DISPONENT"].groupby("account_id").size()
    orders = order.groupby("account_id")["amount"].agg(["size", "sum"])

    frame = account.merge(districts, on="district_id", how="left", validate="m:1")
    frame = frame.merge(owners, on="account_id", how="left", validate="1:1")
    if frame["district_name"].isna().any() or frame["birth_date"].isna().any():
        raise ValueError("some accounts lack a district or an owner")
    account_id = frame["account_id"]
    frame = frame.assign(
        customer_id="A" + account_id.astype(str),
        # Terciles over accounts of their branch district's average salary.
        segment=pd.qcut(frame["avg_salary"], 3, labels=list(SEGMENT_LABELS)).astype(str),
        branch_id="D" + frame["district_id"].astype(str),
        joined_at=parse_yymmdd(frame["date"]),
        statement_frequency=frame["frequency"].map(STATEMENT_FREQUENCY),
        n_disponents=account_id.map(disponents).fillna(0).astype(int),
        n_permanent_orders=account_id.map(orders["size"]).fillna(0).astype(int),
        permanent_orders_amount=account_id.map(orders["sum"]).fillna(0.0).round(2),
    )
    frame = frame.sort_values("account_id", ignore_index=True)
    return frame[list(CUSTOMER_COLUMNS)]


def build_adoptions(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Accounts opened, cards issued (via disp to the account) and loans granted."""
    account, card, disp, loan = tables["account"], tables["card"], tables["disp"], tables["loan"]

    accounts = pd.DataFrame(
        {
            "account_id": account["account_id"],
            "product_code": "current_account",
            "adopted_at": parse_yymmdd(account["date"]),
        }
    )

    unknown = set(card["type"]) - set(CARD_PRODUCTS)
    if unknown:
        raise ValueError(f"unknown card.type value(s): {sorted(unknown)}")
    cards = card.merge(disp[["disp_id", "account_id"]], on="disp_id", how="left", validate="1:1")
    if cards["account_id"].isna().any():
        raise ValueError("some cards point to no disposition")
    cards = pd.DataFrame(
        {
            "account_id": cards["account_id"].astype(int),
            "product_code": cards["type"].map(CARD_PRODUCTS),
            "adopted_at": parse_yymmdd(cards["issued"]),
        }
    )

    granted = parse_yymmdd(loan["date"])
    finished = loan["status"].isin(FINISHED_LOAN_STATUSES)
    loans = pd.DataFrame(
        {
            "account_id": loan["account_id"],
            "product_code": "loan",
            "adopted_at": granted,
            "closed_at": add_months(granted, loan["duration"]).where(finished),
        }
    )

    frame = pd.concat([accounts, cards, loans], ignore_index=True)
    frame["closed_at"] = pd.to_datetime(frame["closed_at"])
    frame["customer_id"] = "A" + frame["account_id"].astype(str)
    frame["_order"] = frame["product_code"].map(PRODUCT_ORDER)
    frame = frame.sort_values(["account_id", "adopted_at", "_order"], ignore_index=True)
    return frame[list(ADOPTION_COLUMNS)]


def convert(src: Path = DEFAULT_SRC) -> dict[str, pd.DataFrame]:
    """Convert the Berka tables in ``src`` into nbo's three import tables.

    Parameters
    ----------
    src
        Folder holding ``account.asc``, ``card.asc``, ``client.asc``,
        ``disp.asc``, ``district.asc``, ``loan.asc`` and ``order.asc``.

    Returns
    -------
    dict
        ``products``, ``customers`` and ``adoptions`` frames with the import
        columns; dates are ``datetime64`` (``NaT`` when empty) and list columns
        tuples of strings.

    Raises
    ------
    FileNotFoundError
        If ``src`` or one of its tables is missing.
    ValueError
        If a table lacks a column or holds a value the mapping does not know.
    """
    tables = read_tables(Path(src))
    return {
        "products": build_products(),
        "customers": build_customers(tables),
        "adoptions": build_adoptions(tables),
    }


def _join(values: Sequence[str]) -> str:
    return "|".join(values)


def write(frames: dict[str, pd.DataFrame], out: Path) -> dict[str, Path]:
    """Write the frames as UTF-8, comma-separated CSV with ISO dates into ``out``.

    List columns are ``|``-separated and empty values are empty fields.
    Returns the path written for each frame.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    products = frames["products"].copy()
    for column in ("segments", "requires", "excludes"):
        products[column] = products[column].map(_join)
    products["active"] = products["active"].map({True: "true", False: "false"})
    to_write = {**frames, "products": products}
    paths: dict[str, Path] = {}
    for name in ("products", "customers", "adoptions"):
        path = out / f"{name}.csv"
        to_write[name].to_csv(path, index=False, encoding="utf-8", date_format="%Y-%m-%d")
        paths[name] = path
    return paths


def sequence_counts(adoptions: pd.DataFrame) -> pd.Series:
    """Count customers by their ordered adoption sequence, most common first.

    A sequence is the customer's product codes by adoption date (catalogue
    order on the same date), joined with ``" > "``.
    """
    ordered = adoptions.assign(_order=adoptions["product_code"].map(PRODUCT_ORDER))
    ordered = ordered.sort_values(["customer_id", "adopted_at", "_order"], kind="stable")
    sequences = ordered.groupby("customer_id", sort=False)["product_code"].agg(" > ".join)
    return sequences.value_counts()


def summary(frames: dict[str, pd.DataFrame], top: int = 12) -> str:
    """A short human-readable report: rows per table and the top sequences."""
    adoptions = frames["adoptions"]
    lines = [f"{name}: {len(frame):,} rows" for name, frame in frames.items()]
    by_product = adoptions["product_code"].value_counts()
    lines.append(
        "adoptions by product: "
        + ", ".join(f"{code} {by_product.get(code, 0):,}" for code in PRODUCT_ORDER)
    )
    lines.append(f"loans closed (status A/B): {adoptions['closed_at'].notna().sum():,}")
    counts = sequence_counts(adoptions)
    lines.append(f"adoption sequences ({len(counts)} distinct), most common:")
    width = max(len(s) for s in counts.index[:top])
    lines += [f"  {seq:<{width}}  {n:>5,}" for seq, n in counts.head(top).items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help=f"Berka .asc folder (default: {DEFAULT_SRC})"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the CSV files to")
    args = parser.parse_args(argv)
    try:
        frames = convert(args.src)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write(frames, args.out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(summary(frames))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
