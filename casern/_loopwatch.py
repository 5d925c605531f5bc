"""Finds `async def` listeners that block the delivery loop (a `time.sleep`, a sync HTTP call).

Every async listener of an app shares one event loop, so one that blocks it
holds back every id's deliveries. The loop stamps a heartbeat a few times a
second; a watchdog thread that finds the stamp stale looks at the loop thread's
stack, names the listener on it, and logs it once per listener with how long it
blocked. Nothing is added to the listener calls themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from types import CodeType, FrameType
from typing import Any

__all__ = ["LoopWatch"]

log = logging.getLogger("casern")


class LoopWatch:
    """Watches `loop` (run by `thread`) for calls that keep it busy longer than `limit`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        listeners: Mapping[str, Any],
        limit: float = 0.5,
    ) -> None:
        self._loop = loop
        self._thread = thread
        self._codes: dict[CodeType, str] = {
            code: name
            for name, fn in listeners.items()
            if (code := getattr(fn, "__code__", None)) is not None
        }
        self._limit = limit
        self._beat = time.monotonic()
        self._reported: set[str] = set()
        self._stop = threading.Event()
        loop.call_soon_threadsafe(self._tick)
        threading.Thread(target=self._watch, name="casern-loopwatch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        self._beat = time.monotonic()
        if not self._stop.is_set():
            self._loop.call_later(self._limit / 4, self._tick)

    def _watch(self) -> None:
        blocked: tuple[str, str, float] | None = None  # listener, where, since
        still: tuple[int, int] | None = None  # the loop thread's top frame and its position
        looks = 0  # how many looks in a row found it there
        while not self._stop.wait(self._limit / 4):
            stale = time.monotonic() - self._beat
            if stale < self._limit / 2:
                still, looks = None, 0
            elif blocked is None:
                # A loop merely starved of CPU (a busy machine) moves on between
                # looks; one that a listener blocks stays on the very same instruction.
                now = self._top()
                looks = looks + 1 if now == still else 1
                still = now
                if looks < 4:
                    continue
            if stale < self._limit:
                if blocked is not None:
                    name, where, since = blocked
                    log.warning(
                        "async listener %r blocked the event loop for %.1fs (at %s), holding"
                        " back every async listener; await instead (asyncio.sleep, an async"
                        " client), run blocking code with asyncio.to_thread(...), or make the"
                        " listener a plain def (it then runs in a thread)",
                        name,
                        time.monotonic() - since,
                        where,
                    )
                    blocked = None
                continue
            if blocked is None:
                found = self._culprit()
                if found is not None and found[0] not in self._reported:
                    self._reported.add(found[0])
                    blocked = (*found, self._beat)

    def _top(self) -> tuple[int, int] | None:
        ident = self._thread.ident
        frame = sys._current_frames().get(ident) if ident else None
        return None if frame is None else (id(frame), frame.f_lasti)

    def _culprit(self) -> tuple[str, str] | None:
        """The listener on the loop thread's stack now, and the innermost frame there."""
        ident = self._thread.ident
        frame: FrameType | None = sys._current_frames().get(ident) if ident else None
        where = _where(frame) if frame is not None else "?"
        while frame is not None:
            name = self._codes.get(frame.f_code)
            if name is not None:
                return name, where
            frame = frame.f_back
        return None


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
