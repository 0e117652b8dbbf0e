"""The serving store: what it holds equals what the batch load read, one process of a
machine builds it and the others map it, and customers changed since it was built are
read again rather than served from it."""

from __future__ import annotations

import datetime as dt
import mmap
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, event, text

from models.artifacts import save_bundle
from models.data import BankData, to_ns
from models.eligibility import Catalogue
from models.propensity import TrainConfig
from models.propensity.training import train
from models.reasons import ProfileRates
from models.synthetic import generate_bank, write_bank
from service import child
from service.data import registry
from service.data.db import unit_of_work
from service.data.events import record_event
from service.decision import sharing, window
from service.decision import state as serving
from service.decision import store as columns
from service.decision.contacts import ContactBook
from service.decision.state import Customers, ServingState, customer_states
from service.settings import Settings
from tests.bank import load_trained_bank, register_bundle

AS_OF = dt.date(2026, 1, 1)
TINY = TrainConfig(n_cutoffs=2, max_rounds=20, rules=True, num_threads=1)
FINGERPRINT = columns.Fingerprint(0, None, 0, 0, 0, 0, 0, 0)


def _sequence(state: Any, as_of: dt.date) -> tuple[str, ...]:
    """A customer's adoption sequence as :meth:`Snapshot.pitches` makes it from a state."""
    cutoff = to_ns(as_of)
    ordered = sorted(
        (to_ns(a.adopted_at), a.product_code)
        for a in state.adoptions
        if to_ns(a.adopted_at) < cutoff
    )
    return tuple(dict.fromkeys(code for _, code in ordered))


@pytest.fixture(scope="module")
def synthetic() -> BankData:
    bank = generate_bank(300, seed=3, offers_per_month=0.3)
    return BankData.from_frames(
        bank.products, bank.customers, bank.adoptions, outcomes=bank.outcomes
    )


def _write_store(data: BankData, folder: Path) -> dict[str, Any]:
    """A store of ``data`` written to ``folder``, with random propensities (30 % not a
    candidate) and one customer left without a database id (the fifth); what went in."""
    catalogue = Catalogue.from_data(data)
    cids = data.customers["customer_id"].astype(str).tolist()
    rng = np.random.default_rng(0)
    matrix = rng.random((len(cids), len(catalogue.product_codes)))
    matrix[matrix < 0.3] = np.nan
    codes = catalogue.product_codes
    profiles = ProfileRates.measure(
        data, as_of=AS_OF, columns={c: ("age", "segment", "tenure_days") for c in codes}
    )
    bands = profiles.bands(data)
    db_ids = {cid: 1000 + i for i, cid in enumerate(cids) if i != 5}  # one without an id
    popularity = serving._popularity(data, AS_OF)
    columns.write_store(
        folder,
        data=data,
        db_ids=db_ids,
        matrix=matrix,
        as_of=AS_OF,
        catalogue=catalogue,
        popularity=popularity,
        profiles=profiles,
        bands=bands,
        built=FINGERPRINT,
    )
    return {
        "cids": cids,
        "catalogue": catalogue,
        "matrix": matrix,
        "profiles": profiles,
        "bands": bands,
        "db_ids": db_ids,
        "popularity": popularity,
    }


def test_the_store_holds_what_the_batch_load_read(synthetic: BankData, tmp_path: Path) -> None:
    data = synthetic
    made = _write_store(data, tmp_path / "s")
    cids, catalogue, matrix = made["cids"], made["catalogue"], made["matrix"]
    profiles, bands, db_ids = made["profiles"], made["bands"], made["db_ids"]
    popularity, codes = made["popularity"], catalogue.product_codes
    store = columns.ColumnStore(tmp_path / "s")
    states = customer_states(data)
    assert store.n == len(cids) - 1 and store.find(cids[5]) == -1
    assert store.find("nobody") == -1 and store.find("") == -1 and store.find("C" * 500) == -1
    assert store.as_of == AS_OF and store.popularity == popularity
    assert store.catalogue.to_records() == catalogue.to_records()
    assert any(s.outcomes for s in states.values())  # the outcome columns are exercised
    for i, cid in enumerate(cids):
        if i == 5:
            continue
        row = store.find(cid)
        assert row >= 0 and store.external_id(row) == cid
        assert int(store.db_ids[row]) == db_ids[cid]
        assert store.state(row) == states[cid], cid
        np.testing.assert_array_equal(store.propensity(row), matrix[i].astype(np.float32))
        assert store.propensity(row).dtype == np.float32
        assert store.sequences[int(store.sequence[row])] == _sequence(states[cid], AS_OF)
        assert store.band_table[int(store.band[row])] == tuple(bands[i].tolist())
        assert store.segment_of(row) == states[cid].segment
    assert list(store.external_ids()) == sorted(c for i, c in enumerate(cids) if i != 5)
    # The profile claims come back as measured.
    again = store.profiles
    assert again is not None and again.columns == profiles.columns
    for code in codes:
        for band in store.band_table:
            key = profiles.key(code, band)
            assert again.key(code, band) == key
            if key is not None:
                assert again.claim(code, key) == profiles.claim(code, key)


def _locked_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmLck:")[1].split()[0])


def _may_lock(nbytes: int) -> bool:
    """Whether this process may lock ``nbytes`` more: CAP_IPC_LOCK, or room under
    RLIMIT_MEMLOCK."""
    import resource

    status = Path("/proc/self/status").read_text()
    if int(status.split("CapEff:")[1].split()[0], 16) >> 14 & 1:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or _locked_kib() * 1024 + nbytes + 2**20 < soft


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_serving_store_is_kept_in_memory_locked_or_populated(
    synthetic: BankData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    _write_store(synthetic, tmp_path / "s")
    store = columns.ColumnStore(tmp_path / "s")
    mapped = sum(a.nbytes for a in store._mapped)
    before = _locked_kib()
    if _may_lock(mapped):
        assert store.keep_in_memory() == "locked"
        # Every mapped page counted (a page may hold the end of one array and the
        # start of the next, hence the slack).
        assert _locked_kib() - before >= mapped // 1024 - 4 * len(store._mapped)
    else:
        assert store.keep_in_memory() == "populated"
    # Replaced, it gives its pages back, and still answers a request that holds it.
    first = store.external_id(0)
    store.let_go()
    assert store.kept == "mapped" and _locked_kib() == before
    assert store.find(first) == 0
    # Not asked to lock: only brought in, nothing more locked.
    other = columns.ColumnStore(tmp_path / "s")
    locked = _locked_kib()
    assert other.keep_in_memory(lock=False) == "populated"
    assert _locked_kib() == locked
    del other

    # A refused lock (a limit too low, no CAP_IPC_LOCK) is said once, and the pages are
    # brought in all the same; a kernel without MADV_POPULATE_READ: left mapped.
    class Refusing:
        def __init__(self, madvise: int) -> None:
            self.calls: list[str] = []
            self._madvise = madvise

        def mlock(self, start: int, size: int) -> int:
            self.calls.append("mlock")
            return -1

        def madvise(self, start: int, size: int, advice: int) -> int:
            assert start % mmap.PAGESIZE == 0
            self.calls.append("madvise")
            return self._madvise

        def mincore(self, start: int, size: int, pages: int) -> int:
            return -1  # cannot tell: the files are read through

    refusing = Refusing(madvise=0)
    monkeypatch.setattr(columns, "_libc", lambda: refusing)
    third = columns.ColumnStore(tmp_path / "s")
    with caplog.at_level("WARNING", logger=columns.log.name):
        assert third.keep_in_memory() == "populated"
    warnings = [r for r in caplog.records if "could not be locked" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    arrays = sum(1 for a in third._mapped if a.nbytes)
    assert refusing.calls == ["mlock"] + ["madvise"] * arrays
    old = Refusing(madvise=-1)
    monkeypatch.setattr(columns, "_libc", lambda: old)
    assert columns.ColumnStore(tmp_path / "s").keep_in_memory() == "mapped"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise, mincore")
def test_a_store_file_is_read_through_only_when_the_page_cache_lacks_some_of_it(
    synthetic: BankData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _write_store(synthetic, tmp_path / "s")
    files = sorted((tmp_path / "s").glob("*.npy"))
    assert all(columns._cached(path) for path in files)  # just written
    store = columns.ColumnStore(tmp_path / "s")  # mapped (its headers read)
    dropped = max(files, key=lambda path: path.stat().st_size)
    with dropped.open("rb+") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages go
    if columns._cached(dropped):
        pytest.skip("the page cache kept the file's pages")
    read: list[str] = []
    opened = Path.open

    def counting(self: Path, mode: str = "r", buffering: int = -1, *a: Any, **k: Any) -> Any:
        if buffering == 0:
            read.append(self.name)
        return opened(self, mode, buffering, *a, **k)

    monkeypatch.setattr(Path, "open", counting)
    store.keep_in_memory(lock=False)
    assert read == [dropped.name]
    assert columns._cached(dropped)  # read through: the page cache holds it again
    columns.ColumnStore(tmp_path / "s").keep_in_memory(lock=False)
    assert read == [dropped.name]  # nothing read the second time


def test_one_process_builds_and_the_others_wait_for_it(tmp_path: Path) -> None:
    built: list[int] = []
    source = tmp_path / "source"

    def build(folder: Path) -> None:
        built.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the others to find the lock held
        _write_tiny_store(folder)

    found: list[columns.ColumnStore] = []

    def open_it() -> None:
        store, _ = columns.open_or_build(source, "k", build=build, usable=lambda s: True)
        found.append(store)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(found) == 4
    assert all(s.n == 2 and s.find("B") == 1 for s in found)
    assert [p.name for p in source.iterdir() if p.is_dir()] == ["k"]
    # A store the caller finds out of date is built again, in place.
    store, again = columns.open_or_build(source, "k", build=build, usable=lambda s: False)
    assert again and len(built) == 2 and store.n == 2
    assert found[0].find("A") == 0  # a store mapped before stays readable


def test_a_built_store_is_on_disk_before_it_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a power loss the store must be whole or absent: every file and the build
    # folder synced while still in the build folder, then the rename synced too.
    synced: list[str] = []
    real_fsync = columns.os.fsync

    def fsync(fd: int) -> None:
        synced.append(columns.os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(columns.os, "fsync", fsync)
    source = tmp_path / "source"
    store, built = columns.open_or_build(
        source, "k", build=_write_tiny_store, usable=lambda s: True
    )
    assert built and store.n == 2
    in_scratch = [Path(s) for s in synced if Path(s).parent.name.startswith(".build-k-")]
    assert sorted(p.name for p in in_scratch) == sorted(p.name for p in (source / "k").iterdir())
    # Then the build folder itself, then (after the rename) the folder it went into.
    assert Path(synced[-2]).name.startswith(".build-k-")
    assert synced[-1] == str(source.resolve())


def _write_tiny_store(folder: Path) -> None:
    """A store of the two customers of :func:`_tiny_frames`, written into ``folder``."""
    data = BankData.from_frames(*_tiny_frames())
    catalogue = Catalogue.from_data(data)
    columns.write_store(
        folder,
        data=data,
        db_ids={"A": 1, "B": 2},
        matrix=np.zeros((2, len(catalogue.product_codes))),
        as_of=AS_OF,
        catalogue=catalogue,
        popularity={None: Counter()},
        profiles=None,
        bands=None,
        built=FINGERPRINT,
    )


def _tiny_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    products = pd.DataFrame(
        {"product_code": ["p1", "p2"], "name": ["P1", "P2"], "category": ["c", "c"]}
        | {"value": [1.0, 2.0]}
    )
    customers = pd.DataFrame(
        {
            "customer_id": ["B", "A"],
            "segment": ["s", None],
            "branch_id": [None, "b"],
            "joined_at": ["2020-01-01", None],
            "birth_date": [None, "1980-05-05"],
        }
    )
    adoptions = pd.DataFrame(
        {"customer_id": ["A"], "product_code": ["p1"], "adopted_at": ["2021-01-01"]}
    )
    return products, customers, adoptions


# --------------------------------------------------------------------------- served


@dataclass(frozen=True)
class Trained:
    bank: Path
    bundle: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("store")
    write_bank(generate_bank(300, seed=5), root / "bank")
    data = BankData.from_folder(root / "bank")
    save_bundle(train(data, as_of=AS_OF, config=TINY), root / "bundle", metrics={"map@3": 0.3})
    return Trained(root / "bank", root / "bundle")


@pytest.fixture
def bank(engine: Engine, trained: Trained, tmp_path: Path) -> Iterator[Engine]:
    load_trained_bank(engine, trained.bank, trained.bundle, tmp_path)
    yield engine


def settings_for(engine: Engine, data_dir: Path) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        data_dir=data_dir,
        min_propensity=0.0,
        control_share=0.0,
        announce_offers="never",
    )


def run(engine: Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def answers(snapshot: serving.Snapshot, customer: str) -> tuple[Any, ...]:
    entry = snapshot.customers[customer]
    ranking = snapshot.arbiter.rank(
        entry.propensity,  # type: ignore[arg-type]
        history=None,
        now=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        limit=3,
    )
    codes = tuple(c.product_code for c in ranking.offers)
    said = snapshot.pitches(entry)
    return codes, tuple(said[c].reasons_json if c in said else None for c in codes)


class Builds:
    """Counts the serving stores written (each reads the whole bank)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = serving.write_serving_store

        def counted(*args: Any, **kwargs: Any) -> None:
            self.count += 1
            real(*args, **kwargs)

        monkeypatch.setattr(serving, "write_serving_store", counted)


def test_workers_map_the_store_one_built_and_reread_what_changed_since(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = Builds(monkeypatch)
    settings = settings_for(bank, tmp_path)
    first = ServingState(bank, settings).load()
    assert builds.count == 1 and first.version == "v1" and first.customers.store is not None
    # Brought into memory before serving (locked where the process may lock it).
    assert first.customers.store.kept in ("locked", "populated")
    customers = sorted(first.customers)
    assert len(customers) == len(first.customers) == 300
    assert not first.customers.overlay

    # Another worker (or this one restarting) maps the store: no bank read, same answers.
    second = ServingState(bank, settings).load()
    assert builds.count == 1 and not second.customers.overlay
    assert all(answers(second, c) == answers(first, c) for c in customers[:60])
    fresh = serving.read_customers(bank, second, customers[:20])
    for c in customers[:20]:
        # The store keeps float32: the one-customer read agrees to its precision.
        np.testing.assert_allclose(
            second.customers[c].propensity, fresh[c].propensity, rtol=2e-7, equal_nan=True
        )

    # Changes made since, with no change event (a bulk import): an adoption added, an
    # attribute updated; the next load re-reads those customers and only them.
    changed, updated = customers[3], customers[4]
    with bank.connect() as conn:
        held = {
            code
            for (code,) in conn.execute(
                text(
                    "SELECT p.code FROM adoptions a JOIN products p ON p.id = a.product_id "
                    "JOIN customers c ON c.id = a.customer_id WHERE c.external_id = :c"
                ),
                {"c": changed},
            )
        }
        product, product_id = next(
            (code, pid)
            for code, pid in conn.execute(text("SELECT code, id FROM products ORDER BY code"))
            if code not in held
        )
    run(
        bank,
        "INSERT INTO adoptions (customer_id, product_id, adopted_at, source) "
        "SELECT id, :p, :d, 'import' FROM customers WHERE external_id = :c",
        p=product_id,
        d=dt.date(2025, 12, 30),
        c=changed,
    )
    run(
        bank,
        "UPDATE customers SET segment = 'renamed', updated_at = :t WHERE external_id = :c",
        t=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5),
        c=updated,
    )
    third = ServingState(bank, settings).load()
    assert builds.count == 1
    assert set(third.customers.overlay) == {changed, updated}
    assert product in {a.product_code for a in third.customers[changed].state.adoptions}
    assert np.isnan(third.customers[changed].propensity[third.catalogue.index[product]])
    assert third.customers[updated].state.segment == "renamed"
    assert third.customers[customers[0]].state == first.customers[customers[0]].state

    # A customer deleted: the store cannot say who is gone; it is built again.
    run(
        bank,
        "DELETE FROM adoptions WHERE customer_id = (SELECT id FROM customers "
        "WHERE external_id = :c)",
        c=customers[-1],
    )
    run(bank, "DELETE FROM customers WHERE external_id = :c", c=customers[-1])
    fourth = ServingState(bank, settings).load()
    assert builds.count == 2 and customers[-1] not in fourth.customers
    assert not fourth.customers.overlay and len(fourth.customers) == 299
    assert fourth.customers[updated].state.segment == "renamed"


def counters(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        deleted, closed = conn.execute(text("SELECT deleted, closed FROM bank_changes")).one()
    return int(deleted), int(closed)


def test_the_bank_counts_what_its_largest_ids_cannot_tell(bank: Engine) -> None:
    """The triggers of migration 0013: a statement that deletes customers or adoptions,
    or sets an adoption's customer, product or day, counts in ``deleted``; one that
    updates adoptions (nbo only ever changes their closing days) in ``closed``;
    statements that change no row count in neither."""
    start = counters(bank)
    with bank.connect() as conn:
        customer, adoption = conn.execute(
            text(
                "SELECT customer_id, id FROM adoptions WHERE closed_at IS NULL ORDER BY id LIMIT 1"
            )
        ).one()
    run(bank, "DELETE FROM adoptions WHERE id = -1")
    run(bank, "UPDATE adoptions SET closed_at = :d WHERE id = -1", d=AS_OF)
    assert counters(bank) == start
    run(bank, "UPDATE adoptions SET closed_at = :d WHERE id = :a", d=AS_OF, a=adoption)
    assert counters(bank) == (start[0], start[1] + 1)
    run(bank, "UPDATE adoptions SET adopted_at = adopted_at WHERE id = :a", a=adoption)
    assert counters(bank) == (start[0] + 1, start[1] + 2)
    run(bank, "DELETE FROM adoptions WHERE customer_id = :c", c=customer)
    run(bank, "DELETE FROM customers WHERE id = :c", c=customer)
    assert counters(bank)[0] >= start[0] + 3
    if bank.dialect.name == "postgresql":
        before = counters(bank)
        run(bank, "TRUNCATE adoptions")
        assert counters(bank) == (before[0] + 1, before[1])


def test_a_check_reads_two_counters_not_the_bank(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mapping a store checks it against the counters alone (no table is counted): an
    adoption closed behind the service's back is read again while the change log since
    the build is whole, and gets the store built again once it is not; a missing
    counters row gets every store built again."""
    builds = Builds(monkeypatch)
    settings = settings_for(bank, tmp_path)
    first = ServingState(bank, settings).load()
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(bank, "before_cursor_execute", seen)
    try:
        ServingState(bank, settings).load()
    finally:
        event.remove(bank, "before_cursor_execute", seen)
    assert builds.count == 1
    assert not [q for q in statements if "count(*)" in q.lower() and "FROM customers" in q]
    assert not [q for q in statements if "count(*)" in q.lower() and "FROM adoptions" in q]

    closing = sorted(first.customers)[5]
    run(
        bank,
        "UPDATE adoptions SET closed_at = :d WHERE closed_at IS NULL AND customer_id = "
        "(SELECT id FROM customers WHERE external_id = :c)",
        d=AS_OF,
        c=closing,
    )
    with bank.begin() as conn:
        record_event(conn, kind="customer", origin="test", customer=closing)
    second = ServingState(bank, settings).load()
    assert builds.count == 1 and closing in second.customers.overlay  # the log says whose

    # The change log pruned since the build: nothing says whose adoption closed.
    with bank.begin() as conn:
        record_event(conn, kind="heartbeat", origin="test")
    run(bank, "DELETE FROM change_events WHERE id < (SELECT max(id) FROM change_events)")
    ServingState(bank, settings).load()
    assert builds.count == 2

    run(bank, "DELETE FROM bank_changes")
    ServingState(bank, settings).load()
    ServingState(bank, settings).load()
    assert builds.count == 4


def test_a_version_store_is_prepared_before_it_is_activated(
    bank: Engine, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prepare_store`` builds the store a version would be served from while another
    serves; once the version is active, loading it maps that store (no second build)."""
    builds = Builds(monkeypatch)
    settings = settings_for(bank, tmp_path)
    state = ServingState(bank, settings)
    assert state.load().version == "v1" and builds.count == 1
    with unit_of_work(bank) as session:
        register_bundle(session, trained.bundle, tmp_path, version="v2", map3=0.1)  # rejected
    assert serving.prepare_store(bank, settings, "v2") is True
    assert builds.count == 2
    assert serving.prepare_store(bank, settings, "v2") is False  # current: not built again
    with pytest.raises(registry.RegistryError, match="no model version 'v9'"):
        serving.prepare_store(bank, settings, "v9")
    assert builds.count == 2
    with unit_of_work(bank) as session:
        registry.activate_version(session, version="v2", origin="test")
    assert state.load().version == "v2"
    assert builds.count == 2  # mapped what prepare_store built


def test_a_reload_while_serving_shares_the_interpreter_with_requests(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that serves builds its next snapshot with a short thread switch interval
    (requests wait less for the interpreter); start-up keeps the default, and the
    interval is restored after."""
    state = ServingState(bank, settings_for(bank, tmp_path))
    seen: list[float] = []
    real = state._build

    def build() -> serving.Snapshot:
        seen.append(sys.getswitchinterval())
        return real()

    monkeypatch.setattr(state, "_build", build)
    outside = sys.getswitchinterval()  # something else may have set it (a library, a test)
    sys.setswitchinterval(0.005)  # the interpreter's default
    try:
        state.load()
        state.load()
        assert seen == [0.005, sharing.RELOAD_SWITCH_SECONDS]
        assert sys.getswitchinterval() == 0.005
    finally:
        sys.setswitchinterval(outside)


def test_a_reload_while_serving_rests_between_steps_and_start_up_does_not(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving worker's build is paced: it rests between steps (the requests have the
    interpreter meanwhile), where at start-up, with no request to serve, it never
    rests. (Every pace() rests here: PACE_WORK_SECONDS is 0.)"""
    state = ServingState(bank, settings_for(bank, tmp_path))
    rests: list[float] = []
    monkeypatch.setattr(sharing, "PACE_WORK_SECONDS", 0.0)
    monkeypatch.setattr(sharing.time, "sleep", rests.append)
    state.load()
    assert rests == []
    state.load()
    assert rests and set(rests) == {sharing.PACE_REST_SECONDS}


def test_pace_rests_only_inside_sharing_and_after_its_work_slice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pace() rests once PACE_WORK_SECONDS have passed since the thread last rested,
    and only in a thread inside sharing_the_interpreter(); other threads, and the
    start-up's sharing_the_interpreter(serving=False), never rest."""
    now = [100.0]
    rests: list[float] = []
    monkeypatch.setattr(sharing.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(sharing.time, "sleep", rests.append)
    sharing.pace()
    with sharing.sharing_the_interpreter(serving=False):
        now[0] += 1.0
        sharing.pace()
    assert rests == []
    with sharing.sharing_the_interpreter():
        now[0] += sharing.PACE_WORK_SECONDS / 2
        sharing.pace()
        assert rests == []
        now[0] += sharing.PACE_WORK_SECONDS
        sharing.pace()
        assert rests == [sharing.PACE_REST_SECONDS]
        sharing.pace()  # no time passed since that rest
        assert len(rests) == 1
        now[0] += 1.0
        thread = threading.Thread(target=sharing.pace)
        thread.start()
        thread.join(5)
        assert len(rests) == 1  # pacing is the sharing thread's own
    now[0] += 1.0
    sharing.pace()
    assert len(rests) == 1


def test_a_starting_worker_trims_its_heap_once_and_a_reload_does_not(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the start-up's bulk reads freed goes back to the system after the first
    load, before any request; a reload, with requests being served, does not take the
    allocator's lock for it (a worker that finds the store built trims for this alone)."""
    ServingState(bank, settings_for(bank, tmp_path)).load()  # builds the store
    state = ServingState(bank, settings_for(bank, tmp_path))
    trims: list[bool] = []
    monkeypatch.setattr(serving, "_trim_heap", lambda: trims.append(state.snapshot is not None))
    state.load()
    assert trims == [True]  # once its snapshot is in place, before it is ready
    state.load()
    assert trims == [True]


def test_threads_sharing_the_interpreter_at_once_restore_the_interval() -> None:
    """A reload while the figures are computed: the first in sets the short interval,
    the last out restores it, whatever order they leave in (each restoring what it
    found left the short interval in place for good)."""
    outside = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, float] = {}

    def figures() -> None:
        with sharing.sharing_the_interpreter():
            first_in.set()
            second_in.wait(5)
        seen["after the first left"] = sys.getswitchinterval()
        first_out.set()

    try:
        thread = threading.Thread(target=figures)
        thread.start()
        first_in.wait(5)
        with sharing.sharing_the_interpreter():
            second_in.set()
            first_out.wait(5)
            seen["inside the second"] = sys.getswitchinterval()
        thread.join(5)
        assert seen == {
            "after the first left": sharing.RELOAD_SWITCH_SECONDS,
            "inside the second": sharing.RELOAD_SWITCH_SECONDS,
        }
        assert sys.getswitchinterval() == 0.005
    finally:
        sys.setswitchinterval(outside)


def test_a_replaced_snapshot_gives_its_caches_back(bank: Engine, tmp_path: Path) -> None:
    """The snapshot a reload replaces has its pitch caches emptied (a slice at a time),
    and one still held by a request goes on answering."""
    state = ServingState(bank, settings_for(bank, tmp_path))
    first = state.load()
    customers = sorted(first.customers)[:40]
    before = [answers(first, c) for c in customers]
    assert first.customers.sequence_pitches
    second = state.load()
    assert second is not first and second.customers.sequence_pitches
    assert not first.rule_cache and not first.customers.sequence_pitches
    assert not first.rule_pitches and not first.profile_pitches
    assert [answers(first, c) for c in customers] == before  # made again as needed
    assert [answers(second, c) for c in customers] == before


def test_a_changed_customer_is_read_again_after_the_overlay_drops_it(
    bank: Engine, tmp_path: Path
) -> None:
    state = ServingState(bank, settings_for(bank, tmp_path))
    snapshot = state.load()
    store = snapshot.customers.store
    assert store is not None
    small = Customers(store, limit=2)
    snapshot.customers = small
    ids = sorted(snapshot.customers)[:3]
    read = serving.read_customers(bank, snapshot, ids)
    for c in ids:
        small[c] = read[c]
    assert list(small.overlay) == ids[1:]
    # The first was changed (it was in the overlay): the store's row is out of date, so
    # it is not served; a look-up reads it from the database again.
    assert ids[0] not in small and small.get(ids[0]) is None
    assert len(small) == store.n - 1 and ids[0] not in set(small)
    entry = state.lookup(ids[0])
    assert entry is not None and small.get(ids[0]) is entry and ids[0] in small
    assert list(small.overlay) == [ids[2], ids[0]]
    assert len(small) == store.n - 1  # ids[1] dropped in turn


def test_a_large_bank_is_built_in_a_child_process(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = ServingState(bank, settings_for(bank, tmp_path / "here")).load()

    def not_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the worker built the store itself")

    monkeypatch.setattr(child, "CHILD_CUSTOMERS", 0)
    monkeypatch.setattr(serving, "write_serving_store", not_here)  # the child has its own
    state = ServingState(bank, settings_for(bank, tmp_path / "child"))
    built = state.load()
    assert state.load_error is None and built.customers.store is not None
    assert (tmp_path / "child" / "serving").is_dir()
    customers = sorted(here.customers)
    assert sorted(built.customers) == customers
    for c in customers[:80]:
        assert answers(built, c) == answers(here, c)
        np.testing.assert_array_equal(built.customers[c].propensity, here.customers[c].propensity)


# --------------------------------------------------------------------------- windows


def test_a_start_reads_the_windows_offers_as_the_row_reader_does(
    bank: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL most offers are read in bulk (service.decision.window); what that
    path cannot name goes to the row reader. The history is the row reader's either way."""
    now = dt.datetime.now(dt.UTC)
    with bank.connect() as conn:
        customers = conn.execute(text("SELECT id, external_id FROM customers ORDER BY id")).all()
        products = [row[0] for row in conn.execute(text("SELECT id FROM products ORDER BY id"))]
    rng = random.Random(7)
    decisions: list[dict[str, Any]] = []
    offers: list[dict[str, Any]] = []

    def offer(
        external_id: str, db_id: int | None, offer_id: str, hours: float, product: int = 0
    ) -> str:
        at = now - dt.timedelta(hours=hours)
        decision = str(uuid.uuid4())
        decisions.append({"id": decision, "cid": db_id, "xid": external_id, "at": at})
        product = product or rng.choice(products)
        offers.append({"id": offer_id, "did": decision, "cid": db_id, "pid": product, "at": at})
        return offer_id

    for i, (db_id, external_id) in enumerate(customers[:60]):
        for _ in range(i % 4):  # none to three offers each, some of one product twice
            offer(external_id, db_id, str(uuid.uuid4()), rng.uniform(1, 600))
    (first, one), (second, two), (third, three) = customers[:3]
    offer(one, first, str(uuid.uuid4()).upper(), 5)  # an upper-case UUID: held as text
    offer(two, second, "legacy-offer-1", 6)  # not a UUID
    cold = offer("walk-in-7", None, str(uuid.uuid4()), 7)  # unknown, served cold
    gone = offer("gone-1", 10**9, str(uuid.uuid4()), 8)  # a customer deleted since
    offer(three, third, str(uuid.uuid4()), 24 * 40)  # older than every window
    declined = [offer(three, third, str(uuid.uuid4()), 30), cold, gone, offers[0]["id"]]
    # Two declines of one product by one customer, the later of an older offer: the
    # cooldown counts from the later decline.
    declined += [
        offer(two, second, str(uuid.uuid4()), hours, product=products[-1]) for hours in (9, 50)
    ]

    def insert() -> None:
        """Store the decisions and offers made by offer() so far."""
        with bank.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO decisions (id, customer_id, customer_external_id, channel, "
                    "control, degraded, cold_start, created_at) "
                    "VALUES (:id, :cid, :xid, 'branch', false, false, false, :at)"
                ),
                decisions,
            )
            conn.execute(
                text(
                    "INSERT INTO offers (id, decision_id, customer_id, product_id, rank, "
                    "propensity, expected_value, score, created_at) "
                    "VALUES (:id, :did, :cid, :pid, 1, 0.5, 1.0, 0.5, :at)"
                ),
                offers,
            )

    insert()
    with bank.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO offer_outcomes (offer_id, outcome, created_at) "
                "VALUES (:id, 'declined', :at)"
            ),
            [{"id": i, "at": now - dt.timedelta(hours=6 - k)} for k, i in enumerate(declined)],
        )

    # What the row reader alone makes of every offer in the windows.
    since = now - dt.timedelta(days=30)

    def expect() -> tuple[list[Any], ContactBook]:
        with bank.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT d.customer_external_id, p.code, o.id, o.created_at FROM offers o "
                    "JOIN decisions d ON d.id = o.decision_id "
                    "JOIN products p ON p.id = o.product_id WHERE o.created_at >= :since"
                ),
                {"since": since},
            ).all()
        book = ContactBook()
        book.load_offers(
            (c, code, i, serving._posix(at)) for c, code, i, at in sorted(rows, key=lambda r: r[0])
        )
        return list(rows), book

    rows, expected = expect()
    assert len(expected) > 40

    unnamed: list[list[int]] = []

    def spy(real: Any) -> Any:
        def spied(*args: Any) -> list[int]:
            unnamed.append(real(*args))
            return unnamed[-1]

        return spied

    for name in ("read_offers", "read_declines"):
        monkeypatch.setattr(window, name, spy(getattr(window, name)))

    def read() -> ContactBook:
        state = ServingState(bank, settings_for(bank, tmp_path))
        state.load()
        return state.history

    def same(held: ContactBook) -> None:
        assert sorted(held) == sorted(expected)
        codes = sorted({code for _, code, _, _ in rows})
        for customer in expected:
            got, want = held[customer], expected[customer]
            assert sorted(got.offers) == sorted(want.offers), customer
            assert got.trim_at == want.trim_at
            for code in codes:
                assert got.offers_since(code, since) == want.offers_since(code, since)
        for customer, code, offer_id, _ in rows:
            if offer_id in declined:
                assert code in held[customer].declines, (customer, offer_id)
        assert sum(len(held[c].declines) for c in held) == len(declined) - 1
        with bank.connect() as conn:
            refused = conn.execute(
                text(
                    "SELECT d.customer_external_id, p.code, oo.created_at FROM offer_outcomes oo "
                    "JOIN offers o ON o.id = oo.offer_id JOIN decisions d ON d.id = o.decision_id "
                    "JOIN products p ON p.id = o.product_id WHERE oo.outcome = 'declined'"
                )
            ).all()
        latest: dict[str, dict[str, dt.datetime]] = {}
        for customer, code, at in refused:
            at = dt.datetime.fromtimestamp(serving._posix(at), dt.UTC)
            marks = latest.setdefault(customer, {})
            marks[code] = max(at, marks.get(code, at))
        assert {c: held[c].declines for c in held if held[c].declines} == latest

    same(read())
    if bank.dialect.name == "postgresql":
        # The deleted customer's offer and decline went to the row reader.
        assert unnamed == [[10**9], [10**9]]
        # With every customer named, the offers left (the cold one, the ids that are
        # not lowercase UUIDs) come from the partial index of unnamed offers alone.
        run(
            bank,
            "INSERT INTO customers (id, external_id, attributes) VALUES (:i, 'gone-1', '{}')",
            i=10**9,
        )
        same(read())
        assert unnamed[2:] == [[], []]
        run(bank, "DELETE FROM customers WHERE id = :i", i=10**9)
        del unnamed[2:]
        # A stored id of a UUID's shape that is not one fails the bulk read of the
        # offers: the row reader reads them all, the bad one as text.
        decisions.clear()
        offers.clear()
        offer(one, first, "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz", 3)
        insert()
        rows, expected = expect()
        same(read())
        assert unnamed == [[10**9], [10**9], [10**9]]  # the declines' bulk read only
        assert "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz" in read()[one].offers
        # The same failure part-way through the stream, while the COPY still sends: it is
        # cancelled and drained, and on the same connection the row reader reads them all.
        abandoned: list[Any] = []
        real_abandon = window._abandon
        monkeypatch.setattr(window, "_abandon", lambda pg: abandoned.append(real_abandon(pg)))
        monkeypatch.setattr(window, "COPY_BLOCK", 1)
        monkeypatch.setattr(window, "BATCH_ROWS", 1)
        del unnamed[:]
        same(read())
        assert unnamed == [[10**9]] and len(abandoned) == 1
        monkeypatch.setattr(window, "COPY_BLOCK", 1 << 20)
        monkeypatch.setattr(window, "BATCH_ROWS", 100_000)
        # So does one of 36 characters in that shape that are not all ASCII (more than
        # 36 bytes: the rows are no longer of one width).
        run(bank, "DELETE FROM offers WHERE id = 'zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz'")
        decisions.clear()
        offers.clear()
        accented = "é" + str(uuid.uuid4())[1:]
        offer(one, first, accented, 2)
        insert()
        rows, expected = expect()
        del unnamed[:]
        same(read())
        assert unnamed == [[10**9]]  # the declines' bulk read only
        assert accented in read()[one].offers
        # A bulk read that fails leaves every offer to the row reader.
        monkeypatch.setattr(window, "_copy", lambda *_: (_ for _ in ()).throw(ValueError("x")))
        same(read())
    else:
        assert unnamed == []


def test_the_bulk_read_keeps_the_ids_the_book_holds_as_uuids() -> None:
    """Of 36-character offer ids, the bulk read keeps as 16 bytes exactly those the
    database's ``LIKE``/``lower`` pick (lowercase, dashes in place), and fails, as the
    ``::uuid`` cast did, on one of that shape that is not hexadecimal."""
    made = uuid.uuid4()
    ids = [
        str(made),  # kept
        str(made).upper(),  # a capital: left to the row reader (held as text)
        "x" * 36,  # no dashes
        str(made).replace("-", "_"),  # dashes elsewhere
    ]
    raw = np.array([i.encode() for i in ids], dtype="V36")
    chosen, keys = window._uuids(raw)
    assert chosen.tolist() == [True, False, False, False]
    assert [bytes(k) for k in keys] == [made.bytes]
    with pytest.raises(ValueError, match="not hexadecimal"):
        window._uuids(np.array([b"zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"], dtype="V36"))


def test_the_bulk_read_sorts_every_byte_at_every_place_of_an_id_as_the_database() -> None:
    """Any byte at any of an id's 36 places, beside ids that are all lowercase UUIDs
    (the quick path of window._uuids) and alone (the careful one): kept as its UUID's
    16 bytes when ASCII, no capital and dashes in place; a failure when such an id is
    not hexadecimal; else left to the row reader."""
    made = [uuid.UUID(int=k * 0x0123456789ABCDEF0123456789ABCDEF % 2**128) for k in (1, 2)]
    text = str(made[0]).encode()

    def expected(candidate: bytes) -> str | bytes | None:
        shaped = all(candidate[i] == ord("-") for i in (8, 13, 18, 23))
        if not shaped or any(b >= 0x80 or ord("A") <= b <= ord("Z") for b in candidate):
            return None  # left to the row reader
        digits = candidate.replace(b"-", b"", 4)
        if len(digits) != 32 or any(b not in b"0123456789abcdef" for b in digits):
            return "fails"  # (uuid.UUID and bytes.fromhex let some of these pass)
        return bytes.fromhex(digits.decode())

    for place in range(36):
        for byte in range(256):
            candidate = text[:place] + bytes([byte]) + text[place + 1 :]
            want = expected(candidate)
            for batch in ([candidate], [str(made[1]).encode(), candidate, text]):
                raw = np.array(batch, dtype="V36")
                if want == "fails":
                    with pytest.raises(ValueError, match="not hexadecimal"):
                        window._uuids(raw)
                    continue
                chosen, keys = window._uuids(raw)
                held = [uuid.UUID(i.decode()).bytes for i in batch if i != candidate]
                kept = [bytes(k) for k in keys]
                if want is None:
                    assert chosen.tolist() == [i != candidate for i in batch]
                    assert kept == held
                else:
                    assert chosen.all() and len(kept) == len(batch)
                    assert kept[batch.index(candidate)] == want
    chosen, keys = window._uuids(np.array([], dtype="V36"))
    assert chosen.tolist() == [] and len(keys) == 0


def test_the_bulk_read_orders_offers_as_lexsort_would() -> None:
    """window._by_customer_and_time gives np.lexsort's order: by customer, then
    instant, rows of one instant (a decision's offers) in their order; with a packed
    key where it fits, and when customers and instants span too many bits for one."""
    rng = np.random.default_rng(5)
    epoch = 1_780_000_000_000_000  # microseconds
    for customers, span_us, n in [
        (1_000, 30 * 86_400 * 10**6, 20_000),
        (3, 10, 5_000),  # many ties
        (1, 0, 10),  # one customer, one instant
        (2**20, 2**45, 5_000),  # 20 + 45 bits: lexsort itself
        (0, 0, 0),
    ]:
        who = rng.integers(0, max(customers, 1), n).astype(np.intp)
        micros = epoch + rng.integers(0, span_us + 1, n)
        at = (micros / 1e6).astype(np.float64)
        assert np.array_equal(window._by_customer_and_time(who, at), np.lexsort((at, who)))


def test_the_bulk_read_keeps_each_customers_latest_decline_of_each_product() -> None:
    """window._latest reduces the declines to what the cooldown counts from, as a dict
    of the maximum per (customer, product) would, ordered by customer, then product."""
    rng = np.random.default_rng(17)
    for customers, products, n in [(500, 20, 4_000), (3, 1, 50), (1, 7, 1), (0, 0, 0)]:
        who = rng.integers(0, max(customers, 1), n).astype(np.intp)
        product = rng.integers(0, max(products, 1), n).astype(np.int32)
        at = 1.78e9 + np.round(rng.uniform(0, 86_400 * 90, n), 6)
        if n:
            at[: n // 4] = at[0]  # ties
        want: dict[tuple[int, int], float] = {}
        for w, p, stamp in zip(who.tolist(), product.tolist(), at.tolist(), strict=True):
            want[w, p] = max(stamp, want.get((w, p), stamp))
        got_who, got_product, got_at = window._latest(who, product, at)
        got = list(zip(got_who.tolist(), got_product.tolist(), got_at.tolist(), strict=True))
        assert got == sorted((w, p, stamp) for (w, p), stamp in want.items())


def test_the_bulk_read_names_customers_as_a_sort_would() -> None:
    """window._distinct and window._runs give what np.unique gives, on dense database
    ids (marked in an array), sparse ones (sorted), and none."""
    rng = np.random.default_rng(11)
    cases = [
        rng.integers(1, 5_000, size=40_000),  # dense: most customers, many offers each
        rng.integers(1, 10**12, size=1_000),  # sparse: sorted instead
        np.array([7, 7, 3, 10**6, 3]),  # one far id among few: sorted
        np.zeros(0, dtype=np.int64),
    ]
    for ids in cases:
        ids = ids.astype(np.int64)
        want, inverse = np.unique(ids, return_inverse=True)
        got, index = window._distinct(ids)
        assert got.tolist() == want.tolist() and index.tolist() == inverse.reshape(-1).tolist()
        ordered = np.sort(index)
        values, starts = np.unique(ordered, return_index=True)
        runs, begins = window._runs(ordered)
        assert runs.tolist() == values.tolist() and begins.tolist() == starts.tolist()
