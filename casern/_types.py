"""The shapes of the plain callables users write: reducers, listeners, timers, upgrades."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

from ._change import Change

__all__ = ["Listener", "Reducer", "State", "Timer", "Upgrade"]

State: TypeAlias = dict[str, Any]
#: `reducer(preferences, state, data) -> next_state`; pure: no effects, no I/O.
Reducer: TypeAlias = Callable[[Mapping[str, Any], State, Any], State]
#: `listener(change)`, plain or `async def`; effects go here, through `change.services`.
Listener: TypeAlias = Callable[[Change], "Awaitable[None] | None"]
#: `timer(preferences, state) -> epoch seconds | None`: when to send that reducer next.
Timer: TypeAlias = Callable[[Mapping[str, Any], State], "float | None"]
#: `upgrade(preferences, old_version, state) -> state` in the current `state_version`.
Upgrade: TypeAlias = Callable[[Mapping[str, Any], int, State], State]
