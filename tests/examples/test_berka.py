"""The Berka (PKDD'99) converter turns the real bank tables into nbo's import format."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BERKA = REPO_ROOT.parent / "shared" / "data" / "berka"
CONVERTER = REPO_ROOT / "examples" / "berka" / "convert.py"


def _load_converter() -> ModuleType:
    # examples/ is not a package, so import the script by its path.
    spec = importlib.util.spec_from_file_location("berka_convert", CONVERTER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


berka = _load_converter()


def _asc(name: str) -> pd.DataFrame:
    return pd.read_csv(BERKA / f"{name}.asc", sep=";", dtype=str)


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    if not BERKA.is_dir():
        pytest.skip(f"Berka data not found at {BERKA} (shared/ must sit beside the repo)")
    return berka.convert(BERKA)


@pytest.fixture(scope="module")
def written(frames: dict[str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("berka")
    berka.write(frames, out)
    return out


def test_products_csv_has_exactly_the_import_columns(written: Path) -> None:
    products = pd.read_csv(written / "products.csv", dtype=str, keep_default_na=False)
    assert list(products.columns) == [
        "product_code",
        "name",
        "category",
        "value",
        "business_weight",
        "active",
        "min_age",
        "max_age",
        "segments",
        "requires",
        "excludes",
    ]
    rows = products.set_index("product_code")
    assert list(rows.index) == [
        "current_account",
        "junior_card",
        "classic_card",
        "gold_card",
        "loan",
    ]
    assert "permanent_order" not in rows.index  # orders carry no date
    for code in ("junior_card", "classic_card", "gold_card", "loan"):
        assert rows.loc[code, "requires"] == "current_account"
    assert rows.loc["current_account", "requires"] == ""
    assert rows.loc["junior_card", "max_age"] == "25"
    assert rows.loc["junior_card", "excludes"] == "classic_card|gold_card"
    assert (products["value"].astype(float) > 0).all()


def test_counts_match_the_source_tables(frames: dict[str, pd.DataFrame]) -> None:
    customers, adoptions = frames["customers"], frames["adoptions"]
    assert len(customers) == 4500
    assert customers["customer_id"].is_unique
    by_product = adoptions["product_code"].value_counts()
    assert by_product["current_account"] == 4500
    assert by_product["loan"] == 682
    card_types = _asc("card")["type"].value_counts()
    assert card_types.to_dict() == {"classic": 659, "junior": 145, "gold": 88}
    for card_type, count in card_types.items():
        assert by_product[f"{card_type}_card"] == count
    assert by_product[["junior_card", "classic_card", "gold_card"]].sum() == 892
    assert len(adoptions) == 4500 + 892 + 682


def test_each_account_opens_once_and_rows_are_unique(frames: dict[str, pd.DataFrame]) -> None:
    adoptions, customers = frames["adoptions"], frames["customers"]
    opened = adoptions[adoptions["product_code"] == "current_account"]
    assert opened["customer_id"].is_unique
    assert set(opened["customer_id"]) == set(customers["customer_id"])
    # The database's unique key; in this data no account has two cards or two loans.
    assert not adoptions.duplicated(["customer_id", "product_code", "adopted_at"]).any()
    assert not adoptions.duplicated(["customer_id", "product_code"]).any()


def test_every_adoption_belongs_to_a_customer(frames: dict[str, pd.DataFrame]) -> None:
    known = set(frames["customers"]["customer_id"])
    assert set(frames["adoptions"]["customer_id"]) <= known


def test_cards_and_loans_come_on_or_after_the_account_opening(
    frames: dict[str, pd.DataFrame],
) -> None:
    adoptions = frames["adoptions"]
    joined = frames["customers"].set_index("customer_id")["joined_at"]
    later = adoptions[adoptions["product_code"] != "current_account"]
    early = later["adopted_at"] < later["customer_id"].map(joined)
    assert early.sum() == 0, later[early].head()
    opened = adoptions[adoptions["product_code"] == "current_account"]
    assert (opened["adopted_at"].to_numpy() == opened["customer_id"].map(joined).to_numpy()).all()


def test_written_dates_are_iso_and_parse(written: Path) -> None:
    customers = pd.read_csv(written / "customers.csv", dtype=str)
    adoptions = pd.read_csv(written / "adoptions.csv", dtype=str)
    for column in (customers["joined_at"], customers["birth_date"], adoptions["adopted_at"]):
        assert column.notna().all()
        assert column.str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
        pd.to_datetime(column, format="%Y-%m-%d")
    closed = adoptions["closed_at"].dropna()
    assert closed.str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
    pd.to_datetime(closed, format="%Y-%m-%d")
    assert (adoptions["adopted_at"].min(), adoptions["adopted_at"].max()) == (
        "1993-01-01",
        "1998-12-29",
    )


def test_birth_dates_are_plausible_and_women_decoded(frames: dict[str, pd.DataFrame]) -> None:
    customers = frames["customers"]
    birth = customers["birth_date"]
    assert birth.min() >= pd.Timestamp("1900-01-01")
    assert (birth < customers["joined_at"]).all()
    assert set(customers["gender"]) == {"F", "M"}
    # Client 1 (birth number 706213: month 62 = December + 50) owns account 1.
    first = customers.set_index("customer_id").loc["A1"]
    assert first["birth_date"] == pd.Timestamp("1970-12-13")
    assert first["gender"] == "F"
    # Owners whose stored month exceeds 50 are exactly the women.
    disp, client = _asc("disp"), _asc("client")
    owners = disp[disp["type"] == "OWNER"].merge(client, on="client_id")
    women = owners.loc[owners["birth_number"].str[2:4].astype(int) > 50, "account_id"]
    assert set(customers.loc[customers["gender"] == "F", "customer_id"]) == set("A" + women)


def test_only_finished_loans_are_closed(frames: dict[str, pd.DataFrame]) -> None:
    adoptions = frames["adoptions"]
    loan = _asc("loan")
    status = pd.Series(loan["status"].to_numpy(), index="A" + loan["account_id"])
    closed = adoptions["closed_at"].notna()
    assert not closed[adoptions["product_code"] != "loan"].any()
    loans = adoptions[adoptions["product_code"] == "loan"]
    finished = loans["customer_id"].map(status).isin(["A", "B"])
    assert (loans["closed_at"].notna() == finished).all()
    assert finished.sum() == 234  # 203 A + 31 B
    ended = loans[finished]
    assert (ended["closed_at"] > ended["adopted_at"]).all()
    # Loan 5314 (account 1787): granted 1993-07-05 for 12 months, status B.
    row = loans.set_index("customer_id").loc["A1787"]
    assert (row["adopted_at"], row["closed_at"]) == (
        pd.Timestamp("1993-07-05"),
        pd.Timestamp("1994-07-05"),
    )


def test_customer_attributes(frames: dict[str, pd.DataFrame]) -> None:
    customers = frames["customers"]
    assert list(customers.columns[:5]) == [
        "customer_id",
        "segment",
        "branch_id",
        "joined_at",
        "birth_date",
    ]
    assert customers["statement_frequency"].value_counts().to_dict() == {
        "monthly": 4167,
        "weekly": 240,
        "after_transaction": 93,
    }
    assert customers["n_disponents"].value_counts().to_dict() == {0: 3631, 1: 869}
    assert customers["n_permanent_orders"].sum() == 6471
    order_total = pd.to_numeric(_asc("order")["amount"]).sum()
    assert customers["permanent_orders_amount"].sum() == pytest.approx(order_total)
    assert set(customers["segment"]) == {"salary_low", "salary_mid", "salary_high"}
    assert customers["branch_id"].str.fullmatch(r"D\d+").all()
    assert customers["district_name"].notna().all()
    assert customers["urban_ratio"].between(0, 1).all()


def test_junior_cards_are_held_by_young_owners(frames: dict[str, pd.DataFrame]) -> None:
    adoptions, customers = frames["adoptions"], frames["customers"]
    born = customers.set_index("customer_id")["birth_date"]
    junior = adoptions[adoptions["product_code"] == "junior_card"]
    age = (junior["adopted_at"] - junior["customer_id"].map(born)).dt.days / 365.25
    max_age = frames["products"].set_index("product_code").loc["junior_card", "max_age"]
    assert age.min() >= 12
    assert age.max() < max_age


def test_most_common_sequences(frames: dict[str, pd.DataFrame]) -> None:
    counts = berka.sequence_counts(frames["adoptions"])
    assert counts.sum() == 4500
    assert counts.head(3).to_dict() == {
        "current_account": 3096,
        "current_account > classic_card": 526,
        "current_account > loan": 512,
    }
    assert counts["current_account > loan > classic_card"] == 105


def test_cli_writes_files_and_summary(
    frames: dict[str, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert berka.main(["--src", str(BERKA), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "customers: 4,500 rows" in printed
    assert "current_account > loan > classic_card" in printed
    assert {p.name for p in tmp_path.iterdir()} == {
        "products.csv",
        "customers.csv",
        "adoptions.csv",
    }


def test_missing_source_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert berka.main(["--src", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert f"Berka source folder not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_table_is_named(tmp_path: Path) -> None:
    (tmp_path / "account.asc").write_text('"account_id";"district_id";"frequency";"date"\n')
    with pytest.raises(FileNotFoundError, match=r"card\.asc, client\.asc"):
        berka.convert(tmp_path)
