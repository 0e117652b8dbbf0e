"""The registry: the gate, hand promotion, rollback, and one active version at most."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError

from service.data import registry
from service.data.db import unit_of_work
from service.data.tables import ModelVersion


def bundle(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "bundles" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name}))
    return folder


def register(engine: Engine, tmp_path: Path, name: str, map3: float) -> tuple[str, bool, str]:
    with unit_of_work(engine) as session:
        row, decision = registry.register(
            session,
            bundle=bundle(tmp_path, name),
            artifacts_dir=tmp_path / "models",
            as_of=dt.date(2025, 12, 31),
            horizon_days=90,
            params={},
            metrics={"map@3": map3},
            gate_metric="map@3",
            tolerance=0.02,
            version=name,
        )
        return row.version, decision.activated, decision.reason


def status(engine: Engine) -> dict[str, str]:
    with unit_of_work(engine) as session:
        return {row.version: row.status for row in registry.list_versions(session)}


def test_gate_promote_and_rollback(engine: Engine, tmp_path: Path) -> None:
    assert register(engine, tmp_path, "v1", 0.30)[1:] == (True, "no active version")
    # Within tolerance (0.295 >= 0.30 * 0.98): activated.
    _, activated, reason = register(engine, tmp_path, "v2", 0.295)
    assert activated and "floor 0.2940" in reason
    # Clearly worse: kept, not activated.
    _, activated, reason = register(engine, tmp_path, "v3", 0.20)
    assert not activated and "nbo models promote" in reason
    assert status(engine) == {"v1": "retired", "v2": "active", "v3": "rejected"}
    assert (tmp_path / "models" / "v3" / "manifest.json").exists()

    with unit_of_work(engine) as session:
        registry.activate(session, registry.get_version(session, "v3"))
    assert status(engine)["v3"] == "active"
    with unit_of_work(engine) as session:
        now_active, retired = registry.rollback(session)
        assert (now_active.version, retired.version) == ("v2", "v3")
    assert status(engine) == {"v1": "retired", "v2": "active", "v3": "retired"}


def test_registry_errors(engine: Engine, tmp_path: Path) -> None:
    with unit_of_work(engine) as session:
        with pytest.raises(registry.RegistryError, match="no active version"):
            registry.rollback(session)
        with pytest.raises(registry.RegistryError, match="no model version 'nope'"):
            registry.get_version(session, "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(registry.RegistryError, match="not a model bundle"):
        registry.manifest_checksum(empty)


def test_database_allows_one_active_version(engine: Engine, tmp_path: Path) -> None:
    register(engine, tmp_path, "v1", 0.3)
    register(engine, tmp_path, "v2", 0.1)
    with pytest.raises(IntegrityError), unit_of_work(engine) as session:
        session.execute(update(ModelVersion).values(status="active"))
