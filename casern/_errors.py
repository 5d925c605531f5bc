"""Every error casern raises, rooted in one class.

    CasernError
    ├── UnknownReducer      (also a KeyError)    no reducer of that name
    ├── InvalidData         (also a ValueError)  data fails the reducer's JSON Schema,
    │                                            or casern's JSON rules (see _json.py)
    ├── InvalidState        (also a TypeError)   a reducer returned no JSON object, one
    │                                            breaking the JSON rules, or too big
    │                                            for the store
    ├── ReducerError                              a reducer raised; the original is __cause__
    ├── InvalidId           (also a ValueError)  an id that cannot be stored safely
    ├── StoreUnavailable    (also a ConnectionError) the database cannot be reached
    ├── ConflictError                             optimistic-lock retries exhausted
    ├── UpgradeError                              a stored state cannot be upgraded
    └── InvalidQuery        (also a ValueError)  a `find` selector it cannot run

On every one of them nothing is written, the stored state is unchanged and no
listener runs.
"""

from __future__ import annotations

__all__ = [
    "CasernError",
    "ConflictError",
    "InvalidData",
    "InvalidId",
    "InvalidQuery",
    "InvalidState",
    "ReducerError",
    "StoreUnavailable",
    "UnknownReducer",
    "UpgradeError",
]


class CasernError(Exception):
    """Root of every casern error: catch this to catch them all."""


class UnknownReducer(CasernError, KeyError):
    """No reducer of that name was given to `Casern(...)`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidData(CasernError, ValueError):
    """`data` fails the reducer's JSON Schema, or is not JSON casern stores on every store."""


class InvalidState(CasernError, TypeError):
    """A reducer returned something that is not a JSON object casern can store.

    Also raised when the state, or the envelope holding it, is over the
    store's document limit: nothing of that id is written.
    """


class ReducerError(CasernError):
    """A reducer (or a timers function) raised; the original exception is `__cause__`."""


class InvalidId(CasernError, ValueError):
    """An id that cannot be stored: not a str, empty, too long, or unsafe."""


class StoreUnavailable(CasernError, ConnectionError):
    """The database cannot be reached, after bounded retries."""


class ConflictError(CasernError):
    """Optimistic-lock retries were exhausted: pathological contention on one id."""


class UpgradeError(CasernError):
    """A stored state cannot be upgraded to this code's `state_version`."""


class InvalidQuery(CasernError, ValueError):
    """A `find` selector (or an `indexes` field) casern cannot run; the message names the part."""
