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
import logging
import math
import random
import threading
import time
import types
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from . import _fold, _merge, _telemetry, _waits
from ._actions import (
    ACK,
    CHECK,
    FIRE,
    FLUSH,
    SEND,
    Action,
    Delivery,
)
from ._errors import CasernError, ConflictError
from ._fold import Fold, Plan, Rules
from ._json import dumps
from ._types import Reducer, Timer, Upgrade
from .stores.base import Doc, Record, Store, Write

__all__ = ["Engine", "freeze"]

log = logging.getLogger("casern")

MAX_BATCH = 500
EXTRA_BATCH = 32  # at most this many others a sender writes after its own (see `_lead`)


def freeze(value: Any) -> Any:
    """A deep read-only view of preferences: mappings become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


# Nobody waits for an acknowledgement: its actions share one future, already
# resolved, instead of building one (a lock and a condition) per ack.
_ANSWERED: Future[Any] = Future()
_ANSWERED.set_result(None)


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
        self.on_commit = on_commit
        self.on_acked = on_acked
        self.max_conflicts = max_conflicts
        self.ack_delay = ack_delay
        # Well within `redeliver_after`, so that other processes never see a
        # delivered change as stale for want of its acknowledgement.
        self.ack_patience = max(ack_delay, min(2.0, (redeliver_after or 0.0) / 4))
        # Redelivering a stale change first writes a claim into its entry (revision-
        # checked): other live processes leave it alone for `redeliver_after`, the
        # grace a fresh commit gets, so two sweeps do not both run one change.
        self.token = uuid.uuid4().hex
        self.rules = Rules(
            preferences=preferences,
            reducers=reducers,
            timers=timers,
            state_version=state_version,
            upgrade=upgrade,
            history=history,
            outbox=outbox,
            journal=store.may_fork,
            # A store without atomic history keeps the newest entries in the envelope
            # (`log`) and moves them out in chunks: one extra write per chunk, not per send.
            log_chunk=0 if store.atomic_history else log_chunk,
            keep_keys=keep_keys,
            redeliver_after=redeliver_after,
            token=self.token,
            limit=store.max_document_size,
        )
        self.cache = _LRU(cache_size)
        # A store that may fork journals every applied action (`ops`, rules.journal),
        # and changes reach listeners only once their revision is confirmed; until
        # then they are held here (touched by the leading thread only).
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
        self._acks_writing = 0  # acks taken into a batch not yet processed (see `_take`)
        self._last_send = -math.inf  # time.monotonic() of the newest send queued
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
            if action.kind == SEND:
                self._last_send = time.monotonic()
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
            return _waits.wait_for(self._idle, lambda: self._outstanding == 0, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Write every deferred acknowledgement now; True once none is left unwritten.

        An acknowledgement that conflicted waits for its retry: True only when
        that one has landed too (or `timeout` passed first: False).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                _waits.result(self.submit(Action(FLUSH, "", Future())), left)
            except TimeoutError:
                return False
            with self._lock:
                unwritten = (
                    bool(self._acks)
                    or self._acks_writing > 0
                    or any(a.kind == ACK for _, _, a in self._retries)
                )
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
        """Write batches until nothing is left (or, for a sender, its own action is done).

        A sender whose action is done writes one more batch if a few others
        queued meanwhile: they are waiting, and waking the committer thread for
        them costs a thread switch. One small batch, not more: its own caller
        waits too, and a long queue is the committer thread's work.
        """
        self._here.leading = True
        extra = 1
        try:
            while True:
                batch, flushes, acks = self._take()
                if batch:
                    try:
                        self._process(batch)
                    except BaseException as e:  # never leave a caller waiting forever
                        log.exception("casern committer failed on a batch")
                        error = e if isinstance(e, CasernError) else CasernError(repr(e))
                        for a in batch:
                            if not a.future.done():
                                a.future.set_exception(error)
                    finally:  # written, or back in `_acks` or `_retries` for another try
                        if acks:
                            with self._lock:
                                self._acks_writing -= acks
                for a in flushes:
                    a.future.set_result(None)
                if not (batch or flushes):
                    return
                if own is not None and own.future.done():
                    if extra == 0 or not 0 < len(self._queue) <= EXTRA_BATCH:
                        return
                    extra -= 1
        finally:
            self._here.leading = False
            with self._lock:
                self._leading = False
                more = bool(self._queue) or (own is not None and self._overdue())
            if more:
                self._kick.set()

    def _take(self) -> tuple[list[Action], list[Action], int]:
        """Gather a batch: everything queued, due conflict retries and deferred acks.

        Returns the batch, the flushes to answer after it, and its number of acks.
        """
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
            if self._acks:
                self._take_acks(batch, bool(flushes), now, stopping)
            # Taken acknowledgements are unwritten until `_lead` has processed the
            # batch: `flush` must not report them written meanwhile.
            acks = sum(1 for a in batch if a.kind == ACK)
            self._acks_writing += acks
        return batch, flushes, acks

    def _take_acks(self, batch: list[Action], flush: bool, now: float, stopping: bool) -> None:
        """Add the deferred acks that go out now to `batch` (the lock is held).

        Acknowledgements ride along with the next write of their id, or go out
        in a sweep when due (see `_due`), or on flush.
        """
        ids = {a.id for a in batch}
        for id in ids & self._acks.keys():
            batch.append(self._ack_action(id))
        # A flush sweeps every deferred ack, batch after batch, not just one batch.
        self._sweeping = self._sweeping or flush
        sweep = stopping or self._sweeping
        room = MAX_BATCH  # beside the sends: a full queue must not starve the acks
        while self._acks and room > 0:
            room -= 1
            id, (_, _, since) = next(iter(self._acks.items()))
            if not (sweep or self._due(since) <= now):
                break  # acks are in arrival order: the rest are younger
            batch.append(self._ack_action(id))
        if not self._acks:
            self._sweeping = False

    def _overdue(self) -> bool:
        """Work the committer thread must see: retries, or a due acknowledgement sweep.

        A sender that leaves only young acknowledgements behind does not wake
        the committer: it wakes by itself when the oldest one is due.
        """
        if self._retries:  # rare (write conflicts): the committer times them
            return True
        return (
            bool(self._acks) and self._due(next(iter(self._acks.values()))[2]) <= time.monotonic()
        )

    def _due(self, since: float) -> float:
        """When an acknowledgement deferred at `since` goes out in a sweep of its own.

        Once `ack_delay` old and no send came for `ack_delay` (quiet); under
        steady load it waits up to `ack_patience` for a ride with the next
        write of its id, but not forever: else acks pile up, and the outbox
        with them. So a busy committer is not woken to sweep acks that the
        next sends would have carried for free.
        """
        return min(since + self.ack_patience, max(since, self._last_send) + self.ack_delay)

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
                waits.append(self._due(next(iter(self._acks.values()))[2]) - now)
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
        plans: list[Plan] = []
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
        writes = [
            Write(p.id, p.rev, p.doc or {}, p.history, p.drop, p.state_json, p.base) for p in plans
        ]
        started = time.perf_counter()
        try:
            revs = self.store.put_many(writes) if writes else []
        except CasernError as e:
            for p in plans:
                self.cache.pop(p.id)
                self._fail(p.actions, e)
            return
        _telemetry.commit_duration(time.perf_counter() - started)
        landed: list[Plan] = []
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
        if self.rules.journal and landed:
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

    def _confirm(self, landed: list[Plan], revs: Mapping[str, str]) -> None:
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

    def _merge(self, id: str, leaves: list[Record], actions: list[Action]) -> Plan:
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

    def _flush_log(self, plan: Plan) -> bool:
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
    def _resolve(plan: Plan) -> None:
        for action, result in plan.results:
            if action.future.done():
                continue
            if isinstance(result, BaseException):
                action.future.set_exception(result)
            else:
                action.future.set_result(result)

    # -- folding actions into one envelope (see _fold.py) ------------------------------

    def load_state(self, doc: Doc) -> dict[str, Any]:
        """The envelope's state in this code's `state_version` (upgraded in memory)."""
        return _fold.load_state(self.rules, doc)

    def _fold(
        self,
        id: str,
        rec: Record | None,
        actions: list[Action],
        state_json: str | None = None,
        *,
        force: bool = False,
    ) -> Plan:
        return Fold(self.rules, id, rec, state_json, force=force).run(actions)
