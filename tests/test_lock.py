"""The lock files pin exactly what pyproject.toml allows, and the tests run on those pins.

``requirements.lock`` (runtime, the Docker image) and ``requirements-test.lock`` (runtime
and the ``test`` extra: ``make install`` and CI) are made by ``scripts/lock``. These checks
read the files only: no network, no pip.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"


@dataclass(frozen=True)
class Pin:
    """One locked requirement: ``name==version`` and the sha256 hashes allowed for it."""

    name: NormalizedName
    version: Version
    hashes: frozenset[str]


def parse_lock(text: str) -> dict[NormalizedName, Pin]:
    """The pins of a pip-compile lock, by normalised name.

    Raises ValueError for a requirement that is not pinned with ``==`` or a name pinned twice.
    """
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    pins: dict[NormalizedName, Pin] = {}
    for line in logical:
        if line.startswith("-"):
            continue  # an option line (pip-compile writes none with scripts/lock's flags)
        requirement, *options = line.split(" --")
        req = Requirement(requirement)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise ValueError(f"not pinned with ==: {line!r}")
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"{name} is pinned twice")
        hashes = frozenset(
            option.removeprefix("hash=sha256:")
            for option in options
            if option.startswith("hash=sha256:")
        )
        pins[name] = Pin(name, Version(specs[0].version), hashes)
    return pins


def project() -> tuple[list[Requirement], list[Requirement]]:
    """pyproject.toml's runtime dependencies and its ``test`` extra."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(line) for line in meta["dependencies"]]
    test = [Requirement(line) for line in meta["optional-dependencies"]["test"]]
    return runtime, test


def unsatisfied(requirements: list[Requirement], pins: dict[NormalizedName, Pin]) -> list[str]:
    """Each requirement that the lock does not pin, or pins outside its specifier."""
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req.name}: locked {pin.version}, pyproject wants {req.specifier}")
    return problems


def unhashed(pins: dict[NormalizedName, Pin]) -> list[str]:
    """Each pin without a sha256 (``pip install --require-hashes`` refuses the whole file)."""
    return [name for name, pin in pins.items() if not pin.hashes]


def differing(runtime: dict[NormalizedName, Pin], test: dict[NormalizedName, Pin]) -> list[str]:
    """Each runtime pin that the test lock lacks or pins differently (version or hashes)."""
    return [
        f"{name}: {pin.version} in the runtime lock, "
        f"{test[name].version if name in test else 'absent'} in the test lock"
        for name, pin in runtime.items()
        if test.get(name) != pin
    ]


def installed_versions() -> dict[NormalizedName, Version]:
    """The version of every distribution installed in this environment, by normalised name."""
    return {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version)
        for dist in importlib.metadata.distributions()
    }


def not_as_locked(
    requirements: list[Requirement],
    pins: dict[NormalizedName, Pin],
    installed: dict[NormalizedName, Version],
) -> list[str]:
    """Each direct dependency installed at a version other than the lock's (or missing)."""
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        pin = pins.get(name)
        have = installed.get(name)
        if pin is None or have != pin.version:
            locked = pin.version if pin else "not locked"
            problems.append(f"{req.name}: installed {have or 'nothing'}, locked {locked}")
    return problems


def test_runtime_lock_pins_every_dependency_within_pyproject() -> None:
    runtime, _ = project()
    assert unsatisfied(runtime, parse_lock(RUNTIME_LOCK.read_text())) == []


def test_test_lock_pins_runtime_and_test_dependencies_within_pyproject() -> None:
    runtime, test = project()
    assert unsatisfied(runtime + test, parse_lock(TEST_LOCK.read_text())) == []


def test_every_pin_has_a_hash() -> None:
    for lock in (RUNTIME_LOCK, TEST_LOCK):
        pins = parse_lock(lock.read_text())
        assert pins, f"{lock.name} pins nothing"
        assert unhashed(pins) == [], lock.name


def test_runtime_pins_are_the_test_lock_pins() -> None:
    """The image runs the versions the tests ran on."""
    runtime = parse_lock(RUNTIME_LOCK.read_text())
    test = parse_lock(TEST_LOCK.read_text())
    assert differing(runtime, test) == []


def test_installed_direct_dependencies_are_the_locked_versions() -> None:
    """This environment (CI's, made by ``make install``) runs exactly what the lock says."""
    runtime, test = project()
    pins = parse_lock(TEST_LOCK.read_text())
    assert not_as_locked(runtime + test, pins, installed_versions()) == []


# The checks above, on broken copies of the real files: each must notice.


def _edit_pin(text: str, name: str, version: str) -> str:
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{name}=="))
    lines[at] = f"{name}=={version} \\\n"
    return "".join(lines)


def _drop_entry(text: str, name: str, keep_requirement: bool) -> str:
    """Remove ``name``'s hashes (and its requirement line unless ``keep_requirement``)."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{name}=="))
    end = at + 1
    while end < len(lines) and lines[end].startswith("    --hash"):
        end += 1
    kept = [lines[at].removesuffix(" \\\n") + "\n"] if keep_requirement else []
    return "".join(lines[:at] + kept + lines[end:])


def test_the_checks_catch_broken_locks() -> None:
    runtime, test = project()
    text = RUNTIME_LOCK.read_text()
    test_text = TEST_LOCK.read_text()
    fastapi = parse_lock(text)["fastapi"]
    beyond = Version(f"{fastapi.version.major}.{fastapi.version.minor + 1}.0")
    assert unsatisfied(runtime, parse_lock(_edit_pin(text, "fastapi", str(beyond))))
    assert unsatisfied(runtime, parse_lock(_drop_entry(text, "lightgbm", keep_requirement=False)))
    assert unsatisfied(runtime + test, parse_lock(_drop_entry(test_text, "pytest", False)))
    assert unhashed(parse_lock(_drop_entry(text, "numpy", keep_requirement=True))) == ["numpy"]
    assert differing(parse_lock(_edit_pin(text, "numpy", "1.26.4")), parse_lock(test_text))
    installed = installed_versions() | {canonicalize_name("pytest"): Version("0.1")}
    assert not_as_locked(test, parse_lock(test_text), installed)
    with pytest.raises(ValueError, match="not pinned"):
        parse_lock("numpy>=1.26 \\\n    --hash=sha256:00\n")
    with pytest.raises(ValueError, match="twice"):
        parse_lock("numpy==1.26.4\nNumPy==2.0.0\n")
