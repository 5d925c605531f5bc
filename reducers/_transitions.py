"""A state machine declared as a table: `{state: {event: next_state}}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from casern._types import Reducer, State

__all__ = ["InvalidTransition", "transitions"]


class InvalidTransition(ValueError):
    """An event that the transition table does not allow in the machine's current state.

    It carries what explains it: `state` (the current one), `event`, and `allowed`
    (the events that state accepts, sorted; empty for a final state). Raised inside a
    reducer, casern reports it as `ReducerError` with this error as `__cause__`.
    """

    def __init__(self, state: str, event: str, allowed: tuple[str, ...]) -> None:
        self.state = state
        self.event = event
        self.allowed = allowed
        if allowed:
            hint = "allowed there: " + ", ".join(repr(e) for e in allowed)
        else:
            hint = "no event is allowed there (a final or unknown state)"
        super().__init__(f"event {event!r} is not allowed in state {state!r}; {hint}")

    def __reduce__(self) -> tuple[Any, ...]:  # keep it picklable across processes
        return (type(self), (self.state, self.event, self.allowed))


def transitions(
    table: Mapping[str, Mapping[str, str]],
    *,
    field: str = "status",
    initial: str | None = None,
) -> Reducer:
    """Make a reducer that moves `state[field]` along `table` by the event in the data.

    The data is `{"event": name, ...}` or just the event name as a string. A machine
    without `state[field]` is in `initial` (default: the table's first state). A state
    that is only a target, never a key, is final. An event the current state does not
    list raises `InvalidTransition` naming the state, the event and the allowed events.
    The table is checked once, here: a malformed one raises `ValueError` at start-up.
    """
    if not isinstance(table, Mapping) or not table:
        raise ValueError("transitions() needs a non-empty table {state: {event: next_state}}")
    states: set[str] = set()
    for source, moves in table.items():
        if not isinstance(source, str) or not isinstance(moves, Mapping):
            raise ValueError(
                f"transitions(): table[{source!r}] must map event names to next states, "
                f"got {moves!r:.60}"
            )
        for event, target in moves.items():
            if not isinstance(event, str) or not isinstance(target, str):
                raise ValueError(
                    f"transitions(): table[{source!r}][{event!r}] must be a state name "
                    f"(str), got {target!r:.60}"
                )
            states.add(target)
        states.add(source)
    start = next(iter(table)) if initial is None else initial
    if start not in states:
        raise ValueError(f"transitions(initial={initial!r}): not a state of the table")
    # A private copy: later changes to the caller's table cannot alter the machine.
    frozen = {source: dict(moves) for source, moves in table.items()}

    def transition(preferences: Mapping[str, Any], state: State, data: Any) -> State:
        event = data.get("event") if isinstance(data, dict) else data
        if not isinstance(event, str):
            raise ValueError(
                f"transitions on {field!r} need data {{'event': name}} or the event name, "
                f"got {data!r:.60}"
            )
        current = state.get(field, start)
        moves = frozen.get(current, {}) if isinstance(current, str) else {}
        if event not in moves:
            raise InvalidTransition(str(current), event, tuple(sorted(moves)))
        state[field] = moves[event]
        return state

    return transition
