"""Work in a child interpreter (service.child): what it returns comes back, its log
lines come out in the worker's format, a child that fails says so, and no child outlives
its worker's stop or death."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
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


def sleep_a_while(settings: Settings, *, pid_file: str) -> None:
    """A child's target that says where it is and then works (sleeps) for a minute."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)


def _pid_from(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"no child wrote {path}"
        time.sleep(0.05)
    return int(path.read_text())


def gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ended (exited, or a zombie nobody reaped) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if status.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_stop_all_ends_a_running_child_and_starts_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(child, "_stopping", False)
    monkeypatch.setattr(child, "_running", set())
    settings = Settings(data_dir=tmp_path)
    pid_file = tmp_path / "child.pid"
    raised: list[BaseException] = []

    def work() -> None:
        try:
            child.run(settings, f"{__name__}:sleep_a_while", pid_file=str(pid_file))
        except BaseException as exc:  # noqa: BLE001 - what run raised is the result
            raised.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    pid = _pid_from(pid_file)
    stopped = time.monotonic()
    child.stop_all()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert time.monotonic() - stopped < child.STOP_GRACE_SECONDS + 2
    assert [type(exc) for exc in raised] == [child.ChildStopped]
    assert gone(pid, timeout=1)
    assert child.stopping()
    # The worker is stopping: no new child is started.
    with pytest.raises(child.ChildStopped, match="no child process started"):
        child.run(settings, f"{__name__}:say", text="late")


def test_a_child_whose_worker_died_exits(tmp_path: Path) -> None:
    """SIGKILL to the worker: its child sees itself orphaned and exits."""
    pid_file = tmp_path / "child.pid"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from service import child; from service.settings import Settings; "
            "child.run(Settings(data_dir=sys.argv[1]), sys.argv[2], pid_file=sys.argv[3])",
            str(tmp_path),
            f"{__name__}:sleep_a_while",
            str(pid_file),
        ],
        cwd=Path(__file__).parents[2],
    )
    try:
        pid = _pid_from(pid_file)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        assert gone(pid, timeout=child.ORPHAN_CHECK_SECONDS + 5), "the orphan lives on"
    finally:
        worker.kill()
        worker.wait(timeout=10)
