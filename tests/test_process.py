"""The suite's process harness: a test's Ctrl-C reaches the process it started, also when
the suite itself was started with SIGINT ignored (a script's `pytest &`, as in .ci/run,
where Django's runserver never stopped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _process import SIGINT_IGNORED, output, running

REPO = Path(__file__).resolve().parent.parent


def test_a_process_under_test_stops_on_ctrl_c_as_at_a_terminal() -> None:
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]
    with running(sleeper, cwd=REPO) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while b"up" not in os.pread(proc.stdout.fileno(), 16, 0):  # its offset kept
            assert time.monotonic() < deadline and proc.poll() is None, "it never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT  # KeyboardInterrupt ends Python so
        assert "KeyboardInterrupt" in output(proc)


def test_the_suite_started_with_sigint_ignored_still_reaches_its_processes() -> None:
    inner = f"{Path(__file__).name}::test_a_process_under_test_stops_on_ctrl_c_as_at_a_terminal"
    pytest_ = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{inner}"]
    result = subprocess.run(
        [*SIGINT_IGNORED, *pytest_], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
