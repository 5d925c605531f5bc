"""Inspector page times with 100,000 machines vs 1,000, on SQLite and CouchDB.

The store is populated fast (as bench/tick.py does: every machine a `wake`
timer), then one machine gets 20 changes through `send`, so its page has a
timeline. The inspector is served by uvicorn on a free loopback port, and each
page is fetched over HTTP (httpx, keep-alive) `--repeat` times; the median is
printed. The raw baseline, in the same run, is the public call the page is
built on (`app.ids(limit=51)`, `app.inspect(id)` + `app.history(id)`) timed
in-process: the ratio is what the web layer (routing, templates, HTTP) adds.

The issue's goal: a page answers in < 200 ms with 100,000 machines; paging
reads one page of ids, never all, so 100,000 costs about what 1,000 costs.

    python bench/inspector.py                                  # SQLite + pouchdb-server
    python bench/inspector.py --couchdb http://admin:pw@127.0.0.1:5984
    python bench/inspector.py --sizes 1000,100000 --repeat 30 --no-couchdb
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
from _common import print_table, python_info, ratio_line, sqlite_url, temp_dir
from tick import Plan, next_wake, populate_couch, populate_sqlite, wake

import casern
import casern.inspector
from tests._couch import free_port

HISTORY = 20


def message(preferences: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**state, "messages": [*state.get("messages", []), data], "count": len(state) + 1}


def median_ms(repeat: int, fn: Callable[[], Any]) -> float:
    fn()  # warm: templates compiled, connections open, indexes built
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(url: str, size: int, repeat: int) -> dict[str, Any]:
    app = casern.Casern(
        url, reducers={"wake": wake, "message": message}, timers={"wake": next_wake}
    )
    try:
        one = Plan.id(size // 2)
        for n in range(HISTORY):
            app.send("message", one, {"n": n, "text": f"message {n}"})
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                casern.inspector.asgi(app), host="127.0.0.1", port=port, log_level="warning"
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        middle = Plan.id(size // 3)
        try:
            with httpx.Client(base_url=base, timeout=60) as client:

                def get(path: str) -> Callable[[], Any]:
                    def go() -> None:
                        r = client.get(path)
                        if r.status_code != 200:
                            raise SystemExit(f"GET {path}: {r.status_code} {r.text[:200]}")

                    return go

                row = {
                    "size": size,
                    "raw ids": median_ms(repeat, lambda: app.ids(limit=51)),
                    "raw machine": median_ms(repeat, lambda: (app.inspect(one), app.history(one))),
                    "list page": median_ms(repeat, get("/")),
                    "list page, middle": median_ms(repeat, get(f"/?after={middle}")),
                    "api ids": median_ms(repeat, get("/api/machines?prefix=machine-0001")),
                    "machine page": median_ms(repeat, get(f"/machines/{one}")),
                    "api machine": median_ms(repeat, get(f"/api/machines/{one}")),
                    "failed page": median_ms(repeat, get("/failed")),
                }
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        app.close()
    return row


COLUMNS = [
    "size",
    "raw ids",
    "list page",
    "list page, middle",
    "api ids",
    "raw machine",
    "machine page",
    "api machine",
    "failed page",
]


def report(kind: str, rows: list[dict[str, Any]]) -> None:
    print_table(
        [c if c == "size" else f"{c} ms" for c in COLUMNS],
        [[r[c] for c in COLUMNS] for r in rows],
        title=f"{kind}: median ms per request",
    )
    small, large = rows[0], rows[-1]
    worst = max(large[c] for c in COLUMNS if "page" in c or "api" in c)
    print(f"slowest page with {large['size']:,} machines: {worst:.1f} ms (goal < 200 ms)")
    print(
        ratio_line(
            f"{kind} list page {large['size']:,}/{small['size']:,}",
            large["list page"] / small["list page"],
            "~1x: one page, never a scan",
        )
    )
    print(
        ratio_line(
            f"{kind} list page / raw ids",
            large["list page"] / large["raw ids"],
            "what HTTP + templates add",
        )
    )
    print(
        ratio_line(
            f"{kind} machine page / raw calls",
            large["machine page"] / large["raw machine"],
            "what HTTP + templates add",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--couchdb", help="CouchDB base URL (default: pouchdb-server)")
    parser.add_argument("--no-couchdb", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(python_info())
    with temp_dir() as tmp:
        rows = []
        for size in sizes:
            path = tmp / f"inspector-{size}.db"
            seconds = populate_sqlite(path, Plan(size, 1, 1))
            print(f"  sqlite {size:,} machines populated in {seconds:.1f} s", flush=True)
            rows.append(measure(sqlite_url(path), size, args.repeat))
        report("sqlite", rows)
    if args.no_couchdb:
        return

    def couch(base_url: str) -> None:
        rows = []
        for size in sizes:
            url = f"{base_url.rstrip('/')}/casern-bench-inspector-{size}-{uuid.uuid4().hex[:8]}"
            seconds = populate_couch(url, Plan(size, 1, 1))
            print(f"  couchdb {size:,} machines populated in {seconds:.1f} s", flush=True)
            rows.append(measure(url, size, args.repeat))
        report("couchdb", rows)

    if args.couchdb:
        couch(args.couchdb)
    else:
        from tests._couch import couchdb_server

        with couchdb_server() as base_url:
            print(f"server: pouchdb-server in memory at {base_url}")
            couch(base_url)


if __name__ == "__main__":
    main()
