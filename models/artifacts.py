"""Model bundles: a trained :class:`models.propensity.PropensityModel` on disk.

A bundle is a folder of native, inspectable files, never pickles::

    manifest.json        format version, model version id, dates, data window,
                         feature columns, products, parameters, metrics, library
                         versions, and the sha256 of every other file
    feature_spec.json    feature columns and categorical levels
    catalogue.json       the training catalogue (names, eligibility rules)
    rules.json           sequence rules (models.rules.RuleSet JSON), if used
    calibration.json     per product: calibrator, blend, base rate
    report.json          training report (validation metrics per product)
    models/<code>.txt    one LightGBM text model per product with a booster

:func:`save_bundle` writes the folder atomically (a temporary sibling renamed into
place); :func:`load_bundle` checks the format version, every checksum and the feature
columns before building the model, and raises a :class:`BundleError` subclass naming
what is wrong. Saving and loading a model gives bit-identical scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TypeVar

import pandas as pd

from models.eligibility import Catalogue
from models.features import FeatureSpec
from models.propensity import (
    Blend,
    Calibrator,
    ProductModel,
    PropensityModel,
    TrainConfig,
)
from models.rules import RuleSet

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "BundleError",
    "ChecksumMismatchError",
    "FeatureColumnsMismatchError",
    "FormatVersionError",
    "MissingFileError",
    "load_bundle",
    "read_manifest",
    "save_bundle",
]

BUNDLE_FORMAT: Final[str] = "nbo.model-bundle"
BUNDLE_VERSION: Final[int] = 1
MANIFEST: Final[str] = "manifest.json"
_LIBRARIES: Final[tuple[str, ...]] = ("lightgbm", "numpy", "pandas", "mlxtend", "scikit-learn")
_T = TypeVar("_T")


class BundleError(Exception):
    """A model bundle cannot be saved or loaded; the message says what and where.

    Attributes
    ----------
    path : pathlib.Path
        The bundle folder or the offending file.
    """

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class MissingFileError(BundleError):
    """A file the bundle needs is absent."""


class ChecksumMismatchError(BundleError):
    """A file's sha256 differs from the manifest's (corrupted or edited)."""


class FeatureColumnsMismatchError(BundleError):
    """The feature columns of the spec, the manifest and the boosters disagree."""


class FormatVersionError(BundleError):
    """The bundle is not an nbo model bundle of a version this code reads."""


# --------------------------------------------------------------------------- saving


def save_bundle(
    model: PropensityModel,
    path: str | Path,
    *,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a model as a bundle folder.

    Parameters
    ----------
    model : PropensityModel
        The model.
    path : str or pathlib.Path
        The folder to create; it must not exist, or be empty.
    metrics : mapping, optional
        Evaluation metrics to record in the manifest (JSON values); empty by default,
        to be filled by an evaluation job.

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    BundleError
        If ``path`` exists and is not an empty folder, or a product code cannot be a
        file name.
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BundleError(f"{target} exists and is not an empty folder", path=target)
    files = _bundle_files(model, target)
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir(parents=True)
    try:
        digests = {}
        for name, content in files.items():
            file = temporary / name
            file.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode("utf-8")
            file.write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        manifest = _manifest(model, digests, metrics)
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
        if target.exists():
            target.rmdir()
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return manifest


def _bundle_files(model: PropensityModel, target: Path) -> dict[str, str]:
    files = {
        "feature_spec.json": model.spec.to_json(),
        "catalogue.json": json.dumps(model.catalogue.to_records(), indent=1, allow_nan=False),
        "calibration.json": json.dumps(
            {"products": [p.parameters() for p in model.products]}, indent=1, allow_nan=False
        ),
        "report.json": json.dumps(_json_safe(model.report), indent=1, allow_nan=False),
    }
    if model.rules is not None:
        files["rules.json"] = model.rules.to_json()
    for product in model.products:
        if product.model_text is None:
            continue
        name = _model_file(product.product_code)
        if Path(name).name != f"{product.product_code}.txt" or product.product_code.startswith("."):
            raise BundleError(
                f"product code {product.product_code!r} cannot be used as a file name",
                path=target,
            )
        files[name] = product.model_text
    return files


def _model_file(code: str) -> str:
    return f"models/{code}.txt"


def _manifest(
    model: PropensityModel, digests: Mapping[str, str], metrics: Mapping[str, Any] | None
) -> dict[str, Any]:
    # The version id names the model's content: the training report (with its
    # timings) is left out, so the same model always gets the same id.
    content = hashlib.sha256(
        "".join(
            f"{name}:{digest}\n"
            for name, digest in sorted(digests.items())
            if name != "report.json"
        ).encode()
    ).hexdigest()
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "model_version": f"{model.as_of:%Y%m%d}-{content[:12]}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "as_of": model.as_of.isoformat(),
        "horizon_days": model.horizon_days,
        "data_window": model.window,
        "feature_columns": list(model.spec.columns),
        "categorical_columns": list(model.spec.categorical),
        "products": [
            {
                "product_code": p.product_code,
                "kind": "lightgbm" if p.model_text is not None else "base_rate",
                "model_file": None if p.model_text is None else _model_file(p.product_code),
                "n_trees": _tree_count(p.model_text),
            }
            for p in model.products
        ],
        "parameters": {
            "train_config": model.config.to_dict(),
            "lightgbm": model.config.lightgbm_params(),
        },
        "metrics": _json_safe(dict(metrics or {})),
        "training": _json_safe(
            {"summary": model.report.get("summary"), "seconds": model.report.get("seconds")}
        ),
        "libraries": _library_versions(),
        "files": dict(sorted(digests.items())),
    }


def _tree_count(text: str | None) -> int:
    if text is None:
        return 0
    return text.count("\nTree=")


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None, so the document is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a bundle's manifest without loading the model.

    Parameters
    ----------
    path : str or pathlib.Path
        The bundle folder.

    Returns
    -------
    dict
        The manifest.

    Raises
    ------
    MissingFileError
        If there is no manifest.
    FormatVersionError
        If it is not a bundle manifest of a known version.
    BundleError
        If it is not valid JSON.
    """
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise MissingFileError(f"{folder}: missing file {MANIFEST}", path=file)
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{file}: not valid JSON ({error})", path=file) from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise FormatVersionError(f"{file}: not an {BUNDLE_FORMAT} manifest", path=file)
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise FormatVersionError(
            f"{file}: unknown format version {manifest.get('format_version')!r} "
            f"(this code reads version {BUNDLE_VERSION})",
            path=file,
        )
    return manifest


def load_bundle(path: str | Path) -> PropensityModel:
    """Load and verify a bundle written by :func:`save_bundle`.

    Every file listed in the manifest must exist with its recorded sha256; the feature
    spec's columns must equal the manifest's, and every booster's feature names must
    equal them too. The model is built completely before it is returned.

    Parameters
    ----------
    path : str or pathlib.Path
        The bundle folder.

    Returns
    -------
    PropensityModel
        Scores bit-identical to the model that was saved.

    Raises
    ------
    MissingFileError
        A listed file (or the manifest) is missing.
    ChecksumMismatchError
        A file's content differs from its recorded checksum.
    FeatureColumnsMismatchError
        Feature columns disagree between manifest, spec and boosters.
    FormatVersionError
        Unknown bundle format or version.
    BundleError
        Any other inconsistency (unparseable file, products that do not match).
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    texts: dict[str, str] = {}
    for name, digest in dict(manifest.get("files", {})).items():
        file = folder / name
        if not file.is_file():
            raise MissingFileError(f"{folder}: missing file {name}", path=file)
        data = file.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ChecksumMismatchError(
                f"{file}: sha256 {actual} does not match the manifest's {digest}", path=file
            )
        texts[name] = data.decode("utf-8")
    for required in ("feature_spec.json", "catalogue.json", "calibration.json"):
        if required not in texts:
            raise MissingFileError(
                f"{folder}: the manifest does not list {required}", path=folder / required
            )

    spec = _parse(
        folder, "feature_spec.json", lambda: FeatureSpec.from_json(texts["feature_spec.json"])
    )
    columns = list(manifest.get("feature_columns", []))
    if columns != list(spec.columns):
        raise FeatureColumnsMismatchError(
            f"{folder}: feature columns differ between manifest.json and feature_spec.json: "
            f"{_difference(columns, list(spec.columns))}",
            path=folder / "feature_spec.json",
        )
    catalogue = _parse(
        folder,
        "catalogue.json",
        lambda: Catalogue.from_records(json.loads(texts["catalogue.json"])),
    )
    rules = None
    if "rules.json" in texts:
        rules = _parse(folder, "rules.json", lambda: RuleSet.from_json(texts["rules.json"]))
    products = _products(folder, manifest, texts, spec)
    report = _parse(folder, "report.json", lambda: json.loads(texts.get("report.json", "{}")))
    try:
        return PropensityModel(
            spec=spec,
            catalogue=catalogue,
            rules=rules,
            products=products,
            as_of=pd.Timestamp(manifest["as_of"]),
            horizon_days=int(manifest["horizon_days"]),
            config=TrainConfig.from_dict(manifest["parameters"]["train_config"]),
            window=dict(manifest["data_window"]),
            report=report,
        )
    except (KeyError, TypeError, ValueError) as error:  # NativeError: a ValueError
        raise BundleError(f"{folder}: inconsistent bundle ({error})", path=folder) from error


def _products(
    folder: Path, manifest: Mapping[str, Any], texts: Mapping[str, str], spec: FeatureSpec
) -> tuple[ProductModel, ...]:
    calibration = _parse(
        folder, "calibration.json", lambda: json.loads(texts["calibration.json"])["products"]
    )
    listed = [entry["product_code"] for entry in manifest.get("products", [])]
    calibrated = [entry["product_code"] for entry in calibration]
    if listed != calibrated:
        raise BundleError(
            f"{folder}: products differ between manifest.json {listed} and calibration.json "
            f"{calibrated}",
            path=folder / "calibration.json",
        )
    products = []
    for entry, parameters in zip(manifest["products"], calibration, strict=True):
        code = entry["product_code"]
        text = None
        if entry.get("model_file") is not None:
            name = entry["model_file"]
            if name not in texts:
                raise MissingFileError(
                    f"{folder}: the manifest does not list the model file {name}",
                    path=folder / name,
                )
            text = texts[name]
            names = _feature_names(text)
            if names != list(spec.columns):
                raise FeatureColumnsMismatchError(
                    f"{folder / name}: the booster's feature columns differ from "
                    f"feature_spec.json: {_difference(names, list(spec.columns))}",
                    path=folder / name,
                )
        if (text is not None) != bool(parameters["has_model"]):
            raise BundleError(
                f"{folder}: calibration.json and manifest.json disagree on whether {code} "
                "has a booster",
                path=folder / "calibration.json",
            )
        blend = parameters.get("blend")
        products.append(
            ProductModel(
                product_code=code,
                model_text=text,
                calibrator=Calibrator.from_dict(parameters["calibrator"]),
                blend=None if blend is None else Blend.from_dict(blend),
                base_rate=float(parameters["base_rate"]),
            )
        )
    return tuple(products)


def _feature_names(text: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith("feature_names="):
            return line[len("feature_names=") :].split(" ")
        if line.startswith("Tree="):
            break
    return []


def _difference(found: list[str], expected: list[str]) -> str:
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    if missing or extra:
        return f"missing {missing[:5]}, unexpected {extra[:5]}"
    return "same columns in a different order"


def _parse(folder: Path, name: str, parse: Callable[[], _T]) -> _T:
    try:
        return parse()
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(
            f"{folder / name}: cannot be read ({error})", path=folder / name
        ) from None
