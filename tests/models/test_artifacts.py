"""Model bundles: native files, a verified manifest, bit-identical scores after loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightgbm
import pandas as pd
import pytest

from models.artifacts import (
    BUNDLE_VERSION,
    BundleError,
    ChecksumMismatchError,
    FeatureColumnsMismatchError,
    FormatVersionError,
    MissingFileError,
    load_bundle,
    read_manifest,
    save_bundle,
)
from models.data import BankData
from models.propensity import PropensityModel, TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank

AS_OF = pd.Timestamp("2025-06-01")


@pytest.fixture(scope="module")
def data() -> BankData:
    bank = generate_bank(8_000, seed=31)
    return BankData.from_frames(bank.products, bank.customers, bank.adoptions)


@pytest.fixture(scope="module")
def model(data: BankData) -> PropensityModel:
    return train(data, as_of=AS_OF, config=TrainConfig(n_cutoffs=2))


@pytest.fixture
def bundle(model: PropensityModel, tmp_path: Path) -> Path:
    path = tmp_path / "bundle"
    save_bundle(model, path)
    return path


def _rewrite(bundle: Path, name: str, text: str, *, fix_checksum: bool) -> None:
    """Replace a file; optionally record its new checksum so other checks are reached."""
    (bundle / name).write_text(text)
    if fix_checksum:
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"][name] = hashlib.sha256(text.encode()).hexdigest()
        (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_gives_bit_identical_scores(
    model: PropensityModel, bundle: Path, data: BankData
) -> None:
    loaded = load_bundle(bundle)
    before = model.score(data, as_of=AS_OF)
    after = loaded.score(data, as_of=AS_OF)
    assert len(before) > 10_000
    pd.testing.assert_frame_equal(after, before, check_exact=True)
    for customer in data.customers["customer_id"].iloc[::400]:
        state = data.customer_state(customer)
        assert loaded.score_customer(state, as_of=AS_OF) == model.score_customer(state, as_of=AS_OF)
    assert loaded.spec == model.spec
    assert loaded.rules is not None and model.rules is not None
    assert loaded.rules.to_json() == model.rules.to_json()
    assert loaded.config == model.config


def test_bundle_is_native_files_with_a_complete_manifest(
    model: PropensityModel, bundle: Path
) -> None:
    manifest = read_manifest(bundle)
    assert manifest["format_version"] == BUNDLE_VERSION
    assert manifest["model_version"].startswith("20250601-")
    assert manifest["as_of"] == "2025-06-01T00:00:00"
    assert manifest["horizon_days"] == 90
    assert manifest["feature_columns"] == list(model.spec.columns)
    assert manifest["data_window"]["validation_cutoff"] == "2025-03-01T00:00:00"
    assert manifest["parameters"]["train_config"]["n_cutoffs"] == 2
    assert manifest["metrics"] == {}
    assert manifest["libraries"]["lightgbm"] == lightgbm.__version__
    assert set(manifest["libraries"]) >= {"python", "numpy", "pandas", "mlxtend", "lightgbm"}
    listed = {p["product_code"] for p in manifest["products"]}
    assert listed == set(model.product_codes)

    on_disk = {str(path.relative_to(bundle)) for path in bundle.rglob("*") if path.is_file()} - {
        "manifest.json"
    }
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
        assert name.endswith((".json", ".txt"))  # native text formats, no pickle
    for product in manifest["products"]:
        if product["model_file"] is not None:
            booster = lightgbm.Booster(model_file=str(bundle / product["model_file"]))
            assert booster.feature_name() == list(model.spec.columns)
            assert booster.num_trees() == product["n_trees"]


def test_the_same_model_gets_the_same_version_id(model: PropensityModel, tmp_path: Path) -> None:
    first = save_bundle(model, tmp_path / "one")
    second = save_bundle(model, tmp_path / "two", metrics={"auc": 0.7})
    assert first["model_version"] == second["model_version"]
    assert read_manifest(tmp_path / "two")["metrics"] == {"auc": 0.7}


def test_corrupted_file_is_named(bundle: Path) -> None:
    model_file = next((bundle / "models").iterdir())
    text = model_file.read_text()
    model_file.write_text(text.replace("leaf_value=", "leaf_value=1", 1))
    with pytest.raises(ChecksumMismatchError, match=model_file.name) as caught:
        load_bundle(bundle)
    assert caught.value.path == model_file


def test_missing_file_is_named(bundle: Path) -> None:
    (bundle / "rules.json").unlink()
    with pytest.raises(MissingFileError, match="rules.json"):
        load_bundle(bundle)


def test_missing_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").unlink()
    with pytest.raises(MissingFileError, match="manifest.json"):
        load_bundle(bundle)


def test_changed_feature_columns_are_refused(bundle: Path) -> None:
    spec = json.loads((bundle / "feature_spec.json").read_text())
    spec["attributes"] = spec["attributes"][:-1]  # one attribute fewer
    spec["columns"] = [c for c in spec["columns"] if c != "attr_digital_active"]
    _rewrite(bundle, "feature_spec.json", json.dumps(spec), fix_checksum=True)
    with pytest.raises(FeatureColumnsMismatchError, match="attr_digital_active"):
        load_bundle(bundle)


def test_booster_with_other_columns_is_refused(bundle: Path) -> None:
    name = next(
        p
        for p in json.loads((bundle / "manifest.json").read_text())["files"]
        if p.startswith("models/")
    )
    text = (bundle / name).read_text().replace(" attr_income ", " attr_salary ", 1)
    _rewrite(bundle, name, text, fix_checksum=True)
    with pytest.raises(FeatureColumnsMismatchError, match="attr_salary"):
        load_bundle(bundle)


def test_unknown_format_version_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = BUNDLE_VERSION + 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatVersionError, match="version 2"):
        load_bundle(bundle)


def test_every_error_is_a_bundle_error(bundle: Path) -> None:
    for error in (ChecksumMismatchError, MissingFileError, FeatureColumnsMismatchError):
        assert issubclass(error, BundleError)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)


def test_saving_never_overwrites(model: PropensityModel, bundle: Path) -> None:
    with pytest.raises(BundleError, match="exists"):
        save_bundle(model, bundle)
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.tmp")]
