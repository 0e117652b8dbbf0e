"""The model registry: versions on disk, their metadata in the database, one active.

A model version is a bundle folder (written by :mod:`models.artifacts`) copied
under ``<data_dir>/models/<version>``, plus a ``model_versions`` row with its
manifest checksum, data window, parameters and holdout metrics. At most one
version is ``active``; the others are ``candidate`` (trained, not promoted),
``retired`` (was active) or ``rejected`` (failed the promotion gate).

The gate: a newly registered version becomes active only when no version is
active, or its holdout metric is not worse than the active version's by more
than the configured tolerance. A person can promote any version by hand.

It compares like with like: the metric belongs to the kind of holdout the
version was measured on (``metrics["holdout_kind"]``, ``temporal`` when a row
predates it): MAP@3 for a temporal holdout, mean AUC over products for a
random split of customers (a campaign, where MAP@k says little); see
:data:`GATE_METRICS`. When the active version was measured on another kind of
holdout and could not be measured on the candidate's, the numbers are not
compared: the candidate is registered without activation (status
``candidate``), with a reason saying how to promote it by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.artifacts import BundleError, load_bundle
from models.propensity import PropensityModel
from service.data.events import record_event
from service.data.tables import ModelVersion
from service.errors import Invalid, NotFound

MANIFEST = "manifest.json"

GATE_METRICS: dict[str, str] = {"temporal": "map@3", "random_customers": "auc"}
"""The promotion gate's metric for each kind of holdout."""


def holdout_kind(metrics: dict[str, Any] | None) -> str:
    """The kind of holdout recorded metrics come from (``temporal`` before kinds were
    recorded)."""
    return str((metrics or {}).get("holdout_kind") or "temporal")


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown version, bad bundle...)."""


@dataclass(frozen=True)
class GateDecision:
    """Whether a new version was activated, and why."""

    activated: bool
    reason: str
    compared: bool = True
    """False when the metrics could not be compared (another kind of holdout): the
    version stays a ``candidate`` rather than ``rejected``."""


def manifest_checksum(bundle: Path) -> str:
    """sha256 of the bundle's manifest (which itself lists every file's sha256)."""
    path = bundle / MANIFEST
    if not path.exists():
        raise RegistryError(f"{bundle}: no {MANIFEST}; not a model bundle")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_version_id(checksum: str, now: dt.datetime | None = None) -> str:
    """A sortable, unique version id: UTC time of registration plus a checksum prefix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{checksum[:6]}"


def get_version(session: Session, version: str) -> ModelVersion:
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise RegistryError(f"no model version '{version}' (see `nbo models list`)")
    return row


def active_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.status == "active"))


def list_versions(session: Session) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        )
    )


def register(
    session: Session,
    *,
    bundle: Path,
    artifacts_dir: Path,
    as_of: dt.date,
    horizon_days: int,
    params: dict[str, Any],
    metrics: dict[str, Any],
    gate_metric: str,
    tolerance: float,
    version: str | None = None,
    active_value: float | None = None,
    active_note: str = "",
) -> tuple[ModelVersion, GateDecision]:
    """Copy ``bundle`` into the registry, record it, and apply the promotion gate.

    ``metrics[gate_metric]`` is compared with the active version's (``active_value``
    when the caller measured it on the candidate's holdout, else its recorded metric,
    only when both were measured on the same kind of holdout); the new version is
    activated when ``new >= active * (1 - tolerance)``. ``params`` and ``metrics``
    should record the holdout (``metrics["holdout_kind"]``).
    """
    checksum = manifest_checksum(bundle)
    version = version or new_version_id(checksum)
    target = artifacts_dir / version
    if target.exists():
        raise RegistryError(f"{target} already exists")
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, target)
    row = ModelVersion(
        version=version,
        status="candidate",
        path=str(target.resolve()),
        checksum=checksum,
        as_of=as_of,
        horizon_days=horizon_days,
        params=params,
        metrics=metrics,
    )
    session.add(row)
    session.flush()
    decision = gate(
        session,
        row,
        gate_metric=gate_metric,
        tolerance=tolerance,
        active_value=active_value,
        active_note=active_note,
    )
    if decision.activated:
        activate(session, row)
    else:
        row.status = "rejected" if decision.compared else "candidate"
    row.metrics = {**metrics, "gate": {"activated": decision.activated, "reason": decision.reason}}
    return row, decision


def gate(
    session: Session,
    candidate: ModelVersion,
    *,
    gate_metric: str,
    tolerance: float,
    active_value: float | None = None,
    active_note: str = "",
) -> GateDecision:
    """Decide whether ``candidate`` may replace the active version.

    ``active_value`` is the active version's ``gate_metric`` measured on the
    candidate's own holdout (so of the same kind); without it the active version's
    recorded metric is used, and only when it comes from the same kind of holdout.
    """
    current = active_version(session)
    if current is None or current.id == candidate.id:
        return GateDecision(True, "no active version")
    new_value = _metric(candidate.metrics, gate_metric)
    if new_value is None:
        return GateDecision(False, f"candidate has no holdout {gate_metric}")
    new_kind, old_kind = holdout_kind(candidate.metrics), holdout_kind(current.metrics)
    if active_value is None and new_kind != old_kind:
        return GateDecision(
            False,
            f"not compared: the candidate was measured on a {_kind_words(new_kind)} "
            f"holdout, active {current.version} on a {_kind_words(old_kind)} one, and "
            "their metrics do not compare; kept as a candidate: promote it by hand with "
            f"`nbo models promote {candidate.version}` if intended",
            compared=False,
        )
    old_value = active_value if active_value is not None else _metric(current.metrics, gate_metric)
    if old_value is None:
        return GateDecision(True, f"active version {current.version} has no holdout {gate_metric}")
    floor = old_value * (1.0 - tolerance)
    verdict = (
        f"holdout {gate_metric} {new_value:.4f} vs active {current.version} {old_value:.4f} "
        f"(floor {floor:.4f} at tolerance {tolerance:.0%})"
        + (f"; {active_note}" if active_note else "")
    )
    if new_value >= floor:
        return GateDecision(True, verdict)
    return GateDecision(False, verdict + "; promote by hand with `nbo models promote` if intended")


def _kind_words(kind: str) -> str:
    return {"temporal": "temporal", "random_customers": "random-customers"}.get(kind, kind)


def _metric(metrics: dict[str, Any] | None, name: str) -> float | None:
    value = (metrics or {}).get(name)
    return float(value) if isinstance(value, int | float) else None


OFFLINE_ORIGIN = "offline"
"""The origin of change events written outside the service (``nbo train``, ``nbo models``)."""


def activate(
    session: Session, row: ModelVersion, *, origin: str = OFFLINE_ORIGIN
) -> ModelVersion | None:
    """Make ``row`` the active version; the previous one becomes retired. Returns it.

    Every activation (the promotion gate of ``nbo train``, ``nbo models promote`` and
    ``rollback``, the API) writes a ``model`` change event in the same transaction, so
    running workers load the version at their next poll rather than at their next
    restart. ``origin`` names who activated, so a worker skips its own event.
    """
    previous = active_version(session)
    if previous is not None and previous.id != row.id:
        previous.status = "retired"
        session.flush()
    row.status = "active"
    row.activated_at = dt.datetime.now(dt.UTC)
    session.flush()
    record_event(session.connection(), kind="model", origin=origin, detail=row.version)
    return previous if previous is not None and previous.id != row.id else None


def activate_version(session: Session, *, version: str, origin: str) -> str | None:
    """Make ``version`` active by hand once its bundle loads; return the version retired.

    The bundle is checked (:func:`load_model`) before anything changes, so a version
    that no worker could serve never becomes active. Its ``model`` change event tells
    every other worker to load it.

    Raises
    ------
    NotFound
        If no version is called ``version``.
    Invalid
        If the bundle fails its checks; the message says which.
    """
    try:
        row = get_version(session, version)
    except RegistryError as exc:
        raise NotFound(str(exc)) from None
    try:
        load_model(row)
    except RegistryError as exc:
        raise Invalid(str(exc)) from None
    previous = activate(session, row, origin=origin)
    return None if previous is None else previous.version


def rollback(session: Session) -> tuple[ModelVersion, ModelVersion]:
    """Re-activate the version that was active before the current one.

    Returns ``(now_active, retired)``.
    """
    current = active_version(session)
    if current is None:
        raise RegistryError("no active version to roll back from")
    earlier = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.status == "retired",
            ModelVersion.activated_at.is_not(None),
            ModelVersion.id != current.id,
        )
        .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    if earlier is None:
        raise RegistryError(f"no earlier active version to roll back to from {current.version}")
    activate(session, earlier)
    return earlier, current


def load_model(row: ModelVersion) -> PropensityModel:
    """Load a registered version's bundle, verified against the registry and its manifest.

    Raises
    ------
    RegistryError
        If the manifest is not the one registered (the files were replaced) or the
        bundle fails its own checks (a missing or altered file, feature columns that do
        not match); the message says which.
    """
    path = Path(row.path)
    try:
        checksum = manifest_checksum(path)
    except RegistryError as exc:
        raise RegistryError(f"model version {row.version}: {exc}") from None
    if checksum != row.checksum:
        raise RegistryError(
            f"model version {row.version}: manifest {path / MANIFEST} has sha256 "
            f"{checksum[:12]}..., registered {row.checksum[:12]}...; the bundle was changed"
        )
    try:
        return load_bundle(path)
    except BundleError as exc:
        raise RegistryError(f"model version {row.version}: {exc}") from None


def describe(row: ModelVersion) -> dict[str, Any]:
    """A JSON-ready description of a version."""
    return {
        "version": row.version,
        "status": row.status,
        "as_of": row.as_of.isoformat(),
        "horizon_days": row.horizon_days,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "activated_at": row.activated_at.isoformat() if row.activated_at else None,
        "path": row.path,
        "checksum": row.checksum,
        "params": row.params,
        "metrics": row.metrics,
    }


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
