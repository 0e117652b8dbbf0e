"""Reasons worth saying, through the real decision API on SQLite and PostgreSQL.

A table of customers of a small trained bank is decided on, and every offer's reason
is checked against what it is computed from: a rule is one with a lift above 1 and
enough customers that applies to the customer, the best by lift; a profile claim prints
the multiplier it records, rounded down, to a customer the model puts above the base
rate; otherwise nothing is claimed. The audit rows hold the same reasons, and a replay
rebuilt from them (another worker) answers the same words.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from models.artifacts import load_bundle, save_bundle
from models.data import BankData
from models.propensity import PropensityModel, TrainConfig
from models.propensity.training import train
from models.reasons import MIN_CUSTOMERS, MIN_RATIO, multiplier_text
from models.rules import REASON_MIN_CUSTOMERS
from models.synthetic import generate_bank, write_bank
from service.app import create_app
from service.decision.state import SequencePitches, ServingState
from service.settings import Settings
from tests.bank import AS_OF, load_trained_bank

CUSTOMERS = [f"C{i:07d}" for i in range(1, 601)]
NEUTRAL = "{name}: ask whether it would be useful to them."


@dataclass(frozen=True)
class Trained:
    bank: Path
    bundle: Path
    model: PropensityModel
    data: BankData


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("reasons")
    write_bank(generate_bank(1_500, seed=5), root / "bank")
    data = BankData.from_folder(root / "bank")
    model = train(data, as_of=AS_OF, config=TrainConfig(max_rounds=60))
    save_bundle(model, root / "bundle", metrics={"map@3": 0.3})
    return Trained(root / "bank", root / "bundle", load_bundle(root / "bundle"), data)


@pytest.fixture
def start(database_url: str, trained: Trained, tmp_path: Path) -> Iterator[Any]:
    keys = load_trained_bank(
        database_url, trained.bank, trained.bundle, tmp_path, keys={"teller": ["decisions"]}
    )
    clients: list[TestClient] = []
    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path,
        control_share=0.0,
        min_propensity=0.0,
        frequency_cap=1_000_000,
        max_offers_per_contact=10,
        poll_interval_seconds=60.0,
    )

    def started() -> tuple[TestClient, dict[str, str]]:
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client, {"Authorization": f"Bearer {keys['teller']}"}

    yield started
    for client in clients:
        client.__exit__(None, None, None)


def _decide(client: TestClient, auth: dict[str, str], customer: str, **body: Any) -> Any:
    response = client.post(
        f"/v1/customers/{customer}/decisions",
        json={"channel": "branch", "max_offers": 10, **body},
        headers={**auth, "Idempotency-Key": f"reasons-{customer}-{body.get('explain', False)}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _sequences(data: BankData, as_of: dt.date) -> dict[str, tuple[str, ...]]:
    frame = data.adoptions[data.adoptions["adopted_at"] < pd.Timestamp(as_of)]
    frame = frame.sort_values(["customer_id", "adopted_at", "product_code"], kind="stable")
    return {
        str(cid): tuple(dict.fromkeys(group["product_code"].astype(str)))
        for cid, group in frame.groupby("customer_id", sort=False)
    }


def _check_offer(
    offer: dict[str, Any],
    sequence: tuple[str, ...],
    trained: Trained,
    serving: ServingState,
    customer: str,
) -> str:
    """Check one offer's reason against what it is computed from; returns its kind."""
    model = trained.model
    code, name = offer["product_code"], offer["product_name"]
    reasons, line = offer["reasons"], offer["talking_point"]
    worthy = model.rules.reasons_for(sequence) if model.rules is not None else {}
    if reasons["rule"] is not None:
        rule = worthy[code]
        assert rule.lift > 1 and rule.n_customers >= REASON_MIN_CUSTOMERS
        assert reasons["rule"] == model.rule_sentence(rule)
        assert reasons["rule_lift"] == round(rule.lift, 3) and reasons["rule_lift"] > 1
        assert reasons["rule_confidence"] == round(rule.confidence, 4)
        assert reasons["profile"] is None and reasons["profile_lift"] is None
        assert line == f"{name}: {rule_said(reasons['rule'])}."
        return "rule"
    assert code not in worthy, (customer, code)
    assert reasons["rule_lift"] is None and reasons["rule_confidence"] is None
    if reasons["profile"] is not None:
        lift = reasons["profile_lift"]
        assert lift >= MIN_RATIO
        shown = re.search(r" ([0-9.]+)\N{MULTIPLICATION SIGN} as often", reasons["profile"])
        assert shown is not None, reasons["profile"]
        printed = float(shown.group(1))
        assert printed == (math.floor(lift) if lift >= 10 else math.floor(lift * 10) / 10)
        assert multiplier_text(lift) in line and reasons["profile"] in line
        # The model puts the customer above the product's base rate.
        base = {p.product_code: p.base_rate for p in model.products}[code]
        assert offer["propensity"] >= round(base, 6)
        # The ratio is the take-up of the customer's group over that of everyone.
        snapshot = serving.snapshot
        assert snapshot is not None and snapshot.profiles is not None
        profiles = snapshot.profiles
        bands = profiles.bands_of(snapshot.customers[customer].state)
        claim = profiles.claim(code, profiles.key(code, bands) or ())
        assert claim is not None and claim.n_customers >= MIN_CUSTOMERS
        assert lift == round(claim.ratio, 3) == round(claim.rate / claim.overall, 3)
        return "profile"
    assert reasons["profile_lift"] is None
    assert line == NEUTRAL.format(name=name)
    return "nothing"


def rule_said(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def test_every_reason_shown_is_true_and_replays_the_same(
    start: Any, trained: Trained, database_url: str
) -> None:
    client, auth = start()
    serving: ServingState = client.app.state.serving  # type: ignore[attr-defined]
    assert serving.snapshot is not None
    sequences = _sequences(trained.data, serving.snapshot.as_of)
    model = trained.model
    assert model.rules is not None
    kinds: Counter[str] = Counter()
    answers = {}
    for customer in CUSTOMERS:
        answer = _decide(client, auth, customer)
        answers[customer] = answer
        sequence = sequences.get(customer, ())
        best = model.rules.best_rules(sequence)
        for offer in answer["offers"]:
            assert offer["reasons"]["factors"] == []
            kind = _check_offer(offer, sequence, trained, serving, customer)
            kinds[kind] += 1
            weak = best.get(offer["product_code"])
            if weak is not None and weak.lift <= 1:
                # The case: before, this rule was said; now never.
                assert offer["reasons"]["rule"] != model.rule_sentence(weak)
                kinds[f"weak rule withheld, {kind} said"] += 1
    # Every kind of answer is in the table, or it proves less than it says.
    assert kinds["rule"] and kinds["profile"] and kinds["nothing"], kinds
    assert kinds["weak rule withheld, nothing said"] + kinds["weak rule withheld, profile said"]

    # With explain, the same words, and the model's factors listed besides.
    explained = [c for c in CUSTOMERS if answers[c]["offers"]][:15]
    factors = 0
    for customer in explained:
        lean = answers[customer]["offers"]
        full = _decide(client, auth, customer, explain=True)["offers"]
        assert [o["product_code"] for o in full] == [o["product_code"] for o in lean]
        for a, b in zip(lean, full, strict=True):
            assert b["talking_point"] == a["talking_point"]
            assert {**b["reasons"], "factors": []} == a["reasons"]
            factors += len(b["reasons"]["factors"])
    assert factors  # (a product scored by its base rate alone has none)

    # The audit rows hold the reasons answered.
    ids = {o["offer_id"]: o["reasons"] for a in answers.values() for o in a["offers"]}
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, reasons FROM offers")).all()
    finally:
        engine.dispose()
    stored = {r[0]: r[1] if isinstance(r[1], dict) else json.loads(r[1]) for r in rows}
    assert {k: stored[k] for k in ids} == ids

    # Another worker rebuilds keyed answers from those rows: the same reasons and words.
    other, _ = start()
    replayed = [c for c in CUSTOMERS if answers[c]["offers"]][:60]
    for customer in replayed:
        again = _decide(other, auth, customer)
        assert again["decision_id"] == answers[customer]["decision_id"]
        assert again["offers"] == answers[customer]["offers"]


def test_the_reason_rules_the_store_holds_are_the_ones_found_from_the_sequence(
    start: Any,
) -> None:
    """The serving store keeps each distinct adoption sequence's reason rules (found when
    it was built, in the child process): the pitches a worker makes from them are those
    found from the sequence, in the same order; a store whose terms differ is not used."""
    client, _ = start()
    snapshot = client.app.state.serving.snapshot  # type: ignore[attr-defined]
    store = snapshot.customers.store
    assert store is not None and store.reasons is not None
    stored = snapshot._stored_pitches(store)
    assert stored is not None and len(stored) == len(store.sequences) > 50
    assert [list(d.items()) for d in snapshot.customers.sequence_pitches] == [
        list(d.items()) for d in stored
    ]
    said = 0
    for i, sequence in enumerate(store.sequences):
        found = snapshot._sequence_pitches(sequence)
        assert list(stored[i].items()) == list(found.items()), sequence
        said += len(found)
    assert said > 20
    store.reasons = {**store.reasons, "min_lift": -1.0}
    assert snapshot._stored_pitches(store) is None


def test_a_sequences_pitches_are_made_when_a_decision_first_needs_them(start: Any) -> None:
    """A load makes no sequence's pitches (they were a quarter of an activation's work
    beside the requests); the first decision about a customer on a path makes that
    path's, from the reason rules the store holds, equal to those found from the
    sequence, and keeps them for the next."""
    client, auth = start()
    snapshot = client.app.state.serving.snapshot  # type: ignore[attr-defined]
    pitches = snapshot.customers.sequence_pitches
    store = snapshot.customers.store
    assert isinstance(pitches, SequencePitches) and store is not None
    assert len(pitches) == len(store.sequences) > 50
    assert all(slot is None for slot in pitches.made)
    said = 0
    for customer in CUSTOMERS[:150]:
        answer = _decide(client, auth, customer)
        sequence = int(store.sequence[store.find(customer)])
        made = pitches.made[sequence]
        assert made is not None and pitches[sequence] is made
        assert list(made.items()) == list(
            snapshot._sequence_pitches(store.sequences[sequence]).items()
        )
        rules = [o["reasons"] for o in answer["offers"] if o["product_code"] in made]
        said += len(rules)
    assert said > 5
    assert sum(slot is not None for slot in pitches.made) < len(pitches)
