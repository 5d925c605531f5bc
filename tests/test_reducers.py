"""casern.reducers: pure building blocks, tested as plain functions."""

from __future__ import annotations

import copy
import json
import pickle
import time
from typing import Any

import pytest

import casern
from casern.reducers import (
    InvalidTransition,
    chain,
    counter,
    escalate,
    merge,
    timeout_after,
    touch,
    transitions,
)

PREFS: dict[str, Any] = {}


def assert_json_object(state: Any) -> None:
    assert isinstance(state, dict)
    assert json.loads(json.dumps(state)) == state


# merge ---------------------------------------------------------------------------------


def test_merge_replaces_the_given_keys_and_keeps_the_rest() -> None:
    state = merge(PREFS, {"a": 1, "b": {"x": 1}}, {"b": {"y": 2}, "c": 3})
    assert state == {"a": 1, "b": {"y": 2}, "c": 3}  # shallow: "b" is replaced, not merged
    assert_json_object(state)


def test_merge_keeps_keys_sent_as_none() -> None:
    assert merge(PREFS, {"a": 1}, {"a": None}) == {"a": None}


@pytest.mark.parametrize("data", [None, [1, 2], "text", 3])
def test_merge_rejects_data_that_is_not_a_json_object(data: Any) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        merge(PREFS, {}, data)


# counter -------------------------------------------------------------------------------


def test_counter_starts_from_zero_and_adds_its_step() -> None:
    visits = counter("visits")
    state = visits(PREFS, {}, None)
    state = visits(PREFS, state, None)
    assert state == {"visits": 2}


def test_counter_step_can_come_from_the_factory_or_the_data() -> None:
    points = counter("points", by=10)
    assert points(PREFS, {}, None) == {"points": 10}
    assert points(PREFS, {"points": 10}, 5) == {"points": 15}
    assert points(PREFS, {"points": 10}, {"by": -3}) == {"points": 7}
    assert points(PREFS, {"points": 10}, {"other": "ignored"}) == {"points": 20}


def test_counter_defaults_to_the_count_field() -> None:
    assert counter()(PREFS, {"other": 1}, None) == {"other": 1, "count": 1}


@pytest.mark.parametrize("data", [True, "2", [1], {"by": "2"}])
def test_counter_rejects_a_step_that_is_not_a_number(data: Any) -> None:
    with pytest.raises(ValueError, match="counter 'count'"):
        counter()(PREFS, {}, data)


def test_counter_refuses_to_add_to_a_field_that_is_not_a_number() -> None:
    with pytest.raises(ValueError, match="not a number"):
        counter("n")(PREFS, {"n": "seven"}, None)


NOT_A_NUMBER: Any = "1"


def test_counter_factory_rejects_a_step_that_is_not_a_number() -> None:
    with pytest.raises(TypeError):
        counter(by=NOT_A_NUMBER)


# chain ---------------------------------------------------------------------------------


def test_chain_runs_its_reducers_in_order_on_the_same_data() -> None:
    both = chain(merge, counter("updates"))
    assert both(PREFS, {"updates": 1}, {"note": "x"}) == {"updates": 2, "note": "x"}


NOT_A_REDUCER: Any = "merge"


def test_chain_needs_reducers() -> None:
    with pytest.raises(ValueError):
        chain()
    with pytest.raises(TypeError):
        chain(NOT_A_REDUCER)


# touch, timeout_after, escalate --------------------------------------------------------


def test_touch_records_the_timestamp_given_in_the_data() -> None:
    assert touch()(PREFS, {"a": 1}, {"now": 1000.5}) == {"a": 1, "last_seen": 1000.5}
    stamped = touch("last_inquiry", source="at")
    assert stamped(PREFS, {}, {"at": 7, "text": "hi"}) == {"last_inquiry": 7.0}


@pytest.mark.parametrize("data", [None, {}, {"now": "yesterday"}, {"now": True}, 1000])
def test_touch_rejects_data_without_a_timestamp_since_reducers_never_read_the_clock(
    data: Any,
) -> None:
    with pytest.raises(ValueError, match="never read the clock"):
        touch()(PREFS, {}, data)


def test_timeout_after_is_due_that_many_seconds_after_the_field() -> None:
    due = timeout_after(600, field="last_inquiry")
    assert due(PREFS, {"last_inquiry": 1000}) == 1600.0


def test_timeout_after_sets_no_timer_while_nothing_waits_or_once_escalated() -> None:
    due = timeout_after(600, field="last_inquiry")
    assert due(PREFS, {}) is None
    assert due(PREFS, {"last_inquiry": None}) is None
    assert due(PREFS, {"last_inquiry": 1000, "escalated": True}) is None
    assert timeout_after(600, "t", unless=None)(PREFS, {"t": 1, "escalated": True}) == 601.0


def test_timeout_after_can_read_its_delay_from_preferences() -> None:
    due = timeout_after("inquiry_timeout", field="last_inquiry")
    assert due({"inquiry_timeout": 60}, {"last_inquiry": 1000}) == 1060.0
    with pytest.raises(ValueError, match="inquiry_timeout"):
        due({}, {"last_inquiry": 1000})


def test_timeout_after_rejects_a_negative_delay_and_a_timestamp_that_is_not_a_number() -> None:
    with pytest.raises(ValueError):
        timeout_after(-1)
    with pytest.raises(ValueError, match="epoch seconds"):
        timeout_after(10)(PREFS, {"last_seen": "2024-01-01"})


def test_escalate_flags_the_machine_only_once_the_timeout_has_passed() -> None:
    check = escalate(600, field="last_inquiry")
    waiting = {"last_inquiry": 1000.0}
    assert check(PREFS, copy.deepcopy(waiting), {"now": 1599.9}) == waiting
    assert check(PREFS, copy.deepcopy(waiting), {"now": 1600.0}) == {
        "last_inquiry": 1000.0,
        "escalated": True,
    }


def test_escalate_changes_nothing_when_answered_or_already_escalated() -> None:
    check = escalate(600, field="last_inquiry", flag="urgent")
    assert check(PREFS, {"last_inquiry": None}, {"now": 9999}) == {"last_inquiry": None}
    assert check(PREFS, {}, {"now": 9999}) == {}
    done = {"last_inquiry": 1, "urgent": True}
    assert check(PREFS, copy.deepcopy(done), {"now": 9999}) == done


def test_escalate_needs_now_in_the_data() -> None:
    with pytest.raises(ValueError, match="'now'"):
        escalate(600)(PREFS, {"last_seen": 1}, None)


def test_unanswered_support_inquiry_escalates_after_the_timeout() -> None:
    """The support-inquiry example: inquiry -> timer -> escalated unless answered."""
    prefs = {"inquiry_timeout": 600}
    inquiry = touch("last_inquiry")
    check = escalate("inquiry_timeout", field="last_inquiry")
    due = timeout_after("inquiry_timeout", field="last_inquiry")

    def answer(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
        return {**state, "last_inquiry": None, "escalated": False}

    # Answered in time: the timer is cleared and a late check changes nothing.
    state = inquiry(prefs, {}, {"now": 1000})
    assert due(prefs, state) == 1600
    state = answer(prefs, state, None)
    assert due(prefs, state) is None
    assert check(prefs, copy.deepcopy(state), {"now": 1600}) == state

    # Unanswered: the timer fires at its due time and the machine escalates, then sleeps.
    state = inquiry(prefs, state, {"now": 2000})
    fire_at = due(prefs, state)
    assert fire_at == 2600
    state = check(prefs, state, {"now": fire_at})
    assert state["escalated"] is True
    assert due(prefs, state) is None
    assert_json_object(state)


# transitions ---------------------------------------------------------------------------

ORDER = {
    "new": {"pay": "paid", "cancel": "cancelled"},
    "paid": {"ship": "shipped", "refund": "cancelled"},
    "shipped": {"deliver": "delivered"},
}


def test_transition_table_moves_the_status_by_event() -> None:
    order = transitions(ORDER)
    state = order(PREFS, {}, {"event": "pay", "amount": 12})
    assert state == {"status": "paid"}
    state = order(PREFS, state, "ship")  # the event name alone is enough
    assert state == {"status": "shipped"}
    assert_json_object(state)


def test_transition_table_starts_in_its_first_state_unless_told() -> None:
    assert transitions(ORDER)(PREFS, {}, "cancel") == {"status": "cancelled"}
    lamp = transitions({"off": {"on": "lit"}, "lit": {"off": "off"}}, field="lamp", initial="lit")
    assert lamp(PREFS, {"other": 1}, "off") == {"other": 1, "lamp": "off"}


def test_transition_table_rejects_invalid_event_naming_allowed_ones() -> None:
    with pytest.raises(InvalidTransition) as caught:
        transitions(ORDER)(PREFS, {"status": "paid"}, {"event": "pay"})
    error = caught.value
    assert (error.state, error.event, error.allowed) == ("paid", "pay", ("refund", "ship"))
    assert issubclass(InvalidTransition, ValueError)
    assert (
        str(error) == "event 'pay' is not allowed in state 'paid'; allowed there: 'refund', 'ship'"
    )


def test_transition_table_allows_nothing_out_of_a_final_state() -> None:
    with pytest.raises(InvalidTransition, match="final") as caught:
        transitions(ORDER)(PREFS, {"status": "delivered"}, "pay")
    assert caught.value.allowed == ()


def test_invalid_transition_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(InvalidTransition("paid", "pay", ("ship",))))
    assert (error.state, error.event, error.allowed) == ("paid", "pay", ("ship",))


@pytest.mark.parametrize("data", [None, {}, {"event": 3}, ["pay"]])
def test_transition_table_needs_an_event(data: Any) -> None:
    with pytest.raises(ValueError, match="event"):
        transitions(ORDER)(PREFS, {}, data)


@pytest.mark.parametrize(
    "table",
    [{}, {"new": "paid"}, {"new": {"pay": 1}}, [("new", {"pay": "paid"})]],
)
def test_malformed_transition_table_is_refused_at_start_up(table: Any) -> None:
    with pytest.raises(ValueError):
        transitions(table)


def test_transition_table_refuses_an_initial_state_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="initial"):
        transitions(ORDER, initial="lost")


def test_transition_table_is_copied_so_later_edits_cannot_change_the_machine() -> None:
    table = copy.deepcopy(ORDER)
    order = transitions(table)
    table["new"]["pay"] = "shipped"
    assert order(PREFS, {}, "pay") == {"status": "paid"}


# with the engine -----------------------------------------------------------------------


def test_invalid_transition_reaches_the_sender_as_reducer_error_and_writes_nothing(
    tmp_path: Any,
) -> None:
    reducers = {"order": transitions(ORDER)}
    with casern.Casern(f"sqlite:///{tmp_path}/t.db", {}, {}, reducers, {}) as app:
        assert app.send("order", "o-1", {"event": "pay"}) == {"status": "paid"}
        with pytest.raises(casern.ReducerError) as caught:
            app.send("order", "o-1", {"event": "pay"})
        assert isinstance(caught.value.__cause__, InvalidTransition)
        assert "'refund', 'ship'" in str(caught.value)
        assert app.get("o-1") == {"status": "paid"}
        assert [h["seq"] for h in app.history("o-1")] == [1]


def test_unanswered_inquiry_is_escalated_by_its_timer_in_a_running_app(tmp_path: Any) -> None:
    prefs = {"inquiry_timeout": 0.2}
    reducers = {
        "inquiry": touch("last_inquiry"),
        "check_timeout": escalate("inquiry_timeout", field="last_inquiry"),
    }
    timers = {"check_timeout": timeout_after("inquiry_timeout", field="last_inquiry")}
    store = f"sqlite:///{tmp_path}/support.db"
    with casern.Casern(store, prefs, {}, reducers, {}, timers=timers, tick=0.05) as app:
        app.start()
        sent_at = time.time()
        app.send("inquiry", "conv-1", {"now": sent_at})
        deadline = time.monotonic() + 10
        while not (app.get("conv-1") or {}).get("escalated") and time.monotonic() < deadline:
            time.sleep(0.05)
        app.stop()
        assert app.get("conv-1") == {"last_inquiry": sent_at, "escalated": True}
        [_inquiry, check] = app.history("conv-1")
        assert check["reducer"] == "check_timeout"
        assert check["data"]["now"] >= sent_at + 0.2  # never before its due time
