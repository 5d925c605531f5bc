"""Threads for plain listeners: daemons that never keep the process alive or starve.

`ThreadPoolExecutor` has two faults for running user code with a timeout: the
interpreter waits for its threads at exit (a hung listener hangs the process),
and a call that timed out keeps its thread, so a few hung listeners can take
every thread and hold back all other listeners and ids. This pool starts a new
daemon thread whenever none is idle, and lets idle ones go after a while.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["DaemonPool"]

T = TypeVar("T")


class DaemonPool(Executor):
    """An executor of daemon threads: one per concurrent call, reused while busy."""

    def __init__(self, name: str, idle_timeout: float = 30.0) -> None:
        self._name = name
        self._idle_timeout = idle_timeout
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work, not yet promised to a call
        self._count = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            return self.submit(lambda: fn(*args, **kwargs))
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the listener pool is shut down")
            if self._idle > 0:
                self._idle -= 1  # promise this call to an idle thread
                spawn = False
            else:
                spawn = True
                self._count += 1
        self._work.put((future, fn, args))
        if spawn:
            threading.Thread(
                target=self._worker, name=f"{self._name}-{self._count}", daemon=True
            ).start()
        return future

    def _worker(self) -> None:
        while True:
            try:
                future, fn, args = self._work.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    # Leave only if no call was promised to an idle thread meanwhile.
                    if self._idle > 0:
                        self._idle -= 1
                        self._count -= 1
                        return
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:
                    future.set_exception(e)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; idle threads leave, hung ones are daemons and do not matter."""
        with self._lock:
            self._shutdown = True
