"""A small trained bank for service tests: import it into a test database, register its
bundle as the active version, and make API keys, as an operator would with the CLI."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.auth import create_key
from service.data import registry
from service.data.db import make_engine, unit_of_work
from service.data.importing import import_adoptions, import_customers, import_products
from service.data.tables import ModelVersion

AS_OF = dt.date(2026, 1, 1)
"""The as-of day the test bundles are trained at."""


def register_bundle(
    session: Session, bundle: Path, data_dir: Path, *, version: str, map3: float = 0.3
) -> ModelVersion:
    """Register ``bundle`` as ``version`` with holdout MAP@3 ``map3``, through the promotion
    gate with no tolerance (activated unless worse than the active version)."""
    row, _ = registry.register(
        session,
        bundle=bundle,
        artifacts_dir=data_dir / "models",
        as_of=AS_OF,
        horizon_days=90,
        params={},
        metrics={"map@3": map3},
        gate_metric="map@3",
        tolerance=0.0,
        version=version,
    )
    return row


def load_trained_bank(
    database: str | Engine,
    bank: Path,
    bundle: Path | None,
    data_dir: Path,
    *,
    keys: Mapping[str, Sequence[str]] = {},
) -> dict[str, str]:
    """Import ``bank`` (a folder of products, customers and adoptions CSVs) into
    ``database`` (a URL or an engine), register ``bundle`` as version ``v1`` (activated by
    the promotion gate, there being no other), and create a key per name in ``keys`` with
    its scopes. Returns the keys by name."""
    engine = make_engine(database) if isinstance(database, str) else database
    try:
        import_products(engine, bank / "products.csv")
        import_customers(engine, bank / "customers.csv")
        import_adoptions(engine, bank / "adoptions.csv")
        with unit_of_work(engine) as session:
            if bundle is not None:
                register_bundle(session, bundle, data_dir, version="v1")
            made = {
                name: create_key(session, name=name, scopes=list(s)) for name, s in keys.items()
            }
    finally:
        if isinstance(database, str):
            engine.dispose()
    return made
