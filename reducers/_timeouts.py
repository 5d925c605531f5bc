"""Time without a clock: record when things happen, wake up later, escalate what waited.

Reducers never read the clock. Timestamps arrive in `data` as epoch seconds: the
application sends `{"now": time.time(), ...}`, and casern's timers send `{"now": epoch}`
when they fire. The pattern, taken from the support-inquiry example of the original
casern: a conversation records when the last inquiry came in; a timer wakes it ten
minutes later; if nobody answered meanwhile, it becomes escalated::

    from casern.reducers import escalate, timeout_after, touch

    def answer(preferences, state, data):
        # Answered: nothing is waiting any more, so no timer and no escalation.
        return {**state, "last_inquiry": None, "escalated": False}

    app = casern.Casern(
        "sqlite:///support.db", {"inquiry_timeout": 600}, services,
        {
            "inquiry": touch("last_inquiry"),             # data {"now": time.time()}
            "answer": answer,
            "check_timeout": escalate("inquiry_timeout", field="last_inquiry"),
        },
        listeners,
        timers={"check_timeout": timeout_after("inquiry_timeout", field="last_inquiry")},
    )
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from casern._types import Reducer, State, Timer

from ._basic import is_number

__all__ = ["escalate", "timeout_after", "touch"]


def _check_seconds(seconds: float | str, who: str) -> None:
    if isinstance(seconds, str):
        return
    if not is_number(seconds) or seconds < 0:
        raise ValueError(
            f"{who} needs seconds >= 0 or the name of a preference holding them, "
            f"got {seconds!r:.60}"
        )


def _seconds(seconds: float | str, preferences: Mapping[str, Any], who: str) -> float:
    """`seconds` itself, or the number held by the preference it names."""
    if not isinstance(seconds, str):
        return float(seconds)
    value = preferences.get(seconds)
    if not is_number(value) or value < 0:
        raise ValueError(
            f"{who} reads its delay from preferences[{seconds!r}], which must be a number "
            f"of seconds >= 0; it is {value!r:.60}"
        )
    return float(value)


def _now(data: Any, source: str, who: str) -> float:
    value = data.get(source) if isinstance(data, dict) else None
    if not is_number(value):
        raise ValueError(
            f"{who} needs data {{{source!r}: <epoch seconds>}} (reducers never read the "
            f"clock; casern's timers send {{'now': ...}}), got {data!r:.60}"
        )
    return float(value)


def touch(field: str = "last_seen", *, source: str = "now") -> Reducer:
    """Make a reducer that records the timestamp `data[source]` in `state[field]`.

    Raises `ValueError` when the data carries no number under `source`.
    """

    def touched(preferences: Mapping[str, Any], state: State, data: Any) -> State:
        state[field] = _now(data, source, f"touch({field!r})")
        return state

    touched.__name__ = touched.__qualname__ = f"touch_{field}"
    return touched


def timeout_after(
    seconds: float | str, field: str = "last_seen", *, unless: str | None = "escalated"
) -> Timer:
    """Make a timers function: wake the machine `seconds` after the time in `state[field]`.

    `seconds` is a number or the name of a preference that holds it. No timer (None)
    while `state[field]` is missing or None, or once `state[unless]` is truthy (by
    default: once `escalate` has flagged the machine), so a handled machine sleeps.
    """
    who = f"timeout_after({seconds!r}, {field!r})"
    _check_seconds(seconds, who)

    def due(preferences: Mapping[str, Any], state: State) -> float | None:
        since = state.get(field)
        if since is None or (unless is not None and state.get(unless)):
            return None
        if not is_number(since):
            raise ValueError(
                f"{who}: state[{field!r}] must be epoch seconds (a number), got {since!r:.60}"
            )
        return float(since) + _seconds(seconds, preferences, who)

    return due


def escalate(seconds: float | str, field: str = "last_seen", *, flag: str = "escalated") -> Reducer:
    """Make a reducer that sets `state[flag] = True` once `seconds` have passed since
    `state[field]`, judged by `data["now"]`; pair it with `timeout_after` as its timer.

    It changes nothing (so nothing is committed) when `state[field]` is missing or None
    (the wait was answered), when the machine is already flagged, or when the time has
    not come yet (a timer made stale by a newer `field`).
    """
    who = f"escalate({seconds!r}, {field!r})"
    _check_seconds(seconds, who)

    def escalated(preferences: Mapping[str, Any], state: State, data: Any) -> State:
        now = _now(data, "now", who)
        since = state.get(field)
        if since is None or state.get(flag):
            return state
        if not is_number(since):
            raise ValueError(
                f"{who}: state[{field!r}] must be epoch seconds (a number), got {since!r:.60}"
            )
        if now >= float(since) + _seconds(seconds, preferences, who):
            state[flag] = True
        return state

    escalated.__name__ = escalated.__qualname__ = f"escalate_{field}"
    return escalated
