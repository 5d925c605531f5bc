"""The conversation machine that both web examples serve.

One machine per conversation id. `message` records a user's message; the web layer
adds the server's clock as `now`, because reducers never read the clock. A timer
nudges a conversation that has been idle for `preferences["idle"]` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import casern
from casern import State

log = logging.getLogger("examples.conversations")

MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 2000},
        "now": {"type": "number"},
    },
    "required": ["text", "now"],
}


def message(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """Keep the last few messages, count them all, and note when the user last spoke."""
    recent = [*state.get("messages", []), data["text"]]
    state["messages"] = recent[-int(preferences["keep"]) :]
    state["count"] = state.get("count", 0) + 1
    state["last_at"] = data["now"]
    state["status"] = "open"
    return state


def nudge(preferences: Mapping[str, Any], state: State, data: Any) -> State:
    """The idle timer fired: mark a conversation that is still silent."""
    if state.get("status") == "open" and data["now"] >= state["last_at"] + preferences["idle"]:
        state["status"] = "idle"
    return state


def nudge_due(preferences: Mapping[str, Any], state: State) -> float | None:
    if state.get("status") != "open":
        return None
    return float(state["last_at"]) + float(preferences["idle"])


def notify(change: casern.Change) -> None:
    """Stand-in for a push to the user's device."""
    if change.state["status"] == "idle" and change.prev.get("status") != "idle":
        log.info("nudging %s: are you still there?", change.id)


def make_app(store: str, *, idle: float = 300.0, tick: float = 1.0) -> casern.Casern:
    """The conversations app on `store`; `idle` seconds of silence mark a conversation idle."""
    return casern.Casern(
        store,
        {"idle": idle, "keep": 20},
        {},
        {"message": message, "nudge": nudge},
        {"notify": notify},
        schemas={"message": MESSAGE_SCHEMA},
        timers={"nudge": nudge_due},
        tick=tick,
    )
