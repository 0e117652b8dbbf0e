"""Work in a child interpreter (service.child): what it returns comes back, its log
lines come out in the worker's format, and a child that fails says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from service import child
from service.settings import Settings


def say(settings: Settings, *, text: str) -> dict[str, Any]:
    """A child's target: one warning, and what it was given back."""
    logging.getLogger("nbo.test").warning(text)
    return {"said": text, "level": settings.log_level}


def fail(settings: Settings) -> None:
    raise RuntimeError("no")


def test_a_child_returns_its_result_and_logs_as_the_worker_does(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path, log_format="json", log_level="info")
    assert child.run(settings, f"{__name__}:say", text="héllo") == {
        "said": "héllo",
        "level": "info",
    }
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line]
    assert [(line["level"], line["logger"], line["msg"]) for line in lines] == [
        ("WARNING", "nbo.test", "héllo")
    ]


def test_a_child_that_fails_says_so(tmp_path: Path) -> None:
    with pytest.raises(child.ChildFailed, match="fail failed in a child process"):
        child.run(Settings(data_dir=tmp_path), f"{__name__}:fail")
