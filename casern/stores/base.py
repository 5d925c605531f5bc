"""The seam between the engine and a database: one small interface, many stores.

The engine keeps everything that must change together in one *envelope* per
machine id (CouchDB is only atomic per document), and a store persists
envelopes with revision-checked writes. The envelope is a JSON object::

    {"state":   {...},          # what the reducer returned: all users ever see
     "seq":     42,             # committed changes so far, no gaps
     "version": 1,              # state_version of the code that wrote it
     "keys":    [...],          # recent idempotency keys, bounded
     "due":     {"reducer": t}, # next timer per reducer (epoch seconds)
     "fired":   {"reducer": t}, # due times already consumed (fire once)
     "pending": [{...}, ...],   # the outbox: changes whose listeners have not all run
                                #   (prev/state kept once: see casern/_outbox.py)
     "failed":  [{...}, ...],   # deliveries that exhausted their retries
     "log":     [{...}, ...],   # newest history entries (stores without atomic history)
     "next_due": t | null,      # min(due), indexed
     "pending_since": t | null, # applied time of the oldest pending entry, indexed
     "nfailed": n,              # len(failed), indexed
     "ops":     [{...}, ...]}   # newest applied actions, each with a unique `u` (stores that fork)

A store never interprets `state`; it indexes `next_due`, `pending_since` and
`nfailed` so that timers and recovery cost O(due), not O(machines).

A store that replicates (a CouchDB cluster, `may_fork`) can end up with
*sibling* revisions of one envelope: concurrent writers each won on some
replica. It says so (`Record.conflicts`, `leaves`, `confirm`) and deletes
siblings on request (`Write.drop`); merging them is the engine's job
(`casern/_merge.py`), since only the engine can replay actions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import CasernError, InvalidState
from .._query import Query, matches

__all__ = ["Record", "Store", "StoreURLError", "Write"]

STORE_URLS = (
    "sqlite:///file.db, sqlite:// (in memory) or http(s)://user:pass@host:5984/dbname (CouchDB)"
)


class StoreURLError(ValueError):
    """A store URL no store can open (an unknown scheme, no database name ...): a
    configuration mistake, told apart from a ValueError of the app's own code."""


Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Record:
    """One stored envelope at one revision (`rev` is opaque to the engine).

    `conflicts` lists the sibling leaf revisions beside this (winning) one:
    always empty on a store that cannot fork.
    """

    id: str
    rev: str
    doc: Doc
    conflicts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Write:
    """Store `doc` under `id` if its revision is still `rev` (None: only if absent).

    `history` holds the history entries (dicts with an int `seq`) of the changes
    this write commits; a store with `atomic_history` writes them in the same
    transaction, other stores ignore them (the engine relays them later).
    `drop` names sibling revisions (see `Record.conflicts`) to delete in the same
    request once `doc` holds what they held; one that changed meanwhile stays.
    `state_json`, if not empty, is `doc["state"]` as canonical JSON text, which a
    store may use instead of encoding the state again. `base`, if given, is the
    document of revision `rev`: a store may leave alone what did not change
    (SQLite: the indexed columns).
    """

    id: str
    rev: str | None
    doc: Doc
    history: Sequence[Doc] = field(default=())
    drop: tuple[str, ...] = ()
    state_json: str = ""
    base: Doc | None = None


class Store(ABC):
    """A database of envelopes with revision-checked writes.

    Every method may raise `StoreUnavailable` after the store's own bounded
    retries; then nothing of that call was written. Implementations must be
    safe to call from several threads at once.
    """

    #: The URL the store was opened with, credentials removed: safe to print.
    url: str
    #: True if `put_many` writes `Write.history` atomically with the envelope.
    atomic_history: bool = False
    #: True if an envelope can get sibling revisions (replicas that accept
    #: writes independently); the engine then journals, confirms and merges.
    may_fork: bool = False
    #: The largest envelope the store holds, in bytes of JSON (None: no limit).
    #: A state bigger than this is refused with `InvalidState` before any write.
    max_document_size: int | None = None

    @abstractmethod
    def get_many(self, ids: Sequence[str]) -> dict[str, Record]:
        """Return the current record of each stored id; unknown ids are absent."""

    def get(self, id: str) -> Record | None:
        """Return the current record of `id`, or None if it was never stored."""
        return self.get_many([id]).get(id)

    @abstractmethod
    def put_many(self, writes: Sequence[Write]) -> list[str | CasernError | None]:
        """Write each envelope if its revision still matches.

        Returns, in order, the new revision of each write, None where the
        revision did not match (a conflict: that write changed nothing), or
        the `CasernError` saying why the store refused that one document (too
        large, not encodable): nothing of it was written. Writes are
        independent: one conflict or refusal does not undo the others.
        """

    @abstractmethod
    def put_history(self, id: str, entries: Sequence[Doc]) -> None:
        """Record history entries of `id`; idempotent per `(id, entry["seq"])`."""

    @abstractmethod
    def history(self, id: str, *, after: int = 0, limit: int | None = None) -> list[Doc]:
        """Return recorded history entries of `id` with seq > `after`, oldest first."""

    @abstractmethod
    def due(self, now: float, limit: int) -> list[str]:
        """Ids whose `next_due` <= `now`, soonest first, at most `limit`."""

    @abstractmethod
    def pending(self, before: float, limit: int) -> list[str]:
        """Ids whose `pending_since` <= `before`, oldest first, at most `limit`."""

    @abstractmethod
    def failed(self, limit: int) -> list[str]:
        """Ids whose envelope holds failed deliveries (`nfailed` > 0)."""

    @abstractmethod
    def ids(self, *, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        """Stored ids in ascending order, starting with `prefix`, greater than `after`."""

    # -- finding machines by their state (casern/_query.py parses selectors) ----------

    def ensure_indexes(self, fields: Sequence[tuple[str, ...]]) -> None:
        """Index these state fields (paths of object keys) for `find`, if not yet indexed.

        Must be cheap when the indexes exist: every app calls it when it opens.
        """
        return None

    def find(self, query: Query, *, limit: int, after: str | None = None) -> list[str]:
        """Ids whose stored state matches `query`, ascending by code point, > `after`.

        States are matched as stored (an older `version` in its old shape).
        This default scans every envelope; stores translate `query` instead.
        """
        out: list[str] = []
        cursor = after
        while len(out) < limit:
            page = self.ids(after=cursor, limit=500)
            if not page:
                break
            records = self.get_many(page)
            out.extend(
                id
                for id in page
                if id in records and matches(query, records[id].doc.get("state", {}))
            )
            cursor = page[-1]
        return sorted(out)[:limit]

    def leaves(self, ids: Sequence[str]) -> dict[str, list[Record]]:
        """Every leaf revision of each stored id (the winner first), deleted ones left out."""
        return {id: [rec] for id, rec in self.get_many(ids).items()}

    def forked(self, limit: int) -> list[str]:
        """Ids that have sibling revisions now, at most `limit` (cost: O(forks))."""
        return []

    def confirm(self, landed: Mapping[str, str]) -> set[str]:
        """The ids (of `landed`: id -> revision just written) that can no longer fork.

        An id is confirmed when its revision is the only leaf and no replica can
        still accept a sibling of it. A change is handed to listeners only then,
        so that `(id, seq)` never names two changes. A store that cannot fork
        confirms everything at no cost.
        """
        return set(landed)

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def index_fields(doc: Doc) -> tuple[float | None, float | None, int]:
    """The indexed fields of an envelope: (next_due, pending_since, nfailed)."""
    return doc.get("next_due"), doc.get("pending_since"), int(doc.get("nfailed") or 0)


def refuse_envelope(id: str, problem: str) -> InvalidState:
    """Why a store cannot hold one envelope; the other writes of the batch go on."""
    return InvalidState(
        f"the envelope of {id!r:.80} {problem}: it holds the state and, for each change whose"
        " listeners have not run yet or gave up (app.failed(): fix the listener, then retry),"
        " that change's data, prev and state; keep states and data smaller (big data"
        " elsewhere, a reference in the state)"
    )


def too_large(id: str, size: int, limit: int, where: str) -> InvalidState:
    return refuse_envelope(
        id, f"is about {size:,} bytes of JSON, over the document limit of {where} ({limit:,})"
    )


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Split `items` into slices of at most `size` (bounded SQL/HTTP requests)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
