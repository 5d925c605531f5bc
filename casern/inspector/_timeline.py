"""A machine's history as a timeline: each change with what it did to the state.

History records each change's reducer and data, not the states in between, so
the states are recomputed by folding the history through the app's (pure)
reducers from `{}`, as `Casern.replay` does. Where that cannot be trusted (a
reducer is gone or raises, history starts late, the fold does not reach the
stored state) the timeline says so instead of showing a wrong diff.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .._app import Casern
from ._diff import diff

__all__ = ["Timeline", "timeline"]


@dataclass
class Timeline:
    """History entries (oldest first), each with a `diff` (None where unknown), and a note."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def timeline(app: Casern, id: str, current: dict[str, Any] | None) -> Timeline:
    """The history of `id` with a diff per change; `current` is its stored state."""
    out = Timeline()
    state: dict[str, Any] = {}
    broken: str | None = None
    expected = 1
    for entry in app.history(id):
        item = dict(entry)
        item["diff"] = None
        if broken is None and entry["seq"] != expected:
            broken = (
                f"history has no record of changes {expected} to {entry['seq'] - 1}"
                " (was history off?): what those changed is unknown"
            )
        expected = entry["seq"] + 1
        reducer = app.reducers.get(entry["reducer"])
        if broken is None and reducer is None:
            broken = f"this app has no reducer {entry['reducer']!r} any more"
        if broken is None and reducer is not None:
            try:
                new = _copy(reducer(app.preferences, _copy(state), _copy(entry["data"])))
            except Exception as e:
                broken = f"replaying seq {entry['seq']} raised {type(e).__name__}: {e}"
            else:
                item["diff"] = diff(state, new)
                state = new
        out.entries.append(item)
    if broken is not None:
        out.note = f"Diffs stop at the first change that cannot be replayed: {broken}."
    elif (
        out.entries
        and current is not None
        and json.dumps(state, sort_keys=True) != json.dumps(current, sort_keys=True)
    ):
        out.note = (
            "Replaying this history through today's reducers does not give the stored state"
            " (an upgrade, or an impure reducer): the diffs are a best effort."
        )
    return out
