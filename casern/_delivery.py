"""The dispatcher: runs listeners after the commit, per id and listener in seq order.

A lane per (id, listener) runs one change at a time, so a slow or failing
listener holds back only its own lane. Plain listeners run in a small bounded
pool of threads (`_threads.LanePool`) that takes a burst of changes per wake-up
and shrinks when idle; `async def` ones run on an asyncio loop in a background
thread. Both are bounded by `Backoff.timeout`. When every listener of a change
has finished (or given up), the engine acknowledges it, which removes the
change from the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _telemetry, _waits
from ._actions import Delivery
from ._backoff import Backoff
from ._change import Change
from ._engine import Engine
from ._errors import CasernError
from ._json import dumps
from ._loopwatch import LoopWatch
from ._threads import LanePool
from ._types import Listener
from .stores.base import Doc

log = logging.getLogger("casern")
_here = threading.local()  # .listener: the name of the plain listener this thread runs


@dataclass(slots=True, eq=False)
class _Job:
    id: str
    entry: Doc
    remaining: int
    texts: tuple[str, str, str] | None = None  # see Delivery.texts
    failed: list[Doc] = field(default_factory=list)


class Dispatcher:
    """Delivers committed changes to listeners, at least once, in seq order per lane."""

    def __init__(
        self,
        engine: Engine,
        listeners: Mapping[str, Listener],
        preferences: Mapping[str, Any],
        services: Mapping[str, Any],
        backoff: Backoff,
        send: Callable[[str, str, Any, str], Future[Any]],
    ) -> None:
        self.engine = engine
        self.listeners = dict(listeners)
        self.preferences = preferences
        self.services = services
        self.backoff = backoff
        self._send = send
        self._lanes: dict[tuple[str, str], deque[_Job]] = {}
        # Changes this process committed or is delivering, until their acknowledgement
        # is durable: a recovery sweep never hands them out again.
        self._inflight: dict[str, set[int]] = {}
        self._watches: list[set[tuple[str, int]]] = []
        self._jobs = 0
        # While deliveries run, the app is held (see `keep_alive`): an app whose
        # user dropped it still finishes what it committed, then can be collected.
        self._owner: weakref.ref[object] | None = None
        self._pin: object | None = None
        self._idle = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: LanePool[tuple[str, str], _Job] | None = None
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._incoming: list[tuple[str, _Job]] = []  # (async listener, job) for the loop
        self._async = {n for n, f in self.listeners.items() if inspect.iscoroutinefunction(f)}
        self._loopwatch: LoopWatch | None = None
        _telemetry.watch_outbox(self)

    # -- thread-safe entry points -------------------------------------------------------

    def submit(self, deliveries: list[Delivery]) -> None:
        """Accept committed changes (from the committer, or a recovery sweep)."""
        fresh: list[Delivery] = []
        with self._idle:
            for d in deliveries:
                mine = self._inflight.setdefault(d.id, set())
                if d.entry["seq"] in mine:
                    continue
                mine.add(d.entry["seq"])
                if self._jobs == 0 and self._owner is not None:
                    self._pin = self._owner()
                self._jobs += 1
                fresh.append(d)
        if not fresh:
            return
        plain: list[tuple[tuple[str, str], _Job]] = []
        coros: list[tuple[str, _Job]] = []
        for d in fresh:
            names = [n for n in d.entry.get("listeners") or self.listeners if n in self.listeners]
            job = _Job(d.id, d.entry, len(names), d.texts)
            if not names:
                self._finish(job)
            for name in names:
                if name in self._async:
                    coros.append((name, job))
                else:
                    plain.append(((d.id, name), job))
        if plain:
            self._ensure_pool().put_many(plain)
        if coros:
            loop = self._ensure_loop()
            # Wake the loop only for the first of a burst: waking costs a syscall.
            with self._lock:
                wake = not self._incoming
                self._incoming.extend(coros)
            if wake:
                loop.call_soon_threadsafe(self._take_incoming)

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        self._accept(incoming)

    def backlog(self) -> int:
        """Changes handed to this dispatcher whose acknowledgement is not yet written."""
        with self._idle:
            return sum(len(seqs) for seqs in self._inflight.values())

    def inflight(self, id: str, seq: int) -> bool:
        with self._idle:
            return seq in self._inflight.get(id, ())

    def busy(self, id: str) -> bool:
        """Whether any change of `id` is in flight here."""
        with self._idle:
            return id in self._inflight

    def watch(self) -> set[tuple[str, int]]:
        """Start collecting the changes whose acknowledgement lands from now on.

        A sweep reads the outbox, then asks what is in flight: a change acknowledged
        in between looks pending and not in flight. Whatever was in flight when the
        sweep began is either still in flight after the read or in this set.
        """
        seen: set[tuple[str, int]] = set()
        with self._idle:
            self._watches.append(seen)
        return seen

    def unwatch(self, seen: set[tuple[str, int]]) -> None:
        with self._idle:
            self._watches = [w for w in self._watches if w is not seen]

    def acked(self, id: str, seqs: frozenset[int]) -> None:
        """The acknowledgement of (id, seq) for `seqs` is durable (or was not needed)."""
        with self._idle:
            mine = self._inflight.get(id)
            if mine is not None:
                mine.difference_update(seqs)
                if not mine:
                    del self._inflight[id]
            for seen in self._watches:
                seen.update((id, seq) for seq in seqs)

    def keep_alive(self, owner: object) -> None:
        """Hold a reference to `owner` while deliveries are under way (weak otherwise)."""
        self._owner = weakref.ref(owner)

    def check_not_inside(self, what: str) -> None:
        """Refuse a call that waits for the listeners from inside a listener (it would hang)."""
        name = getattr(_here, "listener", None)
        if name is None and self._thread is not None and threading.current_thread() is self._thread:
            name = "an async listener"
        if name is not None:
            raise CasernError(
                f"{what}() was called from inside {name}; it waits for every listener,"
                " this one included, so it would never return. Call it from the code that"
                " sends, not from a listener"
            )

    def wait_idle(self, timeout: float | None) -> bool:
        with self._idle:
            return _waits.wait_for(self._idle, lambda: self._jobs == 0, timeout)

    def stop(self, timeout: float) -> None:
        """Let running deliveries finish for up to `timeout`, then abandon the rest.

        Abandoned changes stay in the outbox; a later `start()` delivers them.
        """
        if self._loop is None and self._pool is None:
            return
        deadline = time.monotonic() + timeout
        self.wait_idle(timeout)
        if self._pool is not None:
            self._pool.shutdown()
        loop = self._loop
        if loop is not None:

            async def cancel() -> None:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

            # Cancelling is quick; a listener that ignores it is left behind (a daemon).
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(cancel(), loop).result(
                    timeout=max(0.05, deadline - time.monotonic())
                )
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=max(0.05, deadline - time.monotonic()))
        if self._loopwatch is not None:
            self._loopwatch.stop()
        self._loop = self._thread = self._pool = self._loopwatch = None
        with self._idle:
            self._jobs = 0
            self._pin = None
            self._inflight.clear()
            self._lanes.clear()
            self._incoming.clear()
            self._idle.notify_all()

    def abandon(self) -> None:
        """Stop the loop and the pool without waiting (the app was garbage-collected)."""
        loop, pool = self._loop, self._pool
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
        if pool is not None:
            pool.shutdown()
        if self._loopwatch is not None:
            self._loopwatch.stop()
        self._loop = self._thread = self._pool = self._loopwatch = None

    # -- plain listeners: a bounded pool of threads ---------------------------------------

    def _ensure_pool(self) -> LanePool[tuple[str, str], _Job]:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = LanePool(
                        "casern-listener",
                        self._call_plain,
                        self._settle_plain,
                        timeout=self.backoff.timeout,
                    )
                pool = self._pool
        return pool

    def _call_plain(self, lane: tuple[str, str], job: _Job) -> list[Future[Any]]:
        """One call of a plain listener, in a pool thread; returns the sends it queued."""
        name = lane[1]
        sent: list[Future[Any]] = []
        _here.listener = f"listener {name!r}"  # drain() in here is refused, not hung
        try:
            with _telemetry.listener_span(job.id, job.entry, name):
                result = self.listeners[name](self._change(job, name, sent))
                if inspect.isawaitable(result):
                    asyncio.run_coroutine_threadsafe(_wait(result), self._ensure_loop()).result()
        finally:
            _here.listener = None
        return sent

    def _settle_plain(
        self, lane: tuple[str, str], job: _Job, attempt: int, outcome: Any
    ) -> float | None:
        """After one call: None once the job is done with this listener, else a retry delay."""
        name = lane[1]
        if not isinstance(outcome, BaseException):
            try:  # the change counts as delivered only once the sends it queued are durable
                for fut in outcome:
                    fut.result()
            except Exception as e:
                outcome = e
        if isinstance(outcome, Exception):
            delay = self._failure(job, name, attempt, outcome)
            if delay is not None:
                return delay
        else:
            _telemetry.delivered(name, job.entry, "ok")
        self._lane_done(job)
        return None

    # -- async listeners: the loop thread -------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    try:
                        loop.run_forever()
                    finally:  # stopped by stop() or abandon(): nothing runs on it again
                        loop.close()

                self._thread = threading.Thread(target=run, name="casern-delivery", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
                if self._async:
                    async_listeners = {n: self.listeners[n] for n in self._async}
                    self._loopwatch = LoopWatch(loop, self._thread, async_listeners)
        return self._loop

    def _accept(self, incoming: list[tuple[str, _Job]]) -> None:
        for name, job in incoming:
            lane = self._lanes.get((job.id, name))
            if lane is None:
                lane = self._lanes[(job.id, name)] = deque()
                self._spawn(self._run_lane(job.id, name, lane))
            lane.append(job)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_lane(self, id: str, name: str, lane: deque[_Job]) -> None:
        try:
            while lane:
                job = lane[0]
                await self._deliver(job, name)
                lane.popleft()
                self._lane_done(job)
        finally:
            self._lanes.pop((id, name), None)

    async def _deliver(self, job: _Job, name: str) -> None:
        for attempt in range(1, self.backoff.attempts + 1):
            try:
                with _telemetry.listener_span(job.id, job.entry, name):
                    await self._call_async(job, name)
                _telemetry.delivered(name, job.entry, "ok")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = self._failure(job, name, attempt, e)
                if delay is None:
                    return
                await asyncio.sleep(delay)

    async def _call_async(self, job: _Job, name: str) -> None:
        sent: list[Future[Any]] = []
        change = self._change(job, name, sent)
        # asyncio.timeout, not wait_for: no extra task per call on this hot path.
        async with asyncio.timeout(self.backoff.timeout):
            result = self.listeners[name](change)
            if inspect.isawaitable(result):
                await result
        # The change counts as delivered only once the sends it queued are durable.
        for fut in sent:
            await asyncio.wrap_future(fut)

    # -- both kinds -----------------------------------------------------------------------

    def _lane_done(self, job: _Job) -> None:
        """One listener is done with `job`; the last one acknowledges it."""
        with self._lock:
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        self.engine.ack(job.id, job.entry["seq"], job.failed)
        pin = None
        with self._idle:
            self._jobs -= 1
            if self._jobs == 0:
                pin, self._pin = self._pin, None
                self._idle.notify_all()
        del pin  # the app may be collected here: outside the lock

    def _failure(self, job: _Job, name: str, attempt: int, e: Exception) -> float | None:
        """Log a failed call; the delay before the next attempt, or None after the last."""
        b = self.backoff
        error = _describe(e, b.timeout)
        if attempt >= b.attempts:
            _telemetry.delivered(name, job.entry, "failed")
            log.error(
                "listener %r gave up on %r seq %s after %d attempts: %s",
                name,
                job.id,
                job.entry["seq"],
                attempt,
                error,
                exc_info=e,
            )
            failed = {k: v for k, v in job.entry.items() if k not in ("listeners", "claim")}
            failed.update(listener=name, error=error, attempts=attempt)
            with self._lock:
                job.failed.append(failed)
            return None
        delay = b.delay(attempt)
        _telemetry.delivered(name, job.entry, "retry")
        log.warning(
            "listener %r failed on %r seq %s (attempt %d of %d): %s; retrying in %.2fs",
            name,
            job.id,
            job.entry["seq"],
            attempt,
            b.attempts,
            error,
            delay,
        )
        return delay

    def _change(self, job: _Job, name: str, sent: list[Future[Any]]) -> Change:
        """The `Change` one listener gets: its own copies, and a `send` that records futures."""
        entry = job.entry
        count = 0

        def send(reducer: str, id: str, data: Any = None) -> None:
            nonlocal count
            count += 1
            # Derived from (id, seq, listener, n): a redelivery sends the same keys.
            # Hashed, so that keys stay short in the target's envelope however long the id.
            origin = f"{job.id}\x1f{entry['seq']}\x1f{name}\x1f{count}".encode()
            key = "casern:" + hashlib.blake2b(origin, digest_size=12).hexdigest()
            sent.append(self._send(reducer, id, data, key))

        if job.texts is None:
            data, prev, state = _copy(entry["data"]), _copy(entry["prev"]), _copy(entry["state"])
        else:
            data, prev, state = (json.loads(text) for text in job.texts)
        return Change(
            id=job.id,
            reducer=entry["reducer"],
            data=data,
            key=entry["key"],
            seq=entry["seq"],
            prev=prev,
            state=state,
            applied_at=datetime.fromisoformat(entry["applied_at"]),
            preferences=self.preferences,
            services=self.services,
            send=send,
            listener=name,
        )


def _describe(e: BaseException, timeout: float) -> str:
    """The exception's type and message, and where it was raised (for `failed()`)."""
    if isinstance(e, TimeoutError) and (not str(e) or e.__traceback__ is None):
        # asyncio.timeout's (no message), or the pool's (made, never raised)
        return f"TimeoutError: ran longer than Backoff.timeout={timeout}s"
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


async def _wait(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _copy(value: Any) -> Any:
    return json.loads(dumps(value))
