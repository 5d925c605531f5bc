"""`Casern`: the public face. It wires the flow data → reducer → store → listener.

`send` validates in the caller's thread (bad input fails fast, nothing queued),
then hands the action to the committer (`_engine.py`) and waits for the durable
commit. Committed changes go to the dispatcher (`_delivery.py`), which runs the
listeners. `start()` adds the scheduler: one APScheduler job per app that fires
due timers and redelivers changes left pending by a process that died.
"""

from __future__ import annotations

import asyncio
import atexit
import difflib
import json
import logging
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from datetime import UTC, datetime
from typing import Any

import jsonschema
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

from . import _aio, _telemetry
from ._actions import CLAIM, FIRE, MIGRATE, RETRY, SEND, Action, Delivery, encode_data
from ._backoff import Backoff
from ._delivery import Dispatcher
from ._engine import Engine, freeze
from ._errors import (
    CasernError,
    InvalidData,
    InvalidQuery,
    ReducerError,
    UnknownReducer,
    UpgradeError,
)
from ._ids import check_id
from ._json import dumps, encodable
from ._query import check_path, parse
from ._types import Listener, Reducer, State, Timer, Upgrade
from .stores import Store, open_store

__all__ = ["Casern"]

log = logging.getLogger("casern")
# APScheduler logs two INFO lines per job run, and one at start: casern's own
# executor alias and scheduler logger keep that chatter below WARNING, without
# touching the levels of the user's own schedulers.
_EXECUTOR = "casern"
_SCHEDULER_LOG = logging.getLogger("casern.scheduler")
_SCHEDULER_LOG.setLevel(logging.WARNING)
logging.getLogger(f"apscheduler.executors.{_EXECUTOR}").setLevel(logging.WARNING)

MAX_KEY_LENGTH = 1024
_HISTORY_FIELDS = ("seq", "reducer", "data", "key", "applied_at", "version")
_FAILED_READ = 25  # envelopes failed() reads at once
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
        indexes: Sequence[str] = (),
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
        if isinstance(indexes, str):
            raise TypeError(f"indexes is a list of field names, such as ({indexes!r},)")
        index_paths = [check_path(field) for field in indexes]
        self.indexes: tuple[str, ...] = tuple(dict.fromkeys(indexes))
        self.state_version = state_version
        self.backoff = backoff
        self.tick = tick
        self.redeliver_after = redeliver_after
        self.store: Store = open_store(store) if isinstance(store, str) else store
        try:
            self.store.ensure_indexes(list(dict.fromkeys(index_paths)))
        except BaseException:
            if isinstance(store, str):
                self.store.close()
            raise
        self._engine = Engine(
            self.store,
            self.preferences,
            self.reducers,
            self.timers,
            outbox=bool(self.listeners),
            history=history,
            state_version=state_version,
            upgrade=upgrade,
            # Weak: the background threads must not keep an app alive that its
            # user dropped, so that it can be collected (and warned about).
            on_commit=_weak(self._on_commit, None),
            on_acked=_weak(self._on_acked, None),
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
            _weak(self._queue_send, CasernError("the Casern app of this listener is gone")),
        )
        self._scheduler: BaseScheduler | None = None
        self._ticking = threading.Lock()
        self._skipped_ticks = 0
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
            "indexes": self.indexes,
        }
        self._dispatcher.keep_alive(self)
        _open_apps.add(self)

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
        trace = _telemetry.begin_send(reducer, id, reducer in self.reducers)
        try:
            action = _telemetry.track(trace, self._check_send(reducer, id, data, key))
            return self._engine.submit(action, lead=lead)
        except BaseException as e:
            _telemetry.refused(trace, e)
            raise

    def _check_send(self, reducer: str, id: str, data: Any, key: str | None) -> Action:
        """A send's action, or the error that says what is wrong with its arguments."""
        self._check_open()
        check_id(id)
        if reducer not in self.reducers:
            raise UnknownReducer(self._unknown_reducer(reducer))
        if key is not None and (not isinstance(key, str) or len(key) > MAX_KEY_LENGTH):
            raise InvalidData(
                f"key must be a str of at most {MAX_KEY_LENGTH} characters or None,"
                f" not {type(key).__name__}" + (f" of {len(key)}" if isinstance(key, str) else "")
            )
        if key is not None and not encodable(key):
            raise InvalidData(f"key {key!r:.60} holds a lone surrogate, which is not Unicode text")
        data_json, parsed = encode_data(reducer, data)
        validator = self._validators.get(reducer)
        if validator is not None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(json.loads(data_json)))
            if error is not None:
                raise InvalidData(
                    f"data for {reducer!r} is invalid at {error.json_path}: {error.message}"
                )
        return Action(SEND, id, Future(), reducer, data_json, key, data=parsed)

    def _unknown_reducer(self, reducer: str) -> str:
        known = ", ".join(sorted(self.reducers)) or "none"
        message = f"no reducer named {reducer!r} (known: {known})"
        close = difflib.get_close_matches(str(reducer), self.reducers, n=1)
        if close:
            return f"{message}; did you mean {close[0]!r}?"
        for slot, table in (("preferences", self.preferences), ("services", self.services)):
            if callable(table.get(reducer)):
                return (
                    f"{message}; {reducer!r} is in {slot}: the positional order is"
                    " Casern(store, preferences, services, reducers, listeners), or pass"
                    " reducers={...} by keyword"
                )
        return message

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

    def find(
        self, selector: Mapping[str, Any], *, limit: int = 100, after: str | None = None
    ) -> list[str]:
        """Ids whose current state matches a Mango-style selector, ascending, after `after`.

        States are matched as stored: one written by an older `state_version`
        is matched in its old shape until it next changes or `migrate` runs.
        """
        self._check_open()
        query = parse(selector)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidQuery(f"limit must be an int >= 0, not {limit!r}")
        if after is not None and not isinstance(after, str):
            raise InvalidQuery(f"after is the last id of the previous page (a str), not {after!r}")
        if limit == 0:
            return []
        return self.store.find(query, limit=limit, after=after)

    async def afind(
        self, selector: Mapping[str, Any], *, limit: int = 100, after: str | None = None
    ) -> list[str]:
        """`find` for asyncio (runs the query in a thread)."""
        return await asyncio.to_thread(self.find, selector, limit=limit, after=after)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued send is committed, every listener has run and
        every acknowledgement and failure record is written to the store.

        Returns False if `timeout` passed first. Handy in tests, scripts and demos.
        """
        self._dispatcher.check_not_inside("drain")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._engine.wait_idle(left):
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._dispatcher.wait_idle(left):
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # So that failed() and the outbox reflect what ran.
            if not self._engine.flush(left):
                return False
            if self._engine.wait_idle(0) and self._dispatcher.wait_idle(0):
                return True  # else listeners sent more meanwhile: once more

    def _under_way(self) -> int:
        """Committed changes of this process whose listeners are under way (or not yet acked)."""
        return self._dispatcher.backlog()

    # -- listener failures --------------------------------------------------------------

    def failed(self, limit: int = 10_000) -> list[dict[str, Any]]:
        """Deliveries that exhausted their retries: id, seq, listener, error, attempts."""
        self._check_open()
        ids = sorted(self.store.failed(limit))
        out: list[dict[str, Any]] = []
        # A few envelopes at a time: each holds a whole state (and the failed
        # changes' states), and only a few fields of it are wanted.
        for start in range(0, len(ids), _FAILED_READ):
            found = self.store.get_many(ids[start : start + _FAILED_READ])
            for id, rec in sorted(found.items()):
                for f in rec.doc.get("failed", ()):
                    out.append({k: (id if k == "id" else f.get(k)) for k in _FAILED_FIELDS})
            if len(out) >= limit:
                break
        return out[:limit]

    def retry(self, id: str | None = None) -> int:
        """Re-queue failed deliveries (all, or one id's); returns how many."""
        self._check_open()
        ids = [check_id(id)] if id is not None else self.store.failed(100_000)
        futures = [self._engine.submit(Action(RETRY, i, Future())) for i in ids]
        return sum(int(f.result() or 0) for f in futures)

    # -- looking into one machine -------------------------------------------------------

    def inspect(self, id: str) -> dict[str, Any] | None:
        """One machine as an operator sees it, or None for an unknown id.

        A dict with `id`, `state`, `seq`, `version` (as stored), `due` (reducer ->
        epoch seconds, soonest first), `pending` (changes in the outbox whose
        listeners are not yet acknowledged: `seq`, `reducer`, `applied_at`,
        `listeners`) and `failed` (as `failed()`). A state that cannot be upgraded
        is shown as stored, with the reason in `error`: a tool still sees it.
        The inspector is built on this; it reads one document, never a scan.
        """
        self._check_open()
        rec = self.store.get(check_id(id))
        if rec is None:
            return None
        doc = rec.doc
        error: str | None = None
        try:
            state = self._engine.load_state(doc)
        except UpgradeError as e:
            state, error = doc.get("state", {}), str(e)
        everyone = sorted(self.listeners)
        out: dict[str, Any] = {
            "id": id,
            "state": json.loads(dumps(state)),
            "seq": int(doc.get("seq", 0)),
            "version": int(doc.get("version", self.state_version)),
            "due": dict(sorted(doc.get("due", {}).items(), key=lambda kv: kv[1])),
            "pending": [
                {
                    "seq": e["seq"],
                    "reducer": e.get("reducer"),
                    "applied_at": e.get("applied_at"),
                    "listeners": list(e.get("listeners") or everyone),
                }
                for e in doc.get("pending", ())
            ],
            "failed": [
                {k: (id if k == "id" else f.get(k)) for k in _FAILED_FIELDS}
                for f in doc.get("failed", ())
            ],
        }
        if error is not None:
            out["error"] = error
        return out

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
        # Forks nobody is writing (a node that caught up, replication): merged now.
        self._engine.check(self.store.forked(limit))
        return fired

    def _recover(self, now: float) -> None:
        """Redeliver changes left in the outbox by a process that died.

        Never one this process committed or delivered: those stay in flight until
        their acknowledgement is durable, and one whose acknowledgement lands while
        the outbox is read is caught by the dispatcher's watch. Each change to
        redeliver is first claimed in its envelope (see `Engine._claim`), so that
        two live workers sweeping one store do not both run it.
        """
        if not self.listeners:
            return
        before = now - self.redeliver_after
        wall = time.time()
        seen = self._dispatcher.watch()
        try:
            # Ids with a change in flight here wait for a later sweep: their
            # oldest entries are most likely ours, and reading them costs.
            ids = [i for i in self.store.pending(before, 1000) if not self._dispatcher.busy(i)]
            recs = self.store.get_many(ids) if ids else {}
            # A forked envelope is merged first; its merged outbox is delivered then.
            forked = [id for id, rec in recs.items() if rec.conflicts]
            wanted: dict[str, frozenset[int]] = {}
            for id, rec in recs.items():
                if rec.conflicts:
                    continue
                seqs = frozenset(
                    e["seq"]
                    for e in rec.doc.get("pending", ())
                    if e["at"] <= before
                    and not self._dispatcher.inflight(id, e["seq"])
                    and (id, e["seq"]) not in seen  # checked after inflight: see watch()
                    and not _claimed_by_other(e, self._engine.token, wall)
                )
                if seqs:
                    wanted[id] = seqs
        finally:
            self._dispatcher.unwatch(seen)
        if forked:
            self._engine.check(forked)
        if not wanted:
            return
        futures = [
            self._engine.submit(Action(CLAIM, id, Future(), seqs=seqs))
            for id, seqs in wanted.items()
        ]
        wait_futures(futures)
        claimed = sum(f.result() for f in futures if f.exception() is None)
        if claimed:
            log.info("redelivering %d change(s) left pending by another process", claimed)

    def _safe_tick(self) -> None:
        # Under load a tick can outlast the interval: the ticks due meanwhile
        # coalesce here, reported in one DEBUG line, not one warning per tick.
        if not self._ticking.acquire(blocking=False):
            self._skipped_ticks += 1
            return
        try:
            started = time.monotonic()
            self.run_once()
        except CasernError as e:
            log.warning("scheduler tick failed: %s", e)
        finally:
            skipped, self._skipped_ticks = self._skipped_ticks, 0
            self._ticking.release()
        if skipped:
            log.debug(
                "a scheduler tick took %.2fs; %d tick(s) due meanwhile coalesced into the next",
                time.monotonic() - started,
                skipped,
            )

    def start(self) -> None:
        """Run timers and redelivery in the background (APScheduler), until `stop()`."""
        self._check_open()
        if self._scheduler is not None:
            return
        scheduler = BackgroundScheduler(
            timezone="UTC", executors={_EXECUTOR: ThreadPoolExecutor(2)}, logger=_SCHEDULER_LOG
        )
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

        scheduler = AsyncIOScheduler(
            timezone="UTC",
            event_loop=asyncio.get_running_loop(),
            executors={_EXECUTOR: AsyncIOExecutor()},
            logger=_SCHEDULER_LOG,
        )
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
            executor=_EXECUTOR,
            coalesce=True,
            max_instances=1_000_000,  # overlapping ticks return at once (see _safe_tick)
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
        self._dispatcher.check_not_inside("close")
        try:
            self._close(timeout)
        except KeyboardInterrupt:
            # Ctrl-C while waiting: what still runs stays in the outbox. Close the rest
            # now, or the exit hook would close it again and wait the whole timeout.
            self._close(min(timeout, 0.5))
            raise

    def _close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # A bit of the time is kept for writing the acknowledgements of what ran.
        reserve = min(1.0, timeout / 4)

        def left(keep: float = 0.0) -> float:
            return max(0.0, deadline - time.monotonic() - keep)

        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._ticking.acquire(timeout=left(reserve)):  # a tick under way ends first
            self._ticking.release()
        self.drain(left(reserve))
        self._closed = True
        self._dispatcher.stop(left(reserve))
        if not self._engine.stop(left()):
            log.warning(
                "close(timeout=%g): the store was still being written; it is closed"
                " once those writes end",
                timeout,
            )
            self._engine.then(self.store.close)
        else:
            self.store.close()
        _open_apps.discard(self)

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(
            f"unclosed {self!r}: call app.close() (or use `with`) when done; make one app"
            " per process at start-up rather than one per request",
            ResourceWarning,
            source=self,
            stacklevel=1,
        )
        self._closed = True
        # Collected: nothing is waited for (this may run in any thread, even ours).
        self._dispatcher.abandon()
        self._engine.stop(0)
        self._engine.then(self.store.close)

    def __enter__(self) -> Casern:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _claimed_by_other(entry: Mapping[str, Any], token: str, now: float) -> bool:
    """Whether another live process holds a claim on this pending entry."""
    claim = entry.get("claim")
    return claim is not None and claim["by"] != token and claim["until"] > now


def _weak(method: Callable[..., Any], gone: Exception | None) -> Callable[..., Any]:
    """Call `method` while its object lives; after that, raise `gone` (or do nothing)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        fn = ref()
        if fn is not None:
            return fn(*args)
        if gone is not None:
            raise gone
        return None

    return call


# Apps still open when the interpreter exits normally (a web worker told to stop
# just returns) are closed then, so that listeners under way finish. Weak: this
# registry keeps no app alive.
_open_apps: weakref.WeakSet[Casern] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for app in list(_open_apps):
        try:
            app.close()
        except Exception:
            log.exception("closing %r at exit failed", app)
