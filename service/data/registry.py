"""The model registry: versions and their bundles in the database, one active.

A model version is a bundle folder (written by :mod:`models.artifacts`) and a
``model_versions`` row with its manifest checksum, data window, parameters and
holdout metrics. At most one version is ``active``; the others are ``candidate``
(trained, not promoted), ``retired`` (was active) or ``rejected`` (failed the
promotion gate).

Where bundles live. Registration stores every file of the bundle in
``model_files`` (name inside the bundle, sha256, size, content), in the same
transaction as the version's row, so a version is loadable by every replica that
reaches the database, whatever machine trained it. The row's ``path`` is then the
location inside that store, ``db:<version>`` (:data:`STORE_PREFIX`), never a
folder of one machine. Loading (:func:`load_model`) materialises the files into a
local cache folder, ``<data_dir>/models/<version>`` (``Settings.artifacts_dir``):
written to a temporary folder beside it, each file checked against its stored
sha256 and the manifest against the registered checksum, then renamed into place
in one step, so workers materialising the same version at once never see (or
leave) a half-written folder. A cache whose manifest matches the registered
checksum is reused; one that does not (or fails the bundle's own checks) is
replaced from the database, which is the authority. Rows registered before
migration 0009 whose folder was missing on the migrating machine keep their
absolute ``path`` and load from it as before.

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
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from models.artifacts import BundleError, load_bundle
from models.propensity import PropensityModel
from service.data.events import record_event
from service.data.tables import ModelFile, ModelVersion
from service.errors import Invalid, NotFound

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

STORE_PREFIX = "db:"
"""``model_versions.path`` of a version whose bundle is stored in ``model_files``:
``db:<version>``."""

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
    """Store ``bundle`` in the database, record it, and apply the promotion gate.

    Every file of the bundle goes into ``model_files`` in the session's transaction,
    with the version's row (``path`` ``db:<version>``); ``artifacts_dir`` is this
    machine's cache of bundles, warmed with this one (a cache that cannot be written
    is only logged: the database holds the bundle).

    ``metrics[gate_metric]`` is compared with the active version's (``active_value``
    when the caller measured it on the candidate's holdout, else its recorded metric,
    only when both were measured on the same kind of holdout); the new version is
    activated when ``new >= active * (1 - tolerance)``. ``params`` and ``metrics``
    should record the holdout (``metrics["holdout_kind"]``).

    Raises
    ------
    RegistryError
        If ``bundle`` is not a bundle folder, or ``version`` is already registered.
    """
    checksum = manifest_checksum(bundle)
    version = version or new_version_id(checksum)
    if session.scalar(select(ModelVersion.id).where(ModelVersion.version == version)):
        raise RegistryError(f"model version '{version}' is already registered")
    files = read_bundle_files(bundle)
    row = ModelVersion(
        version=version,
        status="candidate",
        path=STORE_PREFIX + version,
        checksum=checksum,
        as_of=as_of,
        horizon_days=horizon_days,
        params=params,
        metrics=metrics,
    )
    session.add(row)
    session.flush()
    session.add_all(
        ModelFile(
            version=version,
            name=name,
            sha256=hashlib.sha256(content).hexdigest(),
            size=len(content),
            content=content,
        )
        for name, content in files.items()
    )
    session.flush()
    try:
        _install(artifacts_dir, version, files, checksum)
    except OSError as exc:
        log.warning(
            "model cache not written", extra={"version": version, "error": type(exc).__name__}
        )
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


def activate_version(
    session: Session, *, version: str, origin: str, cache_dir: Path | None = None
) -> str | None:
    """Make ``version`` active by hand once its bundle loads; return the version retired.

    The bundle is checked (:func:`load_model`, materialised into ``cache_dir`` or a
    temporary folder) before anything changes, so a version that no worker could serve
    never becomes active. Its ``model`` change event tells every other worker to load
    it.

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
        load_model(session, row, cache_dir=cache_dir)
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


def load_model(
    bind: Session | Connection, row: ModelVersion, *, cache_dir: Path | None = None
) -> PropensityModel:
    """Load a registered version's bundle, verified against the registry and its manifest.

    A stored bundle (``path`` ``db:<version>``) is read from ``cache_dir/<version>``
    when that copy's manifest is the registered one, else materialised there from the
    database through ``bind`` (see the module docstring); without ``cache_dir`` it is
    materialised into a temporary folder, removed once loaded. A version registered
    before bundles were stored loads from its ``path`` folder.

    Raises
    ------
    RegistryError
        If a stored file or the manifest is not the one registered (the bundle was
        changed), nothing is stored for the version, its folder is missing, or the
        bundle fails its own checks (a missing or altered file, feature columns that
        do not match); the message says which.
    """
    if not row.path.startswith(STORE_PREFIX):
        return _load_folder(row, Path(row.path))
    if cache_dir is None:
        try:
            with tempfile.TemporaryDirectory(prefix="nbo-model-") as tmp:
                return _load_folder(row, materialise(bind, row, Path(tmp)))
        except OSError as exc:
            raise RegistryError(
                f"model version {row.version}: cannot write a temporary copy ({exc})"
            ) from None
    cached = cache_dir / row.version
    damaged = False
    if _is_cached(cached, row.checksum):
        try:
            return load_bundle(cached)
        except BundleError as exc:
            damaged = True
            log.warning(
                "cached model bundle damaged; fetched again",
                extra={"version": row.version, "error": str(exc)},
            )
    try:
        folder = materialise(bind, row, cache_dir, replace=damaged)
    except OSError as exc:
        raise RegistryError(
            f"model version {row.version}: cannot write the model cache {cache_dir} ({exc})"
        ) from None
    return _load_folder(row, folder)


def materialise(
    bind: Session | Connection, row: ModelVersion, cache_dir: Path, *, replace: bool = False
) -> Path:
    """Write ``row``'s stored bundle to ``cache_dir/<version>`` and return that folder.

    Each file is checked against its stored sha256 and size, and the manifest against
    the registered checksum, before anything is written. The files go to a temporary
    folder in ``cache_dir``, renamed into place in one step: a worker that finds the
    folder already there (another worker materialised it first) keeps it when its
    manifest is the registered one; otherwise (a stale or damaged copy, or always with
    ``replace``) the old folder is moved aside and removed.

    Raises
    ------
    RegistryError
        If nothing is stored for the version or a stored file is not the one
        registered.
    """
    rows = bind.execute(
        select(ModelFile.name, ModelFile.sha256, ModelFile.size, ModelFile.content)
        .where(ModelFile.version == row.version)
        .order_by(ModelFile.name)
    ).all()
    if not rows:
        raise RegistryError(
            f"model version {row.version}: no bundle files stored in the database for it"
        )
    files: dict[str, bytes] = {}
    for name, sha256, size, content in rows:
        _check_name(row.version, name)
        data = bytes(content)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256 or len(data) != size:
            raise RegistryError(
                f"model version {row.version}: stored file {name} has sha256 "
                f"{digest[:12]}... ({len(data)} bytes), registered {sha256[:12]}... "
                f"({size} bytes); the bundle was changed"
            )
        files[name] = data
    manifest = files.get(MANIFEST)
    if manifest is None:
        raise RegistryError(f"model version {row.version}: no {MANIFEST} stored; not a bundle")
    checksum = hashlib.sha256(manifest).hexdigest()
    if checksum != row.checksum:
        raise RegistryError(
            f"model version {row.version}: stored {MANIFEST} has sha256 {checksum[:12]}..., "
            f"registered {row.checksum[:12]}...; the bundle was changed"
        )
    return _install(cache_dir, row.version, files, row.checksum, replace=replace)


def stored_size(session: Session, version: str) -> tuple[int, int]:
    """How many files of ``version``'s bundle the database holds, and their bytes."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(ModelFile.size), 0)).where(
            ModelFile.version == version
        )
    ).one()
    return int(count), int(size)


def read_bundle_files(bundle: Path) -> dict[str, bytes]:
    """Every file of a bundle folder by its path inside it (``/``-separated), sorted."""
    return {
        file.relative_to(bundle).as_posix(): file.read_bytes()
        for file in sorted(bundle.rglob("*"))
        if file.is_file()
    }


def _check_name(version: str, name: str) -> None:
    """Refuse a stored name that would write outside the bundle folder."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise RegistryError(f"model version {version}: stored file name {name!r} is not safe")


def _is_cached(folder: Path, checksum: str) -> bool:
    try:
        return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest() == checksum
    except OSError:
        return False


def _install(
    cache_dir: Path, version: str, files: dict[str, bytes], checksum: str, *, replace: bool = False
) -> Path:
    """Put ``files`` at ``cache_dir/<version>`` by one rename of a complete folder."""
    target = cache_dir / version
    if not replace and _is_cached(target, checksum):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir / f".{version}.{uuid.uuid4().hex[:12]}.tmp"
    temporary.mkdir()
    try:
        for name, content in files.items():
            file = temporary / name
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(content)
        for _ in range(5):
            try:
                os.rename(temporary, target)
                return target
            except OSError:
                if not target.exists():
                    continue
                if not replace and _is_cached(target, checksum):
                    return target  # another worker installed the same bundle first
            # A stale or damaged copy: move it aside in one step, then remove it.
            aside = cache_dir / f".{version}.{uuid.uuid4().hex[:12]}.old"
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                pass
            else:
                shutil.rmtree(aside, ignore_errors=True)
            replace = False
        raise RegistryError(f"model version {version}: could not write {target}")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _load_folder(row: ModelVersion, path: Path) -> PropensityModel:
    """Load the bundle folder ``path`` of ``row``, checked against the registered manifest."""
    if not path.is_dir():
        raise RegistryError(
            f"model version {row.version}: its bundle folder {path} is not on this machine "
            "and the database holds no copy (it was registered before bundles were stored "
            "there); restore the folder, or train and register a new version"
        )
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
