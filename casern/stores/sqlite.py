"""The embedded default store: stdlib sqlite3, one row per machine id.

WAL with `synchronous=NORMAL`: a commit survives a crash of the process (kill -9).
Add `?synchronous=full` to the URL for power-loss durability at a measured cost.
One connection guarded by a lock is shared by all threads: correct under
threads, and SQLite serialises writers anyway. Several processes may share one
file: writes take the lock with `BEGIN IMMEDIATE` and wait on a busy timeout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from .._errors import CasernError, InvalidState, StoreUnavailable
from .._query import RANGES, All, AnyOf, Cond, Query, Scalar
from .base import Doc, Record, Store, StoreURLError, Write, chunks, index_fields, too_large

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY,
    rev INTEGER NOT NULL,
    doc TEXT NOT NULL,
    next_due REAL,
    pending_since REAL,
    nfailed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS machines_due ON machines (next_due) WHERE next_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS machines_pending ON machines (pending_since)
    WHERE pending_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS machines_failed ON machines (nfailed) WHERE nfailed > 0;
CREATE TABLE IF NOT EXISTS history (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (id, seq)
) WITHOUT ROWID;
"""

SCHEMA_VERSION = 1  # the layout of the tables below
_SYNCHRONOUS = {"off", "normal", "full", "extra"}
_MAX_VARS = 500  # well below SQLITE_MAX_VARIABLE_NUMBER on every build


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_INSERT = (
    "INSERT OR IGNORE INTO machines (id, rev, doc, next_due, pending_since, nfailed)"
    " VALUES (?, 1, ?, ?, ?, ?)"
)
_INDEXED = ("next_due", "pending_since", "nfailed")  # in the order of `index_fields`
_INSERT_HISTORY = "INSERT OR IGNORE INTO history (id, seq, entry) VALUES (?, ?, ?)"


@functools.cache
def _update(changed: tuple[bool, ...]) -> str:
    """The UPDATE of a row that sets the indexed columns marked `changed` (8 variants)."""
    sets = "".join(f", {name} = ?" for name, c in zip(_INDEXED, changed, strict=True) if c)
    return f"UPDATE machines SET rev = ?, doc = ?{sets} WHERE id = ? AND rev = ?"


class SQLiteStore(Store):
    """Envelopes in one SQLite file (or in memory for `sqlite://`).

    `max_document_size` (bytes of JSON per envelope) lowers SQLite's own limit.
    """

    atomic_history = True

    def __init__(
        self,
        url: str = "sqlite:///casern.db",
        *,
        busy_timeout: float = 30.0,
        max_document_size: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or not url[len("sqlite:") :].startswith("//"):
            raise StoreURLError(
                f"not an sqlite URL: {url!r}; use sqlite:///relative.db or sqlite:////abs.db"
            )
        # sqlite:///rel.db -> path "/rel.db" (relative), sqlite:////abs.db -> "//abs.db".
        path = unquote(parts.path)
        if parts.netloc:
            raise StoreURLError(
                f"an sqlite URL has no host: {url!r}; use sqlite:///relative.db or sqlite:////abs.db"
            )
        if path and not path.startswith("/"):  # sqlite:orders.db, a likely typo
            raise StoreURLError(
                f"not an sqlite URL: {url!r}; use sqlite:///relative.db or sqlite:////abs.db"
            )
        self.path = path[1:] or ":memory:"
        options = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
        synchronous = options.pop("synchronous", "normal")
        if synchronous not in _SYNCHRONOUS or options:
            raise StoreURLError(
                f"unknown sqlite URL options in {url!r}: only ?synchronous=normal|full is supported"
            )
        self.url = url
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()  # guards the writing connection
        # Reads use a connection per thread: in WAL mode they run beside the
        # writer instead of queueing behind it (web threads calling get()).
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._closed = False
        if self.path != ":memory:":
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise StoreUnavailable(
                    f"cannot open {url}: the folder {directory} does not exist; create it first"
                )
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
            # SQLite's own limit on one value (1,000,000,000 bytes unless compiled otherwise).
            limit = self._db.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
            self.max_document_size: int = min(limit, max_document_size or limit)
            # Switching to WAL can answer "database is locked" at once, without waiting
            # for the busy timeout, while another process opens the same new file.
            self._retry(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._retry(self._create_schema)
        except sqlite3.Error as e:
            folder = os.path.dirname(os.path.abspath(self.path))
            if self.path != ":memory:" and not _writable(folder):
                raise StoreUnavailable(
                    f"cannot open {url}: the folder {folder} is not writable (SQLite keeps"
                    " the database and its -wal and -shm files there); pick a writable"
                    " folder or change its permissions"
                ) from e
            raise StoreUnavailable(f"cannot open {url}: {e}") from e

    def _create_schema(self) -> None:
        # user_version numbers this file's layout, so that a later casern can
        # migrate it and an older one refuses it instead of misreading it.
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self.url} was written by a newer casern (file layout {version}, this"
                f" casern reads up to {SCHEMA_VERSION}); upgrade casern to open it"
            )
        self._db.executescript(_SCHEMA)
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing ---------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T], *, locked: bool = True) -> T:
        """Run `fn`, retrying while another process holds the write lock too long."""
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.01
        while True:
            try:
                if not locked:
                    return fn()
                with self._lock:
                    return fn()
            except sqlite3.OperationalError as e:
                message = str(e)
                busy = "locked" in message or "busy" in message
                if not busy or time.monotonic() > deadline:
                    raise StoreUnavailable(f"{self.url}: {message}") from e
            except sqlite3.Error as e:
                raise StoreUnavailable(f"{self.url}: {e}") from e
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.5)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.path == ":memory:":  # one database per connection: share the writer's
            return self._retry(lambda: fn(self._db))
        return self._retry(lambda: fn(self._reader()), locked=False)

    def _reader(self) -> sqlite3.Connection:
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            db = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            reader = self._local.reader = _Reader(db)
            with self._lock:
                self._readers.add(reader)
        return reader.db

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return self._retry(run)

    # -- the Store interface ----------------------------------------------------------

    def get_many(self, ids: Sequence[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        for part in chunks(list(dict.fromkeys(ids)), _MAX_VARS):
            marks = ",".join("?" * len(part))
            sql = f"SELECT id, rev, doc FROM machines WHERE id IN ({marks})"
            rows = self._read(lambda db: db.execute(sql, part).fetchall())  # noqa: B023
            for id, rev, doc in rows:
                found[id] = Record(id, str(rev), json.loads(doc))
        return found

    def put_many(self, writes: Sequence[Write]) -> list[str | CasernError | None]:
        # Encoded before the transaction: one row that cannot be written is
        # refused alone instead of rolling back everybody's writes.
        results: list[str | CasernError | None] = [None] * len(writes)
        rows: list[tuple[int, str, tuple[Any, ...], str, list[tuple[str, int, str]]]] = []
        for i, w in enumerate(writes):
            try:
                doc = self._envelope(w)
                history = [(w.id, h["seq"], self._text(w.id, h)) for h in w.history]
            except CasernError as e:
                results[i] = e
                continue
            fields = index_fields(w.doc)
            if w.rev is None:
                args: tuple[Any, ...] = (w.id, doc, *fields)
                rows.append((i, _INSERT, args, "1", history))
                continue
            # Only the indexed columns whose values change are set: setting one,
            # even to its old value, rewrites its index entry (measured: +10 µs
            # a send while an outbox entry is pending).
            if w.base is None:
                changed: tuple[bool, ...] = (True, True, True)
            else:
                changed = tuple(n != o for n, o in zip(fields, index_fields(w.base), strict=True))
            rev = int(w.rev)
            args = (rev + 1, doc, *(f for f, c in zip(fields, changed, strict=True) if c))
            rows.append((i, _update(changed), (*args, w.id, rev), str(rev + 1), history))
        if not rows:
            return results

        def run(db: sqlite3.Connection) -> None:
            landed: list[tuple[str, int, str]] = []
            for i, sql, args, rev, history in rows:  # a retry after a busy error starts over
                if db.execute(sql, args).rowcount == 1:
                    results[i] = rev
                    landed += history
                else:
                    results[i] = None
            if landed:  # one statement for the history rows of the whole group commit
                db.executemany(_INSERT_HISTORY, landed)

        self._transaction(run)
        return results

    def _envelope(self, w: Write) -> str:
        """The envelope as JSON text, with the state's JSON as the engine gave it, if it did."""
        if not w.state_json:
            return self._text(w.id, w.doc)
        rest = dict(w.doc)
        del rest["state"]
        return self._text(w.id, rest, f'{{"state":{w.state_json},')

    def _text(self, id: str, doc: Doc, head: str = "") -> str:
        """`doc` as JSON text this file can hold, or the `InvalidState` that says why not.

        `head` (an object's first members and a comma) is put before the other members.
        """
        try:
            text = _dumps(doc)
            if head:
                text = head + text[1:] if len(text) > 2 else head[:-1] + "}"
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
        except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
            raise InvalidState(f"the envelope of {id!r:.80} cannot be stored: {e}") from None
        if size > self.max_document_size:
            raise too_large(id, size, self.max_document_size, "SQLite")
        return text

    def put_history(self, id: str, entries: Sequence[Doc]) -> None:
        if not entries:
            return

        def run(db: sqlite3.Connection) -> None:
            db.executemany(_INSERT_HISTORY, [(id, h["seq"], _dumps(h)) for h in entries])

        self._transaction(run)

    def history(self, id: str, *, after: int = 0, limit: int | None = None) -> list[Doc]:
        sql = "SELECT entry FROM history WHERE id = ? AND seq > ? ORDER BY seq LIMIT ?"
        args = (id, after, -1 if limit is None else limit)
        rows = self._read(lambda db: db.execute(sql, args).fetchall())
        return [json.loads(entry) for (entry,) in rows]

    def _ids_where(self, sql: str, args: tuple[Any, ...]) -> list[str]:
        return [id for (id,) in self._read(lambda db: db.execute(sql, args).fetchall())]

    def due(self, now: float, limit: int) -> list[str]:
        return self._ids_where(
            "SELECT id FROM machines WHERE next_due IS NOT NULL AND next_due <= ?"
            " ORDER BY next_due LIMIT ?",
            (now, limit),
        )

    def pending(self, before: float, limit: int) -> list[str]:
        return self._ids_where(
            "SELECT id FROM machines WHERE pending_since IS NOT NULL AND pending_since <= ?"
            " ORDER BY pending_since LIMIT ?",
            (before, limit),
        )

    def failed(self, limit: int) -> list[str]:
        # INDEXED BY: left alone, the planner walks the primary key for ORDER BY id and
        # reads every machine to find the few that failed (measured: 100,000 rows scanned).
        return self._ids_where(
            "SELECT id FROM machines INDEXED BY machines_failed WHERE nfailed > 0"
            " ORDER BY id LIMIT ?",
            (limit,),
        )

    def ids(self, *, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        # A range scan on the primary key, not LIKE: prefixes may hold % and _.
        low = max(prefix, after) if after is not None else prefix
        op = ">" if after is not None and after >= prefix else ">="
        sql = f"SELECT id FROM machines WHERE id {op} ? AND id < ? ORDER BY id LIMIT ?"
        high = prefix + "\U0010ffff" if prefix else "\U0010ffff\U0010ffff"
        return self._ids_where(sql, (low, high, limit))

    # -- find: the store-neutral query as SQL over the JSON envelope ------------------

    def ensure_indexes(self, fields: Sequence[tuple[str, ...]]) -> None:
        """Two indexes per field: its value (then id, so equal values come in id order),
        and the few rows where it is an array (for `$in`, which looks inside arrays)."""

        def run(db: sqlite3.Connection) -> None:
            for path in fields:
                name = "find_" + hashlib.sha1(_json_path(path).encode()).hexdigest()[:16]
                value, kind = _value_and_type(path)
                db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON machines ({value}, id)")
                db.execute(
                    f"CREATE INDEX IF NOT EXISTS {name}_arrays ON machines (id)"
                    f" WHERE {kind} = 'array'"
                )

        if fields:
            self._transaction(run)

    def find(self, query: Query, *, limit: int, after: str | None = None) -> list[str]:
        return self._ids_where(*find_sql(query, limit=limit, after=after))

    def count(self) -> int:
        """How many machines are stored (used by `casern migrate` for its progress bar)."""
        return int(
            self._retry(lambda: self._db.execute("SELECT count(*) FROM machines").fetchone()[0])
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for reader in list(self._readers):
                reader.db.close()
            self._db.close()


# A field's JSON path is the only part of a query written into the SQL text (an
# expression index is used only by a query that spells the same expression), so
# it is quoted twice: each key as a JSON path string (`_query.check_path` refused
# keys holding quotes, backslashes or control characters), the whole as an SQL
# string literal. Every value is a bound parameter.


def _json_path(path: tuple[str, ...]) -> str:
    return "$.state" + "".join(f'."{key}"' for key in path)


def find_sql(query: Query, *, limit: int, after: str | None) -> tuple[str, tuple[Any, ...]]:
    """The SELECT that answers `find`, and its parameters (tests read its query plan)."""
    args: list[Any] = []
    where = _where(query, args)
    if after is not None:
        where = f"({where}) AND id > ?"
        args.append(after)
    args.append(limit)
    return f"SELECT id FROM machines WHERE {where} ORDER BY id LIMIT ?", tuple(args)


def _literal(path: tuple[str, ...]) -> str:
    return "'" + _json_path(path).replace("'", "''") + "'"


def _value_and_type(path: tuple[str, ...]) -> tuple[str, str]:
    """SQL for a field's value (json_extract gives 1/0 for true/false) and its JSON type."""
    literal = _literal(path)
    return f"json_extract(doc, {literal})", f"json_type(doc, {literal})"


_NUMBER = "IN ('integer', 'real')"
_TEXT = "= 'text'"


def _where(query: Query, args: list[Any], bounded: frozenset[_Side] = frozenset()) -> str:
    """SQL for one query node; values are appended to `args`, never written inline.

    `bounded`: the range sides that sibling conditions of an `$and` already give.
    """
    if isinstance(query, All):
        sides = frozenset(_side(q) for q in query.parts if isinstance(q, Cond) and q.op in RANGES)
        return " AND ".join(f"({_where(q, args, sides)})" for q in query.parts) or "1"
    if isinstance(query, AnyOf):
        return " OR ".join(f"({_where(q, args)})" for q in query.parts)
    x, t = _value_and_type(query.path)
    op, value = query.op, query.value
    if op == "exists":
        return f"{t} IS NOT NULL" if value else f"{t} IS NULL"
    if op == "eq":
        return _in(x, t, (value,), args)
    if op == "ne":
        return f"{t} IS NOT NULL AND NOT ({_in(x, t, (value,), args)})"
    if op in ("in", "nin"):
        # As in CouchDB, $in also matches an array holding one of the values.
        one = _in(x, t, value, args)
        each = _in("value", "type", value, args)
        # The arrays come from their own (partial) index: `id IN` keeps both index-served.
        items = f"SELECT 1 FROM json_each(doc, {_literal(query.path)}) WHERE {each}"
        arrays = f"SELECT id FROM machines WHERE {t} = 'array' AND EXISTS ({items})"
        found = f"{one} OR id IN ({arrays})"
        return found if op == "in" else f"{t} IS NOT NULL AND NOT ({found})"
    sign = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[op]
    args.append(value)
    sql = f"{x} {sign} ?"
    path, kind, side = _side(query)
    other = "high" if side == "low" else "low"
    if (path, kind, other) not in bounded:
        # Close the range at the end of its type (SQLite sorts null < numbers < text
        # < blobs): a range bounded on both sides is one the planner trusts over
        # the primary key, and it skips values of other types in the index.
        bound, limit = _TYPE_BOUNDS[kind, other]
        sql += f" AND {x} {bound} ?"
        args.append(limit)
    return f"{sql} AND {t} {_TEXT if kind == 'text' else _NUMBER}"


_Side = tuple[tuple[str, ...], str, str]

_TYPE_BOUNDS: dict[tuple[str, str], tuple[str, Any]] = {
    ("number", "low"): (">=", float("-inf")),
    ("number", "high"): ("<", ""),
    ("text", "low"): (">=", ""),
    ("text", "high"): ("<", b""),
}


def _side(cond: Cond) -> _Side:
    """(path, value type, side) of a range condition: `$gt 5` is the low side of numbers."""
    kind = "text" if isinstance(cond.value, str) else "number"
    return cond.path, kind, "low" if cond.op in ("gt", "gte") else "high"


def _in(x: str, t: str, values: tuple[Scalar, ...], args: list[Any]) -> str:
    """SQL true where the JSON value (`x` its SQL value, `t` its json_type) is one of `values`."""
    terms = []
    strings = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    bools = [v for v in values if isinstance(v, bool)]
    for group, types in ((strings, _TEXT), (numbers, _NUMBER)):
        if group:
            args.extend(group)
            terms.append(f"({x} IN ({','.join('?' * len(group))}) AND {t} {types})")
    if bools:
        # json_extract gives 1 and 0 for true and false: the type tells them from numbers.
        args.extend(int(v) for v in bools)
        names = ",".join(f"'{'true' if v else 'false'}'" for v in bools)
        terms.append(f"({x} IN ({','.join('?' * len(bools))}) AND {t} IN ({names}))")
    if None in values:
        terms.append(f"({x} IS NULL AND {t} = 'null')")
    return " OR ".join(terms) or "0"


class _Reader:
    """Holds one thread's read connection; dropped (and closed) with the thread."""

    __slots__ = ("__weakref__", "db")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __del__(self) -> None:
        self.db.close()


def _writable(directory: str) -> bool:
    """Whether a file can be created in `directory` (os.access says yes to root everywhere)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
