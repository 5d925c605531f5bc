"""`Casern`: the public face. It wires the flow data → reducer → store → listener.

`send` validates in the caller's thread (bad input fails fast, nothing queued),
then hands the action to the committer (`_engine.py`) and waits for the durable
commit. Committed changes go to the dispatcher (`_delivery.py`), which runs the
listeners. `start()` adds the scheduler: one APScheduler job per app that fires
due timers and redelivers changes left pending by a process that died.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import types
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from datetime import UTC, datetime
from typing import Any

import jsonschema
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

from . import _aio
from ._backoff import Backoff
from ._delivery import Dispatcher
from ._engine import (
    FIRE,
    MIGRATE,
    RETRY,
    SEND,
    Action,
    Delivery,
    Engine,
    encode_data,
    freeze,
)
from ._errors import CasernError, InvalidData, ReducerError, UnknownReducer
from ._ids import check_id
from ._json import dumps, encodable
from ._outbox import unpack
from ._types import Listener, Reducer, State, Timer, Upgrade
from .stores import Store, open_store

__all__ = ["Casern"]

log = logging.getLogger("casern")

MAX_KEY_LENGTH = 1024
_HISTORY_FIELDS = ("seq", "reducer", "data", "key", "applied_at", "version")
_FAILED_FIELDS = ("id", "seq", "listener", "error", "attempts", "reducer", "applied_at")


class Casern:
    """A persistent manager of many small state machines, one JSON document per id.

    The five positional parameters keep the order of the original JavaScript
    casern. See the README for every option.
    """

    def __init__(
        self,
        store: str | Store = "sqlite:///casern.db",
        preferences: Mapping[str, Any] | None = None,
        services: Mapping[str, Any] | None = None,
        reducers: Mapping[str, Reducer] | None = None,
        listeners: Mapping[str, Listener] | None = None,
        *,
        schemas: Mapping[str, Mapping[str, Any]] | None = None,
        timers: Mapping[str, Timer] | None = None,
        state_version: int = 1,
        upgrade: Upgrade | None = None,
        backoff: Backoff = Backoff(),
        tick: float = 1.0,
        history: bool = True,
        redeliver_after: float = 10.0,
        keep_keys: int = 100,
        cache_size: int = 4096,
    ) -> None:
        for what, table in (
            ("preferences", preferences),
            ("services", services),
            ("reducers", reducers),
            ("listeners", listeners),
            ("timers", timers),
            ("schemas", schemas),
        ):
            if table is not None and not isinstance(table, Mapping):
                raise TypeError(
                    f"{what} must be a mapping (a dict by name), not {type(table).__name__}"
                )
        # Deep read-only: nested dicts become mappings, lists tuples; reducers share them.
        self.preferences: Mapping[str, Any] = freeze(preferences or {})
        self.services: Mapping[str, Any] = types.MappingProxyType(dict(services or {}))
        self.reducers: dict[str, Reducer] = dict(reducers or {})
        self.listeners: dict[str, Listener] = dict(listeners or {})
        self.timers: dict[str, Timer] = dict(timers or {})
        for kind, table in (
            ("reducer", self.reducers),
            ("listener", self.listeners),
            ("timers function", self.timers),
        ):
            for name, fn in table.items():
                if not callable(fn):
                    raise TypeError(f"{kind} {name!r} must be callable, not {type(fn).__name__}")
        for name in self.timers:
            if name not in self.reducers:
                raise ValueError(f"timers names reducers to send when due; no reducer {name!r}")
        self._validators: dict[str, Any] = {}
        for name, schema in (schemas or {}).items():
            if name not in self.reducers:
                raise ValueError(f"schemas are keyed by reducer name; no reducer {name!r}")
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(dict(schema))  # a broken schema fails here, not on the first send
            self._validators[name] = cls(dict(schema), format_checker=cls.FORMAT_CHECKER)
        if not isinstance(state_version, int) or state_version < 1:
            raise ValueError("state_version must be an int >= 1")
        if upgrade is not None and not callable(upgrade):
            raise TypeError("upgrade must be fn(preferences, old_version, state) -> state")
        if not isinstance(backoff, Backoff):
            raise TypeError("backoff must be a casern.Backoff(attempts=..., initial=..., ...)")
        if tick <= 0:
            raise ValueError("tick must be > 0 seconds")
        if redeliver_after < 0:
            raise ValueError("redeliver_after must be >= 0 seconds")
        for name, count in (("keep_keys", keep_keys), ("cache_size", cache_size)):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be an int >= 0")
        self.state_version = state_version
        self.backoff = backoff
        self.tick = tick
        self.redeliver_after = redeliver_after
        self.store: Store = open_store(store) if isinstance(store, str) else store
        self._engine = Engine(
            self.store,
            self.preferences,
            self.reducers,
            self.timers,
            outbox=bool(self.listeners),
            history=history,
            state_version=state_version,
            upgrade=upgrade,
            on_commit=self._on_commit,
            on_acked=self._on_acked,
            keep_keys=keep_keys,
            cache_size=cache_size,
            redeliver_after=redeliver_after,
        )
        self._history = history
        self._dispatcher = Dispatcher(
            self._engine,
            self.listeners,
            self.preferences,
            self.services,
            backoff,
            self._queue_send,
        )
        self._scheduler: BaseScheduler | None = None
        self._closed = False
        self._options: dict[str, Any] = {
            "schemas": schemas,
            "timers": timers,
            "state_version": state_version,
            "upgrade": upgrade,
            "backoff": backoff,
            "tick": tick,
            "history": history,
            "redeliver_after": redeliver_after,
            "keep_keys": keep_keys,
            "cache_size": cache_size,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise CasernError("this Casern app is closed; create a new one (or use with_store)")

    def with_store(self, store: str | Store) -> Casern:
        """A new app with the same reducers, listeners, services and options on another store."""
        return Casern(
            store, self.preferences, self.services, self.reducers, self.listeners, **self._options
        )

    def __repr__(self) -> str:
        return f"<Casern {self.store.url} reducers={sorted(self.reducers)}>"

    # -- sending ------------------------------------------------------------------------

    def _queue_send(
        self, reducer: str, id: str, data: Any, key: str | None, lead: bool = False
    ) -> Future[Any]:
        """Validate in the caller's thread, then queue; the future gives the state's JSON."""
        self._check_open()
        check_id(id)
        if reducer not in self.reducers:
            known = ", ".join(sorted(self.reducers)) or "none"
            raise UnknownReducer(f"no reducer named {reducer!r} (known: {known})")
        if key is not None and (not isinstance(key, str) or len(key) > MAX_KEY_LENGTH):
            raise InvalidData(
                f"key must be a str of at most {MAX_KEY_LENGTH} characters or None,"
                f" not {type(key).__name__}" + (f" of {len(key)}" if isinstance(key, str) else "")
            )
        if key is not None and not encodable(key):
            raise InvalidData(f"key {key!r:.60} holds a lone surrogate, which is not Unicode text")
        data_json = encode_data(reducer, data)
        validator = self._validators.get(reducer)
        if validator is not None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(json.loads(data_json)))
            if error is not None:
                raise InvalidData(
                    f"data for {reducer!r} is invalid at {error.json_path}: {error.message}"
                )
        return self._engine.submit(Action(SEND, id, Future(), reducer, data_json, key), lead=lead)

    def send(self, reducer: str, id: str, data: Any = None, *, key: str | None = None) -> State:
        """Apply `reducer` to machine `id`; return the committed state once durable."""
        state: State = json.loads(self._queue_send(reducer, id, data, key, lead=True).result())
        return state

    async def asend(
        self, reducer: str, id: str, data: Any = None, *, key: str | None = None
    ) -> State:
        """`send` for asyncio: many concurrent `asend`s are committed together."""
        text = await _aio.wait(self._queue_send(reducer, id, data, key))
        state: State = json.loads(text)
        return state

    def get(self, id: str) -> State | None:
        """The current state of `id` (a copy), or None if it was never changed."""
        self._check_open()
        rec = self.store.get(check_id(id))
        if rec is None:
            return None
        state: State = json.loads(dumps(self._engine.load_state(rec.doc)))
        return state

    async def aget(self, id: str) -> State | None:
        """`get` for asyncio (runs the read in a thread)."""
        return await asyncio.to_thread(self.get, id)

    def ids(self, *, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        """Stored ids in ascending order (page with `after=` the last id seen)."""
        self._check_open()
        return self.store.ids(prefix=prefix, after=after, limit=limit)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued send is committed and every listener has run.

        Returns False if `timeout` passed first. Handy in tests, scripts and demos.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._engine.wait_idle(left):
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._dispatcher.wait_idle(left):
                return False
            if self._engine.wait_idle(0):  # listeners may have sent more
                self._engine.flush()  # so failed() and the outbox reflect what ran
                return True

    # -- listener failures --------------------------------------------------------------

    def failed(self, limit: int = 10_000) -> list[dict[str, Any]]:
        """Deliveries that exhausted their retries: id, seq, listener, error, attempts."""
        self._check_open()
        ids = self.store.failed(limit)
        out: list[dict[str, Any]] = []
        for id, rec in sorted(self.store.get_many(ids).items()):
            for f in rec.doc.get("failed", ()):
                out.append({k: (id if k == "id" else f.get(k)) for k in _FAILED_FIELDS})
        return out[:limit]

    def retry(self, id: str | None = None) -> int:
        """Re-queue failed deliveries (all, or one id's); returns how many."""
        self._check_open()
        ids = [check_id(id)] if id is not None else self.store.failed(100_000)
        futures = [self._engine.submit(Action(RETRY, i, Future())) for i in ids]
        return sum(int(f.result() or 0) for f in futures)

    # -- history and versions -----------------------------------------------------------

    def history(self, id: str, *, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Committed changes of `id` with seq > `after`, oldest first (page with `limit`)."""
        self._check_open()
        check_id(id)
        if not self._history:
            raise CasernError("history is off for this app (Casern(..., history=True) keeps it)")
        newest: list[dict[str, Any]] = []
        if not self.store.atomic_history:
            # The newest entries are still in the envelope. Read it first: entries
            # moved out meanwhile are then found in the history store below.
            rec = self.store.get(id)
            newest = [e for e in rec.doc.get("log", ()) if e["seq"] > after] if rec else []
        entries = {e["seq"]: e for e in self.store.history(id, after=after, limit=limit)}
        for e in newest:
            entries.setdefault(e["seq"], e)
        seqs = sorted(entries)[:limit]
        return [{k: entries[s].get(k) for k in _HISTORY_FIELDS} for s in seqs]

    def replay(self, id: str) -> State:
        """Recompute the state of `id` from `{}` by folding its history through the reducers.

        A result that differs from the stored state is logged as a warning: it
        means a reducer is not pure, or history was off for a while.
        """
        state: State = {}
        for entry in self.history(id):
            reducer = self.reducers.get(entry["reducer"])
            if reducer is None:
                raise UnknownReducer(
                    f"history of {id!r} names reducer {entry['reducer']!r}, which this app lacks"
                )
            try:
                state = json.loads(dumps(reducer(self.preferences, state, entry["data"])))
            except Exception as e:
                raise ReducerError(
                    f"replaying seq {entry['seq']} of {id!r}: reducer {entry['reducer']!r}"
                    f" raised {type(e).__name__}: {e}"
                ) from e
        stored = self.get(id)
        if stored is not None and stored != state:
            log.warning("replay of %r differs from its stored state: is a reducer impure?", id)
        return state

    def migrate(self, progress: Callable[[int], None] | None = None, batch: int = 200) -> int:
        """Upgrade every stored state to `state_version` now; returns how many changed.

        Revision-checked like any send, so it is safe beside live traffic, and
        resumable: states already upgraded are skipped.
        """
        self._check_open()
        upgraded = 0
        after: str | None = None
        while True:
            page = self.store.ids(after=after, limit=batch)
            if not page:
                return upgraded
            futures = [self._engine.submit(Action(MIGRATE, id, Future())) for id in page]
            upgraded += sum(bool(f.result()) for f in futures)
            if progress is not None:
                progress(len(page))
            after = page[-1]

    # -- background work ----------------------------------------------------------------

    def _on_commit(self, deliveries: list[Delivery]) -> None:
        self._dispatcher.submit(deliveries)

    def _on_acked(self, id: str, seqs: frozenset[int]) -> None:
        self._dispatcher.acked(id, seqs)

    def run_once(self, now: float | None = None, limit: int = 1000) -> int:
        """One scheduler tick: fire due timers, redeliver stale pending changes.

        Returns how many machines had a due timer. Cost is proportional to the
        number of due machines, never to the number stored.
        """
        self._check_open()
        now = time.time() if now is None else min(now, time.time())  # never early
        fired = 0
        started = time.monotonic()
        while True:
            ids = self.store.due(now, limit)
            futures = [self._engine.submit(Action(FIRE, id, Future(), now=now)) for id in ids]
            wait_futures(futures)
            fired += len(ids)
            for f in futures:
                if f.exception() is not None:
                    log.error("firing a timer failed: %s", f.exception())
            if len(ids) < limit or time.monotonic() - started > max(self.tick, 1.0):
                break
        if fired:
            log.info("fired the due timers of %d machine(s)", fired)
        self._recover(now)
        return fired

    def _recover(self, now: float) -> None:
        """Deliver changes left in the outbox by a process that died."""
        if not self.listeners:
            return
        before = now - self.redeliver_after
        ids = self.store.pending(before, 1000)
        if not ids:
            return
        deliveries = [
            Delivery(id, entry)
            for id, rec in self.store.get_many(ids).items()
            for entry in unpack(rec.doc)
            if entry["at"] <= before and not self._dispatcher.inflight(id, entry["seq"])
        ]
        if deliveries:
            log.info("redelivering %d pending change(s)", len(deliveries))
            self._dispatcher.submit(deliveries)

    def _safe_tick(self) -> None:
        try:
            self.run_once()
        except CasernError as e:
            log.warning("scheduler tick failed: %s", e)

    def start(self) -> None:
        """Run timers and redelivery in the background (APScheduler), until `stop()`."""
        self._check_open()
        if self._scheduler is not None:
            return
        scheduler = BackgroundScheduler(timezone="UTC")
        self._add_tick(scheduler, self._safe_tick)
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        """Stop the scheduler; committed work stays safe in the store."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    async def astart(self) -> None:
        """`start` for asyncio apps: the scheduler runs on the current event loop."""
        self._check_open()
        if self._scheduler is not None:
            return

        async def tick() -> None:
            await asyncio.to_thread(self._safe_tick)

        scheduler = AsyncIOScheduler(timezone="UTC", event_loop=asyncio.get_running_loop())
        self._add_tick(scheduler, tick)
        scheduler.start()
        self._scheduler = scheduler

    async def astop(self) -> None:
        """`stop` for asyncio apps."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            await asyncio.sleep(0)

    def _add_tick(self, scheduler: BaseScheduler, fn: Callable[[], Any]) -> None:
        # One job per app, never one per machine: due times are data in the store.
        scheduler.add_job(
            fn,
            "interval",
            seconds=self.tick,
            id="casern-tick",
            next_run_time=datetime.now(UTC),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )

    # -- lifetime -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop background work, finish deliveries for up to `timeout`, release the store.

        Changes whose listeners did not finish stay in the outbox and are
        delivered by the next app that calls `start()` on this store.
        """
        if self._closed:
            return
        self.stop()
        self.drain(timeout)
        self._closed = True
        self._dispatcher.stop(timeout)
        self._engine.stop()
        self.store.close()

    def __enter__(self) -> Casern:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
