"""nbo train end to end through the database: holdout, bundle, registry, gate."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from models.synthetic import generate_bank, write_bank
from service import registry
from service.db import unit_of_work
from service.importing import import_adoptions, import_customers, import_products
from service.training import load_bank, train_and_register


def test_train_registers_an_active_version_that_beats_popularity(
    engine: Engine, tmp_path: Path
) -> None:
    bank = generate_bank(3_000, seed=3)
    files = write_bank(bank, tmp_path / "bank")
    import_products(engine, files["products"])
    import_customers(engine, files["customers"])
    import_adoptions(engine, files["adoptions"])

    data = load_bank(engine)
    assert len(data.customers) == 3_000
    assert len(data.adoptions) == len(bank.adoptions)
    assert set(data.attribute_kinds) >= {"income", "region"}

    outcome = train_and_register(
        engine, artifacts_dir=tmp_path / "models", as_of=None, horizon_days=90, tolerance=0.0
    )
    assert outcome.activated
    table = outcome.holdout.comparison
    assert table.loc["blend", "MAP@3"] > table.loc["popularity", "MAP@3"]
    with unit_of_work(engine) as session:
        active = registry.active_version(session)
        assert active is not None and active.version == outcome.version.version
        assert active.metrics["map@3"] == table.loc["blend", "MAP@3"]
        assert (Path(active.path) / "manifest.json").exists()
