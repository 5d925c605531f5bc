"""The committer: validate → load → reduce → commit (revision-checked) → hand over effects.

One committer thread per app owns every write. Sends from any thread or task
are queued to it; it takes everything queued at once (group commit: one read
and one write for many ids, several actions of one id folded into one write),
so sends to one id never conflict with each other inside a process, and a lone
send waits for nothing. Across processes the revision check decides: a losing
write is re-read and its reducers re-run, so no update is ever lost.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
import secrets
import threading
import time
import types
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence, Set
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import _merge, _telemetry
from ._errors import (
    CasernError,
    ConflictError,
    InvalidData,
    InvalidState,
    ReducerError,
    UpgradeError,
)
from ._json import Refusal, dumps, encodable, to_json
from ._outbox import pack, unpack
from ._types import Reducer, Timer, Upgrade
from .stores.base import Doc, Record, Store, Write

log = logging.getLogger("casern")

SEND, FIRE, ACK, RETRY, MIGRATE, FLUSH = "send", "fire", "ack", "retry", "migrate", "flush"
CLAIM = "claim"
CHECK = "check"  # re-read an id that may have forked: merge, or hand over held changes
MAX_BATCH = 500
YEAR_5000 = datetime(5000, 1, 1, tzinfo=UTC).timestamp()  # due times beyond: milliseconds


def encode_data(reducer: str, data: Any) -> str:
    """`data` as JSON text for `reducer`, or the `InvalidData` that says why casern refuses it."""
    try:
        return to_json(data)[0]
    except Refusal as e:
        raise InvalidData(f"data for {reducer!r} {e}") from None


def freeze(value: Any) -> Any:
    """A deep read-only view of preferences: mappings become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def same(a: Any, b: Any) -> bool:
    """JSON equality: like ==, but true is not 1 (1 and 1.0 are one JSON number)."""
    if type(a) is not type(b):
        numbers = (int, float)
        return (
            isinstance(a, numbers)
            and isinstance(b, numbers)
            and not isinstance(a, bool)
            and not isinstance(b, bool)
            and a == b
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def now_iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


# Nobody waits for an acknowledgement: its actions share one future, already
# resolved, instead of building one (a lock and a condition) per ack.
_ANSWERED: Future[Any] = Future()
_ANSWERED.set_result(None)


@dataclass(slots=True, eq=False)
class Action:
    """One unit of work for the committer; `future` resolves when it is durable."""

    kind: str
    id: str
    future: Future[Any]
    reducer: str = ""
    data_json: str = "null"
    key: str | None = None
    seqs: frozenset[int] = frozenset()  # ACK: pending entries delivered; CLAIM: to redeliver
    failed: list[Doc] = field(default_factory=list)  # ACK: deliveries that gave up
    attempts: int = 0
    now: float | None = None  # FIRE: fire what is due by then (never later than the clock)
    trace: _telemetry.Send | None = None  # spans and metrics, reported when answered
    uid: str = ""  # SEND on a store that may fork: journaled, applied once (see _merge.py)


@dataclass(slots=True)
class Delivery:
    """A committed change handed to the dispatcher: its pending entry and both states."""

    id: str
    entry: Doc  # seq, reducer, data, key, applied_at, at, version, prev, state[, listeners]


@dataclass(slots=True)
class _Plan:
    id: str
    rev: str | None
    doc: Doc | None  # None: nothing to write
    actions: list[Action]
    results: list[tuple[Action, Any]]  # resolved after the write lands
    history: list[Doc] = field(default_factory=list)
    flush_log: list[Doc] = field(default_factory=list)  # committed history to move out first
    state_json: str = ""  # the JSON of doc["state"]
    deliveries: list[Delivery] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    drop: tuple[str, ...] = ()  # sibling revisions this write merges (deleted with it)


def _normalize(value: Any) -> tuple[str, dict[str, Any]]:
    """Return (json, parsed copy) of a reducer's result, or raise InvalidState."""
    if not isinstance(value, dict):
        raise InvalidState(
            f"a reducer must return a dict (a JSON object), not {type(value).__name__};"
            " return the new state, even if unchanged"
        )
    try:
        text, parsed = to_json(value)
    except Refusal as e:
        raise InvalidState(f"the new state {e}") from None
    return text, parsed


def _storable(failure: Doc) -> Doc:
    """A failure record whose error text can be stored (an exception message may hold anything)."""
    error = failure.get("error")
    if isinstance(error, str) and not encodable(error):
        return dict(failure, error=error.encode("utf-8", "backslashreplace").decode())
    return failure


def _state_too_large(reducer: str, size: int, limit: int) -> InvalidState:
    return InvalidState(
        f"reducer {reducer!r}: the new state is {size:,} bytes of JSON, over this store's"
        f" document limit of {limit:,} bytes; keep big data elsewhere and store a reference"
    )


class _LRU:
    """A bounded map id -> (Record, its state's JSON): the revision cache.

    A stale entry costs one conflict and a re-read; the JSON saves encoding the
    state again when this process writes the same id next.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, tuple[Record, str]] = OrderedDict()

    def get(self, id: str) -> tuple[Record, str] | None:
        entry = self._data.get(id)
        if entry is not None:
            self._data.move_to_end(id)
        return entry

    def put(self, rec: Record, state_json: str) -> None:
        if self.size <= 0:
            return
        self._data[rec.id] = (rec, state_json)
        self._data.move_to_end(rec.id)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, id: str) -> None:
        self._data.pop(id, None)


class Engine:
    """Folds queued actions into revision-checked writes; owns the committer thread."""

    def __init__(
        self,
        store: Store,
        preferences: Mapping[str, Any],
        reducers: Mapping[str, Reducer],
        timers: Mapping[str, Timer],
        *,
        outbox: bool,
        history: bool,
        state_version: int,
        upgrade: Upgrade | None,
        on_commit: Callable[[list[Delivery]], None],
        on_acked: Callable[[str, frozenset[int]], None],
        keep_keys: int = 100,
        cache_size: int = 4096,
        max_conflicts: int = 100,
        ack_delay: float = 0.1,
        log_chunk: int = 50,
        redeliver_after: float | None = None,
    ) -> None:
        self.store = store
        self.preferences = preferences
        self.reducers = reducers
        self.timers = timers
        self.outbox = outbox  # write pending entries for listeners
        self.history = history
        # A store without atomic history keeps the newest entries in the envelope
        # (`log`) and moves them out in chunks: one extra write per chunk, not per send.
        self.log_chunk = 0 if store.atomic_history else log_chunk
        self.state_version = state_version
        self.upgrade = upgrade
        self.on_commit = on_commit
        self.on_acked = on_acked
        self.keep_keys = keep_keys
        self.max_conflicts = max_conflicts
        self.ack_delay = ack_delay
        # Well within `redeliver_after`, so that other processes never see a
        # delivered change as stale for want of its acknowledgement.
        self.ack_patience = max(ack_delay, min(2.0, (redeliver_after or 0.0) / 4))
        self.redeliver_after = redeliver_after
        # Redelivering a stale change first writes a claim into its entry (revision-
        # checked): other live processes leave it alone for `redeliver_after`, the
        # grace a fresh commit gets, so two sweeps do not both run one change.
        self.token = uuid.uuid4().hex
        self.cache = _LRU(cache_size)
        # A store that may fork journals every applied action (`ops`), and changes
        # reach listeners only once their revision is confirmed; until then they
        # are held here (touched by the leading thread only).
        self.journal = store.may_fork
        self._held: dict[str, list[Delivery]] = {}
        # Everything below is guarded by _lock. Whoever holds the `_leading` flag
        # is the one thread that folds and writes; see `submit`.
        self._lock = threading.Lock()
        self._queue: deque[Action] = deque()
        self._leading = False
        self._stopping = False
        self._retries: list[tuple[float, int, Action]] = []
        self._tiebreak = 0
        self._acks: OrderedDict[str, tuple[set[int], list[Doc], float]] = OrderedDict()
        self._sweeping = False  # a flush asked for every deferred ack to be written
        self._on_exit: list[Callable[[], None]] = []
        self._exited = False
        self._kick = threading.Event()
        self._here = threading.local()  # .leading: this thread is folding right now
        self._idle = threading.Condition()
        self._outstanding = 0
        self._thread: threading.Thread | None = None
        self.writes = 0  # envelope writes that landed (for benches)

    # -- submitting ---------------------------------------------------------------------

    def submit(self, action: Action, *, lead: bool = False) -> Future[Any]:
        """Queue an action; returns its future.

        With `lead=True` (a blocking `send`) and nobody writing, the caller
        commits in its own thread: a lone send pays no hand-off between threads.
        Otherwise the committer thread takes it, together with everything else
        queued meanwhile (group commit).
        """
        if getattr(self._here, "leading", False):
            raise CasernError(
                "send() was called from inside a reducer or timers function; they must be"
                " pure: send further actions from a listener with change.send(...)"
            )
        with self._idle:
            self._outstanding += 1
        action.future.add_done_callback(self._done)
        with self._lock:
            self._queue.append(action)
            idle = not self._leading
            if idle and lead:
                self._leading = True
        if self._thread is None:
            self._start()
        if idle:
            if lead:
                self._lead(action)
            else:
                self._kick.set()
        return action.future

    def check(self, ids: Sequence[str]) -> None:
        """Queue a fresh read of ids that may have forked (merged by the committer)."""
        for id in ids:
            self.submit(Action(CHECK, id, Future()))

    def _check_later(self, id: str) -> None:
        a = Action(CHECK, id, Future())
        with self._idle:
            self._outstanding += 1
        a.future.add_done_callback(self._done)
        self._retry_later(a)

    def _release(self, id: str, doc: Doc) -> list[Delivery]:
        """Held changes of `id` still in `doc`'s outbox, the very same entry under the same seq.

        Two merges of one fork replay an action as the same seq but at different
        times (`at`): only the process whose merge survived hands it over.
        """
        held = self._held.pop(id, None)
        if not held:
            return []
        pending = {e["seq"]: e for e in doc.get("pending", ())}
        return [
            d
            for d in held
            if (e := pending.get(d.entry["seq"])) is not None
            and e.get("u") == d.entry.get("u")
            and e.get("at") == d.entry.get("at")
        ]

    def _done(self, _: Future[Any]) -> None:
        with self._idle:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()

    def ack(self, id: str, seq: int, failed: Sequence[Doc] = ()) -> None:
        """Record that every listener of (id, seq) finished; written lazily."""
        with self._lock:
            wake = not self._acks
            seqs, fails, since = self._acks.get(id) or (set(), [], time.monotonic())
            seqs.add(seq)
            fails.extend(failed)
            self._acks[id] = (seqs, fails, since)
        if wake:
            self._kick.set()  # the committer thread recomputes when to sweep

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no submitted action is unresolved."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Write every deferred acknowledgement now; True once none is left unwritten.

        An acknowledgement that conflicted waits for its retry: True only when
        that one has landed too (or `timeout` passed first: False).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self.submit(Action(FLUSH, "", Future())).result(left)
            except TimeoutError:
                return False
            with self._lock:
                unwritten = bool(self._acks) or any(a.kind == ACK for _, _, a in self._retries)
            if not unwritten:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)  # a conflicting ack retries within milliseconds

    def stop(self, timeout: float | None = None) -> bool:
        """Commit what is queued, write the deferred acknowledgements, stop the thread.

        False if the thread was still writing after `timeout`: it stops by itself
        once done, then runs what `then` gave it.
        """
        thread = self._thread
        if thread is None:
            return True
        with self._lock:
            self._stopping = True
        self._kick.set()
        if thread is not threading.current_thread():
            thread.join(timeout)
        if thread.is_alive():
            return False
        with self._lock:
            self._thread = None
            self._stopping = False
        return True

    def then(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the committer thread once it has stopped (now, if it has)."""
        with self._lock:
            if self._thread is not None and not self._exited:
                self._on_exit.append(fn)
                return
        fn()

    # -- the committer ------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._exited = False
                self._thread = threading.Thread(
                    target=self._run, name="casern-committer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        """The committer thread: leads when kicked, or when a retry or a sweep is due."""
        wait = self._wait_time()
        while True:
            self._kick.wait(wait)
            self._kick.clear()
            with self._lock:
                stopping = self._stopping
                mine = not self._leading
                if mine:
                    self._leading = True
            if not mine:  # a sender is writing; it kicks us if it leaves work behind
                if stopping:
                    time.sleep(0.001)
                    self._kick.set()
                wait = 1.0  # not a spin: the sender kicks when it leaves (see `_lead`)
                continue
            self._lead(None)
            wait = self._wait_time()
            if stopping:
                with self._lock:
                    if self._queue or self._retries or self._acks:
                        continue
                    on_exit, self._on_exit = self._on_exit, []
                    self._exited = True
                for fn in on_exit:
                    fn()
                return

    def _lead(self, own: Action | None) -> None:
        """Write batches until nothing is left (or, for a sender, its own action is done)."""
        self._here.leading = True
        try:
            while True:
                batch, flushes = self._take()
                if batch:
                    try:
                        self._process(batch)
                    except BaseException as e:  # never leave a caller waiting forever
                        log.exception("casern committer failed on a batch")
                        error = e if isinstance(e, CasernError) else CasernError(repr(e))
                        for a in batch:
                            if not a.future.done():
                                a.future.set_exception(error)
                for a in flushes:
                    a.future.set_result(None)
                if not (batch or flushes):
                    return
                if own is not None and own.future.done():
                    return
        finally:
            self._here.leading = False
            with self._lock:
                self._leading = False
                more = bool(self._queue) or (own is not None and self._overdue())
            if more:
                self._kick.set()

    def _take(self) -> tuple[list[Action], list[Action]]:
        """Gather a batch: everything queued, due conflict retries and deferred acks."""
        batch: list[Action] = []
        flushes: list[Action] = []
        now = time.monotonic()
        with self._lock:
            stopping = self._stopping
            while self._queue and len(batch) < MAX_BATCH:
                a = self._queue.popleft()
                (flushes if a.kind == FLUSH else batch).append(a)
            while self._retries and (self._retries[0][0] <= now or stopping):
                if len(batch) >= MAX_BATCH:
                    break
                batch.append(heapq.heappop(self._retries)[2])
            if not self._acks:
                return batch, flushes
            # Acknowledgements ride along with the next write of their id, or go
            # out in a sweep once `ack_delay` old when quiet (or on flush). Under
            # steady load they wait a little longer for a ride, but not forever:
            # else they pile up, and the outbox with them.
            ids = {a.id for a in batch}
            patience = self.ack_patience if ids else self.ack_delay
            for id in ids & self._acks.keys():
                batch.append(self._ack_action(id))
            # A flush sweeps every deferred ack, batch after batch, not just one batch.
            self._sweeping = self._sweeping or bool(flushes)
            sweep = stopping or self._sweeping
            room = MAX_BATCH  # beside the sends: a full queue must not starve the acks
            while self._acks and room > 0:
                room -= 1
                id, (_, _, since) = next(iter(self._acks.items()))
                if not (sweep or now - since >= patience):
                    break  # acks are in arrival order: the rest are younger
                batch.append(self._ack_action(id))
            if not self._acks:
                self._sweeping = False
        return batch, flushes

    def _overdue(self) -> bool:
        """Work the committer thread must see: retries, or a due acknowledgement sweep.

        A sender that leaves only young acknowledgements behind does not wake
        the committer: it wakes by itself when the oldest one is due.
        """
        if self._retries:  # rare (write conflicts): the committer times them
            return True
        since = next(iter(self._acks.values()))[2] if self._acks else math.inf
        return since + self.ack_delay <= time.monotonic()

    def _ack_action(self, id: str) -> Action:
        seqs, fails, _ = self._acks.pop(id)
        return Action(ACK, id, _ANSWERED, seqs=frozenset(seqs), failed=fails)

    def _wait_time(self) -> float:
        waits = [5.0]
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return 0.0
            if self._retries:
                waits.append(self._retries[0][0] - now)
            if self._acks:
                since = next(iter(self._acks.values()))[2]
                waits.append(since + self.ack_delay - now)
        return max(0.0005, min(waits))

    def _retry_later(self, action: Action) -> None:
        action.attempts += 1
        if action.attempts > self.max_conflicts:
            if action.kind == ACK:
                self.ack_again(action)  # no hurry: try again with the next sweep
                return
            action.future.set_exception(
                ConflictError(
                    f"gave up on {action.id!r} after {action.attempts - 1} write conflicts;"
                    " too many processes write this id at once"
                )
            )
            return
        delay = (
            0.0 if action.attempts == 1 else random.uniform(0, min(0.2, 0.002 * 2**action.attempts))
        )
        with self._lock:
            self._tiebreak += 1
            heapq.heappush(self._retries, (time.monotonic() + delay, self._tiebreak, action))

    def _process(self, batch: list[Action]) -> None:
        groups: dict[str, list[Action]] = {}
        for a in batch:
            groups.setdefault(a.id, []).append(a)
        checks = {a.id for a in batch if a.kind == CHECK}
        cached = {
            id: hit for id in groups if id not in checks and (hit := self.cache.get(id)) is not None
        }
        missing = [id for id in groups if id not in cached]
        try:
            fetched = self.store.get_many(missing) if missing else {}
            # A re-check asks for every leaf: a read's `conflicts` may miss a sibling.
            forked = [id for id, rec in fetched.items() if rec.conflicts or id in checks]
            leaves = self.store.leaves(forked) if forked else {}
        except CasernError as e:
            self._fail(batch, e)
            return
        plans: list[_Plan] = []
        released: list[Delivery] = []
        for id, actions in groups.items():
            hit = cached.get(id)
            try:
                if len(leaves.get(id, ())) > 1:
                    plan = self._merge(id, leaves[id], actions)
                elif hit is not None:
                    plan = self._fold(id, hit[0], actions, hit[1])
                else:
                    plan = self._fold(id, fetched.get(id), actions)
            except Exception as e:  # one id's envelope never fails another id's actions
                log.exception("casern could not fold the actions of %r", id)
                self.cache.pop(id)
                self._fail(actions, CasernError(f"could not apply the actions of {id!r}: {e!r}"))
                continue
            if plan.doc is not None:
                plans.append(plan)
            elif id in cached and any(a.kind in (SEND, FIRE) for a in actions):
                # A cached revision may be stale (another process wrote): decide
                # "nothing to do" only on a fresh read.
                self.cache.pop(id)
                for a in actions:
                    self._retry_later(a)
            else:
                self._resolve(plan)
                if plan.acked:
                    self.on_acked(plan.id, frozenset(plan.acked))
                if id in checks and (rec := fetched.get(id)) is not None:
                    released += self._release(id, rec.doc)
        if released:
            self._hand_over(released)
        if not plans:
            return
        plans = [p for p in plans if self._flush_log(p)]
        writes = [Write(p.id, p.rev, p.doc or {}, p.history, p.drop) for p in plans]
        started = time.perf_counter()
        try:
            revs = self.store.put_many(writes) if writes else []
        except CasernError as e:
            for p in plans:
                self.cache.pop(p.id)
                self._fail(p.actions, e)
            return
        _telemetry.commit_duration(time.perf_counter() - started)
        landed: list[_Plan] = []
        landed_revs: dict[str, str] = {}
        for plan, rev in zip(plans, revs, strict=True):
            if isinstance(rev, CasernError):  # the store refused this one document
                self.cache.pop(plan.id)
                self._fail(plan.actions, rev)
                continue
            if rev is None:
                self.cache.pop(plan.id)
                _telemetry.conflict(plan.actions)
                for a in plan.actions:
                    self._retry_later(a)
                continue
            self.writes += 1
            assert plan.doc is not None
            self.cache.put(Record(plan.id, rev, plan.doc), plan.state_json)
            landed.append(plan)
            landed_revs[plan.id] = rev
        if self.journal and landed:
            self._confirm(landed, landed_revs)
        # Hand effects over before answering, so that a caller who has its answer
        # can rely on the listeners being under way (see `Casern.drain`).
        self._hand_over([d for plan in landed for d in plan.deliveries])
        for plan in landed:
            self._resolve(plan)
            if plan.acked:
                self.on_acked(plan.id, frozenset(plan.acked))

    def _hand_over(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            try:
                self.on_commit(deliveries)
            except Exception:  # committed all the same: the outbox keeps the changes
                log.exception("handing committed changes to the listeners failed")

    def _confirm(self, landed: list[_Plan], revs: Mapping[str, str]) -> None:
        """Hold back the changes of writes that may still fork; check those again later.

        Listeners key their effects on `(id, seq)`: a change is handed over only
        once no merge can give its seq to another change.
        """
        try:
            sure = self.store.confirm(revs)
        except CasernError as e:
            log.warning("could not confirm %d write(s), checking again later: %s", len(landed), e)
            sure = set()
        for plan in landed:
            assert plan.doc is not None
            if plan.id in sure:
                seqs = {d.entry["seq"] for d in plan.deliveries}
                held = [d for d in self._release(plan.id, plan.doc) if d.entry["seq"] not in seqs]
                plan.deliveries[:0] = held
            else:
                self.cache.pop(plan.id)
                self._held.setdefault(plan.id, []).extend(plan.deliveries)
                plan.deliveries = []
                self._check_later(plan.id)

    def _merge(self, id: str, leaves: list[Record], actions: list[Action]) -> _Plan:
        """Fold the sibling revisions of `id` into one write (see `_merge.py`), then `actions`."""
        base = _merge.choose_base(leaves)
        others = [leaf for leaf in leaves if leaf is not base]
        rec, ops = _merge.replay(base, others)
        replays = [
            Action(
                SEND, id, Future(), op["reducer"], dumps(op.get("data")), op.get("key"), uid=op["u"]
            )
            for op in ops
        ]
        plan = self._fold(id, rec, replays + actions, force=True)
        plan.actions = actions
        plan.drop = tuple(leaf.rev for leaf in others)
        return plan

    def _flush_log(self, plan: _Plan) -> bool:
        """Write the committed entries the envelope is about to drop; False if that failed.

        Written before the envelope: if that write then conflicts, rewriting
        them later is harmless.
        """
        if not plan.flush_log:
            return True
        try:
            self.store.put_history(plan.id, plan.flush_log)
        except CasernError as e:
            self.cache.pop(plan.id)
            self._fail(plan.actions, e)
            return False
        return True

    def _fail(self, actions: Sequence[Action], error: CasernError) -> None:
        for a in actions:
            if a.kind == ACK:
                self.ack_again(a)
            elif not a.future.done():
                a.future.set_exception(error)

    def ack_again(self, a: Action) -> None:
        """Keep an acknowledgement that could not be written for the next sweep.

        When stopping it is dropped: its changes stay in the outbox and a later
        `start()` delivers them again.
        """
        if self._stopping:
            return
        last = max(a.seqs)
        for seq in a.seqs:
            self.ack(a.id, seq, a.failed if seq == last else ())

    @staticmethod
    def _resolve(plan: _Plan) -> None:
        for action, result in plan.results:
            if action.future.done():
                continue
            if isinstance(result, BaseException):
                action.future.set_exception(result)
            else:
                action.future.set_result(result)

    # -- folding actions into one envelope ----------------------------------------------

    def load_state(self, doc: Doc) -> dict[str, Any]:
        """The envelope's state in this code's `state_version` (upgraded in memory)."""
        state: dict[str, Any] = doc.get("state", {})
        version = int(doc.get("version", self.state_version))
        if version == self.state_version:
            return state
        if version > self.state_version:
            raise UpgradeError(
                f"the stored state was written by state_version={version}, newer than this"
                f" code's state_version={self.state_version}; deploy the newer code"
            )
        if self.upgrade is None:
            raise UpgradeError(
                f"the stored state has state_version={version} but this code expects"
                f" {self.state_version}; pass upgrade=fn(preferences, old_version, state)"
            )
        try:
            upgraded = self.upgrade(self.preferences, version, json.loads(dumps(state)))
        except Exception as e:
            raise UpgradeError(
                f"upgrade from state_version={version} to {self.state_version} failed: {e!r}"
            ) from e
        try:
            _, parsed = _normalize(upgraded)
        except InvalidState as e:
            raise UpgradeError(
                f"upgrade(preferences, {version}, state) must return the upgraded state"
                f" as a dict (a JSON object): {str(e).replace('a reducer', 'it')}"
            ) from None
        return parsed

    def _fold(
        self,
        id: str,
        rec: Record | None,
        actions: list[Action],
        state_json: str | None = None,
        *,
        force: bool = False,
    ) -> _Plan:
        """Apply `actions` in order to one envelope; return what to write and to answer.

        `force`: write even if nothing changed (a merge must delete its siblings).
        """
        doc: Doc = dict(rec.doc) if rec else {"state": {}, "seq": 0, "version": self.state_version}
        plan = _Plan(id, rec.rev if rec else None, None, actions, [])
        try:
            state = self.load_state(doc)
            upgrade_error: UpgradeError | None = None
        except UpgradeError as e:
            state, upgrade_error = doc.get("state", {}), e
        upgraded = upgrade_error is None and doc.get("version") != self.state_version
        if state_json is None or upgrade_error is not None or upgraded:
            state_json = dumps(state)
        cur_json = state_json
        seq = int(doc.get("seq", 0))
        keys: list[str] = list(doc.get("keys", ()))
        due: dict[str, float] = dict(doc.get("due", {}))
        fired: dict[str, float] = dict(doc.get("fired", {}))
        pending: list[Doc] = unpack(doc)
        log_: list[Doc] = list(doc.get("log", ()))
        if self.log_chunk and len(log_) >= self.log_chunk:
            plan.flush_log, log_ = log_, []
        failed: list[Doc] = list(doc.get("failed", ()))
        ops: list[Doc] = list(doc.get("ops", ()))
        uids = {op["u"] for op in ops}
        changed = False  # the state changed: new seq(s)
        meta = False  # something else in the envelope changed

        limit = self.store.max_document_size

        def step(
            name: str,
            data_json: str,
            key: str | None,
            a: Action,
            now: float,
            fire: float | None = None,
        ) -> None:
            nonlocal state, cur_json, seq, changed
            try:
                new = self.reducers[name](
                    self.preferences, json.loads(cur_json), json.loads(data_json)
                )
            except Exception as e:
                err = ReducerError(f"reducer {name!r} raised {type(e).__name__}: {e}")
                err.__cause__ = e
                plan.results.append((a, err))
                return
            try:
                new_json, new_state = _normalize(new)
            except InvalidState as e:
                plan.results.append((a, InvalidState(f"reducer {name!r}: {e}")))
                return
            if limit is not None and len(new_json) * 4 > limit and len(new_json.encode()) > limit:
                plan.results.append((a, _state_too_large(name, len(new_json.encode()), limit)))
                return
            if new_json == cur_json or (new_state == state and same(new_state, state)):
                plan.results.append((a, cur_json))
                return
            seq += 1
            changed = True
            _telemetry.committed(a, seq)
            record = {
                "seq": seq,
                "reducer": name,
                "data": json.loads(data_json),
                "key": key,
                "applied_at": now_iso(now),
                "version": self.state_version,
            }
            if self.history:
                (log_ if self.log_chunk else plan.history).append(record)
            uid = ""
            if self.journal:
                uid = a.uid if fire is None else secrets.token_hex(8)
                op = {"u": uid, "seq": seq, "reducer": name, "data": record["data"], "key": key}
                if fire is not None:
                    op["fire"] = fire
                ops.append(op)
                uids.add(uid)
            if self.outbox:
                entry = dict(record, at=now, prev=json.loads(cur_json), state=json.loads(new_json))
                _telemetry.stamp(a, entry)
                if uid:
                    entry["u"] = uid
                pending.append(entry)
                plan.deliveries.append(Delivery(id, entry))
            if key is not None:
                keys.append(key)
            state, cur_json = new_state, new_json
            plan.results.append((a, cur_json))

        for a in actions:
            now = time.time()
            if a.kind in (SEND, FIRE, MIGRATE) and upgrade_error is not None:
                plan.results.append((a, upgrade_error))
            elif a.kind == SEND:
                if self.journal and not a.uid:
                    a.uid = secrets.token_hex(8)  # kept across conflict retries
                if (a.key is not None and a.key in keys) or (self.journal and a.uid in uids):
                    _telemetry.duplicate(a)
                    plan.results.append((a, cur_json))
                else:
                    step(a.reducer, a.data_json, a.key, a, now)
            elif a.kind == FIRE:
                if a.now is not None:
                    now = min(now, a.now)
                # Fire every timer of this envelope that is due now: the revision
                # check of this write makes each due time fire once across workers.
                fired_any = False
                for name, at in sorted(due.items(), key=lambda kv: kv[1]):
                    if at > now:
                        continue
                    fired_any = meta = True
                    del due[name]
                    fired[name] = at
                    _telemetry.fired(a, id, name, at, now)
                    before = len(plan.results)
                    step(name, dumps({"now": now}), None, a, now, fire=at)
                    result = plan.results.pop(before) if len(plan.results) > before else None
                    if isinstance(result, BaseException):
                        log.error("timer %r of %r failed: %s", name, id, result)
                plan.results.append((a, cur_json if fired_any else None))
            elif a.kind == ACK:
                kept = [e for e in pending if e["seq"] not in a.seqs]
                meta = meta or len(kept) != len(pending) or bool(a.failed)
                # Reported acknowledged even if nothing is left to remove (another
                # process delivered it): the dispatcher stops tracking it either way.
                plan.acked.update(a.seqs)
                pending = kept
                failed.extend(_storable(f) for f in a.failed)
                plan.results.append((a, None))
            elif a.kind == RETRY:
                # Failed deliveries go back to the outbox, only for the listeners that failed.
                moved: dict[int, Doc] = {}
                for f in failed:
                    entry = moved.setdefault(
                        f["seq"],
                        {k: v for k, v in f.items() if k not in ("listener", "error", "attempts")},
                    )
                    entry.setdefault("listeners", []).append(f["listener"])
                for entry in moved.values():
                    entry["at"] = now
                    pending.append(entry)
                    plan.deliveries.append(Delivery(id, entry))
                plan.results.append((a, len(failed)))
                if failed:
                    meta = True
                    failed = []
            elif a.kind == MIGRATE:
                plan.results.append((a, upgraded))
                meta = meta or upgraded
            elif a.kind == CLAIM:
                claimed = self._claim(id, pending, a.seqs, now)
                plan.deliveries.extend(claimed)
                meta = meta or bool(claimed)
                plan.results.append((a, len(claimed)))
            elif a.kind == CHECK:
                plan.results.append((a, None))

        if changed and self.timers:
            try:
                self._schedule(cur_json, due, fired)
            except ReducerError as e:
                # The new state cannot be scheduled: refuse every change of this fold,
                # and write nothing (a fresh plan: no history, no deliveries).
                for i, (a, r) in enumerate(plan.results):
                    if a.kind == SEND and not isinstance(r, BaseException):
                        plan.results[i] = (a, e)
                return _Plan(id, plan.rev, None, actions, plan.results)
        if changed and self.redeliver_after is not None and plan.deliveries:
            # Entries left pending by a process that died go first, so this id's
            # listeners still run in seq order (the dispatcher skips those in flight).
            ours = {d.entry["seq"] for d in plan.deliveries}
            now = time.time()
            cutoff = now - self.redeliver_after
            old = {
                e["seq"]
                for e in pending
                if e["seq"] not in ours and e["seq"] < max(ours) and e["at"] <= cutoff
            }
            stale = self._claim(id, pending, old, now) if old else []
            plan.deliveries[:0] = sorted(stale, key=lambda d: d.entry["seq"])
        if not (changed or meta or plan.flush_log or force):
            return plan
        del keys[: max(0, len(keys) - self.keep_keys)]
        new_doc: Doc = {
            "state": state if upgrade_error is None else doc.get("state", {}),
            "seq": seq,
            "version": self.state_version if upgrade_error is None else doc.get("version"),
        }
        if keys:
            new_doc["keys"] = keys
        if due:
            new_doc["due"] = due
            new_doc["next_due"] = min(due.values())
        if fired:
            new_doc["fired"] = fired
        if log_:
            new_doc["log"] = log_
        if pending:
            pending.sort(key=lambda e: e["seq"])
            new_doc["pending"] = pack(pending, seq)
            new_doc["pending_since"] = self._pending_since(doc.get("pending_since"), pending)
        if failed:
            new_doc["failed"] = failed
            new_doc["nfailed"] = len(failed)
        if ops:
            new_doc["ops"] = ops[-self.keep_keys :]
        plan.doc = new_doc
        plan.state_json = cur_json if upgrade_error is None else dumps(new_doc["state"])
        return plan

    def _claim(self, id: str, pending: list[Doc], seqs: Set[int], now: float) -> list[Delivery]:
        """Claim the entries of `seqs` no other live process holds; replaces them in place.

        A live claim by another process is left alone; the revision check of the
        write that carries the claims makes one process win a race for the same entry.
        """
        claimed: list[Delivery] = []
        for i, e in enumerate(pending):
            if e["seq"] not in seqs:
                continue
            claim = e.get("claim")
            if claim is not None and claim["by"] != self.token and claim["until"] > now:
                continue
            until = now + (self.redeliver_after or 0.0)
            pending[i] = e = dict(e, claim={"by": self.token, "until": until})
            claimed.append(Delivery(id, e))
        return claimed

    def _pending_since(self, old: float | None, pending: list[Doc]) -> float:
        """The indexed lower bound of the outbox's applied times, changed as seldom as safe.

        Recovery looks for `pending_since <= now - redeliver_after`, so any lower
        bound of the pending entries' times finds every stale one. Keeping the
        old value (while it is young) spares an index update on most writes of
        a busy machine, whose previous change is acknowledged as the next one
        is added; refreshing it once it is half as old as `redeliver_after`
        keeps a busy machine from looking stale.
        """
        oldest: float = min(e["at"] for e in pending)
        if old is None or old > oldest or self.redeliver_after is None:
            return oldest
        return old if old >= time.time() - self.redeliver_after / 2 else oldest

    def _schedule(self, state_json: str, due: dict[str, float], fired: dict[str, float]) -> None:
        """Recompute due times after a change; a consumed time never fires again."""
        for name, timer in self.timers.items():
            try:
                at = timer(self.preferences, json.loads(state_json))
            except Exception as e:
                raise ReducerError(
                    f"timers function {name!r} raised {type(e).__name__}: {e}"
                ) from e
            if at is None:
                due.pop(name, None)
                fired.pop(name, None)
                continue
            if (
                isinstance(at, bool)
                or not isinstance(at, int | float)
                or (isinstance(at, float) and not math.isfinite(at))
            ):
                raise ReducerError(
                    f"timers function {name!r} returned {at!r}; return epoch seconds or None"
                )
            if at > YEAR_5000 or at < -YEAR_5000:  # before float(): 10**400 overflows there
                shown = repr(at) if isinstance(at, float) or at.bit_length() <= 64 else "a huge int"
                raise ReducerError(
                    f"timers function {name!r} returned {shown}, a time after the year 5000:"
                    " that looks like milliseconds (a JavaScript habit); return epoch seconds,"
                    " e.g. time.time() + 60"
                )
            at = float(at)
            if fired.get(name) == at:
                due.pop(name, None)
                continue
            fired.pop(name, None)
            due[name] = at
