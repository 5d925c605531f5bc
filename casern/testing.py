"""Helpers to unit-test your own reducers and listeners, without a store.

Reducers and listeners are plain callables, so a test can call them directly; these
helpers add what the engine would do around the call, so that a test catches what
production would refuse::

    from casern.testing import check_reducer, fold, make_change, run_listener

    def test_paying_an_order():
        assert check_reducer(order, {"status": "new"}, {"event": "pay"}) == {"status": "paid"}

    def test_a_paid_order_is_shipped():
        change = make_change("order-7", prev={"status": "new"}, state={"status": "paid"})
        assert run_listener(ship, change) == [("ship", "order-7", {"carrier": "dhl"})]

How they fail: a broken contract (a result that is not a JSON object, a reducer that
is not pure) raises `AssertionError`, which pytest and unittest report as a test
failure. A reducer that raises is reported as `casern.ReducerError` with the original
as `__cause__`, exactly what `app.send` raises, because raising is how a reducer
legitimately refuses an action: test that with `pytest.raises(casern.ReducerError)`.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import threading
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ._actions import encode_data
from ._change import Change
from ._engine import freeze
from ._errors import InvalidState, ReducerError, UnknownReducer
from ._fold import normalize
from ._ids import check_id
from ._types import Listener, Reducer, State

__all__ = [
    "RecordingChange",
    "Sent",
    "arun_listener",
    "check_reducer",
    "fold",
    "make_change",
    "run_listener",
]


# -- reducers -----------------------------------------------------------------------------


def check_reducer(
    reducer: Reducer,
    state: State | None = None,
    data: Any = None,
    preferences: Mapping[str, Any] | None = None,
) -> State:
    """Run `reducer` as the engine would and return the new state it would commit.

    The reducer gets JSON copies of `state` (default `{}`) and `data`, and a read-only
    view of `preferences`, like under `app.send`. It runs twice on equal inputs:
    different results mean it is not pure (a clock, randomness, global state), which
    would make `app.replay` and conflict retries compute something else.

    Raises `AssertionError` if the result is not a JSON object the engine accepts, if
    the reducer is not pure, or if it mutated `preferences`; `casern.ReducerError`
    (original as `__cause__`) if it raised. `state` and `data` must be JSON themselves:
    otherwise `casern.InvalidState` / `casern.InvalidData`, as a store or `send` would.
    """
    return _check(_name(reducer), reducer, state, data, preferences)


def fold(
    reducers: Mapping[str, Reducer],
    sends: Iterable[tuple[str, Any]],
    preferences: Mapping[str, Any] | None = None,
    *,
    state: State | None = None,
) -> State:
    """Apply `(reducer_name, data)` pairs in order, from `state` (default `{}`).

    This is the state a machine reaches when those actions are sent to it one after
    another: a whole flow tested without a store. Each step is a `check_reducer`, so
    it fails the same way, with a note naming the step; an unknown name raises
    `casern.UnknownReducer`, as `send` would.
    """
    current: State = {} if state is None else state
    for n, (name, data) in enumerate(sends, 1):
        reducer = reducers.get(name)
        if reducer is None:
            known = ", ".join(sorted(reducers)) or "none"
            raise UnknownReducer(f"step {n}: no reducer named {name!r} (known: {known})")
        try:
            current = _check(name, reducer, current, data, preferences)
        except (AssertionError, ReducerError) as e:
            e.add_note(f"in fold(), at step {n}: ({name!r}, {data!r:.200})")
            raise
    return current


def _check(
    name: str,
    reducer: Reducer,
    state: State | None,
    data: Any,
    preferences: Mapping[str, Any] | None,
) -> State:
    try:
        state_json, _ = normalize({} if state is None else state)
    except InvalidState as e:
        raise InvalidState(f"the starting state for {name!r} is not a JSON object: {e}") from None
    data_json, _ = encode_data(name, data)
    # The engine hands every reducer this deep read-only view; objects inside it
    # that are not dicts or lists can still change, which the snapshot catches.
    prefs: Mapping[str, Any] = freeze(preferences or {})
    try:
        snapshot: Any = copy.deepcopy(dict(prefs))
    except Exception:  # services-like objects that cannot be copied: skip that check
        snapshot = None

    first = _reduce(name, reducer, prefs, state_json, data_json)
    try:
        second = _reduce(name, reducer, prefs, state_json, data_json)
    except ReducerError as e:
        raise AssertionError(
            f"reducer {name!r} is not pure: on equal inputs it first returned a state,"
            f" then raised {type(e.__cause__).__name__}: {e.__cause__}"
        ) from e.__cause__
    difference = _difference(first, second)
    if difference is not None:
        raise AssertionError(
            f"reducer {name!r} is not pure: two runs on equal inputs returned different"
            f" states ({difference}); read times and random values from the data"
            " (a timer sends {'now': ...}) and keep no state outside the machine's"
        )
    if snapshot is not None and snapshot != dict(prefs):
        raise AssertionError(
            f"reducer {name!r} mutated preferences; they are shared by every reducer"
            " and listener, and must be treated as read-only"
        )
    return first


def _reduce(
    name: str, reducer: Reducer, prefs: Mapping[str, Any], state_json: str, data_json: str
) -> State:
    """One run, exactly as the engine's: fresh JSON copies in, `normalize` on the way out."""
    try:
        new = reducer(prefs, json.loads(state_json), json.loads(data_json))
    except Exception as e:
        raise ReducerError(f"reducer {name!r} raised {type(e).__name__}: {e}") from e
    try:
        _, parsed = normalize(new)
    except InvalidState as e:
        raise AssertionError(
            f"reducer {name!r} returned a state casern would refuse: {e}"
        ) from None
    return parsed


def _difference(a: Any, b: Any, path: str = "$") -> str | None:
    """Where two JSON values first differ, as `at $.x[2]: 1 != 2`; None if equal."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            if k not in a or k not in b:
                return f"{path}.{k} only in the {'first' if k in a else 'second'} run"
            found = _difference(a[k], b[k], f"{path}.{k}")
            if found is not None:
                return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
    return f"at {path}: {a!r:.80} != {b!r:.80}"


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__name__", None) or repr(fn))


# -- listeners ----------------------------------------------------------------------------


class Sent(NamedTuple):
    """One `change.send(reducer, id, data)` a listener made; equal to a plain tuple."""

    reducer: str
    id: str
    data: Any


class _Recorder:
    """`change.send` for tests: validates like the real one, then records instead of sending."""

    def __init__(self, sent: list[Sent]) -> None:
        self.sent = sent

    def __call__(self, reducer: str, id: str, data: Any = None) -> None:
        if not isinstance(reducer, str):
            raise UnknownReducer(f"a reducer name must be a str, not {type(reducer).__name__}")
        check_id(id)
        # Recorded as a JSON copy: the real send encodes the data when it is called.
        self.sent.append(Sent(reducer, id, encode_data(reducer, data)[1]))


@dataclass(frozen=True, slots=True)
class RecordingChange(Change):
    """A `casern.Change` whose `send` records each call in `sent` instead of sending."""

    #: Every `send(reducer, id, data)` made with this change, in order.
    sent: list[Sent] = field(default_factory=list)


def make_change(
    id: str = "machine-1",
    *,
    reducer: str = "test",
    data: Any = None,
    key: str | None = None,
    seq: int = 1,
    prev: State | None = None,
    state: State | None = None,
    applied_at: datetime | None = None,
    preferences: Mapping[str, Any] | None = None,
    services: Mapping[str, Any] | None = None,
    listener: str = "test",
) -> RecordingChange:
    """Build the change a listener would receive, with a recording `send`.

    Everything is copied and checked as the dispatcher would: `data`, `prev` and
    `state` (default `{}`) are JSON copies, `preferences` and `services` read-only
    views, `applied_at` (default now) a timezone-aware datetime. Pass your fakes as
    `services`; what the listener sends ends up in `change.sent`.
    """
    if applied_at is None:
        applied_at = datetime.now(UTC)
    elif applied_at.tzinfo is None:
        raise ValueError("applied_at must be timezone-aware, like the engine's (UTC)")
    sent: list[Sent] = []
    return RecordingChange(
        id=check_id(id),
        reducer=reducer,
        data=encode_data(reducer, data)[1],
        key=key,
        seq=seq,
        prev=_state_copy("prev", prev),
        state=_state_copy("state", state),
        applied_at=applied_at,
        preferences=freeze(preferences or {}),
        services=types.MappingProxyType(dict(services or {})),
        send=_Recorder(sent),
        listener=listener,
        sent=sent,
    )


def _state_copy(what: str, state: State | None) -> State:
    try:
        return normalize({} if state is None else state)[1]
    except InvalidState as e:
        raise InvalidState(f"make_change({what}=...) is not a JSON object: {e}") from None


def run_listener(listener: Listener, change: Change, timeout: float = 5.0) -> list[Sent]:
    """Call a plain or `async def` listener with `change`; return what it sent.

    As under the dispatcher, a plain listener runs in a worker thread and an async one
    on an event loop (here a fresh one, `asyncio.run`), each allowed `timeout`
    seconds; past that, `AssertionError`. Whatever the listener raises propagates.
    `change` must come from `make_change`; inside a running event loop (an async
    test), use `await arun_listener(...)`.
    """
    recording = _recording(change)
    before = len(recording.sent)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_listener() cannot run inside an event loop; await arun_listener()")
    if inspect.iscoroutinefunction(listener):
        asyncio.run(_within(listener(change), listener, timeout))
    else:
        result = _in_thread(listener, change, timeout)
        if inspect.isawaitable(result):
            asyncio.run(_within(result, listener, timeout))
    return recording.sent[before:]


async def arun_listener(listener: Listener, change: Change, timeout: float = 5.0) -> list[Sent]:
    """`run_listener` for async tests: runs the listener on the current event loop."""
    recording = _recording(change)
    before = len(recording.sent)
    if inspect.iscoroutinefunction(listener):
        await _within(listener(change), listener, timeout)
    else:
        loop = asyncio.get_running_loop()
        result: Any = await _within(loop.run_in_executor(None, listener, change), listener, timeout)
        if inspect.isawaitable(result):
            await _within(result, listener, timeout)
    return recording.sent[before:]


def _recording(change: Change) -> RecordingChange:
    if not isinstance(change, RecordingChange):
        raise TypeError(
            f"run_listener() needs a change from casern.testing.make_change(), whose send"
            f" records; got {type(change).__name__}"
        )
    return change


async def _within(awaitable: Awaitable[Any], listener: Listener, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(
            f"listener {_name(listener)!r} did not finish within {timeout}s"
        ) from None


def _in_thread(listener: Listener, change: Change, timeout: float) -> Any:
    """Call a plain listener in a daemon thread: one that hangs cannot hang the tests."""
    outcome: list[Any] = []
    failure: list[BaseException] = []

    def call() -> None:
        try:
            outcome.append(listener(change))
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=call, name=f"casern-test-{_name(listener)}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"listener {_name(listener)!r} did not finish within {timeout}s")
    if failure:
        raise failure[0]
    return outcome[0]
