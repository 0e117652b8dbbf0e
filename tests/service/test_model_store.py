"""Model bundles stored in the database (issue 16): a version registered on one machine is
served by another that shares only the database; a changed stored file is refused; workers
materialising the same version at once share one complete cache; migration 0009 moves a
bundle registered under the old layout (an absolute folder) into the database.

``pytest -s`` prints what the replica test measures: the bundle's size, and its load time
from the database (empty cache) and from the warm local cache.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from models.artifacts import save_bundle
from models.data import BankData
from models.propensity import PropensityModel, TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service.app import create_app
from service.cli.main import app as cli
from service.data import db, registry
from service.data.db import make_engine, read_only, unit_of_work
from service.data.tables import ModelVersion
from service.decision.state import ServingState
from service.settings import Settings
from tests.bank import AS_OF, load_trained_bank, register_bundle

TINY = TrainConfig(n_cutoffs=2, max_rounds=20, rules=False, num_threads=1)
runner = CliRunner()


@dataclass(frozen=True)
class Trained:
    bank: Path
    bundle: Path
    customer: str
    """A customer of the bank, to ask for a decision."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("model_store")
    write_bank(generate_bank(400, seed=16), root / "bank")
    data = BankData.from_folder(root / "bank")
    save_bundle(train(data, as_of=AS_OF, config=TINY), root / "bundle", metrics={"map@3": 0.3})
    return Trained(root / "bank", root / "bundle", str(data.customers["customer_id"].iloc[0]))


def settings_for(database_url: str, data_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=data_dir,
        min_propensity=0.0,
        control_share=0.0,
        poll_interval_seconds=60.0,
    )


def stored_row(engine: Engine, version: str) -> ModelVersion:
    with unit_of_work(engine) as session:
        row = registry.get_version(session, version)
        session.expunge(row)
    return row


def load(engine: Engine, version: str, cache_dir: Path | None) -> PropensityModel:
    """Load ``version`` as a worker does (a reader's connection: no write lock on SQLite)."""
    with read_only(engine).connect() as conn:
        return registry.load_model(conn, stored_row(engine, version), cache_dir=cache_dir)


def change_stored_file(engine: Engine, version: str, name: str, *, with_digest: bool) -> None:
    """Alter one stored file of ``version`` (and its recorded sha256 when ``with_digest``)."""
    with engine.begin() as conn:
        content = bytes(
            conn.execute(
                text("SELECT content FROM model_files WHERE version = :v AND name = :n"),
                {"v": version, "n": name},
            ).scalar_one()
        )
        changed = content + b"\n"
        digest = hashlib.sha256(changed if with_digest else content).hexdigest()
        conn.execute(
            text(
                "UPDATE model_files SET content = :c, sha256 = :s, size = :z "
                "WHERE version = :v AND name = :n"
            ),
            {"c": changed, "s": digest, "z": len(changed), "v": version, "n": name},
        )


def model_file(engine: Engine, version: str) -> str:
    """The name of a stored LightGBM model file of ``version`` (not the manifest)."""
    with engine.connect() as conn:
        names = conn.execute(
            text("SELECT name FROM model_files WHERE version = :v ORDER BY name"), {"v": version}
        ).scalars()
        return next(n for n in names if n.endswith(".txt"))


def test_a_second_replica_serves_the_version_registered_elsewhere(
    database_url: str, trained: Trained, tmp_path: Path
) -> None:
    trainer = tmp_path / "trainer"
    keys = load_trained_bank(
        database_url, trained.bank, trained.bundle, trainer, keys={"teller": ["decisions"]}
    )
    engine = make_engine(database_url)
    try:
        row = stored_row(engine, "v1")
        assert row.path == "db:v1"  # a location in the store, not a folder of the trainer
        with unit_of_work(engine) as session:
            files, size = registry.stored_size(session, "v1")
        assert files == len([f for f in trained.bundle.rglob("*") if f.is_file()])
        # The trainer's machine is gone: the replica has only the database.
        shutil.rmtree(trainer)
        replica = tmp_path / "replica"
        with TestClient(create_app(settings_for(database_url, replica))) as client:
            answer = client.post(
                f"/v1/customers/{trained.customer}/decisions",
                json={"channel": "branch", "staff_id": "S1", "branch_id": "B1"},
                headers={"Authorization": f"Bearer {keys['teller']}"},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model_version"] == "v1" and body["degraded"] is False
            assert body["offers"]
        assert registry.manifest_checksum(replica / "models" / "v1") == row.checksum

        # Measured: from the database into an empty cache, then from the warm cache.
        cold_dir = tmp_path / "cold"
        started = time.perf_counter()
        cold = load(engine, "v1", cold_dir)
        from_database = time.perf_counter() - started
        started = time.perf_counter()
        warm = load(engine, "v1", cold_dir)
        from_cache = time.perf_counter() - started
        print(
            f"\nbundle {files} files, {size / 1e3:.0f} kB; load from the database "
            f"{from_database * 1e3:.0f} ms, from the warm cache {from_cache * 1e3:.0f} ms "
            f"({engine.dialect.name})"
        )
        data = BankData.from_folder(trained.bank)
        pd.testing.assert_frame_equal(
            cold.score(data, as_of=AS_OF.isoformat()), warm.score(data, as_of=AS_OF.isoformat())
        )
    finally:
        engine.dispose()


def test_a_changed_stored_bundle_is_refused(
    database_url: str, trained: Trained, tmp_path: Path
) -> None:
    load_trained_bank(database_url, trained.bank, trained.bundle, tmp_path / "trainer")
    engine = make_engine(database_url)
    try:
        name = model_file(engine, "v1")
        change_stored_file(engine, "v1", name, with_digest=False)
        with pytest.raises(registry.RegistryError) as refused:
            load(engine, "v1", tmp_path / "replica" / "models")
        assert f"model version v1: stored file {name} has sha256" in str(refused.value)
        assert "the bundle was changed" in str(refused.value)
        assert not (tmp_path / "replica" / "models" / "v1").exists()  # nothing cached

        # A worker of that replica is not ready: it says why.
        state = ServingState(engine, settings_for(database_url, tmp_path / "replica"))
        snapshot = state.load()
        assert snapshot.degraded and state.load_error is not None
        assert "the bundle was changed" in state.load_error

        # Changed with its recorded sha256 too: the manifest's own checksums refuse it.
        change_stored_file(engine, "v1", name, with_digest=True)
        with pytest.raises(registry.RegistryError, match=f"model version v1: .*{name}"):
            load(engine, "v1", None)
        # And a changed manifest (with its sha256) is not the registered one.
        change_stored_file(engine, "v1", "manifest.json", with_digest=True)
        with pytest.raises(registry.RegistryError, match="stored manifest.json has sha256"):
            load(engine, "v1", None)
    finally:
        engine.dispose()


def test_a_damaged_or_stale_cache_is_replaced_from_the_database(
    engine: Engine, trained: Trained, tmp_path: Path
) -> None:
    with unit_of_work(engine) as session:
        register_bundle(session, trained.bundle, tmp_path / "trainer", version="v1")
    cache = tmp_path / "replica"
    expected = load(engine, "v1", cache).product_codes
    # A stale copy (another database's v1) and then a damaged one are both replaced.
    (cache / "v1" / "manifest.json").write_text("{}")
    assert load(engine, "v1", cache).product_codes == expected
    damaged = cache / "v1" / model_file(engine, "v1")
    damaged.write_text(damaged.read_text() + "\n")
    assert load(engine, "v1", cache).product_codes == expected
    assert registry.read_bundle_files(cache / "v1") == registry.read_bundle_files(trained.bundle)
    assert sorted(p.name for p in cache.iterdir()) == ["v1"]


def test_workers_materialising_one_version_at_once_share_one_complete_cache(
    engine: Engine, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with unit_of_work(engine) as session:
        register_bundle(session, trained.bundle, tmp_path / "trainer", version="v1")
    cache = tmp_path / "replica" / "models"
    expected = registry.read_bundle_files(trained.bundle)

    # Worker "a" stops after writing its first file; worker "b" materialises and loads
    # meanwhile; then "a" finishes and finds b's copy in place.
    paused, resume = threading.Event(), threading.Event()
    write_bytes: Callable[[Path, bytes], int] = Path.write_bytes

    def slow_write(self: Path, data: bytes) -> int:
        written = write_bytes(self, data)
        if threading.current_thread().name == "a" and not paused.is_set():
            paused.set()
            assert resume.wait(30)
        return written

    monkeypatch.setattr(Path, "write_bytes", slow_write)
    loaded: dict[str, PropensityModel] = {}
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            loaded[threading.current_thread().name] = load(engine, "v1", cache)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    a = threading.Thread(target=worker, name="a")
    a.start()
    try:
        assert paused.wait(30)
        # Half-way through a's writing, nothing half-written is visible as the version.
        assert not (cache / "v1").exists()
        b = threading.Thread(target=worker, name="b")
        b.start()
        b.join(30)
        assert "b" in loaded, failures
        assert registry.read_bundle_files(cache / "v1") == expected
    finally:
        resume.set()
        a.join(30)
    assert not failures and set(loaded) == {"a", "b"}
    assert loaded["a"].product_codes == loaded["b"].product_codes
    assert registry.read_bundle_files(cache / "v1") == expected
    assert sorted(p.name for p in cache.iterdir()) == ["v1"]  # no temporary folder left

    # And several free-running workers at once.
    monkeypatch.undo()
    shutil.rmtree(cache)
    start = threading.Barrier(6)

    def racer() -> None:
        start.wait(30)
        worker()

    threads = [threading.Thread(target=racer, name=f"r{i}") for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures and len(loaded) == 8
    assert registry.read_bundle_files(cache / "v1") == expected
    assert sorted(p.name for p in cache.iterdir()) == ["v1"]


def test_promote_refuses_a_version_whose_bundle_does_not_load(
    database_url: str, trained: Trained, tmp_path: Path
) -> None:
    load_trained_bank(database_url, trained.bank, trained.bundle, tmp_path)
    engine = make_engine(database_url)
    try:
        with unit_of_work(engine) as session:
            register_bundle(session, trained.bundle, tmp_path, version="v2", map3=0.1)
            register_bundle(session, trained.bundle, tmp_path, version="v3", map3=0.1)
        change_stored_file(engine, "v2", model_file(engine, "v2"), with_digest=False)
        env = {"NBO_DATABASE_URL": database_url, "NBO_DATA_DIR": str(tmp_path / "operator")}

        refused = runner.invoke(cli, ["models", "promote", "v2"], env=env)
        assert refused.exit_code == 1, refused.output
        assert "v2 was not promoted" in refused.output
        assert "the bundle was changed" in refused.output
        with unit_of_work(engine) as session:
            statuses = {r.version: r.status for r in registry.list_versions(session)}
        assert statuses == {"v1": "active", "v2": "rejected", "v3": "rejected"}

        promoted = runner.invoke(cli, ["models", "promote", "v3"], env=env)
        assert promoted.exit_code == 0, promoted.output
        assert "v3 is active (v1 retired)" in promoted.output
        with unit_of_work(engine) as session:
            assert registry.get_version(session, "v3").status == "active"
            events = session.execute(
                text("SELECT detail FROM change_events WHERE kind = 'model'")
            ).scalars()
            assert "v3" in list(events)

        shown = runner.invoke(cli, ["models", "show", "v3", "--json"], env=env)
        assert shown.exit_code == 0, shown.output
        assert '"path": "db:v3"' in shown.output
        shown = runner.invoke(cli, ["models", "show", "v3"], env=env)
        assert "db:v3 (in the database:" in shown.output
    finally:
        engine.dispose()


def test_migration_moves_an_absolute_path_bundle_into_the_database(
    database_url: str, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.downgrade(database_url, "0008")
    old = tmp_path / "old" / "models" / "v0"
    shutil.copytree(trained.bundle, old)
    checksum = registry.manifest_checksum(old)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            for version, path, status in (
                ("v0", str(old.resolve()), "active"),
                ("gone", str(tmp_path / "elsewhere" / "gone"), "retired"),
            ):
                conn.execute(
                    text(
                        "INSERT INTO model_versions (version, status, path, checksum, as_of, "
                        "horizon_days, params, metrics) VALUES (:v, :s, :p, :c, :a, 90, "
                        "'{}', '{}')"
                    ),
                    {"v": version, "s": status, "p": path, "c": checksum, "a": AS_OF},
                )
        db.upgrade(database_url)
        assert stored_row(engine, "v0").path == "db:v0"
        assert stored_row(engine, "gone").path == str(tmp_path / "elsewhere" / "gone")
        shutil.rmtree(tmp_path / "old")  # the old folder is no longer needed
        replica = tmp_path / "replica" / "models"
        model = load(engine, "v0", replica)
        assert model.product_codes
        assert registry.read_bundle_files(replica / "v0") == registry.read_bundle_files(
            trained.bundle
        )
        # A row whose folder was missing keeps loading from it, and says what is wrong.
        with pytest.raises(registry.RegistryError, match="is not on this machine"):
            load(engine, "gone", replica)

        # Downgrade writes the stored bundle back under the data folder, as before 0009.
        monkeypatch.setenv("NBO_DATA_DIR", str(tmp_path / "down"))
        db.downgrade(database_url, "0008")
        back = (tmp_path / "down" / "models" / "v0").resolve()
        with engine.connect() as conn:
            path = conn.execute(text("SELECT path FROM model_versions WHERE version = 'v0'"))
            assert path.scalar_one() == str(back)
        assert registry.manifest_checksum(back) == checksum
        db.upgrade(database_url)
        assert stored_row(engine, "v0").path == "db:v0"
    finally:
        engine.dispose()


def test_registering_a_version_twice_is_refused(
    engine: Engine, trained: Trained, tmp_path: Path
) -> None:
    with unit_of_work(engine) as session:
        register_bundle(session, trained.bundle, tmp_path, version="v1")
    with (
        pytest.raises(registry.RegistryError, match="'v1' is already registered"),
        unit_of_work(engine) as session,
    ):
        register_bundle(session, trained.bundle, tmp_path, version="v1")
