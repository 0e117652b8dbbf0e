"""A small bank with a registered model version, for tests of the command line, and the
runner that drives ``nbo`` as a user would (environment, exit status, output)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from models.artifacts import save_bundle
from models.data import BankData
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service.cli.main import app
from service.data.db import make_engine, unit_of_work
from tests.bank import AS_OF, load_trained_bank, register_bundle

runner = CliRunner()

FAST = TrainConfig(max_rounds=20, n_cutoffs=3, num_threads=1)
"""Enough of a model to rank with, trained in seconds."""

WEIGHTS = (1.0, 0.5, 2.0, 3.0)
"""Business weights given to the products in turn, so that ranking by propensity x
value x weight differs from ranking by propensity or by propensity x value."""


VERSIONS = ("20251201-090000-0a0b0c", "20260101-090000-1a1b1c")
"""The model versions registered, as `nbo train` names them; the last is active."""


@dataclass(frozen=True)
class CliBank:
    url: str
    """A SQLite database holding the bank and the :data:`VERSIONS`."""
    data_dir: Path
    bank: Path


def run(args: list[str], bank_url: str, data_dir: Path, *, columns: int = 200) -> tuple[int, str]:
    """``nbo ARGS`` on ``bank_url``: the exit status and stdout + stderr.

    An exception the command let escape fails the test here, traceback or not: the
    runner would otherwise turn it into exit status 1 and hide it."""
    env = {
        "NBO_DATABASE_URL": bank_url,
        "NBO_DATA_DIR": str(data_dir),
        "COLUMNS": str(columns),
        "NBO_DEBUG": "",
    }
    result = runner.invoke(app, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"nbo {' '.join(args)} raised {result.exception!r}") from (
            result.exception
        )
    return result.exit_code, result.output


def make_cli_bank(root: Path, template: Path) -> CliBank:
    """Generate 800 customers, weight the products, train and register the
    :data:`VERSIONS` (the last active) in a copy of the migrated SQLite ``template``."""
    bank = root / "bank"
    write_bank(generate_bank(800, seed=5), bank)
    products = pd.read_csv(bank / "products.csv")
    products["business_weight"] = [WEIGHTS[i % len(WEIGHTS)] for i in range(len(products))]
    products.to_csv(bank / "products.csv", index=False)
    model = train(BankData.from_folder(bank), as_of=AS_OF, config=FAST)
    save_bundle(model, root / "bundle", metrics={"map@3": 0.3})
    database = root / "nbo.sqlite3"
    shutil.copy(template, database)
    url = f"sqlite:///{database}"
    load_trained_bank(url, bank, None, root)
    engine = make_engine(url)
    try:
        for version in VERSIONS:
            with unit_of_work(engine) as session:
                register_bundle(session, root / "bundle", root, version=version)
    finally:
        engine.dispose()
    return CliBank(url, root, bank)
