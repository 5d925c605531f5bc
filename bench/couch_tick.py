"""Timer tick cost on CouchDB: 100 due machines among 1,000 vs among 100,000 stored ones.

The database is populated straight through `_bulk_docs` (chunks of 5,000) with
envelopes as the engine writes them (`state`, `seq`, `version`, `due`
{"wake": t}, `next_due` t), after casern created the database and its Mango
indexes. Each tick is one `app.run_once(now=...)` whose `now` takes in exactly
one group of due machines: the `next_due` index query, then the normal send
path for each (read, reducer, revision-checked `_bulk_docs`). Round 0 is a
warm-up (it also builds the Mango index on pouchdb-server, which indexes
lazily, on the first query); every tick's machines are checked afterwards.
The due query alone (`store.due`) is timed too.

The contract: one tick costs in proportion to the due machines, not to all.
The plan, population and checks are shared with bench/tick.py (SQLite).

    python bench/couch_tick.py                       # pouchdb-server in memory
    python bench/couch_tick.py --couchdb http://admin:pw@127.0.0.1:5984
    python bench/couch_tick.py --sizes 1000,300000 --due 100 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import uuid
from typing import Any

from _common import now, print_table, python_info, ratio_line
from tick import Plan, measure, next_wake, populate_couch, wake

import casern


def bench(base_url: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(size, args.due, args.rounds + 1)
    url = f"{base_url.rstrip('/')}/casern-bench-tick-{size}-{uuid.uuid4().hex[:8]}"
    populate = populate_couch(url, plan, chunk=args.chunk)
    print(f"  {size:,} machines: populated in {populate:.1f} s", flush=True)
    start = now()
    # Opening re-posts the Mango indexes; pouchdb-server then brings them up to date.
    app = casern.Casern(url, reducers={"wake": wake}, timers={"wake": next_wake})
    opened = now() - start
    print(f"  {size:,} machines: Casern() opened in {opened:.1f} s", flush=True)
    try:
        result = measure(app, plan, f"couchdb {size:,}")
        # The due query alone, now that every group has fired: nothing is due.
        queries = []
        for _ in range(5):
            start = now()
            left = app.store.due(plan.past + args.rounds + 1, args.due)
            queries.append(now() - start)
        if left:
            raise SystemExit(f"couchdb {size:,}: {len(left)} machines still due after all rounds")
    finally:
        app.close()
    result.update(size=size, populate=populate, open=opened, query=statistics.median(queries))
    return result


def run(base_url: str, sizes: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    return [bench(base_url, size, args) for size in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--couchdb",
        default=os.environ.get("CASERN_COUCHDB_URL"),
        help="server base URL (no database); default: start pouchdb-server in memory",
    )
    parser.add_argument("--sizes", default="1000,100000", help="stored machines, small,large")
    parser.add_argument("--due", type=int, default=100, help="due machines per tick")
    parser.add_argument("--rounds", type=int, default=9, help="timed ticks per size")
    parser.add_argument("--chunk", type=int, default=5000, help="docs per _bulk_docs (populate)")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]

    print(f"casern bench: CouchDB timer tick — {python_info()}")
    print(f"{args.due} due machines per tick, {args.rounds} timed ticks (+1 warm-up) per size")
    if args.couchdb:
        results = run(args.couchdb, sizes, args)
    else:
        from tests._couch import couchdb_server

        with couchdb_server() as base_url:
            print(f"server: pouchdb-server in memory at {base_url}")
            results = run(base_url, sizes, args)
    print_table(
        [
            "machines",
            "populate s",
            "open s",
            "1st tick ms",
            "tick ms (med)",
            "min ms",
            "µs/due",
            "due query ms",
        ],
        [
            [
                r["size"],
                r["populate"],
                r["open"],
                r["first"] * 1e3,
                r["median"] * 1e3,
                r["min"] * 1e3,
                r["median"] / args.due * 1e6,
                r["query"] * 1e3,
            ]
            for r in results
        ],
        title=f"one tick firing {args.due} due machines (CouchDB)",
    )
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(
            ratio_line(
                f"couchdb tick {large['size']:,}/{small['size']:,}",
                large["median"] / small["median"],
                "<= 2x",
            )
        )


if __name__ == "__main__":
    main()
