"""casern: a persistent, redux-style manager for very many small state machines.

    data → reducer → store → listener

`send(reducer, id, data)` runs a pure reducer on the machine's JSON state,
commits the result with revision-based optimistic locking (SQLite or CouchDB),
then runs state-change listeners, at least once, even across crashes.
"""

from ._app import Casern
from ._backoff import Backoff
from ._change import Change
from ._errors import (
    CasernError,
    ConflictError,
    InvalidData,
    InvalidId,
    InvalidQuery,
    InvalidState,
    ReducerError,
    StoreUnavailable,
    UnknownReducer,
    UpgradeError,
)
from ._types import Listener, Reducer, State, Timer, Upgrade

__all__ = [
    "Backoff",
    "Casern",
    "CasernError",
    "Change",
    "ConflictError",
    "InvalidData",
    "InvalidId",
    "InvalidQuery",
    "InvalidState",
    "Listener",
    "Reducer",
    "ReducerError",
    "State",
    "StoreUnavailable",
    "Timer",
    "UnknownReducer",
    "Upgrade",
    "UpgradeError",
]

__version__ = "0.1.0"
