"""``nbo export --format parquet``: the bank as partitioned Parquet files that read back
as the bank the database holds, and a reader that refuses a broken export."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner

from models.synthetic import generate_bank, write_bank
from service import distributed
from service.cli.data import export
from service.cli.errors import NboGroup
from service.data.bank import load_bank
from service.data.importing import import_adoptions, import_customers, import_products
from tests.service.test_training import record_outcomes


def _cli() -> typer.Typer:
    # `export` is mounted on the nbo app by service.cli.main; here on its own.
    cli = typer.Typer(cls=NboGroup, pretty_exceptions_enable=False)

    @cli.callback()
    def main() -> None:
        """nbo"""

    cli.command()(export)
    return cli


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def test_export_reads_back_as_the_database_bank(engine: Engine, tmp_path: Path) -> None:
    bank = generate_bank(300, seed=2, offers_per_month=0.05)
    files = write_bank(bank, tmp_path / "bank")
    import_products(engine, files["products"])
    import_customers(engine, files["customers"])
    import_adoptions(engine, files["adoptions"])
    assert bank.outcomes is not None
    record_outcomes(engine, bank.outcomes.head(40))
    out = tmp_path / "export"
    env = {"NBO_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    env |= {"NBO_DATA_DIR": str(tmp_path), "COLUMNS": "200"}

    result = CliRunner().invoke(_cli(), ["export", str(out), "--partitions", "3"], env=env)
    assert result.exit_code == 0, result.output
    manifest = distributed.read_manifest(out)
    assert manifest["partitions"] == 3
    assert manifest["rows"]["customers"] == 300
    assert not list(tmp_path.glob(".export.partial"))

    whole = load_bank(engine)
    parts = [distributed.read_parquet_partition(str(out), k) for k in range(3)]
    assert all(len(p.customers) for p in parts)
    assert parts[0].attribute_kinds == whole.attribute_kinds
    pd.testing.assert_frame_equal(distributed._read_products(out), whole.products)
    pd.testing.assert_frame_equal(
        _sorted(pd.concat([p.customers for p in parts]), ["customer_id"]),
        _sorted(whole.customers, ["customer_id"]),
    )
    keys = ["customer_id", "product_code", "adopted_at"]
    pd.testing.assert_frame_equal(
        _sorted(pd.concat([p.adoptions for p in parts]), keys),
        _sorted(whole.adoptions, keys),
    )
    assert whole.outcomes is not None and len(whole.outcomes) == 40
    outcomes = pd.concat([p.outcomes for p in parts if p.outcomes is not None])
    keys = ["customer_id", "product_code", "occurred_at", "outcome"]
    pd.testing.assert_frame_equal(
        _sorted(outcomes, keys)[list(whole.outcomes.columns)], _sorted(whole.outcomes, keys)
    )
    # A customer's rows are in one partition.
    for part in parts:
        assert set(part.adoptions["customer_id"]) <= set(part.customers["customer_id"])

    again = CliRunner().invoke(_cli(), ["export", str(out)], env=env)
    assert again.exit_code == 2
    assert "exists and is not an empty folder" in again.output
    assert "Traceback" not in again.output


def test_a_broken_export_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(distributed.DaskError, match="no manifest.json"):
        distributed.read_manifest(tmp_path)
    manifest = {"format": distributed.PARQUET_FORMAT, "version": 99, "partitions": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(distributed.DaskError, match="format version 99"):
        distributed.read_manifest(tmp_path)
    manifest["version"] = distributed.PARQUET_VERSION
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(distributed.DaskError, match="customers part 0 is missing"):
        distributed.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(distributed.DaskError, match="unreadable manifest"):
        distributed.read_manifest(tmp_path)
