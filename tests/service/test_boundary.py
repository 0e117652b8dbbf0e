"""Every value a caller or a file sends is checked once, at the boundary (issue 13).

Findings 1, 2 and parts of 6 and 9: an attribute name that is SQL, dates pandas cannot
hold, infinite numbers, thousands of attributes, oversized lists and texts, lone
surrogates; each was stored (or answered 500) and then broke every later load of the
bank. The same rules hold for the HTTP API and the bulk importer (service.validation),
on SQLite and PostgreSQL. Concurrent updates of one customer lose nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from service.app import create_app
from service.auth import create_key
from service.data.db import make_engine, unit_of_work
from service.data.importing import (
    ImportFailed,
    SnapshotOptions,
    import_adoptions,
    import_customers,
    import_products,
    import_snapshots,
)
from service.settings import Settings

INJECTION = "a'||(SELECT pg_sleep(2))::text||'"
TODAY = dt.datetime.now(dt.UTC).date()
TOMORROW = (TODAY + dt.timedelta(days=1)).isoformat()
TABLES = ("products", "customers", "adoptions", "attribute_definitions")


@dataclass
class Api:
    client: TestClient
    engine: Engine
    keys: dict[str, str]

    def put_customer(self, customer: str, body: Any, key: str = "data") -> Any:
        # json.dumps escapes what httpx would refuse to encode (a lone surrogate).
        return self.put_raw(f"/v1/customers/{customer}", json.dumps(body).encode(), key)

    def put_raw(self, url: str, content: bytes, key: str) -> Any:
        headers = {**self.auth(key), "content-type": "application/json"}
        return self.client.put(url, content=content, headers=headers)

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(query), params).scalar()

    def counts(self) -> dict[str, int]:
        return {t: self.scalar(f"SELECT COUNT(*) FROM {t}") for t in TABLES}


@pytest.fixture
def make_api(database_url: str, tmp_path: Path) -> Iterator[Any]:
    engine = make_engine(database_url)
    with unit_of_work(engine) as session:
        keys = {
            "data": create_key(session, name="feed", scopes=["data"]),
            "catalogue": create_key(session, name="cat", scopes=["catalogue", "rules", "models"]),
            "reports": create_key(session, name="rep", scopes=["reports"]),
            "teller": create_key(session, name="teller", scopes=["decisions"]),
        }
    clients: list[TestClient] = []

    def start(**overrides: Any) -> Api:
        settings = Settings(database_url=database_url, data_dir=tmp_path, **overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return Api(client, engine, keys)

    yield start
    for client in clients:
        client.__exit__(None, None, None)
    engine.dispose()


def fields(response: Any) -> list[str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [error["field"] for error in response.json()["errors"]]


# ------------------------------------------------------------------ finding 1: names


def test_an_attribute_name_that_is_sql_is_refused_and_nothing_is_stored(make_api: Any) -> None:
    api = make_api()
    response = api.put_customer("C1", {"segment": "retail", "attributes": {INJECTION: 1}})
    assert fields(response) == [f"body.attributes.{INJECTION}.[key]"]
    assert api.counts() == dict.fromkeys(TABLES, 0)
    assert api.scalar("SELECT COUNT(*) FROM attribute_definitions") == 0


@pytest.mark.parametrize(
    "name",
    ["1st", "", "a b", "naïve", "x" * 64, "segment", "Birth_Date", "CUSTOMER_ID", "\ud800"],
)
def test_attribute_names_follow_the_importers_rule(make_api: Any, name: str) -> None:
    api = make_api()
    response = api.put_customer("C1", {"attributes": {name: 1}})
    assert fields(response)[0].startswith("body.attributes.")
    assert api.counts()["attribute_definitions"] == 0


def test_a_name_differing_only_in_case_is_refused(make_api: Any) -> None:
    api = make_api()
    assert api.put_customer("C1", {"attributes": {"income": 1}}).status_code == 201
    assert fields(api.put_customer("C2", {"attributes": {"Income": 2}})) == [
        "body.attributes.Income"
    ]
    assert api.scalar("SELECT COUNT(*) FROM attribute_definitions") == 1
    assert api.scalar("SELECT COUNT(*) FROM customers") == 1


def test_attributes_per_request_and_per_bank_are_capped(make_api: Any) -> None:
    api = make_api(max_attributes=5)
    many = {f"a{i}": i for i in range(201)}
    assert fields(api.put_customer("C1", {"attributes": many})) == ["body.attributes"]
    assert api.put_customer("C1", {"attributes": {f"a{i}": i for i in range(4)}}).status_code == 201
    # The fifth name fits; a sixth is refused by name, and nothing of that request is kept.
    assert api.put_customer("C1", {"attributes": {"a4": 4}}).status_code == 200
    over = api.put_customer("C2", {"segment": "x", "attributes": {"a0": 1, "b": 2}})
    assert fields(over) == ["body.attributes.b"] and "max_attributes" in over.json()["detail"]
    assert api.scalar("SELECT COUNT(*) FROM attribute_definitions") == 5
    assert api.scalar("SELECT COUNT(*) FROM customers") == 1
    # Attributes already defined can still be set and removed.
    again = api.put_customer("C2", {"attributes": {"a0": 7, "a1": None}})
    assert again.status_code == 201 and again.json()["attributes"] == {"a0": 7}


# ------------------------------------------------------------------ finding 2: poison pills


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"joined_at": "1542-08-08"}, "body.joined_at"),
        ({"joined_at": "9999-12-31"}, "body.joined_at"),
        ({"joined_at": "0001-01-01"}, "body.joined_at"),
        ({"birth_date": "1600-01-01"}, "body.birth_date"),
        ({"birth_date": TOMORROW}, "body.birth_date"),
        ({"attributes": {"balance": 1e308}}, "body.attributes.balance"),
        ({"attributes": {"balance": 10**30}}, "body.attributes.balance"),
        ({"attributes": {"note": "x" * 257}}, "body.attributes.note"),
        ({"attributes": {"note": [1]}}, "body.attributes.note"),
        ({"segment": "a\x00b"}, "body.segment"),
    ],
)
def test_a_customer_value_that_would_poison_the_bank_is_refused(
    make_api: Any, body: dict[str, Any], field: str
) -> None:
    api = make_api()
    response = api.put_customer("C1", body)
    assert fields(response) == [field], response.text
    assert api.counts() == dict.fromkeys(TABLES, 0)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"attributes": {"balance": 1e999}}',
        b'{"attributes": {"balance": NaN}}',
        b'{"attributes": {"balance": -Infinity}}',
        b'{"segment": "\\ud800"}',
        b'{"attributes": {"note": "\\udfff"}}',
        b'{"attributes": {"\\ud800": 1}}',
    ],
)
def test_json_that_python_parses_but_nothing_can_store_is_refused(
    make_api: Any, raw: bytes
) -> None:
    api = make_api()
    response = api.put_raw("/v1/customers/C1", raw, "data")
    assert fields(response)[0].startswith("body.")
    assert api.counts() == dict.fromkeys(TABLES, 0)


def test_plausible_values_are_kept(make_api: Any) -> None:
    api = make_api()
    body = {
        "joined_at": "1950-01-01",
        "birth_date": "1900-01-01",
        "attributes": {"balance": -1e15, "flag": True, "note": "ü" * 256},
    }
    response = api.put_customer("C1", body)
    assert response.status_code == 201, response.text
    assert response.json()["attributes"] == {"balance": -1e15, "flag": 1, "note": "ü" * 256}


def _product(api: Any, **body: Any) -> Any:
    return api.client.put("/v1/products/P1", json=body, headers=api.auth("catalogue"))


def test_adoptions_with_implausible_dates_are_refused(make_api: Any) -> None:
    api = make_api()
    assert api.put_customer("C1", {}).status_code == 201
    assert _product(api, name="Card").status_code == 201
    before = api.counts()
    for adoption, field in [
        ({"adopted_at": "0001-01-01"}, "body.adoptions.0.adopted_at"),
        ({"adopted_at": "1542-08-08"}, "body.adoptions.0.adopted_at"),
        ({"adopted_at": "2020-01-01", "closed_at": "9999-12-31"}, "body.adoptions.0.closed_at"),
        ({"adopted_at": "2020-01-01", "closed_at": TOMORROW}, "body.adoptions.0.closed_at"),
    ]:
        item = {"customer_id": "C1", "product_code": "P1", **adoption}
        response = api.client.post(
            "/v1/adoptions", json={"adoptions": [item]}, headers=api.auth("data")
        )
        assert fields(response) == [field], response.text
    assert api.counts() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "value": 1e308}, "body.value"),
        ({"name": "x", "value": "inf"}, "body.value"),
        ({"name": "x", "business_weight": "Infinity"}, "body.business_weight"),
        ({"name": "x", "business_weight": "NaN"}, "body.business_weight"),
        ({"name": "x", "min_age": 2**70}, "body.min_age"),
        ({"name": "x", "segments": [f"s{i}" for i in range(101)]}, "body.segments"),
        ({"name": "x", "requires": ["bad code"]}, "body.requires.0"),
        ({"name": "\ud800"}, "body.name"),
    ],
)
def test_a_product_value_that_would_poison_arbitration_is_refused(
    make_api: Any, body: dict[str, Any], field: str
) -> None:
    api = make_api()
    raw = json.dumps(body).encode()
    assert fields(api.put_raw("/v1/products/P1", raw, "catalogue")) == [field]
    assert api.counts()["products"] == 0


def test_decision_context_is_bounded(make_api: Any) -> None:
    api = make_api()
    url = "/v1/customers/C1/decisions"

    def decide(context: dict[str, str]) -> Any:
        body = {"channel": "branch", "context": context}
        return api.client.post(url, json=body, headers=api.auth("teller"))

    assert fields(decide({f"k{i}": "v" for i in range(21)})) == ["body.context"]
    assert fields(decide({"reason": "x" * 257})) == ["body.context.reason"]
    assert fields(decide({"k" * 65: "v"}))[0].startswith("body.context.")
    assert decide({"reason": "address change"}).status_code != 422


@pytest.mark.parametrize("key", ["NaN", "null", "None", "NaT", "na", "%20C1", "C1%20"])
def test_a_key_the_loader_reads_as_missing_is_refused(make_api: Any, key: str) -> None:
    # Found while fuzzing: the bank is loaded through pandas, which strips keys and reads
    # "NaN" or "null" as missing; one customer so named stopped every later load.
    api = make_api()
    assert fields(api.put_raw(f"/v1/customers/{key}", b"{}", "data")) == ["path.customer_id"]
    assert fields(api.put_raw(f"/v1/products/{key}", b'{"name": "x"}', "catalogue")) == [
        "path.code"
    ]
    assert api.counts() == dict.fromkeys(TABLES, 0)


@pytest.mark.parametrize("key", ["NaN", "null", "%20C1"])
def test_decisions_and_feedback_refuse_a_key_no_import_could_hold(make_api: Any, key: str) -> None:
    # With cold start on, such an id was decided for and recorded like any other.
    api = make_api(cold_start=True)
    url = f"/v1/customers/{key}/decisions"
    answer = api.client.post(url, json={"channel": "branch"}, headers=api.auth("teller"))
    assert fields(answer) == ["path.customer_id"]
    with unit_of_work(api.engine) as session:
        outcomes = create_key(session, name="outcomes", scopes=["outcomes"])
    feedback = api.client.post(
        "/v1/feedback",
        json={"kind": "nps", "score": 9, "customer_id": key.replace("%20", " ")},
        headers={"Authorization": f"Bearer {outcomes}"},
    )
    assert fields(feedback) == ["body.customer_id"]
    assert api.scalar("SELECT count(*) FROM decisions") == 0


# ------------------------------------------------------------------ finding 9: 500s


def test_uplift_confidence_too_close_to_one_is_a_422_not_a_500(make_api: Any) -> None:
    api = make_api()
    params = {"start": "2026-01-01", "end": "2026-01-31"}

    def uplift(**extra: str) -> Any:
        return api.client.get(
            "/v1/reports/uplift", params={**params, **extra}, headers=api.auth("reports")
        )

    assert fields(uplift(confidence="0.9999999999999999")) == ["query.confidence"]
    assert fields(uplift(start="0001-01-01")) == ["query.start"]
    assert fields(uplift(end="9999-12-31")) == ["query.end"]
    assert uplift(confidence="0.9999").status_code == 200


def test_a_product_write_answers_even_when_the_reload_after_it_fails(make_api: Any) -> None:
    # What schemathesis saw: a stored customer the catalogue reload cannot read turned a
    # committed product write into a 500. The write answers what happened to it.
    api = make_api()
    with api.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (external_id, joined_at, attributes) "
                "VALUES ('OLD', '1542-08-08', '{}')"
            )
        )
    response = _product(api, name="Only a name")
    assert response.status_code == 201, response.text
    assert api.scalar("SELECT name FROM products WHERE code = 'P1'") == "Only a name"


@pytest.mark.parametrize(
    ("method", "url", "key", "field"),
    [
        ("PUT", "/v1/customers/" + "x" * 129, "data", "path.customer_id"),
        ("PUT", "/v1/customers/C%00", "data", "path.customer_id"),
        ("GET", "/v1/products/a%20b", "catalogue", "path.code"),
        ("GET", "/v1/products/" + "p" * 65, "catalogue", "path.code"),
        ("PUT", "/v1/products/a%00", "catalogue", "path.code"),
        ("POST", "/v1/models/v%00/activate", "catalogue", "path.version"),
        ("GET", "/v1/rules?consequent=a%00", "catalogue", "query.consequent"),
        ("GET", "/v1/rules?min_lift=nan", "catalogue", "query.min_lift"),
        ("GET", "/v1/reports/staff/S%00/daily", "reports", "path.staff_id"),
        ("GET", "/v1/reports/branches/B%00/daily", "reports", "path.branch_id"),
        ("GET", "/v1/reports/branches/B1/daily?day=0001-01-03", "reports", "query.day"),
        (
            "GET",
            "/v1/reports/conversion?start=2026-01-01&end=2026-01-02&adoption_window_days="
            + "9" * 30,
            "reports",
            "query.adoption_window_days",
        ),
    ],
)
def test_hostile_path_and_query_values_are_422s(
    make_api: Any, method: str, url: str, key: str, field: str
) -> None:
    api = make_api()
    body = ({} if "customers" in url else {"name": "x"}) if method == "PUT" else None
    response = api.client.request(method, url, json=body, headers=api.auth(key))
    assert fields(response) == [field], response.text


# ------------------------------------------------------------------ finding 6: lost updates


def test_concurrent_puts_of_one_new_customer_lose_nothing(make_api: Any) -> None:
    api = make_api()

    def put(i: int) -> int:
        body = {"attributes": {f"a{i}": i, "shared": i}}
        return int(api.put_customer("C1", body).status_code)

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(put, range(40)))
    assert sorted(statuses) == [200] * 39 + [201]
    attributes = api.client.put("/v1/customers/C1", json={}, headers=api.auth("data")).json()[
        "attributes"
    ]
    assert {f"a{i}" for i in range(40)} <= set(attributes)
    assert all(attributes[f"a{i}"] == i for i in range(40))
    assert api.scalar("SELECT COUNT(*) FROM attribute_definitions") == 41
    assert api.scalar("SELECT COUNT(*) FROM customers") == 1


# ------------------------------------------------------------------ the importer: same rules


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body.lstrip())
    return path


def import_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}


def refused(engine: Engine, run: Any, *fragments: str) -> None:
    before = import_counts(engine)
    with pytest.raises(ImportFailed) as info:
        run()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert import_counts(engine) == before, "a refused import wrote something"


def test_import_refuses_the_names_the_api_refuses(engine: Engine, tmp_path: Path) -> None:
    sql = write(tmp_path, "sql.csv", f'customer_id,"{INJECTION}"\nC1,1\n')
    refused(engine, lambda: import_customers(engine, sql), "invalid attribute name")
    fixed = write(tmp_path, "fixed.csv", "customer_id,Segment\nC1,x\n")
    refused(engine, lambda: import_customers(engine, fixed), "is a fixed customer column")
    long = write(tmp_path, "long.csv", f"customer_id,{'x' * 64}\nC1,1\n")
    refused(engine, lambda: import_customers(engine, long), "invalid attribute name")
    cased = write(tmp_path, "cased.csv", "customer_id,income,Income\nC1,1,2\n")
    refused(engine, lambda: import_customers(engine, cased), "differs only in case")


def test_import_refuses_keys_the_loader_reads_as_missing(engine: Engine, tmp_path: Path) -> None:
    products = write(tmp_path, "products.csv", "product_code,name,category,value\nNaN,x,c,1\n")
    refused(engine, lambda: import_products(engine, products), "row 1, column 'product_code'")
    customers = write(tmp_path, "customers.csv", "customer_id\nC1\nNaT\n")
    refused(engine, lambda: import_customers(engine, customers), "row 2, column 'customer_id'")


def test_import_caps_the_number_of_attributes(engine: Engine, tmp_path: Path) -> None:
    three = write(tmp_path, "three.csv", "customer_id,a,b,c\nC1,1,2,3\n")
    import_customers(engine, three, max_attributes=3)
    four = write(tmp_path, "four.csv", "customer_id,a,d\nC2,1,2\n")
    refused(
        engine,
        lambda: import_customers(engine, four, max_attributes=3),
        "column 'd': too many attributes",
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("customer_id,joined_at\nC1,2020-01-01\nC2,1542-08-08\n", "row 2, column 'joined_at'"),
        ("customer_id,joined_at\nC1,9999-12-31\n", "row 1, column 'joined_at'"),
        ("customer_id,birth_date\nC1,1600-01-01\n", "row 1, column 'birth_date'"),
        (f"customer_id,birth_date\nC1,{TOMORROW}\n", "is in the future"),
        ("customer_id,balance\nC1,1\nC2,inf\n", "row 2, column 'balance': must be a finite"),
        ("customer_id,balance\nC1,1e308\n", "row 1, column 'balance': must be between"),
        (f"customer_id,note\nC1,{'x' * 257}\n", "row 1, column 'note': longer than 256"),
        (f"customer_id,segment\nC1,{'x' * 65}\n", "row 1, column 'segment': longer than 64"),
    ],
)
def test_import_refuses_customer_values_the_api_refuses(
    engine: Engine, tmp_path: Path, body: str, fragment: str
) -> None:
    path = write(tmp_path, "customers.csv", body)
    refused(engine, lambda: import_customers(engine, path), fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("1e400,1", "row 1, column 'value': must be a finite number"),
        ("1e16,1", "row 1, column 'value': must be between"),
        ("1,inf", "row 1, column 'business_weight': must be a finite number"),
    ],
)
def test_import_refuses_product_numbers_the_api_refuses(
    engine: Engine, tmp_path: Path, body: str, fragment: str
) -> None:
    path = write(
        tmp_path,
        "products.csv",
        f"product_code,name,category,value,business_weight\nP1,x,c,{body}\n",
    )
    refused(engine, lambda: import_products(engine, path), fragment)


def test_import_refuses_implausible_adoption_and_snapshot_dates(
    engine: Engine, tmp_path: Path
) -> None:
    products = write(tmp_path, "products.csv", "product_code,name,category,value\nP1,x,c,1\n")
    import_products(engine, products)
    import_customers(engine, write(tmp_path, "customers.csv", "customer_id\nC1\n"))
    for row, fragment in [
        ("C1,P1,0001-01-01,", "row 1, column 'adopted_at': date 0001-01-01 is before 1900"),
        ("C1,P1,2020-01-01,9999-12-31", "row 1, column 'closed_at': date 9999-12-31 is in the"),
    ]:
        path = write(
            tmp_path, "adoptions.csv", f"customer_id,product_code,adopted_at,closed_at\n{row}\n"
        )
        refused(engine, lambda path=path: import_adoptions(engine, path), fragment)
    snapshots = write(tmp_path, "snapshots.csv", "customer_id,snapshot_date,P1\nC1,1542-08-28,1\n")
    options = SnapshotOptions(product_columns=("P1",))
    refused(
        engine,
        lambda: import_snapshots(engine, snapshots, options),
        "row 1, column 'snapshot_date': date 1542-08-28 is before 1900-01-01",
    )
