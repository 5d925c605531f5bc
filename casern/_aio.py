"""Hand results from the committer thread to asyncio tasks, one loop wake-up per burst.

`asyncio.wrap_future` wakes the event loop once per future (a syscall each); a
group commit resolves hundreds of futures at once, so here the first one of a
burst wakes the loop and the rest ride along.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["wait"]

T = TypeVar("T")


class _Waker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.ready: list[tuple[asyncio.Future[Any], Future[Any]]] = []

    def add(self, waiter: asyncio.Future[Any], done: Future[Any]) -> None:
        with self.lock:
            first = not self.ready
            self.ready.append((waiter, done))
        if first:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self.loop.call_soon_threadsafe(self.settle)

    def settle(self) -> None:
        with self.lock:
            ready, self.ready = self.ready, []
        for waiter, done in ready:
            if waiter.done():
                continue
            error = done.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(done.result())


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker] = weakref.WeakKeyDictionary()
_wakers_lock = threading.Lock()


async def wait(future: Future[T]) -> T:
    """Await a concurrent future resolved by another thread."""
    loop = asyncio.get_running_loop()
    with _wakers_lock:
        waker = _wakers.get(loop)
        if waker is None:
            waker = _wakers[loop] = _Waker(loop)
    waiter: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(lambda done: waker.add(waiter, done))
    return await waiter
