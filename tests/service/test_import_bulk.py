"""Import at scale: chunked reading, the bulk and direct load paths, and their guarantees.

Every test runs on SQLite and PostgreSQL; ``bulk_rows=1`` sends a PostgreSQL import of
an empty adoptions table through the direct load (COPY into ``adoptions``), and
``bulk_rows=0`` through the staging table, so both paths keep the same promises.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from service.data import importing
from service.data.importing import (
    ImportFailed,
    import_adoptions,
    import_customers,
    import_products,
    read_chunks,
    read_text_chunks,
)
from service.data.tables import Customer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CODES = ("current_account", "credit_card", "home_insurance", "student_account")
CUSTOMERS = 400
ROWS = 3000
PATHS = pytest.mark.parametrize("bulk_rows", [0, 1], ids=["staged", "direct"])
TODAY = dt.date(2025, 6, 1)


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


@PATHS
def test_customer_ids_of_any_length_and_script_are_resolved(
    engine: Engine, tmp_path: Path, bulk_rows: int
) -> None:
    """The direct load reads every customer's id and number in one query, the ids'
    lengths in bytes: ids of one to 128 characters, some of several bytes each, are
    each matched to their own customer (a length read wrong would shift every id
    after it)."""
    import_products(engine, FIXTURES / "products.csv")
    ids = ["K", "Kö-1", "客户-2", "x" * 127 + "é", "Ω" * 128, "K 3", "k"]
    path = tmp_path / "customers.csv"
    path.write_text("customer_id\n" + "\n".join(ids) + "\n", encoding="utf-8")
    import_customers(engine, path)
    lines = [f"{c},{CODES[i % 4]},2023-0{1 + i}-02," for i, c in enumerate(reversed(ids))]
    import_adoptions(engine, write_adoptions(tmp_path, lines), bulk_rows=bulk_rows)
    expected = sorted(
        (c, CODES[i % 4], f"2023-0{1 + i}-02", None, "import") for i, c in enumerate(reversed(ids))
    )
    assert stored(engine) == expected


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


# ------------------------------------------------------------------ customers

CUSTOMER_PATHS = pytest.mark.parametrize(
    ("direct", "bulk_rows"),
    [(False, 0), (True, 0), (True, 1)],
    ids=["staged", "direct", "direct-bulk"],
)
"""``direct=False``: the staging table and merge; ``direct=True``: on PostgreSQL a first load
COPies straight into ``customers``, with its unique key kept (``bulk_rows=0``) or set aside
and built again (``bulk_rows=1``)."""
CUSTOMER_HEADER = "customer_id,segment,branch_id,joined_at,birth_date,valid_from,income,region"


def customer_lines(rows: int = ROWS) -> list[str]:
    """``rows`` customers with every kind of cell: empty and missing-token cells, numbers
    written in several ways, texts needing JSON escapes, dates in more than one form."""
    regions = ['north', '"quoted, with comma"', "back\\slash", '"two\nlines"', "tab\there",
               "é ü", "NA", ""]  # fmt: skip
    incomes = ["1200", "3.5", "1e3", "-0", "", "0.1", "+7", "null", "12345678.25"]
    lines = []
    for i in range(rows):
        segment = ["mass", "", "affluent"][i % 3]
        joined = ["2020-01-05", "", "2019-12-31T00:00:00", "2021-03-04"][i % 4]
        born = "1980-02-29" if i % 5 == 0 else ""
        since = "2024-01-01" if i % 7 == 0 else ""
        lines.append(
            f"K{i:05d},{segment},B{i % 13},{joined},{born},{since},"
            f"{incomes[i % len(incomes)]},{regions[i % len(regions)]}"
        )
    return lines


def write_customers(tmp_path: Path, lines: list[str], name: str = "customers.csv") -> Path:
    path = tmp_path / name
    path.write_text(CUSTOMER_HEADER + "\n" + "\n".join(lines) + "\n")
    return path


def customer_rows(engine: Engine) -> list[tuple[Any, ...]]:
    """Every stored customer (but its generated id and time stamp), then the attribute
    definitions and the number of attribute changes."""
    with engine.connect() as conn:
        rows: list[tuple[Any, ...]] = [
            (ext, seg, branch, str(joined), str(born), json.dumps(attributes, sort_keys=True))
            for ext, seg, branch, joined, born, attributes in conn.execute(
                select(
                    Customer.external_id,
                    Customer.segment,
                    Customer.branch_id,
                    Customer.joined_at,
                    Customer.birth_date,
                    Customer.attributes,
                ).order_by(Customer.external_id)
            )
        ]
        rows += [
            tuple(row)
            for row in conn.execute(
                text("SELECT name, kind FROM attribute_definitions ORDER BY name")
            )
        ]
        rows.append((conn.execute(text("SELECT COUNT(*) FROM attribute_changes")).scalar_one(),))
    return rows


def customer_constraints(engine: Engine) -> list[str]:
    """The constraints and indexes of ``customers``, and the foreign keys of other tables
    that refer to it, with their definitions (PostgreSQL: a bulk load sets them aside
    and builds them again)."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                text(
                    "SELECT conrelid::regclass || ' ' || conname || ' ' "
                    "|| pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE 'customers'::regclass IN (conrelid, confrelid) "
                    "UNION ALL SELECT indexdef FROM pg_indexes WHERE tablename = 'customers'"
                )
            ).scalars()
        )


def empty_customers(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM customers"))
        conn.execute(text("DELETE FROM attribute_definitions"))


def test_direct_customers_load_what_the_staged_path_loads(engine: Engine, tmp_path: Path) -> None:
    path = write_customers(tmp_path, customer_lines())
    loaded = {}
    schema = customer_constraints(engine)
    if engine.dialect.name == "postgresql":
        assert any("ix_customers_updated_at" in line for line in schema)
        assert any(line.startswith("customers pk_customers PRIMARY KEY") for line in schema)
        # The keys of other tables that refer to customers, with what a delete does.
        assert any(line.startswith("feedback ") and "ON DELETE SET NULL" in line for line in schema)
        assert any(line.startswith("adoptions ") and "ON DELETE CASCADE" in line for line in schema)
    for label, direct, bulk_rows in [("staged", False, 0), ("direct", True, 0), ("bulk", True, 1)]:
        empty_customers(engine)
        summary = import_customers(
            engine, path, chunk_rows=250, direct=direct, bulk_rows=bulk_rows, today=TODAY
        )
        assert (summary.rows_read, summary.added, summary.updated) == (ROWS, ROWS, 0)
        assert customer_constraints(engine) == schema
        loaded[label] = customer_rows(engine)
    assert len(loaded["staged"]) == ROWS + 3
    assert loaded["direct"] == loaded["staged"]
    assert loaded["bulk"] == loaded["staged"]
    # The cells came through: escapes, numbers, missing tokens, dates in other forms.
    by_id = {row[0]: row for row in loaded["staged"][:ROWS]}
    assert json.loads(by_id["K00001"][5]) == {"income": 3.5, "region": "quoted, with comma"}
    assert json.loads(by_id["K00003"][5]) == {"income": 0.0, "region": "two\nlines"}
    assert json.loads(by_id["K00004"][5]) == {"region": "tab\there"}
    assert json.loads(by_id["K00006"][5]) == {"income": 7.0}  # "NA" is no value
    assert json.loads(by_id["K00007"][5]) == {}
    assert by_id["K00002"][1:5] == ("affluent", "B2", "2019-12-31", "None")
    assert by_id["K00001"][1] is None  # an empty segment is no segment
    assert loaded["staged"][ROWS:] == [("income", "numeric"), ("region", "categorical"), (0,)]


@CUSTOMER_PATHS
def test_bad_customer_deep_in_a_big_file_writes_nothing(
    engine: Engine, tmp_path: Path, direct: bool, bulk_rows: int
) -> None:
    lines = customer_lines()
    lines[2716] = lines[2716].replace(",B", ",B" + "x" * 70, 1)
    lines[2980] = "K99999,mass,B1,2020-02-30,,,12,north"
    path = write_customers(tmp_path, lines)
    before = customer_constraints(engine)
    with pytest.raises(ImportFailed) as info:
        import_customers(engine, path, chunk_rows=250, direct=direct, bulk_rows=bulk_rows)
    assert "row 2717, column 'branch_id': longer than 64 characters" in str(info.value)
    assert "row 2981, column 'joined_at': unparsable date '2020-02-30'" in str(info.value)
    assert customer_rows(engine) == [(0,)]
    assert customer_constraints(engine) == before


@CUSTOMER_PATHS
def test_repeated_customer_far_apart_is_reported_with_both_rows(
    engine: Engine, tmp_path: Path, direct: bool, bulk_rows: int
) -> None:
    lines = customer_lines()
    lines[2500] = "K00009" + lines[2500][6:]
    path = write_customers(tmp_path, lines)
    before = customer_constraints(engine)
    with pytest.raises(ImportFailed) as info:
        import_customers(engine, path, chunk_rows=250, direct=direct, bulk_rows=bulk_rows)
    assert "row 2501, column 'customer_id': duplicate key 'K00009' (also on row 10)" in str(
        info.value
    )
    assert customer_rows(engine) == [(0,)]
    assert customer_constraints(engine) == before


@CUSTOMER_PATHS
def test_customer_reimport_adds_nothing(
    engine: Engine, tmp_path: Path, direct: bool, bulk_rows: int
) -> None:
    path = write_customers(tmp_path, customer_lines())
    first = import_customers(
        engine, path, chunk_rows=250, direct=direct, bulk_rows=bulk_rows, today=TODAY
    )
    assert (first.rows_read, first.added, first.updated) == (ROWS, ROWS, 0)
    loaded = customer_rows(engine)
    again = import_customers(
        engine, path, chunk_rows=250, direct=direct, bulk_rows=bulk_rows, today=TODAY
    )
    assert (again.added, again.updated, again.unchanged) == (0, 0, ROWS)
    assert customer_rows(engine) == loaded


@pytest.mark.parametrize("bulk_rows", [0, 1], ids=["direct", "direct-bulk"])
def test_direct_customer_load_is_taken_on_a_first_load_only(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk_rows: int
) -> None:
    taken: list[bool] = []
    original = importing._load_customers_directly

    def spy(*args: Any, **kwargs: Any) -> bool:
        taken.append(original(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(importing, "_load_customers_directly", spy)
    path = write_customers(tmp_path, customer_lines(500))
    before = customer_constraints(engine)
    chunks: list[int] = []
    import_customers(engine, path, chunk_rows=97, bulk_rows=bulk_rows, progress=chunks.append)
    assert sum(chunks) == 500 and max(chunks) == 97
    import_customers(engine, path, bulk_rows=bulk_rows)  # customers stored now: staged
    assert taken == ([True, False] if engine.dialect.name == "postgresql" else [False, False])
    assert customer_constraints(engine) == before


@pytest.mark.parametrize("bulk_rows", [0, 1], ids=["direct", "direct-bulk"])
def test_customer_stored_by_someone_else_during_a_first_load_is_merged(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk_rows: int
) -> None:
    """A customer of the file stored by another writer after the import found the table
    empty breaks the unique key: the import merges through the staging table instead."""
    path = write_customers(tmp_path, customer_lines(500))
    import_customers(engine, path, direct=False, today=TODAY)
    expected = customer_rows(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM customers WHERE external_id <> 'K00042'"))
        conn.execute(
            text(
                "UPDATE customers SET segment = NULL, attributes = '{}' WHERE external_id = 'K00042'"
            )
        )
    monkeypatch.setattr(importing, "_customers_stored", lambda conn: False)
    summary = import_customers(engine, path, bulk_rows=bulk_rows, today=TODAY)
    assert (summary.added, summary.updated) == (499, 1)
    stored = customer_rows(engine)
    assert stored[:500] == expected[:500]


@pytest.mark.parametrize("bulk_rows", [0, 1], ids=["direct", "direct-bulk"])
def test_customer_id_taken_by_someone_else_during_a_first_load(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bulk_rows: int
) -> None:
    """The direct load numbers its rows from a block of ids it takes from the sequence; a
    customer stored meanwhile with an id of that block breaks the primary key, and the
    import gives way to the staged path, which adds every row of the file."""
    path = write_customers(tmp_path, customer_lines(500))
    import_customers(engine, path, direct=False, today=TODAY)
    expected = customer_rows(engine)
    empty_customers(engine)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            taken = conn.execute(text("SELECT last_value + 7 FROM customers_id_seq")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO customers (id, external_id, attributes) "
                    "VALUES (:id, 'ZZ-OTHER', '{}')"
                ),
                {"id": taken},
            )
        monkeypatch.setattr(importing, "_customers_stored", lambda conn: False)
    tried: list[bool] = []
    original = importing._load_customers_directly

    def spy(*args: Any, **kwargs: Any) -> bool:
        tried.append(original(*args, **kwargs))
        return tried[-1]

    monkeypatch.setattr(importing, "_load_customers_directly", spy)
    summary = import_customers(engine, path, bulk_rows=bulk_rows, today=TODAY)
    assert tried == [False]  # on PostgreSQL: tried, and gave way
    assert (summary.added, summary.updated) == (500, 0)
    stored = customer_rows(engine)
    assert stored[:500] == expected[:500]
    if engine.dialect.name == "postgresql":
        assert stored[500][0] == "ZZ-OTHER"


# --------------------------------------------------------------------------- id lookup

LOOKUP_IDS = [
    "a",
    "ab",
    "abcdefgh",
    "abcdefghi",
    "ünïcödé-ïd",
    "x" * 64,
    "C1",
    "C10",
    "0",
    "1" * 16,
    "1" * 15,
]
LOOKUP_QUERIES = [
    *LOOKUP_IDS,
    "abcdefg",
    "abcdefghij",
    "x" * 65,
    "ünïcödé",
    "C100",
    "1" * 17,
    "A",
]


def test_id_lookup_finds_what_a_string_index_finds() -> None:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    rng = np.random.default_rng(0)
    known = [f"C{i:07d}" for i in rng.permutation(20_000)] + LOOKUP_IDS
    queries = [known[i] for i in rng.integers(0, len(known), 5_000)] + LOOKUP_QUERIES
    want = pd.Index(known).get_indexer(queries).tolist()
    lookup = importing.IdLookup(pa.array(known))
    # Chunked and large_string, and sliced (an offset into its buffers), as a file's
    # column can be.
    chunked = pa.chunked_array(
        [pa.array(queries[:100], pa.large_string()), pa.array(queries[100:], pa.large_string())]
    )
    assert lookup.positions(chunked).tolist() == want
    assert lookup.positions(pa.array(["zz", *queries])[1:]).tolist() == want
    assert importing.IdLookup(pa.array([], pa.string())).positions(pa.array(["a"])).tolist() == [-1]


def test_id_lookup_checks_matches_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    # Ids longer than the packed width are looked up as strings.
    long = importing.IdLookup(pa.array([*LOOKUP_IDS, "y" * 65]))
    assert long._strings is not None
    assert long.positions(pa.array(["y" * 65, "a", "zz"])).tolist() == [len(LOOKUP_IDS), 0, -1]
    # Keys that collide: a query matching a known id's key but not its bytes is not it,
    # and known ids whose keys collide send the lookup to the strings.
    monkeypatch.setattr(importing, "_folded", lambda words: words[:, 0] & 0xFF)
    one = importing.IdLookup(pa.array(["ab", "b"]))
    assert one._strings is None
    assert one.positions(pa.array(["ac", "ab", "bb", "b"])).tolist() == [-1, 0, -1, 1]
    both = importing.IdLookup(pa.array(["ab", "ac"]))
    assert both._strings is not None
    assert both.positions(pa.array(["ac", "ab", "ad"])).tolist() == [1, 0, -1]
