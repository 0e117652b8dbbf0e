"""A small campaign made for tests: a snapshot of customers on day S, holdings dated
before S, and the responders of one product dated S .. S + N - 1, with a planted signal
in numeric, categorical and ordinal-text attributes and in what is held."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.data import BankData

SNAPSHOT = dt.date(2024, 3, 11)
"""The campaign's first day S (the customers are as of the day before)."""
DAYS = 28
"""Responses are dated S .. S + DAYS - 1."""
TARGET = "term_deposit"
SPEND_BANDS = ("1) $0 - $100", "2) $100 - $200", "3) $200 - $350", "4) $350 - $500", "5) $500+")
REGIONS = ("north", "south", "east", "west", "capital", "islands")


@dataclass(frozen=True)
class Campaign:
    products: pd.DataFrame
    customers: pd.DataFrame
    holdings: pd.DataFrame
    responders: pd.DataFrame

    def bank(self, *, holdings: bool = True) -> BankData:
        adoptions = pd.concat([self.holdings, self.responders]) if holdings else self.responders
        return BankData.from_frames(self.products, self.customers, adoptions)

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in ("products", "customers", "holdings", "responders"):
            paths[name] = folder / f"{name}.csv"
            getattr(self, name).to_csv(paths[name], index=False)
        return paths


def make_campaign(
    n: int = 3_000, *, seed: int = 7, prefix: str = "C", responders: bool = True
) -> Campaign:
    """``n`` customers; about 8% take up :data:`TARGET` (none if not ``responders``)."""
    rng = np.random.default_rng(seed)
    products = pd.DataFrame(
        {
            "product_code": ["current_account", "credit_card", TARGET],
            "name": ["Current account", "Credit card", "Term deposit"],
            "category": ["accounts", "cards", "savings"],
            "value": [50.0, 120.0, 300.0],
        }
    )
    ids = np.asarray([f"{prefix}{i:05d}" for i in range(n)], dtype=object)
    income = rng.lognormal(10.3, 0.5, n).round(0)
    region = rng.choice(REGIONS, n, p=[0.25, 0.2, 0.2, 0.15, 0.15, 0.05])
    band = rng.integers(0, len(SPEND_BANDS), n)
    tenure = rng.integers(0, 20, n)
    customers = pd.DataFrame(
        {
            "customer_id": ids,
            "segment": rng.choice(["mass", "affluent"], n, p=[0.8, 0.2]),
            "income": income,
            "region": region,
            "spend_band": np.asarray(SPEND_BANDS, dtype=object)[band],
            "tenure_years": tenure,
        }
    )
    has_account = rng.random(n) < 0.7
    has_card = rng.random(n) < 0.3
    rows = []
    start = pd.Timestamp(SNAPSHOT)
    for mask, code in ((has_account, "current_account"), (has_card, "credit_card")):
        days_before = rng.integers(1, 720, int(mask.sum()))
        for cid, d in zip(ids[mask], days_before, strict=True):
            rows.append((cid, code, (start - pd.Timedelta(days=int(d))).date().isoformat()))
    holdings = pd.DataFrame(rows, columns=["customer_id", "product_code", "adopted_at"])
    logit = (
        -3.6
        + 1.1 * (np.log(income) - 10.3) / 0.5
        + 0.45 * band
        + 1.0 * has_card
        + np.where(region == "capital", 1.0, 0.0)
        - np.where(region == "islands", 1.0, 0.0)
    )
    took = rng.random(n) < 1 / (1 + np.exp(-logit)) if responders else np.zeros(n, dtype=bool)
    day = rng.integers(0, DAYS, int(took.sum()))
    responded = pd.DataFrame(
        {
            "customer_id": ids[took],
            "product_code": TARGET,
            "adopted_at": [(start + pd.Timedelta(days=int(d))).date().isoformat() for d in day],
        }
    )
    return Campaign(products, customers, holdings, responded)
