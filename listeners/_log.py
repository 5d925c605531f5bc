"""Log every change through the standard `logging` module, with structured fields."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from casern._change import Change

__all__ = ["log"]

_MISSING = object()


def log(
    logger: str | logging.Logger = "casern.changes",
    level: int = logging.INFO,
    *,
    states: bool = False,
) -> Callable[[Change], None]:
    """Make a listener that logs one line per change: `<id> seq=<n> <reducer> changed <keys>`.

    Each record carries `extra` fields for structured handlers: `id`, `seq`, `reducer`,
    `key`, `applied_at` (ISO 8601) and `changed` (the sorted top-level keys that
    differ); with `states=True` also `data`, `prev` and `state`, which may hold personal
    data and are therefore left out by default.
    """
    target = logging.getLogger(logger) if isinstance(logger, str) else logger

    def log_change(change: Change) -> None:
        if not target.isEnabledFor(level):
            return
        prev, state = change.prev, change.state
        keys = prev.keys() | state.keys()
        changed = sorted(k for k in keys if prev.get(k, _MISSING) != state.get(k, _MISSING))
        extra: dict[str, Any] = {
            "id": change.id,
            "seq": change.seq,
            "reducer": change.reducer,
            "key": change.key,
            "applied_at": change.applied_at.isoformat(),
            "changed": changed,
        }
        if states:
            extra.update(data=change.data, prev=prev, state=state)
        target.log(
            level,
            "%s seq=%d %s changed %s",
            change.id,
            change.seq,
            change.reducer,
            ", ".join(changed) or "nothing",
            extra=extra,
        )

    return log_change
