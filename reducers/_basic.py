"""General-purpose reducers: merge data into the state, count, chain reducers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

from casern._types import Reducer, State

__all__ = ["chain", "counter", "merge"]


def merge(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """Shallow-merge the JSON object `data` into the state: its keys replace the state's.

    A key sent with `None` is kept as `null`, not removed. Raises `ValueError` (which
    casern reports as `ReducerError`) when `data` is not a dict.
    """
    if not isinstance(data, dict):
        raise ValueError(
            f"merge needs data that is a JSON object (a dict) such as {{'note': 'x'}}, "
            f"got {type(data).__name__}: {data!r:.60}"
        )
    return {**state, **data}


def is_number(value: Any) -> TypeGuard[int | float]:
    """True for an int or float, but not a bool (`True + 1` is never what anyone means)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def counter(field: str = "count", by: float = 1) -> Reducer:
    """Make a reducer that adds a step to the number in `state[field]` (missing: 0).

    The step is `by`, unless the data says otherwise: `None` keeps `by`, a number
    replaces it, and so does `{"by": number}` (negative steps count down).
    """
    if not is_number(by):
        raise TypeError(f"counter(by=...) must be a number, not {type(by).__name__}")

    def count(preferences: Mapping[str, Any], state: State, data: Any) -> State:
        step: Any = by
        if is_number(data):
            step = data
        elif isinstance(data, dict):
            step = data.get("by", by)
        elif data is not None:
            raise ValueError(
                f"counter {field!r} takes no data, a number or {{'by': number}}, "
                f"got {type(data).__name__}: {data!r:.60}"
            )
        if not is_number(step):
            raise ValueError(f"counter {field!r} step must be a number, got {step!r:.60}")
        current = state.get(field)
        if current is None:
            current = 0
        elif not is_number(current):
            raise ValueError(
                f"counter cannot add to state[{field!r}] = {current!r:.60}: it is not a number"
            )
        state[field] = current + step
        return state

    count.__name__ = count.__qualname__ = f"counter_{field}"
    return count


def chain(*reducers: Reducer) -> Reducer:
    """Make one reducer that runs `reducers` in order, each on the state the last returned.

    Every one of them gets the same `preferences` and `data`; for example
    `chain(transitions(table), touch("updated_at"))` moves a status and stamps it.
    """
    if not reducers:
        raise ValueError("chain() needs at least one reducer")
    for reducer in reducers:
        if not callable(reducer):
            raise TypeError(f"chain() takes reducers (callables), got {reducer!r:.60}")

    def chained(preferences: Mapping[str, Any], state: State, data: Any) -> State:
        for reducer in reducers:
            state = reducer(preferences, state, data)
        return state

    return chained
