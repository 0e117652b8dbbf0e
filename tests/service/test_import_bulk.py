"""Import at scale: chunked reading, the bulk and direct load paths, and their guarantees.

Every test runs on SQLite and PostgreSQL; ``bulk_rows=1`` sends a PostgreSQL import of
an empty adoptions table through the direct load (COPY into ``adoptions``), and
``bulk_rows=0`` through the staging table, so both paths keep the same promises.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from service.data import importing
from service.data.importing import (
    ImportFailed,
    import_adoptions,
    import_customers,
    import_products,
    read_chunks,
    read_text_chunks,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CODES = ("current_account", "credit_card", "home_insurance", "student_account")
CUSTOMERS = 400
ROWS = 3000
PATHS = pytest.mark.parametrize("bulk_rows", [0, 1], ids=["staged", "direct"])


def bank(engine: Engine, tmp_path: Path) -> None:
    import_products(engine, FIXTURES / "products.csv")
    lines = "\n".join(f"K{i:05d},{i % 7}" for i in range(CUSTOMERS))
    path = tmp_path / "customers.csv"
    path.write_text(f"customer_id,score\n{lines}\n")
    import_customers(engine, path)


def adoption_lines(rows: int = ROWS) -> list[str]:
    """``rows`` distinct adoptions (customer, product, day), some closed."""
    lines = []
    for i in range(rows):
        customer, slot = divmod(i, 8)
        day = 1 + slot * 3
        closed = f"2024-03-{day:02d}" if i % 3 == 0 else ""
        lines.append(
            f"K{customer % CUSTOMERS:05d},{CODES[slot % 4]},2023-{1 + slot:02d}-{day:02d},{closed}"
        )
    return lines


def write_adoptions(tmp_path: Path, lines: list[str], name: str = "adoptions.csv") -> Path:
    path = tmp_path / name
    path.write_text("customer_id,product_code,adopted_at,closed_at\n" + "\n".join(lines) + "\n")
    return path


def stored(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(str(v) if v is not None else None for v in row)
            for row in conn.execute(
                text(
                    "SELECT c.external_id, p.code, a.adopted_at, a.closed_at, a.source "
                    "FROM adoptions a JOIN customers c ON c.id = a.customer_id "
                    "JOIN products p ON p.id = a.product_id "
                    "ORDER BY c.external_id, p.code, a.adopted_at"
                )
            )
        ]


def constraints(engine: Engine) -> int:
    """The adoptions table's constraints, counted (a bulk load drops and restores some)."""
    if engine.dialect.name != "postgresql":
        return 0
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT COUNT(*) FROM pg_constraint WHERE conrelid = 'adoptions'::regclass")
            ).scalar_one()
        )


@PATHS
def test_bad_value_deep_in_a_big_file_writes_nothing(
    engine: Engine, tmp_path: Path, bulk_rows: int
) -> None:
    bank(engine, tmp_path)
    lines = adoption_lines()
    lines[2716] = "K00001,credit_card,2023-02-30,"
    path = write_adoptions(tmp_path, lines)
    before = constraints(engine)
    with pytest.raises(ImportFailed) as info:
        import_adoptions(engine, path, chunk_rows=250, bulk_rows=bulk_rows)
    assert "row 2717, column 'adopted_at': unparsable date '2023-02-30'" in str(info.value)
    assert stored(engine) == []
    assert constraints(engine) == before


@PATHS
def test_unknown_customer_deep_in_a_big_file(
    engine: Engine, tmp_path: Path, bulk_rows: int
) -> None:
    bank(engine, tmp_path)
    lines = adoption_lines()
    lines[2999] = "NOBODY,credit_card,2023-02-03,"
    path = write_adoptions(tmp_path, lines)
    with pytest.raises(ImportFailed) as info:
        import_adoptions(engine, path, chunk_rows=250, bulk_rows=bulk_rows)
    assert "row 3000, column 'customer_id': unknown customer 'NOBODY'" in str(info.value)
    assert stored(engine) == []


@PATHS
def test_duplicate_far_apart_is_reported_with_both_rows(
    engine: Engine, tmp_path: Path, bulk_rows: int
) -> None:
    bank(engine, tmp_path)
    lines = adoption_lines()
    lines[2500] = lines[9]
    path = write_adoptions(tmp_path, lines)
    before = constraints(engine)
    with pytest.raises(ImportFailed) as info:
        import_adoptions(engine, path, chunk_rows=250, bulk_rows=bulk_rows)
    assert "row 2501: duplicate key: customer 'K00001', product 'credit_card'" in str(info.value)
    assert "(also on row 10)" in str(info.value)
    assert stored(engine) == []
    assert constraints(engine) == before


@PATHS
def test_reimport_changes_nothing_and_updates_closures(
    engine: Engine, tmp_path: Path, bulk_rows: int
) -> None:
    bank(engine, tmp_path)
    lines = adoption_lines()
    path = write_adoptions(tmp_path, lines)
    first = import_adoptions(engine, path, chunk_rows=250, bulk_rows=bulk_rows)
    assert (first.rows_read, first.added, first.updated) == (ROWS, ROWS, 0)
    loaded = stored(engine)
    assert len(loaded) == ROWS
    again = import_adoptions(engine, path, chunk_rows=250, bulk_rows=bulk_rows)
    assert (again.added, again.updated, again.unchanged) == (0, 0, ROWS)
    assert stored(engine) == loaded
    # A closure changed on a stored adoption is an update, not a new row.
    changed = list(lines)
    changed[4] = changed[4].rsplit(",", 1)[0] + ",2024-12-31"
    summary = import_adoptions(
        engine, write_adoptions(tmp_path, changed, "b.csv"), bulk_rows=bulk_rows
    )
    assert (summary.added, summary.updated) == (0, 1)
    assert len(stored(engine)) == ROWS


@PATHS
def test_small_chunks_give_what_one_chunk_gives(
    engine: Engine, tmp_path: Path, bulk_rows: int
) -> None:
    """Chunking is really used (the progress callback sees every chunk) and changes nothing."""
    bank(engine, tmp_path)
    path = write_adoptions(tmp_path, adoption_lines())
    chunks: list[int] = []
    import_adoptions(engine, path, chunk_rows=97, bulk_rows=bulk_rows, progress=chunks.append)
    assert len(chunks) == math.ceil(ROWS / 97) and max(chunks) == 97 and sum(chunks) == ROWS
    small = stored(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM adoptions"))
    whole: list[int] = []
    import_adoptions(engine, path, chunk_rows=1_000_000, bulk_rows=bulk_rows, progress=whole.append)
    assert whole == [ROWS]
    assert stored(engine) == small


def test_direct_load_is_taken_on_an_empty_postgres_table(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank(engine, tmp_path)
    taken: list[bool] = []
    original = importing._load_adoptions_directly

    def spy(*args: Any, **kwargs: Any) -> bool:
        taken.append(original(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(importing, "_load_adoptions_directly", spy)
    path = write_adoptions(tmp_path, adoption_lines())
    before = constraints(engine)
    import_adoptions(engine, path, bulk_rows=1)
    import_adoptions(engine, path, bulk_rows=1)  # now the table holds rows: staged
    assert taken == ([True, False] if engine.dialect.name == "postgresql" else [False, False])
    assert constraints(engine) == before


def test_arrow_reader_reads_what_pandas_reads(tmp_path: Path) -> None:
    body = (
        "\ufeffcustomer_id, product_code ,adopted_at,closed_at\n"
        ' K1 ,"credit_card",2023-01-02,\n'
        "\n"
        '"K,2","a ""quoted"" code", 2023-01-03 ,NA\n'
        '"K\n3",x,,\n'
    )
    path = tmp_path / "a.csv"
    path.write_text(body, encoding="utf-8")
    header, chunks = read_text_chunks(path, 2)
    arrow = [row for _, table in chunks for row in zip(*table.to_pydict().values(), strict=True)]
    frames = [frame for _, frame in read_chunks(path, 2)]
    pandas = [row for frame in frames for row in frame.itertuples(index=False, name=None)]
    assert header == list(frames[0].columns)
    assert arrow == pandas
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(body.encode()))
    header_gz, chunks_gz = read_text_chunks(gz, 2)
    assert header_gz == header
    assert [r for _, t in chunks_gz for r in zip(*t.to_pydict().values(), strict=True)] == arrow


def test_unreadable_csv_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"customer_id,product_code,adopted_at\nK1,x,2023-01-01,extra\n")
    _, chunks = read_text_chunks(path, 10)
    with pytest.raises(ImportFailed, match="not a readable CSV file"):
        list(chunks)
