"""casern.testing: test reducers and listeners the way the engine runs them, without a store."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

import casern
from casern.reducers import InvalidTransition, counter, merge, transitions
from casern.testing import (
    RecordingChange,
    Sent,
    arun_listener,
    check_reducer,
    fold,
    make_change,
    run_listener,
)

order = transitions(
    {
        "new": {"pay": "paid", "cancel": "cancelled"},
        "paid": {"ship": "shipped", "refund": "cancelled"},
    }
)
REDUCERS: dict[str, Any] = {"order": order, "update": merge, "visit": counter("visits")}


# -- check_reducer: the happy path ---------------------------------------------------------


def test_check_reducer_returns_the_state_the_engine_would_commit() -> None:
    assert check_reducer(order, {"status": "new"}, {"event": "pay"}) == {"status": "paid"}


def test_check_reducer_starts_from_an_empty_state_like_a_new_machine() -> None:
    assert check_reducer(counter("visits")) == {"visits": 1}


def test_check_reducer_hands_the_reducer_copies_so_the_callers_values_stay_intact() -> None:
    def scribble(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        state["items"].append(data["item"])
        data["item"] = "changed"
        return state

    state = {"items": ["a"]}
    data = {"item": "b"}
    assert check_reducer(scribble, state, data) == {"items": ["a", "b"]}
    assert state == {"items": ["a"]}
    assert data == {"item": "b"}


def test_check_reducer_gives_preferences_read_only() -> None:
    def late_fee(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {**state, "fee": preferences["fee"] * data["days"]}

    assert check_reducer(late_fee, {}, {"days": 3}, {"fee": 2}) == {"fee": 6}


def test_check_reducer_returns_the_json_form_a_send_would_return() -> None:
    def tupled(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"pair": (1, 2)}

    assert check_reducer(tupled) == {"pair": [1, 2]}


def test_check_reducer_agrees_with_a_real_app() -> None:
    with casern.Casern("sqlite://", {"fee": 2}, {}, REDUCERS, {}) as app:
        app.send("order", "o-1", {"event": "pay"})
        sent = app.send("update", "o-1", {"note": "fragile"})
    expected = check_reducer(merge, check_reducer(order, {}, {"event": "pay"}), {"note": "fragile"})
    assert sent == expected == {"status": "paid", "note": "fragile"}


# -- check_reducer: what it refuses --------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (None, "must return a dict"),
        (["not", "an", "object"], "must return a dict"),
        ({"when": datetime(2024, 1, 1)}, "not JSON-serialisable"),
        ({"tags": {"a", "b"}}, "not JSON-serialisable"),
        ({"ratio": float("nan")}, "not JSON-serialisable"),
        ({"by_id": {1: "x"}}, "non-str key 1"),
    ],
)
def test_a_result_that_is_not_a_json_object_fails_the_test(result: Any, message: str) -> None:
    def broken(preferences: Any, state: dict[str, Any], data: Any) -> Any:
        return result

    with pytest.raises(AssertionError, match=message):
        check_reducer(broken)


def test_the_same_result_is_refused_by_a_real_app() -> None:
    def none(preferences: Any, state: dict[str, Any], data: Any) -> Any:
        return None

    with pytest.raises(AssertionError, match="'none' returned a state casern would refuse"):
        check_reducer(none)
    with (
        casern.Casern("sqlite://", {}, {}, {"none": none}, {}) as app,
        pytest.raises(casern.InvalidState, match="must return a dict"),
    ):
        app.send("none", "m-1")


def test_a_reducer_that_reads_the_clock_is_reported_as_impure() -> None:
    def stamp(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {**state, "at": time.perf_counter_ns()}

    with pytest.raises(AssertionError, match=r"'stamp' is not pure.*at \$\.at: \d+ != \d+"):
        check_reducer(stamp)


def test_a_reducer_with_randomness_is_reported_as_impure() -> None:
    def pick(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"winner": random.random()}

    with pytest.raises(AssertionError, match="not pure"):
        check_reducer(pick)


def test_a_reducer_that_keeps_global_state_is_reported_as_impure() -> None:
    tickets = itertools.count(1)

    def issue(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {"ticket": {"number": next(tickets), "queue": ["a"]}}

    with pytest.raises(AssertionError, match=r"at \$\.ticket\.number: 1 != 2"):
        check_reducer(issue)


def test_a_reducer_that_raises_only_the_second_time_is_reported_as_impure() -> None:
    calls = []

    def flaky(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("quota exceeded")
        return state

    with pytest.raises(AssertionError, match="first returned a state, then raised RuntimeError"):
        check_reducer(flaky)


def test_a_reducer_that_mutates_nested_preferences_fails_as_in_the_app() -> None:
    def remember(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        preferences["seen"].append(data)  # preferences are deep read-only: lists are tuples
        return state

    with pytest.raises(casern.ReducerError, match="AttributeError"):
        check_reducer(remember, {}, "x", {"seen": []})
    app = casern.Casern("sqlite://", {"seen": []}, {}, {"remember": remember}, {})
    with app, pytest.raises(casern.ReducerError, match="AttributeError"):
        app.send("remember", "a", "x")


def test_a_reducer_that_mutates_an_object_in_preferences_fails_the_test() -> None:
    class Registry:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Registry) and other.seen == self.seen

        __hash__ = None  # type: ignore[assignment]

    def remember(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        preferences["registry"].seen.append(data)
        return state

    with pytest.raises(AssertionError, match="mutated preferences"):
        check_reducer(remember, {}, "x", {"registry": Registry()})


def test_a_reducer_that_raises_is_reported_as_the_app_would_report_it() -> None:
    with pytest.raises(casern.ReducerError, match="'transition' raised InvalidTransition") as e:
        check_reducer(order, {"status": "shipped"}, {"event": "pay"})
    assert isinstance(e.value.__cause__, InvalidTransition)
    assert e.value.__cause__.state == "shipped"


def test_inputs_that_no_send_could_produce_are_refused_like_send_refuses_them() -> None:
    with pytest.raises(casern.InvalidData, match="not JSON"):
        check_reducer(merge, {}, {"at": datetime.now(UTC)})
    with pytest.raises(casern.InvalidState, match="starting state"):
        check_reducer(merge, ["not", "a", "state"], {})  # type: ignore[arg-type]


# -- fold: a whole flow --------------------------------------------------------------------


def test_fold_applies_sends_in_order_from_an_empty_state() -> None:
    flow = [
        ("order", {"event": "pay"}),
        ("visit", None),
        ("update", {"note": "fragile"}),
        ("order", "ship"),
        ("visit", {"by": 2}),
    ]
    assert fold(REDUCERS, flow) == {"status": "shipped", "visits": 3, "note": "fragile"}


def test_fold_can_start_from_a_given_state() -> None:
    assert fold(REDUCERS, [("order", "refund")], state={"status": "paid"}) == {
        "status": "cancelled"
    }


def test_fold_names_the_step_that_failed() -> None:
    with pytest.raises(casern.ReducerError) as e:
        fold(REDUCERS, [("order", "pay"), ("order", "ship"), ("order", "pay")])
    assert "in fold(), at step 3: ('order', 'pay')" in e.value.__notes__


def test_fold_refuses_an_unknown_reducer_like_send() -> None:
    with pytest.raises(casern.UnknownReducer, match="step 1: no reducer named 'ordr'"):
        fold(REDUCERS, [("ordr", "pay")])


# -- make_change and run_listener ------------------------------------------------------------


def ship(change: casern.Change) -> None:
    """The listener under test: when an order is paid, ask the carrier and mark it shipped."""
    if change.state.get("status") == "paid" and change.prev.get("status") != "paid":
        tracking = change.services["carrier"](change.id)
        change.send("order", change.id, {"event": "ship", "tracking": tracking})


def test_make_change_builds_the_change_a_listener_receives() -> None:
    change = make_change("order-7", reducer="order", data={"event": "pay"}, seq=3)
    assert isinstance(change, casern.Change)
    assert (change.id, change.reducer, change.data, change.seq) == (
        "order-7",
        "order",
        {"event": "pay"},
        3,
    )
    assert change.prev == change.state == {}
    assert change.applied_at.tzinfo is not None
    assert change.sent == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.seq = 4  # type: ignore[misc]


def test_a_listener_test_with_a_fake_service() -> None:
    change = make_change(
        "order-7",
        prev={"status": "new"},
        state={"status": "paid"},
        services={"carrier": lambda id: f"TRACK-{id}"},
    )
    assert run_listener(ship, change) == [
        ("order", "order-7", {"event": "ship", "tracking": "TRACK-order-7"})
    ]
    assert change.sent == [Sent("order", "order-7", {"event": "ship", "tracking": "TRACK-order-7"})]


def test_a_listener_that_sends_nothing_returns_an_empty_list() -> None:
    change = make_change(prev={"status": "paid"}, state={"status": "shipped"})
    assert run_listener(ship, change) == []


def test_run_listener_returns_only_what_that_call_sent() -> None:
    change = make_change(state={"status": "paid"}, services={"carrier": lambda id: "T"})
    run_listener(ship, change)
    assert len(run_listener(ship, change)) == 1  # a redelivery sends again: keys dedupe it
    assert len(change.sent) == 2


def test_run_listener_runs_async_listeners() -> None:
    async def notify(change: casern.Change) -> None:
        await asyncio.sleep(0)
        change.send("update", change.id, {"notified": change.seq})

    assert run_listener(notify, make_change("m-1", seq=5)) == [("update", "m-1", {"notified": 5})]


def test_run_listener_awaits_what_a_plain_listener_returns() -> None:
    async def later(change: casern.Change) -> None:
        change.send("visit", change.id)

    def deferring(change: casern.Change) -> Any:
        return later(change)

    assert run_listener(deferring, make_change("m-1")) == [("visit", "m-1", None)]


def test_what_a_listener_raises_reaches_the_test() -> None:
    def down(change: casern.Change) -> None:
        raise ConnectionError("smtp is down")

    with pytest.raises(ConnectionError, match="smtp is down"):
        run_listener(down, make_change())


def test_a_listener_that_hangs_fails_the_test_after_the_timeout() -> None:
    release = threading.Event()

    def stuck(change: casern.Change) -> None:
        release.wait(10)

    async def astuck(change: casern.Change) -> None:
        await asyncio.sleep(10)

    try:
        with pytest.raises(AssertionError, match=r"'stuck' did not finish within 0\.05s"):
            run_listener(stuck, make_change(), timeout=0.05)
    finally:
        release.set()
    with pytest.raises(AssertionError, match=r"'astuck' did not finish within 0\.05s"):
        run_listener(astuck, make_change(), timeout=0.05)


def test_send_checks_what_the_real_send_checks() -> None:
    change = make_change()
    with pytest.raises(casern.InvalidId):
        change.send("visit", "")
    with pytest.raises(casern.InvalidData, match="not JSON"):
        change.send("update", "m-1", {"at": datetime.now(UTC)})
    assert change.sent == []


def test_make_change_copies_and_checks_like_the_dispatcher() -> None:
    state = {"items": ["a"]}
    change = make_change(state=state, preferences={"fee": 2})
    change.state["items"].append("b")
    assert state == {"items": ["a"]}
    with pytest.raises(TypeError):
        change.preferences["fee"] = 3  # type: ignore[index]
    with pytest.raises(casern.InvalidId):
        make_change("_design/x")
    with pytest.raises(ValueError, match="timezone-aware"):
        make_change(applied_at=datetime(2024, 1, 1))


def test_run_listener_needs_a_recording_change() -> None:
    real = make_change()
    plain = casern.Change(
        **{f.name: getattr(real, f.name) for f in dataclasses.fields(casern.Change)}
    )
    with pytest.raises(TypeError, match="make_change"):
        run_listener(ship, plain)


def test_async_tests_await_arun_listener() -> None:
    async def notify(change: casern.Change) -> None:
        change.send("update", change.id, {"notified": True})

    async def a_test() -> None:
        change = make_change("m-1")
        with pytest.raises(RuntimeError, match="await arun_listener"):
            run_listener(notify, change)
        assert await arun_listener(notify, change) == [("update", "m-1", {"notified": True})]
        assert await arun_listener(ship, make_change(state={"status": "new"})) == []

    asyncio.run(a_test())


def test_recording_change_is_a_change() -> None:
    assert issubclass(RecordingChange, casern.Change)
