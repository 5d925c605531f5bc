"""Threads for plain listeners: a small bounded pool that runs lanes of work in order.

A *lane* is a FIFO of items that must run one at a time, in order (for casern:
one (id, listener) pair). A worker takes a ready lane and runs its items back
to back, so a burst costs one wake-up, not one per item; idle workers leave
after `idle_timeout`, and all leave at `shutdown`.

User code may hang. A call that runs past `timeout` is abandoned: its lane is
settled with a `TimeoutError` and goes on, and the hung thread no longer counts
against the bound (a replacement may start), so hung calls never starve other
lanes. Abandoned threads are daemons: they never keep the process alive.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["LanePool"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: run(key, item) -> outcome; settle(key, item, attempt, outcome or exception) -> None when
#: the item is done, or seconds to wait before running it again (attempt + 1).
Run = Callable[[K, V], Any]
Settle = Callable[[K, V, int, Any], float | None]


@dataclass(slots=True, eq=False)
class _Lane(Generic[K, V]):
    key: K
    items: deque[V] = field(default_factory=deque)
    attempt: int = 1  # of the head item
    busy: bool = False  # running on a worker, or waiting for a retry


@dataclass(slots=True, eq=False)
class _Call:
    lane: _Lane[Any, Any]
    deadline: float
    abandoned: bool = False


class LanePool(Generic[K, V]):
    """At most `max_threads` working daemon threads, each running one lane at a time."""

    def __init__(
        self,
        name: str,
        run: Run[K, V],
        settle: Settle[K, V],
        *,
        timeout: float,
        max_threads: int = 8,
        idle_timeout: float = 2.0,
        nap: float = 0.002,
        burst: int = 100,
    ) -> None:
        self._name = name
        self._run = run
        self._settle = settle
        self._timeout = timeout
        self._max = max_threads
        self._idle_timeout = idle_timeout
        self._nap = nap
        self._burst = burst  # items a worker runs from one lane before letting others in
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # idle workers wait here
        self._napping = threading.Condition(self._lock)  # workers just busy, never notified
        self._watch = threading.Condition(self._lock)  # the watchdog waits here
        self._lanes: dict[K, _Lane[K, V]] = {}
        self._ready: deque[_Lane[K, V]] = deque()
        self._later: list[tuple[float, int, _Lane[K, V]]] = []  # retries, by due time
        self._tiebreak = 0
        self._calls: dict[int, _Call] = {}  # running calls by thread id
        self._threads = 0  # workers that count against the bound (not hung)
        self._waiting = 0  # workers waiting for work
        self._promised = 0  # of those, already notified (not yet awake)
        self._watchdog: threading.Thread | None = None
        self._watch_until = float("inf")
        self._shutdown = False
        self._serial = 0

    # -- entry points ---------------------------------------------------------------------

    def put_many(self, work: list[tuple[K, V]]) -> None:
        """Append items to their lanes; wake (or start) only as many workers as needed."""
        with self._lock:
            if self._shutdown:
                return
            woken = 0
            for key, item in work:
                lane = self._lanes.get(key)
                if lane is None:
                    lane = self._lanes[key] = _Lane(key)
                lane.items.append(item)
                if not lane.busy:
                    lane.busy = True
                    self._ready.append(lane)
                    woken += 1
            # Workers awake and outside a call take ready lanes without a wake-up.
            free = self._threads - (self._waiting - self._promised) - len(self._calls)
            if woken > free:
                self._wake(woken - max(0, free))

    def threads(self) -> int:
        """Working threads now (hung, abandoned ones not counted)."""
        with self._lock:
            return self._threads

    def shutdown(self) -> None:
        """Drop queued items; idle workers leave now, running ones after their call."""
        with self._lock:
            self._shutdown = True
            self._lanes.clear()
            self._ready.clear()
            self._later.clear()
            for call in self._calls.values():
                call.abandoned = True
            self._calls.clear()
            self._work.notify_all()
            self._napping.notify_all()
            self._watch.notify_all()

    # -- workers (called with the lock held unless said otherwise) ------------------------

    def _wake(self, n: int) -> None:
        wake = max(0, min(n, self._waiting - self._promised))
        if wake:
            self._promised += wake
            self._work.notify(wake)
        for _ in range(min(n - wake, self._max - self._threads)):
            self._threads += 1
            self._serial += 1
            threading.Thread(
                target=self._worker, name=f"{self._name}-{self._serial}", daemon=True
            ).start()
        self._ensure_watchdog()

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None and not self._shutdown:
            self._watchdog = threading.Thread(
                target=self._watchdog_run, name=f"{self._name}-watchdog", daemon=True
            )
            self._watchdog.start()

    def _worker(self) -> None:
        me = threading.get_ident()
        lane: _Lane[K, V] | None = None
        ran = 0
        with self._lock:
            while True:
                if lane is None:
                    lane = self._next()
                    if lane is None and ran:
                        # Just busy: nap instead of waiting to be woken. Work that
                        # arrives meanwhile is taken in one go when the nap ends,
                        # without a wake-up per change (see `put_many`).
                        ran = 0
                        self._napping.wait(self._nap)
                        continue
                    if lane is None:
                        self._waiting += 1
                        woke = self._work.wait(self._idle_timeout)
                        self._waiting -= 1
                        if self._promised:  # count a timeout that raced a wake-up as woken
                            self._promised -= 1
                            woke = True
                        if self._shutdown or (not woke and not self._ready):
                            self._threads -= 1
                            if not self._threads:
                                self._watch.notify()  # the watchdog may leave too
                            return
                        continue
                    ran = 0
                ran += 1
                item = lane.items[0]
                attempt = lane.attempt
                call = self._calls[me] = _Call(lane, time.monotonic() + self._timeout)
                self._lock.release()
                try:
                    try:
                        outcome: Any = self._run(lane.key, item)
                    except Exception as e:
                        outcome = e
                finally:
                    self._lock.acquire()
                if call.abandoned:  # timed out (or shut down): the watchdog settled it
                    if self._shutdown or self._threads >= self._max:
                        return  # a replacement took this thread's place
                    self._threads += 1
                    lane = None
                    continue
                del self._calls[me]
                self._lock.release()
                try:
                    delay = self._settle(lane.key, item, attempt, outcome)
                finally:
                    self._lock.acquire()
                if self._shutdown:
                    self._threads -= 1
                    return
                lane = self._after(lane, delay, ran)

    def _next(self) -> _Lane[K, V] | None:
        self._due_retries(time.monotonic())
        return self._ready.popleft() if self._ready else None

    def _after(self, lane: _Lane[K, V], delay: float | None, ran: int) -> _Lane[K, V] | None:
        """Advance `lane` after one settled attempt; return it if this worker goes on with it."""
        if delay is not None:
            lane.attempt += 1
            self._tiebreak += 1
            due = time.monotonic() + delay
            heapq.heappush(self._later, (due, self._tiebreak, lane))
            self._ensure_watchdog()
            if due < self._watch_until:
                self._watch.notify()
            return None
        lane.items.popleft()
        lane.attempt = 1
        if not lane.items:
            lane.busy = False
            del self._lanes[lane.key]
            return None
        if ran >= self._burst and self._ready:  # let the other lanes in
            self._ready.append(lane)
            return None
        return lane

    def _due_retries(self, now: float) -> None:
        while self._later and self._later[0][0] <= now:
            self._ready.append(heapq.heappop(self._later)[2])

    # -- the watchdog: due retries and calls past their timeout ---------------------------

    def _watchdog_run(self) -> None:
        with self._lock:
            while not self._shutdown:
                now = time.monotonic()
                self._due_retries(now)
                for me, call in list(self._calls.items()):
                    if call.deadline <= now and not call.abandoned:
                        self._abandon(me, call)
                if self._ready:  # hung workers were replaced: start the replacements
                    self._wake(len(self._ready))
                if not (self._threads or self._calls or self._later):
                    break  # nothing to watch; the next put_many starts a new watchdog
                # A call started after this point has a deadline >= now + timeout.
                until = min(
                    [now + self._timeout, *(c.deadline for c in self._calls.values())]
                    + ([self._later[0][0]] if self._later else [])
                )
                self._watch_until = until
                self._watch.wait(max(0.001, until - now))
            self._watchdog = None
            self._watch_until = float("inf")

    def _abandon(self, me: int, call: _Call) -> None:
        call.abandoned = True
        del self._calls[me]
        self._threads -= 1  # the hung thread no longer counts: a replacement may start
        lane = call.lane
        item = lane.items[0]
        error = TimeoutError()  # the caller knows its timeout
        self._lock.release()
        try:
            delay = self._settle(lane.key, item, lane.attempt, error)
        finally:
            self._lock.acquire()
        if self._shutdown:
            return
        next_lane = self._after(lane, delay, 0)
        if next_lane is not None:
            self._ready.append(next_lane)
            self._wake(1)
