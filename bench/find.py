"""`find` cost: 50 matches among 1,000 machines vs among 100,000, on SQLite and CouchDB.

Every store is filled straight through its own bulk path with envelopes as the
engine writes them (SQLite: one INSERT per row in one transaction; CouchDB:
`_bulk_docs` in chunks of 5,000), then `Casern(..., indexes=("status", "i"))`
opens it and creates the indexes. A first find warms up (CouchDB builds a
Mango index on its first query), then each selector is timed (median of
`--repeat` runs) and its answer checked:

- `{"status": "escalated"}`: equality on an indexed field, 50 matches;
- `{"i": {"$gte": k, "$lt": k + 50}}`: a range on an indexed field, 50 matches;
- `{"note": "rare"}`: the same 50 machines by a field that is *not* indexed
  (a scan: what it costs is the point).

The contract: a selector on an indexed field costs in proportion to its
matches, not to all machines; the goal is at most 3x from 1,000 to 100,000.

    python bench/find.py                                   # SQLite only
    python bench/find.py --couchdb http://admin:pw@127.0.0.1:5984
    python bench/find.py --sizes 1000,100000 --repeat 20
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import bulk_load_couch, now, print_table, python_info, ratio_line, sqlite_url, temp_dir

import casern
from casern.stores.sqlite import SQLiteStore

MATCHES = 50
INDEXES = ("status", "i")


def state(i: int, size: int) -> dict[str, Any]:
    """Every (size // MATCHES)-th machine is escalated and noted rare; the rest vary."""
    hit = i % (size // MATCHES) == 0
    return {
        "status": "escalated" if hit else ("open", "closed", "waiting")[i % 3],
        "i": i,
        "note": "rare" if hit else "plain",
        "owner": {"team": "abcdefgh"[i % 8]},
        "text": f"conversation {i} " + "x" * 100,
    }


def ident(i: int) -> str:
    return f"conversation-{i:07d}"


def envelope(i: int, size: int) -> dict[str, Any]:
    return {"state": state(i, size), "seq": 1, "version": 1}


def populate_sqlite(path: Path, size: int) -> float:
    start = now()
    SQLiteStore(sqlite_url(path)).close()  # casern creates its schema
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # population only
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO machines (id, rev, doc, nfailed) VALUES (?, 1, ?, 0)",
        ((ident(i), json.dumps(envelope(i, size))) for i in range(size)),
    )
    db.execute("COMMIT")
    db.close()
    return now() - start


def populate_couch(url: str, size: int) -> float:
    from casern.stores.couchdb import CouchDBStore

    start = now()
    CouchDBStore(url).close()  # casern creates the database
    bulk_load_couch(url, ({"_id": ident(i), **envelope(i, size)} for i in range(size)))
    return now() - start


def drop_couch(url: str) -> None:
    """Delete a bench database and its history database."""
    import httpx

    for db in (url, url + "-history"):
        answer = httpx.delete(db, timeout=60)
        if answer.status_code != 404:  # the history database exists once history is written
            answer.raise_for_status()


def selectors(size: int) -> dict[str, tuple[dict[str, Any], list[str]]]:
    step = size // MATCHES
    hits = [ident(i) for i in range(0, size, step)][:MATCHES]
    k = size // 2
    return {
        "indexed =": ({"status": "escalated"}, hits),
        "indexed range": (
            {"i": {"$gte": k, "$lt": k + MATCHES}},
            [ident(i) for i in range(k, k + MATCHES)],
        ),
        "unindexed (scan)": ({"note": "rare"}, hits),
    }


def settle(app: casern.Casern, size: int, label: str, server: str | None) -> float:
    """Warm up every selector and index, then wait for background indexing to end.

    CouchDB builds a Mango index on its first query, and Apache CouchDB's
    background indexer also updates the other design documents after a bulk
    load: timing while it runs would measure it. Returns the seconds it took.
    """
    start = now()
    for name, (selector, expected) in selectors(size).items():
        found = app.find(selector, limit=100)
        if found != expected:
            raise SystemExit(f"{label} {name}: found {found[:3]}... ({len(found)}), not the 50")
    app.store.due(0.0, 1), app.store.pending(0.0, 1), app.store.failed(1)
    if server is not None:
        import time

        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            tasks = httpx.get(f"{server.rstrip('/')}/_active_tasks", timeout=10).json()
            if not any(isinstance(t, dict) and t.get("type") == "indexer" for t in tasks):
                break
            time.sleep(0.5)
    return now() - start


def measure(app: casern.Casern, size: int, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (selector, _) in selectors(size).items():
        runs = []
        for _ in range(repeat if "scan" not in name else max(3, repeat // 5)):
            start = now()
            app.find(selector, limit=100)
            runs.append(now() - start)
        out[name] = statistics.median(runs)
    return out


def bench(
    open_store: Callable[[int], tuple[str, float]],
    sizes: list[int],
    repeat: int,
    label: str,
    server: str | None = None,
) -> dict[int, dict[str, float]]:
    results = {}
    for size in sizes:
        url, populated = open_store(size)
        start = now()
        app = casern.Casern(url, indexes=INDEXES)
        opened = now() - start
        try:
            warm = settle(app, size, f"{label} {size:,}", server)
            results[size] = measure(app, size, repeat)
        finally:
            app.close()
            if server is not None:
                drop_couch(url)
        print(
            f"  {label} {size:,}: populated in {populated:.1f} s, Casern() with indexes"
            f" opened in {opened:.1f} s, first queries and indexing {warm:.1f} s",
            flush=True,
        )
    return results


def report(label: str, results: dict[int, dict[str, float]]) -> None:
    small, big = min(results), max(results)
    names = list(results[small])
    rows = [
        [
            name,
            results[small][name] * 1e3,
            results[big][name] * 1e3,
            results[big][name] / results[small][name],
        ]
        for name in names
    ]
    print_table(
        ["selector (50 matches)", f"{small:,} ms", f"{big:,} ms", "ratio"],
        rows,
        title=f"{label}: find(selector, limit=100), median",
    )
    for name in names[:2]:
        value = results[big][name] / results[small][name]
        print(ratio_line(f"{label} {name} {big:,} vs {small:,}", value, "<= 3x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--couchdb", help="base URL of a CouchDB (http://user:pass@host:port)")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(python_info())
    if not args.skip_sqlite:
        with temp_dir() as tmp:

            def sqlite_store(size: int) -> tuple[str, float]:
                path = tmp / f"find-{size}.db"
                return sqlite_url(path), populate_sqlite(path, size)

            report("sqlite", bench(sqlite_store, sizes, args.repeat, "sqlite"))
    if args.couchdb:

        def couch_store(size: int) -> tuple[str, float]:
            url = f"{args.couchdb.rstrip('/')}/casern-bench-find-{size}-{uuid.uuid4().hex[:8]}"
            return url, populate_couch(url, size)

        report("couchdb", bench(couch_store, sizes, args.repeat, "couchdb", args.couchdb))


if __name__ == "__main__":
    main()
