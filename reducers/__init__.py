"""Reusable reducers: pure building blocks for `casern.Casern(..., reducers={...})`.

A reducer is `fn(preferences, state, data) -> new_state`. It must be pure: no I/O,
no clock reads, no randomness, because casern may run it again (`app.replay`) and
expects the same answer. It gets deep copies, so it may mutate `state` in place, but it
must return the new state as a JSON object. Anything it raises is reported to the
sender as `casern.ReducerError` (the original is `__cause__`) and nothing is written.

Each name here is either a reducer or a factory that returns one; register them under
any name you like::

    import casern
    from casern.reducers import counter, merge, transitions

    app = casern.Casern(
        "sqlite:///orders.db", {}, {},
        {
            "update": merge,                              # app.send("update", id, {"note": "x"})
            "visit": counter("visits"),                   # app.send("visit", id)
            "order": transitions({                        # app.send("order", id, {"event": "pay"})
                "new": {"pay": "paid", "cancel": "cancelled"},
                "paid": {"ship": "shipped", "refund": "cancelled"},
            }),
        },
        {},
    )

Timestamps arrive in the data (`{"now": epoch seconds}`, as casern's timers send it):
see `touch`, `timeout_after` (a *timers* function, for `timers=`) and `escalate`.
"""

from __future__ import annotations

from ._basic import chain, counter, merge
from ._timeouts import escalate, timeout_after, touch
from ._transitions import InvalidTransition, transitions

__all__ = [
    "InvalidTransition",
    "chain",
    "counter",
    "escalate",
    "merge",
    "timeout_after",
    "touch",
    "transitions",
]
