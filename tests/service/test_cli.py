"""The `nbo` command line, driven as a user would (environment, files, exit codes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from service.cli.main import app
from service.data import db
from tests.conftest import SHARED_DATA

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def nbo(args: list[str], database_url: str, tmp_path: Path) -> tuple[int, str]:
    # A wide terminal: without one, rich wraps at 80 columns and a message naming a long
    # temporary path would be split where the tests look for it.
    env = {"NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    result = runner.invoke(app, args, env=env)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "command",
    [[], ["db"], ["db", "upgrade"], ["import"], ["import", "snapshots"], ["generate"], ["demo"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_import_bank_through_cli(database_url: str, tmp_path: Path) -> None:
    code, out = nbo(["db", "upgrade"], database_url, tmp_path)
    assert code == 0, out
    for kind in ("products", "customers", "adoptions"):
        code, out = nbo(["import", kind, str(FIXTURES / f"{kind}.csv")], database_url, tmp_path)
        assert code == 0, out
        assert "rows read" in out and "added" in out
    code, out = nbo(
        ["import", "adoptions", str(FIXTURES / "adoptions.csv")], database_url, tmp_path
    )
    assert code == 0 and "unchanged" in out


def test_failed_import_exits_nonzero_and_says_where(database_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "products.csv"
    bad.write_text("product_code,name,category,value\nx,X,c,-1\n")
    code, out = nbo(["import", "products", str(bad)], database_url, tmp_path)
    assert code == 1
    assert "nothing was written" in out
    assert "row 1, column 'value': negative value -1" in out


def test_snapshot_map_option_is_checked(database_url: str, tmp_path: Path) -> None:
    snapshots = tmp_path / "x.csv"
    snapshots.write_text("customer_id,snapshot_date,a\n")
    code, out = nbo(
        ["import", "snapshots", str(snapshots), "--products", "a", "--map", "nonsense"],
        database_url,
        tmp_path,
    )
    assert code == 2 and "COLUMN=PRODUCT_CODE" in out


def test_sqlite_default_needs_no_setup(tmp_path: Path) -> None:
    """With no database configured, the data folder gets a migrated SQLite file."""
    result = runner.invoke(
        app,
        ["import", "products", str(FIXTURES / "products.csv")],
        env={"NBO_DATA_DIR": str(tmp_path), "NBO_DATABASE_URL": ""},
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "nbo.sqlite3").exists()


def test_berka_real_bank_imports_with_published_counts(database_url: str, tmp_path: Path) -> None:
    """The real Czech bank: 4,500 accounts, 892 cards, 682 loans, end to end into the database."""
    source = SHARED_DATA / "berka"
    if not source.exists():
        pytest.skip(f"{source} not present")
    spec = importlib.util.spec_from_file_location("berka", REPO / "examples/berka/convert.py")
    assert spec and spec.loader
    berka = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(berka)
    out = tmp_path / "berka"
    berka.write(berka.convert(source), out)
    code, output = nbo(["import", "bank", str(out)], database_url, tmp_path)
    assert code == 0, output
    engine = db.make_engine(database_url)
    with engine.connect() as conn:
        customers = conn.execute(text("SELECT COUNT(*) FROM customers")).scalar_one()
        by_category: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT p.category, COUNT(*) FROM adoptions a "
                    "JOIN products p ON p.id = a.product_id GROUP BY p.category"
                )
            ).all()
        )
        loans_closed = conn.execute(
            text(
                "SELECT COUNT(*) FROM adoptions a JOIN products p ON p.id = a.product_id "
                "WHERE p.code = 'loan' AND a.closed_at IS NOT NULL"
            )
        ).scalar_one()
    engine.dispose()
    assert customers == 4_500
    assert sum(v for k, v in by_category.items() if k == "card") == 892
    assert by_category.get("lending") == 682
    assert by_category.get("account") == 4_500
    assert loans_closed == 234  # status A (203) and B (31): finished loans


def test_generate_is_deterministic_and_imports(database_url: str, tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        code, output = nbo(
            ["generate", "--customers", "300", "--seed", "5", "--out", str(out)],
            database_url,
            tmp_path,
        )
        assert code == 0, output
        outputs.append({p.name: p.read_bytes() for p in out.glob("*.csv")})
    assert outputs[0] == outputs[1] and set(outputs[0]) == {
        "products.csv",
        "customers.csv",
        "adoptions.csv",
    }
    code, output = nbo(["import", "bank", str(tmp_path / "a")], database_url, tmp_path)
    assert code == 0, output


def test_rules_mine_groceries(tmp_path: Path) -> None:
    """Basket mode on the real Groceries data reproduces the published 120 rules."""
    groceries = SHARED_DATA / "groceries" / "groceries_tidy.csv"
    if not groceries.exists():
        pytest.skip(f"{groceries} not present")
    out = tmp_path / "rules.csv"
    result = runner.invoke(
        app,
        [
            "rules",
            "mine",
            str(groceries),
            "--min-support",
            "0.005",
            "--min-confidence",
            "0.5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "120 rules from 9,835 baskets" in result.output
    import pandas as pd

    rules = pd.read_csv(out)
    assert len(rules) == 120
    assert {"antecedent", "consequent", "support", "confidence", "lift", "count"} <= set(
        rules.columns
    )
    top = rules.sort_values("lift", ascending=False).iloc[0]
    assert top["lift"] > 3 and top["confidence"] >= 0.5


def test_rules_mine_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "b.csv"
    bad.write_text("basket,thing\n1,milk\n")
    result = runner.invoke(app, ["rules", "mine", str(bad)])
    assert result.exit_code == 1
    assert "transaction_id" in result.output


def test_models_commands_on_empty_registry(database_url: str, tmp_path: Path) -> None:
    code, out = nbo(["models", "list"], database_url, tmp_path)
    assert code == 0 and "no model versions yet" in out
    code, out = nbo(["models", "rollback"], database_url, tmp_path)
    assert code == 1 and "no active version" in out
    code, out = nbo(["models", "show", "v9"], database_url, tmp_path)
    assert code == 2 and "no model version 'v9'" in out  # a usage error: an unknown name
