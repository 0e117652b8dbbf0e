"""Convert Kevin Hillstrom's e-mail campaign (MineThatData, 2008) into nbo's import format.

The data is a campaign snapshot: 64,000 customers as of the campaign day, the arm each
was randomised to (Mens e-mail, Womens e-mail, no e-mail), and what each did in the two
weeks after it (visited the site, bought). It has no ids and no dates, so the converter
makes both, deterministically:

- ``customer_id`` is ``H`` and the 1-based data row number, zero-padded (``H00001``);
- the campaign day ``S`` is fixed (``--campaign-day``, default 2008-03-03), and each
  responder's visit is dated on a day of ``[S, S + 14)`` drawn by a seeded generator
  (``--seed``); a purchase is dated on the day of the customer's visit.

Usage::

    python examples/hillstrom/convert.py --out DIR [--src ../shared/data/hillstrom/hillstrom.csv]
        [--campaign-day 2008-03-03] [--new-share 0.2] [--seed 0]

writes ``products.csv``, ``customers.csv``, ``responders.csv`` and, with a ``--new-share``
above 0, ``new_customers.csv`` and ``new_responders.csv`` (a random share of the
customers held back to be scored later, with what they did, to check the scores) into
``DIR``. Train with ``nbo train --as-of S+14 --horizon-days 14``: ``as_of`` is
exclusive, so the cutoff is ``S`` and the labels are the responses in ``[S, S + 14)``.
See ``examples/hillstrom/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "hillstrom" / "hillstrom.csv"
DEFAULT_CAMPAIGN_DAY = dt.date(2008, 3, 3)
RESPONSE_DAYS = 14
"""The campaign measured responses over two weeks."""

SOURCE_COLUMNS: tuple[str, ...] = (
    "recency",
    "history_segment",
    "history",
    "mens",
    "womens",
    "zip_code",
    "newbie",
    "channel",
    "treatment",
    "conversion",
    "visit",
    "spend",
)
ATTRIBUTES: tuple[str, ...] = SOURCE_COLUMNS[:9]
"""Customer attributes as given; the outcomes (conversion, visit, spend) are not."""
ARMS = frozenset({"Mens E-Mail", "Womens E-Mail", "No E-Mail"})

# Values are invented for the catalogue: a purchase is worth its mean spend in the data
# (116.36 dollars, rounded), a visit a nominal dollar. Neither has eligibility rules:
# anyone may visit or buy, and a purchase needs no earlier visit on record.
PRODUCTS = pd.DataFrame(
    {
        "product_code": ["visit", "purchase"],
        "name": ["Website visit", "Purchase"],
        "category": ["engagement", "sales"],
        "value": [1.0, 116.0],
        "business_weight": [1.0, 1.0],
        "active": ["true", "true"],
    }
)


def read_source(src: Path) -> pd.DataFrame:
    """Read and check ``hillstrom.csv``.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If a column is missing or a value is out of its domain.
    """
    if not src.is_file():
        raise FileNotFoundError(f"Hillstrom file not found: {src}")
    frame = pd.read_csv(src, dtype={"history_segment": str, "zip_code": str, "channel": str})
    missing = [c for c in SOURCE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{src} lacks column(s) {', '.join(missing)}")
    if frame.empty:
        raise ValueError(f"{src} has no rows")
    for column in ("conversion", "visit", "mens", "womens", "newbie"):
        bad = ~frame[column].isin([0, 1])
        if bad.any():
            raise ValueError(f"{src}: column {column!r} is not 0/1 on data row {_first(bad)}")
    unknown = ~frame["treatment"].isin(ARMS)
    if unknown.any():
        raise ValueError(
            f"{src}: unknown treatment {frame['treatment'][unknown].iloc[0]!r} on data row "
            f"{_first(unknown)} (expected one of {', '.join(sorted(ARMS))})"
        )
    bought_unseen = (frame["conversion"] == 1) & (frame["visit"] == 0)
    if bought_unseen.any():
        raise ValueError(f"{src}: a purchase without a visit on data row {_first(bought_unseen)}")
    return frame


def _first(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0]) + 1


def convert(
    src: Path = DEFAULT_SRC,
    *,
    campaign_day: dt.date = DEFAULT_CAMPAIGN_DAY,
    new_share: float = 0.0,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """The import tables of the campaign.

    Parameters
    ----------
    src : Path
        ``hillstrom.csv``.
    campaign_day : datetime.date
        The snapshot day ``S``; responses are dated in ``[S, S + 14)``.
    new_share : float
        Share of customers (drawn at random with ``seed``) held back as new customers,
        in ``[0, 1)``.
    seed : int
        Seeds the response days and the held-back customers.

    Returns
    -------
    dict of str to pandas.DataFrame
        ``products``, ``customers``, ``responders`` and, when ``new_share > 0``,
        ``new_customers`` and ``new_responders``.
    """
    if not 0 <= new_share < 1:
        raise ValueError(f"new_share must be in [0, 1), not {new_share}")
    frame = read_source(src)
    n = len(frame)
    width = max(5, len(str(n)))
    ids = pd.Series([f"H{i:0{width}d}" for i in range(1, n + 1)], name="customer_id")
    customers = pd.concat([ids, frame[list(ATTRIBUTES)].reset_index(drop=True)], axis=1)

    rng = np.random.default_rng(seed)
    # One draw per row, responder or not, so a row's day does not depend on the others.
    offsets = rng.integers(0, RESPONSE_DAYS, size=n)
    days = pd.Timestamp(campaign_day) + pd.to_timedelta(offsets, unit="D")
    rows = []
    for code, column in (("visit", "visit"), ("purchase", "conversion")):
        took = frame[column].to_numpy() == 1
        rows.append(
            pd.DataFrame(
                {
                    "customer_id": ids[took].to_numpy(),
                    "product_code": code,
                    "adopted_at": days[took],
                }
            )
        )
    responders = pd.concat(rows, ignore_index=True)
    responders = responders.sort_values(["adopted_at", "customer_id"], kind="stable")
    responders["adopted_at"] = responders["adopted_at"].dt.strftime("%Y-%m-%d")
    responders = responders.reset_index(drop=True)

    frames = {"products": PRODUCTS.copy(), "customers": customers, "responders": responders}
    if new_share > 0:
        held_back = np.zeros(n, dtype=bool)
        held_back[rng.permutation(n)[: round(new_share * n)]] = True
        new_ids = set(ids[held_back])
        is_new = responders["customer_id"].isin(new_ids)
        frames.update(
            customers=customers[~held_back].reset_index(drop=True),
            responders=responders[~is_new].reset_index(drop=True),
            new_customers=customers[held_back].reset_index(drop=True),
            new_responders=responders[is_new].reset_index(drop=True),
        )
    return frames


def write(frames: dict[str, pd.DataFrame], out: Path) -> dict[str, Path]:
    """Write each frame as ``<name>.csv`` (UTF-8, comma-separated) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False, encoding="utf-8")
        paths[name] = path
    return paths


def summary(frames: dict[str, pd.DataFrame], campaign_day: dt.date) -> str:
    """Rows per file, responders per product and the training command."""
    lines = [f"{name}.csv: {len(frame):,} rows" for name, frame in frames.items()]
    for name in ("responders", "new_responders"):
        if name in frames:
            counts = frames[name]["product_code"].value_counts()
            customers = "customers" if name == "responders" else "new_customers"
            total = len(frames[customers])
            lines.append(
                f"{name}: "
                + ", ".join(
                    f"{code} {counts.get(code, 0):,} ({counts.get(code, 0) / total:.2%})"
                    for code in PRODUCTS["product_code"]
                )
            )
    end = campaign_day + dt.timedelta(days=RESPONSE_DAYS)
    lines.append(
        f"campaign day {campaign_day}; train with: nbo train --as-of {end} "
        f"--horizon-days {RESPONSE_DAYS}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help=f"hillstrom.csv (default: {DEFAULT_SRC})"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the CSV files to")
    parser.add_argument(
        "--campaign-day",
        type=dt.date.fromisoformat,
        default=DEFAULT_CAMPAIGN_DAY,
        help=f"the snapshot day S, YYYY-MM-DD (default: {DEFAULT_CAMPAIGN_DAY})",
    )
    parser.add_argument(
        "--new-share",
        type=float,
        default=0.2,
        help="share of customers held back as new_customers.csv, in [0, 1) (default: 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the days and the share")
    args = parser.parse_args(argv)
    try:
        frames = convert(
            args.src, campaign_day=args.campaign_day, new_share=args.new_share, seed=args.seed
        )
        paths = write(frames, args.out)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(summary(frames, args.campaign_day))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
