"""The committer's vocabulary: the kinds of action, an action, and a change handed over.

Shared by the public face (which queues actions), the fold (which applies
them to an envelope), the committer (which writes) and the dispatcher (which
delivers changes): none of them imports another to speak of these.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import InvalidData
from ._json import Refusal, to_json
from .stores.base import Doc

if TYPE_CHECKING:
    from ._telemetry import Send

SEND, FIRE, ACK, RETRY, MIGRATE, FLUSH = "send", "fire", "ack", "retry", "migrate", "flush"
CLAIM = "claim"
CHECK = "check"  # re-read an id that may have forked: merge, or hand over held changes
UNPARSED: Any = object()  # an action's `data` not parsed yet (the fold parses `data_json`)


@dataclass(slots=True, eq=False)
class Action:
    """One unit of work for the committer; `future` resolves when it is durable."""

    kind: str
    id: str
    future: Future[Any]
    reducer: str = ""
    data_json: str = "null"
    key: str | None = None
    seqs: frozenset[int] = frozenset()  # ACK: pending entries delivered; CLAIM: to redeliver
    failed: list[Doc] = field(default_factory=list)  # ACK: deliveries that gave up
    attempts: int = 0
    now: float | None = None  # FIRE: fire what is due by then (never later than the clock)
    trace: Send | None = None  # spans and metrics, reported when answered
    uid: str = ""  # SEND on a store that may fork: journaled, applied once (see _merge.py)
    #: SEND: `data_json` parsed once, shared read-only by the history record, the
    #: outbox entry and the journal (reducers get a copy of their own).
    data: Any = UNPARSED


@dataclass(slots=True)
class Delivery:
    """A committed change handed to the dispatcher: its pending entry and both states."""

    id: str
    entry: Doc  # seq, reducer, data, key, applied_at, at, version, prev, state[, listeners]
    #: The entry's (data, prev, state) as JSON text, when the fold has them: each
    #: listener's own copies are parsed from them instead of encoded first.
    texts: tuple[str, str, str] | None = None


def encode_data(reducer: str, data: Any) -> tuple[str, Any]:
    """`data` as (JSON text, parsed copy) for `reducer`, or the `InvalidData` saying why not."""
    try:
        return to_json(data)
    except Refusal as e:
        raise InvalidData(f"data for {reducer!r} {e}") from None
