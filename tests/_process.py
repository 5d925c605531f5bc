"""A long-running process under test (a web server, a worker), always stopped afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def running(
    args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None, probe: str = ""
) -> Iterator[subprocess.Popen[str]]:
    """`args` in a subprocess, yielded once `probe` (a URL) answers, if given; SIGINT
    (then SIGKILL after 30 s) on the way out if it is still running.

    Its output goes to files, not pipes: a server that logs more than a pipe holds while
    nobody reads would block on its next write and never exit. Read it with `output`.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        proc.stdout, proc.stderr = out, err
        try:
            deadline = time.monotonic() + 60
            while probe:
                assert proc.poll() is None, output(proc)
                try:
                    httpx.get(probe, timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, f"{args[0]} did not answer in 60 s"
                    time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# A command prefix: the command starts with SIGINT ignored, as `command &` in a script.
SIGINT_IGNORED = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh"]


def take_ctrl_c() -> None:
    """Give this process, and so every process it starts, Ctrl-C as at a terminal.

    A script's `pytest &` (as in .ci/run) starts with SIGINT ignored, and an ignored
    signal stays ignored in every process started from it: a server under test that
    relies on Python's KeyboardInterrupt (Django's runserver) never stops on the
    SIGINT a test sends it. A handled signal is reset to the default in a new program,
    so handling it here gives those processes theirs back.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def output(proc: subprocess.Popen[str]) -> str:
    """What a process started by `running` wrote to stderr so far."""
    assert proc.stderr is not None
    proc.stderr.seek(0)
    return proc.stderr.read()
