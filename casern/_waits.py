"""Long waits that notice Ctrl-C.

CPython runs a signal handler in the main thread between bytecodes; a signal
that arrives as the main thread enters a blocking wait (or that another thread
caught) is handled only when the wait ends. `casern send` then sat through its
whole `--wait` for the listeners after a Ctrl-C (seen in CI: 10.3 s). Waiting
in slices bounds that delay to `SLICE`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

__all__ = ["SLICE", "result", "wait_for"]

T = TypeVar("T")

SLICE = 0.2  # seconds: the longest a pending Ctrl-C waits to be handled


def wait_for(
    cond: threading.Condition, predicate: Callable[[], bool], timeout: float | None
) -> bool:
    """`cond.wait_for(predicate, timeout)` in slices; the caller holds `cond`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not predicate():
        left = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
        if left <= 0:
            return False
        cond.wait(left)
    return True


def result(future: Future[T], timeout: float | None) -> T:
    """`future.result(timeout)` in slices."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
        try:
            return future.result(max(0.0, left))
        except TimeoutError:
            if future.done() or (deadline is not None and time.monotonic() >= deadline):
                raise
