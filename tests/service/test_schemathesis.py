"""schemathesis against a live server, on SQLite and PostgreSQL: every operation of
``openapi.yaml``, its examples, coverage and fuzzing phases, and no answer that is a
server error or that differs from what the spec declares.

A trained bank is served by a real uvicorn (so what is checked is what goes over the
wire, through the decision lane too), and schemathesis runs as its own command line, as
a bank's integration team would run it. The number of cases per operation is kept small
enough for the suite (``NBO_SCHEMATHESIS_EXAMPLES`` raises it for a longer run).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.artifacts import save_bundle
from models.data import BankData
from models.propensity import TrainConfig
from models.propensity.training import train
from models.synthetic import generate_bank, write_bank
from service.app import create_app
from service.settings import Settings
from tests.bank import load_trained_bank
from tests.uvicorn_thread import uvicorn_thread

REPO = Path(__file__).resolve().parents[2]
AS_OF = dt.date(2026, 1, 1)
EXAMPLES = int(os.environ.get("NBO_SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)

pytestmark = pytest.mark.xdist_group("schemathesis")


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("st-bank")
    write_bank(generate_bank(400, seed=11), root / "bank")
    data = BankData.from_folder(root / "bank")
    bundle = root / "bundle"
    save_bundle(train(data, as_of=AS_OF, config=TrainConfig(max_rounds=20)), bundle)
    return root / "bank", bundle


@pytest.fixture
def served(database_url: str, bank: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The base URL of a live nbo on a trained bank, and an admin key."""
    folder, bundle = bank
    keys = load_trained_bank(database_url, folder, bundle, tmp_path, keys={"fuzzer": ["admin"]})
    key = keys["fuzzer"]
    settings = Settings(database_url=database_url, data_dir=tmp_path, cold_start=True)
    with uvicorn_thread(create_app(settings), http="httptools") as (host, port):
        yield f"http://{host}:{port}", key


def test_schemathesis_finds_no_failure(served: tuple[str, str], tmp_path: Path) -> None:
    url, key = served
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st is not None, "schemathesis is a test dependency: pip install -e '.[test]'"
    result = subprocess.run(
        [
            st,
            "run",
            str(REPO / "openapi.yaml"),
            "--url",
            url,
            "--header",
            f"Authorization: Bearer {key}",
            "--phases",
            "examples,coverage,fuzzing",
            "--checks",
            CHECKS,
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            "13",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--suppress-health-check",
            "all",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
    )
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
