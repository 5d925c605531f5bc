"""Timer tick cost: 100 due machines among 1,000 vs 1,000,000 stored ones (SQLite).

The store is populated fast, straight into casern's schema (one big
transaction, indexes rebuilt afterwards), with envelopes as the engine writes
them: every machine has a `wake` timer; most are due a day from now, and
`rounds` groups of `due` machines (spread over the whole id range) are already
due, one second apart. A tick is one `app.run_once(now=...)` whose `now` takes
in exactly one group: it queries the due index and fires those machines
through the normal send path (read, reducer, revision-checked write, history).
Round 0 is a warm-up; afterwards every fired machine's state is checked.

The contract: one tick costs in proportion to the due machines, not to all.

    python bench/tick.py                           # 1,000 vs 1,000,000 machines
    python bench/tick.py --sizes 1000,100000 --due 100 --rounds 5
    python bench/tick.py --couchdb auto            # also CouchDB (pouchdb-server), 100,000
    python bench/tick.py --couchdb http://127.0.0.1:5984 --couch-size 100000
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    bulk_load_couch,
    now,
    print_table,
    python_info,
    ratio_line,
    sqlite_url,
    temp_dir,
)

import casern
from casern.stores.sqlite import SQLiteStore

FUTURE = 86_400.0  # not-due machines wake a day from now


def wake(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**state, "woken": data["now"]}


def next_wake(preferences: Any, state: dict[str, Any]) -> float | None:
    return None  # woken machines sleep for good


class Plan:
    """Which machines are due when: `rounds` groups of `due` ids spread over `size` ids."""

    def __init__(self, size: int, due: int, rounds: int) -> None:
        if due * rounds > size:
            raise SystemExit(f"{due} due x {rounds} rounds > {size} machines")
        self.size, self.due, self.rounds = size, due, rounds
        self.t0 = time.time()
        self.past = self.t0 - 3_600.0  # group r is due at past + r
        step = size / (due * rounds)
        self.group: dict[int, int] = {int(k * step): k % rounds for k in range(due * rounds)}

    @staticmethod
    def id(i: int) -> str:
        return f"machine-{i:08d}"

    def due_at(self, i: int) -> float:
        group = self.group.get(i)
        if group is None:
            return self.t0 + FUTURE + i * 1e-3
        return self.past + group

    def ids_of(self, group: int) -> list[str]:
        return [self.id(i) for i, g in self.group.items() if g == group]

    def envelope(self, i: int) -> str:
        """The JSON the engine would have written: state, seq, version, due, next_due."""
        t = repr(self.due_at(i))
        return (
            f'{{"state":{{"n":0,"i":{i}}},"seq":1,"version":1,"due":{{"wake":{t}}},"next_due":{t}}}'
        )


def populate_sqlite(path: Path, plan: Plan) -> float:
    """Write `plan.size` envelopes into casern's schema; returns seconds."""
    start = now()
    SQLiteStore(sqlite_url(path)).close()  # casern creates its own schema
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # population only; casern reopens with its defaults
    db.execute("PRAGMA cache_size=-262144")
    indexes = db.execute(
        "SELECT name, sql FROM sqlite_master"
        " WHERE type = 'index' AND tbl_name = 'machines' AND sql IS NOT NULL"
    ).fetchall()
    db.execute("BEGIN")
    for name, _ in indexes:
        db.execute(f'DROP INDEX "{name}"')

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(plan.size):
            yield plan.id(i), 1, plan.envelope(i), plan.due_at(i), None, 0

    db.executemany(
        "INSERT INTO machines (id, rev, doc, next_due, pending_since, nfailed)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        rows(),
    )
    for _, sql in indexes:
        db.execute(sql)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("ANALYZE")
    db.close()
    return now() - start


def measure(app: casern.Casern, plan: Plan, label: str) -> dict[str, Any]:
    """Warm up with group 0, then time one tick per further group; check every fire."""
    ticks: list[float] = []
    for group in range(plan.rounds):
        start = now()
        fired = app.run_once(now=plan.past + group + 0.5)
        secs = now() - start
        if fired != plan.due:
            raise SystemExit(f"{label}: tick {group} fired {fired} machines, expected {plan.due}")
        ids = plan.ids_of(group)
        records = app.store.get_many(ids)
        woken = sum(1 for id in ids if id in records and "woken" in records[id].doc["state"])
        untouched = all(
            r.doc.get("next_due") is None and r.doc["seq"] == 2 for r in records.values()
        )
        if woken != plan.due or not untouched:
            raise SystemExit(f"{label}: tick {group}: only {woken} of {plan.due} really fired")
        if group > 0:
            ticks.append(secs)
        else:
            first = secs
    return {
        "first": first,
        "ticks": ticks,
        "median": statistics.median(ticks),
        "min": min(ticks),
    }


def bench_sqlite(size: int, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    plan = Plan(size, args.due, args.rounds + 1)
    path = base / f"tick-{size}.db"
    populate = populate_sqlite(path, plan)
    app = casern.Casern(sqlite_url(path), reducers={"wake": wake}, timers={"wake": next_wake})
    try:
        result = measure(app, plan, f"sqlite {size:,}")
        # Honest: the due query saw no more than this tick's group.
        left = app.store.due(plan.t0, size)
        if left:
            raise SystemExit(f"sqlite {size:,}: {len(left)} machines still due after all rounds")
    finally:
        app.close()
    result.update(store="sqlite", size=size, populate=populate, bytes=path.stat().st_size)
    return result


# -- CouchDB ---------------------------------------------------------------------------------


def couch_available() -> tuple[Callable[..., Any] | None, str]:
    try:
        import casern.stores.couchdb  # noqa: F401
    except ImportError as e:
        return None, f"casern.stores.couchdb not importable: {e}"
    import sys

    sys.path.insert(0, str(ROOT))
    try:
        from tests._couch import couchdb_server
    except ImportError as e:
        return None, f"tests/_couch.py not importable: {e}"
    return couchdb_server, ""


def populate_couch(url: str, plan: Plan, chunk: int = 5_000) -> float:
    """POST envelopes to `_bulk_docs` in chunks (after casern created db and indexes)."""
    from casern.stores.couchdb import CouchDBStore

    start = now()
    CouchDBStore(url).close()

    def docs() -> Iterator[dict[str, Any]]:
        for i in range(plan.size):
            t = plan.due_at(i)
            yield {
                "_id": plan.id(i),
                "state": {"n": 0, "i": i},
                "seq": 1,
                "version": 1,
                "due": {"wake": t},
                "next_due": t,
            }

    bulk_load_couch(url, docs(), chunk)
    return now() - start


def bench_couch(base_url: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    import uuid

    plan = Plan(size, args.due, args.rounds + 1)
    url = f"{base_url.rstrip('/')}/casern-bench-tick-{size}-{uuid.uuid4().hex[:8]}"
    populate = populate_couch(url, plan)
    app = casern.Casern(url, reducers={"wake": wake}, timers={"wake": next_wake})
    try:
        result = measure(app, plan, f"couchdb {size:,}")
    finally:
        app.close()
    result.update(store="couchdb", size=size, populate=populate, bytes=0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="1000,1000000", help="stored machines, small,large (default 1e3,1e6)"
    )
    parser.add_argument("--due", type=int, default=100, help="due machines per tick (default 100)")
    parser.add_argument("--rounds", type=int, default=9, help="timed ticks per size (default 9)")
    parser.add_argument("--dir", default=None, help="folder for the database files")
    parser.add_argument(
        "--couchdb",
        default=None,
        help="also CouchDB: a server base URL (no database), or 'auto' to start pouchdb-server",
    )
    parser.add_argument("--couch-sizes", default="1000,100000", help="CouchDB sizes")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]

    print(f"casern bench: timer tick — {python_info()}")
    print(f"{args.due} due machines per tick, {args.rounds} timed ticks (+1 warm-up) per size")
    results: list[dict[str, Any]] = []
    with temp_dir(args.dir) as base:
        for size in sizes:
            r = bench_sqlite(size, args, base)
            print(f"  sqlite {size:,}: populated in {r['populate']:.1f} s", flush=True)
            results.append(r)
    couch: list[dict[str, Any]] = []
    if args.couchdb:
        server, why = couch_available()
        if server is None:
            print(f"  couchdb: skipped ({why})")
        else:
            couch_sizes = [int(float(s)) for s in args.couch_sizes.split(",")]
            if args.couchdb == "auto":
                with server() as base_url:
                    couch = [bench_couch(base_url, n, args) for n in couch_sizes]
            else:
                couch = [bench_couch(args.couchdb, n, args) for n in couch_sizes]
            for r in couch:
                print(f"  couchdb {r['size']:,}: populated in {r['populate']:.1f} s", flush=True)

    rows = [
        [
            r["store"],
            r["size"],
            r["populate"],
            r["bytes"] / 1e6 if r["bytes"] else float("nan"),
            r["first"] * 1e3,
            r["median"] * 1e3,
            r["min"] * 1e3,
            r["median"] / args.due * 1e6,
        ]
        for r in results + couch
    ]
    print_table(
        [
            "store",
            "machines",
            "populate s",
            "file MB",
            "1st tick ms",
            "tick ms (med)",
            "min ms",
            "µs/due",
        ],
        rows,
        title=f"one tick firing {args.due} due machines",
    )
    print()
    for label, group in (("couchdb ", couch), ("", results)):
        if len(group) < 2:
            continue
        small, large = group[0], group[-1]
        print(
            f"{label or 'sqlite '}{small['size']:,} machines: {small['median'] * 1e3:.1f} ms/tick;"
            f" {large['size']:,} machines: {large['median'] * 1e3:.1f} ms/tick"
        )
        ratio = large["median"] / small["median"]
        best = large["min"] / small["min"]
        print(
            ratio_line(f"{label}tick {large['size']:,}/{small['size']:,}", ratio, "<= 2x")
            + f"  [medians; fastest ticks: {best:.2f}x]"
        )


if __name__ == "__main__":
    main()
