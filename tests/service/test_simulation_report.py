"""``nbo simulate`` as a user runs it: a tiny run in its own process, every warning an
error, writing an HTML report over an older one; then the page in headless chromium.

The run is a separate process because a warning printed at import (as Starlette's
``TestClient`` printed one) shows only in a fresh interpreter: in the test process
the module is imported already.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service.test_dashboard import artifacts_dir, chromium, chromium_or_skip

DAYS = 3
CUSTOMERS = 300


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    report: Path
    work: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("simulate")
    report = folder / "simulation.html"
    report.write_text("an older report")
    work = folder / "work"
    command = [
        sys.executable,
        "-W", "error",  # any warning, DeprecationWarning or Starlette's own, fails the run
        "-c", "from service.cli.main import app; app()",
        "simulate",
        "--days", str(DAYS),
        "--customers", str(CUSTOMERS),
        "--visits-per-month", "3",
        "--retrain-every", "2",
        "--work", str(work),
        "--report", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder)
    return Run(done.returncode, done.stdout, done.stderr, report, work)


@pytest.mark.slow
def test_simulate_runs_without_warnings_and_replaces_the_report(run: Run) -> None:
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "Warning" not in output and "Traceback" not in output, output[-3000:]
    assert "uplift" in run.stdout and "NPS" in run.stdout
    # Rich folds a long path over lines: compare without white space.
    assert f"replaced{run.report}" in "".join(run.stdout.split())
    assert run.report.read_text().startswith("<!DOCTYPE html>")
    assert (run.work / "nbo.sqlite3").exists()
    assert "2 trained, 2 activated live" in run.stdout  # the live swap ran through the API


@pytest.mark.slow
def test_simulation_report_in_a_real_browser(run: Run, tmp_path: Path) -> None:
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    executable = chromium_or_skip()
    with chromium(executable, tmp_path / "chromium") as browser:
        browser.call("Page.enable")
        browser.call("Log.enable")
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        browser.call("Page.navigate", url=run.report.as_uri())
        browser.wait_for("document.images.length > 0")
        browser.wait_for("Array.from(document.images).every(i => i.complete)")
        assert browser.evaluate("document.title").startswith("nbo simulation: 300 customers")
        headings = browser.evaluate(
            "Array.from(document.querySelectorAll('h1, h2')).map(h => h.textContent.trim())"
        )
        assert headings[0].startswith("nbo simulation")
        assert headings[1:] == [
            "Summary",
            "Conversion: treated versus control",
            "NPS",
            "Uplift against the control group",
            "By product",
            "Model versions",
        ]
        summary = dict(
            browser.evaluate(
                "Array.from(document.querySelectorAll('#summary-table tr')).map(r =>"
                " [r.querySelector('th').textContent.trim(), r.querySelector('td').textContent.trim()])"
            )
        )
        assert summary["customers"] == f"{CUSTOMERS:,}"
        assert summary["simulated days"].startswith(f"{DAYS} (")
        for name in ("contacts (branch visits)", "decisions", "offers", "outcomes"):
            assert summary[name].split(":")[0].replace(",", "").isdigit(), (name, summary[name])
        treated = int(summary["treatment group"].split()[0].replace(",", ""))
        control = int(summary["control group"].split()[0].replace(",", ""))
        assert treated > control > 0

        images = browser.evaluate(
            "Array.from(document.images).map(i => [i.closest('figure').id, i.naturalWidth,"
            " i.naturalHeight, i.getBoundingClientRect().width])"
        )
        assert [figure for figure, *_ in images] == [
            "chart-conversion",
            "chart-nps",
            "chart-uplift",
        ]
        for figure, natural_width, natural_height, shown_width in images:
            assert natural_width > 600 and natural_height > 200, figure  # the PNG decoded
            assert shown_width > 600, figure  # and is laid out at a readable size
        # The page fetched nothing: every image is inline.
        sources = browser.evaluate("Array.from(document.images).map(i => i.src.slice(0, 22))")
        assert set(sources) == {"data:image/png;base64,"}

        height = browser.evaluate("document.documentElement.scrollHeight")
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = browser.call("Page.captureScreenshot", format="png")
        path = artifacts_dir() / "simulation-report.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 10_000
        errors = [
            e["params"]["entry"]
            for e in browser.events
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        assert errors == [], json.dumps(errors)[:2000]
