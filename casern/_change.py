"""What a listener receives: one committed change of one machine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Change"]


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change, handed to every listener after the commit.

    `(id, seq)` identifies it uniquely: a service that may see a change twice
    (delivery is at least once) drops duplicates on that pair.
    """

    id: str
    reducer: str
    data: Any
    key: str | None
    seq: int
    prev: dict[str, Any]
    state: dict[str, Any]
    applied_at: datetime
    preferences: Mapping[str, Any]
    services: Mapping[str, Any]
    #: `send(reducer, id, data=None)`: queue a further action; returns None.
    send: Callable[..., None] = field(repr=False)
    #: The name of the listener this change is being delivered to.
    listener: str = ""
