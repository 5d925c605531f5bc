"""The CouchDB store: one document per machine, revisions as optimistic locks.

Speaks the plain CouchDB 2.x/3.x HTTP API (tested against Apache CouchDB 3.5,
single node and a 3-node cluster, and pouchdb-server) through one thread-safe
`httpx.Client`. Machine ids only ever
travel in JSON bodies (`_all_docs` keys, `_bulk_docs` docs), never in URL
paths, so no id can reach another document, database or endpoint.

History entries live in a second database, `<dbname>-history`, one document
per `(id, seq)` with a deterministic id, so rewriting one is harmless.

On a cluster (`GET /db` says `cluster.n` > 1) a document can fork: each replica
accepts the first child of a revision that reaches it, so two writers on one
revision can both win somewhere. There the store writes with `w=n` (every
replica must take the write for a 201), reads with `conflicts=true`, and
`confirm` re-reads from all `n` replicas before the engine lets listeners see
a change (see `casern/_merge.py` for the merge).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from .._errors import CasernError, InvalidState, StoreUnavailable
from .._ids import check_id
from .._query import RANGES, All, AnyOf, Cond, Query, matches, paths
from .base import Doc, Record, Store, StoreURLError, Write, chunks, too_large

__all__ = ["CouchDBStore"]

log = logging.getLogger("casern.couchdb")

#: Field holding a random token per write, to tell after a transport error
#: whether that write landed. CouchDB reserves names starting with "_".
TOKEN = "casern_w"

#: Keys per `_all_docs` request and docs per `_bulk_docs` request.
CHUNK = 500

#: CouchDB 3.x's default `[couchdb] max_document_size`, in bytes.
DEFAULT_MAX_DOCUMENT_SIZE = 8_000_000

# CouchDB database names: a lowercase letter, then [a-z0-9_$()+/-].
_DB_NAME = re.compile(r"^[a-z][a-z0-9_$()+/-]*$")

# Separates machine id and seq in history ids. Machine ids never contain
# control characters (see _ids.py), so `id + SEP` is a prefix no other
# machine's history id can share, and all of one machine's entries form one
# contiguous `_all_docs` key range.
_SEP = "\x1f"
_SEQ_DIGITS = 16

# Errors a retry cannot fix, even when they come with a 5xx status
# (pouchdb-server answers a whole `_bulk_docs` with 500 doc_validation).
_PERMANENT = {"doc_validation", "bad_request", "forbidden", "unauthorized", "too_large"}

# Errors about a document's content: pouchdb-server answers 500 doc_validation
# to a malformed document and 500 RangeError to one nested too deep for it.
_BAD_DOCUMENT = {"doc_validation", "bad_request", "RangeError"}

# The Mango indexes that keep timers and recovery O(due), not O(machines).
_INDEXES = ("next_due", "pending_since", "nfailed")

# A view of the ids that have sibling revisions (on a cluster): its size is the
# number of forks, so a sweep over it costs O(forks), not O(machines).
_FORKS = "casern-forks"
_FORKS_MAP = "function (doc) { if (doc._conflicts) { emit(null, null); } }"

# A lower bound below every epoch time. pouchdb-server matches documents
# *without* the field for a bare `$lte`, so every range query is bounded on
# both sides; the bound also excludes null.
_MIN_NUMBER = -1e308


def _ddoc(field: str) -> str:
    return f"casern-{field}"


#: `_find` answers 25 documents unless told otherwise; find wants every match.
_FIND_ALL = 2**31 - 1


def _find_ddoc(path: tuple[str, ...]) -> str:
    return "casern-find-" + hashlib.sha1(".".join(path).encode()).hexdigest()[:16]


def _mango_field(path: tuple[str, ...]) -> str:
    # Keys hold no "." nor "\\" (refused by _query.check_path): nothing to escape.
    return ".".join(("state", *path))


@dataclass(frozen=True)
class _FindRequest:
    """One find: the query, its Mango selector, the fields to fetch, the recheck."""

    query: Query
    decided: frozenset[Cond]
    fields: list[str]

    @property
    def selector(self) -> dict[str, Any]:
        return _mango(self.query)

    def matches(self, doc: Doc) -> bool:
        return matches(self.query, doc.get("state", {}), self.decided)


def _after(selector: dict[str, Any], after: str | None) -> dict[str, Any]:
    if after is None:
        return selector
    later = {"_id": {"$gt": after}}
    return {"$and": [selector, later]} if selector else later


def _indexed_equality(query: Query, indexed: frozenset[tuple[str, ...]]) -> tuple[str, ...] | None:
    """An indexed field that the top `$and` of `query` compares for equality, if any."""
    for part in query.parts if isinstance(query, All) else (query,):
        if isinstance(part, Cond) and part.op == "eq" and part.path in indexed:
            return part.path
    return None


def _string_ranges(query: Query) -> frozenset[Cond]:
    """The string range conditions that every answer of `_mango(query)` satisfies."""
    if isinstance(query, All):
        return frozenset().union(*map(_string_ranges, query.parts))
    if isinstance(query, Cond) and query.op in RANGES and isinstance(query.value, str):
        return frozenset((query,))
    return frozenset()


def _mango(query: Query) -> dict[str, Any]:
    """A Mango selector matching at least what `casern._query.matches` matches.

    `find` checks every answer again, so this may match more, never less.
    Mango compares across types by CouchDB's collation (null < false < true <
    numbers < strings < arrays < objects), so every range gets a second bound
    that keeps the index range within its type. `{}` is no constraint: what
    no index can serve (`$ne`, `$nin`, `$exists: false`) is left to the check,
    also because pouchdb-server answers those from an index of the field,
    which lacks documents without it (and, for `$nin`, those holding null).
    """
    if isinstance(query, All):
        parts = [p for p in map(_mango, query.parts) if p]
        return parts[0] if len(parts) == 1 else {"$and": parts} if parts else {}
    if isinstance(query, AnyOf):
        parts = [_mango(q) for q in query.parts]
        return {"$or": parts} if all(parts) else {}
    op, value = query.op, query.value
    cond: dict[str, Any]
    if op in ("ne", "nin") or (op == "exists" and not value):
        return {}
    if op == "exists":
        cond = {"$exists": True}
    elif op == "in":
        field = _mango_field(query.path)
        if None in value:  # Apache CouchDB 3.5 fails (500 function_clause) on $in with null
            rest = [v for v in value if v is not None]
            return {"$or": [{field: {"$eq": None}}, *([{field: {"$in": rest}}] if rest else [])]}
        cond = {"$in": list(value)}
    elif op == "eq":
        cond = {"$eq": value}
    elif isinstance(value, str):  # strings sort above true and numbers, below arrays
        cond = (
            {f"${op}": value, "$gte": ""} if op in ("lt", "lte") else {f"${op}": value, "$lt": []}
        )
    else:  # numbers sort above true, below strings
        cond = (
            {f"${op}": value, "$gt": True} if op in ("lt", "lte") else {f"${op}": value, "$lt": ""}
        )
    return {_mango_field(query.path): cond}


def _history_id(id: str, seq: int) -> str:
    return f"{id}{_SEP}{seq:0{_SEQ_DIGITS}d}"


def _generation(rev: str) -> int:
    head, _, _ = rev.partition("-")
    return int(head) if head.isdigit() else 0


def _record(id: str, doc: Doc) -> Record:
    return Record(id, doc["_rev"], _clean(doc), tuple(doc.get("_conflicts", ())))


def _clean(doc: Doc) -> Doc:
    """The envelope as the engine wrote it: CouchDB's and our own fields removed."""
    return {k: v for k, v in doc.items() if not k.startswith("_") and k != TOKEN}


def _by_id(writes: Sequence[Write], todo: list[int], rows: list[Doc]) -> list[int]:
    """The write each `_bulk_docs` row answers, in row order.

    pouchdb-server lists refused documents first, so rows are matched by id
    (in request order among writes to one id), not by position.
    """
    slots: dict[str, list[int]] = {}
    for i in todo:
        slots.setdefault(writes[i].id, []).append(i)
    if len(rows) != len(todo):
        raise StoreUnavailable(f"_bulk_docs answered {len(rows)} rows for {len(todo)} documents")
    return [slots[row["id"]].pop(0) for row in rows]


def _dumps(body: Any) -> bytes:
    # allow_nan=False: CouchDB cannot store NaN/Infinity; fail here, not there.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class _Retry(Exception):
    """A failure worth retrying (transport error, 5xx); `sent` if it may have landed."""

    def __init__(self, what: str, *, sent: bool) -> None:
        super().__init__(what)
        self.what = what
        self.sent = sent


class _MissingDB(Exception):
    """The database is gone (deleted, or an in-memory server restarted)."""


class _DocRefused(Exception):
    """The server refused a request's documents for their content (nothing written)."""

    def __init__(self, error: StoreUnavailable) -> None:
        self.error = error


class _TooLarge(Exception):
    """CouchDB refused a whole `_bulk_docs` for one document over `max_document_size`."""

    def __init__(self, id: str) -> None:
        self.id = id


class CouchDBStore(Store):
    """Envelopes in a CouchDB database, written with `_bulk_docs`.

    `url` is `http(s)://[user:pass@]host:port[/path]/dbname`; the database
    (and `<dbname>-history`) is created if missing. Every request is retried
    `retries` times with exponential back-off and jitter on transport errors
    and 5xx answers, then raises `StoreUnavailable`. `transport` is for tests.
    `max_document_size` (bytes) is read from the server's configuration when
    the user may read it, else CouchDB's default of 8,000,000 applies.
    """

    atomic_history = False
    #: Replicas per document (`cluster.n`); 1 on a single node and pouchdb-server.
    n: int = 1

    @property
    def may_fork(self) -> bool:  # type: ignore[override]
        return self.n > 1

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
        max_document_size: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port == -1:
            # Raised outside the except block: the parser's message may quote
            # part of the password (an unescaped "/" or "#" in it moves the
            # rest into the port), so not even __context__ may hold it.
            raise StoreURLError(
                "cannot parse the CouchDB store URL (percent-encode special characters"
                " in the user name and password)"
            )
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if port is not None:
            netloc = f"{netloc}:{port}"
        redacted = netloc if parts.username is None else f"***@{netloc}"
        # Never put the raw URL into a message: it may hold the password.
        self._secrets = [s for s in (parts.netloc.rpartition("@")[0], password) if len(s) >= 4]
        segments = parts.path.rstrip("/").split("/")
        dbname = unquote(segments[-1]) if len(segments) > 1 else ""
        self.url = urlunsplit((parts.scheme, redacted, parts.path, "", ""))
        if parts.scheme not in ("http", "https") or not host:
            raise StoreURLError(
                f"a CouchDB store URL looks like http://user:pass@host:5984/dbname, not {self.url}"
            )
        if not dbname:
            raise StoreURLError(
                "a CouchDB store URL ends with the database name, as in"
                f" http://user:pass@host:5984/dbname; {self.url} has none"
            )
        if not _DB_NAME.match(dbname):
            raise StoreURLError(
                f"{dbname!r} is not a CouchDB database name"
                f" (a lowercase letter, then a-z 0-9 _$()+/-): {self.url}"
            )
        self._db = "/" + quote(dbname, safe="")
        self._hdb = "/" + quote(dbname + "-history", safe="")
        self._retries = max(0, retries)
        self._forks_view = False
        # Writes a cluster acknowledged with 202 (not every replica has them yet).
        self._partial: set[tuple[str, str]] = set()
        self._partial_lock = threading.Lock()
        base = urlunsplit((parts.scheme, netloc, "/".join(segments[:-1]), "", ""))
        self._client = httpx.Client(
            base_url=base,
            auth=(user, password) if parts.username is not None else None,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )
        try:
            welcome = self._call("GET", "/")
            # _all_docs orders ids by code point on CouchDB, by UTF-16 code
            # unit on pouchdb-server, which also silently stops at U+00FF
            # when no endkey is given: so always send the highest key there is.
            pouch = isinstance(welcome, dict) and "express-pouchdb" in welcome
            self._high = "\uffff" if pouch else "\U0010ffff"
            if max_document_size is not None:
                self.max_document_size = max_document_size
            elif not pouch:  # pouchdb-server has no document limit
                self.max_document_size = self._read_max_document_size()
            self._create(self._db)
            info = self._call("GET", self._db, db=self._db)
            cluster = info.get("cluster") if isinstance(info, dict) else None
            self.n = int(cluster.get("n", 1)) if isinstance(cluster, dict) else 1
        except BaseException:
            self._client.close()
            raise

    # -- the Store interface ------------------------------------------------

    def get_many(self, ids: Sequence[str]) -> dict[str, Record]:
        """POST `_all_docs?include_docs=true` with the keys: no id ever in a path."""
        for id in ids:
            check_id(id)  # "_design/x" would read a design document
        found: dict[str, Record] = {}
        params = {"include_docs": "true"}
        if self.may_fork:
            params["conflicts"] = "true"
        for part in chunks(list(dict.fromkeys(ids)), CHUNK):
            for row in self._rows(self._db, list(part), params):
                doc = row.get("doc")
                if isinstance(doc, dict):  # missing: error row; deleted: doc null
                    found[row["id"]] = _record(row["id"], doc)
        return found

    def leaves(self, ids: Sequence[str]) -> dict[str, list[Record]]:
        """`_bulk_get` without revisions: every leaf (`open_revs=all`), the winner first."""
        for id in ids:
            check_id(id)
        out: dict[str, list[Record]] = {}
        for part in chunks(list(dict.fromkeys(ids)), CHUNK):
            body = {"docs": [{"id": id} for id in part]}
            params = {"r": str(self.n)} if self.may_fork else None
            answer = self._call("POST", self._db + "/_bulk_get", body, params=params, db=self._db)
            for res in answer["results"]:
                docs = [got["ok"] for got in res.get("docs", []) if isinstance(got.get("ok"), dict)]
                live = [d for d in docs if not d.get("_deleted")]
                if live:
                    # CouchDB's winner: the highest generation, then the highest rev string.
                    live.sort(key=lambda d: (_generation(d["_rev"]), d["_rev"]), reverse=True)
                    out[res["id"]] = [_record(res["id"], d) for d in live]
        return out

    def forked(self, limit: int) -> list[str]:
        """A view over `_conflicts` (created on first use): the ids with sibling revisions."""
        if not self.may_fork or limit <= 0:
            return []
        ddoc = f"{self._db}/_design/{_FORKS}"
        if not self._forks_view:
            view = {"views": {"ids": {"map": _FORKS_MAP}}}
            self._call("PUT", ddoc, view, expect=(409,), db=self._db)  # 409: there already
            self._forks_view = True
        params = {"limit": str(limit)}
        rows = self._call("GET", ddoc + "/_view/ids", params=params, db=self._db)["rows"]
        return [row["id"] for row in rows]

    def confirm(self, landed: Mapping[str, str]) -> set[str]:
        """Ask for every leaf of each id (`_bulk_get`, as `open_revs=all`) from all replicas.

        A write that every replica took (201 with `w=n`) left its parent a leaf
        nowhere, so no writer can fork it any more; if then it is the only
        leaf, nothing can take its place. (`conflicts=true` on a read is not
        enough: it reports the siblings of the replicas that answered first.)
        A 202 (a replica did not take it: a node down or slow) is not
        confirmed: the engine checks again later.
        """
        if not self.may_fork:
            return set(landed)
        with self._partial_lock:
            partial = {id for id, rev in landed.items() if (id, rev) in self._partial}
            self._partial.difference_update((id, landed[id]) for id in partial)
        todo = [id for id in landed if id not in partial]
        found = self.leaves(todo) if todo else {}
        return {id for id in todo if [rec.rev for rec in found.get(id, ())] == [landed[id]]}

    def put_many(self, writes: Sequence[Write]) -> list[str | CasernError | None]:
        """One `_bulk_docs` per chunk; a retried chunk never applies a write twice."""
        for w in writes:
            check_id(w.id)  # "_design/x" in _bulk_docs would create a design doc
        results: list[str | CasernError | None] = [None] * len(writes)
        for start in range(0, len(writes), CHUNK):
            part = writes[start : start + CHUNK]
            results[start : start + len(part)] = self._put_chunk(part)
        return results

    def put_history(self, id: str, entries: Sequence[Doc]) -> None:
        """Create one document per entry; one that exists already is a success."""
        check_id(id)
        docs = []
        for entry in entries:
            seq = entry["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise ValueError(f"a history entry needs an int seq >= 0, not {seq!r}")
            docs.append({**_clean(entry), "_id": _history_id(id, seq)})
        for part in chunks(docs, CHUNK):
            # Creates without _rev: a resend after a lost answer just conflicts. On a
            # cluster every replica takes them (w=n), so any replica's _all_docs shows them.
            rows = self._call(
                "POST",
                self._hdb + "/_bulk_docs",
                {"docs": list(part)},
                params=self._quorum(),
                db=self._hdb,
            )
            for row in rows:
                if "error" in row and row["error"] != "conflict":
                    raise self._refused(row)

    def history(self, id: str, *, after: int = 0, limit: int | None = None) -> list[Doc]:
        """Read the machine's contiguous key range of the history database."""
        check_id(id)
        start, skip = _history_id(id, max(after, -1) + 1), None
        end = f"{id}{_SEP}:"  # ":" sorts after every digit
        out: list[Doc] = []
        while limit is None or len(out) < limit:
            page = (1000 if limit is None else min(1000, limit - len(out))) + (skip is not None)
            query = {"startkey": start, "endkey": end, "include_docs": True, "limit": page}
            rows = self._range(self._hdb, query)
            out.extend(
                _clean(r["doc"]) for r in rows if r["id"] != skip and isinstance(r.get("doc"), dict)
            )
            if len(rows) < page:
                break
            start = skip = rows[-1]["id"]
        return out

    def due(self, now: float, limit: int) -> list[str]:
        return self._find("next_due", {"$gte": _MIN_NUMBER, "$lte": now}, limit)

    def pending(self, before: float, limit: int) -> list[str]:
        return self._find("pending_since", {"$gte": _MIN_NUMBER, "$lte": before}, limit)

    def failed(self, limit: int) -> list[str]:
        # `$gte: 1`, not `$gt: 0`: pouchdb-server turns `$gt` into an inclusive
        # start key, applies `limit`, and only then drops the equal rows.
        return self._find("nfailed", {"$gte": 1}, limit, sort=False)

    def ids(self, *, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        """Page `_all_docs` from max(prefix, after), skipping design documents."""
        start, skip = prefix, None
        if after is not None and self._order(after) >= self._order(prefix):
            start, skip = after, after
        out: list[str] = []
        while len(out) < limit:
            page = min(1000, limit - len(out)) + 1
            query = {"startkey": start, "endkey": prefix + self._high, "limit": page}
            rows = self._range(self._db, query)
            for row in rows:
                id = row["id"]
                if id == skip or id.startswith("_"):  # _design/ documents hold our indexes
                    continue
                if not id.startswith(prefix):  # the prefix range is contiguous
                    return out
                out.append(id)
                if len(out) == limit:
                    return out
            if len(rows) < page:
                break
            start = skip = rows[-1]["id"]
        return out

    def _range(self, db: str, query: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of `_all_docs` for a key range, the query in the body, not in the URL.

        An id of 1,024 characters, JSON-escaped and percent-encoded, is up to
        about 16 KB per key: past what Apache CouchDB (400) and pouchdb-server
        (431) take in a request line.
        """
        rows: list[dict[str, Any]] = self._call("POST", db + "/_all_docs", query, db=db)["rows"]
        return rows

    def close(self) -> None:
        self._client.close()

    # -- find: the store-neutral query as Mango ---------------------------------

    #: The state fields `ensure_indexes` indexed: an equality on one pages in id order.
    _find_paths: frozenset[tuple[str, ...]] = frozenset()

    def ensure_indexes(self, fields: Sequence[tuple[str, ...]]) -> None:
        """One Mango index per state field, posted only if its design document is missing.

        Re-posting an existing index makes pouchdb-server rebuild it.
        """
        self._find_paths = frozenset(fields)
        names = {_find_ddoc(path): path for path in fields}
        if not names:
            return
        have = {
            r["id"]
            for r in self._rows(self._db, [f"_design/{n}" for n in names])
            if isinstance(r.get("doc"), dict)
        }
        for name, path in names.items():
            if f"_design/{name}" not in have:
                index = {
                    "index": {"fields": [_mango_field(path)]},
                    "ddoc": name,
                    "name": "state",
                    "type": "json",
                }
                self._call("POST", self._db + "/_index", index, db=self._db)

    def find(self, query: Query, *, limit: int, after: str | None = None) -> list[str]:
        """Matches from `_find`, each checked again with `matches`, in code point id order.

        Only the fields the query reads come back, and `matches` checks them, so
        `_mango` may match more (pouchdb-server also answers a superset for some
        ranges: `$gt` read as `$gte` on an index). String ranges of the top
        `$and` keep the server's order (ICU collation on Apache CouchDB), which
        it applied to every answer.
        """
        pouch = self._high == "\uffff"
        decided = frozenset() if pouch else _string_ranges(query)
        request = _FindRequest(query, decided, ["_id", *map(_mango_field, paths(query))])
        field = None if pouch else _indexed_equality(query, self._find_paths)
        if field is not None:
            found = self._find_by_index(request, field, limit, after)
            if found is not None:
                return found
        return self._find_all(request, limit, after, pouch)

    def _find_by_index(
        self, request: _FindRequest, field: tuple[str, ...], limit: int, after: str | None
    ) -> list[str] | None:
        """Page an equality on an indexed field straight from its index, `limit` at a time.

        Apache CouchDB orders index rows of one key by raw (code point) id, and
        compares `_id` the same way; None if the server did not use the index.
        """
        ddoc = f"_design/{_find_ddoc(field)}"
        out: list[str] = []
        while True:
            body = {
                "selector": _after(request.selector, after),
                "fields": request.fields,
                "limit": limit,
                "use_index": [ddoc, "state"],
            }
            answer = self._call("POST", self._db + "/_find", body, db=self._db)
            if ddoc in str(answer.get("warning", "")):  # "... was not used because ..."
                return None
            docs = answer["docs"]
            out.extend(d["_id"] for d in docs if request.matches(d))
            if len(out) >= limit or len(docs) < limit:
                return out[:limit]
            after = docs[-1]["_id"]

    def _find_all(
        self, request: _FindRequest, limit: int, after: str | None, pouch: bool
    ) -> list[str]:
        """Every match, sorted here: Mango answers in index order, not id order.

        A page then costs every match of the selector (after `after` on Apache
        CouchDB; pouchdb-server compares `_id` by UTF-16 unit, so it gets none).
        """
        selector = request.selector if pouch else _after(request.selector, after)
        body = {"selector": selector, "fields": request.fields, "limit": _FIND_ALL}
        docs = self._call("POST", self._db + "/_find", body, db=self._db)["docs"]
        ids = sorted(d["_id"] for d in docs if request.matches(d))
        if after is not None:
            ids = ids[bisect.bisect_right(ids, after) :]
        return ids[:limit]

    # -- writes ---------------------------------------------------------------

    def _put_chunk(self, writes: Sequence[Write]) -> list[str | CasernError | None]:
        """Send one `_bulk_docs`, retrying only writes that provably did not land.

        After a transport error or 5xx the request may or may not have been
        applied. Every doc carries a fresh random token, so before resending we
        re-read the docs: a doc holding our token (now, or in the revision
        right after the one we wrote against) is our write, landed.
        """
        tokens = [secrets.token_hex(8) for _ in writes]
        results: list[str | CasernError | None] = [None] * len(writes)
        # Each document encoded (and measured) alone: one that cannot be sent
        # is refused by itself, the others still go.
        encoded: dict[int, bytes] = {}
        for i, w in enumerate(writes):
            body = {**_clean(w.doc), TOKEN: tokens[i], "_id": w.id}
            if w.rev is not None:
                body["_rev"] = w.rev
            try:
                encoded[i] = self._encode_doc(w.id, body)
            except InvalidState as e:
                results[i] = e
        todo = list(encoded)
        if not todo:
            return results
        check = False
        failure = ""
        for attempt in range(self._retries + 1):
            if attempt:
                self._pause(attempt, failure)
            try:
                if check:
                    todo = self._reconcile(writes, tokens, todo, results)
                    check = False
                    if not todo:
                        return results
                docs = b'{"docs":[' + b",".join(encoded[i] for i in todo) + b"]}"
                status: list[int] = []
                rows = self._once(
                    "POST",
                    self._db + "/_bulk_docs",
                    docs,
                    params=self._quorum(),
                    status=status,
                    documents=True,
                )
                if status and status[0] == 202 and self.may_fork:
                    self._note_partial(
                        (row["id"], row["rev"]) for row in rows if "error" not in row
                    )
            except _DocRefused as exc:
                # The server refused the whole request for a document it did not name
                # (nothing was written): send them one by one to refuse only that one.
                if len(todo) == 1:
                    results[todo[0]] = InvalidState(str(exc.error))
                    return results
                for i in todo:
                    results[i] = self._put_chunk([writes[i]])[0]
                return results
            except _TooLarge as exc:  # CouchDB measured more than we did: refuse that one
                named = [i for i in todo if writes[i].id == exc.id] or todo
                for i in named:
                    results[i] = self._too_large(writes[i].id, len(encoded[i]))
                todo = [i for i in todo if i not in named]
                if not todo:
                    return results
                continue
            except _Retry as exc:
                failure, check = exc.what, check or exc.sent
                continue
            except _MissingDB:
                self._create(self._db)
                failure = "the database was missing and has been created again"
                continue
            order = _by_id(writes, todo, rows)
            self._drop(
                [writes[i] for i, row in zip(order, rows, strict=True) if "error" not in row]
            )
            for i, row in zip(order, rows, strict=True):
                if "error" not in row:
                    results[i] = row["rev"]
                elif row["error"] != "conflict":  # about this document only (a validation)
                    results[i] = InvalidState(str(self._refused(row)))
            return results
        raise self._unavailable(failure)

    def _drop(self, landed: Sequence[Write]) -> None:
        """Delete the siblings merged into writes that landed (best effort).

        Not in the same request as the merged write: were that write refused
        while a deletion went through, the sibling's changes would be gone. A
        sibling left behind (moved on, or this request failed) is still a
        conflict and is merged again; its actions are journaled, so none is
        applied twice.
        """
        drops = [{"_id": w.id, "_rev": rev, "_deleted": True} for w in landed for rev in w.drop]
        if not drops:
            return
        try:
            self._call("POST", self._db + "/_bulk_docs", {"docs": drops}, db=self._db)
        except StoreUnavailable as e:
            log.warning("CouchDB at %s: merged siblings not deleted yet (%s)", self.url, e)

    def _quorum(self) -> dict[str, str] | None:
        """Write parameters: on a cluster, every replica must take a write for a 201."""
        return {"w": str(self.n)} if self.may_fork else None

    def _note_partial(self, pairs: Any) -> None:
        with self._partial_lock:
            if len(self._partial) > 100_000:  # never confirmed: forget the oldest guesses
                self._partial.clear()
            self._partial.update(pairs)

    def _reconcile(
        self,
        writes: Sequence[Write],
        tokens: list[str],
        todo: list[int],
        results: list[str | CasernError | None],
    ) -> list[int]:
        """Settle writes that landed (their rev into `results`); return the rest."""
        current = {}
        for row in self._rows_once(self._db, [writes[i].id for i in todo]):
            if isinstance(row.get("doc"), dict):
                current[row["id"]] = row["doc"]
        rest, unsure = [], []
        for i in todo:
            w, doc = writes[i], current.get(writes[i].id)
            if doc is not None and doc.get(TOKEN) == tokens[i]:
                results[i] = doc["_rev"]
            elif (doc is None and w.rev is None) or (doc is not None and doc["_rev"] == w.rev):
                rest.append(i)  # untouched: ours did not land, send it again
            elif w.rev is not None and doc is None:
                results[i] = None  # deleted meanwhile: ours cannot land any more
            else:
                unsure.append(i)
        if unsure:
            self._trace(writes, tokens, unsure, results)
        return rest

    def _trace(
        self,
        writes: Sequence[Write],
        tokens: list[str],
        unsure: list[int],
        results: list[str | CasernError | None],
    ) -> None:
        """Decide writes whose doc moved on: did ours land first, then get overwritten?

        Reads the revision path of the current leaf and the body of the
        revision right after the one each write was based on.
        """
        query = [{"id": writes[i].id} for i in unsure]
        paths: dict[str, list[str]] = {}
        for res in self._once(
            "POST", self._db + "/_bulk_get", {"docs": query}, params={"revs": "true"}
        )["results"]:
            for got in res.get("docs", []):
                doc = got.get("ok")
                if isinstance(doc, dict) and "_revisions" in doc:
                    revs = doc["_revisions"]
                    start = int(revs["start"])
                    paths[res["id"]] = [f"{start - n}-{h}" for n, h in enumerate(revs["ids"])]
        wanted: dict[int, str] = {}
        for i in unsure:
            w = writes[i]
            path = paths.get(w.id, [])
            gen = _generation(w.rev) if w.rev is not None else 0
            # Our write, had it landed, is the child of w.rev on the winning path.
            after = [r for r in path if _generation(r) == gen + 1]
            based = w.rev is None or w.rev in path
            if after and based:
                wanted[i] = after[0]
            else:
                results[i] = None  # a conflict: ours never became part of this path
        if not wanted:
            return
        query = [{"id": writes[i].id, "rev": rev} for i, rev in wanted.items()]
        bodies: dict[tuple[str, str], Doc] = {}
        for res in self._once("POST", self._db + "/_bulk_get", {"docs": query})["results"]:
            for got in res.get("docs", []):
                doc = got.get("ok")
                if isinstance(doc, dict):
                    bodies[(res["id"], doc["_rev"])] = doc
        for i, rev in wanted.items():
            body = bodies.get((writes[i].id, rev))
            if body is None:
                # Compacted away: we cannot tell, and guessing either way could
                # lose or double an update. Say so rather than guess.
                raise StoreUnavailable(
                    f"the outcome of a write to {writes[i].id!r:.80} on {self.url} is unknown "
                    "(the connection failed while it was sent); check that document"
                )
            results[i] = rev if body.get(TOKEN) == tokens[i] else None

    # -- reads ----------------------------------------------------------------

    def _rows(
        self, db: str, keys: list[str], params: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        body = {"keys": keys}
        rows: list[dict[str, Any]] = self._call(
            "POST", db + "/_all_docs", body, params=params or {"include_docs": "true"}, db=db
        )["rows"]
        return rows

    def _rows_once(self, db: str, keys: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._once(
            "POST", db + "/_all_docs", {"keys": keys}, params={"include_docs": "true"}
        )["rows"]
        return rows

    def _find(
        self, field: str, cond: dict[str, Any], limit: int, *, sort: bool = True
    ) -> list[str]:
        """Mango query on one indexed envelope field; ids only."""
        if limit <= 0:
            return []
        query: dict[str, Any] = {
            "selector": {field: cond},
            "fields": ["_id"],
            "limit": limit,
            "use_index": [_ddoc(field), field],
        }
        if sort:
            query["sort"] = [{field: "asc"}]
        docs = self._call("POST", self._db + "/_find", query, db=self._db)["docs"]
        return [d["_id"] for d in docs]

    def _order(self, key: str) -> bytes:
        """The server's `_all_docs` order for a key (see `self._high`)."""
        return key.encode("utf-16-be" if self._high == "\uffff" else "utf-8", "surrogatepass")

    # -- HTTP -----------------------------------------------------------------

    def _create(self, db: str) -> None:
        """Create a database (412: it exists, fine) and, for envelopes, its indexes."""
        self._call("PUT", db, expect=(412,))
        if db == self._db:
            # Re-posting an existing index makes pouchdb-server rebuild it (about a
            # minute per 100,000 documents): post only the missing ones.
            ddocs = [f"_design/{_ddoc(field)}" for field in _INDEXES]
            have = {r["id"] for r in self._rows(db, ddocs) if isinstance(r.get("doc"), dict)}
            for field in _INDEXES:
                if f"_design/{_ddoc(field)}" in have:
                    continue
                index = {
                    "index": {"fields": [field]},
                    "ddoc": _ddoc(field),
                    "name": field,
                    "type": "json",
                }
                self._call("POST", db + "/_index", index)

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        db: str | None = None,
        expect: tuple[int, ...] = (),
    ) -> Any:
        """One idempotent request, retried with back-off; the JSON answer."""
        failure = ""
        for attempt in range(self._retries + 1):
            if attempt:
                self._pause(attempt, failure)
            try:
                return self._once(method, path, body, params=params, expect=expect)
            except _Retry as exc:
                failure = exc.what
            except _MissingDB:
                if db is None:
                    raise StoreUnavailable(
                        f"CouchDB at {self.url} answered 404 to {method} {path}"
                    ) from None
                self._create(db)
                failure = "the database was missing and has been created again"
        raise self._unavailable(failure)

    def _once(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        expect: tuple[int, ...] = (),
        status: list[int] | None = None,
        documents: bool = False,
    ) -> Any:
        """One request, no retry: JSON, or `_Retry` / `_MissingDB` / `StoreUnavailable`.

        `status`, if given, receives the HTTP status of a successful answer.
        `documents`: the body holds documents; a refusal of their content
        raises `_DocRefused` (never retried as an outage).
        """
        try:
            resp = self._client.request(
                method,
                path,
                content=body if body is None or isinstance(body, bytes) else _dumps(body),
                params=params,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retry(self._scrub(f"{type(exc).__name__}: {exc}"), sent=False) from None
        except httpx.TransportError as exc:
            # Sent, maybe applied, answer lost (ReadError, ReadTimeout ...).
            raise _Retry(self._scrub(f"{type(exc).__name__}: {exc}"), sent=True) from None
        status_code = resp.status_code
        if status is not None:
            status.append(status_code)
        if status_code < 400 or status_code in expect:
            try:
                return resp.json()
            except ValueError:
                raise _Retry(f"a non-JSON answer ({status_code})", sent=True) from None
        try:
            err = resp.json()
        except ValueError:
            err = {}
        if not isinstance(err, dict):
            err = {}
        if status_code == 404 and path != "/":
            # Every path we use is a database endpoint: 404 means no database
            # (CouchDB: "Database does not exist.", pouchdb-server: "no_db_file").
            raise _MissingDB()
        if status_code == 413 and err.get("error") == "document_too_large":
            raise _TooLarge(str(err.get("reason", "")))
        if documents and (status_code == 400 or err.get("error") in _BAD_DOCUMENT):
            raise _DocRefused(self._refused(err, status=status_code))
        if status_code >= 500 and err.get("error") not in _PERMANENT:
            raise _Retry(f"HTTP {status_code} {err.get('error', '')}".strip(), sent=True)
        raise self._refused(err, status=status_code)

    def _read_max_document_size(self) -> int:
        """The server's `[couchdb] max_document_size`; its default if unset or not readable."""
        try:
            resp = self._client.get("/_node/_local/_config/couchdb/max_document_size")
            if resp.status_code == 200:
                return int(resp.json())
        except (httpx.HTTPError, ValueError, TypeError):
            pass
        return DEFAULT_MAX_DOCUMENT_SIZE

    def _encode_doc(self, id: str, body: Doc) -> bytes:
        """One document as UTF-8 JSON, or `InvalidState` if it cannot be sent or is too big."""
        try:
            data = _dumps(body)
        except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
            raise InvalidState(f"the envelope of {id!r:.80} cannot be stored: {e}") from None
        if self.max_document_size is not None and len(data) > self.max_document_size:
            raise self._too_large(id, len(data))
        return data

    def _too_large(self, id: str, size: int) -> InvalidState:
        return too_large(id, size, self.max_document_size or 0, f"CouchDB at {self.url}")

    def _pause(self, attempt: int, failure: str) -> None:
        delay = min(5.0, 0.1 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        log.debug("CouchDB at %s: %s; retry %d in %.2fs", self.url, failure, attempt, delay)
        time.sleep(delay)

    def _unavailable(self, failure: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"CouchDB at {self.url} cannot be reached ({failure})"
            f" after {self._retries + 1} attempts; "
            "check that the server is running and that the store URL is right"
        )

    def _refused(
        self, err: dict[str, Any], *, status: int | None = None, more: int = 0
    ) -> StoreUnavailable:
        """A refusal a retry cannot fix: bad credentials, no permission, a rejected doc."""
        error, reason = (
            str(err.get("error", "")),
            self._scrub(str(err.get("reason", ""))).rstrip(". "),
        )
        what = f"{status} {error}" if status else error
        doc = f" document {err['id']!r:.80}" if "id" in err else ""
        also = f" (and {more} more)" if more else ""
        hint = ""
        if error in ("unauthorized", "forbidden") or status in (401, 403):
            hint = (
                "; check the user name and password in the store URL"
                " and that user's rights on the database"
            )
        return StoreUnavailable(f"CouchDB at {self.url} refused{doc}{also}: {what}: {reason}{hint}")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
