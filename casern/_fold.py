"""The fold: what each kind of action does to one machine's envelope.

The committer reads an id's envelope, then applies every queued action of
that id to it in order, here, and writes the result once. A fold does no
I/O: it turns (stored envelope, actions) into a `Plan` — the document to
write (or None), each action's answer, the history records and the changes
for the listeners. Each kind of action reads in a method of its own:

    send     run the named reducer on the data (once per idempotency key)
    fire     run the reducers whose due time has come (each due time once)
    ack      drop delivered changes from the outbox, keep the failures
    retry    put failed deliveries back into the outbox
    migrate  rewrite a state stored by older code in this code's version
    claim    take over changes a dead process left undelivered
    check    nothing: the committer re-read the id (forks, held changes)

States are parsed once and never mutated after: the envelope, the history
record, the outbox entry and the cache share them. Reducers get copies.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import _telemetry
from ._actions import ACK, CHECK, CLAIM, FIRE, MIGRATE, RETRY, SEND, UNPARSED, Action, Delivery
from ._errors import InvalidState, ReducerError, UpgradeError
from ._json import Refusal, dumps, encodable, to_json
from ._outbox import pack, pack_failed, unpack, unpack_failed
from ._types import Reducer, Timer, Upgrade
from .stores.base import Doc, Record

__all__ = ["Fold", "Plan", "Rules", "load_state", "normalize", "same"]

_log = logging.getLogger("casern")

YEAR_5000 = datetime(5000, 1, 1, tzinfo=UTC).timestamp()  # due times beyond: milliseconds
# Bytes of data an envelope carries for history waiting to move out (stores without
# atomic history) and, apart, for the fork journal (stores that may fork); less under a
# small document limit. Else a few sends with big data would fill the envelope past the
# limit, and every later send to the id would be refused.
DATA_BYTES = 64 * 1024
_RECORD_BYTES = 100  # a history record's JSON beside its data, reducer name and key


@dataclass(frozen=True, slots=True)
class Rules:
    """What every fold of one app needs to know; fixed for the app's lifetime."""

    preferences: Mapping[str, Any]
    reducers: Mapping[str, Reducer]
    timers: Mapping[str, Timer]
    state_version: int
    upgrade: Upgrade | None
    history: bool  # write a history record per change
    outbox: bool  # write a pending entry per change, for listeners
    journal: bool  # a store that may fork: journal every applied action (see _merge.py)
    log_chunk: int  # > 0: history waits in the envelope, moved out this many at a time
    keep_keys: int  # idempotency keys (and journaled actions) kept per id
    redeliver_after: float | None
    token: str  # this process, in its claims on stale changes
    limit: int | None  # the store's document size limit, bytes of JSON


@dataclass(slots=True)
class Plan:
    """What a fold decided: the write, and what to do once it lands."""

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
    base: Doc | None = None  # the document of revision `rev`


# -- states ---------------------------------------------------------------------------


def load_state(rules: Rules, doc: Doc) -> dict[str, Any]:
    """The envelope's state in this code's `state_version` (upgraded in memory)."""
    state: dict[str, Any] = doc.get("state", {})
    version = int(doc.get("version", rules.state_version))
    if version == rules.state_version:
        return state
    if version > rules.state_version:
        raise UpgradeError(
            f"the stored state was written by state_version={version}, newer than this"
            f" code's state_version={rules.state_version}; deploy the newer code"
        )
    if rules.upgrade is None:
        raise UpgradeError(
            f"the stored state has state_version={version} but this code expects"
            f" {rules.state_version}; pass upgrade=fn(preferences, old_version, state)"
        )
    try:
        upgraded = rules.upgrade(rules.preferences, version, json.loads(dumps(state)))
    except Exception as e:
        raise UpgradeError(
            f"upgrade from state_version={version} to {rules.state_version} failed: {e!r}"
        ) from e
    try:
        _, parsed = normalize(upgraded)
    except InvalidState as e:
        raise UpgradeError(
            f"upgrade(preferences, {version}, state) must return the upgraded state"
            f" as a dict (a JSON object): {str(e).replace('a reducer', 'it')}"
        ) from None
    return parsed


def normalize(value: Any) -> tuple[str, dict[str, Any]]:
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


# The last whole second formatted, and its text: one tuple, swapped whole, so that
# committers of several apps in one process never pair a second with another's text.
_second: tuple[int, str] = (0, datetime.fromtimestamp(0, UTC).isoformat()[:19])


def now_iso(at: float) -> str:
    """`at` as datetime.isoformat() writes it in UTC; the date part is formatted once a second."""
    global _second
    whole = math.floor(at)
    micro = round((at - whole) * 1e6)
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    second, text = _second
    if second != whole:
        text = datetime.fromtimestamp(whole, UTC).isoformat()[:19]
        _second = (whole, text)
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"


def _state_too_large(reducer: str, size: int, limit: int) -> InvalidState:
    return InvalidState(
        f"reducer {reducer!r}: the new state is {size:,} bytes of JSON, over this store's"
        f" document limit of {limit:,} bytes; keep big data elsewhere and store a reference"
    )


def _storable(failure: Doc) -> Doc:
    """A failure record whose error text can be stored (an exception message may hold anything)."""
    error = failure.get("error")
    if isinstance(error, str) and not encodable(error):
        return dict(failure, error=error.encode("utf-8", "backslashreplace").decode())
    return failure


# -- the fold -------------------------------------------------------------------------


class Fold:
    """One envelope under change: its fields unpacked, and the plan being built.

    `force`: write even if nothing changed (a merge must delete its siblings).
    """

    def __init__(
        self,
        rules: Rules,
        id: str,
        rec: Record | None,
        state_json: str | None = None,
        *,
        force: bool = False,
    ) -> None:
        self.rules = rules
        self.id = id
        self.force = force
        doc: Doc = rec.doc if rec else {"state": {}, "seq": 0, "version": rules.state_version}
        self.doc = doc
        self.plan = Plan(id, rec.rev if rec else None, None, [], [], base=rec.doc if rec else None)
        self.upgrade_error: UpgradeError | None = None
        try:
            self.state = load_state(rules, doc)
        except UpgradeError as e:
            self.state, self.upgrade_error = doc.get("state", {}), e
        self.upgraded = self.upgrade_error is None and doc.get("version") != rules.state_version
        if state_json is None or self.upgrade_error is not None or self.upgraded:
            state_json = dumps(self.state)
        self.state_json = state_json
        self.seq = int(doc.get("seq", 0))
        self.keys: list[str] = list(doc.get("keys", ()))
        self.due: dict[str, float] = dict(doc.get("due", {}))
        self.fired: dict[str, float] = dict(doc.get("fired", {}))
        self.pending: list[Doc] = unpack(doc)
        self.budget = min(DATA_BYTES, rules.limit // 8) if rules.limit else DATA_BYTES
        self.log: list[Doc] = list(doc.get("log", ()))
        self.log_bytes: int = doc.get("log_bytes") or (len(dumps(self.log)) if self.log else 0)
        if rules.log_chunk and self.log and self._log_full():
            self.plan.flush_log, self.log, self.log_bytes = self.log, [], 0
        self.failed: list[Doc] = unpack_failed(doc)
        self.ops: list[Doc] = list(doc.get("ops", ())) if rules.journal else []
        self.uids = {op["u"] for op in self.ops}
        self.journaled = len(self.ops)  # those before this fold's actions
        self.changed = False  # the state changed: new seq(s)
        self.meta = False  # something else in the envelope changed

    def run(self, actions: list[Action]) -> Plan:
        """Apply `actions` in order; then schedule, and build the document to write."""
        plan = self.plan
        plan.actions = actions
        for a in actions:
            now = time.time()
            if self.upgrade_error is not None and a.kind in (SEND, FIRE, MIGRATE):
                plan.results.append((a, self.upgrade_error))
            else:
                _KINDS[a.kind](self, a, now)
        if self.changed and self.rules.timers:
            try:
                self._schedule()
            except ReducerError as e:
                # The new state cannot be scheduled: refuse every change of this fold,
                # and write nothing (a fresh plan: no history, no deliveries).
                for i, (a, r) in enumerate(plan.results):
                    if a.kind == SEND and not isinstance(r, BaseException):
                        plan.results[i] = (a, e)
                if any(a.kind == FIRE for a in actions):
                    return self._consume_due(actions, plan.results, e)
                return Plan(self.id, plan.rev, None, actions, plan.results)
        if self.changed and self.rules.redeliver_after is not None and plan.deliveries:
            self._claim_stale()
        if self.changed or self.meta or plan.flush_log or self.force:
            plan.doc = self._document()
        return plan

    # -- one method per kind of action ------------------------------------------------

    def send(self, a: Action, now: float) -> None:
        """Run the reducer, unless this key (or, on a forking store, this action) was applied."""
        if self.rules.journal and not a.uid:
            a.uid = secrets.token_hex(8)  # kept across conflict retries
        applied = a.key is not None and a.key in self.keys
        if applied or (self.rules.journal and a.uid in self.uids):
            _telemetry.duplicate(a)
            self.plan.results.append((a, self.state_json))
            return
        data = json.loads(a.data_json) if a.data is UNPARSED else a.data
        self.plan.results.append((a, self.reduce(a, a.reducer, a.data_json, data, a.key, now)))

    def fire(self, a: Action, now: float) -> None:
        """Fire every timer of this envelope that is due by now, each due time once.

        The revision check of this write makes each due time fire once across workers.
        """
        now, due = self._take_due(a, now)
        for name, at in due:
            _telemetry.fired(a, self.id, name, at, now)
            data = {"now": now}
            result = self.reduce(a, name, dumps(data), data, None, now, fire=at)
            if isinstance(result, BaseException):
                _log.error("timer %r of %r failed: %s", name, self.id, result)
        self.plan.results.append((a, self.state_json if due else None))

    def _take_due(self, a: Action, now: float) -> tuple[float, list[tuple[str, float]]]:
        """Consume the due times `a` fires, earliest first: (its clock, those times)."""
        if a.now is not None:
            now = min(now, a.now)
        due = [
            (name, at) for name, at in sorted(self.due.items(), key=lambda kv: kv[1]) if at <= now
        ]
        for name, at in due:
            del self.due[name]
            self.fired[name] = at
        self.meta = self.meta or bool(due)
        return now, due

    def ack(self, a: Action, now: float) -> None:
        """Drop the delivered changes from the outbox; keep the deliveries that gave up."""
        kept = [e for e in self.pending if e["seq"] not in a.seqs]
        self.meta = self.meta or len(kept) != len(self.pending) or bool(a.failed)
        # Reported acknowledged even if nothing is left to remove (another
        # process delivered it): the dispatcher stops tracking it either way.
        self.plan.acked.update(a.seqs)
        self.pending = kept
        self.failed.extend(_storable(f) for f in a.failed)
        self.plan.results.append((a, None))

    def retry(self, a: Action, now: float) -> None:
        """Put failed deliveries back into the outbox, only for the listeners that failed."""
        moved: dict[int, Doc] = {}
        for f in self.failed:
            entry = moved.setdefault(
                f["seq"],
                {k: v for k, v in f.items() if k not in ("listener", "error", "attempts")},
            )
            entry.setdefault("listeners", []).append(f["listener"])
        for entry in moved.values():
            entry["at"] = now
            self.pending.append(entry)
            self.plan.deliveries.append(Delivery(self.id, entry))
        self.plan.results.append((a, len(self.failed)))
        if self.failed:
            self.meta = True
            self.failed = []

    def migrate(self, a: Action, now: float) -> None:
        """Write the upgraded state back (loading already upgraded it in memory)."""
        self.plan.results.append((a, self.upgraded))
        self.meta = self.meta or self.upgraded

    def claim(self, a: Action, now: float) -> None:
        """Take over stale changes for redelivery (see `_claim`)."""
        claimed = self._claim(a.seqs, now)
        self.plan.deliveries.extend(claimed)
        self.meta = self.meta or bool(claimed)
        self.plan.results.append((a, len(claimed)))

    def check(self, a: Action, now: float) -> None:
        """Nothing to change: the committer re-read the id, which was the point."""
        self.plan.results.append((a, None))

    # -- the reducer step -------------------------------------------------------------

    def reduce(
        self,
        a: Action,
        name: str,
        data_json: str,
        data: Any,
        key: str | None,
        now: float,
        fire: float | None = None,
    ) -> Any:
        """Run reducer `name`; a new state becomes the next change. Returns the answer.

        The answer is the state's JSON, or the error that refused this action
        (the fold goes on with the next action).
        """
        rules = self.rules
        try:
            new = rules.reducers[name](
                rules.preferences, json.loads(self.state_json), json.loads(data_json)
            )
        except Exception as e:
            err = ReducerError(f"reducer {name!r} raised {type(e).__name__}: {e}")
            err.__cause__ = e
            return err
        try:
            new_json, new_state = normalize(new)
        except InvalidState as e:
            return InvalidState(f"reducer {name!r}: {e}")
        limit = rules.limit
        if limit is not None and len(new_json) * 4 > limit and len(new_json.encode()) > limit:
            return _state_too_large(name, len(new_json.encode()), limit)
        if new_json == self.state_json or (new_state == self.state and same(new_state, self.state)):
            return self.state_json
        self.seq += 1
        self.changed = True
        _telemetry.committed(a, self.seq)
        record = {
            "seq": self.seq,
            "reducer": name,
            "data": data,
            "key": key,
            "applied_at": now_iso(now),
            "version": rules.state_version,
        }
        if rules.history and rules.log_chunk:
            self.log.append(record)
            self.log_bytes += len(data_json) + len(name) + len(key or "") + _RECORD_BYTES
        elif rules.history:
            self.plan.history.append(record)
        uid = ""
        if rules.journal:
            uid = a.uid if fire is None else secrets.token_hex(8)
            op = {"u": uid, "seq": self.seq, "reducer": name, "data": data, "key": key}
            op["b"] = len(data_json)  # see `_journal`
            if fire is not None:
                op["fire"] = fire
            self.ops.append(op)
            self.uids.add(uid)
        if rules.outbox:
            entry = dict(record, at=now, prev=self.state, state=new_state)
            _telemetry.stamp(a, entry)
            if uid:
                entry["u"] = uid
            self.pending.append(entry)
            texts = (data_json, self.state_json, new_json)
            self.plan.deliveries.append(Delivery(self.id, entry, texts))
        if key is not None:
            self.keys.append(key)
        self.state, self.state_json = new_state, new_json
        return new_json

    def _consume_due(
        self, actions: list[Action], results: list[tuple[Action, Any]], error: ReducerError
    ) -> Plan:
        """A fired timer's change could not be scheduled: consume its due time all the same.

        A due time fires once, as when its reducer raises; else it stayed due and
        fired again on every tick. A fresh fold of the stored envelope applies no
        change: sends get `error`, fires only consume, the rest runs as usual.
        """
        _log.error("timer of %r fired, but its change is not applied: %s", self.id, error)
        rec = None if self.plan.rev is None else Record(self.id, self.plan.rev, self.doc)
        fold = Fold(self.rules, self.id, rec, force=self.force)
        fold.plan.actions = actions
        now = time.time()
        for a, (_, answer) in zip(actions, results, strict=True):  # one answer per action
            if a.kind == SEND:
                fold.plan.results.append((a, answer))
            elif a.kind == FIRE:
                fold._take_due(a, now)
                fold.plan.results.append((a, None))
            else:
                _KINDS[a.kind](fold, a, now)
        if fold.meta or fold.force:
            fold.plan.doc = fold._document()
        return fold.plan

    # -- after the actions ------------------------------------------------------------

    def _document(self) -> Doc:
        """The envelope to write: state, seq, version and whatever else is not empty."""
        rules, ok = self.rules, self.upgrade_error is None
        keys = self.keys[-rules.keep_keys :] if len(self.keys) > rules.keep_keys else self.keys
        doc: Doc = {
            "state": self.state if ok else self.doc.get("state", {}),
            "seq": self.seq,
            "version": rules.state_version if ok else self.doc.get("version"),
        }
        if keys:
            doc["keys"] = keys
        if self.due:
            doc["due"] = self.due
            doc["next_due"] = min(self.due.values())
        if self.fired:
            doc["fired"] = self.fired
        if self.log:
            doc["log"] = self.log
            doc["log_bytes"] = self.log_bytes
        if self.pending:
            self.pending.sort(key=lambda e: e["seq"])
            doc["pending"] = pack(self.pending, self.seq)
            doc["pending_since"] = self._pending_since()
        if self.failed:
            doc["failed"] = pack_failed(self.failed, self.seq)
            doc["nfailed"] = len(self.failed)
        if self.ops:
            doc["ops"] = self._journal()
        self.plan.state_json = self.state_json if ok else dumps(doc["state"])
        return doc

    def _log_full(self) -> bool:
        """Time to move the envelope's history out: `log_chunk` entries, or `budget` bytes."""
        rules = self.rules
        if len(self.log) >= rules.log_chunk or self.log_bytes >= self.budget:
            return True
        return rules.limit is not None and self.log_bytes + len(self.state_json) >= rules.limit // 2

    def _journal(self) -> list[Doc]:
        """The newest `keep_keys` journaled actions; whole while their data fits `budget`.

        A merge replays whole entries. This fold's own are always whole (should
        this write fork, they are the ones to replay); older ones past the
        budget keep only `u` and `seq`: enough to never apply a retried send twice.
        """
        ops = self.ops[-self.rules.keep_keys :]
        older = len(ops) - (len(self.ops) - self.journaled)
        total = 0
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            if "reducer" not in op:
                continue
            size = op.get("b")
            total += len(dumps(op.get("data"))) if size is None else size
            if total > self.budget and i < older:
                ops[i] = {"u": op["u"], "seq": op["seq"]}
        return ops

    def _claim_stale(self) -> None:
        """Claim entries a dead process left pending, ahead of this fold's new changes.

        So this id's listeners still run in seq order (the dispatcher skips
        those in flight).
        """
        deliveries = self.plan.deliveries
        ours = {d.entry["seq"] for d in deliveries}
        now = time.time()
        cutoff = now - (self.rules.redeliver_after or 0.0)
        newest = max(ours)
        old = {
            e["seq"]
            for e in self.pending
            if e["seq"] not in ours and e["seq"] < newest and e["at"] <= cutoff
        }
        if old:
            stale = self._claim(old, now)
            deliveries[:0] = sorted(stale, key=lambda d: d.entry["seq"])

    def _claim(self, seqs: Set[int], now: float) -> list[Delivery]:
        """Claim the entries of `seqs` no other live process holds; replaces them in place.

        A live claim by another process is left alone; the revision check of the
        write that carries the claims makes one process win a race for the same entry.
        """
        claimed: list[Delivery] = []
        token, until = self.rules.token, now + (self.rules.redeliver_after or 0.0)
        for i, e in enumerate(self.pending):
            if e["seq"] not in seqs:
                continue
            claim = e.get("claim")
            if claim is not None and claim["by"] != token and claim["until"] > now:
                continue
            self.pending[i] = e = dict(e, claim={"by": token, "until": until})
            claimed.append(Delivery(self.id, e))
        return claimed

    def _pending_since(self) -> float:
        """The indexed lower bound of the outbox's applied times, changed as seldom as safe.

        Recovery looks for `pending_since <= now - redeliver_after`, so any lower
        bound of the pending entries' times finds every stale one. Keeping the
        old value (while it is young) spares an index update on most writes of
        a busy machine, whose previous change is acknowledged as the next one
        is added; refreshing it once it is half as old as `redeliver_after`
        keeps a busy machine from looking stale.
        """
        old: float | None = self.doc.get("pending_since")
        oldest: float = min(e["at"] for e in self.pending)
        after = self.rules.redeliver_after
        if old is None or old > oldest or after is None:
            return oldest
        return old if old >= time.time() - after / 2 else oldest

    def _schedule(self) -> None:
        """Recompute due times after a change; a consumed time never fires again."""
        rules, due, fired = self.rules, self.due, self.fired
        for name, timer in rules.timers.items():
            try:
                at = timer(rules.preferences, json.loads(self.state_json))
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


_KINDS: dict[str, Callable[[Fold, Action, float], None]] = {
    SEND: Fold.send,
    FIRE: Fold.fire,
    ACK: Fold.ack,
    RETRY: Fold.retry,
    MIGRATE: Fold.migrate,
    CLAIM: Fold.claim,
    CHECK: Fold.check,
}
